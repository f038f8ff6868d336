"""DiT sizes, shapes, positions, masking and FLOPs, checked against documented formulas.

Formulas (D width, L depth, C latent channels, p patch, pt temporal patch, K classes, N tokens,
2 FLOPs per multiply-add; only matmuls count, as in fvcore / the DiT paper):

parameters (image DiT, class-conditional, no captions, no mixer)
    patch embed  C·pt·p²·D + D
    t embed      256·D + D + D² + D
    class embed  (K + 1)·D                       (the extra row is the CFG null class)
    per block    18·D² + 15·D                    (qkv 3D²+3D, proj D²+D, MLP 8D²+5D, adaLN 6D²+6D)
    final        2·D² + 2·D + D·pt·p²·C + pt·p²·C

forward FLOPs per sample
    patch embed  2·N·(C·pt·p²)·D
    t embed      2·(256·D + D²)
    per block    24·N·D² + 4·N²·D + 12·D²         (linears; QKᵀ and AV; adaLN on one vector)
      factorised video (gt frames × S positions): 32·N·D² + 4·gt·S²·D + 4·S·gt²·D + 18·D²
    final        2·N·D·pt·p²·C + 4·D²
"""

from __future__ import annotations

import pytest
import torch

from ditforge.models.dit import SIZES, DiT, DiTConfig, forward_flops, param_count, rope_dims, tokenize_bytes


pytestmark = pytest.mark.usefixtures("one_thread")


def param_formula(size: str, C: int, p: int, K: int, pt: int = 1) -> int:
    D, L = SIZES[size]["hidden"], SIZES[size]["depth"]
    return (
        (C * pt * p * p * D + D)
        + (256 * D + D + D * D + D)
        + (K + 1) * D
        + L * (18 * D * D + 15 * D)
        + (2 * D * D + 2 * D + D * pt * p * p * C + pt * p * p * C)
    )


def flops_formula(size: str, C: int, p: int, grid: tuple[int, int, int], pt: int = 1, factorised: bool = False) -> int:
    D, L = SIZES[size]["hidden"], SIZES[size]["depth"]
    gt, gh, gw = grid
    S, N = gh * gw, gt * gh * gw
    if factorised and gt > 1:
        block = 32 * N * D * D + 4 * gt * S * S * D + 4 * S * gt * gt * D + 18 * D * D
    else:
        block = 24 * N * D * D + 4 * N * N * D + 12 * D * D
    return 2 * N * C * pt * p * p * D + 2 * (256 * D + D * D) + L * block + 2 * N * D * pt * p * p * C + 4 * D * D


@pytest.mark.parametrize("size", ["T", "S", "B", "L", "XL"])
@pytest.mark.parametrize("patch", [2, 4, 8])
def test_params_and_flops_match_formula(size, patch):
    cfg = DiTConfig(in_channels=4, size=size, patch=patch, num_classes=1000)
    with torch.device("meta"):
        assert param_count(DiT(cfg)) == param_formula(size, 4, patch, 1000)
    g = 32 // patch
    assert forward_flops(cfg, (4, 32, 32)) == flops_formula(size, 4, patch, (1, g, g))


def test_dit_paper_table():
    """DiT paper Table 1/4 (256x256 images → 4x32x32 latents): params and Gflops (= G multiply-adds)."""
    paper = {("S", 2): 6.06, ("B", 2): 23.01, ("L", 2): 80.71, ("XL", 2): 118.64, ("XL", 4): 29.05, ("XL", 8): 7.39}
    for (size, p), gmacs in paper.items():
        counted = forward_flops(DiTConfig(in_channels=4, size=size, patch=p, num_classes=1000), (4, 32, 32)) / 2e9
        assert counted == pytest.approx(gmacs, rel=0.01), (size, p)
    with torch.device("meta"):  # 675M for XL/2 (the paper's count includes learn-sigma's extra outputs)
        assert param_count(DiT(DiTConfig(in_channels=4, size="XL", patch=2, num_classes=1000))) / 1e6 == pytest.approx(
            675, rel=0.01
        )


def test_video_flops_formula_full_and_factorised():
    for fact in (False, True):
        cfg = DiTConfig(in_channels=4, size="S", patch=2, patch_t=2, video_attention="factorised" if fact else "full")
        assert forward_flops(cfg, (4, 8, 16, 16)) == flops_formula("S", 4, 2, (4, 8, 8), pt=2, factorised=fact)
    full = forward_flops(DiTConfig(in_channels=4, size="S", patch=2), (4, 16, 32, 32))
    fact = forward_flops(DiTConfig(in_channels=4, size="S", patch=2, video_attention="factorised"), (4, 16, 32, 32))
    assert fact < full  # 4096 tokens: factorising saves the N² attention term


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(pos_embed="rope"),
        dict(video_attention="factorised", pos_embed="rope"),
        dict(video_attention="factorised", patch_t=2),
        dict(text="own", mixer_depth=1),
        dict(text="external", text_dim=24, pos_embed="rope", video_attention="factorised"),
    ],
)
def test_image_and_video_forward_backward_shapes(kw):
    torch.manual_seed(0)
    model = DiT(DiTConfig(in_channels=4, num_classes=3, **kw))
    text = None
    if kw.get("text") == "own":
        text = tokenize_bytes(["a red circle", "a blue star moving up"], 64)
    elif kw.get("text") == "external":
        text = torch.randn(2, 5, 24)
    t, y = torch.rand(2), torch.tensor([0, 2])
    for x in (torch.randn(2, 4, 8, 8), torch.randn(2, 4, 2, 8, 8)):
        out = model(x, t, y, text=text, drop=torch.tensor([False, True]))
        assert out.shape == x.shape
        (out - torch.randn_like(out)).square().mean().backward()
        # adaLN-Zero: only the final layer gets a gradient at init, and it must get one.
        assert model.final.linear.weight.grad is not None and model.final.linear.weight.grad.abs().sum() > 0
        model.zero_grad()


def test_positions_extrapolate_to_other_resolutions_and_lengths():
    for pos in ("rope", "sincos"):
        model = DiT(DiTConfig(in_channels=4, pos_embed=pos, video_attention="factorised"))
        for shape in [(1, 4, 8, 8), (1, 4, 24, 40), (1, 4, 3, 16, 16), (1, 4, 12, 8, 8)]:
            assert model(torch.randn(shape), torch.rand(1), torch.tensor([1])).shape == shape


def test_rope_is_relative():
    """Shifting every position by the same offset leaves RoPE attention scores unchanged."""
    from ditforge.models.dit import apply_rope, rope_angles

    assert sum(rope_dims(72)) == 72 and all(d % 2 == 0 for d in rope_dims(72))
    q, k = torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32)
    a = rope_angles(4, 6, 6, 32).reshape(-1, 16)
    s1 = (apply_rope(q, a[7]) * apply_rope(k, a[9])).sum()
    s2 = (apply_rope(q, a[7 + 36 + 6]) * apply_rope(k, a[9 + 36 + 6])).sum()  # one frame and one row later
    assert torch.allclose(s1, s2, atol=1e-5)


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    a = DiT(DiTConfig(in_channels=4))
    b = DiT(DiTConfig(in_channels=4, grad_checkpointing=True))
    b.load_state_dict(a.state_dict())
    for m in (a, b):  # leave adaLN-Zero so gradients reach the blocks
        for blk in m.blocks:
            torch.nn.init.constant_(blk.ada[-1].weight, 0.01)
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    for m in (a, b):
        m.train()
        m(x, t, y).square().sum().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6), n


def test_masking_keeps_shape_marks_kept_patches_and_saves_flops():
    torch.manual_seed(0)
    model = DiT(DiTConfig(in_channels=4, mixer_depth=1, pos_embed="rope", video_attention="factorised"))
    gen = torch.Generator().manual_seed(1)
    for x in (torch.randn(2, 4, 16, 16), torch.randn(2, 4, 4, 16, 16)):
        out, keep = model(x, torch.rand(2), torch.tensor([1, 2]), mask_ratio=0.75, gen=gen)
        assert out.shape == x.shape and keep.shape == (2, 1, *x.shape[2:])
        assert keep.mean().item() == pytest.approx(0.25)  # 16 of 64 patches per frame
        assert (out * (1 - keep)).abs().max() == 0  # nothing predicted where the backbone saw nothing
        if x.dim() == 5:  # tube masking: the same positions in every frame
            assert torch.equal(keep[:, :, 0], keep[:, :, -1])
    cfg = DiTConfig(in_channels=4, size="S", mixer_depth=2)
    full, half = forward_flops(cfg, (4, 32, 32)), forward_flops(cfg, (4, 32, 32), mask_ratio=0.5)
    assert half < 0.6 * full


def test_image_through_video_model_inflates_patch_kernel():
    model = DiT(DiTConfig(in_channels=4, patch_t=2))
    assert model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 1])).shape == (2, 4, 8, 8)


def test_caption_changes_the_output_once_cross_attention_is_trained():
    torch.manual_seed(0)
    model = DiT(DiTConfig(in_channels=4, text="own", num_classes=0))
    for blk in model.blocks:
        torch.nn.init.normal_(blk.xattn.proj.weight, std=0.02)
        torch.nn.init.normal_(blk.ada[-1].weight, std=0.02)
    torch.nn.init.normal_(model.final.linear.weight, std=0.02)
    x, t = torch.randn(1, 4, 8, 8), torch.rand(1)
    a = model(x, t, text=tokenize_bytes(["a red circle"], 64))
    b = model(x, t, text=tokenize_bytes(["a blue star"], 64))
    n = model(x, t, text=tokenize_bytes(["a red circle"], 64), drop=torch.tensor([True]))
    assert not torch.allclose(a, b) and not torch.allclose(a, n)
    assert torch.allclose(n, model(x, t, text=None))  # dropped caption == no caption


def test_walking_skeleton_checkpoints_still_load():
    """The skeleton's DiT had a Conv2d patch embedding and qkv/proj directly on each block."""
    torch.manual_seed(0)
    new = DiT(DiTConfig(in_channels=4))
    old = {}
    for k, v in new.state_dict().items():
        k = k.replace(".attn.qkv.", ".qkv.").replace(".attn.proj.", ".proj.")
        old[k] = v.view(128, 4, 2, 2) if k == "patch_embed.weight" else v
    fresh = DiT(DiTConfig(in_channels=4))
    fresh.load_state_dict(old)
    for k, v in new.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
