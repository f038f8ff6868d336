"""End to end through the real stack: `ditforge submit` → Ray Jobs → Ray Train (2 workers) →
DeepSpeed ZeRO on CPU/gloo → latents from webdataset shards on S3 → MLflow + S3 checkpoints."""

from __future__ import annotations

import json
import uuid

import pytest
from mlflow.tracking import MlflowClient

from ditforge import storage
from ditforge.data.encode import encode_dataset
from ditforge.data.ingest import ingest_shapes
from ditforge.models.vae import IdentityVAE
from ditforge.runs.folder import MANIFEST, complete_steps

from ..conftest import REPO, run_cli

pytestmark = pytest.mark.slow
JOB = str(REPO / "jobs" / "demo-image.yaml")


@pytest.fixture(scope="module")
def latents(embedded, data_ray):
    root = f"s3://ditforge/tests/e2e-{uuid.uuid4().hex[:8]}"
    ingest_shapes(f"{root}/pixels", limit=512, resolution=32, shard_size=64, progress=False)
    encode_dataset(f"{root}/pixels", f"{root}/latents", IdentityVAE(2), progress=False)
    return root


# For runs whose checkpoints and losses are the subject: no model registered, no system metrics, the
# smallest sample grid.
LEAN = ("tracking.register_model=false", "tracking.system_metrics=false", "sample.per_class=1")


def submit(latents: str, *sets: str, resume: str | None = None) -> dict:
    """Submit with --wait; return the job record written by submit."""
    args = [
        "submit",
        JOB,
        "--wait",
        "--set",
        f"data.train={latents}/latents",
        "--set",
        f"checkpoint.uri={latents}/runs",
        "--set",
        "tracking.log_every=1",
        "--set",
        "tracking.experiment=tests",
        "--set",
        "sample.per_class=2",
        "--set",
        "sample.steps=4",
        "--set",
        "tracking.system_metrics=true",
        "--set",
        "eval.quality=false",
    ]  # the quality metric has its own test (test_quality.py)
    if not any(x.startswith("train.resume=") for x in sets):
        args += ["--set", "train.resume=never"]  # tests choose their resume explicitly
    for s in sets:
        args += ["--set", s]
    if resume:
        args += ["--resume", resume]
    r = run_cli(*args)
    assert r.returncode == 0, r.stdout + r.stderr
    job_id = r.stdout.strip().splitlines()[-1]
    rec = json.loads((storage.home() / "jobs" / f"{job_id}.json").read_text())
    return rec


def losses(rec: dict) -> dict[int, float]:
    hist = MlflowClient(rec["tracking_uri"]).get_metric_history(rec["mlflow_run_id"], "train/loss")
    return {m.step: m.value for m in hist}


@pytest.fixture(scope="module")
def zero2_run(latents):
    return submit(latents, "train.steps=20", "train.warmup=2", "checkpoint.every_steps=10", "deepspeed.zero_stage=2")


def test_zero2_run_logs_to_one_mlflow_run_and_checkpoints_to_s3(zero2_run):
    rec = zero2_run
    client = MlflowClient(rec["tracking_uri"])
    run = client.get_run(rec["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    # one MLflow run per job, not per worker
    runs = client.search_runs(
        [run.info.experiment_id],
        filter_string=f"tags.ditforge.job = 'demo-image' and attributes.run_name = '{rec['run_name']}'",
    )
    assert len(runs) == 1
    assert run.data.params["deepspeed.zero_stage"] == "2" and run.data.params["world_size"] == "2"
    for key in ("train/loss", "train/lr", "train/samples_per_s", "train/step_s"):
        assert len(client.get_metric_history(rec["mlflow_run_id"], key)) == 20, key
    loss = losses(rec)
    first, last = sum(loss[s] for s in range(1, 6)) / 5, sum(loss[s] for s in range(16, 21)) / 5
    assert last < 0.9 * first, loss
    arts = {a.path for a in client.list_artifacts(rec["mlflow_run_id"], "samples")}
    assert "samples/step_00000020.png" in arts
    for key in ("train_checkpoint/upload_s", "train_checkpoint/MBps", "train_checkpoint/stall_s"):
        assert [m.step for m in client.get_metric_history(rec["mlflow_run_id"], key)] == [10, 20], key
    assert any(k.startswith("system/cpu") for k in run.data.metrics), sorted(run.data.metrics)
    assert {a.path for a in client.list_artifacts(rec["mlflow_run_id"], "spec")} >= {"spec/job.resolved.yaml"}
    # checkpoints: complete (manifest last, every listed file present with its size) on S3
    assert complete_steps(rec["run_uri"]) == [10, 20]
    manifest = json.loads(storage.read_bytes(storage.join(rec["run_uri"], "step_00000020", MANIFEST)))
    assert manifest["world_size"] == 2
    fs, root = storage.filesystem(storage.join(rec["run_uri"], "step_00000020"))
    for rel, meta in manifest["files"].items():
        assert fs.size(f"{root}/{rel}") == meta["bytes"], rel
    assert any("optim_states" in f for f in manifest["files"])
    assert {m["rank"] for m in manifest["files"].values()} == {0, 1}  # each rank uploaded its own shard


def test_auto_resume_skips_incomplete_checkpoint_and_continues_exactly(latents, zero2_run):
    """A run stopped at step 10 with a half-written step 15 folder: `resume: auto` finds the run,
    skips the incomplete folder, and steps 11..20 match the uninterrupted run exactly (optimizer,
    LR schedule, data position and randomness all restored)."""
    runs = f"checkpoint.uri={latents}/runs-auto"  # only this test's runs are candidates for `auto`
    short = submit(latents, "train.steps=10", "train.warmup=2", "checkpoint.every_steps=10", runs, *LEAN)
    assert complete_steps(short["run_uri"]) == [10]
    storage.write_bytes(storage.join(short["run_uri"], "step_00000015", "mp_rank_00_model_states.pt"), b"partial")
    resumed = submit(
        latents, "train.steps=20", "train.warmup=2", "checkpoint.every_steps=10", "train.resume=auto", runs, *LEAN
    )
    assert resumed["run_name"] == short["run_name"]
    client = MlflowClient(resumed["tracking_uri"])
    child = client.get_run(resumed["mlflow_run_id"])
    assert child.data.tags["mlflow.parentRunId"] == short["mlflow_run_id"]  # nested under the first attempt
    assert child.data.tags["ditforge.resumed_from"].endswith("step_00000010")
    assert child.data.tags["ditforge.resume_changed.train.steps"] == "10 → 20"  # allowed, and recorded
    full, part = losses(zero2_run), losses(resumed)
    assert sorted(part) == list(range(11, 21))
    for step in range(11, 21):
        assert part[step] == pytest.approx(full[step], rel=1e-6, abs=1e-7), (step, part[step], full[step])
    # the incomplete folder is gone now that newer checkpoints are complete
    assert complete_steps(resumed["run_uri"]) == [10, 20]
    assert "step_00000015" not in storage.listdir(resumed["run_uri"])


def test_resume_at_another_world_size_through_submit(latents, zero2_run):
    """The 2-worker ZeRO-2 run's step-10 checkpoint resumed by one worker through `submit`
    (`train.resume=<step>`, `resources.workers=1`): DeepSpeed's universal checkpoint reshards it,
    the step counter goes on from 10, and the run records the change. (Exactness of the weights and
    optimizer moments across sizes: tests/e2e/test_reshard.py, on the same loops without Ray.)"""
    import math

    from ditforge.cluster.jobs import jobs_client
    from ditforge.runs.folder import join_step

    step10 = join_step(zero2_run["run_uri"], 10)
    rec = submit(
        latents,
        "train.steps=12",
        "train.warmup=2",
        "checkpoint.every_steps=10",
        "deepspeed.zero_stage=2",
        f"train.resume={step10}",
        "resources.workers=1",
        f"checkpoint.uri={latents}/runs-resized",
        *LEAN,
    )
    run = MlflowClient(rec["tracking_uri"]).get_run(rec["mlflow_run_id"])
    assert run.data.tags["ditforge.resumed_from"] == step10
    assert run.data.tags["ditforge.world_sizes"] == "0:2,10:1" and run.data.params["world_size"] == "1"
    loss = losses(rec)
    assert sorted(loss) == [11, 12] and all(math.isfinite(v) for v in loss.values()), loss
    logs = jobs_client(rec["dashboard"]).get_job_logs(rec["job_id"])
    assert f"resharded {step10} from 2 to 1 workers (ZeRO-2, universal checkpoint" in logs, logs[-3000:]
    assert "world size 2 -> 1 at step 10" in logs
    assert complete_steps(rec["run_uri"]) == [12]


def test_registered_model_samples_and_exports(zero2_run, tmp_path):
    client = MlflowClient(zero2_run["tracking_uri"])
    model_uri = client.get_run(zero2_run["mlflow_run_id"]).data.tags["ditforge.model"]
    name, version = model_uri.split("/")[1:]
    mv = client.get_model_version(name, version)
    assert mv.tags["checkpoint_uri"].endswith("step_00000020") and mv.run_id == zero2_run["mlflow_run_id"]
    png = tmp_path / "grid.png"
    r = run_cli("sample", "--model", model_uri, "--out", str(png), "--per-class", "3", "--steps", "3")
    assert r.returncode == 0, r.stderr
    from PIL import Image

    assert Image.open(png).size == (3 * 66 + 2, 10 * 66 + 2)  # 10 classes x 3, 32px upscaled 2x, 2px gaps
    r = run_cli("export", zero2_run["run_uri"], "--out", f"file://{tmp_path}/exp")
    assert r.returncode == 0, r.stderr
    from safetensors.torch import load_file

    raw = load_file(str(tmp_path / "exp" / "raw.safetensors"))
    assert "blocks.0.attn.qkv.weight" in raw and json.loads((tmp_path / "exp" / "model.json").read_text())["step"] == 20


def test_zero3_two_workers(latents, tmp_path):
    # Also `data.batch_size: auto` on CPU workers (its fallback) with gradient accumulation: the
    # demo's 32 samples per worker per step as 2 micro-batches of 16.
    rec = submit(
        latents,
        "train.steps=6",
        "train.warmup=1",
        "checkpoint.every_steps=3",
        "deepspeed.zero_stage=3",
        "data.batch_size=auto",
        "data.auto_batch.fallback=16",
        "data.global_batch=64",
        *LEAN,
    )
    tags = MlflowClient(rec["tracking_uri"]).get_run(rec["mlflow_run_id"]).data.tags
    assert (tags["ditforge.batch.micro"], tags["ditforge.batch.accum"], tags["ditforge.batch.source"]) == (
        "16",
        "2",
        "fallback",
    )
    assert complete_steps(rec["run_uri"]) == [3, 6]
    manifest = json.loads(storage.read_bytes(storage.join(rec["run_uri"], "step_00000006", MANIFEST)))
    # ZeRO-3 partitions parameters: every rank writes its own model-state shard
    assert sum("model_states" in f for f in manifest["files"]) == 2
    assert len(losses(rec)) == 6
    # consolidation from ZeRO-3 shards gives the full weights
    from ditforge.inference.export import export

    out = f"file://{tmp_path}/z3"
    export(rec["run_uri"], out)
    from safetensors.torch import load_file

    raw = load_file(f"{tmp_path}/z3/raw.safetensors")
    assert raw["blocks.0.attn.qkv.weight"].shape == (384, 128)


def test_resume_of_unknown_run_is_one_line(latents):
    r = run_cli(
        "submit",
        JOB,
        "--set",
        f"data.train={latents}/latents",
        "--set",
        f"checkpoint.uri={latents}/runs",
        "--resume",
        "no-such-run",
    )
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: --resume no-such-run: no run named 'no-such-run' under {latents}/runs"


def test_trained_model_is_a_pyfunc_and_exports_to_diffusers(zero2_run, tmp_path, monkeypatch):
    """The driver registered an MLflow pyfunc model; `export --format diffusers` of the same run
    gives a DiTPipeline folder whose transformer computes what ditforge's model computes."""
    import mlflow
    import pandas
    import torch
    from diffusers import DiTPipeline, FlowMatchEulerDiscreteScheduler

    from ditforge.inference.export import load_model

    client = MlflowClient(zero2_run["tracking_uri"])
    model_uri = client.get_run(zero2_run["mlflow_run_id"]).data.tags["ditforge.model"]
    # for this test only (an xdist worker runs other files after it): the environment, not mlflow's global
    monkeypatch.setenv("MLFLOW_TRACKING_URI", zero2_run["tracking_uri"])
    m = mlflow.pyfunc.load_model(model_uri)
    images = m.predict(pandas.DataFrame({"class": [3, 7], "seed": [0, 1]}), params={"steps": 2})
    assert images.dtype == "uint8" and images.shape == (2, 32, 32, 3)

    out = tmp_path / "diffusers"
    r = run_cli("export", zero2_run["run_uri"], "--format", "diffusers", "--out", f"file://{out}")
    assert r.returncode == 0, r.stderr
    assert "FlowMatchEulerDiscreteScheduler" in r.stdout and "no vae/" in r.stdout
    pipe = DiTPipeline.from_pretrained(str(out), local_files_only=True, vae=None)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    r = run_cli("export", zero2_run["run_uri"], "--out", f"file://{tmp_path}/exp")
    assert r.returncode == 0, r.stderr
    ours, _ = load_model(tmp_path / "exp")
    g = torch.Generator().manual_seed(0)
    x, sigma, y = torch.randn(2, 12, 16, 16, generator=g), torch.tensor([0.3, 0.9]), torch.tensor([3, 7])
    with torch.no_grad():
        torch.testing.assert_close(
            ours(x, sigma, y), pipe.transformer(x, timestep=sigma * 1000, class_labels=y).sample, atol=1e-5, rtol=0
        )


def test_register_redoes_a_failed_registration(zero2_run):
    """README "the driver's final calls": after a registration failed at the end of a run (the run
    left FAILED with its error as a tag), `ditforge register RUN_URI` registers the newest complete
    checkpoint as a new version and ends the run FINISHED."""
    client = MlflowClient(zero2_run["tracking_uri"])
    run_id = zero2_run["mlflow_run_id"]
    before = client.get_run(run_id).data.tags["ditforge.model"]
    name, version = before.split("/")[1:]
    client.set_tag(run_id, "ditforge.error", "registration failed: 503 Service Unavailable")
    client.set_terminated(run_id, "FAILED")
    r = run_cli("register", zero2_run["run_uri"], "--tracking-uri", zero2_run["tracking_uri"])
    assert r.returncode == 0, r.stdout + r.stderr
    run = client.get_run(run_id)
    after = run.data.tags["ditforge.model"]
    assert after.split("/")[1] == name and int(after.split("/")[2]) > int(version), (before, after)
    assert after in r.stdout and run.info.status == "FINISHED" and "ditforge.error" not in run.data.tags
    mv = client.get_model_version(name, after.split("/")[2])
    assert mv.tags["checkpoint_uri"].endswith("step_00000020") and mv.run_id == run_id


def test_lora_fine_tunes_an_exported_model_through_submit(latents, zero2_run, tmp_path):
    """Bring your own model and take it with you: the ZeRO-2 run exported as a diffusers folder is
    the frozen base of a LoRA job (`train.lora`, 2 workers, ZeRO-2); its checkpoints hold the
    adapters alone, the driver registers the merged model, and `ditforge export` writes the merged
    weights and the adapter in peft's layout (diffusers' names beside `--format diffusers`)."""
    base = tmp_path / "base"
    r = run_cli("export", zero2_run["run_uri"], "--format", "diffusers", "--out", f"file://{base}")
    assert r.returncode == 0, r.stderr
    rec = submit(
        latents,
        "train.steps=4",
        "train.warmup=1",
        "checkpoint.every_steps=4",
        f"model.init_from={base}",
        "train.lora.rank=4",
        f"checkpoint.uri={latents}/runs-lora",
        "sample.per_class=1",
        "tracking.system_metrics=false",
    )
    client = MlflowClient(rec["tracking_uri"])
    run = client.get_run(rec["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["ditforge.model"].startswith("models:/")
    trainable, total = int(run.data.params["model.trainable_params"]), int(run.data.params["model.params"])
    assert 0 < trainable < total / 10, (trainable, total)
    assert sorted(losses(rec)) == [1, 2, 3, 4]
    manifest = json.loads(storage.read_bytes(storage.join(rec["run_uri"], "step_00000004", MANIFEST)))
    assert manifest["adapters_only"] is True
    r = run_cli("export", rec["run_uri"], "--out", f"file://{tmp_path}/exp")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "exp" / "adapter" / "adapter_model.safetensors").exists()
    assert json.loads((tmp_path / "exp" / "model.json").read_text())["lora"]["base"] == str(base)
    r = run_cli("export", rec["run_uri"], "--format", "diffusers", "--out", f"file://{tmp_path}/diff")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "diff" / "transformer_lora" / "adapter_config.json").exists(), r.stdout
