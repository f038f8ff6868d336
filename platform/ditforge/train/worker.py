"""The training loop. Ray Train runs `train_loop` once per worker; read it top to bottom.

Randomness is derived, not carried: the noise, t and label dropout of step s on rank r come from a
generator seeded with (seed, s, r). A resumed run therefore draws exactly what an uninterrupted
run would have; the global torch RNG is saved per rank anyway for anything outside the step.
"""

from __future__ import annotations

import contextlib
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

from ..credentials import redact_obj
from ..data.loader import LatentLoader, Position, skipped_metrics
from ..data.prefetch import DevicePrefetcher
from ..data.shards import DataError
from ..models import attention
from ..models.convert import load_into
from ..models.dit import DiT, dit_config, forward_flops, param_count, tokenize_bytes
from ..models.vae import build_vae
from ..objectives import build_objective
from ..spec import JobSpec
from . import checkpoint
from .ema import EMA
from .engine import build_engine, precision
from .nonfinite import NonFiniteGuard, NonFiniteLoss
from .sampling import generate, sample_grid
from .step import step_generator, train_step
from .tracking import NullTracker, Tracker


def train_loop(config: dict) -> None:
    spec = JobSpec.model_validate(config["spec"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(spec.resources.cpus_per_worker)
    device = torch.device("cuda", ctx.get_local_rank()) if spec.resources.use_gpu else torch.device("cpu")

    # --- build: data, model, engine, objective, tracking, checkpointing ------------------------
    loader = LatentLoader(spec.data.train, spec.data.batch_size, rank, world, spec.train.seed,
                          max_bad_fraction=spec.data.max_bad_fraction, storage_timeout_s=spec.data.storage_timeout_s)
    latent_shape = tuple(loader.latent_shape)  # (C, h, w) or (C, T, h, w): the most common bucket's
    C = latent_shape[0]
    dtype = torch.bfloat16 if precision(spec) == "bf16" else torch.float32
    text_encoder = _text_encoder(spec, device, dtype)  # frozen, outside DeepSpeed (see models/text.py)
    dit_cfg = dit_config(spec.model, C, text_dim=text_encoder.dim if text_encoder else 0)
    # Resolve the attention kernel once, here, so the name logged is the kernel that runs.
    dit_cfg.attention = attention.resolve(spec.model.attention, device, dtype, dit_cfg.hidden // dit_cfg.heads)
    torch.manual_seed(spec.train.seed)  # identical initial weights on every rank
    model = DiT(dit_cfg)
    if spec.model.init_from:  # pretrained weights (models/convert.py), the same on every rank
        load_into(model, spec.model.init_from)
    engine = build_engine(model, spec)
    ema = EMA(engine.module, spec.train.ema_decay) if spec.train.ema_decay > 0 else None
    guard = NonFiniteGuard(engine.client_optimizer, device, spec.train.max_nonfinite_steps, spec.train.debug_nan_steps)
    objective = build_objective(spec.objective)
    # Forward FLOPs per sample, counted once per mask ratio: FLOP/s shows what masking saves.
    fwd_flops = {r: forward_flops(dit_cfg, latent_shape, r) for r in {0.0, spec.train.mask_ratio}}
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
        ema_full = checkpoint.read_tensors(folder, "ema.safetensors")
        if ema and ema_full is not None:  # full weights: each rank takes its own ZeRO-3 slice
            ema.load_full_state_dict(engine.module, ema_full, state.get("ema_updates", state["step"]))
        shutil.rmtree(folder.parent, ignore_errors=True)
        print(f"[rank {rank}] resumed from {source} at step {start} (data position {state['data']})", flush=True)
    if rank == 0:  # before any save of this attempt (the all_gather below orders it)
        checkpoint.discard_after(run_uri, start)
    checkpoint.record_process(run_uri, f"rank_{rank}")
    tracker.params({"model.params": param_count(model), "model.latent_shape": list(latent_shape), "world_size": world,
                    "attention.backend": dit_cfg.attention, "model.tokens": _tokens(dit_cfg, latent_shape),
                    "model.gflops_per_sample": round(fwd_flops[0.0] / 1e9, 4),
                    "precision": precision(spec)})
    # A tag, not a param: a Ray Train restart logs it again into the same MLflow run, and MLflow
    # refuses to change a param.
    tracker.tags({"ditforge.resumed_from_step": start})
    model_json = json.dumps({"dit": dataclasses.asdict(dit_cfg), "latent_shape": list(latent_shape),
                             "vae": spec.vae.model_dump(mode="json"), "sample": spec.sample.model_dump(mode="json"),
                             "objective": spec.objective.model_dump(mode="json"),
                             "classes": loader.manifest.get("classes", []), "job": spec.name}).encode()

    def save(step: int) -> None:
        files = {"spec.yaml": yaml.safe_dump(redact_obj(spec.model_dump(mode="json"))).encode(), "model.json": model_json} \
            if rank == 0 else {}
        tensors = {f"rng_rank{rank}.safetensors": {"torch": torch.get_rng_state()}}
        if ema:  # full EMA weights, written once by rank 0 (gathered under ZeRO-3: all ranks take part)
            full = ema.full_state_dict(engine.module)
            if rank == 0:
                tensors["ema.safetensors"] = full
        stall = ckpt.save(engine, step, {"step": step, "data": batches.position.to_dict(),
                                         "ema_updates": ema.num_updates if ema else 0}, files=files, tensors=tensors)
        tracker.log({"checkpoint/stall_s": stall}, step)

    # Where each rank runs: on a multi-node cluster this shows (and tests check) the placement.
    node_ids: list = [None] * world
    dist.all_gather_object(node_ids, ray.get_runtime_context().get_node_id())
    tracker.tags({f"ditforge.node_id.rank{r}": n for r, n in enumerate(node_ids)})

    # --- train ------------------------------------------------------------------------------
    batches = DevicePrefetcher(loader, device, dtype)  # (B, ...) latents already on the device, in `dtype`
    engine.train()
    t_last, steps_since = time.perf_counter(), 0
    loss_sum = torch.zeros((), device=device)
    flops_since = 0.0
    stopping = False
    for step in range(start + 1, spec.train.steps + 1):
        x, y, _keys, *rest = next(batches)  # captions, when the loader yields them
        x, y = x.to(device), y.to(device)  # no-ops on the GPU path: the prefetcher copied them
        cond = _conditioning(spec, y, rest[0] if rest else None, text_encoder, device)
        ratio = mask_ratio_at(spec, step)
        loss, good = train_step(engine, objective, x, cond, step_generator(spec.train.seed, step, rank, device), ratio,
                                ema, guard, step)
        loss_sum += torch.where(good > 0, loss, 0.0)  # no host sync here: .item() only on logging steps
        steps_since += 1
        flops_since += 3 * fwd_flops[ratio] * x.shape[0]  # forward + backward ≈ 3 forwards

        if step % spec.tracking.log_every == 0 or step == spec.train.steps:
            dist.all_reduce(loss_sum)  # mean over ranks and the good steps since the last log
            skipped = guard.read()
            mean_loss = loss_sum.item() / (world * (steps_since - skipped)) if steps_since > skipped else float("nan")
            elapsed = time.perf_counter() - t_last
            metrics = {"train/loss": mean_loss, "train/lr": engine.get_lr()[0], "train/step": step,
                       "train/skipped_nonfinite": guard.total,
                       "train/step_s": elapsed / steps_since,
                       "train/samples_per_s": steps_since * spec.data.batch_size * world / elapsed,
                       "train/mask_ratio": ratio, "train/tflops_per_s": flops_since * world / elapsed / 1e12}
            skipped = torch.tensor(loader.skipped_counts(), dtype=torch.float64, device=device)
            dist.all_reduce(skipped)  # bad samples skipped so far, summed over ranks
            metrics.update(skipped_metrics(skipped.tolist()))
            tracker.log({k: v for k, v in metrics.items() if v == v}, step)  # no loss when all were skipped
            if rank == 0:
                print(f"step {step}/{spec.train.steps} loss {mean_loss:.4f} "
                      f"{metrics['train/samples_per_s']:.1f} samples/s", flush=True)
            loss_sum.zero_()
            t_last, steps_since, flops_since = time.perf_counter(), 0, 0.0
            stopping = checkpoint.stop_requested(run_uri, device)  # `ditforge stop`: leave after this step

        if (step % spec.checkpoint.every_steps == 0 or step == spec.train.steps
                or (stopping and spec.checkpoint.on_stop) or guard.exceeded()):
            save(step)
            t_last = time.perf_counter()  # the stall is logged on its own, not as step time
        if guard.exceeded():  # the weights are still the last good step's: they were just saved
            ckpt.wait()
            tracker.close()
            raise NonFiniteLoss(guard.message(step, checkpoint.join_step(run_uri, step)))
        if stopping:
            if rank == 0:
                print(f"stop requested: leaving at step {step}", flush=True)
            break
        if spec.tracking.sample_every and step % spec.tracking.sample_every == 0 and step != spec.train.steps:
            _sample(engine, ema, objective, spec, latent_shape, device, tracker, rank, step)
            t_last = time.perf_counter()
        if spec.eval.every_steps and step % spec.eval.every_steps == 0 and step != spec.train.steps:
            _evaluate(engine, ema, objective, spec, loader, latent_shape, device, tracker, rank, step)
            t_last = time.perf_counter()

    # --- end: samples and quality from the EMA weights, wait for the last upload, flush ----------
    if not stopping:
        _sample(engine, ema, objective, spec, latent_shape, device, tracker, rank, spec.train.steps)
        _evaluate(engine, ema, objective, spec, loader, latent_shape, device, tracker, rank, spec.train.steps)
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


def mask_ratio_at(spec: JobSpec, step: int) -> float:
    """MicroDiT's schedule: mask for most of training, then fine-tune unmasked for the final
    `train.unmask_last` fraction of the steps, so the model meets full token sets before sampling."""
    if spec.train.mask_ratio == 0 or step > spec.train.steps * (1 - spec.train.unmask_last):
        return 0.0
    return spec.train.mask_ratio


def _tokens(cfg, latent_shape) -> int:
    T = latent_shape[1] // cfg.patch_t if len(latent_shape) == 4 else 1
    return T * (latent_shape[-2] // cfg.patch) * (latent_shape[-1] // cfg.patch)


def _text_encoder(spec: JobSpec, device, dtype):
    if spec.model.text != "transformers":
        return None
    from ..models.text import TextEncoder

    return TextEncoder(spec.model.text_encoder, spec.model.text_len, device, dtype)


def _conditioning(spec: JobSpec, y, captions, text_encoder, device) -> dict:
    """A batch's conditioning for the model: class ids and/or caption tokens / embeddings."""
    cond = {"y": y if spec.model.num_classes else None}
    if spec.model.text != "none":
        if captions is None:
            raise DataError(f"{spec.data.train}: model.text is {spec.model.text!r} but the loader yields no captions")
        cond["text"] = (tokenize_bytes(list(captions), spec.model.text_len).to(device) if text_encoder is None
                        else text_encoder.encode(list(captions)))
    return cond


@contextlib.contextmanager
def _sampling_weights(engine, ema):
    """Full EMA weights (raw ones without EMA) on every rank, for sampling; collective."""
    import deepspeed

    model = engine.module
    # Under ZeRO-3 each rank holds a slice of every weight: gather them (all ranks take part).
    with (ema.swapped_in(model, gather=True) if ema
          else deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)):
        yield model


def _sample(engine, ema, objective, spec: JobSpec, latent_shape, device, tracker, rank: int, step: int) -> None:
    with _sampling_weights(engine, ema) as model:
        if rank == 0:
            out = os.path.join(tempfile.mkdtemp(), f"step_{step:08d}.png")
            for path in sample_grid(model, latent_shape, spec.sample, spec.vae, out, device, precision(spec) == "bf16",
                                    objective=objective):
                tracker.artifact(path, "samples")
            print(f"samples at step {step} → MLflow samples/{os.path.basename(out)}", flush=True)


def _evaluate(engine, ema, objective, spec: JobSpec, loader, latent_shape, device, tracker, rank: int, step: int):
    """Generated-set quality (train/quality.py): class accuracy and Fréchet distance, to MLflow."""
    from . import quality

    vae = build_vae(spec.vae)
    frames = latent_shape[1] * vae.temporal_downsample if len(latent_shape) == 4 else 1
    name = quality.which_set(loader.manifest.get("classes"), frames)
    if not spec.eval.quality or name is None or not spec.model.num_classes:
        return
    with _sampling_weights(engine, ema) as model:
        if rank != 0:
            return
        t0 = time.perf_counter()
        res = latent_shape[-1] * vae.f  # the pixel resolution the latents decode to
        classifier = quality.train_classifier(name, res, frames)
        y = torch.arange(spec.model.num_classes, device=device).repeat_interleave(spec.eval.per_class)
        z = generate(model, objective, latent_shape, y, spec.sample.model_copy(update={"steps": spec.eval.steps,
                     "seed": spec.sample.seed + 1}), device, precision(spec) == "bf16")
        metrics = quality.score(classifier, vae.decode(z.cpu()), y.cpu(), name, res, frames)
        metrics["quality/seconds"] = time.perf_counter() - t0
        tracker.log(metrics, step)
        print(f"quality at step {step}: class accuracy {metrics['quality/class_accuracy']:.3f}, "
              f"FD {metrics['quality/fd']:.3f}", flush=True)
