"""Inside a Slurm allocation: what the batch script runs (`exec python -m ditforge.cluster.slurm_node STATE`).

On the first node (the batch step):
  1. a Ray head (`ray start --head --block`, token auth) on this node's address, ports P…P+99;
  2. `srun --relative=1` one Ray worker node on each other node (this module again, `--worker`);
  3. once every node has joined Ray, `head.json` in STATE (the login node reads it);
  4. mode standing: hold until Slurm signals; mode job: submit STATE/job.json to the head's Jobs
     API and follow it;
  5. on SIGUSR1 (`--signal=B:USR1@N`: the time limit or a preemption is near) each running job
     gets a STOP marker, so it saves a checkpoint and leaves (the `checkpoint.on_stop` path); in
     mode job an unfinished run then requeues the allocation (`scontrol requeue`), and the
     requeued allocation continues the same run (same job.json, same MLflow run) from that
     checkpoint. On SIGTERM (scancel, preemption without a user signal) the same, without requeue
     (Slurm requeues a preempted job itself under PreemptMode=REQUEUE).
  6. on the way out each node stops its own Ray processes by pid (the `ray start` process group),
     then any process of this job left on this node (by SLURM_JOB_ID in its environment): never
     `ray stop`, which would stop every Ray on a shared node.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import cast

from .. import procs, raysite
from ..spec import SlurmCluster
from .slurm import PORTS

TERMINAL = ("STOPPED", "SUCCEEDED", "FAILED")


class Signals:
    """Remembers the signals Slurm sent; the main loop acts on them."""

    def __init__(self) -> None:
        self.got: list[int] = []
        for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(s, lambda n, _f: self.got.append(n))

    @property
    def any(self) -> bool:
        return bool(self.got)


def log(msg: str) -> None:
    print(f"ditforge-slurm [{os.environ.get('SLURMD_NODENAME', '?')}] {time.strftime('%H:%M:%S')} {msg}", flush=True)


def node_ip() -> str:
    import ray.util

    return ray.util.get_node_ip_address()  # the address of the default route's interface


def ray_args(c: SlurmCluster) -> list[str]:
    p = {k: c.ports_from + v for k, v in PORTS.items()}
    args = [
        f"--node-manager-port={p['node_manager']}",
        f"--object-manager-port={p['object_manager']}",
        f"--dashboard-agent-listen-port={p['agent_listen']}",
        f"--dashboard-agent-grpc-port={p['agent_grpc']}",
        f"--metrics-export-port={p['metrics']}",
        f"--runtime-env-agent-port={p['runtime_env_agent']}",
        f"--min-worker-port={p['min_worker']}",
        f"--max-worker-port={p['max_worker']}",
        f"--num-cpus={c.cpus_per_node}",
        f"--num-gpus={c.gpus_per_node}",
        "--block",
        "--disable-usage-stats",
        f"--temp-dir=/tmp/ditforge-ray-{os.environ.get('SLURM_JOB_ID', 'x')}",
    ]
    if c.object_store_mb:
        args.append(f"--object-store-memory={c.object_store_mb * 1024 * 1024}")
    return args


def ray_env() -> dict:
    from .. import credentials

    if not credentials.ray_token():
        raise SystemExit(
            "ditforge: no Ray token on this node (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or "
            "~/.ray/auth_token on the shared home); `ditforge cluster up` makes one"
        )
    # A busy node can take longer than Ray's 30 s to register a raylet.
    env = raysite.node_env(
        dict(os.environ, RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="2", RAY_raylet_start_wait_time_s="120")
    )
    env.pop("RAY_ADDRESS", None)
    return env


def _ray_bin() -> str:
    here = Path(sys.executable).parent / "ray"
    return str(here) if here.exists() else "ray"


# ------------------------------------------------------------------------------ stopping


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def leftovers() -> list[int]:
    """Processes of this job on this node, besides this one and its ancestors: what a Ray worker or
    driver left when its raylet went (they inherit SLURM_JOB_ID and SLURMD_NODENAME)."""
    marks = {
        f"SLURM_JOB_ID={os.environ.get('SLURM_JOB_ID')}".encode(),
        f"SLURMD_NODENAME={os.environ.get('SLURMD_NODENAME')}".encode(),
    }
    mine, found = _ancestors(), []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) in mine:
            continue
        try:
            env = set((d / "environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if marks <= env:
            found.append(int(d.name))
    return found


def stop_group(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM the process group `proc` leads (a `ray start --block` and its daemons), then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout)
            return
        except subprocess.TimeoutExpired:
            pass


def sweep(timeout: float = 10) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = leftovers()
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + timeout
        while any(procs.alive(p) for p in pids) and time.time() < deadline:
            time.sleep(0.2)


# ------------------------------------------------------------------------------ the head


def alive_nodes(dashboard: str) -> list[dict]:
    from ray.util.state import list_nodes

    try:
        nodes = list_nodes(address=dashboard, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
    except Exception:
        return []
    return [{"node_id": n.node_id, "address": n.node_ip, "head": n.is_head_node} for n in nodes]


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)  # readers on the login node never see half a file


def run_head(c: SlurmCluster, state: Path) -> int:
    sig = Signals()
    job_id, restart = os.environ["SLURM_JOB_ID"], int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    env = ray_env()
    os.environ["RAY_AUTH_MODE"] = "token"  # this process's own Ray clients (state API, Jobs API), before ray loads
    ip = node_ip()
    gcs, dashboard = f"{ip}:{c.ports_from + PORTS['gcs']}", f"http://{ip}:{c.ports_from + PORTS['dashboard']}"
    log(f"allocation {job_id} (restart {restart}): Ray head at {gcs}, dashboard {dashboard}")
    head = subprocess.Popen(
        [
            _ray_bin(),
            "start",
            "--head",
            f"--node-ip-address={ip}",
            f"--port={c.ports_from}",
            "--dashboard-host=0.0.0.0",
            f"--dashboard-port={c.ports_from + PORTS['dashboard']}",
            f"--ray-client-server-port={c.ports_from + PORTS['client']}",
            *ray_args(c),
        ],
        env=env,
        start_new_session=True,
        stdin=subprocess.DEVNULL,
    )
    workers = None
    code, requeue = 1, False
    try:
        from .. import services

        while not services.http_ok(f"{dashboard}/api/version"):
            if head.poll() is not None or sig.any:
                raise SystemExit(f"ditforge: the Ray head did not start (exit {head.returncode})")
            time.sleep(0.5)
        if c.nodes > 1:
            step = [
                "srun",
                f"--nodes={c.nodes - 1}",
                f"--ntasks={c.nodes - 1}",
                "--ntasks-per-node=1",
                "--relative=1",
                f"--cpus-per-task={c.cpus_per_node}",
                "--kill-on-bad-exit=0",
            ]
            if c.gpus_per_node:
                step.append(f"--gres=gpu:{c.gpus_per_node}")
            workers = subprocess.Popen(
                [*step, sys.executable, "-m", "ditforge.cluster.slurm_node", str(state), "--worker", gcs],
                env=env,
                stdin=subprocess.DEVNULL,
            )
        while len(nodes := alive_nodes(dashboard)) < c.nodes:
            if head.poll() is not None or (workers and workers.poll() is not None) or sig.any:
                raise SystemExit(f"ditforge: only {len(nodes)} of {c.nodes} Ray nodes started")
            time.sleep(1.0)
        nodes.sort(key=lambda n: not n["head"])
        write_json(
            state / "head.json",
            {
                "slurm_job_id": job_id,
                "restart": restart,
                "address": gcs,
                "dashboard": dashboard,
                "started": time.time(),
                "nodes": [{"node": n["node_id"][:12], "address": n["address"]} for n in nodes],
            },
        )
        log(f"Ray runs on {len(nodes)} nodes: {', '.join(n['address'] for n in nodes)}")
        if (state / "job.json").exists() or (state / "job.yaml").exists():
            code, requeue = run_job(c, state, dashboard, sig, restart)
        else:
            while not sig.any and head.poll() is None:
                time.sleep(1.0)
            if signal.SIGUSR1 in sig.got:
                stop_running_jobs(dashboard)
            code = 0
    finally:
        log("stopping Ray on this allocation")
        if workers is not None and workers.poll() is None:
            workers.send_signal(signal.SIGTERM)  # srun passes it to each worker node's supervisor
            try:
                workers.wait(60)
            except subprocess.TimeoutExpired:
                workers.kill()
        stop_group(head)
        sweep()
        h = state / "head.json"
        if h.exists() and json.loads(h.read_text()).get("slurm_job_id") == job_id:
            h.unlink()
    if requeue:
        log(f"the run is not finished: requeueing allocation {job_id}")
        subprocess.run(["scontrol", "requeue", job_id], check=False)
    return code


def stop_running_jobs(dashboard: str, grace: float = 120) -> None:
    """Standing mode, SIGUSR1: each running ditforge job saves a checkpoint and leaves."""
    from ..runs import folder
    from .jobs import jobs_client

    client = jobs_client(dashboard, "RAY_AUTH_TOKEN")
    running = [
        j for j in client.list_jobs() if not j.status.is_terminal() and (j.metadata or {}).get("ditforge.run_uri")
    ]
    for j in running:
        assert j.metadata is not None  # the filter above
        folder.request_stop(j.metadata["ditforge.run_uri"], by="slurm")
    deadline = time.time() + grace
    # our jobs went through the Jobs API (JobSubmissionClient.submit_job): each has a submission id
    while (
        any(not client.get_job_status(cast(str, j.submission_id)).is_terminal() for j in running)
        and time.time() < deadline
    ):
        time.sleep(1.0)


def _load_job(state: Path) -> dict:
    """job.json (written by `ditforge submit`, or here on the first start from a bare job.yaml):
    a requeued allocation reads the same file, so it continues the same run."""
    f = state / "job.json"
    if f.exists():
        return json.loads(f.read_text())
    from ..runs.driver import read_job

    job = read_job(str(state / "job.yaml"))
    write_json(f, job)
    return job


def run_job(c: SlurmCluster, state: Path, dashboard: str, sig: Signals, restart: int) -> tuple[int, bool]:
    from mlflow.tracking import MlflowClient

    from ..credentials import use_mlflow_credentials
    from ..spec import JobSpec
    from ..runs import folder
    from .jobs import Target, jobs_client, submit_to_ray

    job = _load_job(state)
    spec = JobSpec.model_validate(job["spec"])
    use_mlflow_credentials()
    mlf = MlflowClient(job["tracking_uri"])
    folder.clear_stop(job["run_uri"])  # the stop that ended the previous allocation is done
    if restart:  # the same MLflow run goes on
        mlf.update_run(job["mlflow_run_id"], status="RUNNING")
        mlf.set_tag(job["mlflow_run_id"], "ditforge.stopped", "false")
        mlf.set_tag(job["mlflow_run_id"], "ditforge.slurm_restarts", str(restart))
    mlf.set_tag(job["mlflow_run_id"], "ditforge.slurm_job_id", os.environ["SLURM_JOB_ID"])
    ray_id = submit_to_ray(job, spec, Target(dashboard, job["tracking_uri"], "RAY_AUTH_TOKEN"))
    write_json(state / "ray.json", {"dashboard": dashboard, "job_id": ray_id, "restart": restart})
    log(f"submitted {ray_id} (run {job['run_name']})")
    client = jobs_client(dashboard, "RAY_AUTH_TOKEN")
    asked = None
    while (st := str(client.get_job_status(ray_id).value)) not in TERMINAL:
        if sig.any and asked is None:
            asked = sig.got[0]
            log(f"signal {signal.Signals(asked).name}: asking the run to save a checkpoint and stop")
            folder.request_stop(job["run_uri"], by="slurm")
        if asked == signal.SIGUSR1 and signal.SIGTERM in sig.got:  # Slurm ends the job now: no more waiting
            break
        time.sleep(1.0)
    try:
        (state / f"ray-{restart}.log").write_text(client.get_job_logs(ray_id))
    except Exception:
        pass
    done = folder.complete_steps(job["run_uri"])
    finished = (
        bool(done) and done[-1] >= spec.train.steps and st == "SUCCEEDED" and not folder.stop_marked(job["run_uri"])
    )
    log(f"{ray_id} ended {st}; newest complete checkpoint: step {done[-1] if done else '-'} of {spec.train.steps}")
    requeue = asked == signal.SIGUSR1 and c.requeue and not finished
    return (0 if finished or requeue else 1), requeue


# ------------------------------------------------------------------------------ a worker node


def run_worker(c: SlurmCluster, gcs: str) -> int:
    sig = Signals()
    env = ray_env()
    os.environ["RAY_AUTH_MODE"] = "token"
    ip = node_ip()
    argv = [_ray_bin(), "start", f"--address={gcs}", f"--node-ip-address={ip}", *ray_args(c)]
    node = None
    try:
        # A raylet that fails to register (a head still starting, a busy node) is started again:
        # the head waits for every node, and one failed try should not cost the allocation.
        for attempt in range(1, 4):
            log(f"Ray worker node at {ip}, joining {gcs} (try {attempt})")
            node = subprocess.Popen(argv, env=env, start_new_session=True, stdin=subprocess.DEVNULL)
            while not sig.any and node.poll() is None:
                time.sleep(0.5)
            if sig.any:
                break
            stop_group(node)
            sweep()
            time.sleep(5)
    finally:
        if node is not None:
            stop_group(node)
        sweep()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ditforge-slurm-node")
    p.add_argument("state", type=Path, help="the allocation's folder (cluster.json, head.json, job.json)")
    p.add_argument("--worker", metavar="GCS", help="join the head at GCS (srun'd on the other nodes)")
    args = p.parse_args(argv)
    c = SlurmCluster.model_validate(json.loads((args.state / "cluster.json").read_text()))
    return run_worker(c, args.worker) if args.worker else run_head(c, args.state)


if __name__ == "__main__":
    sys.exit(main())
