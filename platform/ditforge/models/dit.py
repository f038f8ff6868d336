"""DiT (Peebles & Xie, 2023) for images and videos: a transformer over patchified latents with
adaLN-Zero conditioning.

One model for both: an image is a video of one frame. Latents (B, C, H, W) or (B, C, T, H, W) are
cut into (pt, p, p) patches (pt = 1 for images), so a video DiT is the image DiT with a 3D patch
embedding and, optionally, factorised spatial-then-temporal attention (Latte / Open-Sora STDiT)
instead of full 3D attention (VDT, LTX-Video). Conditioning: timestep and class through adaLN-Zero;
captions through cross-attention (PixArt-α) over a caption embedding.

Masked training (MicroDiT, Sehwag et al. 2024): a few unmasked "patch-mixer" blocks see every
token, then a random fraction of spatial positions is dropped (the same positions in every frame:
tube masking, so factorised attention keeps its (frames × positions) grid) and the backbone runs
on the rest. The caller computes the loss on the kept patches only.

Video tasks (VDT, models/tasks.py): a per-sample `given` mask over the token grid marks tokens
that carry the clean latent of a condition. They get a learned "given" embedding added, so the
network knows which tokens are fixed whatever the sample's timestep says (VDT tells it nothing).
The two masks compose: patch masking drops spatial positions whether given or not, and the loss
counts tokens that are kept *and* generated.

Shapes in comments: B batch, C latent channels, T/H/W latent frames/height/width, p patch,
pt temporal patch, gt/gh/gw token grid, S = gh·gw spatial tokens per frame, N = gt·S tokens,
D hidden width, L caption tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .attention import attention

if TYPE_CHECKING:
    from ..spec import ModelSpec

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
    patch_t: int = 1  # temporal patch for videos (images always use 1)
    num_classes: int = 10  # 0 = no class conditioning
    attention: str = "math"  # a resolved kernel name (attention.resolve); "auto" lets torch choose
    grad_checkpointing: bool = False
    video_attention: str = "full"  # full | factorised
    pos_embed: str = "sincos"  # sincos | rope
    text: str = "none"  # none | own (trainable byte-level caption encoder) | external (given embeddings)
    text_dim: int = 0  # width of external caption embeddings
    text_len: int = 64  # own encoder: captions are cut/padded to this many bytes
    mixer_depth: int = 0  # unmasked patch-mixer blocks in front of the backbone (MicroDiT)
    given_tokens: bool = False  # a learned "given" embedding marks clean condition tokens (video tasks)
    # Conventions that decide whether weights mean the same thing elsewhere (models/convert.py).
    # The defaults are the layout of exports written before these fields existed; `dit_config`
    # gives new models the facebookresearch/DiT position layout and diffusers' frequency shift,
    # so a trained model exports to diffusers exactly.
    t_freq_shift: int = 0  # timestep frequencies exp(-ln(1e4)·i/(half - shift)): DiT 0, diffusers 1
    pos_layout: str = (
        "ditforge"  # sincos channel order: ditforge (sin y, sin x, cos y, cos x) | dit (sin x, cos x, sin y, cos y)
    )

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


# ------------------------------------------------------------------------------ positions


def sincos_1d(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """pos (N,) → (N, dim) fixed sin-cos features; defined for any position, so grids can grow."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, device=pos.device, dtype=torch.float32) / (dim // 2))
    out = torch.outer(pos.float(), omega)
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(
    h: int, w: int, dim: int, device: torch.device | str | None = None, layout: str = "ditforge"
) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding for an h×w grid (DiT / MAE). (h·w, dim)
    layout `dit`: [sin x, cos x, sin y, cos y], exactly facebookresearch/DiT's (and diffusers')
    table, so imported weights see the positions they were trained with."""
    assert dim % 4 == 0
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    a, b = sincos_1d(ys.flatten(), dim // 2), sincos_1d(xs.flatten(), dim // 2)
    if layout == "dit":
        return torch.cat([b, a], dim=1)
    return torch.cat([a[:, : dim // 4], b[:, : dim // 4], a[:, dim // 4 :], b[:, dim // 4 :]], dim=1)


def rope_dims(head_dim: int) -> tuple[int, int, int]:
    """Split a head's width across (t, h, w) for axial 3D RoPE; each part even, h and w equal."""
    dt = (head_dim // 4) // 2 * 2
    dh = (head_dim - dt) // 2 // 2 * 2
    return head_dim - 2 * dh, dh, dh


def rope_angles(
    gt: int, gh: int, gw: int, head_dim: int, device: torch.device | str | None = None, theta: float = 10000.0
) -> torch.Tensor:
    """Axial 3D rotary angles (Su et al. 2021; Lumina/Open-Sora style) for a (gt, gh, gw) grid of
    integer positions, so larger grids and longer clips only add new positions. (gt, gh·gw, Dh/2)"""
    parts = []
    for n, d, stride in zip((gt, gh, gw), rope_dims(head_dim), (gh * gw, gw, 1)):
        freqs = 1.0 / theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d)  # (d/2,)
        pos = torch.arange(gt * gh * gw, device=device) // stride % n  # this axis' index of each token
        parts.append(torch.outer(pos.float(), freqs))
    return torch.cat(parts, dim=1).view(gt, gh * gw, head_dim // 2)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """x (B, H, N, Dh), angles broadcastable to (B, 1, N, Dh/2): rotate consecutive pairs."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = angles.cos(), angles.sin()
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).to(x.dtype)


# ------------------------------------------------------------------------------ embedders


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int = 256, freq_shift: int = 0):
        super().__init__()
        self.freq_dim, self.freq_shift = freq_dim, freq_shift
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # t in [0, 1] (flow time, or DDPM step / num_steps); ×1000 so frequencies match DiT's embedding.
        half = self.freq_dim // 2
        # freq_shift 1: diffusers' `Timesteps(downscale_freq_shift=1)`, which its DiT uses.
        freqs = torch.exp(
            -math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - self.freq_shift)
        )
        args = (t.float() * 1000)[:, None] * freqs[None]
        emb = torch.cat([args.cos(), args.sin()], dim=-1)
        return self.mlp(emb.to(cast(nn.Linear, self.mlp[0]).weight.dtype))


def tokenize_bytes(captions: list[str], length: int) -> torch.Tensor:
    """Captions → (B, length) UTF-8 byte ids + 1 (0 = padding). No vocabulary file to ship."""
    out = torch.zeros(len(captions), length, dtype=torch.long)
    for i, c in enumerate(captions):
        ids = list(c.encode("utf-8"))[:length]
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long) + 1
    return out


class CaptionEncoder(nn.Module):
    """A small trainable byte-level transformer for the generated sets' captions, trained with the
    DiT. Real captions use a pretrained encoder instead (models/text.py) and `text: external`."""

    def __init__(self, out_dim: int, length: int, width: int = 128, depth: int = 2, heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(257, width, padding_idx=0)
        self.pos = nn.Parameter(torch.zeros(1, length, width))
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.out = nn.Linear(width, out_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, L) → (B, L, out_dim)."""
        h = self.embed(tokens) + self.pos[:, : tokens.shape[1]]
        return self.out(self.encoder(h))


# ------------------------------------------------------------------------------ blocks


class SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, backend: str):
        super().__init__()
        self.heads, self.backend = heads, backend
        self.qkv = nn.Linear(hidden, 3 * hidden)  # fused: one matmul for q, k and v
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, angles: torch.Tensor | None = None) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, Dh)
        if angles is not None:
            q, k = apply_rope(q, angles), apply_rope(k, angles)
        return self.proj(attention(q, k, v, self.backend).transpose(1, 2).reshape(B, N, D))


class CrossAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, backend: str):
        super().__init__()
        self.heads, self.backend = heads, backend
        self.q = nn.Linear(hidden, hidden)
        self.kv = nn.Linear(hidden, 2 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """x (B, N, D) attends to ctx (B, L, D)."""
        B, N, D = x.shape
        L = ctx.shape[1]
        q = self.q(x).view(B, N, self.heads, D // self.heads).transpose(1, 2)  # (B, H, N, Dh)
        k, v = self.kv(ctx).view(B, L, 2, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 2 x (B, H, L, Dh)
        return self.proj(attention(q, k, v, self.backend).transpose(1, 2).reshape(B, N, D))


def _mlp(hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(approximate="tanh"), nn.Linear(4 * hidden, hidden))


class Block(nn.Module):
    """adaLN-Zero block. `factorised`: spatial attention within each frame, then temporal attention
    across frames at each position (skipped for single-frame inputs, so images pass through)."""

    def __init__(self, hidden: int, heads: int, backend: str, factorised: bool = False, cross: bool = False):
        super().__init__()
        self.factorised, self.cross = factorised, cross
        ln = lambda: nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)  # noqa: E731
        self.norm1, self.attn = ln(), SelfAttention(hidden, heads, backend)
        if factorised:
            self.norm_t, self.attn_t = ln(), SelfAttention(hidden, heads, backend)
        if cross:  # PixArt-α: cross-attention without modulation, between self-attention and MLP
            self.norm_x, self.xattn = nn.LayerNorm(hidden, eps=1e-6), CrossAttention(hidden, heads, backend)
        self.norm2, self.mlp = ln(), _mlp(hidden)
        self.n_mod = 9 if factorised else 6
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, self.n_mod * hidden))  # fused adaLN modulation

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        grid: tuple[int, int],
        angles: torch.Tensor | None,
        ctx: torch.Tensor | None,
    ) -> torch.Tensor:
        """x (B, N, D), c (B, D), grid (gt, S) with N = gt·S, angles (B|1, gt, S, Dh/2), ctx (B, L, D)."""
        B, N, D = x.shape
        gt, S = grid
        mods = self.ada(c).chunk(self.n_mod, dim=-1)  # n_mod x (B, D)
        shift1, scale1, gate1, shift2, scale2, gate2 = mods[:6]
        h = modulate(self.norm1(x), shift1, scale1)
        if self.factorised and gt > 1:
            a = None if angles is None else angles.expand(B, -1, -1, -1).reshape(B * gt, 1, S, -1)
            h = self.attn(h.reshape(B * gt, S, D), a).reshape(B, N, D)  # within each frame
        else:
            h = self.attn(h, None if angles is None else angles.reshape(angles.shape[0], 1, N, -1))
        x = x + gate1.unsqueeze(1) * h
        if self.factorised and gt > 1:
            shift_t, scale_t, gate_t = mods[6:]
            h = modulate(self.norm_t(x), shift_t, scale_t).view(B, gt, S, D).transpose(1, 2).reshape(B * S, gt, D)
            a = None if angles is None else angles.expand(B, -1, -1, -1).transpose(1, 2).reshape(B * S, 1, gt, -1)
            h = self.attn_t(h, a).view(B, S, gt, D).transpose(1, 2).reshape(B, N, D)  # across frames
            x = x + gate_t.unsqueeze(1) * h
        if self.cross and ctx is not None:
            x = x + self.xattn(self.norm_x(x), ctx)
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


# ------------------------------------------------------------------------------ the model


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        D, p, pt, C = cfg.hidden, cfg.patch, cfg.patch_t, cfg.in_channels
        # A linear map of flattened (C, pt, p, p) patches: the same as a strided Conv2d/Conv3d, and
        # an image uses the temporal kernel summed (an "inflated" 2D patch embedding).
        self.patch_embed = nn.Linear(C * pt * p * p, D)
        self.t_embed = TimestepEmbedder(D, freq_shift=cfg.t_freq_shift)
        # One extra row is the "null" class used for classifier-free guidance.
        self.y_embed = nn.Embedding(cfg.num_classes + 1, D) if cfg.num_classes > 0 else None
        if cfg.text == "own":
            self.caption_encoder = CaptionEncoder(D, cfg.text_len)
        elif cfg.text == "external":
            self.caption_proj = nn.Sequential(nn.Linear(cfg.text_dim, D), nn.GELU(approximate="tanh"), nn.Linear(D, D))
        if cfg.text != "none":
            self.null_text = nn.Parameter(torch.zeros(1, 1, D))  # the "no caption" context for CFG
        if cfg.given_tokens:  # added to condition tokens (video tasks); initialised in _init_weights
            self.given_embed = nn.Parameter(torch.zeros(1, 1, D))
        factorised = cfg.video_attention == "factorised"
        cross = cfg.text != "none"
        self.mixer = nn.ModuleList(
            Block(D, cfg.heads, cfg.attention, factorised, cross) for _ in range(cfg.mixer_depth)
        )
        self.blocks = nn.ModuleList(Block(D, cfg.heads, cfg.attention, factorised, cross) for _ in range(cfg.depth))
        self.final = FinalLayer(D, pt * p * p * C)
        self._init_weights()
        self._register_load_state_dict_pre_hook(self._upgrade_state_dict)

    def _upgrade_state_dict(self, state_dict: dict[str, torch.Tensor], prefix: str, *args: Any, **kwargs: Any) -> None:
        """Checkpoints of the walking-skeleton DiT load too: its Conv2d patch embedding becomes the
        equivalent linear map, and its blocks' `qkv` / `proj` moved into `attn`."""
        w = state_dict.get(prefix + "patch_embed.weight")
        if w is not None and w.dim() == 4:  # (D, C, p, p) → (D, C·p·p), the same feature order
            state_dict[prefix + "patch_embed.weight"] = w.reshape(w.shape[0], -1)
        for key in [k for k in state_dict if k.startswith(prefix + "blocks.")]:
            parts = key[len(prefix) :].split(".")  # blocks, i, qkv|proj, weight|bias
            if len(parts) == 4 and parts[2] in ("qkv", "proj"):
                state_dict[prefix + ".".join([parts[0], parts[1], "attn", parts[2], parts[3]])] = state_dict.pop(key)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(cast(nn.Linear, self.t_embed.mlp[0]).weight, std=0.02)
        nn.init.normal_(cast(nn.Linear, self.t_embed.mlp[2]).weight, std=0.02)
        if self.y_embed is not None:
            nn.init.normal_(self.y_embed.weight, std=0.02)
        if self.cfg.given_tokens:  # not zero: under adaLN-Zero a zero input offset gets no gradient for steps
            nn.init.normal_(self.given_embed, std=0.02)
        # adaLN-Zero: every block starts as the identity, the output as zero.
        for blk in [*self.mixer, *self.blocks]:
            nn.init.zeros_(blk.ada[-1].weight)
            nn.init.zeros_(blk.ada[-1].bias)
            if blk.cross:  # cross-attention has no gate: zero its output projection instead
                nn.init.zeros_(blk.xattn.proj.weight)
        for layer in (cast(nn.Linear, self.final.ada[-1]), self.final.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def null_class(self) -> int:
        return self.cfg.num_classes

    # -- patches ------------------------------------------------------------------------------

    def _embed_patches(self, x: torch.Tensor, pt: int) -> torch.Tensor:
        """x (B, C, T, H, W) → (B, N, D)."""
        B, C, T, H, W = x.shape
        p = self.cfg.patch
        x = x.view(B, C, T // pt, pt, H // p, p, W // p, p).permute(0, 2, 4, 6, 1, 3, 5, 7)
        x = x.reshape(B, -1, C * pt * p * p)  # (B, N, C·pt·p·p), features in Conv3d weight order
        w, b = self.patch_embed.weight, self.patch_embed.bias
        if pt != self.cfg.patch_t:  # an image through a video model: inflate the 3D kernel to 2D
            w = w.view(w.shape[0], C, self.cfg.patch_t, p * p).sum(2).view(w.shape[0], -1)
        return nn.functional.linear(x, w, b)

    def _unpatchify(self, out: torch.Tensor, shape: tuple, pt: int) -> torch.Tensor:
        """(B, N, pt_model·p·p·C) → (B, C, T, H, W)."""
        B, C, T, H, W = shape
        p, ptm = self.cfg.patch, self.cfg.patch_t
        out = out.view(B, T // pt, H // p, W // p, ptm, p, p, C)[:, :, :, :, :pt]  # images keep one frame
        return out.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(B, C, T, H, W)

    # -- forward ------------------------------------------------------------------------------

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        text: torch.Tensor | None = None,
        drop: torch.Tensor | None = None,
        mask_ratio: float = 0.0,
        gen: torch.Generator | None = None,
        given: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W) image or (B, C, T, H, W) video latents; t (B,) in [0, 1]; y (B,) class ids
        (null_class = unconditional); text: (B, L) byte tokens (`text: own`) or (B, L, text_dim)
        embeddings (`text: external`); drop (B,) bool: replace this sample's class and caption by
        the null ones (CFG dropout / the unconditional branch); given (B, gt, gh, gw) bool: tokens
        that hold clean condition latents (video tasks; needs `given_tokens`).

        Returns the prediction shaped like x; with mask_ratio > 0, (prediction, keep) where keep
        is 1 on latent positions whose patch the backbone saw (the loss goes there only).
        """
        video = x.dim() == 5
        x5 = x if video else x.unsqueeze(2)  # (B, C, T, H, W), T = 1 for images
        B, C, T, H, W = x5.shape
        p, pt = self.cfg.patch, (self.cfg.patch_t if video else 1)
        gt, gh, gw = T // pt, H // p, W // p
        S = gh * gw
        h = self._embed_patches(x5, pt)  # (B, N, D)
        D = h.shape[-1]
        angles = None
        if self.cfg.pos_embed == "rope":
            angles = rope_angles(gt, gh, gw, D // self.cfg.heads, device=x.device)[None]  # (1, gt, S, Dh/2)
        else:
            pos = sincos_2d(gh, gw, D, device=x.device, layout=self.cfg.pos_layout).repeat(gt, 1)  # (N, D)
            if gt > 1:  # Latte: a temporal sin-cos embedding on top of the spatial one
                pos = pos + sincos_1d(torch.arange(gt, device=x.device), D).repeat_interleave(S, 0)
            h = h + pos.to(h.dtype)
        if given is not None:
            if not self.cfg.given_tokens:
                raise ValueError("given tokens need a model built with given_tokens=True (train.video_tasks)")
            h = h + given.reshape(B, -1, 1).to(h.dtype) * self.given_embed.to(h.dtype)  # (B, N, D)

        c = self.t_embed(t)  # (B, D)
        if self.y_embed is not None and y is not None:
            if drop is not None:
                y = torch.where(drop, torch.full_like(y, self.null_class), y)
            c = c + self.y_embed(y)
        ctx = self._context(text, drop, B, h.dtype) if self.cfg.text != "none" else None

        grid = (gt, S)
        for blk in self.mixer:  # the patch-mixer always sees every token
            h = self._run(blk, h, c, grid, angles, ctx)
        keep = None
        if mask_ratio > 0:
            # Tube masking: the same spatial positions are dropped in every frame. (B, S_keep)
            n_keep = max(1, int(round(S * (1 - mask_ratio))))
            noise = (
                torch.rand(B, S, generator=gen, device=gen.device).to(x.device)
                if gen is not None
                else torch.rand(B, S, device=x.device)
            )
            keep = noise.argsort(dim=1)[:, :n_keep].sort(dim=1).values
            idx = keep[:, None, :, None].expand(B, gt, n_keep, D)
            h = h.view(B, gt, S, D).gather(2, idx).reshape(B, gt * n_keep, D)
            if angles is not None:
                angles = angles.expand(B, -1, -1, -1).gather(
                    2, keep[:, None, :, None].expand(B, gt, n_keep, angles.shape[-1])
                )
            grid = (gt, n_keep)
        for blk in self.blocks:
            h = self._run(blk, h, c, grid, angles, ctx)
        out = self.final(h, c)  # (B, N_kept, pt·p·p·C)
        if keep is not None:
            full = out.new_zeros(B, gt, S, out.shape[-1])
            full.scatter_(
                2,
                keep[:, None, :, None].expand(B, gt, keep.shape[1], out.shape[-1]),
                out.view(B, gt, -1, out.shape[-1]),
            )
            out = full.view(B, gt * S, -1)
        out = self._unpatchify(out, (B, C, T, H, W), pt)
        out = out if video else out.squeeze(2)
        if keep is None:
            return out
        m = torch.zeros(B, S, device=x.device, dtype=x.dtype).scatter_(1, keep, 1.0).view(B, 1, 1, gh, 1, gw, 1)
        m = m.expand(B, 1, T, gh, p, gw, p).reshape(B, 1, T, H, W)
        return out, (m if video else m.squeeze(2))

    def _context(
        self, text: torch.Tensor | None, drop: torch.Tensor | None, B: int, dtype: torch.dtype
    ) -> torch.Tensor:
        """Caption tokens/embeddings → (B, L, D); the null context where `drop` (or no caption)."""
        if text is None:
            return self.null_text.expand(B, 1, -1).to(dtype)
        ctx = self.caption_encoder(text) if self.cfg.text == "own" else self.caption_proj(text.to(dtype))
        if drop is not None:
            ctx = torch.where(drop[:, None, None], self.null_text.to(ctx.dtype).expand_as(ctx), ctx)
        return ctx

    def _run(
        self,
        blk: nn.Module,
        h: torch.Tensor,
        c: torch.Tensor,
        grid: tuple[int, int],
        angles: torch.Tensor | None,
        ctx: torch.Tensor | None,
    ) -> torch.Tensor:
        if self.cfg.grad_checkpointing and self.training:
            return checkpoint(blk, h, c, grid, angles, ctx, use_reentrant=False)
        return blk(h, c, grid, angles, ctx)


def dit_config(mspec: ModelSpec, in_channels: int, text_dim: int = 0, given_tokens: bool = False) -> DiTConfig:
    """`ModelSpec` → DiTConfig (`attention` still unresolved: see attention.resolve); given_tokens
    when the job trains video tasks (train.video_tasks).

    New models use DiT's position layout and diffusers' timestep frequency shift (so they export
    to diffusers exactly); a model initialised from a facebookresearch/DiT `.pt` keeps that
    checkpoint's shift 0, so it computes what the original computes."""
    init_from = getattr(mspec, "init_from", None) or ""
    return DiTConfig(
        t_freq_shift=0 if init_from.endswith(".pt") else 1,
        pos_layout="dit",
        in_channels=in_channels,
        size=mspec.size,
        patch=mspec.patch,
        patch_t=mspec.patch_t,
        num_classes=mspec.num_classes,
        attention=mspec.attention,
        grad_checkpointing=mspec.grad_checkpointing,
        video_attention=mspec.video_attention,
        pos_embed=mspec.pos_embed,
        text={"none": "none", "own": "own", "transformers": "external"}[mspec.text],
        text_dim=text_dim,
        text_len=mspec.text_len,
        mixer_depth=mspec.mixer_depth,
        given_tokens=given_tokens,
    )


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops(cfg: DiTConfig, latent_shape: tuple[int, ...], mask_ratio: float = 0.0, text_len: int = 0) -> int:
    """FLOPs of one sample's forward pass, counted by torch's FlopCounterMode on the meta device
    (no memory, no compute): matmuls, convolutions and attention, 2 FLOPs per multiply-add."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = DiT(DiTConfig(**{**cfg.__dict__, "attention": "math", "grad_checkpointing": False}))
        x = torch.zeros(1, *latent_shape)
        t = torch.zeros(1)
        y = torch.zeros(1, dtype=torch.long) if cfg.num_classes else None
        text = None
        if cfg.text == "own":
            text = torch.zeros(1, text_len or cfg.text_len, dtype=torch.long)
        elif cfg.text == "external":
            text = torch.zeros(1, text_len or 77, cfg.text_dim)
        counter = FlopCounterMode(display=False)
        with counter:
            model(x, t, y, text=text, mask_ratio=mask_ratio)
    return counter.get_total_flops()
