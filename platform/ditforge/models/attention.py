"""Attention kernels, chosen by `model.attention`.

| name | kernel |
|---|---|
| `flash_attn` | the `flash_attn` package (Dao-AILab), CUDA sm80+, fp16/bf16 |
| `sdpa_flash` | torch SDPA's FlashAttention-2 kernel (CUDA fp16/bf16; torch also ships a fused CPU flash kernel) |
| `sdpa_cudnn` | torch SDPA's cuDNN kernel (CUDA sm80+, fp16/bf16) |
| `sdpa_efficient` | torch SDPA's memory-efficient (xFormers) kernel (CUDA, any float dtype) |
| `math` | the reference: softmax(QKᵀ/√d)·V in plain ops; what every other kernel is tested against |
| `auto` | `flash_attn` if installed and the device supports it, then SDPA cuDNN (Hopper) or flash, then efficient; math on CPU |

`resolve()` turns `auto` into one concrete name once, when the model is built, so the name logged
to MLflow is the kernel that actually runs, and a pinned kernel that cannot run fails at build time
with a message instead of deep inside the first step.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = ("auto", "flash_attn", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "math")
SDPA = {
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
LEGACY = {"sdpa": "auto"}  # the skeleton's name for "let torch choose"


def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _cuda_ok(device: torch.device, dtype: torch.dtype, min_cc: tuple[int, int] = (8, 0)) -> bool:
    return (
        device.type == "cuda"
        and torch.cuda.is_available()
        and torch.cuda.get_device_capability(device) >= min_cc
        and dtype in (torch.float16, torch.bfloat16)
    )


def _sdpa_works(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Ask the kernel itself: run it once on a tiny input. Cheaper than re-deriving torch's rules."""
    q = torch.zeros(1, 1, 8, head_dim, device=device, dtype=dtype)
    try:
        with sdpa_kernel([SDPA[name]]):
            F.scaled_dot_product_attention(q, q, q)
        return True
    except RuntimeError:
        return False


def resolve(backend: str, device: torch.device, dtype: torch.dtype = torch.float32, head_dim: int = 64) -> str:
    """`auto` → the concrete kernel for this device/dtype; a pinned kernel is checked to run here."""
    backend = LEGACY.get(backend, backend)
    if backend not in BACKENDS:
        raise ValueError(f"model.attention: unknown backend {backend!r} (known: {', '.join(BACKENDS)})")
    if device.type == "meta":  # FLOP counting: any exact kernel counts the same
        return "math" if backend == "auto" else backend
    if backend == "auto":
        if device.type != "cuda":
            return "math"
        if flash_attn_installed() and _cuda_ok(device, dtype) and head_dim <= 256:
            return "flash_attn"
        # Hopper: cuDNN's kernel beat SDPA's FlashAttention-2 at DiT-XL/2 shapes (0.47 vs 0.76 ms
        # forward+backward on an H200, `ditforge bench`); before Hopper flash is the safe first pick.
        hopper = torch.cuda.get_device_capability(device) >= (9, 0)
        for name in (
            ("sdpa_cudnn", "sdpa_flash", "sdpa_efficient") if hopper else ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient")
        ):
            if _sdpa_works(name, device, dtype, head_dim):
                return name
        return "math"
    if backend == "flash_attn":
        if not flash_attn_installed():
            raise ValueError("model.attention: flash_attn is not installed (pip install 'ditforge[flash]')")
        if not _cuda_ok(device, dtype):
            raise ValueError(
                f"model.attention: flash_attn needs a CUDA sm80+ GPU and bf16/fp16 (got {device}, {dtype})"
            )
        return backend
    if not _sdpa_works(backend, device, dtype, head_dim):
        raise ValueError(f"model.attention: {backend} cannot run on {device} with {dtype} and head dim {head_dim}")
    return backend


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "math") -> torch.Tensor:
    """q (B, H, Nq, Dh), k/v (B, H, Nk, Dh) → (B, H, Nq, Dh). `backend` is a resolved name."""
    backend = LEGACY.get(backend, backend)  # configs saved by the skeleton may say "sdpa"
    if backend == "flash_attn":
        from flash_attn import flash_attn_func

        # flash_attn wants (B, N, H, Dh) in fp16/bf16; autocast does not reach into its kernel.
        dt = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
        out = flash_attn_func(*(t.transpose(1, 2).to(dt) for t in (q, k, v)))
        return out.transpose(1, 2).to(q.dtype)
    if backend == "auto":  # unresolved (direct use in tests / notebooks): torch chooses
        return F.scaled_dot_product_attention(q, k, v)
    with sdpa_kernel([SDPA[backend]]):
        return F.scaled_dot_product_attention(q, k, v)
