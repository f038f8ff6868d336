"""Sample grids from a DiT: one row per class, fixed seed. Used by the worker and `ditforge sample`."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..models.vae import build_vae
from ..objectives.flow import RectifiedFlow
from ..objectives.samplers import sample


@torch.no_grad()
def generate(model, objective, latent_shape, y: torch.Tensor | None, sample_spec, device=torch.device("cpu"),
             bf16: bool = False) -> torch.Tensor:
    """Latents (N, *latent_shape) for classes `y` (None: `per_class` unconditional samples) with the
    spec's sampler, steps, CFG scale and seed; captions, if the model takes them, are the null one."""
    was_training = model.training
    model.eval()
    n = len(y) if y is not None else sample_spec.per_class
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        z = sample(objective or RectifiedFlow(), model, (n, *latent_shape), {"y": y}, sampler=sample_spec.sampler,
                   steps=sample_spec.steps, cfg_scale=sample_spec.cfg_scale, seed=sample_spec.seed, device=device)
    model.train(was_training)
    return z.float()


@torch.no_grad()
def sample_grid(model, latent_shape, sample_spec, vae_spec, out: str, device=torch.device("cpu"),
                bf16: bool = False, objective=None) -> list[str]:
    """Generate `per_class` samples for each class with CFG, decode, write one PNG to `out` (videos:
    every clip's frames side by side, plus an animated GIF beside it). Returns the files written."""
    n_cls = max(model.cfg.num_classes, 1)
    cols = sample_spec.per_class
    y = torch.arange(n_cls, device=device).repeat_interleave(cols) if model.cfg.num_classes else None
    z = generate(model, objective, latent_shape, y, sample_spec, device, bf16)
    pixels = build_vae(vae_spec).decode(z.cpu())  # (N, 3, [T,] H, W) in [-1, 1]
    if pixels.dim() == 4:
        return [save_grid(pixels, rows=n_cls, cols=cols, out=out)]
    gif = out.rsplit(".", 1)[0] + ".gif"
    frames = [Image.open(save_grid(pixels[:, :, t], n_cls, cols, f"{out}.{t}.png")) for t in range(pixels.shape[2])]
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=150, loop=0)
    return [save_grid(torch.cat(pixels.unbind(2), dim=3), rows=n_cls, cols=cols, out=out), gif]


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
