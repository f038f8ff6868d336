"""The environment of every Ray node ditforge starts (embedded head, `cluster join`, the local
cluster, Slurm nodes): this folder on PYTHONPATH, so that each Python process of the node (Ray's
dashboard, autoscaler monitor and dashboard agent among them) runs `sitecustomize.py` first.

Why: on a machine with a routable address, Ray 2.60 serves its three Prometheus exporters (the
autoscaler's on 44217, the dashboard's on 44227, each agent's `--metrics-export-port`) on every
interface, with no setting to bind them elsewhere and no authentication (Ray binds them to
loopback only when the node's own address is loopback). Anyone on the network could read the
cluster's jobs, nodes and resources from them. `sitecustomize.py` binds them to 127.0.0.1; a
Prometheus on the node itself still scrapes them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
METRICS_HOST_ENV = "DITFORGE_METRICS_HOST"


def node_env(env: dict[str, str]) -> dict[str, str]:
    """`env` for a `ray start`: token auth, the start-up hook that keeps metrics on loopback, and
    this Python first on PATH (a Ray job's entrypoint, `python -m ditforge.runs.driver`, is run by
    whatever `python` the node's PATH finds: on a Slurm node that was the system's, without mlflow)."""
    py = [str(HERE), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(HERE)]]
    bindir = str(Path(sys.executable).parent)
    path = [bindir, *[p for p in env.get("PATH", "").split(os.pathsep) if p and p != bindir]]
    return env | {
        "RAY_AUTH_MODE": "token",
        "PYTHONPATH": os.pathsep.join(py),
        "PATH": os.pathsep.join(path),
        METRICS_HOST_ENV: "127.0.0.1",
        # Ray starts as many idle Python workers as the node has CPUs for each job's first driver;
        # a ditforge job's actors (Ray Train's, ours) take workers of their own, so those idled
        # until the job ended: ~1 CPU-second each, per job and node, wasted.
        "RAY_prestart_worker_first_driver": "0",
    }
