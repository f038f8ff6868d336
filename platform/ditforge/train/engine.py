"""The one place distribution is applied: a DeepSpeed engine around the built model."""

from __future__ import annotations

import os

import torch

from ..spec import JobSpec


def precision(spec: JobSpec) -> str:
    if spec.train.precision != "auto":
        return spec.train.precision
    return "bf16" if spec.resources.use_gpu else "fp32"  # CPU trains in fp32 (gloo has no bf16 path worth it)


def deepspeed_config(spec: JobSpec) -> dict:
    extra = dict(spec.deepspeed.model_extra or {})
    # DeepSpeed counts bucket sizes in elements; the gradients it reduces are in the training dtype.
    bucket = int(spec.deepspeed.bucket_mb * 1e6 / (2 if precision(spec) == "bf16" else 4))
    zero = {"stage": spec.deepspeed.zero_stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket,
            "overlap_comm": spec.deepspeed.overlap_comm, "contiguous_gradients": True, **extra.pop("zero_optimization", {})}
    if spec.deepspeed.zero_stage == 3:
        zero.setdefault("stage3_prefetch_bucket_size", bucket)
    cfg = {
        "train_micro_batch_size_per_gpu": spec.data.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": spec.train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision(spec) == "bf16"},
        "fp16": {"enabled": False},
        # torch's AdamW as a client optimizer: DeepSpeed's CPU Adam drifts ~1e-6 after a reload,
        # which would break exact resume.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # we log ourselves, to MLflow
        "wall_clock_breakdown": False,
    }
    cfg.update(extra)  # anything else in the spec's `deepspeed:` section passes through untouched
    return cfg


def compile_mode(spec: JobSpec) -> str:
    if spec.model.compile != "auto":
        return spec.model.compile
    return "blocks" if spec.resources.use_gpu else "off"


def compile_model(model: torch.nn.Module, mode: str) -> None:
    """torch.compile in place. `blocks` compiles each transformer block on its own: the blocks share
    one code object, so dynamo compiles once and every block reuses it (torchtitan's regional
    compile), and DeepSpeed's hooks around the blocks stay outside the graphs."""
    if mode == "full":
        model.compile()
    elif mode == "blocks":
        for blk in [*model.mixer, *model.blocks]:
            blk.compile()


def build_engine(model: torch.nn.Module, spec: JobSpec):
    import deepspeed

    compile_model(model, compile_mode(spec))

    if not spec.resources.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # Ray Train has already formed the process group (gloo on CPU); DeepSpeed adopts it.
    deepspeed.init_distributed(dist_backend="nccl" if spec.resources.use_gpu else "gloo")
    # fused (CPU kernels too): it honours `found_inf`, which skips a non-finite step without a
    # host sync (train/nonfinite.py).
    opt = torch.optim.AdamW(model.parameters(), lr=spec.train.lr, weight_decay=spec.train.weight_decay,
                            betas=(0.9, 0.999), fused=True)
    warmup = spec.train.warmup
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                           config=deepspeed_config(spec))
    return engine


def scale_lr(engine, spec: JobSpec, world: int) -> None:
    """Elastic, `resources.lr_scaling`: the schedule's base LR at `world` workers. Applied after a
    (resharded) load, which restores the saved base LR; with `none` (the default) nothing changes."""
    if spec.resources.lr_scaling == "none":
        return
    sched = engine.lr_scheduler
    sched.base_lrs = [spec.train.lr * spec.resources.lr_factor(world) for _ in sched.base_lrs]
    for group, base, fn in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["lr"] = base * fn(sched.last_epoch)  # the LR of the next step, as LambdaLR would set it
