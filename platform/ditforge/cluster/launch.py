"""Submitting jobs to a Ray cluster through the Ray Jobs API, and remembering what was submitted."""

from __future__ import annotations

import json
import re
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import os

import yaml

from .. import credentials, services, storage
from ..spec import AddressCluster, ClusterSpec, EmbeddedCluster, JobSpec, LocalCluster, SlurmCluster
from ..train import tracking
from . import capacity

STOP_MARKER = "STOP"  # written into the run folder by `ditforge stop`; rank 0 looks for it


class SubmitError(Exception):
    """A submission problem the user can fix (one line)."""


@dataclass
class Target:
    dashboard: str  # Ray Jobs API address
    tracking_uri: str
    token_env: str | None = None  # the variable holding the dashboard's bearer token, if any
    slurm_job_id: str | None = None  # the allocation the cluster runs in (kind slurm)


def connect(cluster: ClusterSpec, spec: JobSpec | None = None) -> Target:
    """Make sure the cluster (and, on this machine, its services) is up; return where to talk to."""
    own = spec.tracking.uri if spec and spec.tracking.uri else None
    if isinstance(cluster, EmbeddedCluster):
        ep = services.up(cluster)
        # the embedded head always runs with token auth (services.start_ray): the Jobs API wants it
        return Target(ep.ray_dashboard, own or ep.mlflow, "RAY_AUTH_TOKEN")
    if isinstance(cluster, LocalCluster):
        from . import local

        dashboard = local.up(cluster)  # started on demand, like the embedded head; token auth too
        return Target(dashboard, own or services.endpoints().mlflow, "RAY_AUTH_TOKEN")
    if isinstance(cluster, AddressCluster):
        dashboard = cluster.address.replace("ray://", "http://").replace(":10001", ":8265")
        if cluster.token_env and not os.environ.get(cluster.token_env):
            raise SubmitError(f"cluster '{cluster.name}': token_env names ${cluster.token_env}, which is not set")
        return Target(dashboard, own or cluster.tracking_uri or services.endpoints().mlflow, cluster.token_env)
    if isinstance(cluster, SlurmCluster):
        from . import slurm

        return slurm.connect(cluster, own)
    raise SubmitError(f"cluster kind '{cluster.kind}' is started with its own tool: run `ditforge cluster up` for the "
                      f"command, then submit with a `kind: address` cluster pointing at its dashboard")


def jobs_client(dashboard: str, token_env: str | None = None):
    from ray.job_submission import JobSubmissionClient

    headers = None
    token = os.environ.get(token_env) if token_env else None
    if token_env == "RAY_AUTH_TOKEN" and not token:
        token = credentials.ray_token()  # Ray's own token file (the embedded head, a local cluster)
    if token:
        headers = {"Authorization": f"Bearer {token}"}  # read here, never stored
    try:
        return JobSubmissionClient(dashboard, headers=headers)
    except Exception as e:
        raise SubmitError(f"cannot reach the Ray Jobs API at {dashboard}: {str(e).splitlines()[0]}") from None


def client_for(rec: dict):
    # Records written before every cluster of ours had token auth carry no token_env.
    ours = rec.get("cluster") in ("embedded", "local")
    return jobs_client(rec["dashboard"], rec.get("token_env") or ("RAY_AUTH_TOKEN" if ours else None))


def check_capacity(spec: JobSpec, cluster: ClusterSpec, target: Target) -> None:
    """Fail before submitting when the job cannot fit a cluster of known, fixed size; on other
    clusters the driver checks again against what it finds (see train/driver.py)."""
    if not isinstance(cluster, (EmbeddedCluster, LocalCluster)):
        return
    missing = capacity.shortfall(spec.resources, capacity.nodes_from_dashboard(target.dashboard))
    if missing:
        raise SubmitError(f"{spec.name}: resources: {missing} (cluster '{cluster.name}', kind {cluster.kind})")


def records_dir() -> Path:
    d = storage.home() / "jobs"
    d.mkdir(parents=True, exist_ok=True)
    return d


def record(job_id: str) -> dict | None:
    f = storage.home() / "jobs" / f"{job_id}.json"  # a look-up creates nothing
    return json.loads(f.read_text()) if f.exists() else None


def all_records() -> list[dict]:
    return sorted((json.loads(f.read_text()) for f in (storage.home() / "jobs").glob("*.json")),
                  key=lambda r: r["submitted_at"])


def resolve_paths(spec: JobSpec) -> JobSpec:
    """Relative `file://` URIs are relative to where the user ran the CLI, not to the worker's cwd."""
    spec = spec.model_copy(deep=True)
    spec.data.train = storage.absolute(spec.data.train)
    spec.checkpoint.uri = storage.absolute(spec.checkpoint.uri)
    if spec.vae.kind == "own" and spec.vae.path:
        spec.vae.path = storage.absolute(spec.vae.path)
    if spec.model.init_from:
        spec.model.init_from = str(Path(spec.model.init_from.removeprefix("file://")).expanduser().resolve())
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


def _check_reshard(step_uri: str, spec: JobSpec, what: str) -> None:
    """Before anything is submitted: can this checkpoint be resumed with the job's workers and stage?"""
    from ..train import reshard

    try:
        reshard.check(step_uri, spec.resources.workers, spec.deepspeed.zero_stage)
    except reshard.ReshardError as e:
        raise SubmitError(f"{what}: {e}") from None
    except (ValueError, KeyError) as e:  # a manifest that is not JSON
        raise SubmitError(f"{what}: {step_uri}/manifest.json: unreadable ({e})") from None


def new_run(spec: JobSpec, tracking_uri: str, source: str | None = None,
            resumed_from: str | None = None) -> tuple[str, str, str]:
    """Name a run, open its MLflow run and write its run.json; returns (name, run URI, MLflow run id)."""
    run_name = f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    run_uri = storage.join(spec.checkpoint.uri, run_name)
    mlflow_run_id = tracking.create_run(tracking_uri, spec, run_name, source, resumed_from=resumed_from)
    storage.write_bytes(storage.join(run_uri, "run.json"),
                        json.dumps({"run_name": run_name, "mlflow_run_id": mlflow_run_id, "job": spec.name}).encode())
    return run_name, run_uri, mlflow_run_id


def _saved_spec(run_uri: str, steps: list[int]) -> dict | None:
    """The spec a run was trained with: its newest complete checkpoint's spec.yaml."""
    from ..train import checkpoint

    for step in reversed(steps):
        try:
            return yaml.safe_load(storage.read_bytes(storage.join(checkpoint.join_step(run_uri, step), "spec.yaml")))
        except FileNotFoundError:
            continue
    return None


def _show(v) -> str:
    return json.dumps(v) if not isinstance(v, str) else v


def check_resume(spec: JobSpec, run_name: str, run_uri: str, steps: list[int], how: str, source: str,
                 force: bool) -> dict[str, str]:
    """A run is continued only with the spec that defines it. Returns the MLflow tags that record
    what changed (fields allowed to change, or forced); refuses a changed run-defining field."""
    from ..spec import spec_changes

    saved = _saved_spec(run_uri, steps)
    if saved is None:
        return {}
    defining, allowed = spec_changes(saved, spec.model_dump(mode="json"))
    if defining and not force:
        fields = ", ".join(f"{k} ({_show(a)} → {_show(b)})" for k, (a, b) in defining.items())
        raise SubmitError(f"{source}: {how} would continue run {run_name} (step {steps[-1]}), but the spec that "
                          f"defines it changed: {fields}; start a fresh run with --set train.resume=never, or "
                          f"continue it anyway with --force-resume")
    tags = {f"ditforge.resume_changed.{k}": credentials.redact(f"{_show(a)} → {_show(b)}")[:500]
            for k, (a, b) in {**allowed, **defining}.items()}
    if defining:
        tags["ditforge.resume_forced"] = ", ".join(defining)[:500]
    return tags


def submit(spec: JobSpec, cluster: ClusterSpec, *, resume: str | None = None, source: str | None = None,
           force_resume: bool = False) -> dict:
    """Submit one training job. `resume` (a run name, from `--resume`) wins over `train.resume`.
    Continuing a run checks the spec against the run's own (see `check_resume`)."""
    from ..train import checkpoint

    spec = resolve_paths(spec)
    if spec.model.init_from:  # pretrained weights that do not fit fail here, not in every worker
        from ..models.convert import check_spec
        from ..models.info import latent_shape

        check_spec(spec, latent_shape(spec)[0])
    if spec.resources.use_gpu and isinstance(cluster, (EmbeddedCluster, LocalCluster)):
        # Their Ray nodes start with --num-gpus=0: say so before starting anything.
        raise SubmitError(f"{source or spec.name}: resources.use_gpu: true, but cluster '{cluster.name}' (kind "
                          f"{cluster.kind}) has no GPUs: its Ray nodes run on this machine's CPUs")
    if isinstance(cluster, SlurmCluster) and cluster.mode == "job":
        from . import slurm

        return slurm.submit_job(spec, cluster, resume=resume, source=source)  # an allocation of its own
    target = connect(cluster, spec)
    check_capacity(spec, cluster, target)
    from . import preflight

    try:  # the data set, VAE and text encoder are there and fit the spec, before any Ray job exists
        preflight.check(spec, source or spec.name)
    except preflight.PreflightError as e:
        raise SubmitError(str(e)) from None
    resume_from = None
    how = "--resume"
    if resume is None and spec.train.resume == "auto":
        resume, how = _latest_unfinished(spec), "train.resume: auto"
    elif resume is None and spec.train.resume != "never":
        try:
            resume_from = checkpoint.resolve(storage.absolute(spec.train.resume))
        except FileNotFoundError as e:
            raise SubmitError(f"train.resume: {e}") from None
    if resume_from:  # before the job is submitted: a checkpoint this job cannot load is one line
        _check_reshard(resume_from, spec, "train.resume")
    if resume:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", resume) or ".." in resume:  # a name, not a path
            raise SubmitError(f"--resume {resume}: a run name (letters, digits, '_', '.', '-'), not a path")
        run_name = resume
        run_uri = storage.join(spec.checkpoint.uri, run_name)
        try:
            run_info = json.loads(storage.read_bytes(storage.join(run_uri, "run.json")))
        except FileNotFoundError:
            raise SubmitError(f"--resume {resume}: no run named '{resume}' under {spec.checkpoint.uri}") from None
        steps = checkpoint.complete_steps(run_uri)
        changed = check_resume(spec, run_name, run_uri, steps, how, source or spec.name, force_resume)
        if steps:
            _check_reshard(checkpoint.join_step(run_uri, steps[-1]), spec, f"--resume {resume}")
        mlflow_run_id = tracking.create_run(target.tracking_uri, spec, run_name, source,
                                            parent_run_id=run_info["mlflow_run_id"],
                                            resumed_from=checkpoint.join_step(run_uri, steps[-1]) if steps else "")
        if changed:  # what this continuation changed, next to the run it continues
            from mlflow.tracking import MlflowClient

            client = MlflowClient(target.tracking_uri)
            for k, v in changed.items():
                client.set_tag(mlflow_run_id, k, v)
        storage.remove(storage.join(run_uri, STOP_MARKER))  # the stop that ended it is done
    else:
        run_name, run_uri, mlflow_run_id = new_run(spec, target.tracking_uri, source, resume_from)
    job = {"spec": spec.model_dump(mode="json"), "run_name": run_name, "run_uri": run_uri,
           "mlflow_run_id": mlflow_run_id, "tracking_uri": target.tracking_uri, "resume_from": resume_from,
           "spec_digest": spec.digest()}
    job_id = submit_to_ray(job, spec, target, cluster)
    rec = {"job_id": job_id, "run_name": run_name, "run_uri": run_uri, "mlflow_run_id": mlflow_run_id,
           "tracking_uri": target.tracking_uri, "dashboard": target.dashboard, "cluster": cluster.kind,
           "cluster_name": cluster.name, "token_env": target.token_env, "checkpoint_on_stop": spec.checkpoint.on_stop,
           "spec_digest": spec.digest(), "steps": spec.train.steps, "submitted_at": time.time(),
           "experiment": spec.tracking.experiment}
    if target.slurm_job_id:
        rec["slurm_job_id"] = target.slurm_job_id
    (records_dir() / f"{job_id}.json").write_text(json.dumps(rec, indent=2))
    return rec


def submit_to_ray(job: dict, spec: JobSpec, target: Target, cluster: ClusterSpec | None = None) -> str:
    """Hand `job` (what the driver reads as job.json) to the Ray Jobs API; returns the job id.
    `cluster`: the spec it was submitted to (an embedded head served beyond loopback has joined hosts)."""
    run_name, mlflow_run_id = job["run_name"], job["mlflow_run_id"]
    client = jobs_client(target.dashboard, target.token_env)
    with tempfile.TemporaryDirectory() as wd:
        (Path(wd) / "job.json").write_text(json.dumps(job, indent=2))
        (Path(wd) / "job.yaml").write_text(yaml.safe_dump(job["spec"], sort_keys=False))
        env = {"DITFORGE_HOME": str(storage.home()), "OMP_NUM_THREADS": str(spec.resources.cpus_per_worker),
               "PYTHONUNBUFFERED": "1"}
        if isinstance(cluster, EmbeddedCluster) and not credentials.is_loopback(cluster.host):
            # Joined hosts are other machines: each keeps its own DITFORGE_HOME (from `cluster join`),
            # never a path of this one.
            del env["DITFORGE_HOME"]
        if not spec.resources.use_gpu:
            env["DS_ACCELERATOR"] = "cpu"
        job_id = client.submit_job(
            entrypoint="python -m ditforge.train.driver job.json",
            submission_id=f"ditforge-{run_name}-{secrets.token_hex(3)}",
            # py_modules ships this checkout's ditforge, so the cluster runs the code that submitted
            # (on a remote cluster, the rest of the stack comes from its image).
            runtime_env={"working_dir": wd, "py_modules": [str(Path(__file__).resolve().parents[1])], "env_vars": env},
            metadata={"ditforge.run": run_name, "ditforge.mlflow_run_id": mlflow_run_id, "ditforge.run_uri": job["run_uri"]},
        )
    return job_id



TERMINAL = ("STOPPED", "SUCCEEDED", "FAILED")


def _wait_terminal(client, job_id: str, timeout: float) -> str:
    deadline = time.time() + timeout
    while True:
        state = str(client.get_job_status(job_id).value)
        if state in TERMINAL or time.time() > deadline:
            return state
        time.sleep(1.0)


def stop(rec: dict, grace_s: float = 120.0) -> tuple[str, bool]:
    """Stop a job; returns its final state and whether Ray had to kill it.

    With `checkpoint.on_stop` the job is asked first (a STOP marker in its run folder, which rank 0
    checks on logging steps), so it saves a final checkpoint and exits on its own; after `grace_s`
    Ray's stop_job ends it regardless."""
    client = client_for(rec)
    state = str(client.get_job_status(rec["job_id"]).value)
    if state in TERMINAL:
        return state, False
    if rec.get("checkpoint_on_stop"):
        storage.write_bytes(storage.join(rec["run_uri"], STOP_MARKER), json.dumps({"requested_at": time.time()}).encode())
        state = _wait_terminal(client, rec["job_id"], grace_s)
        if state in TERMINAL:
            return state, False
    client.stop_job(rec["job_id"])
    return _wait_terminal(client, rec["job_id"], 60), True
