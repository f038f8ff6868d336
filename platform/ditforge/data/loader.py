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

Bad data is skipped and counted, never fatal by itself: a shard that is missing, truncated,
changed since the manifest or not a tar counts all its manifest samples as bad; a sample without
`latent.npy`/`cls`, with an unreadable, NaN/Inf, zero-frame or wrongly shaped latent counts one.
Every shard slot still yields the batches its manifest count promises (so ranks stay in step and
positions stay valid): a shard's missing samples are filled by repeating its good ones in order
(as DistributedSampler pads), and an unusable shard's batches come from the next readable shard
of this rank's list. A rank stops the run when its bad samples in one epoch pass
`max_bad_fraction` of the samples assigned to it in that epoch. The counts are part of the
position, so a resumed run decides as the uninterrupted one would have.

A store that does not answer is retried (with backoff, logged) for `storage_timeout_s`; then the
run fails naming the shard. An outage never turns into a skipped shard.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .. import storage
from . import shards

if TYPE_CHECKING:
    import fsspec

# One batch: (latents (B, *shape) float32, classes (B,) int64, keys, captions).
Batch = tuple[torch.Tensor, torch.Tensor, list[str], list[str]]

PREFETCH = 2  # shards read ahead of the one being consumed
# Why a sample was skipped; `train_data/skipped/<reason>` metrics. The first four are whole shards.
REASONS = (
    "missing_shard",
    "truncated_shard",
    "checksum_mismatch",
    "unreadable_shard",
    "missing_key",
    "unreadable_latent",
    "nonfinite_latent",
    "zero_frames",
    "wrong_shape",
    "bad_class",
)


@dataclass
class Position:
    epoch: int = 0
    batch: int = 0  # batches already consumed in this epoch
    world: int | None = None  # the schedule `batch` counts in (None: the loader's own)
    batch_size: int | None = None
    bad: int = 0  # bad samples met in this epoch's consumed shards (what max_bad_fraction checks)
    skipped: dict[str, int] = field(default_factory=dict)  # bad samples by reason since the run began

    def to_dict(self) -> dict:
        return asdict(self)


class LatentLoader:
    def __init__(
        self,
        uri: str,
        batch_size: int,
        rank: int,
        world: int,
        seed: int,
        *,
        max_bad_fraction: float = 0.01,
        storage_timeout_s: float = 300.0,
    ):
        self.uri, self.batch_size, self.rank, self.world, self.seed = uri, batch_size, rank, world, seed
        self.max_bad_fraction, self.storage_timeout_s = max_bad_fraction, storage_timeout_s
        self.manifest = shards.read_manifest(uri)
        if self.manifest.get("kind") != "latents":
            raise shards.DataError(
                f"{uri}: holds {self.manifest.get('kind')!r} shards, training needs latents (run the encode step first)"
            )
        if len(self.manifest["shards"]) < world:
            raise shards.DataError(
                f"{uri}: {len(self.manifest['shards'])} shards cannot feed {world} workers "
                "(each worker reads its own shards): write smaller shards"
            )
        if self.batches_per_epoch(0) == 0:
            raise shards.DataError(
                f"{uri}: no shard holds a full batch of {batch_size} for {world} workers "
                "(batches never span shards): lower data.batch_size or write bigger shards"
            )
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
            print(
                f"[data] resuming a world={old_world} batch_size={old_bs} position {pos.epoch}:{pos.batch} at "
                f"world={self.world} batch_size={self.batch_size}: epoch {pos.epoch} batch {batch}",
                flush=True,
            )
            pos = Position(pos.epoch, batch, bad=pos.bad, skipped=pos.skipped)
        self._position = Position(pos.epoch, pos.batch, self.world, self.batch_size, pos.bad, dict(pos.skipped))

    def skipped_counts(self) -> list[int]:
        """[total, then one per REASONS entry]: this rank's skipped samples since the run began,
        in a fixed order so that ranks can all-reduce them (see `skipped_metrics`)."""
        by = self._position.skipped
        return [sum(by.values())] + [by.get(r, 0) for r in REASONS]

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
        return order[rank :: world or self.world]

    def batches_per_epoch(self, epoch: int, world: int | None = None, batch_size: int | None = None) -> int:
        world, bs = world or self.world, batch_size or self.batch_size
        return min(sum(s["samples"] // bs for s in self.assignment(epoch, r, world)) for r in range(world))

    def _order(self, epoch: int, entry: dict) -> random.Random:
        # Seeded by the shard's name, not its slot: the same shard is shuffled the same way
        # whichever rank reads it. (str seeds go through sha512: stable across processes.)
        return random.Random(f"{self.seed}/{epoch}/{entry['name']}")

    def _batches(self, epoch: int, skip: int) -> Generator[tuple[list[dict], Counter | None, str | None], None, None]:
        """This rank's batches of `epoch` after the first `skip`, reading ahead. With the first
        batch of each shard slot come that slot's bad-sample counts and a note (else None)."""
        assign = self.assignment(epoch, self.rank)
        todo = []  # (slot, batches of it already consumed)
        for i, entry in enumerate(assign):
            n = entry["samples"] // self.batch_size
            if skip >= n:
                skip -= n  # resume: whole shard already consumed, don't even read it
                continue
            todo.append((i, skip))
            skip = 0
        q: queue.Queue = queue.Queue(maxsize=1)
        stop = threading.Event()
        fs = storage.filesystem(self.uri)  # one per epoch: setting up an S3 client costs ~0.1 s

        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        def reader() -> None:
            # Fetch up to PREFETCH shards ahead (object-store latency overlaps), arrange in order.
            pool = ThreadPoolExecutor(PREFETCH)
            futures: dict[int, Future[tuple[list[dict], list[tuple[str, str]]]]] = {}

            def fetch(i: int) -> Future[tuple[list[dict], list[tuple[str, str]]]]:
                if i not in futures:
                    futures[i] = pool.submit(self._read, assign[i], fs)
                return futures[i]

            try:
                for t, (i, sk) in enumerate(todo):
                    for j, _ in todo[t : t + 1 + PREFETCH]:
                        fetch(j)
                    samples, bad, note = self._arrange(epoch, assign, i, fetch)
                    upcoming = {j for j, _ in todo[t + 1 :]}
                    for j in [j for j in futures if j not in upcoming]:
                        del futures[j]  # read for a slot that is done (or as a filler): free it
                    if not put((samples, sk, bad if sk == 0 else None, note)):
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
                samples, sk, bad, note = item
                bs = self.batch_size
                for b in range(sk, len(samples) // bs):
                    yield samples[b * bs : (b + 1) * bs], (bad if b == sk else None), note
        finally:
            stop.set()  # a consumer that stops early must not leave the reader blocked forever

    def _read(self, entry: dict, fs: tuple[fsspec.AbstractFileSystem, str]) -> tuple[list[dict], list[tuple[str, str]]]:
        """One shard → (its usable samples, decoded, in tar order; [(key, reason)] of the others).
        Raises BadShard when the whole shard is unusable; retries a store that does not answer
        for `storage_timeout_s`, logging, and then raises StorageUnavailable naming the shard."""
        name = entry["name"]
        where = f"{self.uri}/{name}"
        t0 = time.monotonic()
        faults: list[BaseException] = []

        def log(e: BaseException, wait: float) -> None:
            faults.append(e)
            print(
                f"[data] rank {self.rank}: reading {name} failed ({type(e).__name__}: {str(e)[:120]}); "
                f"retrying in {wait:.1f} s (gives up {self.storage_timeout_s:.0f} s after the first failure)",
                flush=True,
            )

        try:
            data = storage.retry(
                fs[0].cat_file, f"{fs[1].rstrip('/')}/{name}", deadline_s=self.storage_timeout_s, on_retry=log
            )
        except FileNotFoundError:
            raise shards.BadShard("missing_shard", f"{where}: listed in the manifest but missing") from None
        except PermissionError as e:  # an answer, not an outage: the keys, not the data, need fixing
            raise shards.DataError(f"{where}: access denied ({str(e)[:200]})") from None
        except OSError as e:  # StorageUnavailable included: the store never answered
            raise storage.StorageUnavailable(
                f"{where}: the store did not answer for {time.monotonic() - t0:.0f} s "
                f"(data.storage_timeout_s: {self.storage_timeout_s:g}): {type(e).__name__}: {str(e)[:200]}"
            ) from e
        if faults:
            print(
                f"[data] rank {self.rank}: read {name} after {len(faults)} failed tries "
                f"({time.monotonic() - t0:.1f} s): the store is back",
                flush=True,
            )
        good, rejects = [], []
        for s in shards.parse_shard(self.uri, entry, data):
            reason = _check(s, entry.get("shape"))
            if reason is None:
                good.append(s)
            else:
                rejects.append((s["__key__"], reason))
        return good, rejects

    def _arrange(
        self,
        epoch: int,
        assign: list[dict],
        i: int,
        fetch: Callable[[int], Future[tuple[list[dict], list[tuple[str, str]]]]],
    ) -> tuple[list[dict], Counter, str | None]:
        """Slot i's samples in batch order: exactly the manifest's full batches' worth, with the
        bad samples' and bad shards' counts. See the module docstring for the fill rules."""
        entry = assign[i]
        need = entry["samples"] // self.batch_size * self.batch_size
        bad: Counter = Counter()
        note = None
        try:
            good, rejects = fetch(i).result()
        except shards.BadShard as e:
            bad[e.reason] += entry["samples"]
            good, note = [], str(e)
        else:
            for key, reason in rejects:
                bad[reason] += 1
            if rejects:
                note = f"{self.uri}/{entry['name']}: sample {rejects[0][0]}: {rejects[0][1]}"
        good = sorted(good, key=lambda s: s["__key__"])  # tar order is the writer's business
        self._order(epoch, entry).shuffle(good)
        if not good:  # nothing usable here: this slot's batches come from the next readable shard
            for k in range(1, len(assign)):
                j = (i + k) % len(assign)
                try:
                    filler = sorted(fetch(j).result()[0], key=lambda s: s["__key__"])
                except shards.BadShard:
                    continue
                if filler:
                    random.Random(f"{self.seed}/{epoch}/{entry['name']}/filled-from/{assign[j]['name']}").shuffle(
                        filler
                    )
                    good, note = filler, f"{note}; its batches are filled from {assign[j]['name']}"
                    break
            else:
                raise shards.DataError(
                    f"{self.uri}: rank {self.rank} has no usable shard in epoch {epoch} "
                    f"(e.g. {note}): run `ditforge data verify {self.uri}`"
                )
        out = good[:need]
        while len(out) < need:  # repeat good samples, in order, for the bad ones
            out += good[: need - len(out)]
        return out, bad, note

    def _count(self, pos: Position, bad: Counter, note: str | None) -> None:
        """Add one slot's bad samples to the position; stop the run past max_bad_fraction."""
        pos.bad += sum(bad.values())
        for reason, n in bad.items():
            pos.skipped[reason] = pos.skipped.get(reason, 0) + n
        total = sum(e["samples"] for e in self.assignment(pos.epoch, self.rank))
        print(
            f"[data] rank {self.rank}: skipped {sum(bad.values())} bad samples "
            f"({', '.join(f'{r}: {n}' for r, n in sorted(bad.items()))}): {note}",
            flush=True,
        )
        if pos.bad > self.max_bad_fraction * total:
            raise shards.DataError(
                f"{self.uri}: rank {self.rank} met {pos.bad} bad samples of its {total} in epoch {pos.epoch} "
                f"({pos.bad / total:.1%}), more than data.max_bad_fraction {self.max_bad_fraction:g}; "
                f"latest: {note}"
            )

    def __iter__(self) -> Iterator[Batch]:
        """Yields (latents (B, *shape) float32, classes (B,) int64, keys, captions) forever, epoch
        after epoch. shape is (C, h, w) for images and (C, T, h, w) for videos, one bucket per
        batch; a sample without a caption gets "" (the text encoder's unconditional input)."""
        while True:
            pos = self._position
            n = self.batches_per_epoch(pos.epoch)
            stream = self._batches(pos.epoch, pos.batch)
            while pos.batch < n:
                batch, bad, note = next(stream)
                if bad:
                    self._count(pos, bad, note)
                x = torch.from_numpy(np.stack([s["_x"] for s in batch]))
                y = torch.tensor([s["_y"] for s in batch], dtype=torch.long)
                pos.batch += 1
                captions = [_text(s.get("txt")) for s in batch]
                yield x, y, [s["__key__"] for s in batch], captions
            stream.close()
            self._position = Position(pos.epoch + 1, 0, self.world, self.batch_size, 0, pos.skipped)


def skipped_metrics(counts: list[float]) -> dict[str, float]:
    """`skipped_counts()` (summed over ranks) → `train_data/skipped` and `train_data/skipped/<reason>` (the
    reasons met so far only)."""
    out = {"train_data/skipped": float(counts[0])}
    out.update({f"train_data/skipped/{r}": float(v) for r, v in zip(REASONS, counts[1:]) if v})
    return out


def _check(s: dict, shape: list[int] | tuple[int, ...] | None) -> str | None:
    """Why sample `s` cannot be trained on (one of REASONS), or None; keeps the decoded latent
    and class in s["_x"], s["_y"] so the training thread does not decode again."""
    if "latent.npy" not in s or "cls" not in s:
        return "missing_key"
    try:
        x = shards.npy_load(s["latent.npy"])
    except Exception:  # any failure to parse untrusted bytes is this sample's problem, not the run's
        return "unreadable_latent"
    if x.dtype.kind not in "fiu":
        return "unreadable_latent"
    if x.ndim == 4 and x.shape[1] == 0:
        return "zero_frames"  # (C, T, h, w) with T = 0: a video with no frames
    if shape is not None and tuple(x.shape) != tuple(shape):
        return "wrong_shape"  # would not stack with its shard's other samples
    if not np.isfinite(x).all():
        return "nonfinite_latent"
    try:
        s["_y"] = int(s["cls"])
    except ValueError:
        return "bad_class"
    s["_x"] = x
    return None


def _text(raw: bytes | str | None) -> str:
    if raw is None:
        return ""
    return raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)
