"""Submitting jobs to a Ray cluster through the Ray Jobs API, and remembering what was submitted."""

from __future__ import annotations

import json
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from .. import services, storage
from ..spec import ClusterSpec, JobSpec
from ..train import tracking


class SubmitError(Exception):
    """A submission problem the user can fix (one line)."""


@dataclass
class Target:
    dashboard: str  # Ray Jobs API address
    tracking_uri: str


def connect(cluster: ClusterSpec, spec: JobSpec | None = None) -> Target:
    """Make sure the cluster (and, embedded, its services) is up; return where to talk to."""
    if cluster.kind == "embedded":
        ep = services.up(cluster)
        return Target(ep.ray_dashboard, (spec.tracking.uri if spec and spec.tracking.uri else ep.mlflow))
    tracking_uri = spec.tracking.uri if spec and spec.tracking.uri else services.endpoints().mlflow
    return Target(cluster.address.replace("ray://", "http://").replace(":10001", ":8265"), tracking_uri)


def jobs_client(dashboard: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(dashboard)
    except Exception as e:
        raise SubmitError(f"cannot reach the Ray Jobs API at {dashboard}: {str(e).splitlines()[0]}") from None


def records_dir() -> Path:
    d = storage.home() / "jobs"
    d.mkdir(parents=True, exist_ok=True)
    return d


def record(job_id: str) -> dict | None:
    f = records_dir() / f"{job_id}.json"
    return json.loads(f.read_text()) if f.exists() else None


def all_records() -> list[dict]:
    return sorted((json.loads(f.read_text()) for f in records_dir().glob("*.json")), key=lambda r: r["submitted_at"])


def resolve_paths(spec: JobSpec) -> JobSpec:
    """Relative `file://` URIs are relative to where the user ran the CLI, not to the worker's cwd."""
    spec = spec.model_copy(deep=True)
    spec.data.train = storage.absolute(spec.data.train)
    spec.checkpoint.uri = storage.absolute(spec.checkpoint.uri)
    return spec


def _latest_unfinished(spec: JobSpec) -> str | None:
    """`resume: auto`: the newest run of this job whose newest complete checkpoint is short of
    `train.steps` (a run that was killed or preempted), or None."""
    from ..train.checkpoint import complete_steps

    runs = [n for n in storage.listdir(spec.checkpoint.uri) if n.startswith(f"{spec.name}-")]
    for name in sorted(runs, reverse=True):  # names carry a timestamp: newest first
        steps = complete_steps(storage.join(spec.checkpoint.uri, name))
        if steps and steps[-1] < spec.train.steps:
            return name
    return None


def submit(spec: JobSpec, cluster: ClusterSpec, *, resume: str | None = None, source: str | None = None) -> dict:
    """Submit one training job. `resume` (a run name, from `--resume`) wins over `train.resume`."""
    from ..train import checkpoint

    spec = resolve_paths(spec)
    target = connect(cluster, spec)
    resume_from = None
    if resume is None and spec.train.resume == "auto":
        resume = _latest_unfinished(spec)
    elif resume is None and spec.train.resume != "never":
        try:
            resume_from = checkpoint.resolve(storage.absolute(spec.train.resume))
        except FileNotFoundError as e:
            raise SubmitError(f"train.resume: {e}") from None
    if resume:
        run_name = resume
        run_uri = storage.join(spec.checkpoint.uri, run_name)
        try:
            run_info = json.loads(storage.read_bytes(storage.join(run_uri, "run.json")))
        except FileNotFoundError:
            raise SubmitError(f"--resume {resume}: no run named '{resume}' under {spec.checkpoint.uri}") from None
        steps = checkpoint.complete_steps(run_uri)
        mlflow_run_id = tracking.create_run(target.tracking_uri, spec, run_name, source,
                                            parent_run_id=run_info["mlflow_run_id"],
                                            resumed_from=checkpoint.join_step(run_uri, steps[-1]) if steps else "")
    else:
        run_name = f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        run_uri = storage.join(spec.checkpoint.uri, run_name)
        mlflow_run_id = tracking.create_run(target.tracking_uri, spec, run_name, source,
                                            parent_run_id=None, resumed_from=resume_from)
        storage.write_bytes(storage.join(run_uri, "run.json"),
                            json.dumps({"run_name": run_name, "mlflow_run_id": mlflow_run_id, "job": spec.name}).encode())
    job = {"spec": spec.model_dump(mode="json"), "run_name": run_name, "run_uri": run_uri,
           "mlflow_run_id": mlflow_run_id, "tracking_uri": target.tracking_uri, "resume_from": resume_from,
           "spec_digest": spec.digest()}
    client = jobs_client(target.dashboard)
    with tempfile.TemporaryDirectory() as wd:
        (Path(wd) / "job.json").write_text(json.dumps(job, indent=2))
        (Path(wd) / "job.yaml").write_text(yaml.safe_dump(job["spec"], sort_keys=False))
        env = {"DITFORGE_HOME": str(storage.home()), "OMP_NUM_THREADS": str(spec.resources.cpus_per_worker),
               "PYTHONUNBUFFERED": "1"}
        if not spec.resources.use_gpu:
            env["DS_ACCELERATOR"] = "cpu"
        job_id = client.submit_job(
            entrypoint="python -m ditforge.train.driver job.json",
            submission_id=f"ditforge-{run_name}-{secrets.token_hex(3)}",
            # py_modules ships this checkout's ditforge, so the cluster runs the code that submitted
            # (on a remote cluster, the rest of the stack comes from its image).
            runtime_env={"working_dir": wd, "py_modules": [str(Path(__file__).resolve().parents[1])], "env_vars": env},
            metadata={"ditforge.run": run_name, "ditforge.mlflow_run_id": mlflow_run_id},
        )
    rec = {"job_id": job_id, "run_name": run_name, "run_uri": run_uri, "mlflow_run_id": mlflow_run_id,
           "tracking_uri": target.tracking_uri, "dashboard": target.dashboard, "cluster": cluster.kind,
           "spec_digest": spec.digest(), "steps": spec.train.steps, "submitted_at": time.time(),
           "experiment": spec.tracking.experiment}
    (records_dir() / f"{job_id}.json").write_text(json.dumps(rec, indent=2))
    return rec

