"""Rectified flow (Liu et al. 2022; SD3, Esser et al. 2024).

x_t = (1 - t)·x0 + t·ε  moves data (t=0) to noise (t=1) on a straight line; the model predicts
the velocity v = ε - x0 and sampling integrates dx/dt = v from t=1 back to t=0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class RectifiedFlow:
    def __init__(self, t_sampling: str = "logit_normal", cfg_dropout: float = 0.1, null_class: int | None = None):
        self.t_sampling, self.cfg_dropout, self.null_class = t_sampling, cfg_dropout, null_class

    def sample_t(self, n: int, gen: torch.Generator, device) -> torch.Tensor:
        if self.t_sampling == "logit_normal":
            # SD3 §3.1: more weight on the middle of the path, where the velocity is hardest.
            return torch.sigmoid(torch.randn(n, generator=gen)).to(device)
        return torch.rand(n, generator=gen).to(device)

    def loss(self, model, x0: torch.Tensor, y: torch.Tensor | None, gen: torch.Generator) -> torch.Tensor:
        """x0 (B, C, H, W) latents, y (B,) classes. `gen` makes every random draw reproducible."""
        B = x0.shape[0]
        t = self.sample_t(B, gen, x0.device)
        noise = torch.randn(x0.shape, generator=gen).to(x0.device, x0.dtype)
        if y is not None and self.null_class is not None and self.cfg_dropout > 0:
            # Classifier-free guidance needs the model to also learn p(x) with the null class.
            drop = torch.rand(B, generator=gen).to(x0.device) < self.cfg_dropout
            y = torch.where(drop, torch.full_like(y, self.null_class), y)
        tt = t.view(B, 1, 1, 1).to(x0.dtype)
        xt = (1 - tt) * x0 + tt * noise
        v = model(xt, t, y)
        return F.mse_loss(v.float(), (noise - x0).float())


@torch.no_grad()
def euler_sample(model, shape, y: torch.Tensor | None, *, steps: int, cfg_scale: float, null_class: int | None,
                 seed: int, device) -> torch.Tensor:
    """Integrate from pure noise (t=1) to data (t=0) with `steps` Euler steps and CFG."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(device)
    ts = torch.linspace(1.0, 0.0, steps + 1)
    guided = y is not None and null_class is not None and cfg_scale != 1.0
    for i in range(steps):
        t, t_next = ts[i].item(), ts[i + 1].item()
        tb = torch.full((shape[0],), t, device=device)
        if guided:
            v_c, v_u = model(torch.cat([x, x]), torch.cat([tb, tb]), torch.cat([y, torch.full_like(y, null_class)])).chunk(2)
            v = v_u + cfg_scale * (v_c - v_u)
        else:
            v = model(x, tb, y)
        x = x + (t_next - t) * v.float()
    return x
