"""The benchmark's CPU smoke run (numbers not asserted: CI machines are noisy) and the fast paths
it measures: compiled blocks, device prefetch, device-side step noise."""

from __future__ import annotations

import json

import pytest
import torch

from ditforge.data.prefetch import DevicePrefetcher
from ditforge.models.dit import DiT, DiTConfig
from ditforge.train.engine import compile_model
from ditforge.train.step import step_generator

from ..conftest import run_cli

KEYS = {
    "name",
    "device",
    "samples_per_s",
    "step_s",
    "tflops",
    "mfu",
    "baseline_samples_per_s",
    "ratio_to_baseline",
    "peak_mem_bytes",
    "attention_backend",
}


def _make_bench_quick() -> list[str]:
    """The command `make bench BENCH_ARGS=--quick` runs (README: `make bench`, `--quick` for a smoke
    run), as arguments of `ditforge` (this interpreter's, not a second venv's)."""
    import shlex
    import subprocess

    from ..conftest import REPO

    out = subprocess.run(
        ["make", "-n", "--no-print-directory", "bench", "BENCH_ARGS=--quick"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    words = shlex.split(out.stdout.strip().splitlines()[-1])
    assert words[0].endswith("/ditforge") and words[1] == "bench" and "--quick" in words, words
    return words[1:]


def test_make_bench_quick_runs_every_section(embedded, tmp_path):
    """Every section (train, attention, data, checkpoint, lora) runs and reports no error; the train rows carry
    every field. (Once, the data section's lazy import failed only outside --quick: see
    tests/unit/test_layering.py::test_every_relative_import_resolves.) The data section streams from
    the embedded S3 server too, so the services are up (alone, the S3 figure was an error row)."""
    out = tmp_path / "bench.json"
    args = _make_bench_quick()
    args[args.index("--json") + 1] = str(out)
    r = run_cli(*args, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["errors"] == {} and result["quick"] is True, result["errors"]
    assert {c["section"] for c in result["configs"]} == {"train", "attention", "data", "checkpoint", "lora"}
    data = {f"{c['bench']}.{c['metric']}": c for c in result["configs"] if c["section"] == "data"}
    assert {
        "data.ingest.images_per_s_per_core",
        "data.stream.samples_per_s_local",
        "data.stream.samples_per_s_s3",
        "train.consume.samples_per_s",
        "data.tar_read.samples_per_s_own",
        "data.tar_read.samples_per_s_webdataset",
    } <= set(data), sorted(data)
    assert all(c["value"] > 0 and not c.get("error") for c in data.values()), data
    ckpt = [c for c in result["configs"] if c["section"] == "checkpoint" and c["name"] != "checkpoint-reshard"]
    assert ckpt and all(c["checkpoint_MB"] > 0 and c["stall_s"] >= 0 for c in ckpt), ckpt
    reshard = [c for c in result["configs"] if c["name"] == "checkpoint-reshard"]
    assert reshard and all(c["reshard_s"] > 0 and c["plain_resume_s"] > 0 for c in reshard), reshard
    configs = result["configs"]
    assert result["meta"]["device_kind"] == "cpu" and result["meta"]["torch"] and result["meta"]["deepspeed"]
    assert result["meta"]["command"].startswith("ditforge bench") and "--quick" in result["meta"]["command"]
    cpu = [c for c in configs if c["name"].startswith("cpu-")]
    assert len(cpu) == 1, configs
    c = cpu[0]
    assert KEYS <= set(c), KEYS - set(c)
    assert c["mfu"] is None  # no known peak for a CPU: only the measured-matmul ratio
    assert c["samples_per_s"] > 0 and c["baseline_samples_per_s"] > 0 and c["ratio_to_baseline"] > 0
    assert c["peak_tflops_measured_matmul"] > 0 and c["flops_per_sample_step"] > 0
    # Per-rank state for every ZeRO stage, and the ratio the issue asks for.
    assert set(c["zero_stages"]) == {"zero0", "zero1", "zero2", "zero3"}
    for z in c["zero_stages"].values():
        assert z["state_bytes"]["params"] > 0 and z["state_bytes"]["optimizer"] > 0
    # ZeRO-3 partitions parameters and optimizer state across the 2 ranks: less than ZeRO-0's.
    # (Not half on CPU: in fp32 DeepSpeed keeps an fp32 master partition beside the parameter one.)
    assert 0 < c["zero3_over_zero0_state"] < 1
    # The ablation: every lever named, the GPU-only ones skipped on CPU, the CPU-runnable one measured.
    from ditforge.bench.train import LEVERS

    ab = {a["name"]: a for a in c["ablation"]}
    assert set(ab) == {lv["name"] for lv in LEVERS}
    assert ab["bf16_no_overflow_check"]["status"] == ab["compile_full"]["status"] == "skipped: needs CUDA"
    assert ab["no_clip_upper_bound"]["status"] == "measured" and ab["no_clip_upper_bound"]["speedup"] > 0
    assert ab["clip_no_item"]["status"] == "covered by bf16_no_overflow_check"
    # LoRA against full fine-tuning: the same step, far fewer trainable weights, less optimizer state
    lora = [x for x in configs if "lora_rank" in x]
    assert len(lora) == 1 and lora[0]["name"].startswith("lora-vs-full-cpu"), lora
    full, adapted = lora[0]["full"], lora[0]["lora"]
    assert 0 < adapted["trainable_params"] < full["trainable_params"] == full["params"]
    assert adapted["step_s"] > 0 and full["step_s"] > 0
    assert adapted["state_bytes"]["optimizer"] < full["state_bytes"]["optimizer"]
    fp8 = [x for x in configs if "tolerance" in x]
    assert len(fp8) == 1 and fp8[0]["status"].startswith("skipped: needs CUDA")
    # Attention: both shapes, every kernel either timed or saying why it cannot run on a CPU.
    att = {x["name"]: x for x in configs if x["section"] == "attention"}
    assert set(att) == {"attention-dit-xl2-256", "attention-dit-b2-video-4x256"}
    for a in att.values():
        assert a["fwd_bwd"]["math"]["ms"] > 0 and a["fwd_bwd"]["sdpa_cudnn"]["error"]
    # The performance page from this JSON says it is a CPU run, and carries the measured figures.
    page_path = tmp_path / "performance.md"
    from ditforge.bench.report import _fmt, main

    assert main([str(out), "--out", str(page_path)]) == 0
    page = page_path.read_text()
    assert "**CPU run.**" in page and "no_clip_upper_bound" in page and "skipped: needs CUDA" in page
    assert f"| {c['name']} |" in page and f"| {_fmt(c['samples_per_s'])} |" in page  # as the page rounds it
    assert "attention-dit-b2-video-4x256: B=1, tokens=1024" in page


def test_report_of_a_bad_file_is_one_line(tmp_path, capsys):
    from ditforge.bench.report import main

    bad = tmp_path / "x.json"
    bad.write_text("{not json")
    assert main([str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {bad}: not a bench JSON")


def test_compiled_blocks_match_eager(one_thread):
    torch.manual_seed(0)
    cfg = DiTConfig(in_channels=4, size="T", num_classes=10)
    eager = DiT(cfg)
    compiled = DiT(cfg)
    compiled.load_state_dict(eager.state_dict())
    compile_model(compiled, "blocks")
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    a = eager(x, t, y)
    b = compiled(x, t, y)
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    b.square().mean().backward()  # the compiled backward runs too
    assert compiled.blocks[0].attn.qkv.weight.grad is not None


class _Loader:
    """A loader's surface: batches, and a position that moves when a batch is read."""

    def __init__(self, n: int):
        from ditforge.data.loader import Position

        self.position = Position(0, 0)
        self.n = n

    def __iter__(self):
        for i in range(self.n):
            self.position.batch += 1
            yield torch.full((2, 3), float(i)), torch.tensor([i, i]), [f"k{i}"], [""]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_prefetcher_position_is_the_consumed_batch(device):
    loader = _Loader(5)
    it = DevicePrefetcher(loader, torch.device(device), torch.bfloat16)
    for i in range(4):
        x, y, keys, _ = next(it)
        assert x.device.type == device and x.dtype == torch.bfloat16 and float(x[0, 0]) == i and keys == [f"k{i}"]
        # The checkpoint records the position after the batch the step used, even when the loader
        # has already been read one batch further (GPU path).
        assert it.position.batch == i + 1
    assert loader.position.batch == (5 if device == "cuda" else 4)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_step_noise_is_drawn_on_the_device_and_repeats(device):
    a = torch.randn(4, generator=step_generator(1, 7, 0, device), device=device)
    b = torch.randn(4, generator=step_generator(1, 7, 0, device), device=device)
    c = torch.randn(4, generator=step_generator(1, 8, 0, device), device=device)
    assert a.device.type == device and torch.equal(a, b) and not torch.equal(a, c)
