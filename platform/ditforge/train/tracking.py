"""A narrow tracking interface: `log(metrics, step)`, `artifact(path)`, `close()`; rank 0 only."""

from __future__ import annotations

import time

import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient


class Tracker:
    def __init__(self, tracking_uri: str, run_id: str):
        self.client, self.run_id = MlflowClient(tracking_uri), run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])

    def params(self, params: dict) -> None:
        self.client.log_batch(self.run_id, params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items()])

    def artifact(self, path: str, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, path, folder)

    def tags(self, tags: dict) -> None:
        self.client.log_batch(self.run_id, tags=[mlflow.entities.RunTag(k, str(v)[:5000]) for k, v in tags.items()])


class NullTracker:
    """What ranks other than 0 get: one MLflow run per job, not one per worker."""

    def log(self, metrics, step):
        pass

    def params(self, params):
        pass

    def artifact(self, path, folder=None):
        pass

    def tags(self, tags):
        pass


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def create_run(tracking_uri: str, spec, run_name: str, source_yaml: str | None) -> str:
    """One MLflow run per job, created before submission so its id and link exist at once."""
    import tempfile
    from pathlib import Path

    import yaml

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(spec.tracking.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(spec.tracking.experiment)
    run = client.create_run(exp_id, run_name=run_name, tags={"ditforge.job": spec.name,
                                                              "ditforge.spec_digest": spec.digest()})
    run_id = run.info.run_id
    params = flatten(spec.model_dump(mode="json"))
    client.log_batch(run_id, params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items()])
    with tempfile.TemporaryDirectory() as d:
        resolved = Path(d) / "job.resolved.yaml"
        resolved.write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
        client.log_artifact(run_id, str(resolved), "spec")
        if source_yaml:
            client.log_artifact(run_id, source_yaml, "spec")
    return run_id
