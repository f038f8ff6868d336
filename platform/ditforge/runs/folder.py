"""The run folder and its protocol. Every run of a job lives in `<checkpoint.uri>/<run>/`:

    <run>/
      run.json                  run name, MLflow run id, job name (written when the run is created)
      step_XXXXXXXX/            one checkpoint (train/checkpoint.py writes it)
        _ranks/rank_N.json      each rank's upload marker: its files and checksums
        manifest.json           written last, by rank 0: the step is complete once it exists
      _procs/<name>.json        pid, host and Ray node of the driver and of each rank
      STOP                      `ditforge stop` (or Slurm's signal) asks the run to save and leave

This module is the one place that knows those names, and what the CLI, the driver and the workers
do with them: create and name a run, decide what a submission continues (and whether its
checkpoint fits the job's size), ask a run to stop, record its processes. It stands below the
training code (train/checkpoint.py writes the step folders it names) and reaches the object store
through `storage` only, so any fsspec URI works. Registering the final checkpoint as a model, which
stands above the training code, is runs/register.py.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .. import credentials, storage
from ..spec import JobSpec, spec_changes

RUN_INFO = "run.json"
MANIFEST = "manifest.json"
RANKS = "_ranks"
PROCS = "_procs"
STOP = "STOP"


class RunError(Exception):
    """A run or checkpoint a submission names that cannot be used (one line, for the user)."""


# ------------------------------------------------------------------------------ layout


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def join_step(run_uri: str, step: int) -> str:
    return storage.join(run_uri, step_tag(step))


def complete_steps(run_uri: str) -> list[int]:
    """Steps whose folder has a manifest, oldest first."""
    steps = []
    for name in storage.listdir(run_uri):
        if name.startswith("step_") and name[5:].isdigit() and storage.exists(storage.join(run_uri, name, MANIFEST)):
            steps.append(int(name[5:]))
    return sorted(steps)


def all_steps(run_uri: str) -> list[int]:
    return sorted(int(n[5:]) for n in storage.listdir(run_uri) if n.startswith("step_") and n[5:].isdigit())


def resolve(uri: str) -> str:
    """A run folder → its newest complete step folder; a step folder → itself, if complete."""
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    if name.startswith("step_"):
        if not storage.exists(storage.join(uri, MANIFEST)):
            raise FileNotFoundError(f"{uri}: incomplete checkpoint (no {MANIFEST})")
        return uri
    steps = complete_steps(uri)
    if not steps:
        raise FileNotFoundError(f"{uri}: no complete checkpoint")
    return join_step(uri, steps[-1])


def newest_complete(run_uri: str) -> str | None:
    """The newest complete step folder of a run, or None (also when the store cannot be read)."""
    try:
        steps = complete_steps(run_uri)
    except OSError:
        return None
    return join_step(run_uri, steps[-1]) if steps else None


def discard_after(run_uri: str, step: int) -> list[int]:
    """Rank 0, on (re)start, before any save: remove step folders newer than the one resumed
    from. They are incomplete (left by a killed attempt), and a stale `_ranks/` marker in one
    would let the manifest of the same step, saved again, be written before that rank's new
    upload is done."""
    stale = [s for s in all_steps(run_uri) if s > step]
    for s in stale:
        storage.remove(join_step(run_uri, s))
    return stale


def read_info(run_uri: str) -> dict:
    """The run's run.json (FileNotFoundError: no run there)."""
    return json.loads(storage.read_bytes(storage.join(run_uri, RUN_INFO)))


# ------------------------------------------------------------------------------ creating a run


def resolve_paths(spec: JobSpec) -> JobSpec:
    """Relative `file://` URIs are relative to where the user ran the CLI, not to the worker's cwd."""
    spec = spec.model_copy(deep=True)
    spec.data.train = storage.absolute(spec.data.train)
    for m in spec.data.mix:
        m.train = storage.absolute(m.train)
    spec.checkpoint.uri = storage.absolute(spec.checkpoint.uri)
    if spec.vae.kind == "own" and spec.vae.path:
        spec.vae.path = storage.absolute(spec.vae.path)
    if spec.model.init_from:
        spec.model.init_from = str(Path(spec.model.init_from.removeprefix("file://")).expanduser().resolve())
    return spec


def new_run(
    spec: JobSpec, tracking_uri: str, source: str | None = None, resumed_from: str | None = None
) -> tuple[str, str, str]:
    """Name a run, open its MLflow run and write its run.json; returns (name, run URI, MLflow run id)."""
    from ..train import tracking

    run_name = f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    run_uri = storage.join(spec.checkpoint.uri, run_name)
    mlflow_run_id = tracking.create_run(tracking_uri, spec, run_name, source, resumed_from=resumed_from)
    storage.write_bytes(
        storage.join(run_uri, RUN_INFO),
        json.dumps({"run_name": run_name, "mlflow_run_id": mlflow_run_id, "job": spec.name}).encode(),
    )
    return run_name, run_uri, mlflow_run_id


# ------------------------------------------------------------------------------ what a submission continues


@dataclass
class Continuation:
    """What a submission continues: a run of this job (by name), or a checkpoint a new run starts
    from (`train.resume: URI`), or neither (a fresh run)."""

    run_name: str | None = None
    run_uri: str | None = None
    info: dict = field(default_factory=dict)  # the run's run.json
    steps: list[int] = field(default_factory=list)  # its complete checkpoints
    resume_from: str | None = None
    how: str = "--resume"

    @property
    def newest(self) -> str | None:
        return join_step(self.run_uri, self.steps[-1]) if self.run_uri and self.steps else None


def latest_unfinished(spec: JobSpec) -> str | None:
    """`resume: auto`: the newest run of this job whose newest complete checkpoint is short of
    `train.steps` (a run that was killed or preempted), or None."""
    runs = [n for n in storage.listdir(spec.checkpoint.uri) if n.startswith(f"{spec.name}-")]
    for name in sorted(runs, reverse=True):  # names carry a timestamp: newest first
        steps = complete_steps(storage.join(spec.checkpoint.uri, name))
        if steps and steps[-1] < spec.train.steps:
            return name
    return None


class ReshardError(RunError):
    """A checkpoint that cannot be resumed at the asked world size / ZeRO stage (one line)."""


def reshard_plan(step_uri: str, manifest: dict, world: int, zero_stage: int) -> bool:
    """True when loading `manifest`'s checkpoint with `world` ranks needs a reshard (train/reshard.py
    does it); raises ReshardError naming the checkpoint when it cannot be done. What this needs
    from the manifest: `world_size` (is a reshard needed) and `zero_stage` (the files' layout)."""
    saved_stage = manifest.get("zero_stage")
    saved_world = manifest.get("world_size")
    if saved_world is None:
        raise ReshardError(
            f"{step_uri}: its manifest.json has no world_size: cannot tell whether it needs "
            f"resharding for {world} workers"
        )
    if saved_stage is not None and saved_stage != zero_stage:
        raise ReshardError(
            f"{step_uri}: saved with ZeRO-{saved_stage}, the job asks for ZeRO-{zero_stage}: resume "
            f"it with deepspeed.zero_stage: {saved_stage}"
        )
    if saved_world == world:
        return False
    if manifest.get("adapters_only"):
        raise ReshardError(
            f"{step_uri}: LoRA adapters saved by {saved_world} workers resume with the same number: "
            f"resources.workers={saved_world}"
        )
    if saved_stage is None:
        raise ReshardError(
            f"{step_uri}: saved with {saved_world} workers, but its manifest.json has no zero_stage "
            f"(written before ditforge could reshard): resume it with resources.workers={saved_world}"
        )
    return saved_stage > 0


def check_reshard(step_uri: str, spec: JobSpec, what: str) -> None:
    """Before anything is submitted: can this checkpoint be resumed with the job's workers and stage?"""
    try:
        manifest = json.loads(storage.read_bytes(storage.join(step_uri, MANIFEST)))
        reshard_plan(step_uri, manifest, spec.resources.workers, spec.deepspeed.zero_stage)
    except ReshardError as e:
        raise RunError(f"{what}: {e}") from None
    except (ValueError, KeyError) as e:  # a manifest that is not JSON
        raise RunError(f"{what}: {step_uri}/{MANIFEST}: unreadable ({e})") from None


def continuation(spec: JobSpec, resume: str | None) -> Continuation:
    """Resolve `--resume NAME` (wins) or `train.resume` (auto, never, or a checkpoint URI) for a
    spec whose paths are resolved. A checkpoint to start from is checked against the job's workers
    and stage here; a run to continue, by the caller, after its spec (see `check_resume`)."""
    how = "--resume"
    if resume is None and spec.train.resume == "auto":
        resume, how = latest_unfinished(spec), "train.resume: auto"
    elif resume is None and spec.train.resume != "never":
        try:
            start = resolve(storage.absolute(spec.train.resume))
        except FileNotFoundError as e:
            raise RunError(f"train.resume: {e}") from None
        check_reshard(start, spec, "train.resume")  # before the job is submitted: one line, not a worker error
        return Continuation(resume_from=start)
    if not resume:
        return Continuation()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", resume) or ".." in resume:  # a name, not a path
        raise RunError(f"--resume {resume}: a run name (letters, digits, '_', '.', '-'), not a path")
    run_uri = storage.join(spec.checkpoint.uri, resume)
    try:
        info = read_info(run_uri)
    except FileNotFoundError:
        raise RunError(f"--resume {resume}: no run named '{resume}' under {spec.checkpoint.uri}") from None
    return Continuation(resume, run_uri, info, complete_steps(run_uri), how=how)


def saved_spec(run_uri: str, steps: list[int]) -> dict | None:
    """The spec a run was trained with: its newest complete checkpoint's spec.yaml."""
    for step in reversed(steps):
        try:
            return yaml.safe_load(storage.read_bytes(storage.join(join_step(run_uri, step), "spec.yaml")))
        except FileNotFoundError:
            continue
    return None


def _show(v: Any) -> str:
    return json.dumps(v) if not isinstance(v, str) else v


def check_resume(
    spec: JobSpec, run_name: str, run_uri: str, steps: list[int], how: str, source: str, force: bool
) -> dict[str, str]:
    """A run is continued only with the spec that defines it. Returns the MLflow tags that record
    what changed (fields allowed to change, or forced); refuses a changed run-defining field."""
    saved = saved_spec(run_uri, steps)
    if saved is None:
        return {}
    defining, allowed = spec_changes(saved, spec.model_dump(mode="json"))
    if defining and not force:
        fields = ", ".join(f"{k} ({_show(a)} → {_show(b)})" for k, (a, b) in defining.items())
        raise RunError(
            f"{source}: {how} would continue run {run_name} (step {steps[-1]}), but the spec that "
            f"defines it changed: {fields}; start a fresh run with --set train.resume=never, or "
            f"continue it anyway with --force-resume"
        )
    tags = {
        f"ditforge.resume_changed.{k}": credentials.redact(f"{_show(a)} → {_show(b)}")[:500]
        for k, (a, b) in {**allowed, **defining}.items()
    }
    if defining:
        tags["ditforge.resume_forced"] = ", ".join(defining)[:500]
    return tags


# ------------------------------------------------------------------------------ stopping, processes


def request_stop(run_uri: str, by: str = "ditforge stop") -> None:
    """Ask the run to save a checkpoint and leave; rank 0 looks for the marker on logging steps."""
    storage.write_bytes(storage.join(run_uri, STOP), json.dumps({"requested_at": time.time(), "by": by}).encode())


def stop_marked(run_uri: str, attempts: int = 5) -> bool:
    return storage.exists(storage.join(run_uri, STOP), attempts=attempts)


def clear_stop(run_uri: str) -> None:
    """A continuation starts: the stop that ended the previous attempt is done."""
    storage.remove(storage.join(run_uri, STOP))


def record_process(run_uri: str, name: str) -> None:
    """`<run>/_procs/<name>.json`: this process's pid, host and Ray node, rewritten on every
    (re)start. What operators (and the fault tests) read to find, signal or kill a run's driver
    and workers without asking Ray."""
    import ray

    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "ip": ray.util.get_node_ip_address(),  # host names can all resolve to 127.0.0.1
        "node_id": ray.get_runtime_context().get_node_id(),
        "started": time.time(),
    }
    storage.write_bytes(storage.join(run_uri, PROCS, f"{name}.json"), json.dumps(info).encode())


def read_process(run_uri: str, name: str) -> dict:
    return json.loads(storage.read_bytes(storage.join(run_uri, PROCS, f"{name}.json")))
