"""Registered models as MLflow `pyfunc` models: what any MLflow user can load and call.

    mlflow.pyfunc.load_model("models:/demo-image/1").predict(pandas.DataFrame({"class": [3, 7], "seed": [0, 1]}))
    → uint8 array (N, H, W, 3) for images, (N, T, H, W, 3) for video clips

The model folder holds the export (model.json, EMA / raw safetensors) and, for the own and
diffusers VAEs, the VAE's files as artifacts, so loading needs neither the run's object store
nor its credentials. `ditforge sample --model models:/…` reads the same folder (it finds
model.json inside). Each row is one sample; its `seed` fixes its noise, whatever else is asked.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd  # mlflow.pyfunc imports it anyway
from mlflow.pyfunc import PythonModel, PythonModelContext

ARTIFACTS = ("model.json", "ema.safetensors", "raw.safetensors")


class DiTSampler(PythonModel):
    """Class-conditional sampling with the export's sampler settings; `steps` and `cfg_scale` are
    per-call params."""

    def load_context(self, context: PythonModelContext) -> None:
        import torch

        from ..models.vae import build_vae
        from ..objectives import build_objective
        from ..spec import ObjectiveSpec, SampleSpec, VAESpec
        from .export import load_model

        folder = Path(context.artifacts["model.json"]).parent
        self.model, cfg = load_model(folder)
        vae = dict(cfg["vae"])
        if "vae" in context.artifacts:  # the VAE travels with the model: no store, no credentials
            vae["path"] = ("file://" if vae["kind"] == "own" else "") + context.artifacts["vae"]
        self.vae = build_vae(VAESpec(**vae))
        self.objective = build_objective(ObjectiveSpec(**cfg.get("objective", {})))
        self.sample_spec = SampleSpec(**cfg["sample"])
        self.latent_shape = tuple(cfg["latent_shape"])
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    # MLflow reads these hints at run time: a DataFrame input is one it neither validates nor
    # infers a signature from (save() gives the signature), as without hints.
    def predict(
        self, context: PythonModelContext, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> np.ndarray:
        import torch

        from .sampling import generate

        classes = np.asarray(model_input["class"], dtype=np.int64)
        seeds = np.asarray(model_input["seed"], dtype=np.int64) if "seed" in model_input else np.zeros_like(classes)
        n_cls = self.model.cfg.num_classes
        if n_cls and ((classes < 0) | (classes >= n_cls)).any():
            raise ValueError(f"class: values must lie in 0..{n_cls - 1} (got {sorted(set(classes.tolist()))})")
        update = {k: v for k, v in (params or {}).items() if k in ("steps", "cfg_scale") and v is not None}
        out = []
        for c, s in zip(
            classes.tolist(), seeds.tolist()
        ):  # one row, one seed: a row's image never depends on the others
            spec = self.sample_spec.model_copy(update={**update, "seed": int(s)})
            z = generate(self.model, self.objective, self.latent_shape, torch.tensor([c]) if n_cls else None, spec)
            px = self.vae.decode(z[:1])[0]  # (3, [T,] H, W) in [-1, 1]
            px = px.movedim(0, -1)  # (..., H, W, 3)
            out.append(((px.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy())
        return np.stack(out)


def image_shape(cfg: dict) -> tuple[int, ...]:
    """Pixel shape of one sample, (H, W, 3) or (T, H, W, 3), from the export's latent shape and VAE."""
    from ..models.vae import build_vae
    from ..spec import VAESpec

    vae, shape = build_vae(VAESpec(**cfg["vae"])), cfg["latent_shape"]
    h, w = shape[-2] * vae.f, shape[-1] * vae.f
    return (h, w, 3) if len(shape) == 3 else (shape[1] * vae.temporal_downsample, h, w, 3)


def save(folder: str | Path, out: str | Path) -> Path:
    """An export folder (local) → an MLflow pyfunc model folder at `out` (local)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    from .. import storage

    folder, out = Path(folder), Path(out)
    cfg = json.loads((folder / "model.json").read_text())
    artifacts = {name: str(folder / name) for name in ARTIFACTS if (folder / name).exists()}
    tmp = Path(tempfile.mkdtemp(prefix="ditforge-pyfunc-"))
    try:
        vae = cfg["vae"]
        if vae["kind"] == "own":  # config.json + model.safetensors from the run's store
            for f in ("config.json", "model.safetensors"):
                storage.get_file(storage.join(vae["path"], f), tmp / "vae" / f)
            artifacts["vae"] = str(tmp / "vae")
        elif vae["kind"] == "diffusers":
            artifacts["vae"] = vae["path"].removeprefix("file://")
        sample = cfg["sample"]
        signature = ModelSignature(
            inputs=Schema([ColSpec("long", "class"), ColSpec("long", "seed", required=False)]),
            outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, *image_shape(cfg)))]),
            params=ParamSchema(
                [
                    ParamSpec("steps", "long", int(sample["steps"])),
                    ParamSpec("cfg_scale", "double", float(sample["cfg_scale"])),
                ]
            ),
        )
        example = None
        mlflow.pyfunc.save_model(
            str(out),
            python_model=DiTSampler(),
            artifacts=artifacts,
            signature=signature,
            input_example=example,
            pip_requirements=_requirements(),
            metadata={"ditforge.job": cfg.get("job"), "ditforge.step": cfg.get("step")},
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _requirements() -> list[str]:
    """What the loading process needs, pinned to what made the model (no slow inference of them)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("mlflow", "torch", "safetensors", "pydantic", "pillow", "pyyaml", "ditforge"):
        try:
            out.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            pass
    return out
