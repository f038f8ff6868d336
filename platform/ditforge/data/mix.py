"""Several latent data sets in one job (`data.mix`): images trained beside videos, or any sets
with weights.

Each set is its own `LatentLoader`: its own shards per rank, its own bad-data accounting, its own
resumable position. Batch n of the job (n = 0, 1, 2, ..., one per step) comes from the set drawn
for n, a pure function of (seed, n) and the weights: every rank draws the same set at the same
step, so all ranks run the same shapes together, and a resumed run draws what an uninterrupted
one would. The choice is made before the batch is read (the loader, and the GPU prefetcher, run
ahead of the step), which is why it is keyed by the batch's number and not drawn from the step's
noise generator; with one batch per step (`data.mix` refuses gradient accumulation) the number is
the step's.

The position is (draws, [each set's position]): a resume restores every set where it was, so
each set yields exactly the batches it would have, and the draws continue from n.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .loader import Batch, LatentLoader, Position


@dataclass
class MixPosition:
    draws: int = 0  # batches handed out so far (all sets together)
    sources: list[Position] = field(default_factory=list)  # each set's own position, data.train first

    def to_dict(self) -> dict[str, Any]:
        return {"draws": self.draws, "sources": [p.to_dict() for p in self.sources]}


def position_from_dict(d: dict[str, Any]) -> Position | MixPosition:
    """A checkpoint's data position: a `Position` (one data set) or a `MixPosition` (data.mix)."""
    if "sources" in d:
        return MixPosition(d["draws"], [Position(**p) for p in d["sources"]])
    return Position(**d)


def source_names(uris: Sequence[str]) -> list[str]:
    """Short metric names for the sets: the last part of each URI, numbered when two share it."""
    base = [u.rstrip("/").rsplit("/", 1)[-1] or f"set{i}" for i, u in enumerate(uris)]
    return [b if base.count(b) == 1 else f"{b}-{i}" for i, b in enumerate(base)]


class MixedLoader:
    """Batches from several `LatentLoader`s, one set per batch, drawn by weight (see the module
    docstring). `drop_labels[i]`: set i trains with the null class (`null_class`) and no caption.
    Metadata (`manifest`, `latent_shape`, `batch_size`) is the first (primary) set's."""

    def __init__(
        self,
        loaders: Sequence[LatentLoader],
        weights: Sequence[float],
        seed: int,
        *,
        drop_labels: Sequence[bool] | None = None,
        null_class: int = 0,
        names: Sequence[str] | None = None,
    ):
        if len(loaders) != len(weights) or not loaders:
            raise ValueError("one weight per data set, at least one set")
        self.loaders, self.seed, self.null_class = list(loaders), seed, null_class
        self.drop_labels = list(drop_labels or [False] * len(loaders))
        self.names = list(names or source_names([ld.uri for ld in loaders]))
        total = float(sum(weights))
        self._cum = list(itertools.accumulate(w / total for w in weights))  # cumulative shares
        self._draws = 0

    # ------------------------------------------------------------------------------ schedule

    def source_of(self, n: int) -> int:
        """The set batch n comes from: a pure function of (seed, n) and the weights. (A str seed
        goes through sha512: the same in every process.)"""
        u = random.Random(f"{self.seed}/mix/{n}").random()
        return min(bisect.bisect_right(self._cum, u), len(self._cum) - 1)

    def draws_per_source(self) -> list[int]:
        """How many of the batches before the position came from each set."""
        counts = [0] * len(self.loaders)
        for n in range(self._draws):
            counts[self.source_of(n)] += 1
        return counts

    # ------------------------------------------------------------------------------ position

    @property
    def position(self) -> MixPosition:
        return MixPosition(self._draws, [ld.position for ld in self.loaders])

    @position.setter
    def position(self, pos: MixPosition | Position) -> None:
        if isinstance(pos, Position):  # a checkpoint of a one-set job: it was the primary set's position
            pos = MixPosition(0, [pos])
        if len(pos.sources) > len(self.loaders):
            raise ValueError(
                f"the checkpoint's data position covers {len(pos.sources)} data sets, this job has {len(self.loaders)}"
            )
        self._draws = pos.draws
        for ld, p in zip(self.loaders, pos.sources):
            ld.position = p  # each set's own; a set the checkpoint did not know starts at its beginning

    # ------------------------------------------------------------------------------ metadata

    @property
    def manifest(self) -> dict:
        return self.loaders[0].manifest

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return self.loaders[0].latent_shape

    @property
    def batch_size(self) -> int:
        return self.loaders[0].batch_size

    def skipped_counts(self) -> list[int]:
        """`LatentLoader.skipped_counts` summed over the sets."""
        return [sum(c) for c in zip(*(ld.skipped_counts() for ld in self.loaders))]

    # ------------------------------------------------------------------------------ batches

    def __iter__(self) -> Iterator[Batch]:
        """Yields `LatentLoader` batches forever, each from the set drawn for it. A set's stream
        starts when it is first drawn (at its position)."""
        streams: list[Iterator[Batch] | None] = [None] * len(self.loaders)
        while True:
            i = self.source_of(self._draws)
            stream = streams[i]
            if stream is None:
                stream = streams[i] = iter(self.loaders[i])
            x, y, keys, captions = next(stream)
            self._draws += 1
            if self.drop_labels[i]:
                y, captions = torch.full_like(y, self.null_class), [""] * len(captions)
            yield x, y, keys, captions
