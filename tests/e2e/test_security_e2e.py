"""Security end to end, through the real stack (`ditforge submit` → Ray Jobs → Ray Train → S3 +
MLflow): no secret reaches any log, MLflow param, tag or artifact, or checkpoint file; a resume
from a checkpoint whose files are malicious pickles fails in one line without running them."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from ditforge import storage
from ditforge.cluster.jobs import jobs_client

from ..conftest import REPO, run_cli
from ..datasets import make_latents
from .test_security import plant_malicious_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def latents(embedded):
    root = f"s3://ditforge/tests/sec-{uuid.uuid4().hex[:8]}"
    make_latents(f"{root}/latents", [32] * 2, [(12, 16, 16)], noise_seed=0)
    return root


def _submit(job: Path, latents: str, *sets: str, env: dict | None = None):
    args = [
        "submit",
        str(job),
        "--wait",
        "--set",
        f"data.train={latents}/latents",
        "--set",
        f"checkpoint.uri={latents}/runs",
        "--set",
        "train.steps=4",
        "--set",
        "train.warmup=1",
        "--set",
        "checkpoint.every_steps=4",
        "--set",
        "tracking.log_every=1",
        "--set",
        "tracking.experiment=tests",
        "--set",
        "tracking.system_metrics=false",
        "--set",
        "sample.per_class=1",
        "--set",
        "sample.steps=2",
        "--set",
        "eval.quality=false",
    ]
    for s in sets:
        args += ["--set", s]
    r = run_cli(*args, env=env)
    job_id = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else None
    rec = json.loads((storage.home() / "jobs" / f"{job_id}.json").read_text()) if job_id else None
    return r, rec


def _s3_files(uri: str) -> dict[str, bytes]:
    fs, root = storage.filesystem(uri)
    return {p: fs.cat_file(p) for p in fs.find(root)}


def test_no_secret_in_logs_params_tags_artifacts_or_checkpoints(latents, tmp_path):
    started = time.time()
    creds = json.loads(storage.credentials_file().read_text())
    secret = creds["secret_access_key"]  # the real S3 key: the CLI and every worker use it
    sentinel = f"df-sentinel-{uuid.uuid4().hex}"
    api_key = f"df-api-key-{uuid.uuid4().hex}"  # a variable named *_KEY (WANDB_API_KEY, OPENAI_API_KEY, ...)
    # The CLI gets its S3 keys from the environment, and carries more secrets there (an MLflow
    # password, an API token); the user's YAML even has a token pasted into a comment.
    env = {
        "AWS_ACCESS_KEY_ID": creds["access_key_id"],
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_ENDPOINT_URL_S3": creds["endpoint_url"],
        "MLFLOW_TRACKING_USERNAME": "ditforge",
        "MLFLOW_TRACKING_PASSWORD": sentinel,
        "DITFORGE_TEST_API_TOKEN": sentinel,
        "DITFORGE_TEST_API_KEY": api_key,
    }
    job = tmp_path / "job.yaml"
    job.write_text((REPO / "jobs" / "demo-image.yaml").read_text() + f"# api token: {sentinel}\n# api key: {api_key}\n")
    r, rec = _submit(job, latents, "train.resume=never", env=env)
    assert r.returncode == 0, r.stdout + r.stderr

    found: dict[str, bytes] = {"cli output": (r.stdout + r.stderr).encode()}
    # every log the services and jobs write, the job record, and Ray's own logs of this run
    for f in [*(storage.home() / "logs").rglob("*"), *(storage.home() / "jobs").glob("*.json")]:
        if f.is_file():
            found[str(f)] = f.read_bytes()
    found["ray job logs"] = jobs_client(rec["dashboard"]).get_job_logs(rec["job_id"]).encode()
    for f in Path("/tmp/ray/session_latest/logs").rglob("*"):
        if f.is_file() and f.stat().st_mtime >= started:
            found[str(f)] = f.read_bytes()
    # every MLflow param, tag and artifact of the run
    client = MlflowClient(rec["tracking_uri"])
    run = client.get_run(rec["mlflow_run_id"])
    found["mlflow params"] = json.dumps(run.data.params).encode()
    found["mlflow tags"] = json.dumps(run.data.tags).encode()
    import mlflow

    arts = Path(
        mlflow.artifacts.download_artifacts(
            run_id=rec["mlflow_run_id"], dst_path=str(tmp_path / "arts"), tracking_uri=rec["tracking_uri"]
        )
    )
    art_files = [f for f in arts.rglob("*") if f.is_file()]
    assert {"job.resolved.yaml", "job.yaml", "raw.safetensors"} <= {f.name for f in art_files}
    found |= {str(f): f.read_bytes() for f in art_files}
    # every file of every checkpoint (DeepSpeed's .pt pickles, spec.yaml, manifests)
    ckpt = _s3_files(rec["run_uri"])
    assert any(p.endswith("spec.yaml") for p in ckpt) and any(p.endswith("optim_states.pt") for p in ckpt)
    found |= ckpt

    assert len(found) > 20
    for name, data in found.items():
        for s in (secret, sentinel, api_key):
            assert s.encode() not in data, f"a planted secret is in {name}"
    # what was redacted is still there, masked: the comment survived in the logged source YAML
    logged_source = next(d for n, d in found.items() if n.endswith("/spec/job.yaml"))
    assert b"# api token: ***" in logged_source and b"# api key: ***" in logged_source


def test_resume_from_a_malicious_checkpoint_fails_in_one_line_without_running_it(latents, tmp_path):
    marker = tmp_path / "PWNED"
    step = f"{latents}/planted/run-1/step_00000010"
    plant_malicious_checkpoint(step, marker)
    # at the planted checkpoint's own world size (1): another size would be refused at submit, before any worker
    r, rec = _submit(REPO / "jobs" / "demo-image.yaml", latents, f"train.resume={step}", "resources.workers=1")
    assert r.returncode == 1, r.stdout + r.stderr
    error = MlflowClient(rec["tracking_uri"]).get_run(rec["mlflow_run_id"]).data.tags["ditforge.error"]
    assert "refused to load: not a plain tensor checkpoint" in error and "posix.system" in error, error
    assert "\n" not in error and "FAILED" in r.stderr, r.stderr[-2000:]
    assert not marker.exists()
