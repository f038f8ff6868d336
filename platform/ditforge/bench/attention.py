"""Attention kernels' forward+backward time, for every backend that runs here.

Two shapes: DiT-XL/2 at 256x256 (256 tokens, 16 heads of 72) and a long video at DiT-B/2
(16 frames x 16x16 tokens = 4096 tokens, 12 heads of 64). bf16 on a GPU; on CPU fp32 and, with
`--quick`, the batch cut to 1 and the video to 1024 tokens (a CPU's attention at 4096 tokens takes
seconds per call): the rows say which shape ran. A kernel that cannot run here says why.
"""

from __future__ import annotations

import time

import torch

from ..models import attention
from .common import device_name

KERNELS = ("flash_attn", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "math")


def shapes(gpu: bool, quick: bool) -> list[dict]:
    xl = {"name": "dit-xl2-256", "B": 64, "N": 256, "H": 16, "Dh": 72}
    video = {"name": "dit-b2-video-16x256", "B": 8, "N": 4096, "H": 12, "Dh": 64}
    if not gpu and quick:
        xl, video = dict(xl, B=1), dict(video, B=1, N=1024, name="dit-b2-video-4x256")
    elif not gpu:
        xl, video = dict(xl, B=8), dict(video, B=1)
    return [xl, video]


def time_kernel(
    name: str, B: int, N: int, H: int, Dh: int, device: torch.device, dtype: torch.dtype, reps: int
) -> dict:
    try:
        attention.resolve(name, device, dtype, Dh)
    except ValueError as e:
        return {"ms": None, "error": str(e)}
    q, k, v = (torch.randn(B, H, N, Dh, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    g = torch.randn(B, H, N, Dh, device=device, dtype=dtype)

    def fb() -> None:
        attention.attention(q, k, v, name).backward(g)

    try:
        fb()  # first call: kernel selection, autotuning, allocation
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            fb()
        _sync(device)
    except (RuntimeError, torch.OutOfMemoryError) as e:
        return {"ms": None, "error": f"{type(e).__name__}: {str(e)[:200]}"}
    ms = (time.perf_counter() - t0) / reps * 1e3
    flops = 4 * B * H * N * N * Dh * 3.5  # QKᵀ and PV: 2 matmuls forward, 5 backward (2.5x)
    return {"ms": round(ms, 3), "tflops": round(flops / ms / 1e9, 2)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(quick: bool = False) -> list[dict]:
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    reps = 20 if gpu else (1 if quick else 3)
    rows = []
    for s in shapes(gpu, quick):
        kernels = {k: time_kernel(k, s["B"], s["N"], s["H"], s["Dh"], device, dtype, reps) for k in KERNELS}
        rows.append(
            {
                "name": f"attention-{s['name']}",
                "device": device_name(),
                "torch": torch.__version__,
                "dtype": str(dtype).removeprefix("torch."),
                "shape": {k: s[k] for k in ("B", "N", "H", "Dh")},
                "fwd_bwd": kernels,
            }
        )
    return rows
