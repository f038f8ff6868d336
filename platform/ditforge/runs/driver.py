"""The Ray job's entry point: place the workers with Ray Train and run `worker.train_loop` on each.

`ditforge submit` runs `python -m ditforge.runs.driver job.json` through the Ray Jobs API; the
job file (resolved spec, run name, MLflow run id) travels in the job's working_dir.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

from mlflow.tracking import MlflowClient

from ..credentials import redact, use_mlflow_credentials
from ..train.tracking import end_run

if TYPE_CHECKING:
    # Ray Train v2's (the default, RAY_TRAIN_V2_ENABLED): what `ray.train.ScalingConfig` is at run time
    from ray.train.v2.api.config import ScalingConfig

    from ..spec import JobSpec


def scaling_config(spec: JobSpec) -> ScalingConfig:
    if not TYPE_CHECKING:
        from ray.train import ScalingConfig

    res = spec.resources
    per_worker = {"CPU": res.cpus_per_worker, **({"GPU": res.gpus_per_worker} if res.use_gpu else {})}
    # Elastic: Ray Train 2.60 starts with as many workers as fit (at least min_workers), restarts
    # the group smaller when a worker is lost and no replacement can be placed, and grows it again
    # when its resize monitor (every resize_interval_s) finds room; each restart resumes from the
    # newest complete checkpoint, resharded to the new size (train/reshard.py).
    # (elastic: min_workers is set)
    workers = (res.min_workers, res.workers) if res.elastic and res.min_workers is not None else res.workers
    extra: dict[str, Any] = {"elastic_resize_monitor_interval_s": res.resize_interval_s} if res.elastic else {}
    return ScalingConfig(
        num_workers=workers,
        use_gpu=res.use_gpu,
        resources_per_worker=per_worker,
        placement_strategy=res.placement,
        accelerator_type=res.accelerator_type,
        **extra,
    )


def read_job(path: str) -> dict:
    """job.json from `ditforge submit`, or a bare job spec (YAML or JSON, e.g. mounted into a
    KubeRay RayJob), for which the run is named and its MLflow run opened here instead."""
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f)  # YAML is a superset of JSON
    if "run_name" in data:
        return data
    from .folder import new_run, resolve_paths
    from ..spec import JobSpec, check_roots

    spec = JobSpec.model_validate(data)
    check_roots(spec, path)  # a bare spec enters the platform here, not through load_job
    spec = resolve_paths(spec)
    tracking_uri = spec.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking_uri:
        raise SystemExit("ditforge: a bare job spec needs tracking.uri or $MLFLOW_TRACKING_URI")
    run_name, run_uri, run_id = new_run(spec, tracking_uri, path)
    return {
        "spec": spec.model_dump(mode="json"),
        "run_name": run_name,
        "run_uri": run_uri,
        "mlflow_run_id": run_id,
        "tracking_uri": tracking_uri,
        "resume": False,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ditforge-driver")
    p.add_argument("job", help="job.json written by `ditforge submit`")
    args = p.parse_args(argv)
    job = read_job(args.job)
    use_mlflow_credentials()
    client = MlflowClient(job["tracking_uri"], registry_uri=job["tracking_uri"])  # it registers the model
    # `ray job stop` sends SIGTERM: end the MLflow run as KILLED on the way out, not RUNNING forever.
    signal.signal(signal.SIGTERM, _raise_killed)
    try:
        status, code = run_job(job, client)
    except BaseException as e:  # every way out ends the MLflow run (only SIGKILL cannot)
        killed = isinstance(e, (KeyboardInterrupt, Killed))
        print(redact(traceback.format_exc()), file=sys.stderr, flush=True)
        msg = redact(str(e)).strip().splitlines()
        error = (msg[-1] if msg else type(e).__name__)[:500]
        if not killed:
            print(f"ditforge: {error}", file=sys.stderr, flush=True)  # the one line to read
        end_run(client, job["mlflow_run_id"], "KILLED" if killed else "FAILED", error)
        return 130 if killed else 1
    end_run(client, job["mlflow_run_id"], status)
    return code


class Killed(BaseException):
    """SIGTERM (e.g. `ray job stop`)."""


def _raise_killed(signum: int, frame: FrameType | None) -> NoReturn:
    raise Killed(f"killed by signal {signum}")


def run_job(job: dict, client: MlflowClient) -> tuple[str, int]:
    """Place the workers and train; → (the MLflow run's final status, exit code). Raises on failure."""
    import ray
    from ray.train import FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .. import storage
    from ..cluster import capacity
    from . import folder, register
    from ..spec import JobSpec
    from ..train.vae_trainer import train_vae_loop
    from ..train.worker import train_loop

    spec = JobSpec.model_validate(job["spec"])
    ray.init()
    folder.record_process(job["run_uri"], "driver")  # where `kill` finds this job's driver (see README)
    # A fixed-size cluster never grows: an impossible placement group would wait forever there.
    missing = None if capacity.autoscaling() else capacity.shortfall(spec.resources, capacity.nodes_in_cluster())
    if missing:
        raise RuntimeError(f"resources: {missing}")
    trainer = TorchTrainer(
        train_loop_per_worker=train_vae_loop if spec.task == "vae" else train_loop,
        train_loop_config=job,
        scaling_config=scaling_config(spec),
        # The collective timeout every bounded wait in the workers is sized against (train/checkpoint.py).
        torch_config=TorchConfig(
            backend="nccl" if spec.resources.use_gpu else "gloo", timeout_s=int(spec.resources.collective_timeout_s)
        ),
        # A restarted worker group finds this run's newest complete checkpoint by itself.
        run_config=RunConfig(
            name=job["run_name"],
            storage_path=str(storage.home() / "ray-train"),
            failure_config=FailureConfig(max_failures=spec.train.max_failures),
        ),
    )
    trainer.fit()  # raises the worker's error (TrainingFailedError), shown in `ditforge status` via the tag
    if folder.stop_marked(job["run_uri"]):  # left early for `ditforge stop`
        client.set_tag(job["mlflow_run_id"], "ditforge.stopped", "true")
        print(f"ditforge: run {job['run_name']} stopped on request", flush=True)
        return "KILLED", 0
    if spec.tracking.register_model and spec.task == "dit":  # a VAE job's result is its vae.path
        try:
            register.finalize(job, client)
        except Exception as e:
            raise RuntimeError(
                f"registration: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                f"(the checkpoint is complete; redo with: ditforge register {job['run_uri']})"
            ) from e
    print(f"ditforge: run {job['run_name']} finished", flush=True)
    return "FINISHED", 0


if __name__ == "__main__":
    sys.exit(main())
