"""Training-step throughput, MFU and per-rank memory: ditforge's step vs a plain PyTorch loop.

Both loops run in the same processes, timed in alternating blocks (A B A B ...) so machine noise
hits both alike; ratio_to_baseline = ditforge samples/s / baseline samples/s.

  - `ditforge`: the worker's own pieces: the model built from a JobSpec, `train.engine.build_engine`
    (DeepSpeed, torch.compile per `model.compile`), `train.step.train_step` (objective loss,
    backward, step, EMA), noise drawn on the device.
  - `baseline`: the loop people write by hand: the same DiT and objective, fp32 weights with bf16
    autocast on GPU, DDP when there are several ranks, torch AdamW (fused on GPU), an EMA with
    `torch._foreach_lerp_`. Eager, no DeepSpeed.

CPU configuration (always): DiT-S/2 on 4x32x32 latents, 2 ranks (gloo), ZeRO-2; per-rank memory
for ZeRO 0/1/2/3 counted from the tensors the engine holds (parameters, gradients, optimizer
state), plus the process RSS.
GPU configuration (CUDA present, one GPU, bf16): DiT-B/2 and DiT-XL/2 at 4x32x32 latents
(256x256 pixels), the largest batch that fits (probed), activation checkpointing off/on, compile
off/on; ZeRO 0/1/2 step time and peak memory; each attention kernel's forward+backward at the
XL/2 shapes; a torch.profiler table of the top kernels and the host syncs per step.

FLOPs per step = 3 x forward FLOPs x batch: forward FLOPs are counted by
`models.dit.forward_flops` (torch's FlopCounterMode: every matmul and attention product, 2 FLOPs
per multiply-add), backward = 2x forward. Activation checkpointing recomputes the forward, which
is not counted (model FLOPs, as in the PaLM MFU definition). MFU = achieved FLOP/s / peak, with
the peak from a table of known devices and, reported beside it, a large bf16 matmul measured in
the same run.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import time
import traceback
import types
from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..models import attention
from ..models.dit import DiT, dit_config, forward_flops
from ..objectives import build_objective
from ..spec import JobSpec
from .common import device_name, free_port

# Dense bf16 peaks (TFLOP/s, without sparsity) of known devices.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 125.0}
LATENT = (4, 32, 32)  # 256x256 images through an f8 VAE


def known_peak() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def measured_peak_tflops(device: torch.device) -> float:
    """A large matmul's FLOP/s here (bf16 on GPU; fp32 on CPU, per rank's threads)."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    reps = 20 if device.type == "cuda" else 3
    for _ in range(3):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _peak(device: torch.device, before: int) -> int:
    """GPU: the peak allocated by this loop alone (what earlier, not yet freed models hold is
    taken off); CPU: the process RSS."""
    return torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else _rss()


def _spec(v: dict, world: int, use_gpu: bool) -> JobSpec:
    d: dict[str, Any] = {
        "name": "bench",
        "data": {"train": "file:///unused", "batch_size": v["batch"]},
        "model": {
            "size": v["size"],
            "patch": 2,
            "num_classes": 1000,
            "grad_checkpointing": v["ckpt"],
            "compile": v["compile"],
        },
        "deepspeed": {"zero_stage": v["zero"], "overlap_comm": v.get("overlap_comm", False)},
        "resources": {"workers": world, "use_gpu": use_gpu},
        "train": {"warmup": 0, "lr": 1e-4, "grad_clip": 1.0, "ema_decay": 0.9999},
    }
    for section, over in v.get("set", {}).items():  # an ablation lever's switches (LEVERS)
        d[section] = {**d.get(section, {}), **over}
    return JobSpec.model_validate(d)


# ------------------------------------------------------------------------------ the ablation levers

# Each lever is measured alone against the ditforge step with the defaults (A B A B timing), through
# the worker's own `train_step`. `set`: the spec switches it turns on; `needs_cuda`: skipped on CPU;
# `status`: not measured, and why. A lever whose switch pays stays off until a GPU run shows it does.
LEVERS: list[dict[str, Any]] = [
    {
        "name": "compile_full",
        "needs_cuda": True,
        "set": {"model": {"compile": "full"}},
        "what": "torch.compile of the whole model instead of each block (regional)",
    },
    {
        "name": "bf16_no_overflow_check",
        "needs_cuda": True,
        "set": {"deepspeed": {"overflow_check": False}},
        "what": "deepspeed.overflow_check: false (bf16.check_grad_overflow): no per-step host read of the overflow flag",
    },
    {
        "name": "clip_no_item",
        "covered_by": "bf16_no_overflow_check",
        "what": "DeepSpeed 0.19.8 clips with the norm as a device tensor (get_grad_norm_direct, clamp); in bf16 its "
        "host reads come from the overflow check, so the switch above removes both",
    },
    {
        "name": "no_clip_upper_bound",
        "needs_cuda": False,
        "set": {"train": {"grad_clip": 0.0}},
        "what": "train.grad_clip: 0, the most any cheaper clipping could gain (not a setting to keep)",
    },
    {
        "name": "fused_adamw",
        "status": "in the baseline",
        "what": "torch's fused AdamW already steps DeepSpeed's flat fp32 partitions (ZeRO 1-2); foreach would not "
        "honour the NaN guard's found_inf",
    },
    {
        "name": "cuda_graphs",
        "needs_cuda": True,
        "status": "not implemented",
        "what": "CUDA graphs of the step: DeepSpeed's ZeRO-2 step allocates and buckets on the host",
    },
    {
        "name": "ema_in_optimizer",
        "status": "not implemented",
        "what": "the EMA lerp folded into the optimizer's pass over the flat partitions",
    },
]


def ablation(v: dict, rank: int, world: int, device: torch.device) -> list[dict]:
    """One row per lever: its step time against the default ditforge step, measured side by side."""
    rows: list[dict] = []
    base: Loops | None = None
    for lever in LEVERS:
        row: dict[str, Any] = {k: lever[k] for k in ("name", "what") if k in lever}
        if lever.get("needs_cuda") and device.type != "cuda":
            rows.append(row | {"status": "skipped: needs CUDA"})
            continue
        if "covered_by" in lever or "status" in lever:
            rows.append(row | {"status": lever.get("status") or f"covered by {lever['covered_by']}"})
            continue
        try:
            if base is None:
                base = Loops(v, rank, world, device)
            alt = Loops(dict(v, set=lever["set"]), rank, world, device)
            t = _side_by_side(types.SimpleNamespace(baseline=base.ditforge, ditforge=alt.ditforge), v, device, world)
            row |= {
                "status": "measured",
                "set": lever["set"],
                "step_s": round(t["ditforge"], 5),
                "baseline_step_s": round(t["baseline"], 5),
                "speedup": round(t["baseline"] / t["ditforge"], 3),
            }
            del alt
        except Exception as e:  # a lever that fails (a compile error, OOM) must not hide the others
            row |= {"status": "error", "error": f"{type(e).__name__}: {str(e)[:300]}"}
            traceback.print_exc()
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------ the two loops


class StepPair(Protocol):
    """Two steps timed side by side (`_side_by_side`): a `Loops`, or two ditforge steps (the levers)."""

    @property
    def baseline(self) -> Callable[[], object] | None: ...

    @property
    def ditforge(self) -> Callable[[], object]: ...


class Loops:
    """The ditforge step and the baseline step for one variant, on one rank."""

    def __init__(self, v: dict, rank: int, world: int, device: torch.device):
        from ..train.ema import EMA
        from ..train.engine import build_engine
        from ..train.nonfinite import NonFiniteGuard
        from ..train.step import step_generator, train_step

        use_gpu = device.type == "cuda"
        spec = _spec(v, world, use_gpu)
        cfg = dit_config(spec.model, LATENT[0])
        dtype = torch.bfloat16 if use_gpu else torch.float32
        cfg.attention = attention.resolve(spec.model.attention, device, dtype, cfg.hidden // cfg.heads)
        self.cfg, self.backend = cfg, cfg.attention
        objective = build_objective(spec.objective)
        B = v["batch"]
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(B, *LATENT, generator=g).to(device)
        cond = {"y": torch.randint(0, 1000, (B,), generator=g).to(device)}
        self.step_no = 0

        torch.manual_seed(0)
        with device:  # initialised where it trains: an XL model takes seconds to initialise on a CPU
            model = DiT(cfg)
        if v.get("lora"):  # train.lora's adapters (the worker injects them after model.init_from)
            from ..models import lora
            from ..spec import LoraSpec

            lora.apply(model, LoraSpec(rank=v["lora"]))
        self.params = sum(p.numel() for p in model.parameters())
        self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        engine = build_engine(model, spec)
        ema = EMA(engine.module, spec.train.ema_decay)
        guard = NonFiniteGuard(engine.client_optimizer, device, spec.train.max_nonfinite_steps)
        xd = x.to(dtype)
        self.engine, self.ema = engine, ema

        def ditforge_step() -> torch.Tensor:
            self.step_no += 1
            return train_step(
                engine,
                objective,
                xd,
                cond,
                step_generator(0, self.step_no, rank, device),
                0.0,
                ema,
                guard,
                self.step_no,
            )[0]

        self.ditforge = ditforge_step
        self.baseline: Callable[[], None] | None = None
        self._args = (objective, x, cond, rank, world, device)

    def add_baseline(self) -> None:
        """Built after the ditforge loop's memory was measured, so that figure is its own."""
        objective, x, cond, rank, world, device = self._args
        use_gpu = device.type == "cuda"
        cfg = self.cfg
        from ..train.step import step_generator

        torch.manual_seed(0)
        with device:  # the plain loop's attention is SDPA's flash kernel (the math kernel on CPU)
            model = DiT(dataclasses.replace(cfg, attention="sdpa_flash" if use_gpu else "math"))
        net = (
            torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if use_gpu else None)
            if world > 1
            else model
        )
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=use_gpu or None)
        shadow = [p.detach().clone().float() for p in model.parameters()]
        params = list(model.parameters())

        def baseline_step() -> None:
            self.step_no += 1
            with torch.autocast(device.type, torch.bfloat16, enabled=use_gpu):
                loss = objective.loss(net, x, cond, step_generator(0, self.step_no, rank, device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
            opt.step()
            with torch.no_grad():
                torch._foreach_lerp_(shadow, [p.detach().float() for p in params], 1 - 0.9999)

        self.baseline = baseline_step


def _timed(step: Callable[[], object], n: int, device: torch.device, world: int) -> float:
    _sync(device)
    if world > 1:
        dist.barrier()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    _sync(device)
    if world > 1:
        dist.barrier()
    return (time.perf_counter() - t0) / n


def _side_by_side(loops: StepPair, v: dict, device: torch.device, world: int) -> dict[str, float]:
    assert loops.baseline is not None  # add_baseline() ran
    for _ in range(v["warmup"]):  # compiles, autotunes, allocates
        loops.baseline()
        loops.ditforge()
    times: dict[str, list[float]] = {"baseline": [], "ditforge": []}
    for _ in range(v["rounds"]):
        times["baseline"].append(_timed(loops.baseline, v["steps"], device, world))
        times["ditforge"].append(_timed(loops.ditforge, v["steps"], device, world))
    return {k: sorted(t)[len(t) // 2] for k, t in times.items()}


def state_bytes(engine: Any) -> dict[str, int]:
    """Bytes this rank holds, by kind, counting each storage once.

    params: the module's weights (under ZeRO-3 only this rank's `ds_tensor` slice: the full
    `param.data` exists only inside forward/backward). grads: gradients kept between steps
    (`p.grad`, DeepSpeed's gradient partitions). optimizer: everything else the optimizer holds:
    fp32 master partitions and the inner torch optimizer's moments. DeepSpeed's communication
    buckets (name-mangled private attributes) are left out: they are buffers, not state."""
    seen: set[int] = set()
    out = {"params": 0, "grads": 0, "optimizer": 0}

    def add(t: object, kind: str) -> None:
        if isinstance(t, torch.Tensor) and t.numel():
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                out[kind] += t.untyped_storage().nbytes()

    def walk(o: object, kind: str, depth: int = 0) -> None:
        if depth > 3:
            return
        if isinstance(o, torch.Tensor):
            add(o, kind)
        elif isinstance(o, dict):
            for x in o.values():
                walk(x, kind, depth + 1)
        elif isinstance(o, (list, tuple)):
            for x in o:
                walk(x, kind, depth + 1)
        elif isinstance(o, torch.optim.Optimizer):
            walk(o.state, kind, depth + 1)
            walk([g["params"] for g in o.param_groups], kind, depth + 1)

    for p in engine.module.parameters():
        add(getattr(p, "ds_tensor", None) if hasattr(p, "ds_tensor") else p.data, "params")
        add(p.grad, "grads")
    opt = engine.optimizer
    if isinstance(opt, torch.optim.Optimizer):  # ZeRO-0: the client optimizer itself
        walk(opt, "optimizer")
    else:
        for name, val in vars(opt).items():
            if name in ("module", "_global_grad_norm") or name.startswith("_DeepSpeedZeroOptimizer"):
                continue
            walk(val, "grads" if "grad" in name else "optimizer")
    return out


# ------------------------------------------------------------------------------ fp8 against bf16

FP8_STEPS = 500
FP8_TOLERANCE = 0.05  # max relative difference of the two curves' 50-step window means


def fp8_curve(v: dict, rank: int, world: int, device: torch.device) -> dict:
    """bf16 and fp8 (train.precision) from the same seed, weights and batch, `steps` steps each through
    the worker's `train_step`: the loss at every step, samples/s after the first 10 (compile).
    The curves agree when every 50-step window's mean loss is within FP8_TOLERANCE (relative)."""
    out = {
        "model": f"DiT-{v['size']}/2",
        "batch_per_worker": v["batch"],
        "steps": v["steps"],
        "name": v["name"],
        "tolerance": FP8_TOLERANCE,
    }
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        return out | {"status": "skipped: needs CUDA (compute capability 8.9+)"}
    curves: dict[str, list[float]] = {}
    rate: dict[str, float] = {}
    for prec in ("bf16", "fp8"):
        gc.collect()
        torch.cuda.empty_cache()
        try:
            loops = Loops(dict(v, set={"train": {"precision": prec}}), rank, world, device)
            losses = []
            for i in range(v["steps"]):
                if i == 10:
                    _sync(device)
                    t0 = time.perf_counter()
                losses.append(loops.ditforge())
            _sync(device)
            rate[prec] = round(v["batch"] * world * (v["steps"] - 10) / (time.perf_counter() - t0), 2)
            curves[prec] = [round(x, 5) for x in torch.stack(losses).float().tolist()]
            del loops
        except Exception as e:
            traceback.print_exc()
            return out | {"status": "error", "error": f"{prec}: {type(e).__name__}: {str(e)[:300]}"}
    w = 50
    means = {p: [sum(c[i : i + w]) / len(c[i : i + w]) for i in range(0, len(c), w)] for p, c in curves.items()}
    rel = max(abs(a - b) / abs(a) for a, b in zip(means["bf16"], means["fp8"]))
    return out | {
        "status": "measured",
        "samples_per_s": rate,
        "speedup": round(rate["fp8"] / rate["bf16"], 3),
        "window_means": means,
        "max_rel_window_diff": round(rel, 4),
        "agree": rel <= FP8_TOLERANCE,
        "loss": curves,
    }


# ------------------------------------------------------------------------------ LoRA against full fine-tuning

LORA_RANK = 16


def lora_vs_full(v: dict, rank: int, world: int, device: torch.device) -> dict:
    """The same step (`train_step`, DeepSpeed, EMA) with every weight training and with train.lora's
    default adapters (rank `v['lora']`) on the frozen model: trainable parameters, step time and
    memory. Memory: the state the engine holds per rank (weights, gradients, optimizer: `state_bytes`),
    and on a GPU the step's peak allocation."""
    out: dict[str, Any] = {"model": f"DiT-{v['size']}/2", "batch_per_worker": v["batch"], "lora_rank": v["lora"]}
    for mode in ("full", "lora"):
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            before = _allocated(device)
            loops = Loops(dict(v, lora=v["lora"] if mode == "lora" else 0), rank, world, device)
            for _ in range(v["warmup"]):
                loops.ditforge()
            step_s = min(_timed(loops.ditforge, v["steps"], device, world) for _ in range(v["rounds"]))
            state = state_bytes(loops.engine)
            out[mode] = {
                "params": loops.params,
                "trainable_params": loops.trainable,
                "step_s": round(step_s, 5),
                "samples_per_s": round(v["batch"] * world / step_s, 2),
                "state_bytes": state,
                "state_mb": round(sum(state.values()) / 1e6, 2),
                "peak_mem_bytes": _peak(device, before) if device.type == "cuda" else None,
            }
            del loops
        except Exception as e:
            traceback.print_exc()
            out[mode] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    f, lo = out["full"], out["lora"]
    if "step_s" in f and "step_s" in lo:
        out["trainable_fraction"] = round(lo["trainable_params"] / f["trainable_params"], 5)
        out["step_time_ratio"] = round(lo["step_s"] / f["step_s"], 3)
        out["state_ratio"] = round(sum(lo["state_bytes"].values()) / sum(f["state_bytes"].values()), 3)
    return out


# ------------------------------------------------------------------------------ GPU extras


def largest_batch(v: dict, device: torch.device, cap: int) -> int:
    """The largest multiple of 16 whose ditforge and baseline steps, both loops' states resident,
    fit 80% of the device, capped (bigger batches stop raising throughput long before memory runs
    out): the training probe's search (train/batch.py) over real steps of both loops, eager
    (compiled graphs use less, so this is safe). Two first probes give memory per sample, and the
    search starts at the linear estimate, which saves most of the doubling."""
    from ..train.batch import DoesNotFit, largest_fitting

    def measure(b: int) -> int:
        loops: Loops | None
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            loops = Loops(dict(v, batch=b, compile="off", ckpt=False), 0, 1, device)
            loops.add_baseline()
            loops.ditforge()
            assert loops.baseline is not None  # add_baseline() set it
            loops.baseline()
            _sync(device)
            return torch.cuda.max_memory_allocated(device)
        except torch.OutOfMemoryError as e:
            raise DoesNotFit(str(e)) from None
        finally:
            loops = None
            gc.collect()
            torch.cuda.empty_cache()

    budget = int(0.8 * torch.cuda.get_device_properties(device).total_memory)
    p8, p16 = measure(8), measure(16)
    per = max((p16 - p8) / 8, 1)
    start = max(16, min(cap, int((budget - (p8 - 8 * per)) / per) // 16 * 16))
    return max(16, largest_fitting(measure, budget, multiple=16, cap=cap, start=start))


def profile_step(loops: Loops, device: torch.device, steps: int = 3) -> dict:
    """Top kernels by GPU time, and the host syncs per step (each stalls the CPU until the GPU
    catches up, so the next kernels cannot be queued ahead)."""
    from torch.profiler import ProfilerActivity, profile

    _sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            loops.ditforge()
        _sync(device)
    events = prof.key_averages()
    kernels = [e for e in events if e.device_time_total > 0 and e.device_type.name == "CUDA"]
    total = sum(e.device_time_total for e in kernels) or 1
    top = sorted(kernels, key=lambda e: e.device_time_total, reverse=True)[:12]
    syncs = {
        e.key: e.count / steps
        for e in events
        if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "aten::_local_scalar_dense", "aten::item")
    }
    return {
        "top_kernels": [
            {
                "name": e.key[:90],
                "share": round(e.device_time_total / total, 4),
                "ms_per_step": round(e.device_time_total / steps / 1e3, 3),
            }
            for e in top
        ],
        "host_syncs_per_step": syncs,
    }


def sync_sources(loops: Loops, device: torch.device) -> list[str]:
    """Where the step's host syncs come from: torch's sync debug mode warns at each synchronising
    call, and the warning names the Python line that made it."""
    import warnings

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loops.ditforge()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    _sync(device)
    where = {f"{'/'.join(w.filename.split('/')[-3:])}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)}
    return sorted(where)


# ------------------------------------------------------------------------------ one process per rank


def _worker(rank: int, cfg: dict, port: int, queue: Any) -> None:
    world, use_gpu = cfg["world"], cfg["device"] == "cuda"
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if use_gpu else "cpu")
    torch.set_num_threads(cfg["threads"])
    device = torch.device("cuda", rank) if use_gpu else torch.device("cpu")
    if use_gpu:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    dist.init_process_group("nccl" if use_gpu else "gloo", rank=rank, world_size=world)
    put = lambda kind, row: queue.put((rank, kind, row))  # noqa: E731
    try:
        put("peak", measured_peak_tflops(device))
        batch = cfg.get("batch")
        if batch == "auto":  # one probe per model: every variant (and the ZeRO rows) use that batch
            batch = largest_batch(cfg["variants"][0], device, cfg["cap"])
        # Memory per rank (and the step time) per ZeRO stage, eager, before any compiled variant
        # (dynamo's caches keep earlier models alive, which would inflate these peaks).
        for z in cfg.get("zero_stages", []):
            gc.collect()
            if use_gpu:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            v = dict(cfg["zero_variant"], **z, batch=batch)
            row = dict(z)
            try:
                before = _allocated(device)
                loops = Loops(v, rank, world, device)
                for _ in range(v["warmup"]):
                    loops.ditforge()
                row["step_s"] = min(_timed(loops.ditforge, v["steps"], device, world) for _ in range(v["rounds"]))
                row["state_bytes"] = state_bytes(loops.engine)
                row["peak_mem_bytes"] = _peak(device, before)
                del loops
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                traceback.print_exc()
            put("zero", row)
        for v in cfg["variants"]:
            v = dict(v, batch=batch)
            row = {"variant": v}
            try:
                gc.collect()
                if use_gpu:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                before = _allocated(device)
                loops = Loops(v, rank, world, device)
                loops.ditforge()  # the first step compiles and allocates: memory is at its peak after it
                loops.ditforge()
                _sync(device)
                row["peak_mem_bytes"] = _peak(device, before)
                loops.add_baseline()
                row["step_s"] = _side_by_side(loops, v, device, world)
                row["attention_backend"] = loops.backend
                row["variant"] = v
                if use_gpu and v.get("profile"):
                    try:
                        row["profile"] = profile_step(loops, device)
                        row["profile"]["sync_sources"] = sync_sources(loops, device)
                    except Exception as e:  # the profile is an extra: keep the timings without it
                        row["profile"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                del loops
            except Exception as e:  # one variant's failure (OOM, compile) must not hide the others
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                traceback.print_exc()
            put("variant", row)
        if cfg.get("ablation"):
            put("ablation", ablation(dict(cfg["variants"][0], batch=batch), rank, world, device))
        if cfg.get("fp8_curve"):
            put("fp8", fp8_curve(dict(cfg["fp8_curve"], batch=batch), rank, world, device))
        if cfg.get("lora"):
            put("lora", lora_vs_full(dict(cfg["lora"], batch=batch), rank, world, device))
    finally:
        put("done", None)
        dist.destroy_process_group()


def run_config(cfg: dict, on_row: Callable[[dict], object] | None = None) -> dict:
    """Run one configuration in `world` fresh processes; `on_row(result)` after each message so a
    caller can write partial results (a GPU run may be cut short)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, cfg, port, queue)) for r in range(cfg["world"])]
    for p in procs:
        p.start()
    result: dict = {"variants": [], "zero": {}, "peak": None, "ablation": None, "fp8": None, "lora": None}
    done = 0
    while done < len(procs):
        try:
            rank, kind, row = queue.get(timeout=30)
        except Exception:  # queue.Empty: check that the workers are still alive
            if not any(p.is_alive() for p in procs):
                break
            continue
        if kind == "done":
            done += 1
        elif rank != 0:
            continue  # rank 0 speaks for the configuration (ranks are timed in lock-step)
        elif kind == "peak":
            result["peak"] = row
        elif kind == "variant":
            result["variants"].append(row)
        elif kind == "zero":
            result["zero"][f"zero{row['zero']}" + ("_overlap_comm" if row.get("overlap_comm") else "")] = row
        elif kind in ("ablation", "fp8", "lora"):
            result[kind] = row
        if on_row:
            on_row(result)
    for p in procs:
        p.join(timeout=60)
        if p.is_alive():
            p.kill()
    return result


def plan(quick: bool, focus: bool = False) -> list[dict]:
    """GPU: one batch per model (the largest that fits without activation checkpointing), so the
    variants differ only in checkpointing and compile, dynamo compiles each model's block once, and
    no second shape switches it to dynamic-shape kernels. XL first: it is the headline figure, with
    the ablation of the levers beside it; then bf16 against fp8 over `FP8_STEPS` steps at B/2.
    `focus` (the GPU script's first pass, bench/gpu_run.sh): only those three, no ZeRO-stage rows,
    no checkpointing / eager variants, no B/2 throughput rows."""
    configs = []
    if torch.cuda.is_available():
        t = dict(zero=2, warmup=2, steps=3, rounds=3)
        for size, cap in (("XL", 256), ("B", 512)):
            if focus and size != "XL":
                continue
            variants = [
                dict(
                    t,
                    size=size,
                    ckpt=ckpt,
                    compile=comp,
                    profile=(comp == "blocks" and not ckpt),
                    name=f"gpu-dit-{size.lower()}2-256-{'ckpt' if ckpt else 'nockpt'}-{comp}",
                )
                for ckpt in (False, True)
                for comp in ("blocks", "off")
                if not focus or (comp == "blocks" and not ckpt)
            ]  # the headline variant first
            configs.append(
                dict(
                    device="cuda",
                    world=1,
                    threads=8,
                    variants=variants,
                    batch="auto",
                    cap=cap,
                    ablation=size == "XL",
                    zero_stages=(
                        [{"zero": 0}, {"zero": 1}, {"zero": 2}, {"zero": 2, "overlap_comm": True}]
                        if size == "XL" and not focus
                        else []
                    ),
                    zero_variant=dict(t, size=size, ckpt=False, compile="off", rounds=2),
                )
            )
        configs.append(
            dict(
                device="cuda",
                world=1,
                threads=8,
                variants=[],
                batch=64,
                fp8_curve=dict(
                    size="B",
                    ckpt=False,
                    compile="blocks",
                    zero=2,
                    steps=50 if quick else FP8_STEPS,
                    name="gpu-dit-b2-256-bf16-vs-fp8",
                ),
            )
        )
    size = "T" if quick else "S"
    v = dict(
        size=size,
        ckpt=False,
        compile="off",
        zero=2,
        warmup=1,
        steps=2 if quick else 3,
        rounds=2 if quick else 5,
        name=f"cpu-dit-{size.lower()}2-32x32-2workers-zero2",
    )
    configs.append(
        dict(
            device="cpu",
            world=2,
            threads=1,
            variants=[v],
            batch=2 if quick else 8,
            ablation=True,
            zero_stages=[{"zero": z} for z in (0, 1, 2, 3)],
            zero_variant=dict(v, warmup=1, steps=1, rounds=1),
            fp8_curve=dict(size=size, ckpt=False, compile="off", zero=2, steps=FP8_STEPS, name="fp8-curve-cpu"),
        )
    )
    return configs


def rows_of(cfg: dict, r: dict) -> list[dict]:
    """One JSON row per variant, with the derived figures."""
    rows = []
    world = cfg["world"]
    known = known_peak() if cfg["device"] == "cuda" else None
    measured = r["peak"]
    for vr in r["variants"]:
        v = vr["variant"]
        row = {
            "name": v["name"],
            "device": device_name(),
            "torch": torch.__version__,
            "model": f"DiT-{v['size']}/2",
            "latent": list(LATENT),
            "workers": world,
            "batch_per_worker": v["batch"],
            "zero_stage": v["zero"],
            "activation_checkpointing": v["ckpt"],
            "compile": v["compile"],
        }
        if "error" in vr:
            rows.append(row | {"error": vr["error"]})
            continue
        dcfg = dit_config(_spec(v, world, cfg["device"] == "cuda").model, LATENT[0])
        flops_step = 3 * forward_flops(dcfg, LATENT) * v["batch"]  # per rank
        ds_s, base_s = vr["step_s"]["ditforge"], vr["step_s"]["baseline"]
        tflops = flops_step / ds_s / 1e12
        row |= {
            "samples_per_s": round(v["batch"] * world / ds_s, 2),
            "step_s": round(ds_s, 4),
            "tflops": round(tflops, 3),
            "flops_per_sample_step": flops_step // v["batch"],
            "mfu": round(tflops / known, 4) if known else None,
            "mfu_vs_measured_matmul": round(tflops / measured, 4) if measured else None,
            "peak_tflops_table": known,
            "peak_tflops_measured_matmul": round(measured, 2) if measured else None,
            "baseline_samples_per_s": round(v["batch"] * world / base_s, 2),
            "baseline_step_s": round(base_s, 4),
            "baseline_tflops": round(flops_step / base_s / 1e12, 3),
            "ratio_to_baseline": round(base_s / ds_s, 3),
            "peak_mem_bytes": vr["peak_mem_bytes"],
            "attention_backend": vr["attention_backend"],
        }
        if "profile" in vr:
            row["profile"] = vr["profile"]
        rows.append(row)
    if r["zero"] and rows:
        z = r["zero"]
        rows[-1]["zero_stages"] = z
        if "zero0" in z and "zero3" in z and "state_bytes" in z["zero0"] and "state_bytes" in z["zero3"]:
            # Parameters + optimizer state per rank, the figure ZeRO-3 is meant to halve at 2 ranks.
            po = {k: z[k]["state_bytes"]["params"] + z[k]["state_bytes"]["optimizer"] for k in ("zero0", "zero3")}
            rows[-1]["zero3_over_zero0_state"] = round(po["zero3"] / po["zero0"], 3)
    if r["ablation"] and rows:
        rows[0]["ablation"] = r["ablation"]
    if r["fp8"]:
        rows.append({"name": r["fp8"]["name"], "device": device_name(), "torch": torch.__version__} | r["fp8"])
    if r.get("lora"):
        rows.append(
            {"name": cfg["lora"]["name"], "device": device_name(), "torch": torch.__version__, "workers": world}
            | r["lora"]
        )
    return rows


def run(
    quick: bool = False,
    on_rows: Callable[[list[dict]], object] | None = None,
    gpu_only: bool = False,
    focus: bool = False,
) -> list[dict]:
    out: list[dict] = []
    for cfg in plan(quick, focus):
        if gpu_only and cfg["device"] != "cuda":
            continue
        partial = (lambda r, cfg=cfg: on_rows(out + rows_of(cfg, r))) if on_rows else None
        out += rows_of(cfg, run_config(cfg, partial))
    return out


if __name__ == "__main__":  # the GPU machine: `python -m ditforge.bench.train OUT.json` (needs torch + deepspeed)
    import json
    import sys

    path = sys.argv[1] if len(sys.argv) > 1 else "bench-train.json"

    def write(rows: list[dict]) -> None:
        with open(path, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d %H:%M:%S"), "configs": rows}, f, indent=2)

    write(
        run(quick="--quick" in sys.argv, on_rows=write, gpu_only="--gpu-only" in sys.argv, focus="--focus" in sys.argv)
    )
    print(open(path).read())
