"""`ditforge model-info`: what a job's model costs, before anything is submitted.

Parameters are counted on the meta device (no memory) and forward FLOPs by torch's
FlopCounterMode on a meta forward (2 FLOPs per multiply-add), so the figures are counted from
the real module, not estimated. The latent shape comes from the VAE settings (for `own` and
`diffusers` VAEs from their saved config when it can be read here, else from the spec).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .dit import DiT, dit_config, forward_flops, param_count

if TYPE_CHECKING:
    from ..spec import JobSpec


def latent_shape(spec: JobSpec, resolution: int | None = None, frames: int | None = None) -> tuple[int, ...]:
    """The latents of `data.train` (or of a set of `resolution` x `frames`, e.g. a data.mix entry):
    (C, h, w) for images, also through a temporal VAE (one latent frame), (C, t, h, w) for clips."""
    v, res, frames = spec.vae, resolution or spec.data.resolution, frames or spec.data.frames
    C, f, ft = v.latent_channels, v.downsample, v.temporal_downsample
    if v.kind == "identity":
        C, ft = 3 * f * f, 1
    elif v.kind == "own":
        try:
            from .. import storage

            assert v.path is not None  # VAESpec requires it for own
            # One attempt: a store that is down, or not started yet, is an answer here (the
            # spec's figures), not something to wait 15 s of retries for.
            config = storage.read_bytes(storage.join(v.path, "config.json"), attempts=1)
            arch = json.loads(config)["architecture"]
            C, f, ft = arch["latent_channels"], arch["downsample"], arch["temporal_downsample"]
        except Exception:  # not trained yet, or the store is not up: the spec says what it will be
            pass
    elif v.kind == "diffusers":
        assert v.path is not None  # VAESpec requires it for diffusers
        cfg_file = Path(v.path.removeprefix("file://")) / "config.json"
        if cfg_file.exists():
            cfg = json.loads(cfg_file.read_text())
            C, f, ft = cfg.get("latent_channels", C), 2 ** (len(cfg.get("block_out_channels", [0] * 4)) - 1), 1
    return (C, res // f, res // f) if frames == 1 else (C, frames // ft, res // f, res // f)


def _text_dim(spec: JobSpec) -> int:
    if spec.model.text != "transformers":
        return 0
    assert spec.model.text_encoder is not None  # ModelSpec requires it for transformers
    cfg_file = Path(spec.model.text_encoder.removeprefix("file://")) / "config.json"
    if cfg_file.exists():
        cfg = json.loads(cfg_file.read_text())
        return int(cfg.get("d_model") or cfg.get("hidden_size"))
    return 4096  # T5-XXL's width, the common choice, when the folder is not on this machine


def vae_info(spec: JobSpec) -> dict[str, Any]:
    """`task: vae` jobs: the autoencoder being trained."""
    from torch.utils.flop_counter import FlopCounterMode

    from .vae import KLAutoencoder

    v, video = spec.vae, spec.data.frames > 1
    with torch.device("meta"):
        net = KLAutoencoder(v.latent_channels, v.base_channels, v.downsample, v.temporal_downsample, video=video)
        x = torch.zeros(1, 3, *([spec.data.frames] if video else []), spec.data.resolution, spec.data.resolution)
        counter = FlopCounterMode(display=False)
        with counter:
            net(x)
    return {
        "model": f"KLAutoencoder{'3D (causal)' if video else ''}",
        "params": param_count(net),
        "params_m": round(param_count(net) / 1e6, 2),
        "gflops_per_sample": round(counter.get_total_flops() / 1e9, 3),
        "latent_shape": list(latent_shape(spec)),
    }


def model_info(spec: JobSpec) -> dict[str, Any]:
    if spec.task == "vae":
        return vae_info(spec)
    shape = latent_shape(spec)
    cfg = dit_config(spec.model, shape[0], text_dim=_text_dim(spec))
    with torch.device("meta"):
        params = param_count(DiT(cfg))
    video = len(shape) == 4
    tokens = (shape[1] // cfg.patch_t if video else 1) * (shape[-2] // cfg.patch) * (shape[-1] // cfg.patch)
    out = {
        "model": f"DiT-{cfg.size}/{cfg.patch}" + (f"x{cfg.patch_t}" if video and cfg.patch_t > 1 else ""),
        "params": params,
        "params_m": round(params / 1e6, 2),
        "gflops_per_sample": round(forward_flops(cfg, shape) / 1e9, 3),
        "latent_shape": list(shape),
        "tokens": tokens,
        "hidden": cfg.hidden,
        "depth": cfg.depth,
        "heads": cfg.heads,
        "video_attention": cfg.video_attention if video else None,
        "objective": spec.objective.kind,
    }
    if spec.train.mask_ratio > 0:
        out["gflops_per_sample_masked"] = round(forward_flops(cfg, shape, spec.train.mask_ratio) / 1e9, 3)
    return out
