"""The end of a run: its final checkpoint exported, saved as an MLflow pyfunc model in its MLflow
run and registered (`models:/NAME/VERSION`), by the driver after training or again by
`ditforge register RUN_URI` when that failed. Apart from runs/folder.py because it stands above
the training code (export, pyfunc) that the folder's layout stands below."""

from __future__ import annotations

from typing import Any

from .. import credentials
from ..inference import pyfunc
from ..inference.export import export
from ..train.tracking import end_run, retry_final
from .folder import read_info


def finalize(job: dict, client: Any) -> str:
    """Export the final checkpoint's consolidated weights into the MLflow run and register them;
    → `models:/NAME/VERSION`. Every MLflow call retries (it comes after a whole run)."""
    import tempfile

    run_id, name = job["mlflow_run_id"], job["spec"]["name"]
    with tempfile.TemporaryDirectory() as d:
        cfg = export(job["run_uri"], f"file://{d}/export")
        # an MLflow pyfunc model (MLmodel, signature, the export as its artifacts): see inference/pyfunc.py
        pyfunc.save(f"{d}/export", f"{d}/model")
        retry_final(client.log_artifacts, run_id, f"{d}/model", "model", what="uploading the model")
    run = retry_final(client.get_run, run_id, what="reading the run")
    source = f"{run.info.artifact_uri}/model"
    retry_final(ensure_registered_model, client, name, what="creating the model")
    tags = {
        "checkpoint_uri": cfg["checkpoint"],
        "spec_digest": job.get("spec_digest", ""),
        "step": str(cfg["step"]),
        "final_loss": str(run.data.metrics.get("train/loss", "")),
        "run": job["run_name"],
    }
    mv = retry_final(client.create_model_version, name, source, run_id=run_id, tags=tags, what="registering the model")
    retry_final(client.set_tag, run_id, "ditforge.model", f"models:/{name}/{mv.version}", what="tagging the run")
    print(f"ditforge: registered models:/{name}/{mv.version} (from {cfg['checkpoint']})", flush=True)
    return f"models:/{name}/{mv.version}"


def ensure_registered_model(client: Any, name: str) -> None:
    """The registered model `name`, created when missing. Two runs of one job can end at the same
    moment (seen in the test suite's two workers): the later create then meets the model the other
    just made, RESOURCE_ALREADY_EXISTS, which is what it wanted."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    try:
        client.create_registered_model(name, tags={"ditforge.job": name})
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def register(run_uri: str, tracking_uri: str) -> str:
    """Redo a failed registration from a finished run's folder (`ditforge register RUN_URI`): its
    newest complete checkpoint, into the MLflow run named in its run.json; the run then ends FINISHED."""
    from mlflow.tracking import MlflowClient

    info = read_info(run_uri)
    credentials.use_mlflow_credentials()
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)  # never a process-wide default's registry
    digest = client.get_run(info["mlflow_run_id"]).data.tags.get("ditforge.spec_digest", "")
    job = {
        "mlflow_run_id": info["mlflow_run_id"],
        "spec": {"name": info["job"]},
        "run_uri": run_uri,
        "run_name": info["run_name"],
        "spec_digest": digest,
    }
    model = finalize(job, client)
    try:
        client.delete_tag(info["mlflow_run_id"], "ditforge.error")  # the failure it records is mended
    except Exception:
        pass  # no such tag
    end_run(client, info["mlflow_run_id"], "FINISHED")
    return model
