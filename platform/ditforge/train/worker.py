"""The training loop. Ray Train runs `train_loop` once per worker; read it top to bottom.

Randomness is derived, not carried: the noise, t and label dropout of step s on rank r come from a
generator seeded with (seed, s, r). A resumed run therefore draws exactly what an uninterrupted
run would have; the global torch RNG is saved per rank anyway for anything outside the step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time

import ray
import ray.train
import torch
import torch.distributed as dist
import yaml

from ..data.loader import LatentLoader, Position
from ..models.attention import backend_in_use
from ..models.dit import DiT, DiTConfig, param_count
from ..objectives.flow import RectifiedFlow
from ..spec import JobSpec
from . import checkpoint
from .engine import build_engine, precision
from .sampling import sample_grid
from .tracking import NullTracker, Tracker


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 4099 + rank)


def train_loop(config: dict) -> None:
    spec = JobSpec.model_validate(config["spec"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(spec.resources.cpus_per_worker)
    device = torch.device("cuda", ctx.get_local_rank()) if spec.resources.use_gpu else torch.device("cpu")

    # --- build: data, model, engine, objective, tracking, checkpointing ------------------------
    loader = LatentLoader(spec.data.train, spec.data.batch_size, rank, world, spec.train.seed)
    latent_shape = loader.latent_shape  # (C, h, w) or (C, T, h, w): the most common bucket's
    C = latent_shape[0]
    torch.manual_seed(spec.train.seed)  # identical initial weights on every rank
    dit_cfg = DiTConfig(in_channels=C, size=spec.model.size, patch=spec.model.patch,
                        num_classes=spec.model.num_classes, attention=spec.model.attention,
                        grad_checkpointing=spec.model.grad_checkpointing)
    model = DiT(dit_cfg)
    engine = build_engine(model, spec)
    objective = RectifiedFlow(spec.objective.t_sampling, spec.objective.cfg_dropout,
                              model.null_class if spec.model.num_classes else None)
    tracker = (Tracker(config["tracking_uri"], config["mlflow_run_id"], system_metrics=spec.tracking.system_metrics)
               if rank == 0 else NullTracker())
    run_uri = config["run_uri"]
    ckpt = checkpoint.Checkpointer(run_uri, rank, world, spec.checkpoint.keep_last, spec.checkpoint.keep_every,
                                   spec.checkpoint.upload_timeout_s, on_done=lambda s: _log_upload(tracker, s))

    # --- resume: this run's own newest checkpoint (a restart), else where the submitter said ----
    start = 0
    own = checkpoint.complete_steps(run_uri)
    source = checkpoint.join_step(run_uri, own[-1]) if own else config.get("resume_from")
    if source:
        state, folder = checkpoint.load(engine, source)
        start = state["step"]
        loader.position = Position(**state["data"])
        rng = checkpoint.read_tensors(folder, f"rng_rank{rank}.safetensors")
        if rng is not None:
            torch.set_rng_state(rng["torch"])
        shutil.rmtree(folder.parent, ignore_errors=True)
        print(f"[rank {rank}] resumed from {source} at step {start} (data position {state['data']})", flush=True)
    tracker.params({"model.params": param_count(model), "model.latent_shape": list(latent_shape), "world_size": world,
                    "attention.backend": backend_in_use(spec.model.attention, device),
                    "precision": precision(spec), "resumed_from_step": start})
    model_json = json.dumps({"dit": dataclasses.asdict(dit_cfg), "latent_shape": list(latent_shape),
                             "vae": spec.vae.model_dump(mode="json"), "sample": spec.sample.model_dump(mode="json"),
                             "classes": loader.manifest.get("classes", []), "job": spec.name}).encode()

    def save(step: int) -> None:
        files = {"spec.yaml": yaml.safe_dump(spec.model_dump(mode="json")).encode(), "model.json": model_json} \
            if rank == 0 else {}
        stall = ckpt.save(engine, step, {"step": step, "data": loader.position.to_dict()}, files=files,
                          tensors={f"rng_rank{rank}.safetensors": {"torch": torch.get_rng_state()}})
        tracker.log({"checkpoint/stall_s": stall}, step)

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

        if (step % spec.checkpoint.every_steps == 0 or step == spec.train.steps
                or (stopping and spec.checkpoint.on_stop)):
            save(step)
            t_last = time.perf_counter()  # the stall is logged on its own, not as step time
        if stopping:
            if rank == 0:
                print(f"stop requested: leaving at step {step}", flush=True)
            break
        if spec.tracking.sample_every and step % spec.tracking.sample_every == 0 and step != spec.train.steps:
            _sample(engine, spec, tuple(latent_shape), device, tracker, rank, step)
            t_last = time.perf_counter()

    # --- end: samples from the trained weights, wait for the last upload, flush tracking --------
    if not stopping:
        _sample(engine, spec, tuple(latent_shape), device, tracker, rank, spec.train.steps)
    ckpt.wait()
    tracker.close()
    dist.barrier()
    if dist.is_initialized():
        dist.destroy_process_group()  # without it gloo workers sometimes abort at exit


def _log_upload(tracker, stats: checkpoint.UploadStats) -> None:
    if stats.ok:
        tracker.log({"checkpoint/upload_s": stats.upload_s, "checkpoint/MBps": stats.bytes / 1e6 / max(stats.upload_s, 1e-9),
                     "checkpoint/MB": stats.bytes / 1e6}, stats.step)
    else:
        tracker.log({"checkpoint/failed": 1.0}, stats.step)


def _sample(engine, spec: JobSpec, latent_shape, device, tracker, rank: int, step: int) -> None:
    import deepspeed

    # Under ZeRO-3 each rank holds a slice of every weight: gather them (all ranks take part).
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        if rank == 0:
            out = os.path.join(tempfile.mkdtemp(), f"step_{step:08d}.png")
            sample_grid(engine.module, latent_shape, spec.sample, spec.vae, out, device, precision(spec) == "bf16")
            tracker.artifact(out, "samples")
            print(f"samples at step {step} → MLflow samples/{os.path.basename(out)}", flush=True)
