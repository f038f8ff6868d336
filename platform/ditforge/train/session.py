"""What every training loop (DiT: worker.py, VAE: vae_trainer.py) does before its first step and
after its last, so both loops stay short and read top to bottom.

`worker_session(config)` builds the rank's context (device, tracker, checkpointer, process
record), and on *every* way out (a normal end, an exception, a NaN stop) tears down within a
bound: the upload in flight completes or its step folder stays without a manifest (incomplete,
never loaded), buffered MLflow records are flushed for at most `FLUSH_TIMEOUT_S`, and the process
group is destroyed. `resume`, `final_save` and `stop_requested` are the shared run protocol.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from ..runs import folder as run_folder
from ..spec import JobSpec
from . import checkpoint
from .engine import Engine
from .tracking import MlflowTracker, NullTracker, Tracker

FLUSH_TIMEOUT_S = 120.0  # buffered MLflow records, on the way out
UPLOAD_CLOSE_S = 120.0  # the upload in flight, on an exception path (no collective possible)


@dataclass
class Session:
    spec: JobSpec
    config: dict[str, Any]
    rank: int
    world: int
    device: torch.device
    tracker: Tracker
    ckpt: checkpoint.Checkpointer
    run_uri: str

    def resume(self, engine: Engine) -> tuple[int, dict[str, Any] | None, Path | None]:
        """This run's own newest checkpoint (a Ray Train restart), else where the submitter said.
        Collective. → (start step, this rank's state, the downloaded folder or None; the caller
        reads its extra files, then calls `done_resuming`). Restores this rank's torch RNG."""
        start = 0
        state: dict[str, Any] | None = None
        folder: Path | None = None
        own = run_folder.complete_steps(self.run_uri)
        source = run_folder.join_step(self.run_uri, own[-1]) if own else self.config.get("resume_from")
        if source:
            state, folder = checkpoint.load(engine, source, key=self.run_uri)
            start = state["step"]
            # Each rank's own data position (bad/skipped counts differ per rank), not rank 0's.
            state = {**state, **checkpoint.rank_state(folder, self.rank, state)}
            rng = checkpoint.read_tensors(folder, f"rng_rank{self.rank}.safetensors")
            if rng is not None:
                torch.set_rng_state(rng["torch"])
            print(
                f"[rank {self.rank}] resumed from {source} at step {start} (data position {state['data']})", flush=True
            )
        if self.rank == 0:  # before any save of this attempt (the caller's next collective orders it)
            run_folder.discard_after(self.run_uri, start)
        self.tracker.tags({"ditforge.resumed_from_step": start})  # a tag: a restart logs it again
        return start, state, folder

    def done_resuming(self, folder: Path | None) -> None:
        """Collective when resumed: the ranks of a host share the downloaded folder (downloaded
        once per host), so it goes only when every rank is done reading it."""
        if folder is not None:
            if self.world > 1:
                dist.barrier()
            checkpoint.release(folder)

    def stop_requested(self) -> bool:
        return checkpoint.stop_requested(self.run_uri, self.device)

    def fail_together(self, error: Exception) -> NoReturn:
        """Every rank raises `error` at this step (a decision all ranks share). Ray Train stops the
        whole worker group at the first rank's error, which would cut rank 0's teardown short and
        lose the step's buffered metrics: so rank 0 delivers them first and no rank raises before."""
        self.ckpt.wait()
        self.tracker.drain(FLUSH_TIMEOUT_S)
        if self.world > 1:
            dist.barrier()
        raise error

    def final_save(self, save: Callable[..., object], step: int) -> None:
        """The last checkpoint, complete before anything else happens (sampling, evaluation, the
        driver's export): `save(step, final=True)` retries its upload until
        `checkpoint.final_timeout_s`; if it still fails, every rank raises one line naming the
        newest complete checkpoint, from which `ditforge export` and a resubmit work."""
        save(step, final=True)
        stats = self.ckpt.wait()
        ok = torch.tensor([float(bool(stats and stats.complete))], device=self.device)
        if self.world > 1:
            dist.broadcast(ok, src=0)  # only rank 0 knows whether the manifest went out
        if not ok.item():
            newest = run_folder.newest_complete(self.run_uri)
            self.fail_together(
                checkpoint.FinalCheckpointFailed(
                    f"checkpoint: the final checkpoint (step {step}) could not be written within "
                    f"checkpoint.final_timeout_s ({self.spec.checkpoint.final_timeout_s:.0f}s): "
                    f"{(stats.error if stats else None) or 'see rank 0'}; newest complete checkpoint: "
                    + (
                        f"{newest} (`ditforge export {newest}`, or resubmit with --resume to continue from it)"
                        if newest
                        else "none"
                    )
                )
            )


def _log_upload(tracker: Tracker, stats: checkpoint.UploadStats) -> None:
    if stats.ok:
        tracker.log(
            {
                "train_checkpoint/upload_s": stats.upload_s,
                "train_checkpoint/MBps": stats.bytes / 1e6 / max(stats.upload_s, 1e-9),
                "train_checkpoint/MB": stats.bytes / 1e6,
            },
            stats.step,
        )
    else:
        tracker.log({"train_checkpoint/failed": 1.0}, stats.step)


@contextlib.contextmanager
def worker_session(config: dict[str, Any]) -> Iterator[Session]:
    import ray.train

    spec = JobSpec.model_validate(config["spec"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(spec.resources.cpus_per_worker)
    device = torch.device("cuda", ctx.get_local_rank()) if spec.resources.use_gpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's object collectives (sampling's gather) use the current device
    tracker: Tracker = (
        MlflowTracker(config["tracking_uri"], config["mlflow_run_id"], system_metrics=spec.tracking.system_metrics)
        if rank == 0
        else NullTracker()
    )
    run_uri = config["run_uri"]
    ckpt = checkpoint.Checkpointer(
        run_uri,
        rank,
        world,
        spec.checkpoint.keep_last,
        spec.checkpoint.keep_every,
        spec.checkpoint.upload_timeout_s,
        on_done=lambda s: _log_upload(tracker, s),
        final_timeout_s=spec.checkpoint.final_timeout_s,
        collective_timeout_s=spec.resources.collective_timeout_s,
        adapters_only=spec.train.lora is not None,
    )
    run_folder.record_process(run_uri, f"rank_{rank}")
    try:
        yield Session(spec, config, rank, world, device, tracker, ckpt, run_uri)
    finally:
        teardown(ckpt, tracker)


def teardown(ckpt: checkpoint.Checkpointer, tracker: Tracker) -> None:
    """Not collective (other ranks may be gone): bounded on every way out."""
    stats = ckpt.close(UPLOAD_CLOSE_S)  # a normal end has waited already: nothing in flight
    if stats is not None and not stats.ok:
        print(
            f"[rank {ckpt.rank}] checkpoint step {stats.step} left incomplete (no manifest): "
            f"{stats.error or 'upload did not finish'}",
            flush=True,
        )
    tracker.close(FLUSH_TIMEOUT_S)
    if dist.is_initialized():
        dist.destroy_process_group()  # without it gloo workers sometimes abort at exit
