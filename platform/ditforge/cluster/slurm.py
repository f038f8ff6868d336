"""The `slurm` cluster kind, on the login node: the batch script, `sbatch`, `scancel`, and where
the allocation's Ray head is.

An allocation's first node runs `python -m ditforge.cluster.slurm_node` (see there): a Ray head
with token auth, a Ray worker node on each other node through `srun`, and, in `mode: job`, the
one job it was submitted for. Login and compute nodes share a file system (as on every Slurm
site): the allocation writes `head.json` into its state folder, and the login node reads it.

  standing   `cluster up` sbatches and waits for head.json; `submit` goes through the head's
             Ray Jobs API; `cluster down` is `scancel`.
  job        `submit` opens the MLflow run, writes job.json into a folder of its own and
             sbatches; the allocation starts Ray, runs the job and ends. A requeued allocation
             (preemption, time limit) continues the same run from its newest checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from .. import storage
from ..spec import JobSpec, SlurmCluster
from .jobs import SubmitError, Target

# Ray's ports on every node, as offsets from `ports_from` (one Ray node per Slurm node).
PORTS = {
    "gcs": 0,
    "dashboard": 1,
    "client": 2,
    "node_manager": 3,
    "object_manager": 4,
    "agent_listen": 5,
    "agent_grpc": 6,
    "metrics": 7,
    "runtime_env_agent": 8,
    "min_worker": 10,
    "max_worker": 99,
}


def state_dir(c: SlurmCluster) -> Path:
    return Path(c.state_dir).expanduser().resolve() if c.state_dir else storage.home() / "slurm" / c.name


# ------------------------------------------------------------------------------ the script


def sbatch_options(c: SlurmCluster) -> list[str]:
    opts = [
        f"--job-name=ditforge-{c.name}",
        f"--nodes={c.nodes}",
        "--ntasks-per-node=1",
        f"--cpus-per-task={c.cpus_per_node}",
        f"--time={c.time_limit}",
    ]
    if c.gpus_per_node:
        opts.append(f"--gres=gpu:{c.gpu_type + ':' if c.gpu_type else ''}{c.gpus_per_node}")
    if c.mem_per_node_gb:
        opts.append(f"--mem={c.mem_per_node_gb}G")
    for flag, value in (
        ("partition", c.partition),
        ("account", c.account),
        ("qos", c.qos),
        ("constraint", c.constraint),
    ):
        if value:
            opts.append(f"--{flag}={value}")
    if c.exclusive:
        opts.append("--exclusive")
    # SIGUSR1 to the batch shell (B:) before the time limit: the run checkpoints, then requeues.
    opts.append(f"--signal=B:USR1@{c.signal_grace_s}")
    opts.append("--requeue" if c.requeue else "--no-requeue")
    return opts + list(c.sbatch_args)


def batch_script(c: SlurmCluster, state: Path) -> str:
    """The batch script: #SBATCH lines, the site's environment set-up, then the node supervisor."""
    lines = [
        "#!/bin/bash",
        f"# rendered by ditforge from ClusterSpec kind=slurm name={c.name} mode={c.mode}; edit the cluster YAML, "
        "not this file",
        *[f"#SBATCH {o}" for o in sbatch_options(c)],
        f"#SBATCH --output={state}/slurm-%j.out",
        "#SBATCH --open-mode=append      # a requeued allocation appends to the same log",
        "",
        "# environment set-up (cluster spec: setup)",
        *c.setup,
        "",
        "# Ray head on this (the first) node, a Ray worker node on each other node (srun), and in",
        "# mode: job the job itself; on SIGUSR1 the run checkpoints and the allocation requeues.",
        f"exec {shlex.quote(c.python)} -m ditforge.cluster.slurm_node {shlex.quote(str(state))}",
        "",
    ]
    return "\n".join(lines)


def write_state(c: SlurmCluster, state: Path) -> Path:
    """cluster.json (what the node supervisor reads) and job.sh in `state`; returns the script."""
    state.mkdir(parents=True, exist_ok=True)
    (state / "cluster.json").write_text(json.dumps(c.model_dump(mode="json"), indent=2))
    script = state / "job.sh"
    script.write_text(batch_script(c, state))
    script.chmod(0o755)
    return script


def render(c: SlurmCluster, out: str | Path, job: JobSpec | None = None) -> tuple[list[Path], str]:
    """For users who sbatch it themselves: `out` must lie on the shared file system."""
    state = Path(out).resolve()
    files = [write_state(c, state), state / "cluster.json"]
    if job is not None:  # mode job with a bare spec: the allocation opens the run itself
        from ..runs.folder import resolve_paths

        import yaml

        (state / "job.yaml").write_text(yaml.safe_dump(resolve_paths(job).model_dump(mode="json"), sort_keys=False))
        files.append(state / "job.yaml")
    return files, f"sbatch {files[0]}"


# ------------------------------------------------------------------------------ slurm calls


def _slurm(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise SubmitError(f"`{argv[0]}` not found: run this on a Slurm login node (or install slurm-client)") from None


def _what(c: SlurmCluster) -> str:
    return (
        f"{c.nodes} nodes x {c.cpus_per_node} CPUs{f' x {c.gpus_per_node} GPUs' if c.gpus_per_node else ''}"
        f"{f', partition {c.partition}' if c.partition else ''}"
    )


def partition_nodes(partition: str | None) -> tuple[str, int] | None:
    """(name, node count) of `partition`, or of the default one; None if sinfo does not say."""
    r = _slurm("sinfo", "-h", "-o", "%P %D")
    if r.returncode:
        return None
    sizes: dict[str, int] = {}
    default = None
    for line in r.stdout.splitlines():
        name, _, count = line.strip().partition(" ")
        if name.endswith("*"):
            name = default = name[:-1]
        sizes[name] = sizes.get(name, 0) + int(count or 0)  # one line per node state
    name = partition or default
    return (name, sizes[name]) if name in sizes else None


# Reasons a pending job never starts: waiting for them would wait forever.
IMPOSSIBLE = (
    "PartitionNodeLimit",
    "PartitionTimeLimit",
    "BadConstraints",
    "InvalidAccount",
    "InvalidQOS",
    "QOSMaxNodePerJobLimit",
    "QOSMaxWallDurationPerJobLimit",
    "AssocMaxNodesPerJob",
    "AssocMaxWallDurationPerJobLimit",
    "PartitionDown",
    "PartitionInactive",
    "AccountNotAllowed",
    "QOSNotAllowed",
    "ReqNodeNotAvail,_UnavailableNodes",
    "JobHeldAdmin",
)


def sbatch(c: SlurmCluster, script: Path) -> str:
    part = partition_nodes(c.partition)
    if part and c.nodes > part[1]:  # Slurm would queue it for ever (EnforcePartLimits=NO, its default)
        raise SubmitError(
            f"cluster '{c.name}': nodes: {c.nodes}, but partition {part[0]} has {part[1]} "
            f"node{'s' if part[1] != 1 else ''}"
        )
    r = _slurm("sbatch", "--parsable", str(script))
    if r.returncode:
        why = (r.stderr.strip().splitlines() or ["(no message)"])[-1].removeprefix("sbatch: error: ")
        raise SubmitError(f"cluster '{c.name}': sbatch refused the allocation ({_what(c)}): {why}")
    return r.stdout.strip().split(";")[0]


def job_state(job_id: str) -> tuple[str, str]:
    """(state, reason) of a Slurm job: PENDING, RUNNING, COMPLETED, CANCELLED, … or GONE when
    slurmctld no longer knows it (MinJobAge after its end)."""
    r = _slurm("squeue", "-h", "-j", job_id, "-o", "%T|%r")
    if r.returncode == 0 and r.stdout.strip():
        state, _, reason = r.stdout.strip().splitlines()[0].partition("|")
        return state, reason
    r = _slurm("scontrol", "show", "job", "-o", job_id)
    m = re.search(r"JobState=(\S+)", r.stdout)
    if m:
        reason = re.search(r"Reason=(\S+)", r.stdout)
        return m.group(1), reason.group(1) if reason else ""
    return "GONE", ""


ENDED = (
    "COMPLETED",
    "CANCELLED",
    "FAILED",
    "TIMEOUT",
    "NODE_FAIL",
    "PREEMPTED",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "GONE",
)


def _log_tail(state: Path, job_id: str, n: int = 3) -> str:
    log = state / f"slurm-{job_id}.out"
    lines = log.read_text(errors="replace").strip().splitlines()[-n:] if log.exists() else []
    return f" (log {log}{': ' + ' | '.join(lines) if lines else ''})"


# ------------------------------------------------------------------------- standing cluster


def head(state: Path, job_id: str | None = None) -> dict | None:
    """head.json, written by the allocation once Ray runs on every node; None before (or when it
    belongs to another allocation than `job_id`)."""
    f = state / "head.json"
    try:
        h = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    return h if job_id is None or h.get("slurm_job_id") == job_id else None


def allocation(c: SlurmCluster) -> str | None:
    f = state_dir(c) / "allocation"
    return f.read_text().strip() if f.exists() else None


def ensure_token() -> None:
    """The Ray token every node and client presents. On a Slurm site $HOME is shared, so Ray's own
    ~/.ray/auth_token (0600) reaches every node; made here once when none exists."""
    from .. import credentials

    if credentials.ray_token():
        return
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))


def wait_for_head(c: SlurmCluster, state: Path, job_id: str, timeout: float) -> dict:
    deadline = time.time() + timeout
    while True:
        h = head(state, job_id)
        if h:
            return h
        st, reason = job_state(job_id)
        if st in ENDED:
            raise SubmitError(
                f"cluster '{c.name}': allocation {job_id} ended ({st}) before Ray was up{_log_tail(state, job_id)}"
            )
        if st == "PENDING" and reason in IMPOSSIBLE:
            _slurm("scancel", job_id)
            raise SubmitError(
                f"cluster '{c.name}': Slurm cannot start the allocation ({_what(c)}): {reason}; job {job_id} cancelled"
            )
        if time.time() > deadline:
            where = f"still {st}{f' ({reason})' if reason and reason != 'None' else ''}"
            raise SubmitError(
                f"cluster '{c.name}': allocation {job_id} {where} after {timeout:.0f}s; it stays "
                f"queued (`ditforge cluster down` cancels it){_log_tail(state, job_id)}"
            )
        time.sleep(1.0)


def up(c: SlurmCluster) -> dict:
    """Submit the standing allocation (or reuse the running one); returns head.json."""
    if c.mode != "standing":
        raise SubmitError(
            f"cluster '{c.name}': mode job runs one allocation per `ditforge submit`; `cluster up` is for mode standing"
        )
    state = state_dir(c)
    old = allocation(c)
    if old and job_state(old)[0] not in ENDED:
        h = head(state, old)
        if h:
            return h
        return wait_for_head(c, state, old, c.up_timeout_s)
    ensure_token()
    (state / "head.json").unlink(missing_ok=True)
    script = write_state(c, state)
    job_id = sbatch(c, script)
    (state / "allocation").write_text(job_id)
    return wait_for_head(c, state, job_id, c.up_timeout_s)


def down(c: SlurmCluster, timeout: float = 120) -> list[str]:
    """scancel the allocation and wait until Slurm has ended it (each node's supervisor stops its
    Ray node by pid, see slurm_node.py; slurmd kills what is left after KillWait)."""
    job_id = allocation(c)
    if not job_id or job_state(job_id)[0] in ENDED:
        return []
    _slurm("scancel", job_id)
    deadline = time.time() + timeout
    while job_state(job_id)[0] not in ENDED:  # COMPLETING: nodes still cleaning up
        if time.time() > deadline:
            raise SubmitError(
                f"cluster '{c.name}': allocation {job_id} still {job_state(job_id)[0]} {timeout:.0f}s after scancel"
            )
        time.sleep(0.5)
    (state_dir(c) / "head.json").unlink(missing_ok=True)
    return [f"slurm job {job_id}"]


def connect(c: SlurmCluster, tracking_uri: str | None) -> Target:
    from .. import services

    job_id = allocation(c)
    h = head(state_dir(c), job_id) if job_id else None
    st = job_state(job_id)[0] if job_id else "GONE"
    if not h or st != "RUNNING":
        raise SubmitError(
            f"cluster '{c.name}': no running allocation ({f'slurm job {job_id} {st}' if job_id else 'none'}"
            f"); start it with `ditforge cluster up`, or submit with --set cluster.mode=job"
        )
    return Target(
        h["dashboard"],
        tracking_uri or c.tracking_uri or services.endpoints().mlflow,
        "RAY_AUTH_TOKEN",
        slurm_job_id=job_id,
    )


def status(c: SlurmCluster) -> list[dict]:
    """One row per node of the standing allocation (Ray's view), with the Slurm job's state."""
    job_id = allocation(c)
    if not job_id:
        return []
    st, _ = job_state(job_id)
    h = head(state_dir(c), job_id) or {}
    return [
        {"slurm_job_id": job_id, "state": st, "node": n["node"], "address": n["address"]} for n in h.get("nodes", [])
    ] or [{"slurm_job_id": job_id, "state": st, "node": "-", "address": "-"}]


# ------------------------------------------------------------------------------ mode: job


def submit_job(spec: JobSpec, c: SlurmCluster, *, resume: str | None = None, source: str | None = None) -> dict:
    """One allocation for this job: open (or continue) its MLflow run, write job.json beside the
    batch script in a folder of its own, sbatch. The record's job id is `slurm-<id>`."""
    from ..runs import folder
    from .jobs import write_record

    spec = folder.resolve_paths(spec)
    # A signal from Slurm (preemption, time limit) must leave a checkpoint: that is the point of
    # running on a cluster that can take the nodes back.
    spec.checkpoint.on_stop = True
    tracking_uri = spec.tracking.uri or c.tracking_uri
    if not tracking_uri:
        from .. import services

        tracking_uri = services.endpoints().mlflow
    cont = folder.continuation(spec, resume)
    if cont.run_name:  # continue that run, in the same MLflow run (an allocation requeued goes on in it too)
        if cont.newest:
            folder.check_reshard(cont.newest, spec, f"--resume {cont.run_name}")
        run_name, run_uri, mlflow_run_id = cont.run_name, cont.run_uri, cont.info["mlflow_run_id"]
    else:
        run_name, run_uri, mlflow_run_id = folder.new_run(spec, tracking_uri, source, cont.resume_from)
    resume_from = cont.resume_from
    job = {
        "spec": spec.model_dump(mode="json"),
        "run_name": run_name,
        "run_uri": run_uri,
        "mlflow_run_id": mlflow_run_id,
        "tracking_uri": tracking_uri,
        "resume_from": resume_from,
        "spec_digest": spec.digest(),
    }
    ensure_token()
    state = state_dir(c) / "jobs" / f"{run_name}-{secrets.token_hex(2)}"
    script = write_state(c, state)
    (state / "job.json").write_text(json.dumps(job, indent=2))
    slurm_id = sbatch(c, script)
    rec = {
        "job_id": f"slurm-{slurm_id}",
        "slurm_job_id": slurm_id,
        "job_dir": str(state),
        "run_name": run_name,
        "run_uri": run_uri,
        "mlflow_run_id": mlflow_run_id,
        "tracking_uri": tracking_uri,
        "dashboard": None,
        "cluster": c.kind,
        "cluster_name": c.name,
        "token_env": "RAY_AUTH_TOKEN",
        "checkpoint_on_stop": True,
        "spec_digest": spec.digest(),
        "steps": spec.train.steps,
        "submitted_at": time.time(),
        "experiment": spec.tracking.experiment,
    }
    write_record(rec)
    return rec


def ray_job(rec: dict) -> dict | None:
    """Where the allocation submitted the job ({dashboard, job_id}), once it has."""
    try:
        return json.loads((Path(rec["job_dir"]) / "ray.json").read_text())
    except (OSError, ValueError, KeyError):
        return None


def record_state(rec: dict) -> str:
    """`ditforge status` for a job in its own allocation: the Ray job's state while the allocation
    runs it, else the MLflow run's, beside the Slurm job's."""
    st, reason = job_state(rec["slurm_job_id"])
    slurm = f"slurm {rec['slurm_job_id']} {st}{f' ({reason})' if st == 'PENDING' and reason else ''}"
    ray_state = None
    rj = ray_job(rec)
    if rj and st == "RUNNING":
        try:
            from .jobs import jobs_client

            ray_state = str(jobs_client(rj["dashboard"], "RAY_AUTH_TOKEN").get_job_status(rj["job_id"]).value)
        except Exception:
            ray_state = None
    if ray_state is None:
        from mlflow.tracking import MlflowClient

        try:
            run = MlflowClient(rec["tracking_uri"]).get_run(rec["mlflow_run_id"]).info.status
        except Exception:
            run = "UNKNOWN"
        ray_state = {"FINISHED": "SUCCEEDED", "FAILED": "FAILED", "KILLED": "STOPPED"}.get(
            run, "PENDING" if st == "PENDING" else run
        )
    return f"{ray_state} · {slurm}"


def _wait_ended(job_id: str, timeout: float) -> bool:
    deadline = time.time() + timeout
    while job_state(job_id)[0] not in ENDED:
        if time.time() > deadline:
            return False
        time.sleep(1)
    return True


def stop_job(rec: dict, grace_s: float) -> tuple[str, bool]:
    """`ditforge stop slurm-<id>`: a job in an allocation of its own. Not started yet: scancel. Running:
    the STOP marker asks it to save a final checkpoint and end (this mode always has
    `checkpoint.on_stop`), and the allocation ends with it; after `grace_s`, scancel. → (the
    record's state line, whether scancel had to end it)."""
    from ..runs import folder

    job_id = rec["slurm_job_id"]
    st, _ = job_state(job_id)
    if st in ENDED:
        return record_state(rec), False
    if st != "PENDING":
        folder.request_stop(rec["run_uri"])
        if _wait_ended(job_id, grace_s):
            return record_state(rec), False
    _slurm("scancel", job_id)
    _wait_ended(job_id, 60)
    return record_state(rec), st != "PENDING"


def follow_logs(rec: dict, write: Callable[[str], None], poll_s: float = 1.0) -> None:
    """The allocation's Slurm log, then each attempt's Ray job log (a requeued allocation adds
    one), written as they grow until the Slurm job has ended."""
    from ..credentials import redact

    d = Path(rec["job_dir"])
    seen: dict[Path, int] = {}
    while True:
        ended = job_state(rec["slurm_job_id"])[0] in ENDED
        for f in [d / f"slurm-{rec['slurm_job_id']}.out", *sorted(d.glob("ray-*.log"))]:
            if not f.exists():
                continue
            if f not in seen:
                write(f"==> {f} <==\n")
                seen[f] = 0
            with open(f, "rb") as fh:
                fh.seek(seen[f])
                new = fh.read()
            seen[f] += len(new)
            if new:
                write(redact(new.decode(errors="replace")))
        if ended:  # one last read above, after the end: nothing written later is missed
            return
        time.sleep(poll_s)
