"""`ditforge submit` and `ditforge stop`: bring the cluster up (or find it), check the job fits,
decide what it continues (runs/folder.py), hand it to Ray (cluster/jobs.py) and record it."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from .. import services
from ..runs import folder
from ..spec import AddressCluster, ClusterSpec, EmbeddedCluster, JobSpec, LocalCluster, SlurmCluster
from ..train import tracking
from . import capacity
from .jobs import SubmitError, Target, client_for, submit_to_ray, write_record

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient


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
        assert cluster.address is not None  # AddressCluster's validator requires it
        dashboard = cluster.address.replace("ray://", "http://").replace(":10001", ":8265")
        if cluster.token_env and not os.environ.get(cluster.token_env):
            raise SubmitError(f"cluster '{cluster.name}': token_env names ${cluster.token_env}, which is not set")
        return Target(dashboard, own or cluster.tracking_uri or services.endpoints().mlflow, cluster.token_env)
    if isinstance(cluster, SlurmCluster):
        from . import slurm

        return slurm.connect(cluster, own)
    raise SubmitError(
        f"cluster kind '{cluster.kind}' is started with its own tool: run `ditforge cluster up` for the "
        f"command, then submit with a `kind: address` cluster pointing at its dashboard"
    )


def check_capacity(spec: JobSpec, cluster: ClusterSpec, target: Target) -> None:
    """Fail before submitting when the job cannot fit a cluster of known, fixed size; on other
    clusters the driver checks again against what it finds (see runs/driver.py)."""
    if not isinstance(cluster, (EmbeddedCluster, LocalCluster)):
        return
    missing = capacity.shortfall(spec.resources, capacity.nodes_from_dashboard(target.dashboard))
    if missing:
        raise SubmitError(f"{spec.name}: resources: {missing} (cluster '{cluster.name}', kind {cluster.kind})")


def submit(
    spec: JobSpec,
    cluster: ClusterSpec,
    *,
    resume: str | None = None,
    source: str | None = None,
    force_resume: bool = False,
) -> dict:
    """Submit one training job. `resume` (a run name, from `--resume`) wins over `train.resume`.
    Continuing a run checks the spec against the run's own (see `check_resume`)."""
    spec = folder.resolve_paths(spec)
    if spec.model.init_from:  # pretrained weights that do not fit fail here, not in every worker
        from ..models.convert import check_spec
        from ..models.info import latent_shape

        check_spec(spec, latent_shape(spec)[0])
        if spec.train.lora is not None:  # each adapter target selects a linear layer of the model
            from ..models import lora

            lora.check_spec(spec, latent_shape(spec)[0])
    if spec.resources.use_gpu and isinstance(cluster, (EmbeddedCluster, LocalCluster)):
        # Their Ray nodes start with --num-gpus=0: say so before starting anything.
        raise SubmitError(
            f"{source or spec.name}: resources.use_gpu: true, but cluster '{cluster.name}' (kind "
            f"{cluster.kind}) has no GPUs: its Ray nodes run on this machine's CPUs"
        )
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
    cont = folder.continuation(spec, resume)
    if cont.run_name:  # continue that run, in a child MLflow run of its own
        run_name, run_uri = cont.run_name, cont.run_uri
        assert run_uri is not None  # continuation() sets it with run_name
        changed = folder.check_resume(spec, run_name, run_uri, cont.steps, cont.how, source or spec.name, force_resume)
        if cont.newest:
            folder.check_reshard(cont.newest, spec, f"--resume {run_name}")
        mlflow_run_id = tracking.create_run(
            target.tracking_uri,
            spec,
            run_name,
            source,
            parent_run_id=cont.info["mlflow_run_id"],
            resumed_from=cont.newest or "",
        )
        if changed:  # what this continuation changed, next to the run it continues
            from mlflow.tracking import MlflowClient

            client = MlflowClient(target.tracking_uri)
            for k, v in changed.items():
                client.set_tag(mlflow_run_id, k, v)
        folder.clear_stop(run_uri)
    else:
        run_name, run_uri, mlflow_run_id = folder.new_run(spec, target.tracking_uri, source, cont.resume_from)
    job = {
        "spec": spec.model_dump(mode="json"),
        "run_name": run_name,
        "run_uri": run_uri,
        "mlflow_run_id": mlflow_run_id,
        "tracking_uri": target.tracking_uri,
        "resume_from": cont.resume_from,
        "spec_digest": spec.digest(),
    }
    job_id = submit_to_ray(job, spec, target, cluster)
    rec = {
        "job_id": job_id,
        "run_name": run_name,
        "run_uri": run_uri,
        "mlflow_run_id": mlflow_run_id,
        "tracking_uri": target.tracking_uri,
        "dashboard": target.dashboard,
        "cluster": cluster.kind,
        "cluster_name": cluster.name,
        "token_env": target.token_env,
        "checkpoint_on_stop": spec.checkpoint.on_stop,
        "spec_digest": spec.digest(),
        "steps": spec.train.steps,
        "submitted_at": time.time(),
        "experiment": spec.tracking.experiment,
    }
    if target.slurm_job_id:
        rec["slurm_job_id"] = target.slurm_job_id
    write_record(rec)
    return rec


TERMINAL = ("STOPPED", "SUCCEEDED", "FAILED")


def _wait_terminal(client: JobSubmissionClient, job_id: str, timeout: float) -> str:
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
    if rec.get("slurm_job_id") and rec.get("job_dir"):  # a job in a Slurm allocation of its own
        from . import slurm

        return slurm.stop_job(rec, grace_s)
    client = client_for(rec)
    state = str(client.get_job_status(rec["job_id"]).value)
    if state in TERMINAL:
        return state, False
    if rec.get("checkpoint_on_stop"):
        folder.request_stop(rec["run_uri"])
        state = _wait_terminal(client, rec["job_id"], grace_s)
        if state in TERMINAL:
            return state, False
    client.stop_job(rec["job_id"])
    return _wait_terminal(client, rec["job_id"], 60), True
