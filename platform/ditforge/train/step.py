"""One training step, shared by the worker and `ditforge bench` (which times it against a plain
PyTorch loop). Kept free of Ray so the benchmark runs on a machine with only torch and DeepSpeed.

Randomness is derived, not carried: the noise, t and label dropout of step s on rank r come from a
generator seeded with (seed, s, r), so a resumed run draws exactly what an uninterrupted run would.
"""

from __future__ import annotations

import torch


def step_generator(seed: int, step: int, rank: int, device: torch.device | str = "cpu") -> torch.Generator:
    # On the training device: noise drawn where it is used needs no host-to-device copy.
    return torch.Generator(device).manual_seed((seed * 1_000_003 + step) * 4099 + rank)


def train_step(engine, objective, x, cond, gen, mask_ratio: float, ema, guard=None, step: int = 0, given=None):
    """One optimizer step → (loss, good), both 0-d device tensors: no host sync. `guard`
    (train/nonfinite.py) makes the optimizer and the EMA skip a step whose loss is NaN/Inf; `good`
    is 0 for such a step. `ditforge bench` times exactly this function against a plain loop.
    `given` (B, gt, gh, gw): the video-task mask of this batch (models/tasks.py), or None."""
    loss = objective.loss(engine, x, cond, gen, mask_ratio=mask_ratio, **({"given": given} if given is not None else {}))
    good = None
    if guard is not None:
        loss, good = guard(loss, step)
    engine.backward(loss)
    engine.step()
    if ema:
        ema.update(engine.module, keep=good)
    return loss.detach(), (torch.ones((), device=loss.device) if good is None else good)
