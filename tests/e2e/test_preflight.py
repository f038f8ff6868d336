"""What `submit` checks before any Ray job exists: the data set is complete and fits the spec, the
VAE / text encoder / resume source named is there, and a resume continues a run only with the spec
that defines it (`resume: auto`, `--resume RUN`). Each refusal: one line, exit 2, no Ray job."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from ditforge import cli, storage
from ditforge.data import shards
from ditforge.runs import folder
from ditforge.spec import load_job, run_digest, spec_changes

from ..conftest import REPO

DEMO = REPO / "jobs" / "demo-image.yaml"


def _fake_run(runs: str, spec_dump: dict, step: int = 10) -> str:
    """A run folder with one complete checkpoint holding `spec_dump` as its spec.yaml."""
    name = f"{spec_dump['name']}-20260101-000000-abcd"
    run = storage.join(runs, name)
    storage.write_bytes(storage.join(run, "run.json"), json.dumps({"run_name": name, "mlflow_run_id": "x"}).encode())
    step_dir = storage.join(run, f"step_{step:08d}")
    storage.write_bytes(storage.join(step_dir, "spec.yaml"), yaml.safe_dump(spec_dump).encode())
    storage.write_bytes(storage.join(step_dir, "manifest.json"), b"{}")
    return name


def test_resumable_changes_are_tagged_and_run_defining_ones_refused(tmp_path):
    runs = f"file://{tmp_path}/runs"
    old = folder.resolve_paths(load_job(DEMO, [f"checkpoint.uri={runs}"]))
    name = _fake_run(runs, old.model_dump(mode="json"))
    run_uri = storage.join(runs, name)
    # how long, how fast, where it logs and how often it saves, on how many workers: allowed
    new = folder.resolve_paths(
        load_job(
            DEMO,
            [
                f"checkpoint.uri={runs}",
                "train.steps=800",
                "train.lr=5e-4",
                "tracking.log_every=50",
                "checkpoint.every_steps=100",
                "resources.workers=1",
            ],
        )
    )
    tags = folder.check_resume(new, name, run_uri, [10], "train.resume: auto", "demo.yaml", force=False)
    assert tags == {
        "ditforge.resume_changed.train.steps": "400 → 800",
        "ditforge.resume_changed.train.lr": "0.001 → 0.0005",
        "ditforge.resume_changed.tracking.log_every": "10 → 50",
        "ditforge.resume_changed.checkpoint.every_steps": "200 → 100",
        "ditforge.resume_changed.resources.workers": "2 → 1",
    }
    assert run_digest(new.model_dump(mode="json")) == run_digest(old.model_dump(mode="json"))
    # another model, patch, objective or data set: refused, naming each field and both ways out
    bad = folder.resolve_paths(
        load_job(
            DEMO,
            [
                f"checkpoint.uri={runs}",
                "model.size=S",
                "model.patch=4",
                "objective.kind=ddpm",
                "sample.sampler=ddim",
                "data.train=s3://ditforge/data/other",
                "deepspeed.zero_stage=3",
            ],
        )
    )
    with pytest.raises(folder.RunError) as e:
        folder.check_resume(bad, name, run_uri, [10], "train.resume: auto", "demo.yaml", force=False)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"demo.yaml: train.resume: auto would continue run {name} (step 10)")
    for field in (
        "model.size (T → S)",
        "model.patch (2 → 4)",
        "objective.kind (rectified_flow → ddpm)",
        "data.train (s3://ditforge/data/shapes-latents → s3://ditforge/data/other)",
        "deepspeed.zero_stage (2 → 3)",
    ):
        assert field in msg, (field, msg)
    assert "sample.sampler" not in msg  # how it samples does not define the run
    assert "--set train.resume=never" in msg and "--force-resume" in msg
    assert run_digest(bad.model_dump(mode="json")) != run_digest(old.model_dump(mode="json"))
    forced = folder.check_resume(bad, name, run_uri, [10], "--resume", "demo.yaml", force=True)
    assert (
        forced["ditforge.resume_forced"] == "data.train, deepspeed.zero_stage, model.patch, model.size, objective.kind"
    )
    assert forced["ditforge.resume_changed.model.size"] == "T → S"


def test_spec_changes_compare_with_defaults_filled_in():
    base = {"name": "j", "data": {"train": "s3://b/x"}}
    defining, allowed = spec_changes(base, {**base, "model": {"size": "T"}, "train": {"steps": 300}})
    assert defining == {} and allowed == {}  # the defaults, written out, change nothing
    defining, _ = spec_changes(base, {**base, "vae": {"kind": "identity", "downsample": 4}})
    assert defining == {"vae.downsample": (2, 4)}


@pytest.fixture(scope="module")
def tiny_latents(tmp_path_factory):
    """(12, 16, 16) latents, what the demo spec expects, written straight to shards."""
    uri = f"file://{tmp_path_factory.mktemp('latents')}/shapes-latents"
    rng = np.random.default_rng(0)
    entries = [
        shards.write_shard(
            uri,
            shards.shard_name(i),
            [
                {
                    "__key__": f"{i}-{k}",
                    "latent.npy": shards.npy_bytes(rng.standard_normal((12, 16, 16), np.float32)),
                    "cls": str(k % 10),
                }
                for k in range(8)
            ],
            bucket="12x16x16",
            shape=[12, 16, 16],
        )
        for i in range(2)
    ]
    shards.write_manifest(
        uri,
        {"kind": "latents", "latent_shape": [12, 16, 16], "classes": [str(c) for c in range(10)], "shards": entries},
    )
    return uri


def _refused(capsys, job, *sets: str, args: tuple = ()) -> str:
    """`ditforge submit` in-process: exit 2, one `error:` line, no job submitted."""
    before = set((storage.home() / "jobs").glob("*.json"))
    with pytest.raises(SystemExit) as e:
        cli.main(["submit", str(job), *args, *[a for s in sets for a in ("--set", s)]])
    got = capsys.readouterr()
    lines = [ln for ln in got.err.splitlines() if ln.strip()]
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (e.value.code, got.err)
    assert set((storage.home() / "jobs").glob("*.json")) == before  # nothing reached Ray
    return lines[0]


def test_submit_refuses_what_would_fail_in_the_workers(embedded, tiny_latents, tmp_path, capsys):
    video = REPO / "jobs" / "video-dit-s-moving-shapes.yaml"
    # a generated set not made yet: the line names the field and the commands that make it
    line = _refused(capsys, video, f"data.train=file://{tmp_path}/data/moving-shapes-latents")
    assert "video-dit-s-moving-shapes.yaml: data.train:" in line and "no manifest.json" in line, line
    assert (
        f"ditforge data ingest moving-shapes --out file://{tmp_path}/data/moving-shapes-pixels --limit 1024 "
        f"--resolution 32 --frames 8 && ditforge data encode file://{tmp_path}/data/moving-shapes-pixels "
        f"--vae {video} --out file://{tmp_path}/data/moving-shapes-latents"
    ) in line, line
    # image latents for a video job, latents of another resolution, a pixel set for a DiT job
    line = _refused(capsys, video, f"data.train={tiny_latents}")
    assert "data.train: its latents are [12, 16, 16]" in line and "expects [12, 8, 16, 16]" in line, line
    line = _refused(capsys, DEMO, f"data.train={tiny_latents}", "data.resolution=64")
    assert "expects [12, 32, 32]" in line and "data.resolution" in line, line
    # more classes in the data than the model has labels for
    line = _refused(capsys, DEMO, f"data.train={tiny_latents}", "model.num_classes=4")
    assert "model.num_classes: 4, but" in line and "10 classes" in line, line
    # a VAE, text encoder or resume source that is not there
    line = _refused(capsys, DEMO, f"data.train={tiny_latents}", "vae.kind=own", f"vae.path=file://{tmp_path}/no-vae")
    assert "demo-image.yaml: vae.path: no trained autoencoder" in line, line
    line = _refused(
        capsys, DEMO, f"data.train={tiny_latents}", "model.text=transformers", f"model.text_encoder={tmp_path}/no-t5"
    )
    assert "model.text_encoder:" in line and "no-t5" in line, line
    line = _refused(capsys, DEMO, f"data.train={tiny_latents}", f"train.resume=file://{tmp_path}/runs/r/step_00000010")
    assert "train.resume:" in line and "incomplete checkpoint" in line, line


def test_submit_refuses_to_continue_a_run_with_another_model(embedded, tiny_latents, tmp_path, capsys):
    runs = f"file://{tmp_path}/runs"
    spec = folder.resolve_paths(load_job(DEMO, [f"data.train={tiny_latents}", f"checkpoint.uri={runs}"]))
    name = _fake_run(runs, spec.model_dump(mode="json"))
    line = _refused(capsys, DEMO, f"data.train={tiny_latents}", f"checkpoint.uri={runs}", "model.size=S")
    assert f"train.resume: auto would continue run {name} (step 10)" in line and "model.size (T → S)" in line, line
    line = _refused(
        capsys, DEMO, f"data.train={tiny_latents}", f"checkpoint.uri={runs}", "model.patch=4", args=("--resume", name)
    )
    assert f"--resume would continue run {name}" in line and "model.patch (2 → 4)" in line, line


@pytest.mark.parametrize("job", sorted(p.name for p in (REPO / "jobs").glob("*.yaml")))
def test_each_shipped_spec_names_the_commands_that_make_its_data(job):
    from ditforge.cluster.preflight import data_commands

    path = f"jobs/{job}"
    header = "".join(ln for ln in (REPO / path).read_text().splitlines(keepends=True) if ln.startswith("#"))
    for command in data_commands(load_job(REPO / path), path):
        assert f"#   {command}\n" in header, (job, command)
