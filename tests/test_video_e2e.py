"""A video job end to end: moving-shapes clips → (C, T, h, w) latents on S3 → the video DiT with
factorised attention, 3D RoPE and caption conditioning → checkpoint, GIF samples, export."""

from __future__ import annotations

import json
import uuid

import pytest
from mlflow.tracking import MlflowClient

from ditforge import storage
from ditforge.data import ingest
from ditforge.data.encode import encode_dataset, parse_vae
from ditforge.train.checkpoint import complete_steps

from .conftest import REPO, run_cli

pytestmark = pytest.mark.slow


def test_video_job_with_captions(embedded):
    root = f"s3://ditforge/tests/video-{uuid.uuid4().hex[:8]}"
    ingest.ingest("moving-shapes", f"{root}/pixels", limit=32, frames=4, shard_size=8, progress=False)
    m = encode_dataset(f"{root}/pixels", f"{root}/latents", parse_vae("identity"), progress=False)
    assert m["latent_shape"] == [12, 4, 16, 16]
    r = run_cli("submit", str(REPO / "jobs" / "video-dit-s-moving-shapes.yaml"), "--wait",
                "--set", f"data.train={root}/latents", "--set", f"checkpoint.uri={root}/runs",
                "--set", "model.size=T", "--set", "model.text=own", "--set", "data.batch_size=4", "--set", "data.frames=4",
                "--set", "train.steps=6", "--set", "train.warmup=1", "--set", "checkpoint.every_steps=3",
                "--set", "tracking.log_every=1", "--set", "tracking.experiment=tests", "--set", "train.resume=never",
                "--set", "sample.per_class=1", "--set", "sample.steps=2", "--set", "eval.quality=false")
    assert r.returncode == 0, r.stdout + r.stderr
    rec = json.loads((storage.home() / "jobs" / f"{r.stdout.strip().splitlines()[-1]}.json").read_text())
    client = MlflowClient(rec["tracking_uri"])
    run = client.get_run(rec["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert json.loads(run.data.params["model.latent_shape"].replace("'", '"')) == [12, 4, 16, 16]
    assert len(client.get_metric_history(rec["mlflow_run_id"], "train/loss")) == 6
    arts = [a.path for a in client.list_artifacts(rec["mlflow_run_id"], "samples")]
    assert any(a.endswith(".gif") for a in arts), arts  # video samples are viewable clips
    assert complete_steps(rec["run_uri"]) == [3, 6]
