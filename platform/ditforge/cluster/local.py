"""The `local` cluster kind: a Ray head and N worker raylets on 127.0.0.1, one machine posing as N+1.

Each node is one `ray start --block` in its own session with a pid file
(`$DITFORGE_HOME/run/cluster-<name>-head.pid`, `…-node1.pid`, …), exactly like the embedded head,
so `down` stops this cluster's processes and nobody else's (`ray stop` would stop every Ray on
the machine). Every node gets its own port block and custom resource `<name>-nodeI`, and the
cluster its own temp dir, so it runs beside the embedded head. MLflow and S3 are the embedded
services, shared with the embedded cluster.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

from .. import procs, raysite, services, storage
from ..services import ServiceError
from ..spec import LocalCluster


def dashboard(c: LocalCluster) -> str:
    return f"http://127.0.0.1:{c.ports.dashboard}"


def gcs(c: LocalCluster) -> str:
    return f"127.0.0.1:{c.ports.gcs}"


def temp_dir(c: LocalCluster) -> Path:
    # Short on purpose: Ray puts unix sockets under it (107-byte path limit). Keyed by the home so
    # two checkouts' clusters of the same name do not share one.
    key = hashlib.sha1(str(storage.home()).encode()).hexdigest()[:6]
    return Path(tempfile.gettempdir()) / f"ditforge-{c.name}-{key}"


def node_names(c: LocalCluster) -> list[str]:
    return [f"cluster-{c.name}-head"] + [f"cluster-{c.name}-node{i}" for i in range(1, c.nodes + 1)]


def _node_ports(c: LocalCluster, i: int) -> list[str]:
    b = c.ports.nodes_from + 100 * i  # node i's own block: nothing collides with another raylet
    return [
        f"--node-manager-port={b}",
        f"--object-manager-port={b + 1}",
        f"--dashboard-agent-listen-port={b + 2}",
        f"--dashboard-agent-grpc-port={b + 3}",
        f"--metrics-export-port={b + 4}",
        f"--runtime-env-agent-port={b + 5}",
        f"--min-worker-port={b + 10}",
        f"--max-worker-port={b + 99}",
    ]


def _argv(c: LocalCluster, i: int) -> list[str]:
    common = [
        "--block",
        "--node-ip-address=127.0.0.1",
        "--num-gpus=0",
        f"--temp-dir={temp_dir(c)}",
        f"--object-store-memory={c.object_store_mb * 1024 * 1024}",
        "--disable-usage-stats",
        *_node_ports(c, i),
    ]
    if i == 0:
        return [
            services.bin_path("ray"),
            "start",
            "--head",
            f"--port={c.ports.gcs}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={c.ports.dashboard}",
            f"--ray-client-server-port={c.ports.client}",
            f"--num-cpus={c.head_cpus}",
            f"--resources={json.dumps({f'{c.name}-head': 1})}",
            *common,
        ]
    # One log monitor (the head's) for the shared session log dir: one per raylet would each
    # forward every worker's lines, and `ditforge logs` would show each line N+1 times.
    return [
        services.bin_path("ray"),
        "start",
        f"--address={gcs(c)}",
        f"--num-cpus={c.cpus_per_node}",
        f"--resources={json.dumps({f'{c.name}-node{i}': 1})}",
        "--include-log-monitor=false",
        *common,
    ]


def alive_nodes(c: LocalCluster) -> list[dict]:
    """Ray's view: the alive nodes with their total resources (empty if the head is down)."""
    if not services.http_ok(f"{dashboard(c)}/api/version"):
        return []
    from ray.util.state import list_nodes

    from .. import credentials

    credentials.use_ray_token()  # the state API sends the token when RAY_AUTH_MODE says so
    try:
        nodes = list_nodes(address=dashboard(c), filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
    except Exception:
        return []
    return [{"node_id": n.node_id, "is_head": n.is_head_node, "resources": dict(n.resources_total)} for n in nodes]


def is_up(c: LocalCluster) -> bool:
    return all(services.running(n) for n in node_names(c)) and len(alive_nodes(c)) == c.nodes + 1


def up(c: LocalCluster) -> str:
    """Start (or reuse) the cluster and the embedded S3 / MLflow; return the Jobs API address."""
    services.up(ray=False)  # also: Ray's token exists, and this process's Ray clients send it
    if is_up(c):
        return dashboard(c)
    down(c)  # half a cluster (a node died, a port moved): start clean
    shutil.rmtree(temp_dir(c), ignore_errors=True)
    env = raysite.node_env(services.base_env())  # token auth, as the embedded head: its ports listen beyond loopback
    env.pop("RAY_ADDRESS", None)  # raylets must join this head, not whatever the shell points at
    # A SIGTERM'd node drains for 30 s by default (for Serve proxies); nothing here needs it.
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "2"
    names = node_names(c)
    head = services.spawn(names[0], _argv(c, 0), env)
    services.wait_ready(names[0], lambda: services.http_ok(f"{dashboard(c)}/api/version"), 120, head)
    # One raylet at a time: raylets sharing a session dir pick their socket names (raylet.1, …)
    # by looking at what exists, and two starting together take the same one.
    for i, name in enumerate(names[1:], start=1):
        node = services.spawn(name, _argv(c, i), env)
        deadline = time.time() + 120
        while len(alive_nodes(c)) < i + 1:
            if not procs.alive(node) or time.time() > deadline:
                down(c)
                raise ServiceError(
                    f"local cluster '{c.name}': {name} did not join the head "
                    f"(log: {storage.home() / 'logs' / (name + '.log')})"
                )
            time.sleep(0.5)
    return dashboard(c)


def _stop_jobs(c: LocalCluster, timeout: float = 20.0) -> None:
    """Ask Ray to stop the cluster's running jobs: their drivers run in sessions of their own."""
    if not services.http_ok(f"{dashboard(c)}/api/version"):
        return
    from ray.job_submission import JobStatus

    from .jobs import jobs_client

    try:
        client = jobs_client(dashboard(c), "RAY_AUTH_TOKEN")
        running = [j.submission_id for j in client.list_jobs() if not j.status.is_terminal() and j.submission_id]
        for job in running:
            client.stop_job(job)
        deadline = time.time() + timeout
        while running and time.time() < deadline:
            running = [
                j
                for j in running
                if client.get_job_status(j) not in (JobStatus.STOPPED, JobStatus.SUCCEEDED, JobStatus.FAILED)
            ]
            time.sleep(0.5)
    except Exception:
        pass  # a half-dead head: the process sweep below still gets everything


def leftover_pids(c: LocalCluster) -> list[int]:
    """Processes of this cluster that outlived their node's group (e.g. a job driver, which Ray
    starts in a session of its own): anything whose command line or working directory is inside
    this cluster's temp dir."""
    root = str(temp_dir(c))
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(d / "cwd")
        except OSError:
            continue
        if root in cmd or cwd.startswith(root):
            found.append(int(d.name))
    return found


def down(c: LocalCluster) -> list[str]:
    """Stop this cluster's jobs and nodes (workers first, then the head); returns what was stopped."""
    _stop_jobs(c)
    running = {n: p for n in node_names(c) if (p := services.running(n))}
    for pid in running.values():  # all nodes at once: each may take a few seconds to wind down
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    stopped = [n for n in node_names(c) if services.stop_process(n)] + [n for n in running if not services.running(n)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = leftover_pids(c)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 10
        while pids and time.time() < deadline:
            pids = [p for p in pids if procs.alive(p)]
            time.sleep(0.2)
    return sorted(set(stopped), key=node_names(c).index)


def status(c: LocalCluster) -> list[dict]:
    """One row per node: its `ray start` pid and Ray's view of it."""
    nodes = alive_nodes(c)
    heads = [n for n in nodes if n["is_head"]]
    rows = []
    for i, name in enumerate(node_names(c)):
        mark = f"{c.name}-head" if i == 0 else f"{c.name}-node{i}"
        ray_node = next((n for n in nodes if mark in n["resources"]), heads[0] if i == 0 and heads else None)
        rows.append(
            {
                "node": name,
                "pid": services.running(name),
                "alive": ray_node is not None,
                "node_id": ray_node["node_id"] if ray_node else None,
                "resources": {
                    k: v
                    for k, v in (ray_node or {}).get("resources", {}).items()
                    if not k.startswith(("node:", "object_store_memory", "memory"))
                },
            }
        )
    return rows
