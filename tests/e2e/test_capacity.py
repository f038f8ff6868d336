"""Resources: the job spec → Ray Train ScalingConfig, and jobs too big for the cluster fail fast."""

from __future__ import annotations

import time
import uuid

import pytest

from ditforge.cluster.capacity import shortfall
from ditforge.spec import ResourcesSpec, load_job
from ditforge.runs.driver import scaling_config

from ..conftest import REPO, run_cli

CPU1 = {"CPU": 1.0, "memory": 1e9}


def test_scaling_config_carries_every_resource_field():
    spec = load_job(
        REPO / "jobs" / "demo-image.yaml",
        [
            "resources.workers=8",
            "resources.use_gpu=true",
            "resources.gpus_per_worker=2",
            "resources.cpus_per_worker=6",
            "resources.placement=SPREAD",
            "resources.accelerator_type=H100",
        ],
    )
    sc = scaling_config(spec)
    assert (sc.num_workers, sc.use_gpu, sc.placement_strategy, sc.accelerator_type) == (8, True, "SPREAD", "H100")
    assert sc.resources_per_worker == {"CPU": 6, "GPU": 2}
    # what Ray Train reserves per worker is what the capacity check counts
    assert sc._resources_per_worker_not_none == spec.resources.per_worker()


@pytest.mark.parametrize(
    "res, nodes, problem",
    [
        (ResourcesSpec(workers=2), [CPU1, CPU1], None),
        (ResourcesSpec(workers=2, placement="STRICT_SPREAD"), [CPU1, CPU1, {}], None),
        (ResourcesSpec(workers=3), [CPU1, CPU1], "= 3 CPU, but the cluster has 2 CPU in all"),
        (ResourcesSpec(workers=2, cpus_per_worker=2), [{"CPU": 3.0}, {"CPU": 1.0}], "only 1 fit: per node [1, 0]"),
        (ResourcesSpec(workers=2, placement="STRICT_SPREAD"), [{"CPU": 4.0}], "only 1 fit"),
        (ResourcesSpec(workers=2, placement="STRICT_PACK"), [CPU1, CPU1], "on one node"),
        (ResourcesSpec(workers=1, use_gpu=True), [{"CPU": 8.0}], "= 1 GPU, but the cluster has 0 GPU"),
        (
            ResourcesSpec(workers=1, use_gpu=True, accelerator_type="H100"),
            [{"CPU": 8.0, "GPU": 8.0, "accelerator_type:A100": 1.0}],
            "H100 GPUs",
        ),
        (
            ResourcesSpec(workers=2, use_gpu=True, accelerator_type="A100"),
            [{"CPU": 8.0, "GPU": 8.0, "accelerator_type:A100": 1.0}],
            None,
        ),
    ],
)
def test_shortfall(res, nodes, problem):
    got = shortfall(res, nodes)
    if problem is None:
        assert got is None
    else:
        assert got is not None and problem in got, got


@pytest.mark.serial  # timed: alone, not beside the other xdist worker's jobs
def test_oversized_job_fails_fast_before_anything_runs(embedded):
    from ditforge.cluster.jobs import all_records

    name = f"oversized-{uuid.uuid4().hex[:6]}"
    t0 = time.time()
    r = run_cli(
        "submit", str(REPO / "jobs" / "demo-image.yaml"), "--set", "resources.workers=64", "--set", f"name={name}"
    )
    took = time.time() - t0
    assert r.returncode == 2, r.stdout + r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {name}: resources: the job needs 64 workers x {{CPU: 1}} = 64 CPU"), line
    assert "cluster 'ditforge', kind embedded" in line
    assert took < 60, took  # no placement-group wait: the check runs before submission
    assert not [rec for rec in all_records() if rec["run_name"].startswith(name)]  # nothing was submitted
