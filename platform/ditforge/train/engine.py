"""The one place distribution is applied: a DeepSpeed engine around the built model."""

from __future__ import annotations

import os
from typing import Any, Protocol, cast

import torch

from ..spec import JobSpec


class Engine(Protocol):
    """The part of DeepSpeed's engine that ditforge uses. A `deepspeed.DeepSpeedEngine` (what
    `build_engine` returns) satisfies it; a test's fake engine can too. DeepSpeed ships no type
    information, so its own objects (the ZeRO optimizer wrapper, the config) are `Any`."""

    @property
    def module(self) -> torch.nn.Module: ...

    @property
    def optimizer(self) -> Any: ...  # DeepSpeed's (ZeRO / bf16) wrapper around the client optimizer

    @property
    def client_optimizer(self) -> torch.optim.Optimizer: ...  # the AdamW build_engine passes in

    @property
    def lr_scheduler(self) -> Any: ...  # the LambdaLR build_engine passes in

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

    def train(self, mode: bool = True) -> Any: ...

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> Any: ...

    def step(self, *args: Any, **kwargs: Any) -> Any: ...

    def zero_optimization_stage(self) -> int: ...

    def get_lr(self) -> list[float]: ...

    def save_checkpoint(self, save_dir: str, *args: Any, **kwargs: Any) -> Any: ...

    def load_checkpoint(self, load_dir: str, *args: Any, **kwargs: Any) -> tuple[str | None, Any]: ...


def precision(spec: JobSpec) -> str:
    if spec.train.precision != "auto":
        return spec.train.precision
    return "bf16" if spec.resources.use_gpu else "fp32"  # CPU trains in fp32 (gloo has no bf16 path worth it)


def uses_bf16(spec: JobSpec) -> bool:
    """bf16 weights and activations: `bf16`, and `fp8` (whose float8 linears keep bf16 weights)."""
    return precision(spec) in ("bf16", "fp8")


def deepspeed_config(spec: JobSpec, micro_batch: int | None = None, accum: int = 1) -> dict[str, Any]:
    """`micro_batch` / `accum`: the worker's batch plan (train/batch.py); default the spec's fixed batch."""
    extra = dict(spec.deepspeed.model_extra or {})
    # DeepSpeed counts bucket sizes in elements; the gradients it reduces are in the training dtype.
    bucket = int(spec.deepspeed.bucket_mb * 1e6 / (2 if uses_bf16(spec) else 4))
    zero = {
        "stage": spec.deepspeed.zero_stage,
        "reduce_bucket_size": bucket,
        "allgather_bucket_size": bucket,
        "overlap_comm": spec.deepspeed.overlap_comm,
        "contiguous_gradients": True,
        **extra.pop("zero_optimization", {}),
    }
    if spec.deepspeed.zero_stage == 3:
        zero.setdefault("stage3_prefetch_bucket_size", bucket)
    cfg = {
        "train_micro_batch_size_per_gpu": micro_batch or spec.data.fixed_batch(),
        "gradient_accumulation_steps": accum,
        "gradient_clipping": spec.train.grad_clip,
        "zero_optimization": zero,
        # check_grad_overflow off drops the host syncs of DeepSpeed's bf16 overflow check (the NaN
        # guard already skips non-finite steps on the device, train/nonfinite.py).
        "bf16": {"enabled": uses_bf16(spec), "check_grad_overflow": spec.deepspeed.overflow_check},
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
        for blk in [*cast(torch.nn.ModuleList, model.mixer), *cast(torch.nn.ModuleList, model.blocks)]:
            blk.compile()


def convert_fp8(model: torch.nn.Module, device: torch.device) -> int:
    """`train.precision: fp8`: the transformer blocks' attention and MLP linears become torchao
    Float8Linear (dynamic per-tensor scaling: e4m3 forward, e5m2 gradients; bf16 weights stay the
    master copy). The small-M linears (timestep embedder, adaLN, final layer) stay bf16: their
    GEMMs are too small for fp8 to pay. Idempotent; → number of layers converted."""
    done: int | None = getattr(model, "_ditforge_fp8", None)
    if done is not None:
        return done
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        what = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        raise ValueError(
            f"train.precision: fp8 needs a GPU of compute capability 8.9+ (Ada, Hopper or later); "
            f"this worker has {what}"
        )
    return _swap_fp8(model)


def _swap_fp8(model: torch.nn.Module) -> int:
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError:
        raise ValueError("train.precision: fp8 needs torchao (pip install 'ditforge[fp8]')") from None

    def wanted(mod: torch.nn.Module, fqn: str) -> bool:
        # torchao's fp8 GEMMs need both dimensions divisible by 16
        parts = fqn.split(".")
        return (
            isinstance(mod, torch.nn.Linear)
            and parts[0] in ("blocks", "mixer")
            and ("attn" in parts or "mlp" in parts)
            and mod.in_features % 16 == 0
            and mod.out_features % 16 == 0
        )

    n = sum(1 for name, m in model.named_modules() if wanted(m, name))
    convert_to_float8_training(model, module_filter_fn=wanted)
    setattr(model, "_ditforge_fp8", n)  # a plain int on the module (nn.Module's typed setattr takes tensors)
    return n


def no_shm_all_reduce() -> None:
    """Call before `deepspeed.init_distributed` on CPU. DeepSpeed's CPU backend JIT-compiles a
    shared-memory all-reduce (deepspeed_shm_comm) when it sets up communication: ~65 CPU-seconds,
    and again whenever a process finds another `ninja` on PATH than the one that built the cached
    copy (the venv's 1.13 in Ray workers, the system's 1.11 in a shell: each switch rebuilt it).
    Only DeepSpeed's inference all-reduce uses it, never training; marked unavailable, gloo's
    all-reduce serves."""
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def build_engine(model: torch.nn.Module, spec: JobSpec, micro_batch: int | None = None, accum: int = 1) -> Engine:
    import deepspeed

    if precision(spec) == "fp8":  # before compile: the float8 casts then fuse into the compiled blocks
        convert_fp8(
            model,
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"),
        )
    compile_model(model, compile_mode(spec))

    if not spec.resources.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        no_shm_all_reduce()
    # Ray Train has already formed the process group (gloo on CPU); DeepSpeed adopts it.
    deepspeed.init_distributed(dist_backend="nccl" if spec.resources.use_gpu else "gloo")
    # fused (CPU kernels too): it honours `found_inf`, which skips a non-finite step without a
    # host sync (train/nonfinite.py).
    # only what trains: under train.lora the frozen base has no gradients and no optimizer state
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=spec.train.lr,
        weight_decay=spec.train.weight_decay,
        betas=(0.9, 0.999),
        fused=True,
    )
    warmup = spec.train.warmup
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=opt, lr_scheduler=sched, config=deepspeed_config(spec, micro_batch, accum)
    )
    return cast(Engine, engine)


def scale_lr(engine: Engine, spec: JobSpec, world: int) -> None:
    """Elastic, `resources.lr_scaling`: the schedule's base LR at `world` workers. Applied after a
    (resharded) load, which restores the saved base LR; with `none` (the default) nothing changes."""
    if spec.resources.lr_scaling == "none":
        return
    sched = engine.lr_scheduler
    sched.base_lrs = [spec.train.lr * spec.resources.lr_factor(world) for _ in sched.base_lrs]
    for group, base, fn in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["lr"] = base * fn(sched.last_epoch)  # the LR of the next step, as LambdaLR would set it
