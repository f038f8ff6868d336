"""Rectified flow (Liu et al. 2022; SD3, Esser et al. 2024).

x_t = (1 - t)·x0 + t·ε  moves data (t=0) to noise (t=1) on a straight line; the model predicts
the velocity v = ε - x0 and sampling integrates dx/dt = v from t=1 back to t=0 (samplers.py).

t sampling (SD3 §3.1): `uniform`; `logit_normal` (t = sigmoid(m + s·n), more weight on the middle
of the path where the velocity is hardest); `mode` (SD3 eq. 20, heavy middle with fat tails).
Loss weighting: `none`, or `min_snr` (Hang et al. 2023) moved onto the velocity loss: the x0
error is t·(v error), so w = min(SNR, γ)·t² with SNR = ((1 - t)/t)².
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .common import call_model, cfg_drop, given_latents, keep_generated, weighted_mse


class RectifiedFlow:
    kind = "rectified_flow"

    def __init__(
        self,
        t_sampling: str = "logit_normal",
        cfg_dropout: float = 0.1,
        null_class: int | None = None,
        *,
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        weighting: str = "none",
        snr_gamma: float = 5.0,
    ) -> None:
        # null_class: unused (the model swaps in its own null class); kept for the skeleton's callers.
        self.t_sampling, self.cfg_dropout = t_sampling, cfg_dropout
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale
        self.weighting, self.snr_gamma = weighting, snr_gamma

    def sample_t(self, n: int, gen: torch.Generator, device: torch.device | str) -> torch.Tensor:
        if self.t_sampling == "logit_normal":
            t = torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(n, generator=gen, device=gen.device))
        elif self.t_sampling == "mode":
            u = torch.rand(n, generator=gen, device=gen.device)
            t = 1 - u - self.mode_scale * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)
        else:
            t = torch.rand(n, generator=gen, device=gen.device)
        return t.clamp(0, 1).to(device)

    def weight(self, t: torch.Tensor) -> torch.Tensor | None:
        if self.weighting == "none":
            return None
        t = t.clamp(1e-4, 1 - 1e-4)
        snr = ((1 - t) / t) ** 2
        return snr.clamp(max=self.snr_gamma) * t**2

    def loss(
        self,
        model: Callable[..., Any],
        x0: torch.Tensor,
        cond: dict[str, Any],
        gen: torch.Generator,
        mask_ratio: float = 0.0,
        given: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x0 (B, C, [T,] H, W) latents; cond {"y": (B,), "text": ...}. `gen` makes every draw reproducible."""
        B = x0.shape[0]
        t = self.sample_t(B, gen, x0.device)
        noise = torch.randn(x0.shape, generator=gen, device=gen.device).to(x0.device, x0.dtype)
        drop = cfg_drop(cond, self.cfg_dropout, B, gen, x0.device)
        tt = t.view(B, *[1] * (x0.dim() - 1)).to(x0.dtype)
        xt = (1 - tt) * x0 + tt * noise
        g = given_latents(given, x0)
        if g is not None:  # given tokens enter clean, at every t (VDT's mask modeling)
            xt = torch.where(g, x0, xt)
        v, keep = call_model(model, xt, t, cond, drop, mask_ratio, gen, given)
        return weighted_mse(v, noise - x0, self.weight(t), keep_generated(keep, g))

    def velocity(self, out: torch.Tensor, x: torch.Tensor, t: float) -> torch.Tensor:
        return out  # the network predicts the velocity directly
