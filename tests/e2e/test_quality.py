"""The no-download quality metric: Fréchet distance maths, and a demo model trained on CPU for a
couple of minutes generates the classes it is asked for far above chance."""

from __future__ import annotations

import time

import pytest
import torch

from ditforge.evaluate import quality


pytestmark = pytest.mark.usefixtures("one_thread")


def test_frechet_distance_properties():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4000, 8, generator=g), torch.randn(4000, 8, generator=g)
    assert quality.frechet_distance(a, b) < 0.05  # same distribution
    assert quality.frechet_distance(a, b + 1.0) == pytest.approx(8.0, rel=0.05)  # ‖Δμ‖² = 8
    assert quality.frechet_distance(a, 2 * b) == pytest.approx(8.0, rel=0.1)  # tr(1 + 4 − 2·2) per dim = 1


def test_which_set():
    from ditforge.data import synthetic

    assert quality.which_set(synthetic.CLASSES, 1) == "shapes"
    assert quality.which_set(synthetic.DIRECTIONS, 8) == "moving-shapes"
    assert quality.which_set(["cat", "dog"], 1) is None


def test_classifier_scores_large_samples_at_its_own_size():
    """Samples above MAX_SIZE px (a 256 px video job's) are scored after an area downscale, so the
    classifier never trains on (or holds) full-size clips: 1200 clips of 16 x 256 x 256 are 15 GB."""
    import torch.nn.functional as F

    from ditforge.evaluate.quality import MAX_SIZE, Classifier

    torch.manual_seed(0)
    clf = Classifier(4, video=True, size=16).eval()
    big = torch.rand(2, 3, 4, 64, 64) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(clf.features(big), clf.features(F.interpolate(big, size=(4, 16, 16), mode="area")))
    assert Classifier(10, video=False).size == MAX_SIZE <= 32


def test_classifier_scores_long_clips_on_evenly_spaced_frames():
    """Clips longer than MAX_FRAMES (a 16-frame job's) are scored on that many evenly spaced
    frames, first and last included, by the classifier trained on clips of that length."""
    from ditforge.evaluate.quality import MAX_FRAMES, Classifier

    torch.manual_seed(0)
    clf = Classifier(8, video=True, size=16, frames=4).eval()
    long = torch.rand(2, 3, 16, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(clf.features(long), clf.features(long[:, :, [0, 5, 10, 15]]))
        assert not torch.allclose(clf.features(long), clf.features(long[:, :, :4]))
    assert Classifier(8, video=True).frames == MAX_FRAMES == 8


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_model_generates_its_classes_well_above_chance(capsys):
    """The demo's model, DiT-T/2 with the identity VAE, on 16px shapes ((12, 8, 8) latents, so it
    learns within ~1.5 CPU-minutes; the demo itself uses 32px), 600 steps of 64 in-process; EMA
    weights sampled with Euler + CFG 4. Measured: accuracy 0.50-0.58 (chance 0.10), FD 4.8-5.5."""
    from ditforge.models.dit import DiT, DiTConfig
    from ditforge.models.vae import IdentityVAE
    from ditforge.objectives.flow import RectifiedFlow
    from ditforge.objectives.samplers import sample
    from ditforge.train.ema import EMA

    t0 = time.time()
    classifier = quality.train_classifier("shapes", 16)
    vae = IdentityVAE(2)
    pixels, labels = quality.real_pixels("shapes", range(2048), 16, 1, seed=0)
    latents = vae.encode(pixels)  # (2048, 12, 8, 8)
    torch.manual_seed(0)
    model = DiT(DiTConfig(in_channels=12, size="T", patch=2, num_classes=10))
    ema = EMA(model, 0.99)
    obj = RectifiedFlow("logit_normal", cfg_dropout=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    g = torch.Generator().manual_seed(0)
    for step in range(600):
        idx = torch.randint(0, len(latents), (64,), generator=g)
        loss = obj.loss(model, latents[idx], {"y": labels[idx]}, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.update(model)
    model.eval()
    y = torch.arange(10).repeat_interleave(16)
    with ema.swapped_in(model):
        z = sample(obj, model, (len(y), 12, 8, 8), {"y": y}, sampler="euler", steps=20, cfg_scale=4.0, seed=0)
    metrics = quality.score(classifier, vae.decode(z), y, "shapes", 16)
    with capsys.disabled():
        print(
            f"\n[quality] demo DiT-T/2, 600 CPU steps: class accuracy {metrics['validation/class_accuracy']:.3f} "
            f"(chance 0.100), FD {metrics['validation/fd']:.3f}, final loss {loss.item():.3f}, {time.time() - t0:.0f}s"
        )
    assert metrics["validation/class_accuracy"] > 0.3  # 3x chance
