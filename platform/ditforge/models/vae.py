"""Latent autoencoders. The encode/decode seam every latent source goes through.

`IdentityVAE` is pixel-unshuffle (space-to-depth): (B, 3, H, W) in [-1, 1] becomes
(B, 3·f², H/f, W/f). It has no weights, but it sits exactly where a trained autoencoder sits, so
the data, training and sampling paths already carry the VAE step, the scale and the shift.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class IdentityVAE:
    def __init__(self, downsample: int = 2, scale: float = 1.0, shift: float = 0.0):
        self.f, self.scale, self.shift = downsample, scale, shift

    @property
    def identity(self) -> str:
        return f"identity(downsample={self.f})"

    def latent_shape(self, channels: int, h: int, w: int) -> tuple[int, int, int]:
        return channels * self.f * self.f, h // self.f, w // self.f

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, H, W) in [-1, 1] → normalised latents (B, 3f², H/f, W/f)."""
        z = F.pixel_unshuffle(pixels, self.f)
        return (z - self.shift) * self.scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents / self.scale + self.shift
        return F.pixel_shuffle(z, self.f).clamp(-1, 1)


def build_vae(spec) -> IdentityVAE:
    """spec: `VAESpec`. Only the identity VAE exists so far; a trained one plugs in here."""
    return IdentityVAE(spec.downsample, spec.scale, spec.shift)
