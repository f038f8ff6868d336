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
