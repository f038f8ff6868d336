"""Sample grids from a DiT: one row per class, fixed seed. Used by the worker and `ditforge sample`."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..models.vae import build_vae
from ..objectives.flow import euler_sample


@torch.no_grad()
def sample_grid(model, latent_shape, sample_spec, vae_spec, out: str, device=torch.device("cpu"),
                bf16: bool = False) -> str:
    """Generate `per_class` samples for each class with CFG, decode, write one PNG to `out`."""
    was_training = model.training
    model.eval()
    n_cls = max(model.cfg.num_classes, 1)
    cols = sample_spec.per_class
    y = torch.arange(n_cls, device=device).repeat_interleave(cols) if model.cfg.num_classes else None
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        z = euler_sample(model, (n_cls * cols, *latent_shape), y, steps=sample_spec.steps,
                         cfg_scale=sample_spec.cfg_scale, null_class=model.null_class if y is not None else None,
                         seed=sample_spec.seed, device=device)
    pixels = build_vae(vae_spec).decode(z.float().cpu())  # (N, 3, H, W) in [-1, 1]
    model.train(was_training)
    return save_grid(pixels, rows=n_cls, cols=cols, out=out)


def save_grid(pixels: torch.Tensor, rows: int, cols: int, out: str, upscale: int = 2, pad: int = 2) -> str:
    """(N, 3, H, W) in [-1, 1] → one PNG, one row per class."""
    imgs = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    H, W = imgs.shape[1] * upscale, imgs.shape[2] * upscale
    grid = np.full((rows * (H + pad) + pad, cols * (W + pad) + pad, 3), 255, dtype=np.uint8)
    for i, img in enumerate(imgs[: rows * cols]):
        r, c = divmod(i, cols)
        big = img.repeat(upscale, 0).repeat(upscale, 1)
        grid[pad + r * (H + pad): pad + r * (H + pad) + H, pad + c * (W + pad): pad + c * (W + pad) + W] = big
    Image.fromarray(grid).save(out)
    return out
