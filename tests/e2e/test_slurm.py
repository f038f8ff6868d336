"""ditforge on a real Slurm (Debian's slurm-wlm 22.05): slurmctld on host 0 of the namespace hosts
(the login node, where every `ditforge` command runs), one slurmd on each of hosts 1 and 2 (the
partition's two compute nodes, NodeAddr = the host's address).

As on a Slurm site, login and compute nodes share a file system (here: one folder outside every
host's private /tmp holding $HOME, $DITFORGE_HOME, the data and the checkpoints) and nothing
else: the Ray cluster, the job's gloo process group and MLflow (a server on host 0's address) go
over the hosts' network.

  * standing mode: `cluster up` (a 2-node allocation: Ray head on one node, a Ray worker node on
    the other), a 2-worker ZeRO-2 job with one worker per node through the Ray Jobs API, `status`
    with the Slurm job, `cluster down` leaving no process of the allocation behind;
  * mode job with a preemption: SIGUSR1 to the allocation mid-run (what `--signal` sends before
    the time limit or a preemption) → checkpoint, requeue, the requeued allocation continues the
    same MLflow run and ends SUCCEEDED with final weights bit-identical to the standing run's;
  * an allocation larger than the partition fails at once, in one line.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from ditforge.data.encode import encode_dataset
from ditforge.data.ingest import ingest_shapes
from ditforge.data.parallel import ray_session
from ditforge.models.vae import IdentityVAE
from ditforge.runs.folder import complete_steps

from . import slurm as test_slurm
from ..conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.hosts]  # network-namespace hosts and a Slurm of their own
STEPS, EVERY = 60, 10
MLFLOW_PORT = 5099


@pytest.fixture(scope="module")
def site(hosts, tmp_path_factory):
    """The Slurm site: controller + login on host 0, compute nodes n1 and n2 on hosts 1 and 2."""
    why = test_slurm.missing()
    if why:
        pytest.skip(why)
    shared = hosts.base / "shared"
    for d in ("home", "ditforge", "mlflow"):
        (shared / d).mkdir(parents=True, exist_ok=True)
    wrap = lambda i: lambda argv: hosts._argv(i, argv)  # noqa: E731
    s = test_slurm.Slurm(
        shared / "slurm", (hosts.addr(0), wrap(0)), [(f"n{i}", hosts.addr(i), wrap(i)) for i in (1, 2)]
    )
    mlflow = None
    try:
        env = {
            "HOME": str(shared / "home"),
            "DITFORGE_HOME": str(shared / "ditforge"),
            "DITFORGE_ROOTS": str(shared),
            "SLURM_CONF": str(s.conf),
        }
        # A plain MLflow server on the login node's address (a test convenience on a bridge with
        # no uplink; a site runs its own, with authentication)
        mlflow = hosts.popen(
            0,
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--host",
                hosts.addr(0),
                "--port",
                str(MLFLOW_PORT),
                "--backend-store-uri",
                f"sqlite:///{shared}/mlflow/mlflow.db",
                "--artifacts-destination",
                f"{shared}/mlflow/artifacts",
                "--workers",
                "1",
            ],
            env=env,
            stdout=open(shared / "mlflow" / "log", "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        tracking = f"http://{hosts.addr(0)}:{MLFLOW_PORT}"
        data = f"file://{shared}/data"
        with ray_session(2):  # one private Ray for both steps
            ingest_shapes(f"{data}/pixels", limit=256, resolution=16, shard_size=64, progress=False)
            encode_dataset(f"{data}/pixels", f"{data}/latents", IdentityVAE(2), progress=False)
        deadline = time.time() + 120
        probe = [sys.executable, "-c", f"import urllib.request as u; u.urlopen('{tracking}/health', timeout=5)"]
        while hosts.run(0, probe).returncode != 0:
            assert time.time() < deadline and mlflow.poll() is None, (shared / "mlflow" / "log").read_text()[-2000:]
            time.sleep(1)
        spec = {
            "kind": "slurm",
            "name": "t2",
            "partition": "debug",
            "nodes": 2,
            "cpus_per_node": 1,
            "time_limit": "30:00",
            "ports_from": 26000,
            "object_store_mb": 100,
            "tracking_uri": tracking,
            "signal_grace_s": 60,
            "up_timeout_s": 300,
            "python": sys.executable,
        }
        (shared / "slurm.yaml").write_text(yaml.safe_dump(spec))
        yield {
            "hosts": hosts,
            "slurm": s,
            "shared": shared,
            "env": env,
            "yaml": shared / "slurm.yaml",
            "data": f"{data}/latents",
            "tracking": tracking,
        }
    finally:
        jobs = s.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
        if jobs:
            s.run("scancel", *jobs, check=False)
            deadline = time.time() + 60
            while s.run("squeue", "-h", check=False).stdout.strip() and time.time() < deadline:
                time.sleep(1)
        s.stop()
        # the allocations' logs and the daemons' outlive the hosts' folders, for a failure's post-mortem
        keep = tmp_path_factory.mktemp("slurm-logs")
        shutil.copytree(shared / "ditforge" / "slurm", keep / "allocations", dirs_exist_ok=True)
        for f in (shared / "slurm").glob("*.log"):
            shutil.copy(f, keep)
        if mlflow is not None:
            os.killpg(mlflow.pid, 9)
            mlflow.wait(30)


def mlflow_client(site) -> MlflowClient:
    # The test process is on none of the hosts' network: it reads the server's store directly.
    return MlflowClient(f"sqlite:///{site['shared']}/mlflow/mlflow.db")


def cli(site, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """`ditforge ARGS` on the login node."""
    return site["hosts"].run(0, [sys.executable, "-m", "ditforge.cli", *args], env=site["env"], timeout=timeout)


def job_sets(site, name: str) -> list[str]:
    sets = [
        f"data.train={site['data']}",
        "data.batch_size=64",  # steps slow enough (~0.5 s) that a signal lands mid-run
        "data.resolution=16",
        f"checkpoint.uri=file://{site['shared']}/runs/{name}",
        f"train.steps={STEPS}",
        "train.warmup=2",
        f"checkpoint.every_steps={EVERY}",
        "checkpoint.keep_last=10",
        "tracking.log_every=5",
        "tracking.experiment=slurm",
        "tracking.system_metrics=false",
        "tracking.register_model=false",
        "eval.quality=false",
        "sample.per_class=1",
        "sample.steps=2",
        "resources.placement=STRICT_SPREAD",
        "train.resume=never",
    ]
    return [a for s in sets for a in ("--set", s)]


def submit_in_own_allocation(site, name: str, *extra: str) -> tuple[str, dict]:
    """`submit --set cluster.mode=job` on the login node: (the printed job id, its job record)."""
    sets = [*job_sets(site, name), *(a for x in extra for a in ("--set", x))]
    r = cli(
        site,
        "submit",
        str(REPO / "jobs" / "demo-image.yaml"),
        "--cluster",
        str(site["yaml"]),
        "--set",
        "cluster.mode=job",
        *sets,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    job_id = r.stdout.strip().splitlines()[-1]
    return job_id, json.loads((site["shared"] / "ditforge" / "jobs" / f"{job_id}.json").read_text())


def final_weights(run_uri: str, out):
    from .test_restart import final_weights as export_weights

    return export_weights({"run_uri": run_uri}, out)


@pytest.fixture(scope="module")
def standing(site, tmp_path_factory):
    """`cluster up`, one job with --wait, `status`, `cluster down`: what each step answered."""
    y, got = str(site["yaml"]), {}
    t0 = time.time()
    r = cli(site, "cluster", "up", y)
    got["up"], got["up_s"] = r, time.time() - t0
    if r.returncode:
        return got
    got["cluster_status"] = cli(site, "cluster", "status", y)
    got["head"] = json.loads((site["shared"] / "ditforge" / "slurm" / "t2" / "head.json").read_text())
    r = cli(
        site, "submit", str(REPO / "jobs" / "demo-image.yaml"), "--cluster", y, *job_sets(site, "standing"), "--wait"
    )
    got["submit"] = r
    job_id = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else None
    if job_id:
        got["rec"] = json.loads((site["shared"] / "ditforge" / "jobs" / f"{job_id}.json").read_text())
        got["status"] = cli(site, "status", job_id)
        if r.returncode == 0:  # else the test shows why (a fixture error would hide it)
            got["weights"] = final_weights(got["rec"]["run_uri"], tmp_path_factory.mktemp("standing"))
    got["slurm_job_id"] = got["head"]["slurm_job_id"]
    t0 = time.time()
    got["down"] = cli(site, "cluster", "down", y)
    got["down_s"] = time.time() - t0
    h = site["hosts"]
    slurmd = set(site["slurm"].daemon_pids().values())
    got["left"] = {i: [p for p in h.pids(i) if p not in slurmd] for i in (1, 2)}
    got["left_job"] = test_slurm.job_processes(got["slurm_job_id"])
    return got


def test_standing_allocation_trains_one_worker_per_node_and_down_leaves_nothing(site, standing):
    up = standing["up"]
    assert up.returncode == 0, up.stderr[-3000:]
    h = site["hosts"]
    assert up.stdout.strip() == f"http://{h.addr(1)}:26001"  # the head on the allocation's first node
    assert sorted(n["address"] for n in standing["head"]["nodes"]) == [h.addr(1), h.addr(2)]
    assert h.addr(1) in standing["cluster_status"].stdout and h.addr(2) in standing["cluster_status"].stdout
    r = standing["submit"]
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    rec = standing["rec"]
    assert rec["slurm_job_id"] == standing["slurm_job_id"] and rec["cluster"] == "slurm"
    assert f"slurm {rec['slurm_job_id']} RUNNING" in standing["status"].stdout
    # one worker per node: the ranks' Ray node ids are the allocation's two nodes
    run = mlflow_client(site).get_run(rec["mlflow_run_id"])
    nodes = {run.data.tags[f"ditforge.node_id.rank{r}"][:12] for r in (0, 1)}
    assert nodes == {n["node"] for n in standing["head"]["nodes"]}, (nodes, standing["head"])
    assert run.info.status == "FINISHED" and run.data.params["world_size"] == "2"
    assert complete_steps(rec["run_uri"])[-1] == STEPS
    down = standing["down"]
    assert down.returncode == 0 and f"slurm job {rec['slurm_job_id']}" in down.stdout, down.stderr
    # nothing of the allocation is left on either compute node: only their slurmd
    assert standing["left"] == {1: [], 2: []}, standing["left"]
    assert standing["left_job"] == []
    print(f"cluster up {standing['up_s']:.0f}s, down {standing['down_s']:.0f}s")


def test_preempted_job_allocation_requeues_and_resumes_bit_identical(site, standing, tmp_path):
    from .test_restart import assert_bit_identical

    assert "weights" in standing, "the standing run (the uninterrupted reference) did not finish"
    job_id, rec = submit_in_own_allocation(site, "preempt")
    assert re.fullmatch(r"slurm-\d+", job_id), job_id
    slurm_id, s = rec["slurm_job_id"], site["slurm"]
    # `logs --follow` from the start: it writes each attempt's log as it grows, until the allocation ends
    follow = site["hosts"].popen(
        0, [sys.executable, "-m", "ditforge.cli", "logs", job_id, "--follow"], env=site["env"], stdout=-1, text=True
    )

    deadline = time.time() + 400
    while not complete_steps(rec["run_uri"]):
        assert time.time() < deadline, s.run("squeue", check=False).stdout
        time.sleep(0.5)
    # what Slurm sends `signal_grace_s` before the time limit or a preemption (--signal=B:USR1@N)
    s.run("scancel", "--batch", "--signal=USR1", slurm_id)
    assert f"slurm {slurm_id}" in cli(site, "status", job_id).stdout
    deadline = time.time() + 600
    while state := s.run("squeue", "-h", "-j", slurm_id, "-o", "%T", check=False).stdout.strip():
        assert time.time() < deadline, state
        time.sleep(1)
    job_dir = Path(rec["job_dir"])
    out = (job_dir / f"slurm-{slurm_id}.out").read_text()
    first, again = ((job_dir / f"ray-{i}.log").read_text() for i in (0, 1))
    assert "stop requested: leaving at step" in first, first[-3000:]
    assert "requeueing allocation" in out, out[-3000:]
    # the first allocation left a checkpoint at the step it stopped; the requeued one went on from it
    ended = re.findall(r"ended (\w+); newest complete checkpoint: step (\d+)", out)
    assert len(ended) == 2 and ended[1] == ("SUCCEEDED", str(STEPS)), out[-3000:]
    left = int(ended[0][1])
    resumed = re.findall(r"\[rank 0\] resumed from \S+ at step (\d+)", again)
    assert 0 < left < STEPS and resumed and int(resumed[0]) == left, (resumed, left)
    run = mlflow_client(site).get_run(rec["mlflow_run_id"])  # the same MLflow run, finished
    assert run.info.status == "FINISHED" and run.data.tags["ditforge.slurm_restarts"] == "1", run.data.tags
    st = cli(site, "status", job_id).stdout
    assert "SUCCEEDED" in st and f"slurm {slurm_id}" in st, st
    followed, _ = follow.communicate(timeout=120)  # it ends by itself with the allocation
    assert follow.returncode == 0 and "ray-0.log <==" in followed and "ray-1.log <==" in followed, followed[-2000:]
    assert "stop requested: leaving at step" in followed and "resumed from" in followed, followed[-3000:]
    assert_bit_identical(final_weights(rec["run_uri"], tmp_path), standing["weights"])


def test_stop_a_job_in_its_own_allocation_saves_and_ends_it(site):
    """`ditforge stop slurm-<id>`: the job saves a final checkpoint and leaves; the allocation ends
    with it (no scancel needed), and `status` says so."""
    # never ends by itself: on a busy machine 60 steps were done before the stop landed
    job_id, rec = submit_in_own_allocation(site, "stop", "train.steps=100000")
    deadline = time.time() + 400
    while not complete_steps(rec["run_uri"]):
        assert time.time() < deadline, site["slurm"].run("squeue", check=False).stdout
        time.sleep(0.5)
    r = cli(site, "stop", job_id, timeout=300)
    assert r.returncode == 0 and "STOPPED" in r.stdout and "slurm" in r.stdout, r.stdout + r.stderr
    assert "(stopped by Ray)" not in r.stdout  # it left by itself: no scancel
    # it left at a step of its own choosing and saved that step (the checkpoint.on_stop path)
    log = (Path(rec["job_dir"]) / "ray-0.log").read_text()
    left = re.findall(r"stop requested: leaving at step (\d+)", log)
    assert left and int(left[0]) == complete_steps(rec["run_uri"])[-1] >= EVERY, (left, complete_steps(rec["run_uri"]))
    assert site["slurm"].run("squeue", "-h", "-j", rec["slurm_job_id"], check=False).stdout.strip() == ""


def test_more_nodes_than_the_partition_fails_fast_in_one_line(site, tmp_path):
    spec = yaml.safe_load(site["yaml"].read_text()) | {"name": "too-big", "nodes": 3}
    y = site["shared"] / "too-big.yaml"
    y.write_text(yaml.safe_dump(spec))
    t0 = time.time()
    r = cli(site, "cluster", "up", str(y), timeout=120)
    took = time.time() - t0
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines == ["error: cluster 'too-big': nodes: 3, but partition debug has 2 nodes"], r.stderr
    assert took < 60, took
    assert site["slurm"].run("squeue", "-h", "-n", "ditforge-too-big").stdout.strip() == ""  # nothing queued
