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


def train_step(engine, objective, x, cond, gen, mask_ratio: float, ema) -> torch.Tensor:
    """One optimizer step; no host sync (the loss stays on the device). `ditforge bench` times
    exactly this function against a plain PyTorch loop."""
    loss = objective.loss(engine, x, cond, gen, mask_ratio=mask_ratio)
    engine.backward(loss)
    engine.step()
    if ema:
        ema.update(engine.module)
    return loss.detach()
