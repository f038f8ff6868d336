"""Each shipped job spec runs end to end through `ditforge submit` (the demo through `ditforge demo`),
scaled down only by `--set` overrides of size, steps, workers and data, never by editing the file:
its end-of-run sampling, evaluation, export and registration run as written, so a shipped spec
cannot carry a setting that fails at the end of a run.

Cheap by construction: one shared tiny data set per kind. The demo run makes the image set (its own
ingest + encode); the VAE and the image DiT jobs reuse its pixels and latents; the video job uses
one small moving-shapes latent set."""

from __future__ import annotations

import json
import uuid

import pytest
from mlflow.tracking import MlflowClient

from ditforge import storage
from ditforge.data import ingest
from ditforge.data.encode import encode_dataset, parse_vae

from .conftest import REPO, run_cli

pytestmark = pytest.mark.slow
JOBS = REPO / "jobs"
# Scale only: few steps, the end-of-run work as written but for its own step counts.
SMALL = ["train.steps=4", "train.warmup=1", "checkpoint.every_steps=4", "tracking.log_every=2",
         "tracking.experiment=tests-jobs", "train.resume=never", "sample.steps=2", "eval.steps=2"]


@pytest.fixture(scope="module")
def root(embedded):
    return f"s3://ditforge/tests/jobs-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def demo(root):
    """`ditforge demo` on 512 images (two 256-image shards, one per worker): its data (pixels + latents) is the image set of the other jobs."""
    sets = [*SMALL, f"data.train={root}/shapes-latents", f"checkpoint.uri={root}/runs", "eval.per_class=2"]
    r = run_cli("demo", "--images", "512", "--json", *[a for s in sets for a in ("--set", s)], timeout=1200)
    return r


def _sets(*sets: str) -> list[str]:
    return [a for s in [*SMALL, *sets] for a in ("--set", s)]


def _finished(r) -> dict:
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rec = json.loads((storage.home() / "jobs" / f"{r.stdout.strip().splitlines()[-1]}.json").read_text())
    run = MlflowClient(rec["tracking_uri"]).get_run(rec["mlflow_run_id"])
    assert run.info.status == "FINISHED", run.info.status
    return {"rec": rec, "run": run, "client": MlflowClient(rec["tracking_uri"])}


def _samples_quality_and_model(done: dict, steps: int = 4) -> None:
    client, run_id = done["client"], done["rec"]["mlflow_run_id"]
    arts = [a.path for a in client.list_artifacts(run_id, "samples")]
    assert any(a.startswith(f"samples/step_{steps:08d}") for a in arts), arts
    assert "quality/class_accuracy" in done["run"].data.metrics  # the generated-set evaluation ran
    assert done["run"].data.tags["ditforge.model"].startswith("models:/")  # exported and registered


def test_demo_command_runs_the_demo_spec_end_to_end(demo):
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    result = json.loads(demo.stdout.strip().splitlines()[-1])
    assert result["steps"] == 4 and result["model"].startswith("models:/demo-image/")
    run = MlflowClient(result["tracking_uri"]).get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED" and "quality/class_accuracy" in run.data.metrics


def test_image_dit_s_shapes(demo, root):
    assert demo.returncode == 0, "needs the demo's latents"
    r = run_cli("submit", str(JOBS / "image-dit-s-shapes.yaml"), "--wait",
                *_sets(f"data.train={root}/shapes-latents", f"checkpoint.uri={root}/runs", "model.size=T",
                       "resources.workers=1", "eval.per_class=2"), timeout=1200)
    _samples_quality_and_model(_finished(r))


def test_vae_shapes(demo, root):
    assert demo.returncode == 0, "needs the demo's pixels"
    vae = f"{root}/vae"
    r = run_cli("submit", str(JOBS / "vae-shapes.yaml"), "--wait",
                *_sets(f"data.train={root}/shapes-pixels", f"vae.path={vae}", f"checkpoint.uri={root}/runs",
                       "resources.workers=1", "vae.base_channels=8"), timeout=1200)
    _finished(r)
    assert storage.exists(storage.join(vae, "config.json"))  # a VAE job's result is its vae.path


def test_video_dit_s_moving_shapes(root):
    data = f"{root}/moving-shapes"
    ingest.ingest("moving-shapes", f"{data}-pixels", limit=16, frames=8, shard_size=8, progress=False)
    encode_dataset(f"{data}-pixels", f"{data}-latents", parse_vae("identity"), progress=False)
    r = run_cli("submit", str(JOBS / "video-dit-s-moving-shapes.yaml"), "--wait",
                *_sets(f"data.train={data}-latents", f"checkpoint.uri={root}/runs", "model.size=T",
                       "resources.workers=1", "data.batch_size=4", "sample.per_class=1", "eval.per_class=1"),
                timeout=1200)
    _samples_quality_and_model(_finished(r))
