"""Data sets the tests build (both tiers): small, made here, nothing downloaded."""

from __future__ import annotations

import numpy as np

from ditforge.data import shards


def make_latents(
    uri: str, sizes: list[int], shapes: list[tuple[int, ...]] | None = None, noise_seed: int | None = None
) -> dict:
    """A latent data set with shards of `sizes` samples; shard i has latent shape shapes[i % len],
    sample k class k % 10. Sample k's latent is all k, so a test can tell which sample went where;
    with `noise_seed`, standard normal instead: what the identity VAE makes of the demo's images
    (12, 16, 16 at 32 px), for tests whose subject is neither the data path (that has its own
    tests) nor learning (pure noise: the loss barely falls), and which need not pay a Ray Data
    ingest and encode."""
    shapes = shapes or [(4, 2, 2)]
    rng = np.random.default_rng(noise_seed)
    entries, k = [], 0
    for i, n in enumerate(sizes):
        shape = shapes[i % len(shapes)]
        samples = []
        for _ in range(n):
            latent = rng.standard_normal(shape, np.float32) if noise_seed is not None else np.full(shape, k, np.float32)
            samples.append(
                {"__key__": f"{k:06d}", "latent.npy": shards.npy_bytes(latent), "cls": str(k % 10), "txt": ""}
            )
            k += 1
        entries.append(
            shards.write_shard(uri, shards.shard_name(i), samples, bucket="x".join(map(str, shape)), shape=list(shape))
        )
    shards.write_manifest(uri, {"kind": "latents", "latent_shape": list(shapes[0]), "shards": entries})
    return shards.read_manifest(uri)
