"""A `local` cluster (a head and 2 worker raylets on 127.0.0.1) through its whole life: `cluster
up`, a 2-worker ZeRO-2 job submitted with `ditforge submit` landing one worker per raylet,
`status` and `logs` while it runs, `stop` with a final checkpoint, `cluster down` with nothing
left behind. Its own name and ports, so it runs beside the embedded head and a developer's
`cluster/local.yaml`."""

from __future__ import annotations

import json
import socket
import time

import pytest
import yaml
from mlflow.tracking import MlflowClient

from ditforge import services, storage
from ditforge.cluster import local
from ditforge.spec import load_cluster
from ditforge.runs.folder import complete_steps

from ..conftest import REPO, run_cli
from ..datasets import make_latents

pytestmark = [pytest.mark.slow, pytest.mark.serial]  # a cluster of its own, held to deadlines


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def cluster_yaml(tmp_path_factory, embedded):
    spec = yaml.safe_load((REPO / "cluster" / "local.yaml").read_text())
    spec.update(name="pytest", ports={"gcs": 6391, "dashboard": 8276, "client": 10012, "nodes_from": 22000})
    path = tmp_path_factory.mktemp("cluster") / "local-test.yaml"
    path.write_text(yaml.safe_dump(spec))
    yield path
    local.down(load_cluster(path))  # whatever happened in the test


def test_local_cluster_lifecycle(cluster_yaml, s3_prefix):
    c = load_cluster(cluster_yaml)
    t0 = time.time()
    make_latents(f"{s3_prefix}/latents", [64] * 4, [(12, 16, 16)], noise_seed=0)

    print(f"up at {time.time() - t0:.0f}s")
    # up: a head with no CPU and two 1-CPU raylets, each its own Ray node
    r = run_cli("cluster", "up", str(cluster_yaml))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "http://127.0.0.1:8276"
    nodes = local.status(c)
    assert [n["alive"] for n in nodes] == [True, True, True]
    workers = {n["node_id"] for n in nodes[1:]}
    assert len(workers) == 2 and nodes[0]["node_id"] not in workers
    assert [n["resources"].get("CPU", 0) for n in nodes] == [0, 1, 1]
    r = run_cli("cluster", "status", str(cluster_yaml))
    assert r.returncode == 0 and r.stdout.count(" yes ") == 3, r.stdout

    print(f"submit returns at {time.time() - t0:.0f}s")
    # submit returns at once with the job id
    r = run_cli(
        "submit",
        str(REPO / "jobs" / "demo-image.yaml"),
        "--cluster",
        str(cluster_yaml),
        "--set",
        f"data.train={s3_prefix}/latents",
        "--set",
        f"checkpoint.uri={s3_prefix}/runs",
        "--set",
        "train.steps=1000",
        "--set",
        "train.warmup=2",
        "--set",
        "checkpoint.every_steps=1000",
        "--set",
        "checkpoint.on_stop=true",
        "--set",
        "tracking.log_every=2",
        "--set",
        "tracking.experiment=tests",
        "--set",
        "resources.placement=SPREAD",
        "--set",
        "deepspeed.zero_stage=2",
    )
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().splitlines()[-1]
    rec = json.loads((storage.home() / "jobs" / f"{job}.json").read_text())
    assert rec["cluster"] == "local" and rec["dashboard"] == "http://127.0.0.1:8276"

    print(f"status and logs at {time.time() - t0:.0f}s")
    # status and logs while it runs
    deadline = time.time() + 240
    while True:
        r = run_cli("status", job, env={"COLUMNS": "250"})
        row = next(line for line in r.stdout.splitlines() if job in line)
        cells = [x.strip() for x in row.split("│")[1:-1]]
        if cells[1] == "RUNNING" and cells[2] != "-":
            break
        assert cells[1] in ("PENDING", "RUNNING") and time.time() < deadline, r.stdout
        time.sleep(3)
    step, total = cells[2].split("/")
    assert int(step) >= 2 and total == "1000" and float(cells[3]) > 0 and float(cells[4]) > 0
    assert cells[5].startswith("http://127.0.0.1:") and rec["mlflow_run_id"] in cells[5]
    r = run_cli("logs", job)
    assert r.returncode == 0 and "step 2/1000 loss" in r.stdout
    # No more copies than on a one-node cluster (Ray prints a worker line twice there too): the
    # raylets share one session log dir, and only the head's log monitor forwards it.
    assert r.stdout.count("step 2/1000 loss") <= 2

    # one worker per raylet, from the node id each rank reports
    tags = MlflowClient(rec["tracking_uri"]).get_run(rec["mlflow_run_id"]).data.tags
    assert {tags["ditforge.node_id.rank0"], tags["ditforge.node_id.rank1"]} == workers

    print(f"stop at {time.time() - t0:.0f}s")
    # stop: a final checkpoint, then the job ends by itself
    r = run_cli("stop", job)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{job}: STOPPED (final checkpoint saved)"
    steps = complete_steps(rec["run_uri"])
    assert len(steps) == 1 and 2 <= steps[0] < 1000
    run = MlflowClient(rec["tracking_uri"]).get_run(rec["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["ditforge.stopped"] == "true"
    r = run_cli("status", job, env={"COLUMNS": "250"})
    assert "STOPPED" in r.stdout

    print(f"down at {time.time() - t0:.0f}s")
    # down: no process of this cluster left, its ports free, the shared services untouched
    r = run_cli("cluster", "down", str(cluster_yaml))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "stopped: cluster-pytest-head, cluster-pytest-node1, cluster-pytest-node2"
    assert local.leftover_pids(c) == []
    assert all(services.running(n) is None for n in local.node_names(c))
    assert not any(_listening(p) for p in (6391, 8276, 10012, 22000, 22100, 22200))
    assert services.http_ok(services.endpoints().mlflow + "/health")
