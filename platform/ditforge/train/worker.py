"""The training loop. Ray Train runs `train_loop` once per worker; read it top to bottom.

Randomness is derived, not carried: the noise, t and label dropout of step s on rank r come from a
generator seeded with (seed, s, r). A resumed run therefore draws exactly what an uninterrupted
run would have, with no RNG state to save beyond the step counter.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist
from PIL import Image

from ..data.loader import LatentLoader, Position
from ..models.attention import backend_in_use
from ..models.dit import DiT, DiTConfig, param_count
from ..models.vae import build_vae
from ..objectives.flow import RectifiedFlow, euler_sample
from ..spec import JobSpec
from . import checkpoint
from .engine import build_engine, precision
from .tracking import NullTracker, Tracker


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 4099 + rank)


def train_loop(config: dict) -> None:
    spec = JobSpec.model_validate(config["spec"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(spec.resources.cpus_per_worker)
    device = torch.device("cuda", ctx.get_local_rank()) if spec.resources.use_gpu else torch.device("cpu")

    # --- build: data, model, engine, objective, tracking --------------------------------------
    loader = LatentLoader(spec.data.train, spec.data.batch_size, rank, world, spec.train.seed)
    C, h, w = loader.latent_shape
    torch.manual_seed(spec.train.seed)  # identical initial weights on every rank
    model = DiT(DiTConfig(in_channels=C, size=spec.model.size, patch=spec.model.patch,
                          num_classes=spec.model.num_classes, attention=spec.model.attention,
                          grad_checkpointing=spec.model.grad_checkpointing))
    engine = build_engine(model, spec)
    objective = RectifiedFlow(spec.objective.t_sampling, spec.objective.cfg_dropout,
                              model.null_class if spec.model.num_classes else None)
    tracker = Tracker(config["tracking_uri"], config["mlflow_run_id"]) if rank == 0 else NullTracker()
    run_uri = config["run_uri"]

    # --- resume: step, optimizer, scheduler and data position come back together ---------------
    start = 0
    done = checkpoint.complete_steps(run_uri) if config.get("resume") else []
    if done:
        state = checkpoint.load(engine, run_uri, done[-1])
        start = state["step"]
        loader.position = Position(**state["data"])
        print(f"[rank {rank}] resumed from {run_uri}/{checkpoint.step_tag(start)} (data position {state['data']})")
    tracker.params({"model.params": param_count(model), "model.latent_shape": [C, h, w], "world_size": world,
                    "attention.backend": backend_in_use(spec.model.attention, device),
                    "precision": precision(spec)} if start == 0 else {})
    # Where each rank runs: on a multi-node cluster this shows (and tests check) the placement.
    node_ids: list = [None] * world
    dist.all_gather_object(node_ids, ray.get_runtime_context().get_node_id())
    tracker.tags({f"ditforge.node_id.rank{r}": n for r, n in enumerate(node_ids)})

    # --- train ------------------------------------------------------------------------------
    batches = iter(loader)
    engine.train()
    t_last, steps_since = time.perf_counter(), 0
    loss_sum = torch.zeros((), device=device)
    stopping = False
    for step in range(start + 1, spec.train.steps + 1):
        x, y, _keys = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = objective.loss(engine, x, y if spec.model.num_classes else None, step_generator(spec.train.seed, step, rank))
        engine.backward(loss)
        engine.step()
        loss_sum += loss.detach()  # no host sync here: .item() only on logging steps
        steps_since += 1

        if step % spec.tracking.log_every == 0 or step == spec.train.steps:
            dist.all_reduce(loss_sum)  # mean over ranks and steps since the last log
            mean_loss = loss_sum.item() / (world * steps_since)
            elapsed = time.perf_counter() - t_last
            metrics = {"train/loss": mean_loss, "train/lr": engine.get_lr()[0], "train/step": step,
                       "train/step_s": elapsed / steps_since,
                       "train/samples_per_s": steps_since * spec.data.batch_size * world / elapsed}
            tracker.log(metrics, step)
            if rank == 0:
                print(f"step {step}/{spec.train.steps} loss {mean_loss:.4f} "
                      f"{metrics['train/samples_per_s']:.1f} samples/s", flush=True)
            loss_sum.zero_()
            t_last, steps_since = time.perf_counter(), 0
            stopping = checkpoint.stop_requested(run_uri, device)  # `ditforge stop`: leave after this step

        if step % spec.checkpoint.every_steps == 0 or step == spec.train.steps or (stopping and spec.checkpoint.on_stop):
            t0 = time.perf_counter()
            client_state = {"step": step, "data": loader.position.to_dict(), "spec": spec.model_dump(mode="json")}
            dest = checkpoint.save(engine, run_uri, step, client_state, spec.checkpoint.keep_last)
            tracker.log({"checkpoint/save_s": time.perf_counter() - t0}, step)
            if rank == 0:
                print(f"checkpoint {dest}", flush=True)
            t_last = time.perf_counter()  # don't count the save as step time
        if stopping:
            if rank == 0:
                print(f"stop requested: leaving at step {step}", flush=True)
            break

    # --- samples: a fixed-seed class-conditional grid from the trained weights ------------------
    if not stopping:
        _sample_grid(engine, spec, (C, h, w), device, tracker, rank)
    dist.barrier()
    if dist.is_initialized():
        dist.destroy_process_group()  # without it gloo workers sometimes abort at exit


def _sample_grid(engine, spec: JobSpec, latent_shape, device, tracker, rank: int) -> None:
    import deepspeed

    model = engine.module
    # Under ZeRO-3 each rank holds a slice of every weight: gather them (all ranks take part).
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        if rank != 0:
            return
        model.eval()
        n_cls = max(spec.model.num_classes, 1)
        cols = spec.sample.per_class
        y = torch.arange(n_cls, device=device).repeat_interleave(cols) if spec.model.num_classes else None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision(spec) == "bf16"):
            z = euler_sample(model, (n_cls * cols, *latent_shape), y, steps=spec.sample.steps,
                             cfg_scale=spec.sample.cfg_scale, null_class=model.null_class if y is not None else None,
                             seed=spec.sample.seed, device=device)
        pixels = build_vae(spec.vae).decode(z.float().cpu())  # (N, 3, H, W) in [-1, 1]
        path = save_grid(pixels, rows=n_cls, cols=cols, out=os.path.join(tempfile.mkdtemp(), "samples.png"))
        tracker.artifact(path, "samples")
        print(f"samples logged: {path}", flush=True)
        model.train()


def save_grid(pixels: torch.Tensor, rows: int, cols: int, out: str, upscale: int = 2, pad: int = 2) -> str:
    """(N, 3, H, W) in [-1, 1] → one PNG, one row per class."""
    imgs = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    H, W = imgs.shape[1] * upscale, imgs.shape[2] * upscale
    grid = np.full((rows * (H + pad) + pad, cols * (W + pad) + pad, 3), 255, dtype=np.uint8)
    for i, img in enumerate(imgs[: rows * cols]):
        r, c = divmod(i, cols)
        big = img.repeat(upscale, 0).repeat(upscale, 1)
        grid[pad + r * (H + pad): pad + r * (H + pad) + H, pad + c * (W + pad): pad + c * (W + pad) + W] = big
    Image.fromarray(grid).save(out)
    return out
