"""Consolidated weights from a checkpoint (any ZeRO stage) as safetensors + the model config.

`export(src, out)` reads a complete step folder (or a run folder's newest), merges the DeepSpeed
shards into full fp32 weights with DeepSpeed's own `zero_to_fp32`, and writes:
  raw.safetensors   the trained weights       ema.safetensors   EMA weights (when the run kept them)
  model.json        what `load_model` needs to rebuild the DiT and decode its samples
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .. import storage
from ..models.dit import DiT, DiTConfig
from . import checkpoint
from .ema import SHARD_LAYOUT, consolidate_shards

FILES = ("model.json", "raw.safetensors", "ema.safetensors")


def consolidate(folder: Path, tag_root: Path, tag: str) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # `folder` came through checkpoint.download, which refused any unsafe pickle in it.
    if any(folder.glob("*optim_states.pt")):
        sd = get_fp32_state_dict_from_zero_checkpoint(str(tag_root), tag=tag)
    else:  # ZeRO-0: the full weights are in the model-states file
        sd = checkpoint.safe_torch_load(folder / "mp_rank_00_model_states.pt")["module"]
    return {k: v.detach().float().contiguous() for k, v in sd.items()}


def export(src: str, out: str) -> dict:
    step_uri = checkpoint.resolve(src)
    tmp = Path(tempfile.mkdtemp(prefix="ditforge-export-"))
    try:
        folder, manifest = checkpoint.download(step_uri, tmp)
        model_cfg = json.loads((folder / "model.json").read_text())
        model_cfg["checkpoint"] = step_uri
        model_cfg["step"] = manifest["step"]
        outdir = tmp / "out"
        outdir.mkdir()
        save_file(consolidate(folder, tmp, manifest["tag"]), str(outdir / "raw.safetensors"))
        if (folder / "ema.safetensors").exists():
            shutil.copy(folder / "ema.safetensors", outdir / "ema.safetensors")
        elif (folder / SHARD_LAYOUT).exists():  # ZeRO-3: each rank saved its own EMA slices
            save_file(consolidate_shards(folder), str(outdir / "ema.safetensors"))
        (outdir / "model.json").write_text(json.dumps(model_cfg, indent=2))
        for f in sorted(outdir.iterdir()):
            storage.put_file(f, storage.join(out, f.name))
        return model_cfg
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_model(folder: str | Path, weights: str = "ema") -> tuple[DiT, dict]:
    """Rebuild the DiT from an export folder (local). Prefers EMA weights when present."""
    folder = Path(folder)
    cfg = json.loads((folder / "model.json").read_text())
    model = DiT(DiTConfig(**cfg["dit"]))
    f = folder / f"{weights}.safetensors"
    if not f.exists():
        f = folder / "raw.safetensors"
    model.load_state_dict(load_file(str(f)))  # safetensors: loading weights can never run code
    model.eval()
    cfg["weights"] = f.stem
    return model, cfg
