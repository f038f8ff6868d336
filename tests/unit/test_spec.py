"""Spec validation: every bad YAML gives one exact `error: <file>: <field.path>: <reason>` line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from ditforge.spec import SpecError, load_any, load_job, parse_set

from ..conftest import REPO, run_cli

GOOD_JOB = """\
name: t
data: {train: s3://ditforge/x}
"""

# (yaml text, expected "field: reason" after the file name)
BAD = [
    (
        "name: t\ndata: {train: s3://b/x}\ndeepspeed: {zero_stage: 5}\n",
        "deepspeed.zero_stage: 5 is not allowed; input should be 0, 1, 2 or 3",
    ),
    ("name: t\ndata: {train: s3://b/x}\ntrain: {steps: -3}\n", "train.steps: input should be greater than 0"),
    (
        "name: t\ndata: {train: s3://b/x}\nresources: {workers: 0}\n",
        "resources.workers: input should be greater than 0",
    ),
    ("name: t\ndata: {train: s3://b/x}\ntrain: {stpes: 10}\n", "train.stpes: unknown key (did you mean 'steps'?)"),
    ("name: t\ndata: {train: s3://b/x}\nmodle: {size: S}\n", "modle: unknown key (did you mean 'model'?)"),
    ("name: t\n", "data: required field is missing"),
    ("name: t\ndata: {batch_size: 4}\n", "data.train: required field is missing"),
    (
        "name: t\ndata: {train: s3://b/x, batch_size: many}\n",
        "data.batch_size: 'many' is not allowed; give a positive integer or auto",
    ),
    (
        "name: t\ndata: {train: s3://b/x, batch_size: 0}\n",
        "data.batch_size: 0 is not allowed; give a positive integer or auto",
    ),
    (
        "name: t\ndata: {train: s3://b/x, batch_size: 8, global_batch: 20}\nresources: {workers: 2}\n",
        "data.global_batch: 20 is not a multiple of data.batch_size 8 x 2 workers = 16",
    ),
    (
        "name: t\ndata: {train: s3://b/x, batch_size: auto, global_batch: 7}\nresources: {workers: 2}\n",
        "data.global_batch: 7 is not a multiple of 2 workers = 2",
    ),
    (
        "name: t\ndata: {train: s3://b/x, batch_size: auto, auto_batch: {memory_fraction: 1.5}}\n",
        "data.auto_batch.memory_fraction: input should be less than or equal to 1",
    ),
    (
        "name: t\ndata: {train: s3://b/x}\ntrain: {precision: fp8}\n",
        "train.precision: fp8 needs resources.use_gpu: true and a GPU of compute capability 8.9+ (Ada, Hopper or "
        "later); CPU trains in fp32",
    ),
    (
        "name: t\ndata: {train: s3://b/x}\ntrain: {precision: fp8}\nresources: {use_gpu: true, accelerator_type: A100}\n",
        "train.precision: fp8 needs compute capability 8.9+ (Ada, Hopper or later); resources.accelerator_type A100 "
        "has no fp8 tensor cores",
    ),
    ("name: t\ndata: {train: ftp://b/x}\n", "data.train: unknown URI scheme 'ftp://' (known: file://, s3://, gs://)"),
    (
        "name: t\ndata: {train: /just/a/path}\n",
        "data.train: '/just/a/path' is not a URI: write file://PATH, s3://BUCKET/PATH or gs://BUCKET/PATH",
    ),
    (
        "name: t\ndata: {train: s3://b/x}\nmodel: {size: XXL}\n",
        "model.size: 'XXL' is not allowed; input should be 'T', 'S', 'B', 'L' or 'XL'",
    ),
    (
        "name: t\ndata: {train: s3://b/x}\ntrain: {precision: bf16}\n",
        "train.precision: bf16 needs resources.use_gpu: true (CPU trains in fp32)",
    ),
    (
        "name: t\ndata: {train: s3://b/x}\ntrain: {steps: 10, warmup: 10}\n",
        "train.warmup: 10 must be smaller than train.steps (10)",
    ),
    (
        "name: 'bad name!'\ndata: {train: s3://b/x}\n",
        "name: string should match pattern '^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$'",
    ),
    ("name: t\ndata: {train: s3://b/x}\ntrain: {lr: 0}\n", "train.lr: input should be greater than 0"),
    (
        "name: t\ndata: {train: s3://b/x}\ncheckpoint: {uri: 'hdfs://x'}\n",
        "checkpoint.uri: unknown URI scheme 'hdfs://' (known: file://, s3://, gs://)",
    ),
    (
        "name: t\ndata: {train: s3://b/x}\nresources: {use_gpu: maybe}\n",
        "resources.use_gpu: input should be a valid boolean, unable to interpret input (got 'maybe')",
    ),
    ("name: t\ndata: [1, 2]\n", "data: input should be a valid dictionary or instance of DataSpec (got [1, 2])"),
    (
        "name: t\ndata: {train: s3://b/x\n",
        "line 3, column 1: YAML syntax error: expected ',' or '}', but got '<stream end>'",
    ),
    ("- just\n- a list\n", "top level must be a mapping of keys, got list"),
    ("", "file is empty"),
    ("kind: embedded\ncpus: -1\n", "cpus: input should be greater than or equal to 0"),
    (
        "kind: moon\n",
        "kind: 'moon' is not allowed; expected one of embedded, local, address, aws, gcp, kubernetes, slurm",
    ),
    ("kind: address\n", "address: required when kind is 'address' (e.g. http://head:8265)"),
    ("kind: embedded\nports: {mlflow: 70000}\n", "ports.mlflow: input should be less than 65536"),
]


@pytest.mark.parametrize("text,expected", BAD, ids=[e.split(":")[0] + f"-{i}" for i, (_, e) in enumerate(BAD)])
def test_bad_spec_is_one_exact_line(tmp_path: Path, text: str, expected: str):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(SpecError) as e:
        load_any(f)
    assert str(e.value) == f"{f}: {expected}"


def test_validate_cli_exit_code_and_format(tmp_path: Path):
    bad = tmp_path / "job.yaml"
    bad.write_text("name: t\ndata: {train: s3://b/x}\ndeepspeed: {zero_stage: 5}\n")
    r = run_cli("validate", str(bad), str(REPO / "jobs" / "demo-image.yaml"))
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: {bad}: deepspeed.zero_stage: 5 is not allowed; input should be 0, 1, 2 or 3"
    assert "Traceback" not in r.stderr + r.stdout
    assert "ok: " in r.stdout  # the good file is still reported


def test_missing_file_is_one_line(tmp_path: Path):
    r = run_cli("validate", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: {tmp_path / 'nope.yaml'}: no such file"


def test_shipped_specs_validate():
    files = sorted((REPO / "jobs").glob("*.yaml")) + sorted((REPO / "cluster").glob("*.yaml"))
    assert any(f.name == "demo-image.yaml" for f in files) and any(f.name == "embedded.yaml" for f in files)
    r = run_cli("validate", *map(str, files))
    assert r.returncode == 0, r.stderr


def test_set_overrides_are_typed_and_validated(tmp_path: Path):
    f = tmp_path / "job.yaml"
    f.write_text(GOOD_JOB)
    spec = load_job(f, ["train.steps=42", "deepspeed.zero_stage=3", "model.size=S", "train.lr=3e-4"])
    assert (spec.train.steps, spec.deepspeed.zero_stage, spec.model.size, spec.train.lr) == (42, 3, "S", 3e-4)
    with pytest.raises(SpecError) as e:
        load_job(f, ["train.steps=-1"])
    assert str(e.value) == f"{f}: train.steps: input should be greater than 0"
    with pytest.raises(SpecError) as e:
        parse_set(["train.steps"])
    assert str(e.value) == "--set: train.steps: expected key.path=value"


def test_set_on_submit_is_validated_before_anything_starts(tmp_path: Path):
    r = run_cli("submit", str(REPO / "jobs" / "demo-image.yaml"), "--set", "resources.workers=0")
    assert r.returncode == 2
    assert r.stderr.strip().endswith("jobs/demo-image.yaml: resources.workers: input should be greater than 0")
    r = run_cli("demo", "--set", "deepspeed.zero_stage=7")
    assert r.returncode == 2 and "deepspeed.zero_stage: 7 is not allowed" in r.stderr


def test_deepspeed_section_passes_extra_keys_through(tmp_path: Path):
    from ditforge.train.engine import deepspeed_config

    f = tmp_path / "job.yaml"
    f.write_text(
        GOOD_JOB
        + textwrap.dedent("""\
        deepspeed:
          zero_stage: 3
          zero_optimization: {reduce_scatter: false}
          communication_data_type: fp32
    """)
    )
    cfg = deepspeed_config(load_job(f))
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3 and zero["reduce_scatter"] is False  # a key ditforge does not set passes through
    assert zero["allgather_bucket_size"] == 50_000_000  # bucket_mb: 200 MB of fp32 gradients (CPU)
    assert cfg["communication_data_type"] == "fp32"


def test_bucket_size_follows_the_spec_and_the_gradient_dtype(tmp_path: Path):
    from ditforge.train.engine import deepspeed_config

    f = tmp_path / "job.yaml"
    f.write_text(GOOD_JOB + "deepspeed: {zero_stage: 2, bucket_mb: 50}\n")
    cpu = deepspeed_config(load_job(f))["zero_optimization"]
    assert cpu["reduce_bucket_size"] == 12_500_000 and cpu["overlap_comm"] is False
    gpu = deepspeed_config(load_job(f, ["resources.use_gpu=true"]))["zero_optimization"]
    assert gpu["reduce_bucket_size"] == 25_000_000 and gpu["overlap_comm"] is False  # bf16 gradients
