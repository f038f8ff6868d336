"""`train.precision: fp8`: torchao's float8 linears in the transformer blocks. The conversion and a
float8 forward/backward run on CPU (torch emulates the scaled matmul); the speed needs a GPU of
compute capability 8.9+, which the bench measures (bench/train.py, fp8 section)."""

from __future__ import annotations

import pytest
import torch

from ditforge.models.dit import DiT, DiTConfig
from ditforge.train.engine import _swap_fp8, convert_fp8

pytest.importorskip("torchao")


def test_fp8_converts_only_the_block_linears(one_thread):
    from torchao.float8.float8_linear import Float8Linear

    torch.manual_seed(0)
    ref = DiT(DiTConfig(in_channels=4, size="T", num_classes=10))
    with torch.no_grad():  # DiT's zero init (adaLN-Zero, final layer) would make every output 0
        for p in ref.parameters():
            p.normal_(0, 0.05)
    model = DiT(DiTConfig(in_channels=4, size="T", num_classes=10))
    model.load_state_dict(ref.state_dict())
    n = _swap_fp8(model)
    converted = {name for name, m in model.named_modules() if isinstance(m, Float8Linear)}
    assert n == len(converted) == 4 * len(model.blocks)  # qkv, proj, mlp in, mlp out per block
    assert all(name.startswith("blocks.") for name in converted)
    assert not isinstance(model.final.linear, Float8Linear) and not isinstance(model.blocks[0].ada[1], Float8Linear)
    assert convert_fp8(model, torch.device("cpu")) == n  # idempotent: already converted
    x, t, y = torch.randn(4, 4, 16, 16), torch.rand(4), torch.tensor([1, 2, 3, 4])
    out, want = model(x, t, y), ref(x, t, y)
    # e4m3 keeps 3 mantissa bits: a few percent of error, not garbage
    rel = (out - want).norm() / want.norm()
    assert 0 < rel < 0.1, rel
    out.square().mean().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None


def test_fp8_refuses_a_cpu_worker():
    model = DiT(DiTConfig(in_channels=4, size="T", num_classes=10))
    with pytest.raises(ValueError, match=r"train.precision: fp8 needs a GPU of compute capability 8.9\+"):
        convert_fp8(model, torch.device("cpu"))
