"""Attention through torch's scaled_dot_product_attention, with the backend chosen by the spec.

`auto` lets SDPA pick its fastest kernel (flash / cuDNN / efficient on GPU, math on CPU); `math`
pins the reference kernel, which tests compare the others against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"math": [SDPBackend.MATH]}


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """q, k, v: (B, H, N, D) contiguous → (B, H, N, D)."""
    if backend in ("auto", "sdpa"):
        return F.scaled_dot_product_attention(q, k, v)
    with sdpa_kernel(BACKENDS[backend]):
        return F.scaled_dot_product_attention(q, k, v)


def backend_in_use(backend: str, device: torch.device) -> str:
    """What `auto` resolves to, for the MLflow params."""
    if backend == "math" or device.type == "cpu":
        return "sdpa_math" if backend == "math" else "sdpa (cpu: flash-cpu/math)"
    return "sdpa (flash/cudnn/efficient, chosen by torch)"
