"""DDPM (Ho et al. 2020) with ε- or v-prediction (Salimans & Ho 2022), linear (Ho) or cosine
(Nichol & Dhariwal 2021) noise schedules.

x_t = √ᾱ_t·x0 + √(1-ᾱ_t)·ε for a discrete step t ∈ [0, steps); the network sees t/steps in [0, 1),
the same time input rectified flow uses, so one DiT serves both. Loss weighting: `none`, or
`min_snr` (Hang et al. 2023): w = min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR + 1) for v.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .common import call_model, cfg_drop, given_latents, keep_generated, weighted_mse


def alphas_cumprod(schedule: str, steps: int) -> torch.Tensor:
    """ᾱ_t for t = 0..steps-1, float64."""
    if schedule == "linear":
        scale = 1000 / steps  # keeps the schedule's ends when steps != 1000 (improved DDPM)
        betas = torch.linspace(scale * 1e-4, scale * 0.02, steps, dtype=torch.float64)
    elif schedule == "cosine":
        s = 0.008
        f = lambda u: math.cos((u / steps + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
        betas = torch.tensor([min(1 - f(i + 1) / f(i), 0.999) for i in range(steps)], dtype=torch.float64)
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    return torch.cumprod(1 - betas, dim=0)


class DDPM:
    kind = "ddpm"

    def __init__(
        self,
        prediction: str = "eps",
        schedule: str = "linear",
        steps: int = 1000,
        cfg_dropout: float = 0.1,
        *,
        weighting: str = "none",
        snr_gamma: float = 5.0,
    ) -> None:
        self.prediction, self.schedule, self.steps, self.cfg_dropout = prediction, schedule, steps, cfg_dropout
        self.weighting, self.snr_gamma = weighting, snr_gamma
        self.ab = alphas_cumprod(schedule, steps)  # (steps,) float64

    def _coef(
        self, idx: torch.Tensor, ndim: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ab = self.ab.to(idx.device)[idx].to(device)  # index where idx lives: no device→host copy
        shape = (-1, *[1] * (ndim - 1))
        return ab.sqrt().view(shape).to(dtype), (1 - ab).sqrt().view(shape).to(dtype)

    def weight(self, idx: torch.Tensor) -> torch.Tensor | None:
        if self.weighting == "none":
            return None
        ab = self.ab.to(idx.device)[idx]
        snr = ab / (1 - ab)
        w = snr.clamp(max=self.snr_gamma) / (snr if self.prediction == "eps" else snr + 1)
        return w.float().to(idx.device)

    def loss(
        self,
        model: Callable[..., Any],
        x0: torch.Tensor,
        cond: dict[str, Any],
        gen: torch.Generator,
        mask_ratio: float = 0.0,
        given: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B = x0.shape[0]
        idx = torch.randint(0, self.steps, (B,), generator=gen, device=gen.device)
        noise = torch.randn(x0.shape, generator=gen, device=gen.device).to(x0.device, x0.dtype)
        drop = cfg_drop(cond, self.cfg_dropout, B, gen, x0.device)
        a, s = self._coef(idx, x0.dim(), x0.device, x0.dtype)
        xt = a * x0 + s * noise
        g = given_latents(given, x0)
        if g is not None:  # given tokens enter clean, at every t (VDT's mask modeling)
            xt = torch.where(g, x0, xt)
        out, keep = call_model(model, xt, (idx.float() / self.steps).to(x0.device), cond, drop, mask_ratio, gen, given)
        target = noise if self.prediction == "eps" else a * noise - s * x0
        w = self.weight(idx)  # None exactly when weighting is "none"
        return weighted_mse(out, target, w.to(x0.device) if w is not None else None, keep_generated(keep, g))

    def x0_eps(self, out: torch.Tensor, xt: torch.Tensor, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Network output at step idx → (x0, ε) estimates."""
        ab = float(self.ab[idx])
        a, s = ab**0.5, (1 - ab) ** 0.5
        if self.prediction == "eps":
            eps = out
            return (xt - s * eps) / a, eps
        x0 = a * xt - s * out  # v = a·ε - s·x0  ⇒  x0 = a·x_t - s·v, ε = s·x_t + a·v
        return x0, s * xt + a * out
