"""Data sets the tests build (both tiers): small, made here, nothing downloaded."""

from __future__ import annotations

import numpy as np

from ditforge.data import shards


def make_latents(uri: str, sizes: list[int], shapes: list[tuple[int, ...]] | None = None) -> dict:
    """A latent data set with shards of `sizes` samples; shard i has latent shape shapes[i % len]."""
    shapes = shapes or [(4, 2, 2)]
    entries, k = [], 0
    for i, n in enumerate(sizes):
        shape = shapes[i % len(shapes)]
        samples = []
        for _ in range(n):
            samples.append(
                {
                    "__key__": f"{k:06d}",
                    "latent.npy": shards.npy_bytes(np.full(shape, k, np.float32)),
                    "cls": str(k % 10),
                    "txt": "",
                }
            )
            k += 1
        entries.append(
            shards.write_shard(uri, f"shard-{i:06d}.tar", samples, bucket="x".join(map(str, shape)), shape=list(shape))
        )
    shards.write_manifest(uri, {"kind": "latents", "latent_shape": list(shapes[0]), "shards": entries})
    return shards.read_manifest(uri)


def noise_latents(uri: str, n: int, shape: tuple[int, ...], shard_size: int, seed: int = 0) -> str:
    """`n` standard-normal latents of `shape` in shards of `shard_size`, classes k % 10: what the
    identity VAE makes of the demo's images (12, 16, 16 at 32 px), for tests whose subject is not
    the data path (that has its own tests) nor learning (pure noise: the loss barely falls), and
    which need not pay a Ray Data ingest and encode."""
    rng, entries = np.random.default_rng(seed), []
    for i, start in enumerate(range(0, n, shard_size)):
        samples = [
            {
                "__key__": f"{i}-{k:06d}",
                "latent.npy": shards.npy_bytes(rng.standard_normal(shape, np.float32)),
                "cls": str(k % 10),
                "txt": "",
            }
            for k in range(start, min(n, start + shard_size))
        ]
        bucket = "x".join(map(str, shape))
        entries.append(shards.write_shard(uri, shards.shard_name(i), samples, bucket=bucket, shape=list(shape)))
    shards.write_manifest(uri, {"kind": "latents", "latent_shape": list(shape), "shards": entries})
    return uri
