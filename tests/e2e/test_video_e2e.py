"""The VDT mask-modeling video job end to end: moving-shapes clips → (C, T, h, w) latents on S3 →
the video DiT trained on the task mixture, with shapes images mixed in as one-frame clips
(`data.mix`, joint image-video training) → per-task metrics and GIFs, `ditforge sample --task`
from the registered model, and an exact resume. (The plain video job, with captions, is
tests/e2e/test_jobs_e2e.py::test_video_dit_s_moving_shapes.)"""

from __future__ import annotations

import json
import uuid

import pytest
from mlflow.tracking import MlflowClient

from ditforge import storage
from ditforge.data import ingest
from ditforge.data.encode import encode_dataset, parse_vae

from ..conftest import REPO, run_cli

pytestmark = pytest.mark.slow


TASKS_SAMPLED = ("predict", "predict_backward", "interpolate", "image_to_video", "complete")


def test_masked_video_job_resumes_exactly_and_samples_every_task(embedded, data_ray, tmp_path, capsys):
    """jobs/video-vdt-moving-shapes.yaml, shortened, with an image set mixed in (`data.mix`, weight
    0.5: with seed 0 steps 1 and 5 draw the images, 2-4 and 6 the clips): every task in the
    mixture, per-task metrics and GIFs in MLflow, each set's steps and loss, the registered model
    samples each task through `ditforge sample --task`, and a second run started from the middle
    checkpoint ends with bit-identical weights (the masks come from the step's generator, the set
    from the batch's number, each set's loader position from the checkpoint)."""
    import numpy as np
    import torch
    from safetensors.torch import load_file

    from ditforge import cli
    from ditforge.data import synthetic
    from ditforge.runs.folder import join_step
    from ditforge.inference.export import export

    root = f"s3://ditforge/tests/vdt-{uuid.uuid4().hex[:8]}"
    ingest.ingest("moving-shapes", f"{root}/pixels", limit=32, frames=4, resolution=16, shard_size=8, progress=False)
    encode_dataset(f"{root}/pixels", f"{root}/latents", parse_vae("identity"), progress=False)
    ingest.ingest("shapes", f"{root}/image-pixels", limit=32, resolution=16, shard_size=8, progress=False)
    encode_dataset(f"{root}/image-pixels", f"{root}/image-latents", parse_vae("identity"), progress=False)
    sets = [
        f"data.train={root}/latents",
        f"data.mix=[{{train: {root}/image-latents, weight: 0.5, batch_size: 8, labels: drop}}]",
        "data.frames=4",
        "data.batch_size=4",
        "train.steps=6",
        "train.warmup=1",
        "train.video_tasks.k=[1,1]",
        "checkpoint.every_steps=3",
        "tracking.log_every=3",
        "tracking.experiment=tests",
        "tracking.system_metrics=false",
        "sample.per_class=1",
        "sample.steps=2",
        "eval.per_class=1",
        "eval.steps=2",
        "eval.task_clips=4",
    ]  # the evaluation as the spec has it

    # shapes' class ids name shapes, moving-shapes' directions: refused before any Ray job unless dropped
    keep = [x.replace("labels: drop", "labels: keep") for x in sets]
    r = run_cli("submit", str(REPO / "jobs" / "video-vdt-moving-shapes.yaml"), *[a for x in keep for a in ("--set", x)])
    assert r.returncode == 2 and "data.mix.0.labels:" in r.stderr and "labels: drop" in r.stderr, r.stderr

    def submit(*extra):
        args = ["submit", str(REPO / "jobs" / "video-vdt-moving-shapes.yaml"), "--wait"]
        for s in [*sets, *extra]:
            args += ["--set", s]
        r = run_cli(*args)
        assert r.returncode == 0, r.stdout + r.stderr
        return json.loads((storage.home() / "jobs" / f"{r.stdout.strip().splitlines()[-1]}.json").read_text())

    rec = submit(f"checkpoint.uri={root}/runs", "train.resume=never")
    client = MlflowClient(rec["tracking_uri"])
    run = client.get_run(rec["mlflow_run_id"])
    for task in ("predict", "predict_backward", "interpolate", "image_to_video", "any_frames", "complete"):
        for m in ("psnr", "baseline_psnr"):
            assert f"validation/tasks/{task}/{m}" in run.data.metrics, (task, m, sorted(run.data.metrics))
    # each set's steps so far (images: steps 1 and 5) and its loss over the steps it trained
    assert (
        run.data.metrics["train_data/mix/image-latents/steps"] == 2
        and run.data.metrics["train_data/mix/latents/steps"] == 4
    )
    assert {m.step for m in client.get_metric_history(rec["mlflow_run_id"], "train_data/mix/image-latents/loss")} == {
        3,
        6,
    }
    gifs = [a.path for a in client.list_artifacts(rec["mlflow_run_id"], "tasks")]
    assert len([g for g in gifs if g.endswith(".gif")]) == 6, gifs

    model = run.data.tags["ditforge.model"]
    clip, _, _ = synthetic.moving_shapes_video(5, 16, 4, seed=11)
    np.save(tmp_path / "clip.npy", clip)
    for task in TASKS_SAMPLED:
        out = tmp_path / f"{task}.npy"
        with pytest.raises(SystemExit) as e:  # in-process: the CLI's own code path, without a new interpreter
            cli.main(
                [
                    "sample",
                    "--model",
                    model,
                    "--task",
                    task,
                    "--given",
                    str(tmp_path / "clip.npy"),
                    "--out",
                    str(out),
                    "--json",
                ]
            )
        assert e.value.code == 0, capsys.readouterr().err
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["task"] == task
        frames = np.load(out)
        assert frames.shape == (4, 16, 16, 3)
        if task != "complete":
            first = {"predict_backward": 3}.get(task, 0)  # a given frame of each task comes back as given
            assert np.array_equal(frames[first], clip[first])

    # Resume from the step-3 checkpoint into a new run: the same masks, noise and data order.
    again = submit(
        f"checkpoint.uri={root}/runs-resumed",
        f"train.resume={join_step(rec['run_uri'], 3)}",
        "tracking.register_model=false",
        "eval.tasks=false",  # its end-of-run scores are not the subject: its weights are
    )
    assert client.get_run(again["mlflow_run_id"]).data.metrics["train_data/mix/image-latents/steps"] == 2  # recounted
    got, want = tmp_path / "got", tmp_path / "want"
    export(again["run_uri"], f"file://{got}")
    export(rec["run_uri"], f"file://{want}")
    for f in ("raw.safetensors", "ema.safetensors"):
        a, b = load_file(str(got / f)), load_file(str(want / f))
        assert [k for k in b if not torch.equal(a[k], b[k])] == [], f
