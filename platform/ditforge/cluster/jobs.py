"""Where jobs go and what is remembered of them: the Ray Jobs API client (with the cluster's token),
handing a job to it, and the job records under `$DITFORGE_HOME/jobs/` that `status`, `logs` and
`stop` read. Used by every cluster kind that runs Ray (embedded, local, address, slurm)."""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from .. import credentials, storage
from ..spec import ClusterSpec, EmbeddedCluster, JobSpec

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient


class SubmitError(Exception):
    """A submission problem the user can fix (one line)."""


@dataclass
class Target:
    dashboard: str  # Ray Jobs API address
    tracking_uri: str
    token_env: str | None = None  # the variable holding the dashboard's bearer token, if any
    slurm_job_id: str | None = None  # the allocation the cluster runs in (kind slurm)


def jobs_client(dashboard: str, token_env: str | None = None) -> JobSubmissionClient:
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


def client_for(rec: dict) -> JobSubmissionClient:
    # Records written before every cluster of ours had token auth carry no token_env.
    ours = rec.get("cluster") in ("embedded", "local")
    return jobs_client(rec["dashboard"], rec.get("token_env") or ("RAY_AUTH_TOKEN" if ours else None))


def records_dir() -> Path:
    d = storage.home() / "jobs"
    d.mkdir(parents=True, exist_ok=True)
    return d


def record(job_id: str) -> dict | None:
    f = storage.home() / "jobs" / f"{job_id}.json"  # a look-up creates nothing
    return json.loads(f.read_text()) if f.exists() else None


def all_records() -> list[dict]:
    return sorted(
        (json.loads(f.read_text()) for f in (storage.home() / "jobs").glob("*.json")), key=lambda r: r["submitted_at"]
    )


def write_record(rec: dict) -> None:
    (records_dir() / f"{rec['job_id']}.json").write_text(json.dumps(rec, indent=2))


def submit_to_ray(job: dict, spec: JobSpec, target: Target, cluster: ClusterSpec | None = None) -> str:
    """Hand `job` (what the driver reads as job.json) to the Ray Jobs API; returns the job id.
    `cluster`: the spec it was submitted to (an embedded head served beyond loopback has joined hosts)."""
    run_name, mlflow_run_id = job["run_name"], job["mlflow_run_id"]
    client = jobs_client(target.dashboard, target.token_env)
    with tempfile.TemporaryDirectory() as wd:
        (Path(wd) / "job.json").write_text(json.dumps(job, indent=2))
        (Path(wd) / "job.yaml").write_text(yaml.safe_dump(job["spec"], sort_keys=False))
        env = {
            "DITFORGE_HOME": str(storage.home()),
            "OMP_NUM_THREADS": str(spec.resources.cpus_per_worker),
            "PYTHONUNBUFFERED": "1",
            # Ray Train reads it in the driver and hands it to its controller
            "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(spec.resources.placement_timeout_s),
            # Ray Train's preemption watcher (one more actor per job, polling Ray's node-drain state)
            # only logs drains: a Slurm signal reaches the job through ditforge's own stop path, and
            # a host that dies is a worker failure either way (restart from the newest checkpoint).
            "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
        }
        if isinstance(cluster, EmbeddedCluster) and not credentials.is_loopback(cluster.host):
            # Joined hosts are other machines: each keeps its own DITFORGE_HOME (from `cluster join`),
            # never a path of this one.
            del env["DITFORGE_HOME"]
        if not spec.resources.use_gpu:
            env["DS_ACCELERATOR"] = "cpu"
        job_id = client.submit_job(
            entrypoint="python -m ditforge.runs.driver job.json",
            submission_id=f"ditforge-{run_name}-{secrets.token_hex(3)}",
            # py_modules ships this checkout's ditforge, so the cluster runs the code that submitted
            # (on a remote cluster, the rest of the stack comes from its image).
            runtime_env={
                "working_dir": wd,
                "py_modules": [str(Path(__file__).resolve().parents[1])],
                "env_vars": env,
                # gloo on the interface of the node's own address, not what the host name resolves to
                "worker_process_setup_hook": "ditforge.train.netif.use_node_interface",
            },
            metadata={
                "ditforge.run": run_name,
                "ditforge.mlflow_run_id": mlflow_run_id,
                "ditforge.run_uri": job["run_uri"],
            },
        )
    return job_id
