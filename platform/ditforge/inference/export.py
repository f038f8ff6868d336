"""Consolidated weights from a checkpoint (any ZeRO stage) as safetensors + the model config.

`export(src, out)` reads a complete step folder (or a run folder's newest), merges the DeepSpeed
shards into full fp32 weights with DeepSpeed's own `zero_to_fp32`, and writes:
  raw.safetensors   the trained weights       ema.safetensors   EMA weights (when the run kept them)
  model.json        what `load_model` needs to rebuild the DiT and decode its samples
A LoRA run's checkpoint holds only its adapters (models/lora.py): the base weights are read again
from the run's `model.init_from`, raw / EMA are the merged weights W + s·B A, and
  adapter/           the adapter alone (peft's layout: adapter_model.safetensors + adapter_config.json)
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .. import storage
from ..models import lora
from ..models.dit import DiT, DiTConfig
from ..runs.folder import resolve
from ..train import checkpoint
from ..train.ema import SHARD_LAYOUT, consolidate_shards

FILES = ("model.json", "raw.safetensors", "ema.safetensors")  # what a model needs (a LoRA's adapter/ is extra)


def consolidate(folder: Path, tag_root: Path, tag: str) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # `folder` came through checkpoint.download, which refused any unsafe pickle in it.
    if any(folder.glob("*optim_states.pt")):
        sd = get_fp32_state_dict_from_zero_checkpoint(str(tag_root), tag=tag)
    else:  # ZeRO-0: the full weights are in the model-states file
        sd = checkpoint.safe_torch_load(folder / "mp_rank_00_model_states.pt")["module"]
    return {k: v.detach().float().contiguous() for k, v in sd.items()}


def export(src: str, out: str) -> dict:
    step_uri = resolve(src)
    tmp = Path(tempfile.mkdtemp(prefix="ditforge-export-"))
    try:
        folder, manifest = checkpoint.download(step_uri, tmp)
        model_cfg = json.loads((folder / "model.json").read_text())
        model_cfg["checkpoint"] = step_uri
        model_cfg["step"] = manifest["step"]
        outdir = tmp / "out"
        outdir.mkdir()
        raw = consolidate(folder, tmp, manifest["tag"])
        ema: dict[str, torch.Tensor] | None = None
        if (folder / "ema.safetensors").exists():
            ema = load_file(str(folder / "ema.safetensors"))
        elif (folder / SHARD_LAYOUT).exists():  # ZeRO-3: each rank saved its own EMA slices
            ema = consolidate_shards(folder)
        if model_cfg.get("lora"):
            raw, ema = _merge_lora(model_cfg, raw, ema, outdir / lora.ADAPTER_DIR)
        save_file(raw, str(outdir / "raw.safetensors"))
        if ema is not None:
            save_file(ema, str(outdir / "ema.safetensors"))
        (outdir / "model.json").write_text(json.dumps(model_cfg, indent=2))
        for f in sorted(p for p in outdir.rglob("*") if p.is_file()):
            storage.put_file(f, storage.join(out, f.relative_to(outdir).as_posix()))
        return model_cfg
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _merge_lora(
    model_cfg: dict, raw: dict[str, torch.Tensor], ema: dict[str, torch.Tensor] | None, adapter_dir: Path
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """A LoRA checkpoint's adapters (raw and EMA) merged into the base they were trained on, which
    is read again from the run's model.init_from; the adapter that the default weights hold (EMA
    when kept) goes to `adapter_dir` in peft's layout. Records which in model_cfg['lora']."""
    from ..models.convert import read_pretrained

    cfg = model_cfg["lora"]
    try:
        base = read_pretrained(cfg["base"], model_cfg["dit"]["num_classes"])
    except Exception as e:  # PretrainedError's line names the path; say why it is needed
        raise lora.LoraError(f"{model_cfg.get('checkpoint')}: a LoRA run exports onto its base weights: {e}") from None
    adapters = lora.adapter_tensors(raw)
    ema_adapters = lora.adapter_tensors(ema) if ema is not None else None
    lora.write_peft(adapter_dir, ema_adapters if ema_adapters is not None else adapters, cfg)
    cfg["adapter_weights"] = "raw" if ema_adapters is None else "ema"
    merged_ema = lora.merge(base, ema_adapters, cfg["scale"]) if ema_adapters is not None else None
    return lora.merge(base, adapters, cfg["scale"]), merged_ema


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


def export_diffusers(src: str, out: str, weights: str = "ema") -> dict:
    """A folder `diffusers.DiTPipeline.from_pretrained` loads offline: model_index.json,
    transformer/ (DiTTransformer2DModel), scheduler/ and, for a `diffusers` VAE job, vae/.

    DDPM models get the DDIMScheduler of their schedule; rectified-flow models a
    FlowMatchEulerDiscreteScheduler (same convention: x_t = (1-σ)·x0 + σ·ε, v = ε - x0, timestep σ·1000).
    The identity and own VAEs have no AutoencoderKL counterpart: vae/ is left out (model_index
    names none) and the user passes `vae=` (see README)."""
    tmp = Path(tempfile.mkdtemp(prefix="ditforge-export-diffusers-"))
    try:
        cfg = export(src, f"file://{tmp / 'ditforge'}")
        return {**cfg, **write_diffusers(tmp / "ditforge", out, weights)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_diffusers(folder: Path, out: str, weights: str = "ema") -> dict:
    """A ditforge export folder (local) → the DiTPipeline folder at `out` (any URI)."""
    from ..models.convert import PretrainedError

    try:
        import diffusers  # noqa: F401
    except ImportError:
        raise PretrainedError(
            "--format diffusers needs the diffusers extra: pip install 'ditforge[diffusers]'"
        ) from None
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DiTPipeline,
        DiTTransformer2DModel,
        FlowMatchEulerDiscreteScheduler,
    )

    from ..models.convert import PretrainedError, diffusers_config, to_diffusers

    tmp = Path(tempfile.mkdtemp(prefix="ditforge-export-diffusers-"))
    try:
        model, cfg = load_model(folder, weights)
        shape = cfg["latent_shape"]
        if len(shape) != 3 or shape[1] != shape[2]:
            raise PretrainedError(
                f"cannot export to diffusers: latent shape {tuple(shape)} (DiTTransformer2DModel "
                "takes square image latents)"
            )
        obj = cfg.get("objective", {"kind": "rectified_flow"})
        if obj["kind"] == "ddpm":
            if obj.get("timesteps", 1000) != 1000:
                raise PretrainedError(
                    f"cannot export to diffusers: objective.timesteps {obj['timesteps']} (the model's "
                    "time input matches diffusers' integer timesteps only for 1000)"
                )
            scheduler: DDIMScheduler | FlowMatchEulerDiscreteScheduler = DDIMScheduler(
                num_train_timesteps=1000,
                beta_start=1e-4,
                beta_end=0.02,
                beta_schedule="linear" if obj.get("schedule", "linear") == "linear" else "squaredcos_cap_v2",
                prediction_type="epsilon" if obj.get("prediction", "eps") == "eps" else "v_prediction",
                clip_sample=False,
            )
        else:
            scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
        # Any: diffusers' type information names the torch-less dummy classes, which lack the methods
        transformer: Any = DiTTransformer2DModel(**diffusers_config(model.cfg, shape[1]))
        transformer.load_state_dict(to_diffusers(model.state_dict(), model.cfg), strict=True)
        vae_spec, vae = cfg["vae"], None
        if vae_spec["kind"] == "diffusers":
            vae = AutoencoderKL.from_pretrained(
                vae_spec["path"].removeprefix("file://"), local_files_only=True, use_safetensors=True
            )
        classes = cfg.get("classes") or []
        id2label = {str(i): str(c) for i, c in enumerate(classes)} or None
        pipe: Any = DiTPipeline(transformer=transformer.eval(), vae=vae, scheduler=scheduler, id2label=id2label)
        local = tmp / "diffusers"
        pipe.save_pretrained(str(local), safe_serialization=True)
        index = json.loads((local / "model_index.json").read_text())
        if id2label:  # DiTPipeline reads its label names from model_index.json's id2label
            index["id2label"] = id2label
        if vae is None:  # a component named null: from_pretrained loads without it (pass vae=... to decode)
            index["vae"] = [None, None]
        (local / "model_index.json").write_text(json.dumps(index, indent=2))
        adapter = None
        if cfg.get("lora") and (folder / lora.ADAPTER_DIR).exists():
            # the adapter with diffusers' module names beside the merged transformer (models/lora.py)
            mapped = lora.to_diffusers(lora.read_peft(folder / lora.ADAPTER_DIR))
            if isinstance(mapped, str):
                adapter = f"not written: {mapped}"
            else:
                lora.write_peft(local / lora.DIFFUSERS_ADAPTER_DIR, mapped, cfg["lora"])
                adapter = lora.DIFFUSERS_ADAPTER_DIR
        for f in sorted(p for p in local.rglob("*") if p.is_file()):
            storage.put_file(f, storage.join(out, str(f.relative_to(local))))
        return {
            "scheduler": type(scheduler).__name__,
            "vae_exported": vae is not None,
            "weights": cfg["weights"],
        } | ({"lora_adapter": adapter} if cfg.get("lora") else {})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
