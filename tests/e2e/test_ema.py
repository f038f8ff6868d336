"""EMA: the update rule, swapping weights in and out, and ZeRO-3 (sharded) == no ZeRO on one run."""

from __future__ import annotations

import os

import pytest
import torch

from pathlib import Path

from safetensors.torch import load_file, save_file

from ditforge.train.ema import EMA, consolidate_shards
from ditforge.bench.common import free_port

from ..loops import start_ranks


def test_update_rule_swap_and_state_dict():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    w0 = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)  # warm-up decay: min(0.9, 2/11)
    d = 2 / 11
    torch.testing.assert_close(ema.shadow["weight"], d * w0 + (1 - d) * (w0 + 1))
    raw = model.weight.detach().clone()
    with ema.swapped_in(model):
        torch.testing.assert_close(model.weight.detach(), ema.shadow["weight"])
    torch.testing.assert_close(model.weight.detach(), raw)  # restored
    other = EMA(torch.nn.Linear(3, 2), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 1 and torch.equal(other.shadow["weight"], ema.shadow["weight"])


def _write_ema_files(ema: EMA, model, rank: int, world: int, folder: Path) -> Path:
    """What a checkpoint holds of the EMA: each rank's `shard_files`, written as the checkpointer
    writes them; collective (a barrier), so every rank's files are there on return."""
    import torch.distributed as dist

    folder.mkdir(exist_ok=True)
    tensors, files = ema.shard_files(model, rank, world)
    for name, t in tensors.items():
        save_file({k: v.contiguous() for k, v in t.items()}, str(folder / name))
    for name, b in files.items():
        (folder / name).write_bytes(b)
    dist.barrier()
    return folder


def _worker(rank: int, world: int, port: int, out: str):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        DS_ACCELERATOR="cpu",
    )
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist

    from ditforge.models.dit import DiT, DiTConfig
    from ditforge.train.engine import no_shm_all_reduce

    no_shm_all_reduce()
    deepspeed.init_distributed(dist_backend="gloo")
    results = {}
    # "3p": ZeRO-3 with its default persistence threshold, under which these small weights stay
    # whole on every rank (and are fetched lazily); 3: every weight partitioned.
    for stage in (0, 3, "3p"):
        torch.manual_seed(0)
        model = DiT(DiTConfig(in_channels=4, num_classes=3))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        engine, *_ = deepspeed.initialize(
            model=model,
            optimizer=opt,
            config={
                "train_micro_batch_size_per_gpu": 4,
                # threshold 0: partition every weight (by default small ones stay whole on each rank)
                "zero_optimization": {
                    "stage": 3 if stage == "3p" else stage,
                    **({} if stage == "3p" else {"stage3_param_persistence_threshold": 0}),
                },
                "zero_allow_untested_optimizer": True,
                "steps_per_print": 10**9,
            },
        )
        ema = EMA(engine.module, decay=0.8, optimizer=engine.optimizer)
        assert ema.partitioned == (stage == 3)  # "3p": all persistent, so averaged whole
        assert ema.masters == (stage == 3)  # ZeRO-3's fp32 master slices are what is averaged
        g = torch.Generator().manual_seed(100 + rank)  # different data per rank: averaging matters
        for _ in range(4):
            x, t, y = (
                torch.randn(4, 4, 8, 8, generator=g),
                torch.rand(4, generator=g),
                torch.randint(0, 3, (4,), generator=g),
            )
            loss = (engine(x, t, y) - x).square().mean()
            engine.backward(loss)
            engine.step()
            ema.update(engine.module)
        results[stage] = ema.full_state_dict(engine.module)  # collective under ZeRO-3
        # What a checkpoint holds: per-rank slices under ZeRO-3 (no gather), else rank 0's full copy.
        folder = _write_ema_files(ema, engine.module, rank, world, Path(out).parent / f"ckpt-{stage}")
        if rank == 0:
            # what export does; "3p" keeps every weight whole, so it writes ema.safetensors too
            assert (folder / "ema.safetensors").exists() == (stage != 3)
            results[f"export{stage}"] = (
                load_file(str(folder / "ema.safetensors")) if stage != 3 else consolidate_shards(folder)
            )
        again = EMA(engine.module, decay=0.8, optimizer=engine.optimizer)  # a resume at the same world size
        assert again.load_shards(engine.module, folder, ema.num_updates)
        assert all(torch.equal(again.shadow[n], ema.shadow[n]) for n in ema.names)
        # The gathered raw weights must differ from the EMA (the test would be vacuous otherwise).
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            results[f"raw{stage}"] = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.timeout(600)
def test_ema_under_zero3_equals_ema_without_zero(tmp_path):
    out = str(tmp_path / "ema.pt")
    start_ranks(_worker, (2, free_port(), out), 2)
    res = torch.load(out, weights_only=True)
    ema0 = res[0]
    # ZeRO-3 reduces gradients in another order, so even the trained weights differ by ~1e-5 after
    # Adam; the EMA must add nothing to that, and stay far closer than the EMA is to the weights.
    for z3 in (3, "3p"):
        assert ema0.keys() == res[z3].keys() and len(ema0) > 10
        for n in ema0:
            ema_gap = (res[z3][n] - ema0[n]).abs().max().item()
            raw_gap = (res[f"raw{z3}"][n] - res["raw0"][n]).abs().max().item()
            assert ema_gap <= raw_gap + 1e-6 and ema_gap < 1e-4, (z3, n, ema_gap, raw_gap)
            assert raw_gap < 1e-4, (z3, n, raw_gap)  # sampling with the EMA left the weights alone
    for stage in (0, 3, "3p"):  # the checkpoint's EMA files give the full EMA weights back, exactly
        assert res[f"export{stage}"].keys() == res[stage].keys()
        assert all(torch.equal(res[f"export{stage}"][n], res[stage][n]) for n in res[stage]), stage
    moved = max((res["raw0"][n] - ema0[n]).abs().max().item() for n in ema0)
    assert moved > 1e-3


def _fragments_worker(rank: int, world: int, port: int, out: str):
    """bf16 training under ZeRO 0-2 (DeepSpeed's bf16 optimizer keeps fp32 masters, cut across the
    ranks): the EMA averages each rank's master fragments, not the bf16 weights."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        DS_ACCELERATOR="cpu",
    )
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param

    from ditforge.models.dit import DiT, DiTConfig
    from ditforge.train.engine import no_shm_all_reduce

    no_shm_all_reduce()
    deepspeed.init_distributed(dist_backend="gloo")
    results = {}
    for stage in (1, 2):
        torch.manual_seed(0)
        model = DiT(DiTConfig(in_channels=4, num_classes=3))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        engine, *_ = deepspeed.initialize(
            model=model,
            optimizer=opt,
            config={
                "train_micro_batch_size_per_gpu": 4,
                "bf16": {"enabled": True},
                "zero_optimization": {"stage": stage},
                "zero_allow_untested_optimizer": True,
                "steps_per_print": 10**9,
            },
        )
        ema = EMA(engine.module, decay=0.8, optimizer=engine.optimizer)
        assert ema.fragments and "fragments" in ema.source
        params = dict(engine.module.named_parameters())
        held = sum(ema.shadow[n].numel() for n in ema.names)
        assert 0 < held < sum(p.numel() for p in params.values())  # a part of the masters, not all
        ref = {n: safe_get_full_fp32_param(p).detach().clone() for n, p in params.items()}  # collective
        ref_bf16 = {n: p.detach().float().clone() for n, p in params.items()}
        g = torch.Generator().manual_seed(100 + rank)
        for i in range(4):
            x = torch.randn(4, 4, 8, 8, generator=g)
            t, y = torch.rand(4, generator=g), torch.randint(0, 3, (4,), generator=g)
            loss = (engine(x.bfloat16(), t.bfloat16(), y).float() - x).square().mean()
            engine.backward(loss)
            engine.step()
            ema.update(engine.module)
            d = min(0.8, (2 + i) / (11 + i))
            for n, p in params.items():
                ref[n].lerp_(safe_get_full_fp32_param(p).detach(), 1 - d)
                ref_bf16[n].lerp_(p.detach().float(), 1 - d)
        full = ema.full_state_dict(engine.module)  # collective
        results[stage] = {"full": full, "ref": ref, "ref_bf16": ref_bf16}
        raw = {n: p.detach().clone() for n, p in params.items()}
        with ema.swapped_in(engine.module, gather=True):
            results[stage]["swapped"] = all(torch.equal(p, full[n].to(p.dtype)) for n, p in params.items())
        results[stage]["restored"] = all(torch.equal(p, raw[n]) for n, p in params.items())
        folder = _write_ema_files(ema, engine.module, rank, world, Path(out).parent / f"frag-{stage}")
        if rank == 0:
            results[stage]["export"] = consolidate_shards(folder)  # what `ditforge export` writes
        again = EMA(engine.module, decay=0.8, optimizer=engine.optimizer)  # a resume at the same world size
        assert again.load_shards(engine.module, folder, ema.num_updates)
        assert all(torch.equal(again.shadow[n], ema.shadow[n]) for n in ema.names)
        cut = EMA(engine.module, decay=0.8, optimizer=engine.optimizer)  # from full weights (another world size)
        cut.load_full_state_dict(engine.module, full, ema.num_updates)
        assert all(torch.equal(cut.shadow[n], ema.shadow[n]) for n in ema.names)
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.timeout(600)
def test_ema_averages_fp32_master_fragments_under_zero12_bf16(tmp_path):
    out = str(tmp_path / "frag.pt")
    start_ranks(_fragments_worker, (2, free_port(), out), 2)
    res = torch.load(out, weights_only=True)
    for stage in (1, 2):
        r = res[stage]
        assert r["full"].keys() == r["ref"].keys() and len(r["full"]) > 10
        # exactly the EMA of the full fp32 masters, computed the slow way (a gather per step)
        assert all(torch.equal(r["full"][n], r["ref"][n]) for n in r["ref"]), stage
        # and not the EMA of the bf16 compute copy (else this test would prove nothing)
        assert max((r["ref_bf16"][n] - r["ref"][n]).abs().max().item() for n in r["ref"]) > 1e-4
        assert r["swapped"] and r["restored"]
        assert all(torch.equal(r["export"][n], r["full"][n]) for n in r["full"]), stage
