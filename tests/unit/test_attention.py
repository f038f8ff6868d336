"""Every attention kernel gives the reference softmax(QKᵀ/√d)·V within fp32 / bf16 tolerance."""

from __future__ import annotations

import pytest
import torch

from ditforge.models.attention import BACKENDS, attention, resolve
from ditforge.spec import SpecError, load_job


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(QKᵀ/√d)·V in fp32 with explicit ops: the ground truth the kernels are compared against."""
    s = (q.float() @ k.float().transpose(-2, -1)) / q.shape[-1] ** 0.5
    return (s.softmax(-1) @ v.float()).to(q.dtype)


pytestmark = pytest.mark.usefixtures("one_thread")

CPU_BACKENDS = ["math", "sdpa_flash", "auto"]


def qkv(dtype=torch.float32, device="cpu", n=37, nk=None):
    g = torch.Generator().manual_seed(0)
    shapes = [(2, 3, n, 64), (2, 3, nk or n, 64), (2, 3, nk or n, 64)]
    return [torch.randn(s, generator=g).to(device, dtype) for s in shapes]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("nk", [None, 11])  # self- and cross-attention lengths
def test_cpu_backends_match_reference(backend, nk):
    q, k, v = qkv(nk=nk)
    name = resolve(backend, torch.device("cpu"))
    torch.testing.assert_close(attention(q, k, v, name), reference_attention(q, k, v), atol=1e-5, rtol=1e-4)


def test_auto_is_math_on_cpu_and_pinned_gpu_kernels_fail_early():
    assert resolve("auto", torch.device("cpu")) == "math"
    assert resolve("sdpa", torch.device("cpu")) == "math"  # the skeleton's name still works
    for name in ("flash_attn", "sdpa_cudnn", "sdpa_efficient"):
        with pytest.raises(ValueError, match="model.attention"):
            resolve(name, torch.device("cpu"))


def test_spec_rejects_gpu_only_kernel_without_gpu(tmp_path):
    f = tmp_path / "job.yaml"
    f.write_text("name: x\ndata: {train: file:///tmp/d}\nmodel: {attention: flash_attn}\n")
    with pytest.raises(SpecError, match="model.attention: flash_attn needs resources.use_gpu"):
        load_job(f)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [b for b in BACKENDS])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_backends_match_reference(backend, dtype):
    dev = torch.device("cuda")
    if backend == "flash_attn" and dtype == torch.float32:
        pytest.skip("flash_attn is bf16/fp16 only (auto never picks it for fp32)")
    try:
        name = resolve(backend, dev, dtype, head_dim=64)
    except ValueError as e:
        pytest.skip(str(e))  # e.g. flash_attn not installed, cuDNN kernel unavailable for fp32
    q, k, v = qkv(dtype, "cuda")
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(attention(q, k, v, name).float(), reference_attention(q, k, v).float(), **tol)
