"""Faults during a run: the S3 server and the MLflow server each go away for a while.

Training must not stop: checkpoints attempted while S3 is down are retried with backoff, then
marked failed with a clear log line, and the next save succeeds; no incomplete checkpoint is ever
what a resume picks; metrics logged while MLflow is down are buffered and delivered, with no gap in
the step series.
"""

from __future__ import annotations

import json
import re
import time
import uuid

import pytest
from mlflow.tracking import MlflowClient

from ditforge import services, storage
from ditforge.cluster.jobs import jobs_client
from ditforge.train.checkpoint import download
from ditforge.runs.folder import MANIFEST, all_steps, complete_steps, join_step, resolve

from ..conftest import REPO, run_cli
from ..datasets import make_latents

pytestmark = [pytest.mark.slow, pytest.mark.fault, pytest.mark.serial]  # stops S3 and MLflow


def _wait_for_step(rec: dict, step: int, timeout: float = 300) -> None:
    client, deadline = MlflowClient(rec["tracking_uri"]), time.time() + timeout
    while time.time() < deadline:
        m = client.get_run(rec["mlflow_run_id"]).data.metrics
        if m.get("train/step", 0) >= step:
            return
        time.sleep(0.5)
    raise AssertionError(f"run never reached step {step}")


def _wait_for_job(rec: dict, timeout: float = 600) -> str:
    client, deadline = jobs_client(rec["dashboard"]), time.time() + timeout
    while time.time() < deadline:
        state = str(client.get_job_status(rec["job_id"]).value)
        if state in ("SUCCEEDED", "FAILED", "STOPPED"):
            return state
        time.sleep(1)
    raise AssertionError("job did not end")


def test_run_survives_s3_and_mlflow_outages(embedded, tmp_path):
    # Data on local disk, checkpoints on S3: the outage hits the checkpoint uploads only.
    data = f"file://{tmp_path}/data"
    make_latents(f"{data}/latents", [64] * 4, [(12, 16, 16)], noise_seed=0)
    runs = f"s3://ditforge/tests/faults-{uuid.uuid4().hex[:8]}"
    steps = 120
    r = run_cli(
        "submit",
        str(REPO / "jobs" / "demo-image.yaml"),
        "--set",
        f"data.train={data}/latents",
        "--set",
        f"checkpoint.uri={runs}",
        "--set",
        f"train.steps={steps}",
        "--set",
        "checkpoint.every_steps=5",
        "--set",
        "checkpoint.keep_last=50",
        "--set",
        "tracking.log_every=1",
        "--set",
        "train.resume=never",
        "--set",
        "sample.per_class=1",
        "--set",
        "sample.steps=2",
        "--set",
        "tracking.experiment=tests",
    )
    assert r.returncode == 0, r.stderr
    rec = json.loads((storage.home() / "jobs" / f"{r.stdout.strip().splitlines()[-1]}.json").read_text())

    _wait_for_step(rec, 10)
    # The object store goes away for longer than one save's retries (s3fs's own and ours, ~15 s),
    # so at least one save fails outright.
    services.stop_process("s3")
    t0 = time.time()
    # What every storage call does meanwhile: retry with backoff (0.5 + 1 + 2 + 4 s between 5
    # attempts), then fail with one error naming the cause, not hang.
    with pytest.raises(OSError, match="Could not connect|Connect"):
        storage.exists(f"s3://ditforge/tests/probe-{uuid.uuid4().hex[:8]}/x")  # never listed: no cached answer
    assert time.time() - t0 >= 7.5
    time.sleep(max(0.0, 40 - (time.time() - t0)))
    # The moment S3 is back: a resume picks the newest COMPLETE checkpoint, whatever the outage
    # left half-written, and every file of it matches the manifest.
    run_uri = storage.join(runs, rec["run_name"])
    services.start_s3()
    picked = resolve(run_uri)
    assert storage.exists(storage.join(picked, MANIFEST))
    download(picked, tmp_path / "picked")  # raises if any file's checksum is off
    # Half-written folders the outage left: loading one by name is refused (judged below, once
    # the failed saves are known; a save in flight now may still complete).
    refused = {}
    for s in set(all_steps(run_uri)) - set(complete_steps(run_uri)):
        try:
            resolve(join_step(run_uri, s))
            refused[s] = False
        except FileNotFoundError:
            refused[s] = True
    mlflow_port = int(embedded.mlflow.rsplit(":", 1)[1])
    services.stop_process("mlflow")  # now the tracking server goes away
    time.sleep(12)
    services.start_mlflow(mlflow_port)

    assert _wait_for_job(rec) == "SUCCEEDED", jobs_client(rec["dashboard"]).get_job_logs(rec["job_id"])[-3000:]
    client = MlflowClient(rec["tracking_uri"])
    loss_steps = sorted(m.step for m in client.get_metric_history(rec["mlflow_run_id"], "train/loss"))
    assert loss_steps == list(range(1, steps + 1))  # buffered through the MLflow outage: no gap
    failed = [m.step for m in client.get_metric_history(rec["mlflow_run_id"], "train_checkpoint/failed")]
    assert failed, "no checkpoint was attempted while S3 was down"
    done = complete_steps(storage.join(runs, rec["run_name"]))
    assert steps in done and not set(failed) & set(done)
    assert any(s > max(failed) for s in done)  # saves after the outage succeeded again
    assert int(picked.rsplit("_", 1)[1]) not in failed
    assert all(refused[s] for s in set(refused) & set(failed)), refused
    logs = jobs_client(rec["dashboard"]).get_job_logs(rec["job_id"])
    # the fault is logged with its cause, once the save's retries are spent
    assert re.search(r"checkpoint \S+ FAILED \(\w+: .+\); training continues, the next save tries again", logs)
