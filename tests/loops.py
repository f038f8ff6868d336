"""Run a real training loop (`worker.train_loop`, `vae_trainer.train_vae_loop`) on N CPU ranks
without Ray: processes in one gloo group, a stand-in for `ray.train.get_context()`, and a
tracker that writes what it is given to a JSON-lines file instead of MLflow. Seconds instead of
the minute a Ray job takes; the loop, DeepSpeed, checkpoints and storage are the real ones."""

from __future__ import annotations

import json
import os
import traceback
from datetime import timedelta
from pathlib import Path

import torch.multiprocessing as mp

from ditforge.bench.common import free_port


class FileTracker:
    """The Tracker interface, recorded per rank in `<dir>/track_rank_N.jsonl`."""

    def __init__(self, path: Path):
        self.path = path

    def _write(self, **rec):
        with open(self.path, "a") as f:
            f.write(json.dumps(rec, default=str) + "\n")

    def log(self, metrics, step):
        self._write(kind="metrics", metrics=metrics, step=step)

    def params(self, params):
        self._write(kind="params", params=params)

    def tags(self, tags):
        self._write(kind="tags", tags=tags)

    def artifact(self, path, folder=None):
        import shutil

        keep = self.path.parent / "artifacts" / os.path.basename(path)
        keep.parent.mkdir(exist_ok=True)
        shutil.copy(path, keep)
        self._write(kind="artifact", path=str(keep), folder=folder)

    def drain(self, timeout=0):
        return True  # every record is on disk when written

    def close(self, timeout=0):
        self._write(kind="close", timeout=timeout)
        return True


def records(out: Path, rank: int = 0, kind: str | None = None) -> list[dict]:
    f = out / f"track_rank_{rank}.jsonl"
    recs = [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []
    return [r for r in recs if kind is None or r["kind"] == kind]


def metric(out: Path, name: str) -> dict[int, float]:
    return {r["step"]: r["metrics"][name] for r in records(out, 0, "metrics") if name in r["metrics"]}


class _Ctx:
    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    def get_world_rank(self):
        return self.rank

    def get_world_size(self):
        return self.world

    def get_local_rank(self):
        return self.rank


class _Runtime:
    def get_node_id(self):
        return "node-local"


def _rank_main(rank: int, world: int, port: int, loop: str, config: dict, out: str, setup) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        DS_ACCELERATOR="cpu",
    )
    import importlib

    import ray
    import ray.train
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    ray.train.get_context = lambda: _Ctx(rank, world)
    ray.get_runtime_context = lambda: _Runtime()
    from ditforge.train import session

    out_dir = Path(out)
    session.MlflowTracker = lambda *a, **k: FileTracker(out_dir / f"track_rank_{rank}.jsonl")
    session.NullTracker = lambda: FileTracker(out_dir / f"track_rank_{rank}.jsonl")
    if setup is not None:
        setup(rank, out_dir)
    backend = "nccl" if config["spec"]["resources"]["use_gpu"] else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=300))
    mod, fn = loop.rsplit(".", 1)
    try:
        getattr(importlib.import_module(mod), fn)(config)
        (out_dir / f"rank_{rank}.ok").write_text("ok")
    except BaseException as e:
        (out_dir / f"rank_{rank}.err").write_text(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# Ranks start from a fork server that has imported torch, DeepSpeed, Ray Train and the loops once.
# A spawned rank imports them itself, and the two imports the first optimizer makes (torch._dynamo,
# from Optimizer.__init__, and DeepSpeed's Muon optimizer, from its ZeRO sanity check) alone took
# ~7 s of CPU per rank on the 2-core CI machine (py-spy); the suite starts ~40 ranks. The server
# is forked from nothing but these imports, so no thread of the test process is copied.
PRELOAD = [
    "torch",
    "torch._dynamo",
    "deepspeed",
    "deepspeed.runtime.zero.muon.muon_optimizer",
    "ray.train",
    "ditforge.train.worker",
    "ditforge.train.vae_trainer",
    "ditforge.train.checkpoint",
    "peft",  # train.lora (tests/e2e/test_lora.py): ~4 s of imports per rank otherwise
]


def start_ranks(fn, args: tuple, world: int) -> None:
    """fn(rank, *args) in `world` processes; raises if one fails."""
    import multiprocessing

    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before the server imports DeepSpeed
    multiprocessing.get_context("forkserver").set_forkserver_preload(PRELOAD)
    mp.start_processes(fn, args=args, nprocs=world, join=True, start_method="forkserver")


def run_loop(
    loop: str, spec: dict, run_uri: str, out: Path, world: int = 2, setup=None, resume_from: str | None = None
) -> dict[int, str | None]:
    """Run `loop` ("module.function") on `world` ranks; → {rank: None if it returned, else its
    error (first line: `Type: message`)}. `setup(rank, out)`: a module-level function run in
    each rank before the loop (fault injection by monkeypatching)."""
    from ditforge.spec import JobSpec

    out.mkdir(parents=True, exist_ok=True)
    config = {
        "spec": JobSpec.model_validate(spec).model_dump(mode="json"),
        "run_uri": run_uri,
        "tracking_uri": "unused://",
        "mlflow_run_id": "unused",
        "resume_from": resume_from,
    }
    for f in out.glob("rank_*.*"):
        f.unlink()
    start_ranks(_rank_main, (world, free_port(), loop, config, str(out), setup), world)
    res = {}
    for r in range(world):
        err = out / f"rank_{r}.err"
        res[r] = err.read_text() if err.exists() else None
        assert err.exists() or (out / f"rank_{r}.ok").exists(), f"rank {r} left no result"
    return res


def dit_spec(data: str, run_root: str, **sections) -> dict:
    """A tiny class-conditional DiT job over `data` (latents (4, 4, 4)), checkpoints under `run_root`."""
    spec = {
        "name": "loop-test",
        "data": {"train": data, "batch_size": 4, "max_bad_fraction": 0.5},
        "model": {"size": "T", "patch": 2, "num_classes": 10},
        "train": {"steps": 4, "lr": 1e-3, "warmup": 1, "ema_decay": 0.9},
        "deepspeed": {"zero_stage": 2},
        "resources": {"workers": 2, "cpus_per_worker": 1},
        "checkpoint": {"uri": run_root, "every_steps": 2, "keep_last": 5},
        "tracking": {"log_every": 1, "system_metrics": False},
        "sample": {"per_class": 2, "steps": 2, "batch_size": 4, "max_classes": 3},
        "eval": {"quality": False},
    }
    for k, v in sections.items():
        spec[k] = {**spec.get(k, {}), **v}
    return spec
