"""What `submit` checks before any Ray job exists: a resume continues a run only with the spec
that defines it (`resume: auto`, `--resume RUN`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ditforge import storage
from ditforge.cluster import launch
from ditforge.spec import load_job, run_digest, spec_changes

from .conftest import REPO

DEMO = REPO / "jobs" / "demo-image.yaml"


def _fake_run(runs: str, spec_dump: dict, step: int = 10) -> str:
    """A run folder with one complete checkpoint holding `spec_dump` as its spec.yaml."""
    name = f"{spec_dump['name']}-20260101-000000-abcd"
    run = storage.join(runs, name)
    storage.write_bytes(storage.join(run, "run.json"), json.dumps({"run_name": name, "mlflow_run_id": "x"}).encode())
    folder = storage.join(run, f"step_{step:08d}")
    storage.write_bytes(storage.join(folder, "spec.yaml"), yaml.safe_dump(spec_dump).encode())
    storage.write_bytes(storage.join(folder, "manifest.json"), b"{}")
    return name


def test_resumable_changes_are_tagged_and_run_defining_ones_refused(tmp_path):
    runs = f"file://{tmp_path}/runs"
    old = launch.resolve_paths(load_job(DEMO, [f"checkpoint.uri={runs}"]))
    name = _fake_run(runs, old.model_dump(mode="json"))
    run_uri = storage.join(runs, name)
    # how long, how fast, where it logs and how often it saves, on how many workers: allowed
    new = launch.resolve_paths(load_job(DEMO, [f"checkpoint.uri={runs}", "train.steps=800", "train.lr=5e-4",
                                               "tracking.log_every=50", "checkpoint.every_steps=100",
                                               "resources.workers=1"]))
    tags = launch.check_resume(new, name, run_uri, [10], "train.resume: auto", "demo.yaml", force=False)
    assert tags == {"ditforge.resume_changed.train.steps": "400 → 800",
                    "ditforge.resume_changed.train.lr": "0.001 → 0.0005",
                    "ditforge.resume_changed.tracking.log_every": "10 → 50",
                    "ditforge.resume_changed.checkpoint.every_steps": "200 → 100",
                    "ditforge.resume_changed.resources.workers": "2 → 1"}
    assert run_digest(new.model_dump(mode="json")) == run_digest(old.model_dump(mode="json"))
    # another model, patch, objective or data set: refused, naming each field and both ways out
    bad = launch.resolve_paths(load_job(DEMO, [f"checkpoint.uri={runs}", "model.size=S", "model.patch=4",
                                               "objective.kind=ddpm", "sample.sampler=ddim",
                                               "data.train=s3://ditforge/data/other", "deepspeed.zero_stage=3"]))
    with pytest.raises(launch.SubmitError) as e:
        launch.check_resume(bad, name, run_uri, [10], "train.resume: auto", "demo.yaml", force=False)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"demo.yaml: train.resume: auto would continue run {name} (step 10)")
    for field in ("model.size (T → S)", "model.patch (2 → 4)", "objective.kind (rectified_flow → ddpm)",
                  "data.train (s3://ditforge/data/shapes-latents → s3://ditforge/data/other)", "deepspeed.zero_stage (2 → 3)"):
        assert field in msg, (field, msg)
    assert "sample.sampler" not in msg  # how it samples does not define the run
    assert "--set train.resume=never" in msg and "--force-resume" in msg
    assert run_digest(bad.model_dump(mode="json")) != run_digest(old.model_dump(mode="json"))
    forced = launch.check_resume(bad, name, run_uri, [10], "--resume", "demo.yaml", force=True)
    assert forced["ditforge.resume_forced"] == "data.train, deepspeed.zero_stage, model.patch, model.size, objective.kind"
    assert forced["ditforge.resume_changed.model.size"] == "T → S"


def test_spec_changes_compare_with_defaults_filled_in():
    base = {"name": "j", "data": {"train": "s3://b/x"}}
    defining, allowed = spec_changes(base, {**base, "model": {"size": "T"}, "train": {"steps": 300}})
    assert defining == {} and allowed == {}  # the defaults, written out, change nothing
    defining, _ = spec_changes(base, {**base, "vae": {"kind": "identity", "downsample": 4}})
    assert defining == {"vae.downsample": (2, 4)}
