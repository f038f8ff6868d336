"""The VAE trainer runs on the DiT loop's machinery (train/session.py): checkpoints and resume with
each rank's own data position, the stop marker, the NaN guard, process records; real loop on 2
CPU ranks without Ray (tests/loops.py)."""

from __future__ import annotations

import io
import json

import pytest
import torch

from ditforge import storage
from ditforge.data import shards, synthetic
from ditforge.runs.folder import complete_steps, join_step

from ..loops import metric, records, run_loop

pytestmark = pytest.mark.timeout(600)


def vae_spec(data: str, root, **train) -> dict:
    return {
        "name": "vae-loop-test",
        "task": "vae",
        "data": {"train": data, "resolution": 16, "batch_size": 4},
        "vae": {"kind": "own", "path": f"file://{root}/vae", "downsample": 2, "latent_channels": 4, "base_channels": 8},
        "train": {"steps": 3, "lr": 1e-3, "warmup": 1, "ema_decay": 0.0, **train},
        "deepspeed": {"zero_stage": 2},
        "resources": {"workers": 2, "cpus_per_worker": 1},
        "checkpoint": {"uri": f"file://{root}/runs", "every_steps": 2, "on_stop": True},
        "tracking": {"log_every": 1, "system_metrics": False},
    }


@pytest.fixture(scope="module")
def pixels(tmp_path_factory):
    """4 pixel shards of 8 generated 16x16 shapes (2 shards a rank), written directly (no Ray)."""
    root = tmp_path_factory.mktemp("vae-loop")
    uri = f"file://{root}/pixels"
    entries = []
    for i in range(4):
        rows = []
        for k in range(8 * i, 8 * i + 8):
            img, cls, _ = synthetic.shape_image(k, 16)
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            rows.append({"__key__": f"{k:06d}", "png": buf.getvalue(), "cls": str(cls)})
        entries.append(shards.write_shard(uri, f"shard-{i:06d}.tar", rows))
    shards.write_manifest(uri, {"kind": "pixels", "shards": entries})
    return uri, root


def _position(run_uri: str, step: int, rank: int) -> dict:
    return json.loads(storage.read_bytes(join_step(run_uri, step) + f"/rank_state/rank_{rank}.json"))["data"]


def test_vae_job_checkpoints_guards_nan_stops_and_resumes_where_each_rank_was(pixels):
    data, root = pixels
    run_uri = f"file://{root}/runs/vae-a"
    res = run_loop(
        "ditforge.train.vae_trainer.train_vae_loop", vae_spec(data, root, debug_nan_steps=[3]), run_uri, root / "a"
    )
    assert res == {0: None, 1: None}, res
    assert complete_steps(run_uri) == [2, 3]  # every_steps, then the final one
    assert metric(root / "a", "train/skipped_nonfinite")[3] == 1.0  # step 3's NaN loss skipped, counted
    assert storage.exists(f"file://{root}/vae/config.json")  # the finished run's product
    assert {n for n in storage.listdir(f"{run_uri}/_procs")} == {"rank_0.json", "rank_1.json"}
    assert records(root / "a", 0)[-1]["kind"] == "close"

    # A restart of the same run (Ray Train's, or a resubmit): continues at step 3; `ditforge stop`
    # lands it at the next logging step with a checkpoint (checkpoint.on_stop).
    storage.write_bytes(f"{run_uri}/STOP", b"")
    res = run_loop("ditforge.train.vae_trainer.train_vae_loop", vae_spec(data, root, steps=8), run_uri, root / "b")
    assert res == {0: None, 1: None}, res
    assert {"ditforge.resumed_from_step": 3} in [r["tags"] for r in records(root / "b", 0, "tags")]
    assert complete_steps(run_uri)[-1] == 4
    # 2 batches a shard, 2 shards a rank: after 4 steps each rank is at the end of epoch 0
    # (a loop that restarted from scratch would be at batch 1)
    assert [_position(run_uri, 4, r) for r in (0, 1)] == [{"epoch": 0, "batch": 4}] * 2


@pytest.mark.gpu
def test_vae_job_on_gpu_all_reduces_device_tensors(pixels):
    """NCCL all-reduces only GPU tensors: the loop's logging reduction must be on the device."""
    if torch.cuda.device_count() < 1:
        pytest.skip("needs a CUDA device")
    data, root = pixels
    spec = vae_spec(data, root, steps=2)
    spec["resources"] = {"workers": 1, "cpus_per_worker": 1, "use_gpu": True}
    res = run_loop(
        "ditforge.train.vae_trainer.train_vae_loop", spec, f"file://{root}/runs/vae-gpu", root / "gpu", world=1
    )
    assert res == {0: None}, res
