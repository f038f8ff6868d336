"""`data.batch_size: auto`: the largest micro-batch that fits the worker's device, and the gradient
accumulation that keeps `data.global_batch`.

The probe runs real forward+backward passes of the model at growing micro-batches and reads the
device's peak memory after each: memory per sample is not worth modelling (attention kernel,
activation checkpointing, compile and video length all change it). It runs before the DeepSpeed
engine exists, so what the engine adds later (fp32 master weights and AdamW's two moments, per
rank under ZeRO 1-3) is counted from the parameter count and taken off the budget first.

Batches are drawn from one resolution/duration bucket at a time, so each bucket is probed and the
micro-batch is the smallest of the bucket maxima: the largest one that fits every bucket.
The search itself (`largest_fitting`) takes the measurement as a function, so the tests drive it
with a fake memory limit on CPU.
"""

from __future__ import annotations

import dataclasses
import gc
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ..spec import JobSpec

if TYPE_CHECKING:
    from ..objectives import Objective


class DoesNotFit(Exception):
    """A probe step ran out of device memory."""


@dataclasses.dataclass
class BatchPlan:
    micro: int  # samples per worker per forward/backward
    accum: int  # micro-batches per optimizer step
    probed: dict[str, int]  # bucket name → largest micro-batch that fit it (empty when nothing was probed)
    source: str  # "fixed" | "fallback" (auto on CPU) | "probed"

    def tags(self) -> dict[str, object]:
        out: dict[str, object] = {
            "ditforge.batch.micro": self.micro,
            "ditforge.batch.accum": self.accum,
            "ditforge.batch.source": self.source,
        }
        out.update({f"ditforge.batch.probe.{k}": v for k, v in self.probed.items()})
        return out


def largest_fitting(
    measure: Callable[[int], int], budget: int, *, multiple: int = 8, cap: int = 1024, start: int | None = None
) -> int:
    """The largest micro-batch b (a multiple of `multiple`, ≤ cap) with measure(b) ≤ budget bytes.

    `measure(b)` returns the peak bytes of one step at micro-batch b, or raises `DoesNotFit`.
    Doubling from `start` brackets the limit, then bisection narrows it; peak memory grows with b,
    so about log2(cap / multiple) + log2(the bracket) probes. Returns 0 when even `multiple` does
    not fit (the caller turns that into an error)."""

    def fits(b: int) -> bool:
        try:
            return measure(b) <= budget
        except DoesNotFit:
            return False

    cap = cap // multiple * multiple
    if cap < multiple:
        return 0
    lo, hi = 0, None  # lo: largest known to fit; hi: smallest known not to fit
    b = min(cap, start or multiple)
    while hi is None:
        if fits(b):
            lo = b
            if b == cap:
                return b
            b = min(cap, b * 2)
        else:
            hi = b
    while hi - lo > multiple:  # both multiples of `multiple`
        mid = (lo + hi) // 2 // multiple * multiple
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def engine_state_bytes(params: int, zero_stage: int, world: int, bf16: bool) -> int:
    """What DeepSpeed allocates beyond the probed model: the fp32 master weights and AdamW's two
    fp32 moments (12 bytes per parameter; only this rank's 1/world partition under ZeRO 1-3), plus
    the gradient partition kept between steps (ZeRO-2/3) — the ZeRO paper's §3 accounting. In fp32
    the module's own weights are the master copy, so only the moments are added."""
    opt = (12 if bf16 else 8) * params
    if zero_stage >= 1:
        opt = math.ceil(opt / world)
    grads = math.ceil((4 if bf16 else 0) * params / world) if zero_stage >= 2 else 0
    return opt + grads


def cuda_measure(
    model: torch.nn.Module,
    objective: Objective,
    shape: tuple[int, ...],
    cond_of: Callable[[int], dict[str, Any]],
    device: torch.device,
    dtype: torch.dtype,
) -> Callable[[int], int]:
    """measure(b) for one bucket's latent `shape` (C, ...): the peak allocated bytes of one
    forward+backward of `model` at micro-batch b. `cond_of(b)` makes that batch's conditioning."""

    def measure(b: int) -> int:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            x = torch.randn(b, *shape, device=device, dtype=dtype)
            gen = torch.Generator(device).manual_seed(0)
            loss = objective.loss(model, x, cond_of(b), gen)
            loss.backward()
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device)
        except torch.OutOfMemoryError as e:
            raise DoesNotFit(str(e)) from None
        finally:
            model.zero_grad(set_to_none=True)  # the probe's gradients must not reach the first step
            gc.collect()
            torch.cuda.empty_cache()

    return measure


def accumulation(global_batch: int | None, micro: int, world: int) -> tuple[int, int]:
    """(micro, accum) with micro × world × accum == global_batch and micro no larger than given:
    the fewest accumulation steps whose micro-batch divides the global batch evenly."""
    if global_batch is None:
        return micro, 1
    per_worker = global_batch // world  # the spec checked that world divides it
    accum = max(1, math.ceil(per_worker / micro))
    while per_worker % accum:
        accum += 1
    return per_worker // accum, accum


def plan_batch(spec: JobSpec, world: int, probe: Callable[[], dict[str, int]] | None = None) -> BatchPlan:
    """The micro-batch and accumulation for this job on this worker. `probe()` returns the largest
    micro-batch per bucket (GPU workers with `data.batch_size: auto`); without one, auto falls back
    to `data.auto_batch.fallback`."""
    d = spec.data
    if d.batch_size != "auto":
        micro, accum = accumulation(spec.global_batch(), d.batch_size, world)
        return BatchPlan(micro, accum, {}, "fixed")
    if probe is None:
        micro, accum = accumulation(spec.global_batch(), d.auto_batch.fallback, world)
        return BatchPlan(micro, accum, {}, "fallback")
    probed = probe()
    if min(probed.values()) < 1:
        small = min(probed, key=lambda name: probed[name])
        raise RuntimeError(
            f"data.batch_size: auto: not even {d.auto_batch.multiple} samples of bucket {small} fit "
            f"{d.auto_batch.memory_fraction:.0%} of the device's memory (data.auto_batch.memory_fraction)"
        )
    micro, accum = accumulation(spec.global_batch(), min(probed.values()), world)
    return BatchPlan(micro, accum, probed, "probed")


def probe_buckets(
    measure_for: Callable[[tuple[int, ...]], Callable[[int], int]],
    shapes: dict[str, tuple[int, ...]],
    budget: int,
    multiple: int,
    cap: int,
) -> dict[str, int]:
    """Largest micro-batch per bucket. Buckets are probed largest first: the next one's search starts
    at the last result (a smaller bucket fits at least as many samples), which saves probes."""
    out: dict[str, int] = {}
    start = None
    for name, shape in sorted(shapes.items(), key=lambda kv: -math.prod(kv[1])):
        out[name] = largest_fitting(measure_for(shape), budget, multiple=multiple, cap=cap, start=start)
        start = out[name] or None
    return out
