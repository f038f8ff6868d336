"""One training step, shared by the worker and `ditforge bench` (which times it against a plain
PyTorch loop). Kept free of Ray so the benchmark runs on a machine with only torch and DeepSpeed.

Randomness is derived, not carried: the noise, t and label dropout of step s on rank r come from a
generator seeded with (seed, s, r), so a resumed run draws exactly what an uninterrupted run would.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ..objectives import Objective
    from .ema import EMA
    from .engine import Engine
    from .nonfinite import NonFiniteGuard


def step_generator(seed: int, step: int, rank: int, device: torch.device | str = "cpu") -> torch.Generator:
    # On the training device: noise drawn where it is used needs no host-to-device copy.
    return torch.Generator(device).manual_seed((seed * 1_000_003 + step) * 4099 + rank)


def train_step(
    engine: Engine,
    objective: Objective,
    x: torch.Tensor,
    cond: dict[str, Any],
    gen: torch.Generator,
    mask_ratio: float,
    ema: EMA | None,
    guard: NonFiniteGuard | None = None,
    step: int = 0,
    given: torch.Tensor | None = None,
    more: Sequence[tuple[torch.Tensor, dict[str, Any], torch.Generator, torch.Tensor | None]] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step → (loss, good), both 0-d device tensors: no host sync. `guard`
    (train/nonfinite.py) makes the optimizer and the EMA skip a step whose loss is NaN/Inf; `good`
    is 0 for such a step. `ditforge bench` times exactly this function against a plain loop.
    `given` (B, gt, gh, gw): the video-task mask of this batch (models/tasks.py), or None.

    `more`: further micro-batches `(x, cond, gen, given)` of the same optimizer step (gradient
    accumulation, `data.global_batch`), run first. DeepSpeed divides each loss by its
    `gradient_accumulation_steps` and its `step()` only updates at the last micro-batch."""

    def loss_of(xm: torch.Tensor, cm: dict[str, Any], gm: torch.Generator, gv: torch.Tensor | None) -> torch.Tensor:
        return objective.loss(engine, xm, cm, gm, mask_ratio=mask_ratio, **({"given": gv} if gv is not None else {}))

    earlier: list[torch.Tensor] = []
    for xm, cm, gm, gv in more:
        lm = loss_of(xm, cm, gm, gv)
        engine.backward(lm)
        engine.step()  # not a boundary yet: DeepSpeed only counts the micro-step
        earlier.append(lm.detach())
    loss = loss_of(x, cond, gen, given)
    if earlier:  # 0 x NaN is NaN: the guard sees a non-finite earlier micro-batch too; gradients unchanged
        loss = loss + 0.0 * torch.stack(earlier).sum()
    good: torch.Tensor | None = None
    if guard is not None:
        loss, good = guard(loss, step)
    engine.backward(loss)
    engine.step()
    if ema:
        ema.update(engine.module, keep=good)
    if earlier:  # the step's loss is the mean over its micro-batches
        loss = (loss.detach() + torch.stack(earlier).sum()) / (len(earlier) + 1)
    return loss.detach(), (torch.ones((), device=loss.device) if good is None else good)
