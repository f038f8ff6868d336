"""Batches onto the device one step ahead (the Apex / timm "prefetcher").

On a GPU, batch k+1 is pinned and copied on a side stream while step k runs, so the step never
waits for a host-to-device copy. The loader's position moves when a batch is *read*, one batch
ahead of the step: checkpoints take `position` from here, the position after the batch the step
actually used, so a resumed run still yields exactly the batches an uninterrupted one would.
On CPU it only converts dtypes: there is nothing to overlap.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from .loader import Batch, Position
    from .mix import MixPosition


class BatchSource(Protocol):
    """What the prefetcher reads: a `LatentLoader`, a `MixedLoader` (or a test's stand-in)."""

    @property
    def position(self) -> Position | MixPosition: ...

    def __iter__(self) -> Iterator[Batch]: ...


class DevicePrefetcher:
    def __init__(self, loader: BatchSource, device: torch.device, dtype: torch.dtype = torch.float32):
        self.loader, self.device, self.dtype = loader, device, dtype
        self.position = copy.deepcopy(loader.position)  # after the last batch handed out
        self._it = iter(loader)
        self._cuda = device.type == "cuda"
        self._stream = torch.cuda.Stream(device) if self._cuda else None
        self._next = self._fetch() if self._cuda else None

    def _fetch(self) -> tuple[Batch, Position | MixPosition]:
        x, y, keys, captions = next(self._it)
        pos = copy.deepcopy(self.loader.position)
        with torch.cuda.stream(self._stream):
            x = x.pin_memory().to(self.device, non_blocking=True).to(self.dtype)
            y = y.pin_memory().to(self.device, non_blocking=True)
        return (x, y, keys, captions), pos

    def __iter__(self) -> DevicePrefetcher:
        return self

    def __next__(self) -> Batch:
        if not self._cuda:
            x, y, keys, captions = next(self._it)
            self.position = copy.deepcopy(self.loader.position)
            return (x.to(self.dtype), y, keys, captions)
        assert self._next is not None and self._stream is not None  # the GPU path fetches ahead on its stream
        (x, y, keys, captions), pos = self._next
        torch.cuda.current_stream(self.device).wait_stream(self._stream)
        # The tensors were made on the side stream: tell the allocator the main stream uses them.
        x.record_stream(torch.cuda.current_stream(self.device))
        y.record_stream(torch.cuda.current_stream(self.device))
        self.position = pos
        self._next = self._fetch()
        return (x, y, keys, captions)
