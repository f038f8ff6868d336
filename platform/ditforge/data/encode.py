"""Pixel shards → latent shards through the VAE, with Ray Data.

One row per pixel shard goes through `map_batches` with a pool of VAE actors (one GPU each when
the cluster has GPUs, one CPU each otherwise): each actor builds the VAE once, reads its shard
(checksum verified), encodes it in mini-batches and writes the latent shard under the same name,
with the same keys, classes and captions, then a `_parts/` record. A re-run skips shards whose
record matches (same source bytes, same VAE), so an interrupted encode resumes.

The latent statistics are measured here and recorded in the manifest, so training and sampling
read them from one place instead of repeating a magic constant.
"""

from __future__ import annotations

import io
import json
import logging
import time
import warnings
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
import yaml
from PIL import Image

from .. import storage
from . import shards

if TYPE_CHECKING:
    from ..models.vae import VAE
    from ..spec import VAESpec

ENCODE_VERSION = 1


def parse_vae(text: str) -> VAESpec:
    """`--vae` → VAESpec: a YAML file (a job spec's `vae:` section, or the section alone), or
    inline `KIND[,key=value...]` such as `identity,downsample=4`."""
    from pydantic import ValidationError

    from ..spec import VAESpec

    if Path(text).is_file():
        raw = yaml.safe_load(Path(text).read_text()) or {}
        raw = raw.get("vae", raw) if isinstance(raw, dict) else raw
    else:
        raw = {}
        for i, part in enumerate(p for p in text.split(",") if p.strip()):
            if "=" in part:
                k, v = part.split("=", 1)
                raw[k.strip()] = yaml.safe_load(v)
            elif i == 0:
                raw["kind"] = part.strip()
            else:
                raise shards.DataError(f"--vae: '{part}' is not key=value")
    try:
        return VAESpec.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        raise shards.DataError(
            f"--vae: {'.'.join(map(str, err['loc'])) or 'vae'}: {err['msg']} (got {err.get('input')!r})"
        ) from None


def _pixels(sample: dict) -> np.ndarray:
    """→ (3, H, W) or (3, T, H, W) float32 in [-1, 1]."""
    if "png" in sample:
        a = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB"))  # (H, W, 3)
        a = a.transpose(2, 0, 1)
    else:
        a = shards.npy_load(sample["frames.npy"]).transpose(3, 0, 1, 2)  # (T, H, W, 3) → (3, T, H, W)
    return a.astype(np.float32) / 127.5 - 1.0


def encode_pixels(vae: VAE, x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) → (B, C, h, w); videos (B, 3, T, H, W) → (B, C, T, h, w). An image VAE
    encodes a video frame by frame; a VAE with `temporal = True` gets the clip whole."""
    if x.ndim == 4 or getattr(vae, "temporal", False):
        return vae.encode(x)
    B, _, T, H, W = x.shape
    z = vae.encode(x.permute(0, 2, 1, 3, 4).reshape(B * T, 3, H, W))  # (B·T, C, h, w)
    return z.reshape(B, T, *z.shape[1:]).permute(0, 2, 1, 3, 4)


class ShardEncoder:
    """A Ray Data actor: builds the VAE once, then encodes whole shards."""

    def __init__(self, src: str, out: str, vae: VAESpec | VAE, device: str, micro_batch: int = 64):
        from ..models.vae import build_vae

        self.src, self.out, self.micro_batch = src, out, micro_batch
        self.device = torch.device(device)
        self.vae: VAE = build_vae(vae) if not hasattr(vae, "encode") else cast("VAE", vae)
        if hasattr(self.vae, "to"):
            self.vae = self.vae.to(self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"record": np.array([json.dumps(self.encode_shard(json.loads(e))) for e in batch["entry"]])}

    @torch.no_grad()
    def encode_shard(self, job: dict) -> dict:
        entry = job["entry"]
        samples = shards.read_shard(self.src, entry)
        latents: list[np.ndarray] = []
        stats: np.ndarray | None = None
        for a in range(0, len(samples), self.micro_batch):
            chunk = samples[a : a + self.micro_batch]
            x = torch.from_numpy(np.stack([_pixels(s) for s in chunk])).to(self.device)
            z = encode_pixels(self.vae, x).float().cpu().numpy()
            latents.extend(z)
            zc = z.astype(np.float64).swapaxes(0, 1).reshape(z.shape[1], -1)  # (C, everything else)
            part = np.stack([zc.sum(1), (zc**2).sum(1), np.full(zc.shape[0], zc.shape[1], np.float64)])
            stats = part if stats is None else stats + part
        out = (
            {
                "__key__": s["__key__"],
                "latent.npy": shards.npy_bytes(z),
                "cls": s["cls"],
                "txt": s["txt"],
                **({"json": s["json"]} if "json" in s else {}),
            }
            for s, z in zip(samples, latents)
        )
        shape = list(latents[0].shape) if latents else None
        new = shards.write_shard(self.out, entry["name"], out, bucket=entry.get("bucket"), shape=shape)
        record = {"digest": job["digest"], "entry": new, "stats": stats.tolist() if stats is not None else None}
        shards.write_part(self.out, entry["name"], record)
        return record


def _vae_identity(vae: VAESpec | VAE) -> str:
    if hasattr(vae, "identity"):
        return vae.identity
    from ..models.vae import build_vae

    return build_vae(vae).identity


def encode_dataset(
    src: str,
    out: str,
    vae: VAESpec | VAE,
    *,
    progress: bool = True,
    micro_batch: int = 64,
    ray_fallback: Callable[[], str | None] | None = None,
) -> dict:
    """Encode the pixel data set at `src` into latents at `out`. `vae`: a VAESpec (each actor
    builds its own) or a built VAE object (shipped to the actors). Ray starts only when there is
    work; `ray_fallback`: see `ray_session`."""
    import ray
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .parallel import gpus, ray_session

    src, out = storage.absolute(src), storage.absolute(out)
    storage.check(out)  # a bad --out fails now, not after the source was read
    src_manifest = shards.read_manifest(src)
    if src_manifest.get("kind") != "pixels":
        raise shards.DataError(
            f"{src}: holds {src_manifest.get('kind')!r} shards; encode reads pixel shards "
            "(the output of `ditforge data ingest`)"
        )
    identity = _vae_identity(vae)
    source_sha = [s["sha256"] for s in src_manifest["shards"]]
    try:
        old = shards.read_manifest(out)
        if old.get("source_sha256") == source_sha and old.get("vae") == identity:
            return old
        storage.remove(storage.join(out, shards.MANIFEST))  # another data set is being written here now
    except shards.DataError:
        pass
    jobs = [{"entry": e, "digest": f"{e['sha256']}/{identity}/{ENCODE_VERSION}"} for e in src_manifest["shards"]]
    done = {}
    for j in jobs:
        rec = shards.read_part(out, j["entry"]["name"])
        if rec is not None and rec.get("digest") == j["digest"]:
            done[j["entry"]["name"]] = rec
    todo = [j for j in jobs if j["entry"]["name"] not in done]
    total = src_manifest["total_samples"]
    cols = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
    ]
    with Progress(*cols, console=Console(stderr=True), disable=not progress, transient=True) as bar:
        task = bar.add_task(
            f"encode ({identity}) → {out}",
            total=total,
            rate="",
            completed=sum(r["entry"]["samples"] for r in done.values()),
        )
        if todo:
            with ray_session(fallback=ray_fallback):
                ctx = ray.data.DataContext.get_current()
                ctx.enable_progress_bars = False  # ours is above
                n_gpu = gpus()
                # GPU actors when the cluster has GPUs (one each), else one CPU each.
                size = min(len(todo), n_gpu or max(1, int(ray.cluster_resources().get("CPU", 1))))
                ds: ray.data.Dataset = ray.data.from_items(
                    [{"entry": json.dumps(j)} for j in todo], override_num_blocks=len(todo)
                )
                with warnings.catch_warnings():
                    # ray_remote_args_fn is the only way to pass max_restarts; it still works in
                    # the pinned Ray, which warns about a future removal.
                    warnings.simplefilter("ignore", DeprecationWarning)
                    ds = ds.map_batches(
                        ShardEncoder,
                        batch_size=1,
                        fn_constructor_kwargs={
                            "src": src,
                            "out": out,
                            "vae": vae,
                            "device": "cuda" if n_gpu else "cpu",
                            "micro_batch": micro_batch,
                        },
                        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=size),
                        num_gpus=1 if n_gpu else 0,
                        num_cpus=1 if not n_gpu else None,
                        # a lost actor fails the run (the re-run resumes) instead of
                        # restarting from constructor args that may be gone
                        ray_remote_args_fn=lambda: {"max_restarts": 0},
                    )
                # Ours is the progress bar; Ray Data would also warn that its own are off.
                logging.getLogger("ray.data").setLevel(logging.ERROR)
                t0, n_new = time.perf_counter(), 0
                for row in ds.iter_rows():
                    rec = json.loads(row["record"])
                    done[rec["entry"]["name"]] = rec
                    n_new += rec["entry"]["samples"]
                    bar.update(
                        task,
                        advance=rec["entry"]["samples"],
                        rate=f"{n_new / (time.perf_counter() - t0):.0f} samples/s",
                    )

    records = [done[j["entry"]["name"]] for j in jobs]
    stats = np.sum([r["stats"] for r in records if r["stats"] is not None], axis=0)  # (3, C): Σz, Σz², n
    ch_mean = stats[0] / stats[2]
    ch_std = np.sqrt(np.maximum(stats[1] / stats[2] - ch_mean**2, 0))
    mean = stats[0].sum() / stats[2].sum()
    std = float(np.sqrt(max(stats[1].sum() / stats[2].sum() - mean**2, 0)))
    entries = [r["entry"] for r in records]
    by_bucket: dict[str, dict] = {}
    for e in entries:
        b = by_bucket.setdefault(e["bucket"] or "default", {"shape": e["shape"], "samples": 0})
        b["samples"] += e["samples"]
    common = max(by_bucket.values(), key=lambda b: b["samples"])["shape"]
    manifest = {
        "kind": "latents",
        "encode_version": ENCODE_VERSION,
        "vae": identity,
        "vae_spec": vae.model_dump(mode="json") if hasattr(vae, "model_dump") else None,
        # Statistics of the latents as written (after the VAE's own scale/shift). A VAE spec
        # wanting unit-variance latents sets shift = latent_mean, scale = 1 / latent_std.
        "latent_shape": common,
        "latent_mean": float(mean),
        "latent_std": std,
        "channel_mean": ch_mean.tolist(),
        "channel_std": ch_std.tolist(),
        "buckets": by_bucket,
        "classes": src_manifest.get("classes", []),
        "source": src,
        "source_sha256": source_sha,
        "frames": src_manifest.get("frames"),
        "shards": entries,
    }
    shards.write_manifest(out, manifest)
    return shards.read_manifest(out)
