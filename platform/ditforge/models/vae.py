"""Latent autoencoders: the encode/decode seam every latent source goes through.

- `IdentityVAE`: pixel-unshuffle (space-to-depth), (B, 3, H, W) in [-1, 1] → (B, 3·f², H/f, W/f).
  No weights; the demo's latents.
- `KLAutoencoder`: the project's own small convolutional KL autoencoder (LDM, Rombach et al.
  2022, without the perceptual / GAN losses). `video=True` makes it a causal 3D autoencoder: every
  convolution pads time on the past side only, so latent frame i depends on pixel frames ≤ i's
  (as in MAGVIT-v2 / LTX-Video), and frames are downsampled by `temporal_downsample`. Trained by a
  `task: vae` job (train/vae_trainer.py), saved to `vae.path` with its measured scale and shift.
- `DiffusersVAE`: an `AutoencoderKL` saved with `save_pretrained` in a local folder (needs the
  `diffusers` extra); videos go through it frame by frame.

All wrappers take pixels (B, 3, H, W) or (B, 3, T, H, W) in [-1, 1] (`temporal = True`: give them
whole clips; image autoencoders run frame by frame inside) and return normalised latents
(z - shift) · scale, (B, C, h, w) or (B, C, t, h, w); `decode` inverts. `identity` names the
weights, so a latent set records which autoencoder made it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:
    from ..spec import VAESpec


class VAE(Protocol):
    """What every wrapper here offers (IdentityVAE, OwnVAE, DiffusersVAE): the encode/decode seam."""

    temporal: bool  # takes whole clips (True for all of ours)
    f: int  # spatial downsample
    temporal_downsample: int
    scale: float
    shift: float

    @property
    def identity(self) -> str: ...

    def latent_shape(self, channels: int, h: int, w: int, frames: int = 1) -> tuple[int, ...]: ...

    def encode(self, pixels: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


class IdentityVAE:
    temporal = True  # takes whole clips (data/encode.py asks)

    def __init__(self, downsample: int = 2, scale: float = 1.0, shift: float = 0.0):
        self.f, self.scale, self.shift = downsample, scale, shift
        self.temporal_downsample = 1

    @property
    def identity(self) -> str:
        return f"identity(downsample={self.f})"

    def latent_shape(self, channels: int, h: int, w: int, frames: int = 1) -> tuple[int, ...]:
        spatial = (channels * self.f * self.f, h // self.f, w // self.f)
        return spatial if frames == 1 else (spatial[0], frames, *spatial[1:])

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, [T,] H, W) in [-1, 1] → normalised latents (B, 3f², [T,] H/f, W/f)."""
        z = _per_frame(lambda p: F.pixel_unshuffle(p, self.f), pixels)
        return (z - self.shift) * self.scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents / self.scale + self.shift
        return _per_frame(lambda p: F.pixel_shuffle(p, self.f), z).clamp(-1, 1)


def _per_frame(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Apply an image function to (B, C, H, W), or to every frame of (B, C, T, H, W)."""
    if x.dim() == 4:
        return fn(x)
    B, C, T, H, W = x.shape
    y = fn(x.transpose(1, 2).reshape(B * T, C, H, W))
    return y.view(B, T, *y.shape[1:]).transpose(1, 2)


# ------------------------------------------------------------------------------ own autoencoder


class CausalConv3d(nn.Module):
    """Conv3d that pads time on the past side only (replicating the first frame): causal in time.
    With temporal stride s it pads k - s frames, so output i sees frames up to (i + 1)·s - 1."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: tuple[int, int, int] = (1, 1, 1)):
        super().__init__()
        self.pad_t = k - stride[0]
        self.conv = nn.Conv3d(cin, cout, k, stride=stride, padding=(0, k // 2, k // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x[:, :, :1].expand(-1, -1, self.pad_t, -1, -1), x], dim=2)  # (B, C, T+k-s, H, W)
        return self.conv(x)


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm over each frame on its own: statistics over T would leak the future into the past."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _per_frame(super().forward, x)


def _norm(video: bool, ch: int) -> nn.Module:
    return FrameGroupNorm(8, ch) if video else nn.GroupNorm(8, ch)


def _conv(video: bool, cin: int, cout: int, k: int = 3, stride: int | tuple[int, int, int] = 1) -> nn.Module:
    if video:
        st = stride if isinstance(stride, tuple) else (1, stride, stride)
        return CausalConv3d(cin, cout, k, st)
    assert isinstance(stride, int)  # 3D strides are for video convolutions only
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2)


class ResBlock(nn.Module):
    def __init__(self, video: bool, cin: int, cout: int):
        super().__init__()
        self.block = nn.Sequential(
            _norm(video, cin),
            nn.SiLU(),
            _conv(video, cin, cout),
            _norm(video, cout),
            nn.SiLU(),
            _conv(video, cout, cout),
        )
        self.skip = nn.Identity() if cin == cout else _conv(video, cin, cout, k=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.block(x)


class Upsample(nn.Module):
    def __init__(self, video: bool, ch: int, temporal: bool):
        super().__init__()
        self.video, self.temporal = video, temporal
        self.conv = _conv(video, ch, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = ((2 if self.temporal else 1), 2, 2) if self.video else 2
        return self.conv(F.interpolate(x, scale_factor=scale, mode="nearest"))


class KLAutoencoder(nn.Module):
    """Encoder: conv → [ResBlock, stride-2 conv] × log2(downsample) → ResBlock → (mean, logvar).
    Decoder mirrors it with nearest upsampling. Widths: base · (1, 2, 4, 4, ...)."""

    def __init__(
        self,
        latent_channels: int = 4,
        base: int = 32,
        downsample: int = 4,
        temporal_downsample: int = 1,
        video: bool = False,
        in_channels: int = 3,
    ):
        super().__init__()
        self.config = dict(
            latent_channels=latent_channels,
            base=base,
            downsample=downsample,
            temporal_downsample=temporal_downsample,
            video=video,
            in_channels=in_channels,
        )
        levels, t_levels = int(math.log2(downsample)), int(math.log2(temporal_downsample))
        assert 2**levels == downsample and 2**t_levels == temporal_downsample, "downsample factors must be powers of 2"
        widths = [base * min(2**i, 4) for i in range(levels + 1)]
        enc: list[nn.Module] = [_conv(video, in_channels, widths[0])]
        for i in range(levels):
            stride = (2 if i < t_levels else 1, 2, 2) if video else 2
            enc += [ResBlock(video, widths[i], widths[i]), _conv(video, widths[i], widths[i + 1], stride=stride)]
        enc += [
            ResBlock(video, widths[-1], widths[-1]),
            _norm(video, widths[-1]),
            nn.SiLU(),
            _conv(video, widths[-1], 2 * latent_channels),
        ]
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [_conv(video, latent_channels, widths[-1]), ResBlock(video, widths[-1], widths[-1])]
        for i in reversed(range(levels)):
            dec += [Upsample(video, widths[i + 1], temporal=i < t_levels), ResBlock(video, widths[i + 1], widths[i])]
        dec += [_norm(video, widths[0]), nn.SiLU(), _conv(video, widths[0], in_channels)]
        self.decoder = nn.Sequential(*dec)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, 3, [T,] H, W) → mean, logvar (B, C, [T/ft,] H/f, W/f)."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30, 20)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(
        self, x: torch.Tensor, gen: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean, logvar = self.encode(x)
        noise = torch.randn(mean.shape, generator=gen).to(mean) if gen is not None else torch.randn_like(mean)
        z = mean + (0.5 * logvar).exp() * noise
        return self.decode(z), mean, logvar


def vae_loss(
    model: Callable[..., Any], x: torch.Tensor, kl_weight: float, gen: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """→ (loss, reconstruction MSE). L1 + MSE reconstruction plus a small KL to N(0, I)."""
    recon, mean, logvar = model(x, gen)
    mse = F.mse_loss(recon, x)
    kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).flatten(1).sum(1).mean()
    return F.l1_loss(recon, x) + mse + kl_weight * kl, mse.detach()


class OwnVAE:
    """A trained `KLAutoencoder` with its measured latent scale and shift."""

    temporal = True

    def __init__(self, net: KLAutoencoder, scale: float = 1.0, shift: float = 0.0, name: str = "own"):
        self.net, self.scale, self.shift, self.name = net.eval(), scale, shift, name
        self.f, self.temporal_downsample = net.config["downsample"], net.config["temporal_downsample"]

    @property
    def identity(self) -> str:
        return self.name

    def latent_shape(self, channels: int, h: int, w: int, frames: int = 1) -> tuple[int, ...]:
        C = self.net.config["latent_channels"]
        if frames == 1:  # an image, also through a video autoencoder (one latent frame: see encode)
            return (C, h // self.f, w // self.f)
        if self.net.config["video"]:
            return (C, frames // self.temporal_downsample, h // self.f, w // self.f)
        return (C, frames, h // self.f, w // self.f)

    def _net_input(self, pixels: torch.Tensor) -> torch.Tensor | None:
        # An image autoencoder encodes videos frame by frame; a video one needs (B, 3, T, H, W).
        return pixels if self.net.config["video"] or pixels.dim() == 4 else None

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.net.config["video"] and pixels.dim() == 4:
            # An image through the causal video autoencoder (joint image-video training, data.mix):
            # a still clip of `temporal_downsample` frames, which is one latent frame → (B, C, h, w).
            still = pixels.unsqueeze(2).expand(-1, -1, self.temporal_downsample, -1, -1)
            return (self.net.encode(still)[0].squeeze(2) - self.shift) * self.scale
        x = self._net_input(pixels)
        z = self.net.encode(x)[0] if x is not None else _per_frame(lambda p: self.net.encode(p)[0], pixels)
        return (z - self.shift) * self.scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents / self.scale + self.shift
        if self.net.config["video"] and z.dim() == 4:  # one latent frame → its still clip's last frame
            return self.net.decode(z.unsqueeze(2))[:, :, -1].clamp(-1, 1)
        if self.net.config["video"] or z.dim() == 4:
            return self.net.decode(z).clamp(-1, 1)
        return _per_frame(self.net.decode, z).clamp(-1, 1)


def save_own_vae(net: KLAutoencoder, uri: str, scale: float, shift: float, extra: dict | None = None) -> str:
    """Write `config.json` (architecture, scale, shift) and `model.safetensors` under `uri`."""
    from safetensors.torch import save

    from .. import storage

    blob = save({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()})
    digest = hashlib.sha256(blob).hexdigest()[:12]
    storage.write_bytes(storage.join(uri, "model.safetensors"), blob)
    cfg = {"architecture": net.config, "scale": scale, "shift": shift, "sha256_12": digest, **(extra or {})}
    storage.write_bytes(storage.join(uri, "config.json"), json.dumps(cfg, indent=2).encode())
    return digest


def load_own_vae(uri: str) -> OwnVAE:
    from safetensors.torch import load

    from .. import storage

    cfg = json.loads(storage.read_bytes(storage.join(uri, "config.json")))
    net = KLAutoencoder(**cfg["architecture"])
    net.load_state_dict(load(storage.read_bytes(storage.join(uri, "model.safetensors"))))
    return OwnVAE(net, cfg["scale"], cfg["shift"], name=f"own({cfg['sha256_12']})")


# ------------------------------------------------------------------------------ diffusers


class DiffusersVAE:
    """A diffusers `AutoencoderKL` from a local folder (`save_pretrained` layout); no download."""

    temporal = True

    def __init__(self, path: str):
        try:
            from diffusers import AutoencoderKL
        except ImportError:
            raise ImportError(
                "vae.kind: diffusers needs the diffusers extra: pip install 'ditforge[diffusers]'"
            ) from None
        path = path.removeprefix("file://")
        # use_safetensors: a folder holding only pickled .bin weights is refused, never unpickled
        self.net = AutoencoderKL.from_pretrained(path, local_files_only=True, use_safetensors=True).eval()
        cfg = self.net.config
        self.scale = float(cfg.scaling_factor)
        self.shift = float(getattr(cfg, "shift_factor", None) or 0.0)
        self.f = 2 ** (len(cfg.block_out_channels) - 1)
        self.temporal_downsample = 1
        self.path = path

    @property
    def identity(self) -> str:
        return f"diffusers({self.path})"

    def latent_shape(self, channels: int, h: int, w: int, frames: int = 1) -> tuple[int, ...]:
        C = self.net.config.latent_channels
        return (C, h // self.f, w // self.f) if frames == 1 else (C, frames, h // self.f, w // self.f)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        # The posterior's mode (its mean): deterministic latents, so re-encoding is reproducible.
        z = _per_frame(lambda p: self.net.encode(p).latent_dist.mode(), pixels)
        return (z - self.shift) * self.scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents / self.scale + self.shift
        return _per_frame(lambda p: self.net.decode(p).sample, z).clamp(-1, 1)


def build_vae(spec: VAESpec) -> VAE:
    """spec: `VAESpec` → an autoencoder wrapper (own and diffusers weights are read from `path`)."""
    kind = getattr(spec, "kind", "identity")
    if kind == "own":
        assert spec.path is not None  # VAESpec requires a path for own and diffusers
        return load_own_vae(spec.path)
    if kind == "diffusers":
        assert spec.path is not None
        return DiffusersVAE(spec.path)
    return IdentityVAE(spec.downsample, spec.scale, spec.shift)
