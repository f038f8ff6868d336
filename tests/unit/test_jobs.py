"""The shipped job specs validate, and `ditforge model-info` reports what they cost."""

from __future__ import annotations

import json

from ..conftest import REPO

import pytest

from ditforge.models.info import model_info
from ditforge.spec import SpecError, load_job

JOBS = REPO / "jobs"
NEW = ["image-dit-s-shapes", "video-dit-s-moving-shapes", "vae-shapes", "image-dit-xl2-256", "video-dit-b-256x16f"]


@pytest.mark.parametrize("name", NEW + ["demo-image"])
def test_job_specs_validate(name):
    spec = load_job(JOBS / f"{name}.yaml")
    info = model_info(spec)
    assert info["params"] > 0 and info["gflops_per_sample"] > 0


def test_model_info_figures():
    xl = model_info(load_job(JOBS / "image-dit-xl2-256.yaml"))
    assert xl["latent_shape"] == [4, 32, 32] and xl["tokens"] == 256
    assert xl["params_m"] == pytest.approx(675, rel=0.01)
    assert xl["gflops_per_sample"] / 2 == pytest.approx(118.6, rel=0.01)  # the paper counts multiply-adds
    video = model_info(load_job(JOBS / "video-dit-s-moving-shapes.yaml"))
    assert video["latent_shape"] == [12, 8, 16, 16] and video["tokens"] == 512
    vb = model_info(load_job(JOBS / "video-dit-b-256x16f.yaml"))
    assert vb["latent_shape"] == [8, 4, 32, 32] and vb["tokens"] == 1024
    masked = model_info(load_job(JOBS / "image-dit-s-shapes.yaml", ["train.mask_ratio=0.5", "model.mixer_depth=2"]))
    assert masked["gflops_per_sample_masked"] < 0.65 * masked["gflops_per_sample"]


def test_model_info_cli_json(cli):
    r = cli("model-info", str(JOBS / "demo-image.yaml"), "--json", "--set", "model.size=S", timeout=300)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["model"] == "DiT-S/2" and info["latent_shape"] == [12, 16, 16] and info["tokens"] == 64


def test_spec_errors_name_the_field(tmp_path):
    f = tmp_path / "j.yaml"
    for body, where in [
        ("objective: {kind: ddpm}\nsample: {sampler: heun}", "sample.sampler"),
        ("vae: {kind: own}", "vae.path"),
        ("task: vae", "vae.kind"),
        ("model: {text: transformers}", "model.text_encoder"),
        ("model: {video_attention: spatial}", "model.video_attention"),
    ]:
        f.write_text(f"name: j\ndata: {{train: file:///tmp/d}}\n{body}\n")
        with pytest.raises(SpecError) as e:
            load_job(f)
        assert where in str(e.value), (body, str(e.value))
