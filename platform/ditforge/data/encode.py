"""Pixel shards → latent shards through the VAE, keeping keys, classes and captions.

The latent scale/shift statistics are measured here and recorded in the manifest, so training and
sampling read them from one place instead of repeating a magic constant.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from rich.progress import Progress

from . import shards


def _pixels(png: bytes) -> torch.Tensor:
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)
    return torch.from_numpy(img).permute(2, 0, 1) / 127.5 - 1.0  # (3, H, W) in [-1, 1]


def encode_dataset(src: str, out: str, vae, *, progress: bool = True) -> dict:
    src_manifest = shards.read_manifest(src)
    try:
        old = shards.read_manifest(out)
        if old.get("source_sha256") == [s["sha256"] for s in src_manifest["shards"]] and old["vae"] == vae.identity:
            return old
    except shards.DataError:
        pass
    entries, total, s1, s2, count = [], src_manifest["total_samples"], 0.0, 0.0, 0
    latent_shape = None
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"encode ({vae.identity}) → {out}", total=total)
        for entry in src_manifest["shards"]:
            samples = shards.read_shard(src, entry)
            x = torch.stack([_pixels(s["png"]) for s in samples])
            z = vae.encode(x).numpy().astype(np.float32)  # (B, C, h, w)
            latent_shape = list(z.shape[1:])
            s1 += float(z.sum()); s2 += float((z.astype(np.float64) ** 2).sum()); count += z.size
            out_samples = (
                {"__key__": s["__key__"], "latent.npy": shards.npy_bytes(zi), "cls": s["cls"], "txt": s["txt"]}
                for s, zi in zip(samples, z)
            )
            entries.append(shards.write_shard(out, entry["name"], out_samples))
            bar.advance(task, len(samples))
    mean = s1 / count
    std = (s2 / count - mean**2) ** 0.5
    manifest = {"kind": "latents", "vae": vae.identity, "latent_shape": latent_shape, "latent_mean": mean,
                "latent_std": std, "classes": src_manifest.get("classes", []), "source": src,
                "source_sha256": [s["sha256"] for s in src_manifest["shards"]], "shards": entries}
    shards.write_manifest(out, manifest)
    return shards.read_manifest(out)
