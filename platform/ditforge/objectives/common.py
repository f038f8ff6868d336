"""What every objective shares: CFG dropout, masked and weighted mean-squared error."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def cfg_drop(
    cond: dict[str, Any], cfg_dropout: float, B: int, gen: torch.Generator, device: torch.device | str
) -> torch.Tensor | None:
    """(B,) bool: which samples train the unconditional branch (Ho & Salimans 2022). The model swaps
    in its null class / null caption where True. None when there is nothing to drop."""
    if not any(v is not None for v in cond.values()) or cfg_dropout <= 0:
        return None
    return (torch.rand(B, generator=gen, device=gen.device) < cfg_dropout).to(device)


def call_model(
    model: Callable[..., Any],
    xt: torch.Tensor,
    t: torch.Tensor,
    cond: dict[str, Any],
    drop: torch.Tensor | None,
    mask_ratio: float,
    gen: torch.Generator | None,
    given: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """→ (prediction, keep mask or None). Masking is the model's business; the loss only needs to
    know which latent positions were seen."""
    extra = {"given": given} if given is not None else {}
    out = model(
        xt, t, **{k: v for k, v in cond.items() if v is not None}, drop=drop, mask_ratio=mask_ratio, gen=gen, **extra
    )
    return out if mask_ratio > 0 else (out, None)


def given_latents(given: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """Token mask (B, gt, gh, gw) (models/tasks.py) → (B, 1, T, H, W) bool over the latents
    x (B, C, T, H, W) it describes (each token's pt × p × p block; the patch sizes follow from the
    shapes); (B, 1, H, W) for image latents. None stays None."""
    if given is None:
        return None
    T, H, W = x.shape[2:] if x.dim() == 5 else (1, *x.shape[2:])
    gt, gh, gw = given.shape[1:]
    m = given.to(x.device).repeat_interleave(T // gt, 1).repeat_interleave(H // gh, 2).repeat_interleave(W // gw, 3)
    return m[:, None] if x.dim() == 5 else m[:, None, 0]


def keep_generated(keep: torch.Tensor | None, g: torch.Tensor | None) -> torch.Tensor | None:
    """The loss counts latent positions the backbone kept (MicroDiT) *and* that were generated
    (not given): given tokens are conditions, there is nothing to learn on them."""
    if g is None:
        return keep
    gen = (~g).to(torch.float32)
    return gen if keep is None else keep.float() * gen


def weighted_mse(
    pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, keep: torch.Tensor | None
) -> torch.Tensor:
    """Per-sample mean squared error over the kept positions, times a per-sample weight, averaged."""
    err = (pred.float() - target.float()) ** 2
    if keep is None:
        per = err.flatten(1).mean(1)
    else:
        k = keep.float().expand_as(err)
        per = (err * k).flatten(1).sum(1) / k.flatten(1).sum(1).clamp_min(1)
    if weight is not None:
        per = per * weight.float()
    return per.mean()
