"""Objectives train, samplers are reproducible, CFG dropout drops what it says."""

from __future__ import annotations

import pytest
import torch

from ditforge.models.dit import DiT, DiTConfig
from ditforge.objectives import build_objective
from ditforge.objectives.ddpm import DDPM, alphas_cumprod
from ditforge.objectives.flow import RectifiedFlow
from ditforge.objectives.samplers import sample
from ditforge.spec import ObjectiveSpec


pytestmark = pytest.mark.usefixtures("one_thread")

OBJECTIVES = [
    dict(kind="rectified_flow", t_sampling="uniform"),
    dict(kind="rectified_flow", t_sampling="logit_normal"),
    dict(kind="rectified_flow", t_sampling="mode", weighting="min_snr"),
    dict(kind="ddpm", prediction="eps", schedule="linear"),
    dict(kind="ddpm", prediction="v", schedule="cosine", weighting="min_snr"),
]


def tiny(num_classes=3, **kw):
    torch.manual_seed(0)
    return DiT(DiTConfig(in_channels=4, num_classes=num_classes, **kw))


@pytest.mark.parametrize("ospec", OBJECTIVES, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_loss_is_finite_and_decreases_on_a_fixed_batch(ospec):
    obj = build_objective(ObjectiveSpec(**ospec))
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    x0 = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    cond = {"y": torch.arange(8) % 3}
    losses = []
    for step in range(40):
        # The same noise and t every step: a fixed batch, so the loss must fall.
        loss = obj.loss(model, x0, cond, torch.Generator().manual_seed(123))
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses[::8]


def test_masked_loss_trains_and_only_counts_kept_patches():
    obj = RectifiedFlow("uniform", 0.0)
    model = tiny(mixer_depth=1)
    x0 = torch.randn(4, 4, 2, 8, 8)
    loss = obj.loss(model, x0, {"y": torch.tensor([0, 1, 2, 0])}, torch.Generator().manual_seed(0), mask_ratio=0.5)
    assert torch.isfinite(loss)
    loss.backward()
    assert model.mixer[0].attn.qkv.weight.grad is not None


def test_cfg_dropout_rate():
    seen = []

    def spy(x, t, y=None, drop=None, mask_ratio=0.0, gen=None):
        seen.append(drop)
        return torch.zeros_like(x)

    obj = RectifiedFlow(cfg_dropout=0.25)
    obj.loss(
        spy, torch.zeros(20000, 1, 1, 1), {"y": torch.zeros(20000, dtype=torch.long)}, torch.Generator().manual_seed(0)
    )
    assert seen[0].float().mean().item() == pytest.approx(0.25, abs=0.015)
    seen.clear()
    obj.loss(spy, torch.zeros(10, 1, 1, 1), {"y": None}, torch.Generator().manual_seed(0))
    assert seen[0] is None  # unconditional model: nothing to drop


def test_t_sampling_distributions():
    g = torch.Generator().manual_seed(0)
    for mode, mean_range in [("uniform", (0.48, 0.52)), ("logit_normal", (0.48, 0.52)), ("mode", (0.48, 0.52))]:
        t = RectifiedFlow(mode).sample_t(20000, g, "cpu")
        assert 0 <= t.min() and t.max() <= 1 and mean_range[0] < t.mean() < mean_range[1], mode
    u = RectifiedFlow("uniform").sample_t(20000, g, "cpu")
    ln = RectifiedFlow("logit_normal").sample_t(20000, g, "cpu")
    assert ((ln - 0.5).abs() < 0.1).float().mean() > ((u - 0.5).abs() < 0.1).float().mean() + 0.05  # mass in the middle


def test_schedules():
    lin, cos = alphas_cumprod("linear", 1000), alphas_cumprod("cosine", 1000)
    for ab in (lin, cos):
        assert (ab[1:] < ab[:-1]).all() and ab[0] > 0.99 and ab[-1] < 0.01
    assert cos[500] > lin[500]  # cosine destroys information more slowly in the middle


@pytest.mark.parametrize(
    "kind,sampler", [("rectified_flow", "euler"), ("rectified_flow", "heun"), ("ddpm", "ddim"), ("ddpm", "ddpm")]
)
def test_samplers_are_deterministic_for_a_seed(kind, sampler):
    obj = build_objective(ObjectiveSpec(kind=kind))
    model = tiny()
    for blk in model.blocks:  # a non-trivial network, so samples depend on the class
        torch.nn.init.normal_(blk.ada[-1].weight, std=0.05)
    torch.nn.init.normal_(model.final.linear.weight, std=0.05)
    model.eval()
    cond = {"y": torch.tensor([0, 1, 2])}

    def run(seed, scale=2.0):
        return sample(
            obj,
            model,
            (3, 4, 8, 8),
            cond,
            sampler=sampler,
            steps=6,
            cfg_scale=scale,
            seed=seed,
        )

    a, b, c = run(0), run(0), run(1)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert not torch.allclose(a, run(0, scale=1.0))  # guidance changes the samples


def test_flow_samplers_integrate_a_known_velocity():
    """With the exact velocity of a point mass at x0, Euler and Heun both land on x0."""
    x0 = torch.full((1, 1, 2, 2), 0.7)
    obj = RectifiedFlow()

    def model(x, t, **_):  # x_t = (1-t)·x0 + t·ε  ⇒  v = (x - x0) / t
        return (x - x0) / t.view(-1, 1, 1, 1).clamp_min(1e-6)

    for sampler in ("euler", "heun"):
        out = sample(obj, model, (1, 1, 2, 2), {}, sampler=sampler, steps=10, seed=3)
        torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)


def test_ddim_recovers_x0_with_an_oracle():
    x0 = torch.full((1, 1, 2, 2), -0.4)
    obj = DDPM("eps", "cosine")

    def model(x, t, **_):  # the exact ε for a point mass at x0
        ab = obj.ab[(t * obj.steps).round().long()].float().view(-1, 1, 1, 1)
        return (x - ab.sqrt() * x0) / (1 - ab).sqrt()

    torch.testing.assert_close(
        sample(obj, model, (1, 1, 2, 2), {}, sampler="ddim", steps=20, seed=0), x0, atol=1e-3, rtol=0
    )


def test_wrong_sampler_for_objective_is_rejected():
    with pytest.raises(ValueError, match="does not fit"):
        sample(RectifiedFlow(), tiny(), (1, 4, 8, 8), {}, sampler="ddim")
