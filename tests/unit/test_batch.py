"""`data.batch_size: auto` and gradient accumulation: the probe's search against a fake memory
limit (CPU), the batch plan, and an accumulated DeepSpeed step against one big batch."""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest
import torch

from ditforge.spec import JobSpec
from ditforge.train.batch import (
    DoesNotFit,
    accumulation,
    engine_state_bytes,
    largest_fitting,
    plan_batch,
    probe_buckets,
)

GiB = 1 << 30


def fake_device(fixed: int, per_sample: int, limit: int, calls: list):
    """Peak bytes of a step: fixed state + per-sample activations + a superlinear term (attention
    workspaces grow faster than linearly); past `limit` the step runs out of memory."""

    def measure(b: int) -> int:
        calls.append(b)
        peak = fixed + per_sample * b + (b * b) * 1000
        if peak > limit:
            raise DoesNotFit(f"{peak} > {limit}")
        return peak

    return measure


@pytest.mark.parametrize("budget_gib,multiple,cap", [(10, 8, 1024), (3, 16, 1024), (40, 8, 96), (1.05, 8, 512)])
def test_largest_fitting_matches_brute_force(budget_gib, multiple, cap):
    budget = int(budget_gib * GiB)
    calls: list[int] = []
    # The device itself is larger than the budget here: the budget (a fraction of it) decides.
    measure = fake_device(GiB, 20 << 20, int(1.2 * budget), calls)
    got = largest_fitting(measure, budget, multiple=multiple, cap=cap)

    def ok(b):
        try:
            return fake_device(GiB, 20 << 20, int(1.2 * budget), [])(b) <= budget
        except DoesNotFit:
            return False

    want = max([b for b in range(multiple, cap // multiple * multiple + 1, multiple) if ok(b)], default=0)
    assert got == want and got % multiple == 0
    assert len(calls) <= 2 * (cap // multiple).bit_length() + 1, calls  # doubling + bisection, not a scan


def test_out_of_memory_and_nothing_fits():
    calls: list[int] = []
    # The device runs out (DoesNotFit) before the budget is reached: OOM bounds the search too.
    assert largest_fitting(fake_device(GiB, 100 << 20, 2 * GiB, calls), 100 * GiB, multiple=8) == 8
    assert largest_fitting(fake_device(10 * GiB, 1, 11 * GiB, []), 5 * GiB, multiple=8) == 0


@pytest.mark.parametrize(
    "global_batch,micro,world,want",
    [
        (None, 48, 2, (48, 1)),
        (256, 80, 1, (64, 4)),
        (256, 64, 2, (64, 2)),
        (96, 40, 2, (24, 2)),
        (30, 64, 3, (10, 1)),
        (7, 2, 1, (1, 7)),
    ],
)
def test_accumulation_keeps_the_global_batch(global_batch, micro, world, want):
    got = accumulation(global_batch, micro, world)
    assert got == want
    if global_batch:
        assert got[0] * got[1] * world == global_batch and got[0] <= micro


def _spec(**data) -> JobSpec:
    return JobSpec.model_validate({"name": "t", "data": {"train": "file:///x", **data}, "resources": {"workers": 2}})


def test_plan_batch_fixed_fallback_and_probed():
    p = plan_batch(_spec(batch_size=16, global_batch=64), 2)
    assert (p.micro, p.accum, p.source) == (16, 2, "fixed")
    # auto without a probe (a CPU worker): the spec's fallback
    p = plan_batch(_spec(batch_size="auto", auto_batch={"fallback": 6}), 2)
    assert (p.micro, p.accum, p.source, p.probed) == (6, 1, "fallback", {})
    # probed: the smallest bucket maximum, so every bucket fits; accumulation keeps the global batch
    p = plan_batch(_spec(batch_size="auto", global_batch=512), 2, lambda: {"img-256x256": 96, "img-192x320": 80})
    assert (p.micro, p.accum, p.source) == (64, 4, "probed")
    assert p.tags()["ditforge.batch.probe.img-192x320"] == 80 and p.tags()["ditforge.batch.micro"] == 64
    with pytest.raises(RuntimeError, match="data.batch_size: auto: not even 8 samples of bucket vid-16"):
        plan_batch(_spec(batch_size="auto"), 2, lambda: {"img-32": 64, "vid-16": 0})


def test_probe_buckets_per_bucket_largest_first():
    seen: list[tuple] = []

    def measure_for(shape):  # memory per sample grows with the bucket's latent size
        size = shape[0] * shape[1] * shape[2]

        def m(b):
            seen.append((shape, b))
            return b * size * 1000

        return m

    shapes = {"small": (4, 16, 16), "big": (4, 32, 32)}
    out = probe_buckets(measure_for, shapes, budget=4096 * 1000 * 40, multiple=8, cap=1024)
    assert out == {"big": 40, "small": 160}
    assert seen[0][0] == (4, 32, 32)  # the largest bucket first
    first_small = next(b for s, b in seen if s == (4, 16, 16))
    assert first_small == 40  # its search starts where the bigger bucket ended


def test_engine_state_bytes_follows_zero():
    # bf16 ZeRO-0: 12 bytes/param of fp32 master + moments; ZeRO-2 at 4 ranks: (12 + 4) / 4
    assert engine_state_bytes(1000, 0, 4, True) == 12000
    assert engine_state_bytes(1000, 2, 4, True) == 4000
    assert engine_state_bytes(1000, 1, 4, False) == 2000


# ----------------------------------------------------------------------------- accumulation in DeepSpeed


class _Objective:
    """Deterministic (no noise draw), so a split batch and the whole one see the same loss."""

    def loss(self, model, x, cond, gen, mask_ratio=0.0):
        t = torch.full((x.shape[0],), 0.5)
        return (model(x, t, cond["y"]) - x).square().mean()


def _accumulate(out: str, port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", DS_ACCELERATOR="cpu"
    )
    torch.set_num_threads(1)
    import torch.distributed as dist

    from ditforge.models.dit import DiT, DiTConfig
    from ditforge.train.engine import build_engine
    from ditforge.train.nonfinite import NonFiniteGuard
    from ditforge.train.step import train_step

    dist.init_process_group("gloo", rank=0, world_size=1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 4, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)
    res = {}
    for name, data in (("whole", {"batch_size": 8}), ("split", {"batch_size": 4, "global_batch": 8})):
        spec = JobSpec.model_validate(
            {
                "name": "t",
                "data": {"train": "file:///x", **data},
                "resources": {"workers": 1},
                "train": {"warmup": 0, "lr": 1e-3},
            }
        )
        micro, accum = accumulation(spec.data.global_batch, spec.data.fixed_batch(), 1)
        torch.manual_seed(0)
        engine = build_engine(DiT(DiTConfig(in_channels=4, size="T", num_classes=3)), spec, micro, accum)
        guard = NonFiniteGuard(engine.client_optimizer, torch.device("cpu"), 10)
        parts = [
            (x[i : i + micro], {"y": y[i : i + micro]}, None, None) for i in range(0, 8, micro)
        ]  # (x, cond, gen, given)
        for step in (1, 2):
            xs, c, _, _ = parts[-1]
            loss, good = train_step(engine, _Objective(), xs, c, None, 0.0, None, guard, step, more=parts[:-1])
        res[name] = {"loss": float(loss), "w": [p.detach().clone() for p in engine.module.parameters()]}
        if name == "split":  # a NaN in the first micro-batch skips the whole optimizer step
            before = [p.detach().clone() for p in engine.module.parameters()]
            bad = [(parts[0][0] * float("nan"), parts[0][1], None, None)]
            loss, good = train_step(engine, _Objective(), *parts[-1][:2], None, 0.0, None, guard, 3, more=bad)
            res["nan_good"] = float(good)
            res["nan_same"] = all(torch.equal(a, b) for a, b in zip(before, engine.module.parameters()))
    torch.save(res, out)
    dist.destroy_process_group()


def test_accumulated_step_matches_one_big_batch(tmp_path):
    from ditforge.bench.common import free_port

    out = str(tmp_path / "res.pt")
    p = mp.get_context("spawn").Process(target=_accumulate, args=(out, free_port()))
    p.start()
    p.join(300)
    assert p.exitcode == 0
    res = torch.load(out)
    whole, split = res["whole"], res["split"]
    # Two optimizer steps on 4+4 accumulated samples = two steps on 8 at once (the mean loss too).
    assert abs(whole["loss"] - split["loss"]) < 1e-5
    diff = max((a - b).abs().max().item() for a, b in zip(whole["w"], split["w"]))
    assert diff < 1e-5, diff
    assert res["nan_good"] == 0.0 and res["nan_same"]


# ----------------------------------------------------------------------------- the probe on a real GPU


@pytest.mark.gpu
def test_cuda_probe_fits_the_device():
    from ditforge.models.dit import DiT, DiTConfig
    from ditforge.objectives import build_objective
    from ditforge.spec import ObjectiveSpec
    from ditforge.train.batch import cuda_measure

    device = torch.device("cuda")
    model = DiT(DiTConfig(in_channels=4, size="T", num_classes=10)).to(device, torch.bfloat16)
    measure = cuda_measure(
        model,
        build_objective(ObjectiveSpec()),
        (4, 32, 32),
        lambda b: {"y": torch.zeros(b, dtype=torch.long, device=device)},
        device,
        torch.bfloat16,
    )
    small = measure(8)
    budget = small * 3
    b = largest_fitting(measure, budget, multiple=8, cap=4096)
    assert b >= 8 and measure(b) <= budget and all(p.grad is None for p in model.parameters())


def test_bucket_shapes_from_the_latent_manifest():
    from types import SimpleNamespace

    from ditforge.train.worker import _bucket_shapes

    m = {
        "buckets": {"img-32x32": {"shape": [4, 4, 4], "samples": 10}, "img-24x40": {"shape": [4, 3, 5], "samples": 3}},
        "shards": [{"shape": [4, 4, 4], "samples": 10}],
    }
    assert _bucket_shapes(SimpleNamespace(manifest=m, latent_shape=(4, 4, 4))) == {
        "img-32x32": (4, 4, 4),
        "img-24x40": (4, 3, 5),
    }
    m = {"shards": [{"shape": [4, 2, 8, 8], "samples": 5}, {"shape": [4, 1, 8, 8], "samples": 5}]}
    assert set(_bucket_shapes(SimpleNamespace(manifest=m, latent_shape=(4, 2, 8, 8))).values()) == {
        (4, 2, 8, 8),
        (4, 1, 8, 8),
    }
