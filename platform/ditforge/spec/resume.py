"""Which job-spec fields a continued run may change and which define it: `spec_changes` between
a run's saved spec and a new one, `run_digest` of the defining ones."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import ValidationError

from .job import JobSpec

# Fields that may change when a run is continued (`resume: auto`, `--resume RUN`): how long and how
# fast it trains, where and how often it logs, samples and saves, and on how many workers. Every
# other field defines the run (model, patch, VAE, data set, objective, seed, precision, EMA, ...):
# a change there is refused, since the checkpoint would be loaded into another experiment.
RESUMABLE = (
    "train.steps",
    "train.lr",
    "train.warmup",
    "train.weight_decay",
    "train.grad_clip",
    "train.resume",
    "train.max_failures",
    "train.max_nonfinite_steps",
    "train.debug_nan_steps",
    "data.batch_size",
    "data.shuffle_buffer",
    "data.max_bad_fraction",
    "data.storage_timeout_s",
    "model.compile",
    "model.attention",
    "model.grad_checkpointing",
    "deepspeed",
    "resources",
    "checkpoint",
    "tracking",
    "sample",
    "eval",
)
# data.shuffle_buffer is no field any more (it was never read), but the saved spec of a run from
# before it went still holds it: listed here, it does not stop that run from resuming.
RUN_DEFINING = ("deepspeed.zero_stage",)  # inside a resumable section, still defining: shards differ per stage


def _flat(d: dict, at: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{at}.{k}" if at else str(k)
        if isinstance(v, dict) and v:
            out |= _flat(v, key)
        else:
            out[key] = v
    return out


def _resumable(field: str) -> bool:
    def under(prefixes: tuple[str, ...]) -> bool:
        return any(field == p or field.startswith(p + ".") for p in prefixes)

    return under(RESUMABLE) and not under(RUN_DEFINING)


def run_fields(spec: dict) -> dict[str, Any]:
    """The run-defining fields of a resolved spec dump, flattened (`model.size` → 'S')."""
    return {k: v for k, v in _flat(spec).items() if not _resumable(k)}


def run_digest(spec: dict) -> str:
    return hashlib.sha256(json.dumps(run_fields(spec), sort_keys=True, default=str).encode()).hexdigest()[:12]


def spec_changes(old: dict, new: dict) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """(run-defining, resumable) fields that differ between two spec dumps: field → (old, new).
    Both are completed with the defaults first, so an older spec that left a field out compares
    by its default."""

    def complete(d: dict) -> dict:
        try:
            return _flat(JobSpec.model_validate(d).model_dump(mode="json"))
        except ValidationError:  # a spec of an older version: compare what it says
            return _flat(d)

    a, b = complete(old), complete(new)
    diff = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
    return ({k: v for k, v in diff.items() if not _resumable(k)}, {k: v for k, v in diff.items() if _resumable(k)})
