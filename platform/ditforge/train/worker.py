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
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, cast

import ray
import ray.train
import torch
import torch.distributed as dist
import yaml

from ..credentials import redact_obj
from ..data.loader import LatentLoader, skipped_metrics
from ..data.mix import MixedLoader, MixPosition, position_from_dict
from ..data.prefetch import DevicePrefetcher
from ..data.shards import DataError
from ..models import attention
from ..models import lora
from ..models import tasks
from ..models.convert import load_into
from ..models.dit import DiT, dit_config, forward_flops, param_count, tokenize_bytes
from ..models.vae import build_vae
from ..objectives import build_objective
from ..runs.folder import join_step
from ..spec import JobSpec
from . import batch as batch_plan
from .ema import EMA
from .engine import build_engine, convert_fp8, precision, scale_lr, uses_bf16
from .nonfinite import NonFiniteGuard, NonFiniteLoss
from ..inference.sampling import gather_chunks, generate_chunks, sample_grid
from .step import step_generator, train_step
from .session import Session, worker_session

if TYPE_CHECKING:
    from ..models.dit import DiTConfig
    from ..models.text import TextEncoder
    from ..objectives import Objective
    from .engine import Engine
    from .tracking import Tracker


def train_loop(config: dict[str, Any]) -> None:
    with worker_session(config) as run:  # tears down on every way out (train/session.py)
        _train(run)


def _train(run: Session) -> None:
    spec, rank, world, device, tracker = run.spec, run.rank, run.world, run.device, run.tracker

    # --- build: data, model, engine, objective ------------------------------------------------
    def make_loader(batch_size: int) -> LatentLoader | MixedLoader:
        def one(uri: str, bs: int) -> LatentLoader:
            return LatentLoader(
                uri,
                bs,
                rank,
                world,
                spec.train.seed,
                max_bad_fraction=spec.data.max_bad_fraction,
                storage_timeout_s=spec.data.storage_timeout_s,
            )

        if not spec.data.mix:
            return one(spec.data.train, batch_size)
        # Joint training (data/mix.py): each step draws one data set by weight, the same on every rank.
        sources = spec.data.sources()
        return MixedLoader(
            [one(sources[0].train, batch_size)] + [one(s.train, s.batch_size or batch_size) for s in sources[1:]],
            [s.weight for s in sources],
            spec.train.seed,
            drop_labels=[s.labels == "drop" for s in sources],
            null_class=spec.model.num_classes,
        )

    loader = make_loader(spec.data.fixed_batch())
    latent_shape = tuple(loader.latent_shape)  # (C, h, w) or (C, T, h, w): the most common bucket's
    C = latent_shape[0]
    dtype = torch.bfloat16 if uses_bf16(spec) else torch.float32
    text_encoder = _text_encoder(spec, device, dtype)  # frozen, outside DeepSpeed (see models/text.py)
    video_tasks = spec.train.video_tasks if len(latent_shape) == 4 else None  # VDT task mixture (videos)
    dit_cfg = dit_config(
        spec.model, C, text_dim=text_encoder.dim if text_encoder else 0, given_tokens=video_tasks is not None
    )
    # Resolve the attention kernel once, here, so the name logged is the kernel that runs.
    dit_cfg.attention = attention.resolve(spec.model.attention, device, dtype, dit_cfg.hidden // dit_cfg.heads)
    torch.manual_seed(spec.train.seed)  # identical initial weights on every rank
    model = DiT(dit_cfg)
    if spec.model.init_from:  # pretrained weights (models/convert.py), the same on every rank
        load_into(model, spec.model.init_from)
    # train.lora: the imported weights freeze and peft's adapters train (models/lora.py); checkpoints
    # then hold the adapters alone, and export merges them into the base again
    lora_layers = lora.apply(model, spec.train.lora) if spec.train.lora else None
    if precision(spec) == "fp8":  # before the batch probe: float8 linears change the memory per sample
        convert_fp8(model, device)
    objective = build_objective(spec.objective)
    # data.batch_size: auto probes this GPU (train/batch.py); a fixed batch, or CPU, just plans accumulation.
    probe = (
        (lambda: _probe_batch(spec, model, objective, loader, text_encoder, device, dtype, world))
        if spec.data.batch_size == "auto" and device.type == "cuda"
        else None
    )
    plan = batch_plan.plan_batch(spec, world, probe)
    if plan.micro != loader.batch_size:
        loader = make_loader(plan.micro)
    if rank == 0:
        print(
            f"batch: {plan.micro} per worker x {world} workers x {plan.accum} accumulation steps "
            f"({plan.source}{', probed ' + str(plan.probed) if plan.probed else ''})",
            flush=True,
        )
    engine = build_engine(model, spec, plan.micro, plan.accum)
    ema = EMA(engine.module, spec.train.ema_decay, engine.optimizer) if spec.train.ema_decay > 0 else None
    guard = NonFiniteGuard(engine.client_optimizer, device, spec.train.max_nonfinite_steps, spec.train.debug_nan_steps)
    # Forward FLOPs per sample, counted once per mask ratio and sample shape (data.mix: images
    # beside videos): FLOP/s shows what masking saves.
    flops_cache: dict[tuple[tuple[int, ...], float], int] = {}

    def fwd_flops(shape: tuple[int, ...], r: float) -> int:
        if (shape, r) not in flops_cache:
            flops_cache[shape, r] = forward_flops(dit_cfg, shape, r)
        return flops_cache[shape, r]

    # --- resume: this run's own newest checkpoint (a restart), else where the submitter said ----
    start, state, folder = run.resume(engine)
    world_sizes = [[0, world]]  # [step, world size] at the start and at every change (elastic, resume)
    if state:
        pos = position_from_dict(state["data"])  # this rank's own position (train/session.py)
        if isinstance(pos, MixPosition) and not isinstance(loader, MixedLoader):
            pos = pos.sources[0]  # a checkpoint of a data.mix job started without data.mix: data.train's
        loader.position = pos
        assert folder is not None  # a resumed state comes with its downloaded folder
        if ema:  # full weights or per-rank ZeRO-3 slices, at this world size or another
            ema.load_shards(engine.module, folder, state.get("ema_updates", state["step"]))
        world_sizes = state.get("world_sizes") or [[0, state["data"].get("world") or world]]
        if world_sizes[-1][1] != world:
            world_sizes.append([start, world])
            if rank == 0:
                print(
                    f"world size {world_sizes[-2][1]} -> {world} at step {start} (global batch "
                    f"{plan.micro * plan.accum * world}, lr x{spec.resources.lr_factor(world):g})",
                    flush=True,
                )
    run.done_resuming(folder)
    scale_lr(engine, spec, world)
    # an elastic run's world size changes within one MLflow run: a metric and a tag, never a param
    tracker.params(
        {
            "model.params": param_count(model),
            "model.trainable_params": lora.trainable(model),
            **({"lora.layers": len(lora_layers)} if lora_layers else {}),
            "model.latent_shape": list(latent_shape),
            **({} if spec.resources.elastic else {"world_size": world}),
            "attention.backend": dit_cfg.attention,
            "model.tokens": _tokens(dit_cfg, latent_shape),
            "model.gflops_per_sample": round(fwd_flops(latent_shape, 0.0) / 1e9, 4),
            "precision": precision(spec),
            "ema.source": ema.source if ema else "off",
        }
    )
    # tags, not params: a restart on another GPU may probe another batch, an elastic one change size
    tracker.tags({**plan.tags(), "ditforge.world_sizes": ",".join(f"{s}:{w}" for s, w in world_sizes)})
    model_json = json.dumps(
        {
            "dit": dataclasses.asdict(dit_cfg),
            "latent_shape": list(latent_shape),
            "vae": spec.vae.model_dump(mode="json"),
            "sample": spec.sample.model_dump(mode="json"),
            "objective": spec.objective.model_dump(mode="json"),
            "classes": loader.manifest.get("classes", []),
            "job": spec.name,
            # the tasks `ditforge sample --task` may ask for
            "video_tasks": video_tasks.model_dump(mode="json") if video_tasks else None,
            # adapters: export merges them into the base it reads again from model.init_from
            "lora": (
                lora.config(spec.train.lora, lora_layers) | {"base": spec.model.init_from}
                if spec.train.lora and lora_layers
                else None
            ),
        }
    ).encode()

    def save(step: int, final: bool = False) -> None:
        files = (
            {"spec.yaml": yaml.safe_dump(redact_obj(spec.model_dump(mode="json"))).encode(), "model.json": model_json}
            if rank == 0
            else {}
        )
        tensors = {f"rng_rank{rank}.safetensors": {"torch": torch.get_rng_state()}}
        if ema:  # no gather: each rank its own slices / fragments, or rank 0 the full fp32 average
            ema_tensors, ema_files = ema.shard_files(engine.module, rank, world)
            tensors.update(ema_tensors)
            files.update(ema_files)
        stall = run.ckpt.save(
            engine,
            step,
            {
                "step": step,
                "data": batches.position.to_dict(),
                "world_sizes": world_sizes,
                "ema_updates": ema.num_updates if ema else 0,
            },
            files=files,
            tensors=tensors,
            rank_state={"data": batches.position.to_dict()},
            final=final,
        )
        tracker.log({"train_checkpoint/stall_s": stall}, step)

    # Where each rank runs: on a multi-node cluster this shows (and tests check) the placement.
    # (Also orders rank 0's discard_after in run.resume before any rank's first save.)
    node_ids: list[Any] = [None] * world
    dist.all_gather_object(node_ids, (ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()))
    tracker.tags(
        {f"ditforge.node_id.rank{r}": n for r, (n, _) in enumerate(node_ids)}
        | {f"ditforge.node_ip.rank{r}": ip for r, (_, ip) in enumerate(node_ids)}
        | {"ditforge.process_group": f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"}
    )

    # --- train ------------------------------------------------------------------------------
    batches = DevicePrefetcher(loader, device, dtype)  # (B, ...) latents already on the device, in `dtype`
    engine.train()
    t_last, steps_since = time.perf_counter(), 0
    loss_sum = torch.zeros((), device=device)
    mix = loader if isinstance(loader, MixedLoader) else None
    # data.mix: per data set, the loss sum and good (finite) steps since the last log, and the steps
    # drawn so far (a resumed run recounts the draws before its position: a pure function of each number)
    mix_loss, mix_steps = (torch.zeros(len(mix.loaders) if mix else 0, device=device) for _ in range(2))
    mix_drawn = mix.draws_per_source() if mix else []
    flops_since = 0.0
    stopping = False

    def micro_batch(step: int, k: int) -> tuple[torch.Tensor, dict[str, Any], torch.Generator, torch.Tensor | None]:
        """The k-th micro-batch of `step`: (x, cond, generator, video-task mask or None). k > 0 only with accumulation; its
        generator stream (rank + k·world) is one no rank uses for k = 0."""
        x, y, _keys, *rest = next(batches)  # captions, when the loader yields them
        x, y = x.to(device), y.to(device)  # no-ops on the GPU path: the prefetcher copied them
        cond = _conditioning(spec, y, rest[0] if rest else None, text_encoder, device)
        gen = step_generator(spec.train.seed, step, rank + k * world, device)
        given = None
        if video_tasks is not None:  # from the step's generator: a resume draws the same masks
            # Images (data.mix) are one-frame clips: (B, C, h, w) goes through the DiT's one-frame
            # path (a temporal patch of 1) and draws from the one-frame tasks (models/tasks.py).
            given, _ = tasks.draw(
                video_tasks.weights(),
                video_tasks.k,
                x.shape[0],
                tasks.token_grid(tuple(x.shape[1:]), spec.model.patch, spec.model.patch_t),
                gen,
                device,
            )
        return x, cond, gen, given

    for step in range(start + 1, spec.train.steps + 1):
        x, cond, gen, given = micro_batch(step, 0)
        more = [micro_batch(step, k) for k in range(1, plan.accum)]  # gradient accumulation (data.global_batch)
        ratio = mask_ratio_at(spec, step)
        loss, good = train_step(engine, objective, x, cond, gen, ratio, ema, guard, step, given=given, more=more)
        loss_sum += torch.where(good > 0, loss, 0.0)  # no host sync here: .item() only on logging steps
        steps_since += 1
        flops_since += 3 * fwd_flops(tuple(x.shape[1:]), ratio) * x.shape[0] * plan.accum  # fwd + bwd ≈ 3 fwd
        if mix is not None:  # which data set this step trained on (the same on every rank)
            src = mix.source_of(cast(MixPosition, batches.position).draws - 1)
            mix_loss[src] += torch.where(good > 0, loss, 0.0)
            mix_steps[src] += good
            mix_drawn[src] += 1

        if step % spec.tracking.log_every == 0 or step == spec.train.steps:
            dist.all_reduce(loss_sum)  # mean over ranks and the good steps since the last log
            skipped = guard.read()
            mean_loss = loss_sum.item() / (world * (steps_since - skipped)) if steps_since > skipped else float("nan")
            elapsed = time.perf_counter() - t_last
            metrics = {
                "train/loss": mean_loss,
                "train/lr": engine.get_lr()[0],
                "train/step": step,
                "train/world_size": world,
                "train/skipped_nonfinite": guard.total,
                "train/step_s": elapsed / steps_since,
                "train/samples_per_s": steps_since * plan.micro * plan.accum * world / elapsed,
                "train/token_mask_ratio": ratio,
                "train/tflops_per_s": flops_since * world / elapsed / 1e12,
            }
            bad = torch.tensor(loader.skipped_counts(), dtype=torch.float64, device=device)
            dist.all_reduce(bad)  # bad samples skipped so far, summed over ranks
            metrics.update(skipped_metrics(bad.tolist()))
            if mix is not None:  # per data set: its steps so far, its mean loss since the last log
                dist.all_reduce(mix_loss)
                for name, lsum, n, drawn in zip(mix.names, mix_loss.tolist(), mix_steps.tolist(), mix_drawn):
                    metrics[f"train_data/mix/{name}/steps"] = drawn
                    if n:
                        metrics[f"train_data/mix/{name}/loss"] = lsum / (world * n)
                mix_loss.zero_()
                mix_steps.zero_()
            tracker.log({k: v for k, v in metrics.items() if v == v}, step)  # no loss when all were skipped
            if rank == 0:
                print(
                    f"step {step}/{spec.train.steps} loss {mean_loss:.4f} "
                    f"{metrics['train/samples_per_s']:.1f} samples/s",
                    flush=True,
                )
            loss_sum.zero_()
            t_last, steps_since, flops_since = time.perf_counter(), 0, 0.0
            stopping = run.stop_requested()  # `ditforge stop`: leave after this step

        if step == spec.train.steps:
            run.final_save(save, step)  # complete before any sampling: retried, or one line naming the newest
        elif step % spec.checkpoint.every_steps == 0 or (stopping and spec.checkpoint.on_stop) or guard.exceeded():
            save(step)
            t_last = time.perf_counter()  # the stall is logged on its own, not as step time
        if guard.exceeded():  # the weights are still the last good step's: they were just saved
            run.fail_together(NonFiniteLoss(guard.message(step, join_step(run.run_uri, step))))
        if stopping:
            if rank == 0:
                print(f"stop requested: leaving at step {step}", flush=True)
            break
        if spec.tracking.sample_every and step % spec.tracking.sample_every == 0 and step != spec.train.steps:
            _sample(engine, ema, objective, spec, latent_shape, device, tracker, rank, world, step)
            t_last = time.perf_counter()
        if spec.eval.every_steps and step % spec.eval.every_steps == 0 and step != spec.train.steps:
            _evaluate(engine, ema, objective, spec, loader, latent_shape, device, tracker, rank, world, step)
            t_last = time.perf_counter()

    # --- end: the final checkpoint is complete; samples and quality from the EMA weights --------
    if not stopping:
        _sample(engine, ema, objective, spec, latent_shape, device, tracker, rank, world, spec.train.steps)
        _evaluate(engine, ema, objective, spec, loader, latent_shape, device, tracker, rank, world, spec.train.steps)
    run.ckpt.wait()  # a stop's save, if any


def _probe_batch(
    spec: JobSpec,
    model: torch.nn.Module,
    objective: Objective,
    loader: LatentLoader | MixedLoader,
    text_encoder: TextEncoder | None,
    device: torch.device,
    dtype: torch.dtype,
    world: int,
) -> dict[str, int]:
    """The largest micro-batch per bucket on this GPU (train/batch.py), eager and before DeepSpeed:
    compiled blocks use less memory, so the figure is on the safe side."""
    ab = spec.data.auto_batch
    model.to(device=device, dtype=dtype)  # where and how DeepSpeed will hold it
    props = torch.cuda.get_device_properties(device)
    state = batch_plan.engine_state_bytes(param_count(model), spec.deepspeed.zero_stage, world, dtype == torch.bfloat16)
    budget = int(ab.memory_fraction * props.total_memory) - state
    # Batches never span shards: no micro-batch larger than the largest shard.
    cap = min(ab.max, max(s["samples"] for s in loader.manifest["shards"]))
    shapes = _bucket_shapes(loader)

    def cond_of(b: int) -> dict[str, Any]:
        y = torch.zeros(b, dtype=torch.long, device=device)
        return _conditioning(spec, y, [""] * b if spec.model.text != "none" else None, text_encoder, device)

    probed = batch_plan.probe_buckets(
        lambda shape: batch_plan.cuda_measure(model, objective, shape, cond_of, device, dtype),
        shapes,
        budget,
        ab.multiple,
        cap,
    )
    # Every rank must run the same micro-batches (ZeRO reduces gradients in each backward): the
    # smallest GPU decides.
    names = sorted(probed)
    t = torch.tensor([probed[n] for n in names], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return dict(zip(names, t.tolist()))


def _bucket_shapes(loader: LatentLoader | MixedLoader) -> dict[str, tuple[int, ...]]:
    """Bucket name → latent shape (C, ...), from the latent manifest."""
    buckets = loader.manifest.get("buckets") or {}
    shapes = {name: tuple(b["shape"]) for name, b in buckets.items() if b.get("shape")}
    if not shapes:
        shapes = {
            "x".join(map(str, s["shape"])): tuple(s["shape"]) for s in loader.manifest["shards"] if s.get("shape")
        }
    return shapes or {"default": tuple(loader.latent_shape)}


def mask_ratio_at(spec: JobSpec, step: int) -> float:
    """MicroDiT's schedule: mask for most of training, then fine-tune unmasked for the final
    `train.unmask_last` fraction of the steps, so the model meets full token sets before sampling."""
    if spec.train.mask_ratio == 0 or step > spec.train.steps * (1 - spec.train.unmask_last):
        return 0.0
    return spec.train.mask_ratio


def _tokens(cfg: DiTConfig, latent_shape: tuple[int, ...]) -> int:
    T = latent_shape[1] // cfg.patch_t if len(latent_shape) == 4 else 1
    return T * (latent_shape[-2] // cfg.patch) * (latent_shape[-1] // cfg.patch)


def _text_encoder(spec: JobSpec, device: torch.device, dtype: torch.dtype) -> TextEncoder | None:
    if spec.model.text != "transformers":
        return None
    from ..models.text import TextEncoder

    assert spec.model.text_encoder is not None  # the spec requires it with model.text: transformers
    return TextEncoder(spec.model.text_encoder, spec.model.text_len, device, dtype)


def _conditioning(
    spec: JobSpec,
    y: torch.Tensor,
    captions: Sequence[str] | None,
    text_encoder: TextEncoder | None,
    device: torch.device,
) -> dict[str, Any]:
    """A batch's conditioning for the model: class ids and/or caption tokens / embeddings."""
    cond = {"y": y if spec.model.num_classes else None}
    if spec.model.text != "none":
        if captions is None:
            raise DataError(f"{spec.data.train}: model.text is {spec.model.text!r} but the loader yields no captions")
        cond["text"] = (
            tokenize_bytes(list(captions), spec.model.text_len).to(device)
            if text_encoder is None
            else text_encoder.encode(list(captions))
        )
    return cond


@contextlib.contextmanager
def _sampling_weights(engine: Engine, ema: EMA | None) -> Iterator[DiT]:
    """Full EMA weights (raw ones without EMA) on every rank, for sampling; collective."""
    import deepspeed

    model = cast(DiT, engine.module)  # the DiT build_engine wrapped
    # Under ZeRO-3 each rank holds a slice of every weight: gather them (all ranks take part).
    with (
        ema.swapped_in(model, gather=True)
        if ema
        else deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
    ):
        yield model


def _sample(
    engine: Engine,
    ema: EMA | None,
    objective: Objective,
    spec: JobSpec,
    latent_shape: tuple[int, ...],
    device: torch.device,
    tracker: Tracker,
    rank: int,
    world: int,
    step: int,
) -> None:
    """Collective: every rank generates and decodes its share of the grid (inference/sampling.py)."""
    with _sampling_weights(engine, ema) as model:
        out = os.path.join(tempfile.mkdtemp(), f"step_{step:08d}.png")
        for path in sample_grid(
            model,
            latent_shape,
            spec.sample,
            spec.vae,
            out,
            device,
            uses_bf16(spec),
            objective=objective,
            rank=rank,
            world=world,
        ):
            tracker.artifact(path, "samples")
        if rank == 0:
            print(f"samples at step {step} → MLflow samples/{os.path.basename(out)}", flush=True)


def _evaluate(
    engine: Engine,
    ema: EMA | None,
    objective: Objective,
    spec: JobSpec,
    loader: LatentLoader | MixedLoader,
    latent_shape: tuple[int, ...],
    device: torch.device,
    tracker: Tracker,
    rank: int,
    world: int,
    step: int,
) -> None:
    """Generated-set quality (evaluate/quality.py): class accuracy and Fréchet distance, to MLflow.
    Collective: each rank generates, decodes and classifies its share in chunks of
    `eval.batch_size` on its device; only the classifier's features travel to rank 0. For a
    video-task model on moving-shapes, rank 0 then scores each task against its baseline on
    `eval.task_clips` held-out clips (evaluate/task_quality.py)."""
    from ..evaluate import quality

    vae = build_vae(spec.vae)
    frames = latent_shape[1] * vae.temporal_downsample if len(latent_shape) == 4 else 1
    name = quality.which_set(loader.manifest.get("classes"), frames)
    video_tasks = spec.train.video_tasks if len(latent_shape) == 4 else None
    run_quality = spec.eval.quality and name is not None and bool(spec.model.num_classes)
    run_tasks = spec.eval.tasks and video_tasks is not None and name == "moving-shapes"
    if not (run_quality or run_tasks):
        return
    t0 = time.perf_counter()
    res = latent_shape[-1] * vae.f  # the pixel resolution the latents decode to
    if hasattr(vae, "net"):
        vae.net.to(device)
    classifier = quality.train_classifier(name, res, frames).to(device) if name is not None else None
    y = torch.arange(spec.model.num_classes).repeat_interleave(spec.eval.per_class)
    sample_spec = spec.sample.model_copy(update={"steps": spec.eval.steps, "seed": spec.sample.seed + 1})
    metrics: dict[str, float] = {}
    with _sampling_weights(engine, ema) as model:
        if run_quality:
            assert classifier is not None and name is not None  # run_quality needs a known set
            mine = generate_chunks(
                model,
                objective,
                latent_shape,
                y,
                len(y),
                sample_spec,
                device,
                uses_bf16(spec),
                spec.eval.batch_size,
                lambda z: quality.classify(classifier, vae.decode(z)),
                rank,
                world,
            )
            parts = gather_chunks(mine, world)
            if parts is not None:
                feats, preds = torch.cat([f for f, _ in parts]), torch.cat([p for _, p in parts])
                metrics.update(quality.score_features(classifier.cpu(), feats, preds, y, name, res, frames))
                print(
                    f"quality at step {step}: class accuracy {metrics['validation/class_accuracy']:.3f}, "
                    f"FD {metrics['validation/fd']:.3f}",
                    flush=True,
                )
        if run_tasks and rank == 0:
            from ..evaluate import task_quality

            assert video_tasks is not None  # run_tasks needs video tasks

            if hasattr(vae, "net"):
                vae.net.cpu()  # task scoring decodes on the CPU
            task_metrics, examples = task_quality.score_tasks(
                model,
                objective,
                vae,
                video_tasks.trained(),
                latent_shape,
                res,
                frames,
                spec.sample.model_copy(update={"steps": spec.eval.steps, "seed": spec.sample.seed + 2}),
                video_tasks.k[1],
                spec.eval.task_clips,
                device,
                classifier.cpu() if classifier is not None else None,
                uses_bf16(spec),
            )
            metrics.update(task_metrics)
            folder = tempfile.mkdtemp()
            for task, (generated, truth, pmask) in examples.items():  # score_tasks' (generated, truth, mask)
                gif = os.path.join(folder, f"{task}_step_{step:08d}.gif")
                tracker.artifact(task_quality.task_gif(generated, truth, pmask, gif), "tasks")
            for task in examples:
                print(
                    f"task {task} at step {step}: PSNR {task_metrics[f'validation/tasks/{task}/psnr']:.2f} dB "
                    f"(baseline {task_metrics[f'validation/tasks/{task}/baseline_psnr']:.2f})",
                    flush=True,
                )
    if rank == 0 and metrics:
        metrics["validation/seconds"] = time.perf_counter() - t0
        tracker.log(metrics, step)
