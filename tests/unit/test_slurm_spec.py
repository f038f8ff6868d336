"""`kind: slurm` cluster specs: what `validate` refuses (one line naming the field, exit 2) and the
batch script `cluster render` writes. No Slurm needed; tests/e2e/test_slurm.py runs a real one."""

from __future__ import annotations

import json

import pytest

from ditforge.cluster.slurm import batch_script, sbatch_options
from ditforge.spec import SlurmCluster, SpecError, build_cluster, load_cluster

from ..conftest import REPO, run_cli


@pytest.mark.parametrize(
    "data, field",
    [
        ({"nodes": 0}, "nodes"),
        ({"time_limit": "4h"}, "time_limit"),
        ({"time_limit": "1-2:3:4:5"}, "time_limit"),
        ({"gpu_type": "a100"}, "gpu_type"),
        ({"partition": "gpu; rm -rf /"}, "partition"),
        ({"account": "my lab"}, "account"),
        ({"sbatch_args": ["-w node1"]}, "sbatch_args"),
        ({"setup": ["module load a\nmodule load b"]}, "setup"),
        ({"mode": "batch"}, "mode"),
        ({"ports_from": 80}, "ports_from"),
        ({"tracking_uri": "http://u:secret@mlflow:5000"}, "tracking_uri"),
        ({"partitions": "gpu"}, "partitions"),
    ],
)
def test_bad_slurm_specs_name_the_field(data, field):
    with pytest.raises(SpecError) as e:
        build_cluster({"kind": "slurm", **data}, "s.yaml")
    assert e.value.field == field, str(e.value)


def test_validate_one_line_per_problem_exit_2(tmp_path):
    bad, worse = tmp_path / "bad.yaml", tmp_path / "worse.yaml"
    bad.write_text("kind: slurm\ntime_limit: 4h\n")
    worse.write_text("kind: slurm\nnodes: -1\n")
    r = run_cli("validate", str(bad), str(worse), str(REPO / "cluster" / "slurm.yaml"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"error: {bad}: time_limit: '4h' is not a Slurm time")
    assert lines[1] == f"error: {worse}: nodes: input should be greater than or equal to 1"
    assert "ok: " in r.stdout and "SlurmCluster" in r.stdout


def test_sbatch_options_follow_the_spec():
    c = load_cluster(REPO / "cluster" / "slurm.yaml")
    opts = sbatch_options(c)
    for want in (
        "--nodes=2",
        "--ntasks-per-node=1",
        "--cpus-per-task=64",
        "--gres=gpu:a100:8",
        "--mem=480G",
        "--time=1-00:00:00",
        "--partition=gpu",
        "--account=my-lab",
        "--qos=normal",
        "--constraint=ib",
        "--signal=B:USR1@300",
        "--requeue",
    ):
        assert want in opts, (want, opts)
    plain = sbatch_options(SlurmCluster(nodes=1, gpus_per_node=0, requeue=False))
    assert "--no-requeue" in plain and not any(o.startswith(("--gres", "--mem", "--partition")) for o in plain)


def test_render_writes_the_batch_script(tmp_path):
    r = run_cli("cluster", "render", str(REPO / "cluster" / "slurm.yaml"), "--out", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    script = tmp_path / "b" / "job.sh"
    assert r.stdout.strip() == f"sbatch {script}"
    text = script.read_text()
    assert text.startswith("#!/bin/bash\n") and "#SBATCH --nodes=2\n" in text and "module load cuda/12.4\n" in text
    assert text.index("module load") < text.index("exec python -m ditforge.cluster.slurm_node")
    assert f"#SBATCH --output={tmp_path / 'b'}/slurm-%j.out" in text
    assert json.loads((tmp_path / "b" / "cluster.json").read_text())["nodes"] == 2
    # the script is what bash would run: it parses
    import subprocess

    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert batch_script(SlurmCluster(), tmp_path).count("#SBATCH") >= 8


class FakeSlurm:
    """Answers the Slurm client commands the login side runs (sinfo, sbatch, squeue, scancel)."""

    def __init__(self, sinfo: str, squeue: str = "PENDING|Priority"):
        self.sinfo, self.squeue, self.calls = sinfo, squeue, []

    def __call__(self, *argv, timeout=60):
        import subprocess

        self.calls.append(argv)
        out = {"sinfo": self.sinfo, "sbatch": "42\n", "squeue": self.squeue + "\n"}.get(argv[0], "")
        return subprocess.CompletedProcess(argv, 0, out, "")


def test_more_nodes_than_the_partition_is_refused_before_sbatch(monkeypatch, tmp_path):
    from ditforge.cluster import slurm
    from ditforge.cluster.jobs import SubmitError

    # sinfo prints one line per partition and node state; the default partition carries a '*'
    fake = FakeSlurm("debug* 1\ndebug* 1\ngpu 4\n")
    monkeypatch.setattr(slurm, "_slurm", fake)
    with pytest.raises(SubmitError, match=r"^cluster 'x': nodes: 3, but partition debug has 2 nodes$"):
        slurm.sbatch(SlurmCluster(name="x", nodes=3), tmp_path / "job.sh")
    assert not any(c[0] == "sbatch" for c in fake.calls)
    assert slurm.sbatch(SlurmCluster(name="x", nodes=3, partition="gpu"), tmp_path / "job.sh") == "42"


def test_a_reason_that_never_clears_cancels_and_fails_in_one_line(monkeypatch, tmp_path):
    from ditforge.cluster import slurm
    from ditforge.cluster.jobs import SubmitError

    fake = FakeSlurm("debug* 2\n", squeue="PENDING|InvalidQOS")
    monkeypatch.setattr(slurm, "_slurm", fake)
    with pytest.raises(SubmitError, match=r"Slurm cannot start the allocation .*: InvalidQOS; job 42 cancelled"):
        slurm.wait_for_head(SlurmCluster(name="x"), tmp_path, "42", timeout=30)
    assert ("scancel", "42") in fake.calls


def test_set_cluster_fields_go_to_the_cluster_spec():
    from ditforge.cli.common import load_specs

    job, cl = load_specs(
        REPO / "jobs" / "demo-image.yaml",
        REPO / "cluster" / "slurm.yaml",
        ["cluster.mode=job", "cluster.nodes=4", "train.steps=70"],
    )
    assert (cl.mode, cl.nodes, job.train.steps) == ("job", 4, 70)
