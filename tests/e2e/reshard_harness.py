"""A fast harness for resuming at another world size: N plain torch.distributed processes (gloo,
CPU) build the tiny DiT under the job's DeepSpeed engine, train a few steps, save through the
real `Checkpointer` to `file://`; K processes load it through the real `checkpoint.load`. No Ray,
MLflow or S3, so one N→K case takes seconds.

What each side reports (rank 0 writes it): per parameter name the full fp32 weight and AdamW
exp_avg / exp_avg_sq, gathered by DeepSpeed's own `safe_get_full_*` accessors (independent of
the checkpoint files), the AdamW step of every parameter, the engine's global step, the LR
scheduler position and LR, and the client state.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from ditforge.bench.common import free_port

from ..loops import start_ranks


def _spec(stage: int, world: int):
    from ditforge.spec import JobSpec

    return JobSpec.model_validate(
        {
            "name": "reshard",
            "data": {"train": "file:///unused", "batch_size": 4},
            "model": {"size": "T"},
            "deepspeed": {"zero_stage": stage},
            "resources": {"workers": world},
            "train": {"warmup": 5, "steps": 50},
        }
    )


def _state(engine) -> dict:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    full = {}
    for n, p in engine.module.named_parameters():  # collective under ZeRO-3 (all-gathers)
        if engine.zero_optimization_stage() == 0:
            full[f"fp32/{n}"] = p.detach().clone()
            st = engine.optimizer.state[p]
            full[f"exp_avg/{n}"], full[f"exp_avg_sq/{n}"] = st["exp_avg"].clone(), st["exp_avg_sq"].clone()
        else:
            full[f"fp32/{n}"] = safe_get_full_fp32_param(p).detach().clone()
            full[f"exp_avg/{n}"] = safe_get_full_optimizer_state(p, "exp_avg").detach().clone()
            full[f"exp_avg_sq/{n}"] = safe_get_full_optimizer_state(p, "exp_avg_sq").detach().clone()
    opt = engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer
    adam_steps = sorted({float(s["step"]) for s in opt.state.values() if "step" in s})
    return {
        "tensors": full,
        "adam_steps": adam_steps,
        "global_steps": engine.global_steps,
        "sched": engine.lr_scheduler.last_epoch,
        "lr": engine.get_lr(),
    }


def _save(engine, run_uri: str, rank: int, world: int, step: int) -> None:
    import dataclasses
    import json

    from ditforge.models.dit import DiTConfig
    from ditforge.train import checkpoint

    model_json = json.dumps(
        {
            "dit": dataclasses.asdict(DiTConfig(in_channels=4, size="T", patch=2, num_classes=10)),
            "latent_shape": [4, 8, 8],
        }
    ).encode()
    ck = checkpoint.Checkpointer(run_uri, rank, world)
    ck.save(
        engine,
        step,
        {"step": step, "data": {"epoch": 0, "batch": step, "world": world}},
        files={"model.json": model_json} if rank == 0 else None,
    )
    ck.wait()
    assert ck.history[-1].ok, ck.history[-1].error


def _worker(rank: int, world: int, port: int, stage: int, mode: str, run_uri: str, out: str, steps: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        DS_ACCELERATOR="cpu",
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from ditforge.models.dit import DiT, DiTConfig
    from ditforge.runs.folder import resolve
    from ditforge.train import checkpoint
    from ditforge.train.engine import build_engine

    torch.manual_seed(0)
    engine = build_engine(DiT(DiTConfig(in_channels=4, size="T", patch=2, num_classes=10)), _spec(stage, world))
    client = None
    if mode == "save":
        for s in range(steps):  # a different batch on every rank and step: moments differ per element
            g = torch.Generator().manual_seed(1000 * s + rank)
            x, t = torch.randn(4, 4, 8, 8, generator=g), torch.rand(4, generator=g)
            pred = engine(x, t, torch.randint(0, 10, (4,), generator=g)).float()
            loss = (pred - torch.randn(pred.shape, generator=g)).pow(2).mean()  # the output starts at 0 (adaLN-zero)
            engine.backward(loss)
            engine.step()
        _save(engine, run_uri, rank, world, steps)
    else:
        client, folder = checkpoint.load(engine, resolve(run_uri), key=run_uri)  # downloaded once for this host
        dist.barrier()  # every rank has read the shared folder
        checkpoint.release(folder)
        _save(engine, f"{run_uri}-resaved-w{world}", rank, world, client["step"])  # what `export` reads at K
    st = _state(engine)
    st["client"] = {k: client[k] for k in ("step", "data")} if client else None
    if rank == 0:
        torch.save(st, out)
    dist.barrier()
    dist.destroy_process_group()


def run(world: int, stage: int, mode: str, run_uri: str, out: str, steps: int = 3) -> dict:
    """Start `world` ranks that save (mode "save") or load (mode "load") `run_uri`; rank 0's report."""
    start_ranks(_worker, (world, free_port(), stage, mode, run_uri, out, steps), world)
    return torch.load(out, weights_only=False)


if __name__ == "__main__":  # python -m tests.e2e.reshard_harness STAGE N K DIR: one case by hand
    stage, n, k, d = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    a = run(n, stage, "save", f"file://{d}/run", f"{d}/a.pt")
    b = run(k, stage, "load", f"file://{d}/run", f"{d}/b.pt")
    bad = [key for key in a["tensors"] if not torch.equal(a["tensors"][key], b["tensors"][key])]
    print("mismatched tensors:", bad[:5], len(bad), {k: (a[k], b[k]) for k in ("adam_steps", "global_steps", "sched")})
