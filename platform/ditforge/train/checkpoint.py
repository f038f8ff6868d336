"""Checkpoints on any fsspec URI: `<checkpoint.uri>/<run>/step_XXXXXXXX/`.

Saving is asynchronous. The training loop waits only for DeepSpeed to write this rank's shard to
local disk; a background thread then uploads it (with retries) and writes a per-rank marker
`_ranks/rank_N.json` listing the files and checksums. Rank 0's thread waits for every rank's
marker and writes `manifest.json` last. A step folder without a manifest is incomplete: never
loaded, and removed once a newer checkpoint is complete. No collective op runs in the background
(gloo collectives from two threads would interleave), so ranks coordinate through storage.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from .. import storage
from ..runs.folder import MANIFEST, RANKS, reshard_plan, all_steps, complete_steps, step_tag, stop_marked

if TYPE_CHECKING:
    from .engine import Engine

# torch.distributed's collective timeout in the workers by default (resources.collective_timeout_s;
# the driver passes it to TorchConfig). Every wait below that other ranks may sit in a collective
# through is bounded well under the job's.
PG_TIMEOUT_S = 1800.0
PG_MARGIN_S = 120.0


class FinalCheckpointFailed(RuntimeError):
    """The last save of a run could not be completed before `checkpoint.final_timeout_s`."""


@dataclass
class UploadStats:
    step: int
    bytes: int = 0
    upload_s: float = 0.0
    ok: bool = False  # this rank's part is uploaded and, on rank 0, the manifest is written
    error: str | None = None
    complete: bool = False  # rank 0: the manifest is written
    attempts: int = 0


@dataclass
class Checkpointer:
    run_uri: str
    rank: int
    world: int
    keep_last: int = 3
    keep_every: int = 0
    manifest_timeout_s: float = 600.0
    on_done: Callable[[UploadStats], None] | None = None  # callback(UploadStats), called from the upload thread
    final_timeout_s: float = 900.0  # the last save of a run retries with backoff this long
    retry_backoff_s: float = 2.0  # its first wait, doubling up to a minute
    collective_timeout_s: float = PG_TIMEOUT_S  # what the other ranks wait in a collective at most
    # train.lora: the model's frozen weights (the imported base) stay out of every save; the
    # manifest says so, and a load then takes the saved tensors into the rebuilt model non-strictly
    adapters_only: bool = False
    _thread: threading.Thread | None = field(default=None, repr=False)
    _stats: UploadStats | None = field(default=None, repr=False)
    _deadline: float = field(default=0.0, repr=False)
    _own_done: threading.Event = field(default_factory=threading.Event, repr=False)
    _peers_done: threading.Event = field(default_factory=threading.Event, repr=False)
    _zero_stage: int | None = field(default=None, repr=False)
    history: list[UploadStats] = field(default_factory=list)

    # ------------------------------------------------------------------------------- saving

    def save(
        self,
        engine: Engine,
        step: int,
        client_state: dict[str, Any],
        *,
        files: dict[str, bytes] | None = None,
        tensors: dict[str, dict[str, torch.Tensor]] | None = None,
        rank_state: dict[str, Any] | None = None,
        final: bool = False,
    ) -> float:
        """Collective (DeepSpeed's save is). Returns the seconds the training loop was stalled.

        `files`: extra small files (name → bytes) this rank adds, e.g. the resolved spec.
        `tensors`: extra tensor dicts this rank adds as safetensors, e.g. EMA weights, RNG state.
        `rank_state`: this rank's own resume state (its data position): DeepSpeed keeps
        `client_state` only in rank 0's file under ZeRO 0-2, so each rank writes its own.
        `final`: the run's last save, which has no next save to fall back on: its upload retries
        with backoff until `final_timeout_s` instead of failing at the first outage.
        """
        t0 = time.perf_counter()
        self.wait()  # at most one upload in flight
        tag = step_tag(step)
        self._own_done, self._peers_done = threading.Event(), threading.Event()
        local_root = Path(tempfile.mkdtemp(prefix=f"ditforge-ckpt-r{self.rank}-"))
        self._zero_stage = engine.zero_optimization_stage()  # the files' layout: what a reshard needs
        frozen = {"exclude_frozen_parameters": True} if self.adapters_only else {}
        engine.save_checkpoint(str(local_root), tag=tag, client_state=client_state, save_latest=False, **frozen)
        folder = local_root / tag
        for name, data in (files or {}).items():
            (folder / name).write_bytes(data)
        if rank_state is not None:
            (folder / rank_state_name(self.rank)).parent.mkdir(exist_ok=True)
            (folder / rank_state_name(self.rank)).write_text(json.dumps(rank_state))
        for name, tdict in (tensors or {}).items():
            save_file({k: v.detach().cpu().contiguous() for k, v in tdict.items()}, str(folder / name))
        stall = time.perf_counter() - t0
        self._stats = UploadStats(step)
        deadline = self._deadline = time.monotonic() + (self.final_timeout_s if final else 0.0)
        self._thread = threading.Thread(
            target=self._upload, args=(step, local_root, self._stats, deadline), daemon=True, name=f"ckpt-upload-{step}"
        )
        self._thread.start()
        return stall

    def wait_bound_s(self) -> float:
        """How long a rank may wait for its own upload: the other ranks sit in the barrier that
        follows meanwhile, so this stays under the process-group timeout by construction."""
        return min(max(self.manifest_timeout_s, self.final_timeout_s), self.collective_timeout_s - 2 * PG_MARGIN_S)

    def wait(self) -> UploadStats | None:
        """Collective: finish the upload in flight on every rank; returns its stats (rank 0's
        say whether the checkpoint is complete).

        Each rank first waits for its own files (bounded, see `wait_bound_s`); the barrier then
        proves every rank's upload has ended (well or not), so rank 0 can stop waiting for
        markers that will never come.
        """
        if self._thread is not None and not self._own_done.wait(self.wait_bound_s()):
            print(
                f"[rank {self.rank}] checkpoint upload still running after {self.wait_bound_s():.0f}s: "
                "left incomplete (no manifest)",
                flush=True,
            )
        if self.world > 1:
            dist.barrier()
        # rank 0 may still be writing the manifest; the final save may still be retrying it
        return self._finish(max(PG_MARGIN_S, self._deadline - time.monotonic()))

    def close(self, timeout_s: float = 60.0) -> UploadStats | None:
        """Not collective: for an exit path where other ranks may be gone. Lets the upload in
        flight end within `timeout_s`: it completes, or its step folder stays without a manifest
        (incomplete, never loaded), never a manifest over missing files."""
        if self._thread is None:
            return None
        self._own_done.wait(timeout_s)
        return self._finish(timeout_s)

    def _finish(self, timeout_s: float) -> UploadStats | None:
        if self._thread is None:
            return None
        assert self._stats is not None  # set with the thread, in `save`
        self._peers_done.set()
        self._thread.join(timeout_s)
        # Still running: its manifest, should it come, is still written last, after every file.
        stats = (
            self._stats
            if not self._thread.is_alive()
            else UploadStats(self._stats.step, error="upload still running", attempts=self._stats.attempts)
        )
        self._thread = None
        return stats

    def _upload(self, step: int, local_root: Path, stats: UploadStats, deadline: float) -> None:
        dest = storage.join(self.run_uri, step_tag(step))
        t0 = time.perf_counter()
        files: dict[str, dict[str, Any]] = {}  # uploaded so far: a retry sends only what is missing
        try:
            backoff = self.retry_backoff_s
            while True:
                stats.attempts += 1
                try:
                    self._upload_once(step, local_root, dest, stats, files)
                    break
                except Exception as e:  # the store was down through all of storage's own retries
                    stats.error = f"{type(e).__name__}: {e}"
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise
                    print(
                        f"[rank {self.rank}] final checkpoint {dest}: attempt {stats.attempts} failed "
                        f"({stats.error}); retrying in {min(backoff, left):.0f}s",
                        flush=True,
                    )
                    time.sleep(min(backoff, left))
                    backoff = min(backoff * 2, 60.0)
            stats.error = None
            stats.upload_s = time.perf_counter() - t0
            stats.ok = True  # only now: on rank 0 the manifest is written
            if self.rank == 0:
                try:
                    self._retention()
                except Exception as e:  # housekeeping: the checkpoint itself is complete
                    print(f"[rank 0] checkpoint retention skipped ({type(e).__name__}: {e})", flush=True)
        except Exception as e:
            stats.error = f"{type(e).__name__}: {e}"
            stats.upload_s = time.perf_counter() - t0
            print(
                f"[rank {self.rank}] checkpoint {dest} FAILED ({stats.error}); training continues, "
                "the next save tries again",
                flush=True,
            )
        finally:
            self._own_done.set()
            shutil.rmtree(local_root, ignore_errors=True)
        self.history.append(stats)
        if self.on_done is not None:
            self.on_done(stats)

    def _upload_once(
        self, step: int, local_root: Path, dest: str, stats: UploadStats, files: dict[str, dict[str, Any]]
    ) -> None:
        tag = step_tag(step)
        for f in sorted((local_root / tag).rglob("*")):
            rel = f.relative_to(local_root / tag).as_posix()
            if f.is_file() and rel not in files:
                storage.put_file(f, storage.join(dest, rel))
                files[rel] = {"bytes": f.stat().st_size, "sha256": storage.sha256_file(f), "rank": self.rank}
        stats.bytes = sum(m["bytes"] for m in files.values())
        storage.write_bytes(storage.join(dest, RANKS, f"rank_{self.rank}.json"), json.dumps(files).encode())
        self._own_done.set()  # this rank's part is there: `wait` may go on to its barrier
        if self.rank == 0:  # the others' markers come through storage; the manifest goes last
            self._write_manifest(step, dest)
            stats.complete = True

    def _write_manifest(self, step: int, dest: str) -> None:
        self._final_look = False
        deadline = time.time() + self.manifest_timeout_s
        parts: dict[int, dict[str, Any]] = {}
        while len(parts) < self.world:
            for r in range(self.world):
                if r not in parts:
                    try:
                        parts[r] = json.loads(storage.read_bytes(storage.join(dest, RANKS, f"rank_{r}.json")))
                    except FileNotFoundError:
                        pass
            if len(parts) < self.world:
                missing = sorted(set(range(self.world)) - set(parts))
                if self._peers_done.is_set() and self._final_look:
                    raise RuntimeError(f"ranks {missing} could not upload their shards")
                if self._peers_done.is_set():
                    self._final_look = True  # every rank is done: one more look, then give up
                    continue
                if time.time() > deadline:
                    raise TimeoutError(f"ranks {missing} did not finish uploading in {self.manifest_timeout_s:.0f}s")
                time.sleep(0.3)
        manifest: dict[str, Any] = {
            "step": step,
            "tag": step_tag(step),
            "world_size": self.world,
            "zero_stage": self._zero_stage,
            "adapters_only": self.adapters_only,
            "created": time.time(),
            "files": {},
        }
        for r in range(self.world):
            manifest["files"].update(parts[r])
        storage.write_bytes(storage.join(dest, MANIFEST), json.dumps(manifest, indent=2).encode())

    def _retention(self) -> None:
        """Only after a newer checkpoint is complete: drop old complete ones and stale partial ones."""
        done = complete_steps(self.run_uri)
        keep = set(done[-self.keep_last :])
        if self.keep_every:
            keep |= {s for s in done if s % self.keep_every == 0}
        newest = done[-1]
        for s in all_steps(self.run_uri):
            if s not in keep and s < newest:
                storage.remove(storage.join(self.run_uri, step_tag(s)))


# ------------------------------------------------------------------------------------ loading


class UnsafeCheckpoint(RuntimeError):
    """A checkpoint file would run code when unpickled: refused before anything loads it."""


def _safe_globals() -> list[Any]:
    """The only non-tensor classes DeepSpeed 0.19's own checkpoints hold (its optimizer states)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_torch_load(path: str | Path, mmap: bool = False) -> Any:
    """torch.load that can only build tensors, containers and the allowlisted DeepSpeed classes."""
    with torch.serialization.safe_globals(_safe_globals()):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def check_pickles(folder: Path, where: str) -> None:
    """Refuse a step folder whose `.pt` files hold anything but data.

    DeepSpeed 0.19.8 calls `torch.load(..., weights_only=False)` explicitly (checkpoint engine,
    ZeRO optimizers, zero_to_fp32), so torch's safe default never applies inside it: a crafted
    `*_optim_states.pt` would run code on every worker that resumes. Each file is opened here
    first with `weights_only=True` (memory-mapped: no tensor data is read), which rejects any
    global outside the allowlist without calling it; only then does DeepSpeed see the folder.
    """
    for f in sorted(folder.rglob("*.pt")):
        try:
            safe_torch_load(f, mmap=True)
        except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, OSError) as e:
            # torch's message is a paragraph; the line naming the global is the useful one
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            reason = next(
                (ln.split("error: ", 1)[-1] for ln in lines if "global" in ln.lower()),
                f"{type(e).__name__}: {lines[0] if lines else ''}",
            )
            raise UnsafeCheckpoint(
                f"{where}/{f.relative_to(folder).as_posix()}: refused to load: not a plain "
                f"tensor checkpoint ({reason.strip()})"
            ) from None


def download(step_uri: str, local_root: Path) -> tuple[Path, dict[str, Any]]:
    """Fetch a complete step folder, verifying every file against the manifest and refusing
    pickles that are more than tensors (see `check_pickles`)."""
    manifest = json.loads(storage.read_bytes(storage.join(step_uri, MANIFEST)))
    folder = local_root / manifest["tag"]
    for rel, meta in manifest["files"].items():
        if rel.startswith("/") or ".." in Path(rel).parts:  # a manifest must not write outside its folder
            raise UnsafeCheckpoint(f"{step_uri}/{MANIFEST}: file name '{rel}' leaves the checkpoint folder")
        local = folder / rel
        storage.get_file(storage.join(step_uri, rel), local)
        if storage.sha256_file(local) != meta["sha256"]:
            raise RuntimeError(f"{step_uri}/{rel}: checksum does not match the checkpoint manifest")
    check_pickles(folder, step_uri)
    return folder, manifest


@contextmanager
def _host_lock(path: Path) -> Iterator[None]:
    """An exclusive lock among the processes of this host (a file lock: ranks are processes)."""
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def host_folder(step_uri: str, key: str) -> Path:
    """Where this host keeps `step_uri` while the ranks of the run `key` resume from it: one folder
    per host, shared by its ranks (a rank's /tmp is its host's)."""
    digest = hashlib.sha256(f"{key}\n{step_uri}".encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"ditforge-resume-{digest}"


def fetch_once_per_host(step_uri: str, key: str, universal: bool = False) -> tuple[Path, dict[str, Any], bool, float]:
    """The step folder, downloaded (and verified, and for a reshard turned into a universal
    checkpoint) once per host: the first rank of a host to get here does it, the others wait for
    it and read the same files. → (folder, manifest, whether this call downloaded it, seconds of
    universal conversion done by this call). A folder left by an earlier attempt of the same
    run is used when it was completed, redone when not."""
    from . import reshard

    root = host_folder(step_uri, key)
    with _host_lock(root.with_name(root.name + ".lock")):
        if root.exists() and root.stat().st_uid != os.getuid():  # a shared /tmp: never someone else's
            raise UnsafeCheckpoint(f"{root}: exists and belongs to another user: refusing to resume through it")
        done, downloaded, seconds = root / ".complete", False, 0.0
        if not done.exists():
            shutil.rmtree(root, ignore_errors=True)  # a half-done earlier attempt
            root.mkdir(mode=0o700)
            download(step_uri, root)  # refuses unsafe pickles before DeepSpeed reads them
            done.write_text(storage.read_bytes(storage.join(step_uri, MANIFEST)).decode())
            downloaded = True
        manifest = json.loads(done.read_text())
        folder = root / manifest["tag"]
        if universal and not (root / "_universal" / ".complete").exists():
            shutil.rmtree(root / "_universal", ignore_errors=True)
            _, seconds = reshard.to_universal(folder, root / "_universal")
            (root / "_universal" / ".complete").touch()
    return folder, manifest, downloaded, seconds


def load(engine: Engine, step_uri: str, key: str) -> tuple[dict[str, Any], Path]:
    """Collective. Loads a complete step folder into the engine, at any world size (a checkpoint
    saved with another one is resharded: train/reshard.py); returns (client state, local folder
    with the extra files, shared by this host's ranks of the run `key`: `release` it when done)."""
    from . import reshard

    manifest = json.loads(storage.read_bytes(storage.join(step_uri, MANIFEST)))
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    # refused before anything is downloaded or handed to DeepSpeed
    needs = reshard_plan(step_uri, manifest, world, engine.zero_optimization_stage())
    t0 = time.perf_counter()
    folder, manifest, downloaded, seconds = fetch_once_per_host(step_uri, key, universal=bool(needs))
    size_mb = sum(m.get("bytes", 0) for m in manifest["files"].values()) / 1e6
    print(
        f"[rank {rank}] "
        + (
            f"downloaded {step_uri} for this host ({len(manifest['files'])} files, {size_mb:.1f} MB, "
            f"{time.perf_counter() - t0:.1f}s)"
            if downloaded
            else f"uses {step_uri} as another rank of this host downloaded it"
        ),
        flush=True,
    )
    # adapters only (train.lora): the frozen base came from model.init_from and is not in the files
    strict = {"load_module_strict": False} if manifest.get("adapters_only") else {}
    if needs:
        with reshard.universal_loading(engine):
            path, client_state = engine.load_checkpoint(
                str(folder.parent / "_universal"), tag=manifest["tag"], **strict
            )
        print(
            f"[rank {rank}] resharded {step_uri} from "
            f"{manifest['world_size']} to {world} workers (ZeRO-{manifest['zero_stage']}, universal checkpoint"
            + (f", converted in {seconds:.1f}s" if seconds else "")
            + ")",
            flush=True,
        )
    else:
        path, client_state = engine.load_checkpoint(str(folder.parent), tag=manifest["tag"], **strict)
    if path is None:
        raise RuntimeError(f"{step_uri}: DeepSpeed could not load this checkpoint")
    return client_state, folder


def release(folder: Path) -> None:
    """Delete a host's resume folder (`load`'s). Call it when no rank of this host reads it any
    more (after a barrier): they share it."""
    root = folder.parent
    shutil.rmtree(root, ignore_errors=True)
    root.with_name(root.name + ".lock").unlink(missing_ok=True)


def read_tensors(folder: Path, name: str) -> dict[str, torch.Tensor] | None:
    f = folder / name
    return load_file(str(f)) if f.exists() else None


def rank_state_name(rank: int) -> str:
    return f"rank_state/rank_{rank}.json"


def rank_state(folder: Path, rank: int, client_state: dict[str, Any]) -> dict[str, Any]:
    """This rank's own resume state from a downloaded step folder (its data position: bad and
    skipped counts differ per rank). Checkpoints written before it existed, or at another world
    size where this rank had no predecessor, fall back to the shared client state (rank 0's)."""
    f = folder / rank_state_name(rank)
    if f.exists():
        return json.loads(f.read_text())
    return {"data": client_state["data"]}


def stop_requested(run_uri: str, device: torch.device) -> bool:
    """Collective: has `ditforge stop` left a STOP marker in the run folder? Rank 0 looks (one
    object-store request) and tells the others, so every rank leaves the loop at the same step."""
    flag = torch.zeros(1, device=device)  # on the device: NCCL broadcasts only GPU tensors
    if dist.get_rank() == 0:
        try:
            # one attempt: during a storage outage this must not hold up every logging step
            flag[0] = float(stop_marked(run_uri, attempts=1))
        except OSError:
            pass  # storage blip: look again at the next logging step
    dist.broadcast(flag, src=0)
    return bool(flag.item())
