"""The Ray job's entry point: place the workers with Ray Train and run `worker.train_loop` on each.

`ditforge submit` runs `python -m ditforge.train.driver job.json` through the Ray Jobs API; the
job file (resolved spec, run name, MLflow run id) travels in the job's working_dir.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

from mlflow.tracking import MlflowClient


def scaling_config(spec):
    from ray.train import ScalingConfig

    return ScalingConfig(num_workers=spec.resources.workers, use_gpu=spec.resources.use_gpu,
                         resources_per_worker={"CPU": spec.resources.cpus_per_worker})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ditforge-driver")
    p.add_argument("job", help="job.json written by `ditforge submit`")
    args = p.parse_args(argv)
    with open(args.job) as f:
        job = json.load(f)

    import ray
    from ray.train import FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .. import storage
    from ..spec import JobSpec
    from .worker import train_loop

    spec = JobSpec.model_validate(job["spec"])
    client = MlflowClient(job["tracking_uri"])
    ray.init()
    trainer = TorchTrainer(
        train_loop_per_worker=train_loop,
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
        traceback.print_exc()
        msg = str(e).strip().splitlines()
        client.set_tag(job["mlflow_run_id"], "ditforge.error", (msg[-1] if msg else repr(e))[:500])
        client.set_terminated(job["mlflow_run_id"], "FAILED")
        return 1
    if spec.tracking.register_model:
        finalize(job, client)
    client.set_terminated(job["mlflow_run_id"], "FINISHED")
    print(f"ditforge: run {job['run_name']} finished", flush=True)
    return 0


def finalize(job: dict, client: MlflowClient) -> None:
    """Export the final checkpoint's consolidated weights into the MLflow run and register them."""
    import tempfile

    from .export import FILES, export

    run_id, name = job["mlflow_run_id"], job["spec"]["name"]
    with tempfile.TemporaryDirectory() as d:
        cfg = export(job["run_uri"], f"file://{d}")
        for f in FILES:
            if os.path.exists(os.path.join(d, f)):
                client.log_artifact(run_id, os.path.join(d, f), "model")
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
