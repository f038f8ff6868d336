"""Checkpoints on any fsspec URI: `<checkpoint.uri>/<run>/step_XXXXXXXX/`.

Every rank saves its DeepSpeed shard to local disk and uploads its own files (no shared file
system needed across nodes); rank 0 then writes `manifest.json` with every file's size and
checksum. The manifest is written last: a step folder without one is incomplete and never loaded.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from .. import storage

MANIFEST = "manifest.json"


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def complete_steps(run_uri: str) -> list[int]:
    """Steps whose folder has a manifest, oldest first."""
    steps = []
    for name in storage.listdir(run_uri):
        if name.startswith("step_") and name[5:].isdigit() and storage.exists(storage.join(run_uri, name, MANIFEST)):
            steps.append(int(name[5:]))
    return sorted(steps)


def save(engine, run_uri: str, step: int, client_state: dict, keep_last: int) -> str:
    """Collective: every rank calls it. Returns the step folder's URI."""
    rank = dist.get_rank()
    tag = step_tag(step)
    dest = storage.join(run_uri, tag)
    local_root = Path(tempfile.mkdtemp(prefix=f"ditforge-ckpt-r{rank}-"))
    try:
        engine.save_checkpoint(str(local_root), tag=tag, client_state=client_state)
        files = {}
        for f in sorted((local_root / tag).rglob("*")):
            if f.is_file():
                rel = f.relative_to(local_root / tag).as_posix()
                storage.put_file(f, storage.join(dest, rel))
                files[rel] = {"bytes": f.stat().st_size, "sha256": storage.sha256_file(f), "rank": rank}
    finally:
        shutil.rmtree(local_root, ignore_errors=True)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, files)  # also the barrier: every rank's upload is done here
    if rank == 0:
        manifest = {"step": step, "tag": tag, "world_size": dist.get_world_size(), "files": {}}
        for part in gathered:
            manifest["files"].update(part)
        storage.write_bytes(storage.join(dest, MANIFEST), json.dumps(manifest, indent=2).encode())
        # Retention: drop older complete checkpoints only now that a newer one is complete.
        for old in complete_steps(run_uri)[:-keep_last]:
            storage.remove(storage.join(run_uri, step_tag(old)))
    dist.barrier()
    return dest


def load(engine, run_uri: str, step: int) -> dict:
    """Collective. Downloads the step folder (checked against its manifest) and loads it into the
    engine; returns the client state saved with it."""
    tag = step_tag(step)
    src = storage.join(run_uri, tag)
    manifest = json.loads(storage.read_bytes(storage.join(src, MANIFEST)))
    local_root = Path(tempfile.mkdtemp(prefix="ditforge-resume-"))
    try:
        for rel, meta in manifest["files"].items():
            local = local_root / tag / rel
            storage.get_file(storage.join(src, rel), local)
            if storage.sha256_file(local) != meta["sha256"]:
                raise RuntimeError(f"{src}/{rel}: checksum does not match the checkpoint manifest")
        path, client_state = engine.load_checkpoint(str(local_root), tag=tag)
        if path is None:
            raise RuntimeError(f"{src}: DeepSpeed could not load this checkpoint")
    finally:
        shutil.rmtree(local_root, ignore_errors=True)
    return client_state


def stop_requested(run_uri: str, device: torch.device) -> bool:
    """Collective: has `ditforge stop` left a STOP marker in the run folder? Rank 0 looks (one
    object-store request) and tells the others, so every rank leaves the loop at the same step."""
    flag = torch.zeros(1, device=device)  # on the device: NCCL broadcasts only GPU tensors
    if dist.get_rank() == 0:
        try:
            flag[0] = float(storage.exists(storage.join(run_uri, "STOP")))
        except OSError:
            pass  # storage blip: look again at the next logging step
    dist.broadcast(flag, src=0)
    return bool(flag.item())
