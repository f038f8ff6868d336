"""The Ray job's entry point: place the workers with Ray Train and run `worker.train_loop` on each.

`ditforge submit` runs `python -m ditforge.train.driver job.json` through the Ray Jobs API; the
job file (resolved spec, run name, MLflow run id) travels in the job's working_dir.
"""

from __future__ import annotations

import argparse
import json
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
    from ray.train import RunConfig
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
        run_config=RunConfig(name=job["run_name"], storage_path=str(storage.home() / "ray-train")),
    )
    try:
        trainer.fit()
    except Exception as e:  # the worker's error, shown in `ditforge status` through this tag
        traceback.print_exc()
        msg = str(e).strip().splitlines()
        client.set_tag(job["mlflow_run_id"], "ditforge.error", (msg[-1] if msg else repr(e))[:500])
        client.set_terminated(job["mlflow_run_id"], "FAILED")
        return 1
    client.set_terminated(job["mlflow_run_id"], "FINISHED")
    print(f"ditforge: run {job['run_name']} finished", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
