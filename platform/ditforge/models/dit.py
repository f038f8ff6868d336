"""DiT (Peebles & Xie, 2023): a transformer over patchified latents with adaLN-Zero conditioning.

Shapes in comments: B batch, C latent channels, H/W latent height/width, p patch, N = H*W/p²
tokens, D hidden width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .attention import attention

# DiT paper Table 1 widths / depths / heads, plus T(iny) so the demo trains on a 2-core CPU.
SIZES = {
    "T": dict(hidden=128, depth=4, heads=4),
    "S": dict(hidden=384, depth=12, heads=6),
    "B": dict(hidden=768, depth=12, heads=12),
    "L": dict(hidden=1024, depth=24, heads=16),
    "XL": dict(hidden=1152, depth=28, heads=16),
}


@dataclass
class DiTConfig:
    in_channels: int
    size: str = "T"
    patch: int = 2
    num_classes: int = 10
    attention: str = "auto"
    grad_checkpointing: bool = False

    @property
    def hidden(self) -> int:
        return SIZES[self.size]["hidden"]

    @property
    def depth(self) -> int:
        return SIZES[self.size]["depth"]

    @property
    def heads(self) -> int:
        return SIZES[self.size]["heads"]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_2d(h: int, w: int, dim: int, device=None) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding, computed for any grid so resolutions can change. (N, D)"""
    assert dim % 4 == 0
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, device=device, dtype=torch.float32) / (dim // 4))
    ys, xs = torch.meshgrid(
        torch.arange(h, device=device, dtype=torch.float32),
        torch.arange(w, device=device, dtype=torch.float32),
        indexing="ij",
    )
    out = [torch.outer(g.flatten(), omega) for g in (ys, xs)]  # 2 x (N, D/4)
    return torch.cat([out[0].sin(), out[0].cos(), out[1].sin(), out[1].cos()], dim=1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # t in [0, 1] (flow time); scaled by 1000 so the frequencies match the DDPM-style embedding.
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = (t.float() * 1000)[:, None] * freqs[None]
        emb = torch.cat([args.cos(), args.sin()], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class Block(nn.Module):
    def __init__(self, hidden: int, heads: int, backend: str):
        super().__init__()
        self.heads, self.backend = heads, backend
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden, 3 * hidden)  # fused: one matmul for q, k and v
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(approximate="tanh"), nn.Linear(4 * hidden, hidden))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))  # fused adaLN modulation

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=-1)  # 6 x (B, D)
        h = modulate(self.norm1(x), shift1, scale1)
        q, k, v = self.qkv(h).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, Dh)
        h = attention(q, k, v, self.backend).transpose(1, 2).reshape(B, N, D)
        x = x + gate1.unsqueeze(1) * self.proj(h)
        x = x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, out: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.linear = nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        D, p, C = cfg.hidden, cfg.patch, cfg.in_channels
        self.patch_embed = nn.Conv2d(C, D, kernel_size=p, stride=p)
        self.t_embed = TimestepEmbedder(D)
        # One extra row is the "null" class used for classifier-free guidance.
        self.y_embed = nn.Embedding(cfg.num_classes + 1, D) if cfg.num_classes > 0 else None
        self.blocks = nn.ModuleList(Block(D, cfg.heads, cfg.attention) for _ in range(cfg.depth))
        self.final = FinalLayer(D, p * p * C)
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.t_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[2].weight, std=0.02)
        if self.y_embed is not None:
            nn.init.normal_(self.y_embed.weight, std=0.02)
        # adaLN-Zero: every block starts as the identity, the output as zero.
        for blk in self.blocks:
            nn.init.zeros_(blk.ada[-1].weight)
            nn.init.zeros_(blk.ada[-1].bias)
        for layer in (self.final.ada[-1], self.final.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def null_class(self) -> int:
        return self.cfg.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W) latents, t (B,) in [0, 1], y (B,) class ids (null_class = unconditional)."""
        B, C, H, W = x.shape
        p = self.cfg.patch
        h = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, D)
        h = h + sincos_2d(H // p, W // p, h.shape[-1], device=x.device).to(h.dtype)
        c = self.t_embed(t)  # (B, D)
        if self.y_embed is not None and y is not None:
            c = c + self.y_embed(y)
        for blk in self.blocks:
            if self.cfg.grad_checkpointing and self.training:
                h = checkpoint(blk, h, c, use_reentrant=False)
            else:
                h = blk(h, c)
        out = self.final(h, c)  # (B, N, p*p*C)
        out = out.view(B, H // p, W // p, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (B, C, H/p, p, W/p, p)
        return out.reshape(B, C, H, W)


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
