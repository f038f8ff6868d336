"""Elastic jobs (resources.min_workers): what the spec turns into, without a cluster. The world-size
change itself is tested at the checkpoint level in test_reshard.py and through `submit` in
test_train_e2e.py::test_resume_at_another_world_size_through_submit."""

from __future__ import annotations

import pytest

from ditforge.cluster.capacity import shortfall
from ditforge.spec import JobSpec, ResourcesSpec
from ditforge.runs.driver import scaling_config

ELASTIC = {
    "name": "e",
    "data": {"train": "s3://ditforge/x"},
    "train": {"max_failures": 3},
    "resources": {"workers": 4, "min_workers": 2, "resize_interval_s": 15},
}


def test_min_workers_makes_ray_train_elastic():
    sc = scaling_config(JobSpec.model_validate(ELASTIC))
    assert sc.num_workers == (2, 4) and sc.elastic_resize_monitor_interval_s == 15
    assert (sc.min_workers, sc.max_workers) == (2, 4)
    fixed = scaling_config(JobSpec.model_validate({**ELASTIC, "resources": {"workers": 4, "min_workers": 4}}))
    assert fixed.num_workers == 4  # min_workers == workers: a fixed-size job


def test_an_elastic_job_fits_when_min_workers_fit():
    res = ResourcesSpec(workers=4, min_workers=2)
    assert shortfall(res, [{"CPU": 1}, {"CPU": 1}]) is None
    assert "2 workers" in shortfall(res, [{"CPU": 1}])
    assert "4 workers" in shortfall(ResourcesSpec(workers=4), [{"CPU": 1}, {"CPU": 1}])


@pytest.mark.parametrize(
    "rule,world,factor", [("none", 1, 1.0), ("linear", 2, 0.5), ("linear", 4, 1.0), ("sqrt", 1, 0.5)]
)
def test_lr_rule(rule, world, factor):
    assert ResourcesSpec(workers=4, min_workers=1, lr_scaling=rule).lr_factor(world) == factor


def test_scale_lr_sets_the_schedule_base_and_the_next_steps_lr():
    import torch

    from ditforge.train.engine import scale_lr

    spec = JobSpec.model_validate(
        {
            **ELASTIC,
            "train": {"max_failures": 1, "lr": 1e-3, "warmup": 10},
            "resources": {"workers": 4, "min_workers": 1, "lr_scaling": "linear"},
        }
    )
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    for _ in range(4):
        opt.step()
        sched.step()

    class Engine:
        lr_scheduler = sched

    scale_lr(Engine(), spec, 2)
    assert sched.base_lrs == [5e-4] and opt.param_groups[0]["lr"] == pytest.approx(5e-4 * 0.5)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4 * 0.6)


def test_batch_policy_global_keeps_the_global_batch_by_accumulation():
    from ditforge.train.batch import plan_batch

    spec = JobSpec.model_validate(
        {
            **ELASTIC,
            "data": {"train": "s3://ditforge/x", "batch_size": 12},
            "resources": {**ELASTIC["resources"], "batch_policy": "global"},
        }
    )
    assert spec.global_batch() == 48  # 12 x 4 workers
    plans = {w: (plan_batch(spec, w).micro, plan_batch(spec, w).accum) for w in (4, 3, 2)}
    assert plans == {4: (12, 1), 3: (8, 2), 2: (12, 2)}  # micro x accum x world == 48, micro <= 12
    per_worker = JobSpec.model_validate({**ELASTIC, "data": {"train": "s3://ditforge/x", "batch_size": 8}})
    assert per_worker.global_batch() is None and plan_batch(per_worker, 2).micro * 2 == 16


@pytest.mark.parametrize(
    "resources,data,why",
    [
        (
            {"workers": 4, "min_workers": 3, "batch_policy": "global"},
            {"batch_size": 8},
            "does not split over 3 workers",
        ),
        ({"workers": 2, "min_workers": 1, "batch_policy": "global", "lr_scaling": "sqrt"}, {}, "lr_scaling: sqrt"),
        ({"workers": 2, "min_workers": 1, "batch_policy": "global"}, {"batch_size": "auto"}, "needs data.global_batch"),
    ],
)
def test_batch_policy_global_bad_input(resources, data, why):
    with pytest.raises(ValueError, match=why):
        JobSpec.model_validate({**ELASTIC, "data": {"train": "s3://ditforge/x", **data}, "resources": resources})
