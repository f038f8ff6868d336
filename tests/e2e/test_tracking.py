"""The tracker's buffer under a record MLflow refuses: a Ray Train restart logs its params again
into the same run; one MLflow rejects must be dropped, not retried forever ahead of the metrics."""

from __future__ import annotations

import uuid

from mlflow.tracking import MlflowClient

from ditforge.train.tracking import MlflowTracker


def test_rejected_record_is_dropped_and_later_metrics_arrive(embedded, capsys):
    client = MlflowClient(embedded.mlflow)
    exp = client.get_experiment_by_name("tests")
    run_id = client.create_run(
        exp.experiment_id if exp else client.create_experiment("tests"), run_name=f"tracker-{uuid.uuid4().hex[:6]}"
    ).info.run_id
    t = MlflowTracker(embedded.mlflow, run_id, system_metrics=False)
    t.params({"world_size": 2})
    t.log({"train/loss": 1.0}, 1)
    t.params({"world_size": 3})  # MLflow params are immutable: the server answers 400
    t.log({"train/loss": 0.5}, 2)
    assert t.close(timeout=30)
    assert t.failures == 0  # a refusal is not an outage: no backoff
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2]
    assert client.get_run(run_id).data.params["world_size"] == "2"
    assert "MLflow rejected a params record" in capsys.readouterr().out
