"""Samplers: Euler and Heun for rectified flow; DDIM (η = 0) and DDPM ancestral for diffusion;
classifier-free guidance; all noise drawn from one generator seeded by `seed`, so a fixed seed
gives the same samples.

`cond` is the model's conditioning ({"y": (B,), "text": ...}); the unconditional branch is the
same batch with `drop` set, so the model swaps in its own null class and null caption.

Video tasks (models/tasks.py): `given` (B, gt, gh, gw) marks condition tokens and `x_given` holds
their clean latents. Every sampler puts those clean values back before each model call and at the
end, as training showed them; CFG drops the class / caption, never the given frames (both
branches see them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from .common import given_latents
from .ddpm import DDPM

if TYPE_CHECKING:
    from . import Objective

SAMPLERS = {"rectified_flow": ("euler", "heun"), "ddpm": ("ddim", "ddpm")}


def guided(
    model: Callable[..., Any],
    x: torch.Tensor,
    t: torch.Tensor,
    cond: dict[str, Any],
    cfg_scale: float,
    given: torch.Tensor | None = None,
) -> torch.Tensor:
    """out_u + s·(out_c - out_u), both branches in one batch of 2B; plain conditional if s == 1.
    `given` goes to both branches: the unconditional one drops the class / caption only."""
    cond = {k: v for k, v in cond.items() if v is not None}
    extra = {"given": given} if given is not None else {}
    if not cond or cfg_scale == 1.0:
        return model(x, t, **cond, **extra)
    B = x.shape[0]
    both = {k: torch.cat([v, v]) for k, v in cond.items()}
    if given is not None:
        both["given"] = torch.cat([given, given])
    drop = torch.cat([torch.zeros(B, dtype=torch.bool), torch.ones(B, dtype=torch.bool)]).to(x.device)
    out_c, out_u = model(torch.cat([x, x]), torch.cat([t, t]), **both, drop=drop).float().chunk(2)
    return out_u + cfg_scale * (out_c - out_u)


@torch.no_grad()
def sample(
    objective: Objective,
    model: Callable[..., Any],
    shape: tuple[int, ...],
    cond: dict[str, Any],
    *,
    sampler: str = "auto",
    steps: int = 25,
    cfg_scale: float = 1.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
    given: torch.Tensor | None = None,
    x_given: torch.Tensor | None = None,
) -> torch.Tensor:
    """Noise → latents of `shape` (B, C, [T,] H, W); with `given` (B, gt, gh, gw) bool, the given
    tokens are x_given's (B, C, [T,] H, W) clean latents throughout, and in the result."""
    kinds = SAMPLERS[objective.kind]
    sampler = kinds[0] if sampler == "auto" else sampler
    if sampler not in kinds:
        raise ValueError(f"sample.sampler: {sampler!r} does not fit {objective.kind} (use {' or '.join(kinds)})")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(device)
    g = given_latents(given, x)
    if g is not None:
        assert given is not None and x_given is not None  # g comes from given; x_given comes with it
        given, x_given = given.to(device), x_given.to(device, x.dtype)
    # (x_given is None only when g is: asserted above; spelled out for the type checker)
    clamp = (lambda x: x) if g is None or x_given is None else (lambda x: torch.where(g, x_given, x))
    if objective.kind == "rectified_flow":
        return _flow(model, x, cond, steps, cfg_scale, heun=sampler == "heun", device=device, given=given, clamp=clamp)
    assert isinstance(objective, DDPM)  # SAMPLERS has two kinds: the other one is DDPM's
    return _diffusion(
        objective,
        model,
        x,
        cond,
        steps,
        cfg_scale,
        ancestral=sampler == "ddpm",
        gen=gen,
        device=device,
        given=given,
        clamp=clamp,
    )


def _flow(
    model: Callable[..., Any],
    x: torch.Tensor,
    cond: dict[str, Any],
    steps: int,
    cfg_scale: float,
    *,
    heun: bool,
    device: torch.device | str,
    given: torch.Tensor | None = None,
    clamp: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
) -> torch.Tensor:
    ts = torch.linspace(1.0, 0.0, steps + 1).tolist()
    B = x.shape[0]

    def v_at(x: torch.Tensor, t: float) -> torch.Tensor:
        return guided(
            model,
            clamp(x),
            torch.full((B,), t, device=device),
            cond,
            cfg_scale,
            given,
        ).float()

    for t, t_next in zip(ts[:-1], ts[1:]):
        d = v_at(x, t)
        x_euler = x + (t_next - t) * d
        if heun and t_next > 0:  # Heun's 2nd-order correction (EDM); the last step stays Euler
            x = x + (t_next - t) * 0.5 * (d + v_at(x_euler, t_next))
        else:
            x = x_euler
    return clamp(x)


def _diffusion(
    obj: DDPM,
    model: Callable[..., Any],
    x: torch.Tensor,
    cond: dict[str, Any],
    steps: int,
    cfg_scale: float,
    *,
    ancestral: bool,
    gen: torch.Generator,
    device: torch.device | str,
    given: torch.Tensor | None = None,
    clamp: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
) -> torch.Tensor:
    # An evenly spaced subsequence of the training steps, from the noisiest down to 0.
    idxs = torch.linspace(obj.steps - 1, 0, steps).round().long().unique_consecutive().tolist()
    B = x.shape[0]
    for i, idx in enumerate(idxs):
        x = clamp(x)  # given tokens are clean at every step, as in training
        out = guided(model, x, torch.full((B,), idx / obj.steps, device=device), cond, cfg_scale, given)
        x0, eps = obj.x0_eps(out, x, idx)
        ab = float(obj.ab[idx])
        ab_prev = float(obj.ab[idxs[i + 1]]) if i + 1 < len(idxs) else 1.0
        if not ancestral:  # DDIM, η = 0: deterministic
            x = ab_prev**0.5 * x0 + (1 - ab_prev) ** 0.5 * eps
            continue
        # DDPM posterior q(x_prev | x_t, x0) for the (possibly strided) step.
        beta = 1 - ab / ab_prev
        mean = (ab_prev**0.5 * beta / (1 - ab)) * x0 + ((1 - beta) ** 0.5 * (1 - ab_prev) / (1 - ab)) * x
        var = beta * (1 - ab_prev) / (1 - ab)
        x = mean if i + 1 == len(idxs) else mean + var**0.5 * torch.randn(x.shape, generator=gen).to(device)
    return clamp(x)
