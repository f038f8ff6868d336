"""Every shipped job spec runs end to end in CI, scaled down only by `--set` overrides of size,
steps, workers, device and data (never by editing the file). Its end-of-run sampling, evaluation,
export and registration run as written, so a shipped spec cannot carry a setting that fails at the
end of a run.

`COVERED` names the test that runs each spec. The VDT video-task spec has an e2e test of its
own (resume, every task sampled); the others run here, the demo spec through `ditforge demo` (what `make demo` runs), whose
data the shapes jobs then reuse. Each gets the smallest data set of the kind it needs, and weights
the test makes: a tiny diffusers AutoencoderKL, an own causal video VAE, a tiny BERT standing in
for T5. Nothing is downloaded.
"""

from __future__ import annotations

import json
import uuid

import pytest
import torch
from mlflow.tracking import MlflowClient

from ditforge import storage
from ditforge.data import ingest
from ditforge.data.encode import encode_dataset, parse_vae
from ditforge.runs.folder import complete_steps

from ..conftest import REPO, run_cli

pytestmark = pytest.mark.slow
JOBS = REPO / "jobs"
COVERED = {
    "demo-image": "tests/e2e/test_jobs_e2e.py::test_demo_command_runs_the_demo_spec_end_to_end (and test_train_e2e.py)",
    "video-dit-s-moving-shapes": "tests/e2e/test_jobs_e2e.py::test_video_dit_s_moving_shapes (with captions)",
    "video-vdt-moving-shapes": "tests/e2e/test_video_e2e.py::test_masked_video_job_resumes_exactly_and_samples_every_task",
    "image-dit-s-shapes": "tests/e2e/test_jobs_e2e.py::test_image_dit_s_shapes",
    "vae-shapes": "tests/e2e/test_jobs_e2e.py::test_vae_shapes",
    "image-dit-xl2-256": "tests/e2e/test_jobs_e2e.py::test_image_dit_xl2_256",
    "video-dit-b-256x16f": "tests/e2e/test_jobs_e2e.py::test_video_dit_b_256x16f",
}
# Scale only: few steps on one CPU worker. The end-of-run work runs as written, with smaller counts.
SMALL = [
    "train.steps=4",
    "train.warmup=1",
    "checkpoint.every_steps=4",
    "tracking.log_every=2",
    "tracking.experiment=tests-jobs",
    "train.resume=never",
    "resources.workers=1",
    "resources.use_gpu=false",
    "resources.cpus_per_worker=1",
    "sample.steps=2",
    "sample.per_class=1",
    "eval.steps=2",
]


def test_every_shipped_spec_has_an_end_to_end_test():
    shipped = sorted(p.stem for p in JOBS.glob("*.yaml"))
    assert shipped == sorted(COVERED), f"specs without an end-to-end test: {sorted(set(shipped) - set(COVERED))}"


@pytest.fixture(scope="module")
def root(embedded):
    return f"s3://ditforge/tests/jobs-{uuid.uuid4().hex[:8]}"


def _submit(job: str, *sets: str) -> dict:
    r = run_cli(
        "submit", str(JOBS / f"{job}.yaml"), "--wait", *[a for s in [*SMALL, *sets] for a in ("--set", s)], timeout=1200
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rec = json.loads((storage.home() / "jobs" / f"{r.stdout.strip().splitlines()[-1]}.json").read_text())
    client = MlflowClient(rec["tracking_uri"])
    run = client.get_run(rec["mlflow_run_id"])
    assert run.info.status == "FINISHED", run.info.status
    return {"rec": rec, "run": run, "client": client}


def _sampled_and_registered(done: dict, steps: int = 4) -> None:
    client, run_id = done["client"], done["rec"]["mlflow_run_id"]
    arts = [a.path for a in client.list_artifacts(run_id, "samples")]
    assert any(a.startswith(f"samples/step_{steps:08d}") for a in arts), arts
    assert done["run"].data.tags["ditforge.model"].startswith("models:/")  # exported and registered


@pytest.fixture(scope="module")
def demo(root):
    """`ditforge demo` on 256 shapes images: it ingests {root}/shapes-pixels and encodes
    {root}/shapes-latents (identity VAE, (12, 16, 16)), the data of the other shapes jobs."""
    sets = [*SMALL, f"data.train={root}/shapes-latents", f"checkpoint.uri={root}/runs", "eval.per_class=2"]
    return run_cli("demo", "--images", "256", "--json", *[a for s in sets for a in ("--set", s)], timeout=1200)


@pytest.fixture(scope="module")
def shapes(root, demo):
    assert demo.returncode == 0, "needs the demo's data: " + demo.stderr[-2000:]
    return root


def test_demo_command_runs_the_demo_spec_end_to_end(demo):
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    result = json.loads(demo.stdout.strip().splitlines()[-1])
    assert result["steps"] == 4 and result["model"].startswith("models:/demo-image/")
    run = MlflowClient(result["tracking_uri"]).get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED" and "validation/class_accuracy" in run.data.metrics


def test_the_demo_run_in_the_mlflow_ui(demo, tmp_path):
    """The link the demo prints, opened in headless Chromium (tests/browser.py): the experiment opens
    in MLflow's model-training view (not GenAI's traces and judges), with the run's parameters, the
    loss, learning-rate and throughput charts first, and the sample grid. Screenshots:
    test-artifacts/mlflow-ui/."""
    from PIL import Image

    from .. import browser

    browser.skip_without_browser()
    assert demo.returncode == 0, demo.stderr[-2000:]
    result = json.loads(demo.stdout.strip().splitlines()[-1])
    client = MlflowClient(result["tracking_uri"])
    run = client.get_run(result["mlflow_run_id"])
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    link = result["mlflow_url"]
    assert link.endswith(f"/runs/{run.info.run_id}?workflowType=machine_learning"), link
    grid = result["samples"].split("/artifacts/", 1)[1]
    with Image.open(client.download_artifacts(run.info.run_id, grid, str(tmp_path))) as im:
        size = im.size
    shots = browser.run_page_checks(link, sorted(run.data.params), grid, size)
    print("screenshots: " + ", ".join(map(str, shots)))


def test_make_demo_runs_the_demo_command():
    import subprocess

    out = subprocess.run(
        ["make", "-n", "--no-print-directory", "demo"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1].endswith("/ditforge demo"), out.stdout


def test_image_dit_s_shapes(shapes):
    done = _submit(
        "image-dit-s-shapes",
        f"data.train={shapes}/shapes-latents",
        f"checkpoint.uri={shapes}/runs",
        "model.size=T",
        "eval.per_class=2",
    )
    _sampled_and_registered(done)
    assert "validation/class_accuracy" in done["run"].data.metrics  # the generated-set evaluation ran


def test_vae_shapes(shapes):
    vae = f"{shapes}/vae"
    _submit(
        "vae-shapes",
        f"data.train={shapes}/shapes-pixels",
        f"vae.path={vae}",
        f"checkpoint.uri={shapes}/runs",
        "vae.base_channels=8",
    )
    assert storage.exists(storage.join(vae, "config.json"))  # a VAE job's result is its vae.path


def test_image_dit_xl2_256(root, data_ray, tmp_path):
    """A diffusers AutoencoderKL with the spec's 8x downsampling and 4 latent channels, 256 px pixels."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=256,
        scaling_factor=0.18215,
    )
    vae.save_pretrained(str(tmp_path / "vae"), safe_serialization=True)
    data = f"{root}/xl2"
    ingest.ingest_shapes(f"{data}-pixels", limit=8, resolution=256, shard_size=8, progress=False)
    encode_dataset(
        f"{data}-pixels",
        f"{data}-latents",
        parse_vae(f"diffusers,path=file://{tmp_path / 'vae'},downsample=8,latent_channels=4"),
        progress=False,
    )
    done = _submit(
        "image-dit-xl2-256",
        f"data.train={data}-latents",
        f"vae.path=file://{tmp_path / 'vae'}",
        f"checkpoint.uri={root}/runs",
        "model.size=T",
        "train.precision=fp32",
        "data.batch_size=4",
        "sample.max_classes=4",
    )
    _sampled_and_registered(done)


def test_video_dit_s_moving_shapes(root, data_ray):
    """32 px, 8-frame moving-shapes clips as written (identity latents (12, 8, 16, 16)), with
    captions (the own text encoder) beside the classes; the end-of-run quality evaluation (the
    3D direction classifier) runs as written, and the samples are viewable GIFs."""
    data = f"{root}/moving-shapes"
    ingest.ingest("moving-shapes", f"{data}-pixels", limit=16, frames=8, resolution=32, shard_size=8, progress=False)
    encode_dataset(f"{data}-pixels", f"{data}-latents", parse_vae("identity,downsample=2"), progress=False)
    done = _submit(
        "video-dit-s-moving-shapes",
        f"data.train={data}-latents",
        f"checkpoint.uri={root}/runs",
        "model.size=T",
        "model.text=own",
        "data.batch_size=4",
        "eval.per_class=1",
    )
    _sampled_and_registered(done)
    run, client = done["run"], done["client"]
    assert "validation/class_accuracy" in run.data.metrics
    assert json.loads(run.data.params["model.latent_shape"].replace("'", '"')) == [12, 8, 16, 16]
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == [2, 4]
    arts = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert any(a.endswith(".gif") for a in arts), arts  # video samples are viewable clips
    assert complete_steps(done["rec"]["run_uri"]) == [4]


def test_video_dit_b_256x16f(root, data_ray, tmp_path):
    """256x256, 16-frame clips through an own causal video VAE (8x, 4x temporal, 8 channels: latents
    (8, 4, 32, 32)), captions through a local `transformers` encoder, every video task sampled."""
    from transformers import BertConfig, BertModel, BertTokenizer

    from ditforge.models.vae import KLAutoencoder, save_own_vae

    torch.manual_seed(0)
    vae = f"{root}/video-vae"
    save_own_vae(
        KLAutoencoder(latent_channels=8, base=8, downsample=8, temporal_downsample=4, video=True),
        vae,
        scale=1.0,
        shift=0.0,
    )
    words = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        "a",
        "red",
        "green",
        "blue",
        "circle",
        "square",
        "triangle",
        "moving",
        "up",
        "down",
        "left",
        "right",
    ]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    enc = tmp_path / "text-encoder"
    BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(enc)
    BertModel(
        BertConfig(
            vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
        )
    ).save_pretrained(enc)
    data = f"{root}/clips-256x16"
    ingest.ingest("moving-shapes", f"{data}-pixels", limit=4, frames=16, resolution=256, shard_size=4, progress=False)
    encode_dataset(
        f"{data}-pixels",
        f"{data}-latents",
        parse_vae(f"own,path={vae},downsample=8,temporal_downsample=4,latent_channels=8"),
        progress=False,
    )
    done = _submit(
        "video-dit-b-256x16f",
        f"data.train={data}-latents",
        f"vae.path={vae}",
        f"model.text_encoder=file://{enc}",
        f"checkpoint.uri={root}/runs",
        "model.size=T",
        "train.precision=fp32",
        "data.batch_size=2",
        "eval.task_clips=1",
        "sample.batch_size=2",
        "eval.batch_size=2",
    )
    _sampled_and_registered(done)
