"""The driver's end of a run: MLflow's own HTTP retries stay on outside a worker's tracker, the
final calls retry with backoff, and every way out ends the MLflow run (never left RUNNING)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from ditforge.runs import folder, register
from ditforge.runs import driver
from ditforge.train import tracking


def test_importing_the_training_modules_leaves_mlflow_retries_alone():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP_REQUEST")}
    code = (
        "import os, ditforge.train.tracking, ditforge.runs.driver, ditforge.train.worker; "
        "print(sorted(k for k in os.environ if k.startswith('MLFLOW_HTTP_REQUEST')))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"


def test_a_worker_tracker_fails_fast_only_while_it_is_open(monkeypatch):
    from ditforge.train.tracking import MlflowTracker

    for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(k, raising=False)
    t = MlflowTracker("http://127.0.0.1:9", "run", system_metrics=False)  # nothing listens there
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"  # its flush thread does the retrying
    t.close(timeout=1)
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ


class FakeClient:
    def __init__(self, fail_first: int = 0):
        self.calls, self.fail_first = [], fail_first

    def _call(self, *a):
        self.calls.append(a)
        if len(self.calls) <= self.fail_first:
            raise ConnectionError("connection reset by peer")

    def set_tag(self, run_id, key, value):
        self._call("set_tag", key, value)

    def set_terminated(self, run_id, status):
        self._call("set_terminated", status)


def test_final_calls_retry_with_backoff(monkeypatch):
    waits = []
    monkeypatch.setattr(tracking.time, "sleep", waits.append)
    client = FakeClient(fail_first=2)
    tracking.end_run(client, "r", "FINISHED")
    assert client.calls == [("set_terminated", "FINISHED")] * 3
    assert waits == [2.0, 4.0]


@pytest.mark.parametrize(
    "raised, status, code",
    [
        (
            RuntimeError("TrainingFailedError: ...\nFinalCheckpointFailed: checkpoint: the final checkpoint failed"),
            "FAILED",
            1,
        ),
        (KeyboardInterrupt(), "KILLED", 130),
        ("SIGTERM", "KILLED", 130),
        (None, "FINISHED", 0),
    ],
)
def test_every_driver_exit_ends_the_mlflow_run(monkeypatch, raised, status, code):
    client = FakeClient()
    monkeypatch.setattr(driver, "read_job", lambda path: {"mlflow_run_id": "r", "tracking_uri": "x"})
    monkeypatch.setattr(driver, "MlflowClient", lambda uri, **kw: client)
    monkeypatch.setattr(driver.signal, "signal", lambda sig, handler: None)

    def run_job(job, c):
        if raised == "SIGTERM":  # what `ray job stop` sends: the handler main() installs
            driver._raise_killed(signal.SIGTERM, None)
        if raised is not None:
            raise raised
        return "FINISHED", 0

    monkeypatch.setattr(driver, "run_job", run_job)
    assert driver.main(["job.json"]) == code
    assert client.calls[-1] == ("set_terminated", status)
    if status == "FAILED":  # the error's last line, as the tag `ditforge status` shows
        assert (
            "set_tag",
            "ditforge.error",
            "FinalCheckpointFailed: checkpoint: the final checkpoint failed",
        ) in client.calls


def test_run_job_sizes_the_collective_timeout_and_names_the_redo_command(monkeypatch, tmp_path):
    """run_job without a cluster: Ray's pieces stubbed, the driver's own logic real."""
    import ray
    import ray.train.torch

    from ditforge.cluster import capacity
    from ditforge.spec import JobSpec
    from ditforge.train import checkpoint

    seen = {}

    class Trainer:
        def __init__(self, **kw):
            seen.update(kw)

        def fit(self):
            return None

    monkeypatch.setattr(ray, "init", lambda *a, **k: None)
    monkeypatch.setattr(ray.train.torch, "TorchTrainer", Trainer)
    monkeypatch.setattr(folder, "record_process", lambda *a: None)
    monkeypatch.setattr(capacity, "autoscaling", lambda: True)

    def no_export(job, client):
        raise ConnectionError("registry down")

    monkeypatch.setattr(register, "finalize", no_export)
    spec = JobSpec.model_validate(
        {"name": "j", "data": {"train": f"file://{tmp_path}/d"}, "checkpoint": {"uri": f"file://{tmp_path}/runs"}}
    )
    job = {
        "spec": spec.model_dump(mode="json"),
        "run_uri": f"file://{tmp_path}/runs/r",
        "run_name": "r",
        "mlflow_run_id": "m",
    }
    with pytest.raises(
        RuntimeError,
        match=r"registration: ConnectionError: registry down .*redo with: "
        r"ditforge register file://.*/runs/r",
    ):
        driver.run_job(job, FakeClient())
    assert seen["torch_config"].timeout_s == int(checkpoint.PG_TIMEOUT_S)  # resources.collective_timeout_s's default


def test_a_model_another_run_registered_a_moment_ago_is_used_not_an_error():
    """Two runs of one job ending together: both find no model, both create it; the second create's
    RESOURCE_ALREADY_EXISTS means the model is there. Any other error still raises."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE

    class Racing:
        def __init__(self, create_error):
            self.create_error, self.created = create_error, []

        def get_registered_model(self, name):
            raise MlflowException(f"Registered Model with name={name} not found", error_code=RESOURCE_DOES_NOT_EXIST)

        def create_registered_model(self, name, tags):
            self.created.append(name)
            if self.create_error is not None:
                raise MlflowException(f"Registered Model (name={name}) already exists.", error_code=self.create_error)

    for client in (Racing(None), Racing(RESOURCE_ALREADY_EXISTS)):
        register.ensure_registered_model(client, "demo-image")
        assert client.created == ["demo-image"]
    with pytest.raises(MlflowException):
        register.ensure_registered_model(Racing(TEMPORARILY_UNAVAILABLE), "demo-image")


def test_an_experiment_another_submission_just_created_is_used():
    """Two jobs started together both find no experiment; the second create's
    RESOURCE_ALREADY_EXISTS gives the first one's experiment, not an error."""
    from types import SimpleNamespace

    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, TEMPORARILY_UNAVAILABLE

    from ditforge.train import tracking

    class Racing:
        def __init__(self, code):
            self.code = code

        def create_experiment(self, name, tags):
            raise MlflowException(f"Experiment(name={name}) already exists.", error_code=self.code)

        def get_experiment_by_name(self, name):
            return SimpleNamespace(experiment_id="7")

    assert tracking._create_experiment(Racing(RESOURCE_ALREADY_EXISTS), "tests") == "7"
    with pytest.raises(MlflowException):
        tracking._create_experiment(Racing(TEMPORARILY_UNAVAILABLE), "tests")
