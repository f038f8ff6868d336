"""Training-step throughput, MFU and per-rank memory: ditforge's DeepSpeed step vs a plain loop.

CPU configuration (always): DiT-S/2 on 4x32x32 latents, 2 ranks (gloo), rectified-flow loss.
  - `ditforge`: the worker's engine (`train/engine.build_engine`, ZeRO-2, torch AdamW);
  - `baseline`: the same model and batch in a plain PyTorch loop (DDP + AdamW), the loop people
    write by hand. Both run in the same two processes, timed in alternating blocks (A B A B) so
    machine noise hits both alike; ratio = ditforge / baseline samples/s.
  - memory: for ZeRO 0/1/2/3, each rank's parameter + gradient + optimizer-state bytes (counted
    from the tensors the engine holds) and the process RSS.
GPU configuration (when CUDA is present): DiT-B/2 and DiT-XL/2 at 4x32x32, bf16, same comparison
on one GPU, peak from a table of known devices and from a large bf16 matmul measured here.

FLOPs per step = 3 x forward FLOPs (counted by `models.dit.forward_flops` with torch's
FlopCounterMode: every matmul, conv and attention product, 2 FLOPs per multiply-add) x batch.
MFU = achieved FLOP/s per device / the device's peak.
"""

from __future__ import annotations

import gc
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..models.dit import DiT, DiTConfig, forward_flops
from ..spec import JobSpec
from .common import device_name, free_port

# Dense bf16 peaks (TFLOP/s) of known devices.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10G": 125.0}


def _known_peak() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def measured_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """A large matmul's FLOP/s here (per device; on CPU per rank's threads)."""
    n = 4096 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    reps = 20 if device.type == "cuda" else 3
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def _flow_loss(model, x, y, gen):
    t = torch.rand(x.shape[0], generator=gen).to(x.device)
    noise = torch.randn(x.shape, generator=gen).to(x.device, x.dtype)
    tt = t.view(-1, *[1] * (x.dim() - 1)).to(x.dtype)
    v = model((1 - tt) * x + tt * noise, t, y)
    return torch.nn.functional.mse_loss(v.float(), (noise - x).float())


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _state_bytes(*objs) -> int:
    """Bytes of distinct tensor storages reachable from modules / optimizers (dedup by pointer)."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.numel() and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    def walk(o, depth=0):
        if depth > 4:
            return
        if isinstance(o, torch.Tensor):
            add(o)
        elif isinstance(o, dict):
            for v in o.values():
                walk(v, depth + 1)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v, depth + 1)

    for o in objs:
        if isinstance(o, torch.nn.Module):
            for p in o.parameters():
                add(p.data)
                add(getattr(p, "ds_tensor", None))  # ZeRO-3 keeps this rank's slice here
                add(p.grad)
        elif isinstance(o, torch.optim.Optimizer):
            walk(o.state)
            for g in o.param_groups:
                for p in g["params"]:
                    add(p.data)
                    add(p.grad)
        else:  # a DeepSpeed ZeRO optimizer: its flat fp32 partitions and the inner torch optimizer
            for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "averaged_gradients",
                         "bit16_groups_flat"):
                walk(getattr(o, name, None))
            inner = getattr(o, "optimizer", None)
            if isinstance(inner, torch.optim.Optimizer):
                walk(inner.state)
                for g in inner.param_groups:
                    for p in g["params"]:
                        add(p.data)
                        add(p.grad)
    return total


def _spec(cfg: dict, zero: int) -> JobSpec:
    return JobSpec.model_validate({
        "name": "bench", "data": {"train": "file:///unused", "batch_size": cfg["batch"]},
        "model": {"size": cfg["size"], "patch": 2}, "deepspeed": {"zero_stage": zero},
        "resources": {"workers": cfg["world"], "use_gpu": cfg["device"] == "cuda"},
        "train": {"warmup": 0, "lr": 1e-4, "grad_clip": 0.0}})


def _worker(rank: int, cfg: dict, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(cfg["world"]), LOCAL_RANK=str(rank))
    use_gpu = cfg["device"] == "cuda"
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if use_gpu else "cpu")
    torch.set_num_threads(cfg["threads"])
    device = torch.device("cuda", rank) if use_gpu else torch.device("cpu")
    dist.init_process_group("nccl" if use_gpu else "gloo", rank=rank, world_size=cfg["world"])
    from ..train.engine import build_engine

    C, H, W = cfg["latent"]
    dcfg = DiTConfig(in_channels=C, size=cfg["size"], patch=2, num_classes=1000)
    x = torch.randn(cfg["batch"], C, H, W, device=device)
    y = torch.randint(0, 1000, (cfg["batch"],), device=device)
    gen = torch.Generator().manual_seed(rank)
    bf16 = use_gpu

    def make(kind: str, zero: int = 2):
        torch.manual_seed(0)
        model = DiT(dcfg).to(device)
        if kind == "baseline":
            ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank] if use_gpu else None)
            opt = torch.optim.AdamW(ddp.parameters(), lr=1e-4, fused=use_gpu or None)

            def step():
                with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                    loss = _flow_loss(ddp, x, y, gen)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            return step, (model, opt)
        engine = build_engine(model, _spec(cfg, zero))

        def step():
            loss = _flow_loss(engine, x.to(torch.bfloat16) if bf16 else x, y, gen)
            engine.backward(loss)
            engine.step()
        return step, (engine.module, engine.optimizer)

    def timed(step, n):
        if use_gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        if use_gpu:
            torch.cuda.synchronize()
        dist.barrier()
        return (time.perf_counter() - t0) / n

    out: dict = {"rank": rank}
    # --- throughput: ditforge ZeRO-2 vs baseline, alternating blocks ---------------------------
    base_step, _ = make("baseline")
    ds_step, _ = make("ditforge", 2)
    for s in (base_step, ds_step):
        for _ in range(cfg["warmup"]):
            s()
    times = {"baseline": [], "ditforge": []}
    for _ in range(cfg["rounds"]):
        times["baseline"].append(timed(base_step, cfg["steps"]))
        times["ditforge"].append(timed(ds_step, cfg["steps"]))
    out["step_s"] = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    del base_step, ds_step
    gc.collect()
    # --- memory per ZeRO stage (each built alone, after a step so optimizer state exists) -----
    out["mem"] = {}
    for zero in cfg["zero_stages"]:
        gc.collect()
        if use_gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        rss0 = _rss()
        step, objs = make("ditforge", zero)
        step()
        out["mem"][zero] = {"state_bytes": _state_bytes(*objs), "rss_bytes": _rss(),
                            "rss_delta_bytes": _rss() - rss0,
                            "cuda_peak_bytes": torch.cuda.max_memory_allocated() if use_gpu else None}
        del step, objs
    out["peak_tflops"] = measured_peak_tflops(device, torch.bfloat16 if use_gpu else torch.float32)
    queue.put(out)
    dist.barrier()
    dist.destroy_process_group()


def run_config(cfg: dict) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, cfg, port, queue)) for r in range(cfg["world"])]
    for p in procs:
        p.start()
    results = [queue.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join(timeout=120)
    return sorted(results, key=lambda r: r["rank"])[0] | {"ranks": results}


def run(quick: bool = False) -> list[dict]:
    configs = []
    if torch.cuda.is_available():
        for size, batch in (("B", 256), ("XL", 128)):
            configs.append(dict(name=f"gpu-dit-{size.lower()}2-256", device="cuda", size=size, batch=batch, world=1,
                                latent=(4, 32, 32), threads=8, warmup=5, steps=10, rounds=3, zero_stages=[0, 1, 2]))
    size = "T" if quick else "S"
    configs.append(dict(name=f"cpu-dit-{size.lower()}2-32x32-2workers-zero2", device="cpu", size=size,
                        batch=4 if not quick else 2, world=2, latent=(4, 32, 32) if not quick else (4, 16, 16),
                        threads=1, warmup=1, steps=2 if quick else 3, rounds=2 if quick else 3,
                        zero_stages=[0, 1, 2, 3]))
    rows = []
    for cfg in configs:
        r = run_config(cfg)
        world, batch = cfg["world"], cfg["batch"]
        flops_step = 3 * forward_flops(DiTConfig(in_channels=cfg["latent"][0], size=cfg["size"], patch=2,
                                                 num_classes=1000), cfg["latent"]) * batch * world
        ds_s, base_s = r["step_s"]["ditforge"], r["step_s"]["baseline"]
        tflops_dev = flops_step / ds_s / world / 1e12
        known = _known_peak() if cfg["device"] == "cuda" else None
        peak = known or r["peak_tflops"]
        mem = {f"zero{z}": m for z, m in r["mem"].items()}
        zero_ratio = (mem["zero3"]["state_bytes"] / mem["zero0"]["state_bytes"]
                      if "zero3" in mem and "zero0" in mem else None)
        rows.append({
            "name": cfg["name"], "device": device_name(), "model": f"DiT-{cfg['size']}/2",
            "latent": list(cfg["latent"]), "workers": world, "batch_per_worker": batch, "zero_stage": 2,
            "samples_per_s": round(batch * world / ds_s, 2), "step_s": round(ds_s, 4),
            "tflops": round(tflops_dev, 4), "flops_per_step": flops_step,
            "mfu": round(tflops_dev / peak, 4) if known else None,
            "mfu_vs_measured_matmul": round(tflops_dev / r["peak_tflops"], 4),
            "peak_tflops_table": known, "peak_tflops_measured_matmul": round(r["peak_tflops"], 4),
            "baseline_samples_per_s": round(batch * world / base_s, 2), "baseline_step_s": round(base_s, 4),
            "ratio_to_baseline": round(base_s / ds_s, 3),
            "peak_mem_bytes": max(m["cuda_peak_bytes"] or m["rss_bytes"] for m in mem.values()),
            "memory_per_rank": mem, "zero3_over_zero0_state": round(zero_ratio, 3) if zero_ratio else None,
            "attention_backend": "sdpa (auto)",
            "targets": {"ratio_to_baseline": ">= 0.9 on CPU, >= 1.15 on GPU", "zero3_over_zero0_state": "~0.5",
                        "mfu": ">= 0.5 (GPU, DiT-XL/2)"},
        })
    return rows
