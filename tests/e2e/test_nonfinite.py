"""NaN/Inf losses through the real stack (submit → Ray Train → DeepSpeed on CPU): a bad step is
skipped (weights and EMA unchanged) and counted; K in a row stop the run with a checkpoint of the
last good weights and a clear message. `train.debug_nan_steps` makes the loss NaN at given steps."""

from __future__ import annotations

import io
import json
import uuid

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from ditforge import storage
from ditforge.runs.folder import complete_steps, join_step
from ditforge.inference.export import export

from ..conftest import REPO, run_cli
from ..datasets import make_latents

pytestmark = pytest.mark.slow
JOB = str(REPO / "jobs" / "demo-image.yaml")


@pytest.fixture(scope="module")
def latents(embedded):
    root = f"s3://ditforge/tests/nan-{uuid.uuid4().hex[:8]}"
    make_latents(f"{root}/latents", [32] * 2, [(12, 16, 16)], noise_seed=0)
    return root


def submit(latents: str, *sets: str) -> tuple[dict, object]:
    args = ["submit", JOB, "--wait"]
    for s in (
        f"data.train={latents}/latents",
        f"checkpoint.uri={latents}/runs",
        "tracking.log_every=1",
        "tracking.experiment=tests",
        "tracking.system_metrics=false",
        "tracking.register_model=false",
        "eval.quality=false",
        "sample.per_class=1",
        "sample.steps=2",
        "train.resume=never",
        "checkpoint.keep_last=20",
        "data.batch_size=8",
        *sets,
    ):
        args += ["--set", s]
    r = run_cli(*args)
    job_id = r.stdout.strip().splitlines()[-1]
    return json.loads((storage.home() / "jobs" / f"{job_id}.json").read_text()), r


def weights(run_uri: str, step: int, tmp_path) -> tuple[dict, dict]:
    out = tmp_path / f"w{step}"
    export(join_step(run_uri, step), f"file://{out}")
    return load_file(str(out / "raw.safetensors")), load_file(str(out / "ema.safetensors"))


def optimizer_state(run_uri: str, step: int) -> dict:
    """Every rank's AdamW moments and step count (ZeRO 1-2 files), flattened to name → tensor."""
    folder, out = join_step(run_uri, step), {}
    for f in sorted(x for x in storage.listdir(folder) if "optim_states" in x):
        # DeepSpeed pickles its optimizer state; this test wrote the file itself moments ago
        sd = torch.load(io.BytesIO(storage.read_bytes(storage.join(folder, f))), weights_only=False)
        for i, st in sd["optimizer_state_dict"]["base_optimizer_state"]["state"].items():
            out.update({f"{f}.{i}.{k}": torch.as_tensor(v) for k, v in st.items()})
    return out


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_isolated_nan_steps_are_skipped_and_counted(latents, tmp_path):
    rec, r = submit(
        latents,
        "train.steps=6",
        "train.warmup=1",
        "checkpoint.every_steps=1",
        "train.debug_nan_steps=[3, 5]",
        "deepspeed.zero_stage=2",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    client = MlflowClient(rec["tracking_uri"])
    assert client.get_run(rec["mlflow_run_id"]).info.status == "FINISHED"
    skipped = {m.step: m.value for m in client.get_metric_history(rec["mlflow_run_id"], "train/skipped_nonfinite")}
    assert skipped == {1: 0, 2: 0, 3: 1, 4: 1, 5: 2, 6: 2}
    loss_steps = sorted(m.step for m in client.get_metric_history(rec["mlflow_run_id"], "train/loss"))
    assert loss_steps == [1, 2, 4, 6]  # a step with only a NaN loss logs no loss
    assert complete_steps(rec["run_uri"]) == [1, 2, 3, 4, 5, 6]
    w = {s: weights(rec["run_uri"], s, tmp_path) for s in (2, 3, 4, 5, 6)}
    for before, after in ((2, 3), (4, 5)):  # skipped: raw and EMA weights bit-identical
        assert same(w[before][0], w[after][0]) and same(w[before][1], w[after][1]), (before, after)
    for before, after in ((3, 4), (5, 6)):  # good steps still train
        assert not same(w[before][0], w[after][0]) and not same(w[before][1], w[after][1]), (before, after)
    assert all(torch.isfinite(t).all() for t in w[6][0].values())
    opt = {s: optimizer_state(rec["run_uri"], s) for s in (2, 3, 4)}
    assert len(opt[2]) >= 6 and same(opt[2], opt[3])  # moments and step count untouched by the skipped step
    assert not same(opt[3], opt[4])


def test_consecutive_nan_steps_stop_the_run_with_the_last_good_weights(latents, tmp_path):
    # ZeRO stage 0: only the fused AdamW's found_inf skips the update here (ZeRO 1-3 also check)
    rec, r = submit(
        latents,
        "train.steps=12",
        "train.warmup=1",
        "checkpoint.every_steps=3",
        "train.debug_nan_steps=[4, 5, 6, 7, 8, 9]",
        "train.max_nonfinite_steps=3",
        "deepspeed.zero_stage=0",
    )
    assert r.returncode == 1, r.stdout + r.stderr
    msg = "the loss was NaN/Inf for 3 consecutive steps up to step 6 (train.max_nonfinite_steps: 3)"
    assert msg in r.stderr
    client = MlflowClient(rec["tracking_uri"])
    run = client.get_run(rec["mlflow_run_id"])
    assert run.info.status == "FAILED"
    assert msg in run.data.tags["ditforge.error"], run.data.tags["ditforge.error"]
    assert complete_steps(rec["run_uri"]) == [3, 6]  # stopped at step 6, with a checkpoint
    (raw3, ema3), (raw6, ema6) = weights(rec["run_uri"], 3, tmp_path), weights(rec["run_uri"], 6, tmp_path)
    assert same(raw3, raw6) and same(ema3, ema6)
    assert max(m.step for m in client.get_metric_history(rec["mlflow_run_id"], "train/step")) == 6
