"""Bad specs and CLI arguments, table-driven: each case must give exit code 2, exactly one
`error:` line on stderr naming the file (or argument) and the field, and nothing started or
written (no new files under a fresh DITFORGE_HOME or the working folder, so no services and no
Ray job). Most cases run in-process through `cli.main` (the console entry point); a few run as
real subprocesses."""

from __future__ import annotations

import os
import sys

import pytest
import yaml

from ditforge import cli

from ..conftest import run_cli

JOB = {"name": "t", "data": {"train": "s3://ditforge/x"}}


def job(**sections) -> str:
    """A valid minimal job spec with `sections` merged in (`train={"steps": "x"}`)."""
    d = {**JOB, **{k: {**JOB.get(k, {}), **v} if isinstance(v, dict) else v for k, v in sections.items()}}
    return yaml.safe_dump(d)


def cluster(**fields) -> str:
    return yaml.safe_dump(fields)


AWS = {"kind": "aws", "head": {"instance_type": "m5.large"}, "workers": [{"instance_type": "g5.xlarge"}]}
GCP = {
    "kind": "gcp",
    "project_id": "p",
    "head": {"instance_type": "n2", "cpus": 4},
    "workers": [{"instance_type": "g2", "cpus": 4}],
}
KUBE = {
    "kind": "kubernetes",
    "image": "img",
    "head": {"cpus": 2, "memory_gb": 4},
    "workers": [{"cpus": 2, "memory_gb": 4}],
}

# (id, files {name: text or None for a folder}, argv ({d} = the test folder), [what the line must name])
CASES = [
    # --- job specs: types, unknown keys, values --------------------------------------------------
    (
        "type-int",
        {"j.yaml": job(train={"steps": "many"})},
        ["validate", "{d}/j.yaml"],
        ["j.yaml", "train.steps", "'many'"],
    ),
    ("type-list", {"j.yaml": job(data={"batch_size": [1, 2]})}, ["validate", "{d}/j.yaml"], ["data.batch_size"]),
    (
        "mix-weight",
        {"j.yaml": job(data={"mix": [{"train": "s3://ditforge/i", "weight": -1}]})},
        ["validate", "{d}/j.yaml"],
        ["j.yaml", "data.mix.0.weight", "greater than 0"],
    ),
    (
        "mix-video-in-image-job",
        {"j.yaml": job(data={"mix": [{"train": "s3://ditforge/v", "weight": 1, "frames": 8}]})},
        ["validate", "{d}/j.yaml"],
        ["j.yaml", "data.mix.0.frames", "image sets only"],
    ),
    (
        "mix-set",
        {"j.yaml": job()},
        ["submit", "{d}/j.yaml", "--set", "data.mix=[{train: s3://ditforge/x, weight: 1}]"],
        ["j.yaml", "data.mix.0.train", "already data.train"],
    ),
    ("batch-auto-typo", {"j.yaml": job(data={"batch_size": "atuo"})}, ["validate", "{d}/j.yaml"], ["data.batch_size"]),
    (
        "global-batch",
        {"j.yaml": job(data={"batch_size": 8, "global_batch": 12})},
        ["validate", "{d}/j.yaml"],
        ["data.global_batch"],
    ),
    ("fp8-on-cpu", {"j.yaml": job(train={"precision": "fp8"})}, ["submit", "{d}/j.yaml"], ["train.precision", "fp8"]),
    ("type-bool", {"j.yaml": job(resources={"use_gpu": "maybe"})}, ["validate", "{d}/j.yaml"], ["resources.use_gpu"]),
    ("type-section", {"j.yaml": job(model=5)}, ["validate", "{d}/j.yaml"], ["j.yaml", "model"]),
    ("type-name", {"j.yaml": job(name=["a"])}, ["validate", "{d}/j.yaml"], ["j.yaml", "name"]),
    (
        "unknown-key",
        {"j.yaml": job(train={"stpes": 5})},
        ["validate", "{d}/j.yaml"],
        ["train.stpes", "unknown key", "did you mean 'steps'"],
    ),
    (
        "unknown-top",
        {"j.yaml": job(modle={"size": "S"})},
        ["validate", "{d}/j.yaml"],
        ["modle", "did you mean 'model'"],
    ),
    (
        "unknown-deep",
        {"j.yaml": job(checkpoint={"evry_steps": 5})},
        ["validate", "{d}/j.yaml"],
        ["checkpoint.evry_steps", "did you mean 'every_steps'"],
    ),
    (
        "deepspeed-typo",
        {"j.yaml": job(deepspeed={"zero_stag": 3})},
        ["validate", "{d}/j.yaml"],
        ["deepspeed.zero_stag", "did you mean 'zero_stage'"],
    ),
    (
        "deepspeed-stage",
        {"j.yaml": job(deepspeed={"zero_stage": 4})},
        ["validate", "{d}/j.yaml"],
        ["deepspeed.zero_stage", "4"],
    ),
    # pass-through keys that ditforge sets itself, and pass-through paths outside the allowed roots
    (
        "deepspeed-own",
        {"j.yaml": job(deepspeed={"optimizer": {"type": "Adam"}})},
        ["validate", "{d}/j.yaml"],
        ["deepspeed.optimizer", "set by ditforge itself"],
    ),
    (
        "deepspeed-own-zero",
        {"j.yaml": job(deepspeed={"zero_optimization": {"stage": 1}})},
        ["validate", "{d}/j.yaml"],
        ["deepspeed.zero_optimization.stage", "deepspeed.zero_stage"],
    ),
    (
        "deepspeed-monitor-path",
        {"j.yaml": job(deepspeed={"tensorboard": {"enabled": True, "output_path": "/etc/tb"}})},
        ["validate", "{d}/j.yaml"],
        ["deepspeed.tensorboard.output_path", "outside the allowed roots"],
    ),
    (
        "deepspeed-nvme-path",
        {
            "j.yaml": job(
                deepspeed={
                    "zero_optimization": {
                        "offload_optimizer": {"device": "nvme", "nvme_path": "file:///var/../etc/nvme"}
                    }
                }
            )
        },
        ["validate", "{d}/j.yaml"],
        ["deepspeed.zero_optimization.offload_optimizer.nvme_path", "resolves to /etc/nvme"],
    ),
    (
        "deepspeed-remote-path",
        {"j.yaml": job(deepspeed={"csv_monitor": {"enabled": True, "output_path": "s3://b/m"}})},
        ["validate", "{d}/j.yaml"],
        ["deepspeed.csv_monitor.output_path", "local path"],
    ),
    (
        "elastic-min-above",
        {"j.yaml": job(resources={"workers": 2, "min_workers": 3}, train={"max_failures": 2})},
        ["validate", "{d}/j.yaml"],
        ["j.yaml", "resources.min_workers", "larger than workers (2)"],
    ),
    (
        "elastic-min-zero",
        {"j.yaml": job(resources={"workers": 2, "min_workers": 0}, train={"max_failures": 2})},
        ["validate", "{d}/j.yaml"],
        ["resources.min_workers", "at least 1"],
    ),
    (
        "elastic-no-restarts",
        {"j.yaml": job(resources={"workers": 2, "min_workers": 1})},
        ["validate", "{d}/j.yaml"],
        ["train.max_failures", "elastic"],
    ),
    (
        "elastic-vae",
        {
            "j.yaml": job(
                task="vae",
                vae={"kind": "own", "path": "s3://ditforge/v"},
                train={"max_failures": 1},
                resources={"workers": 2, "min_workers": 1},
            )
        },
        ["validate", "{d}/j.yaml"],
        ["resources.min_workers", "vae"],
    ),
    (
        "elastic-global-batch-odd",
        {
            "j.yaml": job(
                data={"batch_size": 5},
                resources={"workers": 3, "min_workers": 2, "batch_policy": "global"},
                train={"max_failures": 1},
            )
        },
        ["validate", "{d}/j.yaml"],
        ["resources.batch_policy", "does not split over 2 workers"],
    ),
    (
        "final-save-past-collective-timeout",
        {"j.yaml": job(resources={"collective_timeout_s": 600}, checkpoint={"final_timeout_s": 400})},
        ["validate", "{d}/j.yaml"],
        ["checkpoint.final_timeout_s", "at most 300", "collective_timeout_s 600"],
    ),
    (
        "elastic-lr-rule",
        {"j.yaml": job(resources={"lr_scaling": "cubic"})},
        ["validate", "{d}/j.yaml"],
        ["resources.lr_scaling", "'cubic'"],
    ),
    (
        "missing-data",
        {"j.yaml": yaml.safe_dump({"name": "t"})},
        ["validate", "{d}/j.yaml"],
        ["j.yaml", "data", "missing"],
    ),
    (
        "missing-train",
        {"j.yaml": yaml.safe_dump({"name": "t", "data": {"batch_size": 2}})},
        ["validate", "{d}/j.yaml"],
        ["data.train", "missing"],
    ),
    ("bad-name", {"j.yaml": job(name="has space")}, ["validate", "{d}/j.yaml"], ["j.yaml", "name"]),
    ("literal", {"j.yaml": job(model={"size": "XXL"})}, ["validate", "{d}/j.yaml"], ["model.size", "'XXL'"]),
    ("negative-lr", {"j.yaml": job(train={"lr": -1})}, ["validate", "{d}/j.yaml"], ["train.lr"]),
    ("zero-frames", {"j.yaml": job(data={"frames": 0})}, ["validate", "{d}/j.yaml"], ["data.frames"]),
    (
        "nonfinite-k",
        {"j.yaml": job(train={"max_nonfinite_steps": 0})},
        ["validate", "{d}/j.yaml"],
        ["train.max_nonfinite_steps"],
    ),
    ("nan-lr", {"j.yaml": job(train={"lr": ".nan"})}, ["validate", "{d}/j.yaml"], ["train.lr"]),
    # --- URIs ---------------------------------------------------------------------------------
    (
        "uri-scheme",
        {"j.yaml": job(data={"train": "ftp://host/x"})},
        ["validate", "{d}/j.yaml"],
        ["data.train", "unknown URI scheme 'ftp://'"],
    ),
    (
        "uri-bare-path",
        {"j.yaml": job(data={"train": "/tmp/x"})},
        ["validate", "{d}/j.yaml"],
        ["data.train", "not a URI"],
    ),
    (
        "uri-checkpoint",
        {"j.yaml": job(checkpoint={"uri": "http://x/runs"})},
        ["validate", "{d}/j.yaml"],
        ["checkpoint.uri"],
    ),
    (
        "uri-resume",
        {"j.yaml": job(train={"resume": "hdfs://x"})},
        ["validate", "{d}/j.yaml"],
        ["train.resume", "hdfs://"],
    ),
    (
        "uri-vae-path",
        {"j.yaml": job(vae={"kind": "own", "path": "ftp://x/vae"})},
        ["validate", "{d}/j.yaml"],
        ["vae.path", "ftp://"],
    ),
    # --- impossible combinations ----------------------------------------------------------------
    (
        "bf16-cpu",
        {"j.yaml": job(train={"precision": "bf16"})},
        ["validate", "{d}/j.yaml"],
        ["train.precision", "use_gpu"],
    ),
    ("flash-cpu", {"j.yaml": job(model={"attention": "flash_attn"})}, ["validate", "{d}/j.yaml"], ["model.attention"]),
    (
        "sampler",
        {"j.yaml": job(objective={"kind": "ddpm"}, sample={"sampler": "euler"})},
        ["validate", "{d}/j.yaml"],
        ["sample.sampler", "ddpm"],
    ),
    ("warmup", {"j.yaml": job(train={"steps": 10, "warmup": 10})}, ["validate", "{d}/j.yaml"], ["train.warmup"]),
    ("vae-task", {"j.yaml": job(task="vae")}, ["validate", "{d}/j.yaml"], ["vae.kind"]),
    (
        "accel-no-gpu",
        {"j.yaml": job(resources={"accelerator_type": "H100"})},
        ["validate", "{d}/j.yaml"],
        ["resources.accelerator_type"],
    ),
    ("vae-own-path", {"j.yaml": job(vae={"kind": "own"})}, ["validate", "{d}/j.yaml"], ["vae.path", "required"]),
    (
        "text-encoder",
        {"j.yaml": job(model={"text": "transformers"})},
        ["validate", "{d}/j.yaml"],
        ["model.text_encoder"],
    ),
    (
        "nan-step-range",
        {"j.yaml": job(train={"steps": 5, "warmup": 1, "debug_nan_steps": [9]})},
        ["validate", "{d}/j.yaml"],
        ["train.debug_nan_steps"],
    ),
    # --- files: unreadable, empty, YAML syntax, wrong top level ----------------------------------
    ("missing-file", {}, ["validate", "{d}/nope.yaml"], ["nope.yaml", "no such file"]),
    ("directory", {"dir.yaml": None}, ["validate", "{d}/dir.yaml"], ["dir.yaml", "directory"]),
    ("not-utf8", {"b.yaml": b"name: \xff\xfe\x00"}, ["validate", "{d}/b.yaml"], ["b.yaml", "cannot read"]),
    (
        "syntax",
        {"s.yaml": "name: t\ndata:\n  train: s3://x\n   batch_size: 2\n"},
        ["validate", "{d}/s.yaml"],
        ["s.yaml", "line 4", "YAML syntax error"],
    ),
    ("syntax-tab", {"s.yaml": "name: t\ndata:\n\ttrain: s3://x\n"}, ["validate", "{d}/s.yaml"], ["s.yaml", "line 3"]),
    ("syntax-unclosed", {"s.yaml": "name: t\ndata: {train: s3://x\n"}, ["validate", "{d}/s.yaml"], ["s.yaml", "line"]),
    (
        "duplicate-key",
        {"s.yaml": "name: t\ndata: {train: s3://x}\ntrain: {steps: 5}\ntrain: {lr: 0.1}\n"},
        ["validate", "{d}/s.yaml"],
        ["s.yaml", "line 4", "train", "twice"],
    ),
    ("empty", {"e.yaml": ""}, ["validate", "{d}/e.yaml"], ["e.yaml", "empty"]),
    ("only-comments", {"e.yaml": "# nothing here\n"}, ["validate", "{d}/e.yaml"], ["e.yaml", "empty"]),
    ("list-top", {"l.yaml": "- name: t\n"}, ["validate", "{d}/l.yaml"], ["l.yaml", "mapping", "list"]),
    ("scalar-top", {"l.yaml": "just words\n"}, ["validate", "{d}/l.yaml"], ["l.yaml", "mapping", "str"]),
    # --- cluster specs ----------------------------------------------------------------------------
    ("cluster-kind", {"c.yaml": cluster(kind="pbs")}, ["validate", "{d}/c.yaml"], ["c.yaml", "kind", "'pbs'"]),
    (
        "cluster-typo",
        {"c.yaml": cluster(kind="local", nodse=2)},
        ["validate", "{d}/c.yaml"],
        ["nodse", "did you mean 'nodes'"],
    ),
    ("cluster-range", {"c.yaml": cluster(kind="local", nodes=20)}, ["validate", "{d}/c.yaml"], ["c.yaml", "nodes"]),
    (
        "cluster-ports",
        {"c.yaml": cluster(kind="local", ports={"gcs": 21050})},
        ["validate", "{d}/c.yaml"],
        ["ports.gcs"],
    ),
    ("cluster-cpus", {"c.yaml": cluster(kind="embedded", cpus=-1)}, ["validate", "{d}/c.yaml"], ["c.yaml", "cpus"]),
    ("address-missing", {"c.yaml": cluster(kind="address")}, ["validate", "{d}/c.yaml"], ["address", "required"]),
    (
        "address-scheme",
        {"c.yaml": cluster(kind="address", address="ftp://head:8265")},
        ["validate", "{d}/c.yaml"],
        ["address", "ftp://"],
    ),
    (
        "aws-range",
        {"c.yaml": cluster(**{**AWS, "workers": [{"instance_type": "g5", "min_workers": 3, "max_workers": 1}]})},
        ["validate", "{d}/c.yaml"],
        ["workers.0.min_workers"],
    ),
    (
        "aws-no-workers",
        {"c.yaml": cluster(**{**AWS, "workers": []})},
        ["validate", "{d}/c.yaml"],
        ["c.yaml", "workers"],
    ),
    (
        "gcp-cpus",
        {"c.yaml": cluster(**{**GCP, "head": {"instance_type": "n2"}})},
        ["validate", "{d}/c.yaml"],
        ["head.cpus"],
    ),
    (
        "gcp-gpu-type",
        {"c.yaml": cluster(**{**GCP, "workers": [{"instance_type": "g2", "cpus": 4, "gpus": 1, "gpu_type": "Z9"}]})},
        ["validate", "{d}/c.yaml"],
        ["workers.0.gpu_type", "'Z9'"],
    ),
    (
        "kube-replicas",
        {"c.yaml": cluster(**{**KUBE, "workers": [{"cpus": 2, "memory_gb": 4, "replicas": 9}]})},
        ["validate", "{d}/c.yaml"],
        ["workers.0.replicas"],
    ),
    (
        "kube-selector",
        {"c.yaml": cluster(**{**KUBE, "head": {"cpus": 2, "memory_gb": 4, "node_selector": ["a"]}})},
        ["validate", "{d}/c.yaml"],
        ["head.node_selector"],
    ),
    # --- CLI: --set, options, commands ------------------------------------------------------------
    (
        "set-no-equals",
        {"j.yaml": job()},
        ["model-info", "{d}/j.yaml", "--set", "train.steps"],
        ["--set", "train.steps"],
    ),
    ("set-empty-key", {"j.yaml": job()}, ["model-info", "{d}/j.yaml", "--set", "=5"], ["--set", "key.path=value"]),
    (
        "set-empty-part",
        {"j.yaml": job()},
        ["model-info", "{d}/j.yaml", "--set", "train..steps=5"],
        ["--set", "train..steps"],
    ),
    (
        "set-conflict",
        {"j.yaml": job()},
        ["model-info", "{d}/j.yaml", "--set", "train=1", "--set", "train.steps=2"],
        ["--set", "train.steps"],
    ),
    (
        "set-type",
        {"j.yaml": job()},
        ["model-info", "{d}/j.yaml", "--set", "train.steps=abc"],
        ["j.yaml", "train.steps", "'abc'"],
    ),
    (
        "set-unknown",
        {"j.yaml": job()},
        ["model-info", "{d}/j.yaml", "--set", "train.step=5"],
        ["train.step", "did you mean"],
    ),
    (
        "set-on-submit",
        {"j.yaml": job()},
        ["submit", "{d}/j.yaml", "--set", "resources.workers=0"],
        ["resources.workers"],
    ),
    (
        "submit-bad-cluster",
        {"j.yaml": job(), "c.yaml": cluster(kind="local", nodes=0)},
        ["submit", "{d}/j.yaml", "--cluster", "{d}/c.yaml"],
        ["c.yaml", "nodes"],
    ),
    (
        "gpu-on-embedded",
        {"j.yaml": job(resources={"use_gpu": True})},
        ["submit", "{d}/j.yaml"],
        ["j.yaml", "resources.use_gpu", "no GPUs"],
    ),
    (
        "gpu-on-local",
        {"j.yaml": job(resources={"use_gpu": True}), "c.yaml": cluster(kind="local")},
        ["submit", "{d}/j.yaml", "-c", "{d}/c.yaml"],
        ["j.yaml", "resources.use_gpu", "no GPUs"],
    ),
    ("unknown-option", {}, ["validate", "--strict", "x.yaml"], ["ditforge validate", "--strict"]),
    ("unknown-command", {}, ["frobnicate"], ["ditforge", "frobnicate"]),
    ("unknown-subcommand", {}, ["data", "ingestt"], ["ditforge data", "ingestt"]),
    ("missing-argument", {}, ["validate"], ["ditforge validate", "files"]),
    ("missing-option", {}, ["data", "ingest", "shapes"], ["ditforge data ingest", "--out"]),
    (
        "option-type",
        {},
        ["data", "ingest", "shapes", "--out", "file://{d}/o", "--shard-size", "lots"],
        ["ditforge data ingest", "--shard-size", "valid integer"],
    ),
    (
        "option-negative",
        {},
        ["data", "ingest", "shapes", "--out", "file://{d}/o", "--shard-size", "-1"],
        ["--shard-size", "-1"],
    ),
    (
        "option-zero-res",
        {},
        ["data", "ingest", "shapes", "--out", "file://{d}/o", "--resolution", "0"],
        ["--resolution"],
    ),
    (
        "option-choice",
        {},
        ["data", "ingest", "shapes", "--out", "file://{d}/o", "--fit", "stretch"],
        ["--fit", "stretch"],
    ),
    ("option-uri", {}, ["data", "ingest", "shapes", "--out", "ftp://{d}/o", "--limit", "4"], ["--out", "ftp://"]),
    ("ingest-source", {}, ["data", "ingest", "{d}/no-such-folder", "--out", "file://{d}/o"], ["no-such-folder"]),
    (
        "render-embedded",
        {"c.yaml": cluster(kind="embedded")},
        ["cluster", "render", "{d}/c.yaml", "--out", "{d}/r"],
        ["c.yaml", "kind"],
    ),
    (
        "render-bad-job",
        {"c.yaml": cluster(**KUBE), "j.yaml": job(train={"stepz": 1})},
        ["cluster", "render", "{d}/c.yaml", "--out", "{d}/r", "--job", "{d}/j.yaml"],
        ["j.yaml", "train.stepz"],
    ),
    ("render-missing", {}, ["cluster", "render", "{d}/none.yaml", "--out", "{d}/r"], ["none.yaml", "no such file"]),
    ("bench-section", {}, ["bench", "--section", "nope", "--json", "{d}/b.json"], ["--section", "nope"]),
    (
        "sample-weights",
        {},
        ["sample", "--model", "file://{d}/m", "--weights", "best", "--out", "{d}/s.png"],
        ["--weights", "best"],
    ),
    ("stop-unknown", {}, ["stop", "no-such-job"], ["no-such-job"]),
    (
        "encode-vae",
        {},
        ["data", "encode", "file://{d}/p", "--vae", "magic", "--out", "file://{d}/l"],
        ["--vae", "magic"],
    ),
]


def _setup(tmp_path, files: dict) -> None:
    for name, text in files.items():
        p = tmp_path / name
        if text is None:
            p.mkdir()
        elif isinstance(text, bytes):
            p.write_bytes(text)
        else:
            p.write_text(text)


def _tree(*roots) -> set[str]:
    return {os.path.join(d, f) for r in roots for d, ds, fs in os.walk(r) for f in fs + ds}


def _check(code: int, stdout: str, stderr: str, must: list[str], before: set[str], roots) -> None:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code == 2, (code, stdout, stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for m in must:
        assert m in lines[0], (m, lines[0])
    assert "Traceback" not in stdout + stderr
    assert _tree(*roots) == before, sorted(_tree(*roots) - before)  # nothing written, nothing started


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A fresh DITFORGE_HOME and working folder: any file the CLI leaves shows up in them."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(), work.mkdir()
    monkeypatch.setenv("DITFORGE_HOME", str(home))
    monkeypatch.chdir(work)
    return tmp_path


@pytest.mark.parametrize("case, files, argv, must", CASES, ids=[c[0] for c in CASES])
def test_bad_input_in_process(case, files, argv, must, sandbox, capsys):
    _setup(sandbox, files)
    before = _tree(sandbox)
    with pytest.raises(SystemExit) as e:
        cli.main([a.replace("{d}", str(sandbox)) for a in argv])
    got = capsys.readouterr()
    _check(e.value.code, got.out, got.err, must, before, [sandbox])


def test_unreadable_file(sandbox, capsys):
    (sandbox / "secret.yaml").write_text(job())
    (sandbox / "secret.yaml").chmod(0)
    if os.access(sandbox / "secret.yaml", os.R_OK):  # root reads anything: make reading fail another way
        (sandbox / "secret.yaml").unlink()
        os.mkfifo(sandbox / "secret.yaml")  # not a regular file: opening would block forever
    before = _tree(sandbox)
    with pytest.raises(SystemExit) as e:
        cli.main(["validate", str(sandbox / "secret.yaml")])
    got = capsys.readouterr()
    _check(e.value.code, got.out, got.err, ["secret.yaml", "cannot read"], before, [sandbox])


def test_zero3_on_a_tiny_model_is_a_warning_only(sandbox, capsys):
    (sandbox / "j.yaml").write_text(job(deepspeed={"zero_stage": 3}, model={"size": "S"}))
    with pytest.raises(SystemExit) as e:
        cli.main(["validate", str(sandbox / "j.yaml")])
    got = capsys.readouterr()
    assert e.value.code == 0, got
    lines = got.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "j.yaml" in lines[0], got.err
    assert "deepspeed.zero_stage" in lines[0] and "model.size" in lines[0]
    assert got.out.startswith("ok: ")
    for size in ("B", "L"):  # big enough to shard: no warning
        (sandbox / "j.yaml").write_text(job(deepspeed={"zero_stage": 3}, model={"size": size}))
        with pytest.raises(SystemExit):
            cli.main(["validate", str(sandbox / "j.yaml")])
        assert capsys.readouterr().err == ""


# A few as real subprocesses: the console entry point, the exit code the shell sees, no services.
SUBPROCESS = [
    (["validate", "{d}/j.yaml"], {"j.yaml": job(train={"stpes": 5})}, ["j.yaml", "did you mean 'steps'"]),
    (["submit", "{d}/j.yaml"], {"j.yaml": job(resources={"use_gpu": True})}, ["resources.use_gpu", "no GPUs"]),
    (["data", "ingest", "shapes", "--out", "file://{d}/o", "--shard-size", "-5"], {}, ["--shard-size"]),
    (["cluster", "renderr", "x.yaml"], {}, ["ditforge cluster", "renderr"]),
]


@pytest.mark.parametrize("argv, files, must", SUBPROCESS, ids=[a[0] + "-" + a[1] for a, _, _ in SUBPROCESS])
def test_bad_input_subprocess(argv, files, must, tmp_path):
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(), work.mkdir()
    _setup(tmp_path, files)
    before = _tree(tmp_path)
    r = run_cli(
        *[a.replace("{d}", str(tmp_path)) for a in argv],
        cwd=work,
        timeout=120,
        env={"DITFORGE_HOME": str(home), "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
    )
    _check(r.returncode, r.stdout, r.stderr, must, before, [tmp_path])


def test_validate_prints_every_problem_in_file_order(sandbox, capsys):
    """Not only the first: one `error:` line per problem, ordered by where it is in the file (a
    missing key where its section starts), across field, section and whole-spec checks."""
    (sandbox / "a.yaml").write_text("name: x\ndeepspeed: {zero_stage: 5}\n")
    (sandbox / "b.yaml").write_text(
        "name: b\n"
        "model: {size: XXL}\n"
        "train: {steps: many, stpes: 3}\n"
        "data: {batch_size: 0}\n"
        "deepspeed: {optimizer: {type: Adam}, zero_stag: 3}\n"
    )
    (sandbox / "c.yaml").write_text(
        "name: c\ndata: {train: s3://a}\nmodel: {attention: flash_attn}\n"
        "train: {precision: bf16, steps: 5, warmup: 9}\n"
    )
    before = _tree(sandbox)
    with pytest.raises(SystemExit) as e:
        cli.main(["validate", *(str(sandbox / f) for f in ("a.yaml", "b.yaml", "c.yaml"))])
    got = capsys.readouterr()
    assert e.value.code == 2 and got.out == "" and "Traceback" not in got.err
    lines = [ln.replace(str(sandbox) + "/", "") for ln in got.err.splitlines()]
    assert all(ln.startswith("error: ") for ln in lines), lines
    fields = [ln.split(": ")[2] for ln in lines]
    assert fields == [
        "data",
        "deepspeed.zero_stage",
        "model.size",
        "train.steps",
        "train.stpes",
        "data.train",
        "data.batch_size",
        "deepspeed.optimizer",
        "deepspeed.zero_stag",
        "model.attention",
        "train.precision",
        "train.warmup",
    ], lines
    assert [ln.split(": ")[1] for ln in lines] == ["a.yaml"] * 2 + ["b.yaml"] * 7 + ["c.yaml"] * 3
    assert _tree(sandbox) == before
