"""What every objective shares: CFG dropout, masked and weighted mean-squared error."""

from __future__ import annotations

import torch


def as_cond(cond) -> dict:
    """The skeleton passed the class tensor (or None) where `cond` now goes: accept both."""
    return cond if isinstance(cond, dict) else {"y": cond}


def cfg_drop(cond: dict, cfg_dropout: float, B: int, gen: torch.Generator, device) -> torch.Tensor | None:
    """(B,) bool: which samples train the unconditional branch (Ho & Salimans 2022). The model swaps
    in its null class / null caption where True. None when there is nothing to drop."""
    if not any(v is not None for v in cond.values()) or cfg_dropout <= 0:
        return None
    return (torch.rand(B, generator=gen, device=gen.device) < cfg_dropout).to(device)


def call_model(model, xt: torch.Tensor, t: torch.Tensor, cond: dict, drop, mask_ratio: float, gen):
    """→ (prediction, keep mask or None). Masking is the model's business; the loss only needs to
    know which latent positions were seen."""
    out = model(xt, t, **{k: v for k, v in cond.items() if v is not None}, drop=drop, mask_ratio=mask_ratio, gen=gen)
    return out if mask_ratio > 0 else (out, None)


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
                 keep: torch.Tensor | None) -> torch.Tensor:
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
