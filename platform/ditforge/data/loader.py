"""Per-rank, deterministic, resumable streams of latent batches.

For epoch e every rank shuffles the shard list with the same seed, takes every world-th shard
starting at its rank (disjoint), and shuffles each shard's samples with a seed of
(seed, epoch, rank, shard). All ranks stop after the same number of batches, the smallest any
rank can fill, so collective ops never wait on a rank that ran dry. The position is just
(epoch, batch): a resumed run skips whole shards by their manifest counts and re-reads only the
one it stopped in, and then yields exactly the batches an uninterrupted run would have.
"""

from __future__ import annotations

import queue
import random
import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from . import shards


@dataclass
class Position:
    epoch: int = 0
    batch: int = 0  # batches already consumed in this epoch

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}


class LatentLoader:
    def __init__(self, uri: str, batch_size: int, rank: int, world: int, seed: int):
        self.uri, self.batch_size, self.rank, self.world, self.seed = uri, batch_size, rank, world, seed
        self.manifest = shards.read_manifest(uri)
        if self.manifest.get("kind") != "latents":
            raise shards.DataError(f"{uri}: holds {self.manifest.get('kind')!r} shards, training needs latents "
                                   "(run the encode step first)")
        if len(self.manifest["shards"]) < world:
            raise shards.DataError(f"{uri}: {len(self.manifest['shards'])} shards cannot feed {world} workers "
                                   "(each worker reads its own shards): write smaller shards")
        self.position = Position()

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["latent_shape"])

    def _assignment(self, epoch: int, rank: int) -> list[dict]:
        order = list(self.manifest["shards"])
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order[rank :: self.world]

    def batches_per_epoch(self, epoch: int) -> int:
        return min(sum(s["samples"] for s in self._assignment(epoch, r)) for r in range(self.world)) // self.batch_size

    def _samples(self, epoch: int, skip: int) -> Iterator[dict]:
        todo = []
        for i, entry in enumerate(self._assignment(epoch, self.rank)):
            if skip >= entry["samples"]:
                skip -= entry["samples"]  # resume: whole shard already consumed, don't even read it
                continue
            todo.append((i, entry, skip))
            skip = 0
        # One shard read ahead in a thread, so storage latency hides behind the training step.
        q: queue.Queue = queue.Queue(maxsize=1)

        def reader():
            try:
                for i, entry, sk in todo:
                    samples = shards.read_shard(self.uri, entry)
                    random.Random(hash((self.seed, epoch, self.rank, i)) & 0xFFFFFFFF).shuffle(samples)
                    q.put((samples, sk))
            except Exception as e:  # surface the error in the training thread
                q.put(e)
            q.put(None)

        threading.Thread(target=reader, daemon=True).start()
        while (item := q.get()) is not None:
            if isinstance(item, Exception):
                raise item
            samples, sk = item
            yield from samples[sk:]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        """Yields (latents (B, C, h, w) float32, classes (B,) int64, keys) forever, epoch after epoch."""
        while True:
            pos = self.position
            n = self.batches_per_epoch(pos.epoch)
            stream = self._samples(pos.epoch, pos.batch * self.batch_size)
            while pos.batch < n:
                batch = [next(stream) for _ in range(self.batch_size)]
                x = torch.from_numpy(np.stack([shards.npy_load(s["latent.npy"]) for s in batch]))
                y = torch.tensor([int(s["cls"]) for s in batch], dtype=torch.long)
                pos.batch += 1
                yield x, y, [s["__key__"] for s in batch]
            stream.close()
            self.position = Position(pos.epoch + 1, 0)
