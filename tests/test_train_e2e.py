"""End to end through the real stack: `ditforge submit` → Ray Jobs → Ray Train (2 workers) →
DeepSpeed ZeRO on CPU/gloo → latents from webdataset shards on S3 → MLflow + S3 checkpoints."""

from __future__ import annotations

import json
import uuid

import pytest
from mlflow.tracking import MlflowClient

from ditforge import storage
from ditforge.data.encode import encode_dataset
from ditforge.data.ingest import ingest_shapes
from ditforge.models.vae import IdentityVAE
from ditforge.train.checkpoint import MANIFEST, complete_steps

from .conftest import REPO, run_cli

pytestmark = pytest.mark.slow
JOB = str(REPO / "jobs" / "demo-image.yaml")


@pytest.fixture(scope="module")
def latents(embedded):
    root = f"s3://ditforge/tests/e2e-{uuid.uuid4().hex[:8]}"
    ingest_shapes(f"{root}/pixels", limit=512, resolution=32, shard_size=64, progress=False)
    encode_dataset(f"{root}/pixels", f"{root}/latents", IdentityVAE(2), progress=False)
    return root


def submit(latents: str, *sets: str, resume: str | None = None) -> dict:
    """Submit with --wait; return the job record written by submit."""
    args = ["submit", JOB, "--wait", "--set", f"data.train={latents}/latents", "--set",
            f"checkpoint.uri={latents}/runs", "--set", "tracking.log_every=1", "--set", "tracking.experiment=tests",
            "--set", "sample.per_class=2", "--set", "sample.steps=4"]
    for s in sets:
        args += ["--set", s]
    if resume:
        args += ["--resume", resume]
    r = run_cli(*args)
    assert r.returncode == 0, r.stdout + r.stderr
    job_id = r.stdout.strip().splitlines()[-1]
    rec = json.loads((storage.home() / "jobs" / f"{job_id}.json").read_text())
    return rec


def losses(rec: dict) -> dict[int, float]:
    hist = MlflowClient(rec["tracking_uri"]).get_metric_history(rec["mlflow_run_id"], "train/loss")
    return {m.step: m.value for m in hist}


@pytest.fixture(scope="module")
def zero2_run(latents):
    return submit(latents, "train.steps=20", "train.warmup=2", "checkpoint.every_steps=10", "deepspeed.zero_stage=2")


def test_zero2_run_logs_to_one_mlflow_run_and_checkpoints_to_s3(zero2_run):
    rec = zero2_run
    client = MlflowClient(rec["tracking_uri"])
    run = client.get_run(rec["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    # one MLflow run per job, not per worker
    runs = client.search_runs([run.info.experiment_id], filter_string=f"tags.ditforge.job = 'demo-image' "
                              f"and attributes.run_name = '{rec['run_name']}'")
    assert len(runs) == 1
    assert run.data.params["deepspeed.zero_stage"] == "2" and run.data.params["world_size"] == "2"
    for key in ("train/loss", "train/lr", "train/samples_per_s", "train/step_s"):
        assert len(client.get_metric_history(rec["mlflow_run_id"], key)) == 20, key
    loss = losses(rec)
    first, last = sum(loss[s] for s in range(1, 6)) / 5, sum(loss[s] for s in range(16, 21)) / 5
    assert last < 0.9 * first, loss
    arts = {a.path for a in client.list_artifacts(rec["mlflow_run_id"], "samples")}
    assert "samples/samples.png" in arts
    assert {a.path for a in client.list_artifacts(rec["mlflow_run_id"], "spec")} >= {"spec/job.resolved.yaml"}
    # checkpoints: complete (manifest last, every listed file present with its size) on S3
    assert complete_steps(rec["run_uri"]) == [10, 20]
    manifest = json.loads(storage.read_bytes(storage.join(rec["run_uri"], "step_00000020", MANIFEST)))
    assert manifest["world_size"] == 2
    fs, root = storage.filesystem(storage.join(rec["run_uri"], "step_00000020"))
    for rel, meta in manifest["files"].items():
        assert fs.size(f"{root}/{rel}") == meta["bytes"], rel
    assert any("optim_states" in f for f in manifest["files"])
    assert {m["rank"] for m in manifest["files"].values()} == {0, 1}  # each rank uploaded its own shard


def test_resume_continues_exactly(latents, zero2_run):
    """Stop at step 10, resume to 20: steps 11..20 match the uninterrupted run (optimizer, LR
    schedule, data position and randomness all restored)."""
    short = submit(latents, "train.steps=10", "train.warmup=2", "checkpoint.every_steps=10")
    assert complete_steps(short["run_uri"]) == [10]
    resumed = submit(latents, "train.steps=20", "train.warmup=2", "checkpoint.every_steps=10",
                     resume=short["run_name"])
    assert resumed["mlflow_run_id"] == short["mlflow_run_id"]  # the same MLflow run continues
    full, part = losses(zero2_run), losses(resumed)
    assert sorted(part) == list(range(1, 21))
    for step in range(1, 21):
        assert part[step] == pytest.approx(full[step], rel=1e-6, abs=1e-7), (step, part[step], full[step])
    assert complete_steps(resumed["run_uri"]) == [10, 20]


def test_zero3_two_workers(latents):
    rec = submit(latents, "train.steps=6", "train.warmup=1", "checkpoint.every_steps=3", "deepspeed.zero_stage=3")
    assert complete_steps(rec["run_uri"]) == [3, 6]
    manifest = json.loads(storage.read_bytes(storage.join(rec["run_uri"], "step_00000006", MANIFEST)))
    # ZeRO-3 partitions parameters: every rank writes its own model-state shard
    assert sum("model_states" in f for f in manifest["files"]) == 2
    assert len(losses(rec)) == 6


def test_resume_of_unknown_run_is_one_line(latents):
    r = run_cli("submit", JOB, "--set", f"data.train={latents}/latents", "--set", f"checkpoint.uri={latents}/runs",
                "--resume", "no-such-run")
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: --resume no-such-run: no run named 'no-such-run' under {latents}/runs"
