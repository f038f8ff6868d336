"""Per-rank, deterministic, resumable streams of latent batches.

The schedule is a pure function of (manifest, seed, epoch, world size, rank, batch size):

- shards: every rank shuffles the shard list with the same (seed, epoch) and takes every
  world-th shard starting at its rank, so ranks read disjoint shards;
- samples: each shard's samples are shuffled with (seed, epoch, shard name) and cut into
  batches of `batch_size`; the remainder is dropped (a different remainder each epoch). Every
  shard holds one bucket (ingest writes them so), so every batch has one shape;
- length: all ranks stop after the same number of batches, the smallest any rank can fill, so
  collective ops never wait on a rank that ran dry.

The position is (epoch, batches consumed). A resumed run skips whole shards by their manifest
counts, re-reads only the shard it stopped in, and yields exactly the batches an uninterrupted
run would have. Resuming with another world size (or batch size) keeps the epoch and continues at
the same fraction of it under the new schedule; within that one epoch some samples may then be
seen twice or not at all, and from the next epoch on the stream is exactly that of a fresh run at
the new world size.
"""

from __future__ import annotations

import queue
import random
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np
import torch

from .. import storage
from . import shards

PREFETCH = 2  # shards read ahead of the one being consumed


@dataclass
class Position:
    epoch: int = 0
    batch: int = 0  # batches already consumed in this epoch
    world: int | None = None  # the schedule `batch` counts in (None: the loader's own)
    batch_size: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


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
        if self.batches_per_epoch(0) == 0:
            raise shards.DataError(f"{uri}: no shard holds a full batch of {batch_size} for {world} workers "
                                   "(batches never span shards): lower data.batch_size or write bigger shards")
        self._position = Position(0, 0, world, batch_size)

    # ------------------------------------------------------------------------------ position

    @property
    def position(self) -> Position:
        return self._position

    @position.setter
    def position(self, pos: Position) -> None:
        old_world, old_bs = pos.world or self.world, pos.batch_size or self.batch_size
        if (old_world, old_bs) != (self.world, self.batch_size):
            # Another schedule: keep the epoch, continue at the same fraction of it.
            old_n = self.batches_per_epoch(pos.epoch, old_world, old_bs)
            batch = pos.batch * self.batches_per_epoch(pos.epoch) // max(old_n, 1)
            print(f"[data] resuming a world={old_world} batch_size={old_bs} position {pos.epoch}:{pos.batch} at "
                  f"world={self.world} batch_size={self.batch_size}: epoch {pos.epoch} batch {batch}", flush=True)
            pos = Position(pos.epoch, batch)
        self._position = Position(pos.epoch, pos.batch, self.world, self.batch_size)

    # ------------------------------------------------------------------------------ schedule

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """The most common bucket's latent shape; each batch carries its own shape."""
        if "latent_shape" in self.manifest:
            return tuple(self.manifest["latent_shape"])
        return tuple(Counter(tuple(s["shape"]) for s in self.manifest["shards"]).most_common(1)[0][0])

    def assignment(self, epoch: int, rank: int, world: int | None = None) -> list[dict]:
        order = list(self.manifest["shards"])
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order[rank:: world or self.world]

    def batches_per_epoch(self, epoch: int, world: int | None = None, batch_size: int | None = None) -> int:
        world, bs = world or self.world, batch_size or self.batch_size
        return min(sum(s["samples"] // bs for s in self.assignment(epoch, r, world)) for r in range(world))

    def _order(self, epoch: int, entry: dict) -> random.Random:
        # Seeded by the shard's name, not its slot: the same shard is shuffled the same way
        # whichever rank reads it. (str seeds go through sha512: stable across processes.)
        return random.Random(f"{self.seed}/{epoch}/{entry['name']}")

    def _batches(self, epoch: int, skip: int) -> Iterator[list[dict]]:
        """This rank's batches of `epoch` after the first `skip`, reading one shard ahead."""
        todo = []
        for entry in self.assignment(epoch, self.rank):
            n = entry["samples"] // self.batch_size
            if skip >= n:
                skip -= n  # resume: whole shard already consumed, don't even read it
                continue
            todo.append((entry, skip))
            skip = 0
        q: queue.Queue = queue.Queue(maxsize=1)
        stop = threading.Event()
        fs = storage.filesystem(self.uri)  # one per epoch: setting up an S3 client costs ~0.1 s

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        def reader():
            # Fetch up to PREFETCH shards at once (object-store latency overlaps), parse in order.
            pool = ThreadPoolExecutor(PREFETCH)
            try:
                futures = [pool.submit(shards.read_shard, self.uri, entry, fs) for entry, _ in todo[:PREFETCH]]
                for i, (entry, sk) in enumerate(todo):
                    samples = futures[i].result()
                    if i + PREFETCH < len(todo):
                        futures.append(pool.submit(shards.read_shard, self.uri, todo[i + PREFETCH][0], fs))
                    samples.sort(key=lambda s: s["__key__"])  # tar order is the writer's business
                    self._order(epoch, entry).shuffle(samples)
                    if not put((samples, sk)):
                        return
            except Exception as e:  # surface the error in the training thread
                put(e)
            finally:
                pool.shutdown(wait=False, cancel_futures=True)
            put(None)

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        try:
            while (item := q.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                samples, sk = item
                bs = self.batch_size
                for b in range(sk, len(samples) // bs):
                    yield samples[b * bs: (b + 1) * bs]
        finally:
            stop.set()  # a consumer that stops early must not leave the reader blocked forever

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str], list[str]]]:
        """Yields (latents (B, *shape) float32, classes (B,) int64, keys, captions) forever, epoch
        after epoch. shape is (C, h, w) for images and (C, T, h, w) for videos, one bucket per
        batch; a sample without a caption gets "" (the text encoder's unconditional input)."""
        while True:
            pos = self._position
            n = self.batches_per_epoch(pos.epoch)
            stream = self._batches(pos.epoch, pos.batch)
            while pos.batch < n:
                batch = next(stream)
                x = torch.from_numpy(np.stack([shards.npy_load(s["latent.npy"]) for s in batch]))
                y = torch.tensor([int(s["cls"]) for s in batch], dtype=torch.long)
                pos.batch += 1
                captions = [_text(s.get("txt")) for s in batch]
                yield x, y, [s["__key__"] for s in batch], captions
            stream.close()
            self._position = Position(pos.epoch + 1, 0, self.world, self.batch_size)


def _text(raw) -> str:
    if raw is None:
        return ""
    return raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)
