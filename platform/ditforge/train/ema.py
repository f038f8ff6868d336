"""Exponential moving average of the weights, which sampling and export use.

Under ZeRO-3 a rank holds only a slice of every weight (`param.ds_tensor`), so each rank averages
its own slice: no gather per step, memory divided by the world size like the weights themselves.
`swapped_in()` writes the averages into those slices, and a `GatheredParameters` context opened
inside it then sees full EMA weights on every rank. Without ZeRO-3 (stages 0-2) every rank holds
full weights; in fp32 it keeps a full, identical average, in bf16 its fragments (below).

What is averaged (`EMA.source`): the optimizer's fp32 master weights wherever they exist, never
the bf16 compute copy. Under ZeRO-3, each rank's fp32 master slices. Under stages 0-2 in bf16 (or
fp16), DeepSpeed keeps the masters in flat buffers cut across the ranks, and each weight's piece
on this rank is `param._hp_mapping.hp_fragment` (a contiguous run of the flattened weight, maybe
empty). Each rank averages its own fragments: no collective per step, 1/world of the memory.
Sampling and export join the fragments (one all-reduce per weight). In fp32 runs the masters are
the weights, so stages 0-2 average the weights, whole and identical on every rank.

The decay warms up as min(decay, (1 + n)/(10 + n)) after n updates (as in timm / TF's EMA), so a
short run's average is not dominated by its random initial weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn


def _partitioned(p: nn.Parameter) -> bool:
    return hasattr(p, "ds_tensor") and not getattr(p, "ds_persist", False)


def _ds_tensor(p: nn.Parameter) -> torch.Tensor:
    """ZeRO-3's partition of a parameter: an attribute DeepSpeed adds, which torch's types do not know."""
    return getattr(p, "ds_tensor")


def _local(p: nn.Parameter) -> torch.Tensor:
    """The part of a parameter this rank owns: its ZeRO-3 partition, or the whole tensor. ZeRO-3
    keeps small parameters (under `stage3_param_persistence_threshold`) whole on every rank
    (`ds_persist`); those are averaged whole, like without ZeRO-3."""
    return _ds_tensor(p) if _partitioned(p) else p.data


def _fragment(p: nn.Parameter) -> torch.Tensor:
    """This rank's piece of a weight's fp32 master under ZeRO 0-2 with a bf16 / fp16 optimizer
    (a 1-D view into DeepSpeed's flat buffer, updated in place by each step); empty if none."""
    hp = getattr(p, "_hp_mapping", None)
    return hp.hp_fragment if hp is not None else p.data.new_zeros(0, dtype=torch.float32)


def _fragment_start(p: nn.Parameter) -> int:
    hp = getattr(p, "_hp_mapping", None)
    return int(hp.lp_fragment_address.start) if hp is not None else 0


@contextmanager
def _values_in(params: dict[str, nn.Parameter], values: dict[str, torch.Tensor]) -> Iterator[None]:
    """Within the block each parameter's data holds `values[name]` (cast to its dtype); the raw
    data is put back on exit. Each value is dropped once copied in (a joined full copy need not
    outlive the swap)."""
    raw = {n: p.data.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            p.data.copy_(values.pop(n).view_as(p))
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.data.copy_(raw[n])


def _master(p: nn.Parameter) -> torch.Tensor:
    """ZeRO-3's fp32 master slice of a partitioned weight (same cut as `p.ds_tensor`)."""
    from deepspeed.utils import safe_get_local_fp32_param

    return safe_get_local_fp32_param(p)


class EMA:
    def __init__(self, model: nn.Module, decay: float, optimizer: Any = None) -> None:
        self.decay = decay
        self.num_updates = 0
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.partitioned = any(hasattr(p, "ds_tensor") and not getattr(p, "ds_persist", False) for p in params.values())
        # ZeRO-3's optimizer keeps fp32 masters of each rank's slices: average those.
        self.masters = self.partitioned and hasattr(getattr(optimizer, "fp32_partitioned_groups_flat", None), "__len__")
        # ZeRO 0-2 training low-precision weights: DeepSpeed links each to its fp32 master fragment.
        self.fragments = (
            not self.partitioned
            and any(hasattr(p, "_hp_mapping") for p in params.values())
            and any(params[n].dtype != torch.float32 for n in self.names)
        )
        self.source = (
            "fp32 master weights (ZeRO-3 optimizer slices)"
            if self.masters
            else "fp32 master weights (ZeRO 0-2 fragments per rank)"
            if self.fragments
            else "weights as fp32" + (" (ZeRO-3 slices)" if self.partitioned else "")
        )
        self.shadow = {n: self._initial(params[n]) for n in self.names}  # fp32 averages

    def _read(self, p: nn.Parameter) -> torch.Tensor:
        if self.fragments:
            return _fragment(p)
        return _master(p) if self.masters and _partitioned(p) else _local(p)

    def _initial(self, p: nn.Parameter) -> torch.Tensor:
        # A ZeRO-3 persistent parameter is whole on every rank, but only once a forward has fetched
        # it: right after deepspeed.initialize its data may still be empty, so gather it (collective).
        if hasattr(p, "ds_tensor") and getattr(p, "ds_persist", False) and p.data.numel() != getattr(p, "ds_numel"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                return p.data.detach().float().clone()
        return self._read(p).detach().float().clone()

    def _params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        params = dict(model.named_parameters())
        return {n: params[n] for n in self.names}

    @torch.no_grad()
    def update(self, model: nn.Module, keep: torch.Tensor | None = None) -> None:
        """After each optimizer step. `model` is the engine's module (not the engine). `keep`: a 0-d
        device tensor, 0 for a skipped step (non-finite loss): the averages stay as they are, with
        no host sync to find out."""
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        shadow, read = zip(
            *((self.shadow[n], self._read(p)) for n, p in self._params(model).items() if self.shadow[n].numel())
        )  # a rank may hold no fragment of a weight
        local = [t if t.dtype == torch.float32 else t.float() for t in read]
        # One multi-tensor kernel rather than one launch per parameter (hundreds at DiT-XL).
        if keep is None:
            torch._foreach_lerp_(list(shadow), local, 1 - d)
        else:  # a device tensor weight: no host sync to learn whether the step was skipped
            w = keep * (1 - d)
            torch._foreach_lerp_(list(shadow), local, [w] * len(local))

    @contextmanager
    def swapped_in(self, model: nn.Module, gather: bool = False) -> Iterator[nn.Module]:
        """Within the block the model's weights are the EMA ones; restored on exit. gather=True
        (collective) also gathers ZeRO-3 weights, so every rank sees the full EMA weights."""
        import deepspeed

        params = self._params(model)
        if self.fragments:  # collective: every rank's fragments joined into full weights
            with _values_in(params, self._joined(params)):
                yield model
            return
        parts = {n: p for n, p in params.items() if _partitioned(p)}
        # Partitioned weights: write the averaged slices into the partitions, then gather.
        backup = {n: _ds_tensor(p).detach().clone() for n, p in parts.items()}
        with torch.no_grad():
            for n, p in parts.items():
                _ds_tensor(p).copy_(self.shadow[n])
        zero3 = any(hasattr(p, "ds_tensor") for p in params.values())
        gathered = (
            deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
            if gather and zero3
            else contextlib.nullcontext()
        )
        try:
            with gathered:
                # Whole weights (no ZeRO-3, or ZeRO-3 persistent ones, fetched by the gather): swap
                # in place, and put the raw values back before the gather releases them.
                whole = {n: p for n, p in params.items() if n not in parts and p.data.numel() == self.shadow[n].numel()}
                with _values_in(whole, {n: self.shadow[n] for n in whole}):
                    yield model
        finally:
            with torch.no_grad():
                for n, p in parts.items():
                    _ds_tensor(p).copy_(backup[n])

    def _joined(self, params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
        """Full fp32 EMA weights from every rank's fragments: each rank puts its own in a zero
        tensor and an all-reduce sums them (the fragments do not overlap). Collective."""
        import torch.distributed as dist

        full = {}
        for n, p in params.items():
            t = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
            start = _fragment_start(p)
            t[start : start + self.shadow[n].numel()] = self.shadow[n]
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(t)
            full[n] = t.view(p.shape)
        return full

    # Checkpoints. Under ZeRO-3 each rank writes its own slices (`ema_rank_N.safetensors`, plus
    # rank 0's `ema_layout.json`): no gather of the whole model and no full fp32 copy on every
    # rank at each save. `consolidate_shards` joins them into `ema.safetensors` at export time.
    def shard_files(
        self, model: nn.Module, rank: int, world: int
    ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, bytes]]:
        """→ (tensors, files) this rank adds to a checkpoint. Not collective."""
        import json

        files = {}
        if self.fragments:  # each rank its own fragments, and where each starts in its weight
            params = self._params(model)
            own = {n: t for n, t in self.shadow.items() if t.numel()}
            files[fragment_name(rank)] = json.dumps({n: _fragment_start(params[n]) for n in own}).encode()
            if rank == 0:
                layout = {n: {"shape": list(p.shape), "fragments": True} for n, p in params.items()}
                files[SHARD_LAYOUT] = json.dumps({"world": world, "params": layout}).encode()
            return {shard_name(rank): own}, files
        if not self.partitioned:  # every rank holds the same full average: rank 0 writes it
            return ({"ema.safetensors": self.shadow} if rank == 0 else {}), {}
        if rank == 0:
            params = self._params(model)
            layout = {
                n: {"shape": list(getattr(p, "ds_shape", p.shape)), "partitioned": _partitioned(p)}
                for n, p in params.items()
            }
            files[SHARD_LAYOUT] = json.dumps({"world": world, "params": layout}).encode()
        return {shard_name(rank): self.shadow}, files

    def load_shards(self, model: nn.Module, folder: Path, num_updates: int) -> bool:
        """Resume from a checkpoint's EMA, whichever way it was written; False if it has none."""
        import json

        import torch.distributed as dist
        from safetensors.torch import load_file

        rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        if (folder / "ema.safetensors").exists():
            self.load_full_state_dict(model, load_file(str(folder / "ema.safetensors")), num_updates)
            return True
        if not (folder / SHARD_LAYOUT).exists():
            return False
        meta = json.loads((folder / SHARD_LAYOUT).read_text())
        saved_fragments = any(i.get("fragments") for i in meta["params"].values())
        same_cut = meta["world"] == world and (
            (self.partitioned and not saved_fragments)
            or (
                self.fragments
                and saved_fragments
                and json.loads((folder / fragment_name(rank)).read_text())
                == {n: _fragment_start(p) for n, p in self._params(model).items() if self.shadow[n].numel()}
            )
        )
        if same_cut:  # this rank's own slices or fragments, as it saved them
            own = load_file(str(folder / shard_name(rank)))
            for n in self.names:
                if self.shadow[n].numel():
                    self.shadow[n].copy_(own[n])
            self.num_updates = num_updates
        else:  # another world size or ZeRO stage: join, then cut again
            self.load_full_state_dict(model, consolidate_shards(folder), num_updates)
        return True

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Collective under ZeRO-3 and with fragments (every rank calls it): full EMA weights, e.g. for export."""
        if self.fragments:
            return self._joined(self._params(model))
        with self.swapped_in(model, gather=True):
            return {n: p.detach().float().clone() for n, p in self._params(model).items()}

    @torch.no_grad()
    def load_full_state_dict(self, model: nn.Module, full: dict[str, torch.Tensor], num_updates: int) -> None:
        """Resume from full EMA weights (what checkpoints store, as `ema.safetensors`): each rank
        keeps its own ZeRO-3 slice, cut the way ZeRO-3 cuts the weight (flattened, equal padded
        parts in rank order), so a resume may use another world size."""
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
        for n, p in self._params(model).items():
            t = full[n].float()
            if self.fragments:  # this rank's fragment: its run of the flattened weight
                start = _fragment_start(p)
                self.shadow[n].copy_(t.flatten()[start : start + self.shadow[n].numel()])
                continue
            if hasattr(p, "ds_tensor") and not getattr(p, "ds_persist", False):
                part = self.shadow[n].numel()
                flat = t.flatten()[rank * part : (rank + 1) * part]
                t = torch.cat([flat, flat.new_zeros(part - flat.numel())])
            self.shadow[n].copy_(t.view_as(self.shadow[n]))
        self.num_updates = num_updates

    # Resume state of this rank (under ZeRO-3: its slices).
    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "num_updates": self.num_updates,
            "partitioned": self.partitioned,
            "fragments": self.fragments,
            "shadow": {n: t.clone() for n, t in self.shadow.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["partitioned"] != self.partitioned or state.get("fragments", False) != self.fragments:
            raise RuntimeError("EMA state was saved with a different ZeRO stage or precision (slices, fragments, full)")
        for n, t in state["shadow"].items():
            if t.shape != self.shadow[n].shape:
                raise RuntimeError(
                    f"EMA state for {n}: shape {tuple(t.shape)} != {tuple(self.shadow[n].shape)} "
                    "(saved at another world size under ZeRO-3?)"
                )
            self.shadow[n].copy_(t)
        self.decay, self.num_updates = state["decay"], state["num_updates"]


SHARD_LAYOUT = "ema_layout.json"


def shard_name(rank: int) -> str:
    return f"ema_rank_{rank}.safetensors"


def fragment_name(rank: int) -> str:
    """Where each of rank's fragments starts in its flattened weight (ZeRO 0-2, bf16 / fp16)."""
    return f"ema_rank_{rank}.json"


def consolidate_shards(folder: Path) -> dict[str, torch.Tensor]:
    """Full EMA weights from a step folder's per-rank slices (read one rank at a time). A ZeRO-3
    slice is a flat, padded 1/world part of the weight in rank order."""
    import json
    import math

    from safetensors import safe_open

    meta = json.loads((folder / SHARD_LAYOUT).read_text())
    if any(i.get("fragments") for i in meta["params"].values()):  # ZeRO 0-2 fp32 master fragments
        full = {n: torch.zeros(math.prod(i["shape"])) for n, i in meta["params"].items()}
        for r in range(meta["world"]):
            starts = json.loads((folder / fragment_name(r)).read_text())
            with safe_open(str(folder / shard_name(r)), "pt") as f:
                for n, start in starts.items():
                    t = f.get_tensor(n).float()
                    full[n][start : start + t.numel()] = t
        return {n: t.reshape(meta["params"][n]["shape"]).contiguous() for n, t in full.items()}
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in meta["params"]}
    for r in range(meta["world"]):
        with safe_open(str(folder / shard_name(r)), "pt") as f:
            for n, info in meta["params"].items():
                if info["partitioned"] or r == 0:
                    parts[n].append(f.get_tensor(n))
    out = {}
    for n, info in meta["params"].items():
        shape = info["shape"]
        flat = torch.cat([t.flatten() for t in parts[n]])[: math.prod(shape)] if info["partitioned"] else parts[n][0]
        out[n] = flat.reshape(shape).float().contiguous()
    return out
