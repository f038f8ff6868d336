"""Process failures with nothing lost: a worker SIGKILLed mid-run (Ray Train restarts the worker
group, `train.max_failures`) and the job's driver SIGKILLed (the job is submitted again with
`resume: auto`). Both runs must end with raw and EMA weights bit-identical to an uninterrupted run
with the same seed: a failure costs the steps since the last checkpoint, in time only.

The pids come from `<run>/_procs/{driver,rank_N}.json`, which the driver and each worker write
when they (re)start.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
import uuid

import pytest
import torch
from safetensors.torch import load_file

from ditforge import storage
from ditforge.cluster.jobs import jobs_client
from ditforge.runs.folder import complete_steps, read_process
from ditforge.inference.export import export

from ..conftest import REPO, run_cli
from ..datasets import make_latents

pytestmark = [pytest.mark.slow, pytest.mark.fault]
STEPS, EVERY = 30, 10


@pytest.fixture(scope="module")
def base(embedded, tmp_path_factory):
    """Tiny data on local disk (the faults here are processes, not storage); runs on S3."""
    root = tmp_path_factory.mktemp("restart")
    data = f"file://{root}/data"
    make_latents(f"{data}/latents", [32] * 4, [(12, 8, 8)], noise_seed=0)
    return {"data": f"{data}/latents", "runs": f"s3://ditforge/tests/restart-{uuid.uuid4().hex[:8]}", "tmp": root}


def submit(base: dict, name: str, *extra: str, wait: bool = False) -> dict:
    sets = [
        f"data.train={base['data']}",
        "data.batch_size=16",
        "data.resolution=16",
        f"checkpoint.uri={base['runs']}/{name}",
        f"train.steps={STEPS}",
        "train.warmup=2",
        f"checkpoint.every_steps={EVERY}",
        "checkpoint.keep_last=10",
        "train.max_failures=1",
        "tracking.log_every=5",
        "tracking.experiment=tests",
        "tracking.system_metrics=false",
        "tracking.register_model=false",
        "eval.quality=false",
        "sample.per_class=1",
        "sample.steps=2",
        *extra,
    ]
    args = ["submit", str(REPO / "jobs" / "demo-image.yaml"), *(["--wait"] if wait else [])]
    for s in sets:
        args += ["--set", s]
    r = run_cli(*args)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads((storage.home() / "jobs" / f"{r.stdout.strip().splitlines()[-1]}.json").read_text())


def final_weights(rec: dict, out) -> dict[str, dict[str, torch.Tensor]]:
    export(rec["run_uri"], f"file://{out}")
    return {f: load_file(str(out / f)) for f in ("raw.safetensors", "ema.safetensors")}


def assert_bit_identical(got: dict, want: dict) -> None:
    for f in want:
        assert got[f].keys() == want[f].keys(), f
        diff = [k for k in want[f] if not torch.equal(got[f][k], want[f][k])]
        assert not diff, f"{f}: {len(diff)} tensors differ from the uninterrupted run, e.g. {diff[:3]}"


def pid_of(rec: dict, name: str, newer_than: float = 0.0, timeout: float = 300) -> int:
    """The pid a process of this run recorded in _procs/, once one started after `newer_than`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            info = read_process(rec["run_uri"], name)
            if info["started"] > newer_than:
                return info["pid"]
        except (FileNotFoundError, storage.StorageUnavailable):  # not yet; or another test's S3 outage
            pass
        time.sleep(0.5)
    raise AssertionError(f"{name} of {rec['run_name']} never recorded its pid")


def wait_for_checkpoint(rec: dict, timeout: float = 300) -> int:
    """Block until the run has a complete checkpoint; return the newest one's step."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            done = complete_steps(rec["run_uri"])
        except storage.StorageUnavailable:  # another test's S3 outage: look again
            done = []
        if done:
            return done[-1]
        time.sleep(0.2)
    raise AssertionError(f"{rec['run_name']}: no complete checkpoint in {timeout}s")


def wait_for_job(rec: dict, timeout: float = 600) -> tuple[str, str]:
    client, deadline = jobs_client(rec["dashboard"]), time.time() + timeout
    while time.time() < deadline:
        state = str(client.get_job_status(rec["job_id"]).value)
        if state in ("SUCCEEDED", "FAILED", "STOPPED"):
            return state, client.get_job_logs(rec["job_id"])
        time.sleep(1)
    raise AssertionError(f"job {rec['job_id']} did not end in {timeout}s")


def resumed_steps(logs: str) -> list[int]:
    """Steps rank 0 resumed from, one per (re)start (Ray's job log may repeat a line)."""
    return sorted({int(s) for s in re.findall(r"\[rank 0\] resumed from \S+ at step (\d+)", logs)})


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture(scope="module")
def reference(base):
    rec = submit(base, "reference", "train.resume=never", wait=True)
    return final_weights(rec, base["tmp"] / "reference")


def test_worker_sigkill_restarts_from_newest_checkpoint_bit_identical(base, reference):
    rec = submit(base, "worker-kill", "train.resume=never")
    pid = pid_of(rec, "rank_1")
    before = wait_for_checkpoint(rec)
    os.kill(pid, signal.SIGKILL)  # mid-run: one checkpoint is complete, the next not yet
    state, logs = wait_for_job(rec)
    assert state == "SUCCEEDED", logs[-3000:]
    resumed = resumed_steps(logs)
    # one restart (max_failures=1), from the newest complete checkpoint: not older than the one
    # complete before the kill (a newer one may have completed as the kill landed)
    assert len(resumed) == 1 and before <= resumed[0] < STEPS and resumed[0] % EVERY == 0, (before, resumed)
    assert complete_steps(rec["run_uri"])[-1] == STEPS
    assert_bit_identical(final_weights(rec, base["tmp"] / "worker-kill"), reference)


def test_driver_sigkill_then_resubmit_auto_bit_identical(base, reference):
    first = submit(base, "driver-kill", "train.resume=never")
    driver = pid_of(first, "driver")
    workers = [pid_of(first, f"rank_{r}") for r in range(2)]
    before = wait_for_checkpoint(first)
    os.kill(driver, signal.SIGKILL)
    state, _ = wait_for_job(first, timeout=120)
    assert state == "FAILED"
    # Ray ends the driver's Train controller and, with it, the workers: none may write on.
    deadline = time.time() + 60
    while not all(gone(p) for p in workers) and time.time() < deadline:
        time.sleep(0.5)
    assert all(gone(p) for p in workers), "workers outlived their driver"
    left = complete_steps(first["run_uri"])[-1]
    assert before <= left < STEPS

    again = submit(base, "driver-kill", "train.resume=auto")
    assert again["run_name"] == first["run_name"]  # auto found the unfinished run
    state, logs = wait_for_job(again)
    assert state == "SUCCEEDED", logs[-3000:]
    assert resumed_steps(logs) == [left]
    assert_bit_identical(final_weights(again, base["tmp"] / "driver-kill"), reference)
