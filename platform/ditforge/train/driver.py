"""The Ray job's entry point: place the workers with Ray Train and run `worker.train_loop` on each.

`ditforge submit` runs `python -m ditforge.train.driver job.json` through the Ray Jobs API; the
job file (resolved spec, run name, MLflow run id) travels in the job's working_dir.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from mlflow.tracking import MlflowClient

from ..credentials import redact, use_mlflow_credentials


def scaling_config(spec):
    from ray.train import ScalingConfig

    res = spec.resources
    per_worker = {"CPU": res.cpus_per_worker, **({"GPU": res.gpus_per_worker} if res.use_gpu else {})}
    return ScalingConfig(num_workers=res.workers, use_gpu=res.use_gpu, resources_per_worker=per_worker,
                         placement_strategy=res.placement, accelerator_type=res.accelerator_type)


def read_job(path: str) -> dict:
    """job.json from `ditforge submit`, or a bare job spec (YAML or JSON, e.g. mounted into a
    KubeRay RayJob), for which the run is named and its MLflow run opened here instead."""
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f)  # YAML is a superset of JSON
    if "run_name" in data:
        return data
    from ..cluster.launch import new_run, resolve_paths
    from ..spec import JobSpec, check_roots

    spec = JobSpec.model_validate(data)
    check_roots(spec, path)  # a bare spec enters the platform here, not through load_job
    spec = resolve_paths(spec)
    tracking_uri = spec.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking_uri:
        raise SystemExit("ditforge: a bare job spec needs tracking.uri or $MLFLOW_TRACKING_URI")
    run_name, run_uri, run_id = new_run(spec, tracking_uri, path)
    return {"spec": spec.model_dump(mode="json"), "run_name": run_name, "run_uri": run_uri, "mlflow_run_id": run_id,
            "tracking_uri": tracking_uri, "resume": False}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ditforge-driver")
    p.add_argument("job", help="job.json written by `ditforge submit`")
    args = p.parse_args(argv)
    job = read_job(args.job)

    import ray
    from ray.train import FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .. import storage
    from ..cluster import capacity
    from ..cluster.launch import STOP_MARKER
    from ..spec import JobSpec
    from .checkpoint import record_process
    from .vae_trainer import train_vae_loop
    from .worker import train_loop

    spec = JobSpec.model_validate(job["spec"])
    use_mlflow_credentials()
    client = MlflowClient(job["tracking_uri"])
    ray.init()
    record_process(job["run_uri"], "driver")  # where `kill` finds this job's driver (see README)
    # A fixed-size cluster never grows: an impossible placement group would wait forever there.
    missing = None if capacity.autoscaling() else capacity.shortfall(spec.resources, capacity.nodes_in_cluster())
    if missing:
        print(f"ditforge: resources: {missing}", file=sys.stderr, flush=True)
        client.set_tag(job["mlflow_run_id"], "ditforge.error", redact(f"resources: {missing}")[:500])
        client.set_terminated(job["mlflow_run_id"], "FAILED")
        return 1
    trainer = TorchTrainer(
        train_loop_per_worker=train_vae_loop if spec.task == "vae" else train_loop,
        train_loop_config=job,
        scaling_config=scaling_config(spec),
        torch_config=TorchConfig(backend="nccl" if spec.resources.use_gpu else "gloo"),
        # A restarted worker group finds this run's newest complete checkpoint by itself.
        run_config=RunConfig(name=job["run_name"], storage_path=str(storage.home() / "ray-train"),
                             failure_config=FailureConfig(max_failures=spec.train.max_failures)),
    )
    try:
        trainer.fit()
    except Exception as e:  # the worker's error, shown in `ditforge status` through this tag
        print(redact(traceback.format_exc()), file=sys.stderr, flush=True)
        msg = redact(str(e)).strip().splitlines()
        client.set_tag(job["mlflow_run_id"], "ditforge.error", (msg[-1] if msg else type(e).__name__)[:500])
        client.set_terminated(job["mlflow_run_id"], "FAILED")
        return 1
    if storage.exists(storage.join(job["run_uri"], STOP_MARKER)):  # left early for `ditforge stop`
        client.set_tag(job["mlflow_run_id"], "ditforge.stopped", "true")
        client.set_terminated(job["mlflow_run_id"], "KILLED")
        print(f"ditforge: run {job['run_name']} stopped on request", flush=True)
        return 0
    if spec.tracking.register_model and spec.task == "dit":  # a VAE job's result is its vae.path
        finalize(job, client)
    client.set_terminated(job["mlflow_run_id"], "FINISHED")
    print(f"ditforge: run {job['run_name']} finished", flush=True)
    return 0


def finalize(job: dict, client: MlflowClient) -> None:
    """Export the final checkpoint's consolidated weights into the MLflow run and register them."""
    import tempfile

    from . import pyfunc
    from .export import export

    run_id, name = job["mlflow_run_id"], job["spec"]["name"]
    with tempfile.TemporaryDirectory() as d:
        cfg = export(job["run_uri"], f"file://{d}/export")
        # an MLflow pyfunc model (MLmodel, signature, the export as its artifacts): see train/pyfunc.py
        pyfunc.save(f"{d}/export", f"{d}/model")
        client.log_artifacts(run_id, f"{d}/model", "model")
    source = f"{client.get_run(run_id).info.artifact_uri}/model"
    try:
        client.get_registered_model(name)
    except Exception:
        client.create_registered_model(name, tags={"ditforge.job": name})
    metrics = client.get_run(run_id).data.metrics
    tags = {"checkpoint_uri": cfg["checkpoint"], "spec_digest": job.get("spec_digest", ""),
            "step": str(cfg["step"]), "final_loss": str(metrics.get("train/loss", "")), "run": job["run_name"]}
    mv = client.create_model_version(name, source, run_id=run_id, tags=tags)
    client.set_tag(run_id, "ditforge.model", f"models:/{name}/{mv.version}")
    print(f"ditforge: registered models:/{name}/{mv.version} (from {cfg['checkpoint']})", flush=True)


if __name__ == "__main__":
    sys.exit(main())
