"""`ditforge`: each verb parses its arguments, calls one function, and turns user errors into one
`error: ...` line with exit code 2."""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train latent diffusion transformers on Ray + DeepSpeed.")
services_app = typer.Typer(no_args_is_help=True, help="The embedded S3 server, MLflow server and Ray head.")
app.add_typer(services_app, name="services")
cluster_app = typer.Typer(no_args_is_help=True, help="Start, stop and render clusters described by a cluster YAML.")
app.add_typer(cluster_app, name="cluster")
out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True)
logging.getLogger("ray").setLevel(logging.WARNING)  # the Jobs SDK's "uploading package" chatter

SetOpt = typer.Option(None, "--set", help="override a spec field: --set train.steps=100 (repeatable)")
ClusterOpt = typer.Option(None, "--cluster", "-c", help="cluster YAML (default: embedded)")


def user_errors(fn):
    """Known user errors → one line on stderr and exit 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from ..cluster.launch import SubmitError
        from ..cluster.render import RenderError
        from ..data.shards import DataError
        from ..services import ServiceError
        from ..spec import SpecError
        from ..storage import URIError
        from ..models.convert import PretrainedError
        from ..train.checkpoint import UnsafeCheckpoint

        try:
            return fn(*args, **kwargs)
        except (SpecError, DataError, SubmitError, ServiceError, RenderError, URIError, UnsafeCheckpoint,
                PretrainedError) as e:
            print_error(e)
            raise typer.Exit(2)

    return wrapper


def print_error(e: Exception) -> None:
    """`error: <line>` on stderr, one per problem (a spec with several problems has several lines)."""
    from ..credentials import redact

    for line in getattr(e, "lines", None) or [str(e)]:
        err.print(f"error: {redact(line)}", markup=False, highlight=False, soft_wrap=True)


# ------------------------------------------------------------------------------ validate


@app.command()
@user_errors
def validate(files: List[Path] = typer.Argument(..., help="job or cluster YAML files")):
    """Check job and cluster specs; print one line per problem."""
    from ..spec import JobSpec, SpecError, load_any, spec_warnings

    bad = 0
    for f in files:
        try:
            spec = load_any(f)
            out.print(f"ok: {f} ({type(spec).__name__})", highlight=False)
            for w in spec_warnings(spec) if isinstance(spec, JobSpec) else []:
                err.print(f"warning: {f}: {w}", markup=False, highlight=False, soft_wrap=True)
        except SpecError as e:
            print_error(e)
            bad += 1
    if bad:
        raise typer.Exit(2)


# -------------------------------------------------------------------------------- submit


def _load(job: Path, cluster: Optional[Path], sets: Optional[List[str]]):
    from ..spec import load_cluster, load_job

    # `--set cluster.mode=job` overrides the cluster spec; every other --set, the job spec
    cluster_sets = [x.removeprefix("cluster.") for x in sets or [] if x.startswith("cluster.")]
    job_sets = [x for x in sets or [] if not x.startswith("cluster.")]
    return load_job(job, job_sets), load_cluster(cluster, cluster_sets)


@app.command()
@user_errors
def submit(
    job: Path = typer.Argument(..., help="job spec YAML"),
    cluster: Optional[Path] = ClusterOpt,
    sets: Optional[List[str]] = SetOpt,
    resume: Optional[str] = typer.Option(None, help="continue run RUN from its latest complete checkpoint"),
    wait: bool = typer.Option(False, "--wait", help="follow the job with a progress bar until it ends"),
    force_resume: bool = typer.Option(False, "--force-resume",
                                      help="continue the run even though a field that defines it changed"),
):
    """Submit a training job through the Ray Jobs API and print its job id."""
    from ..cluster.launch import submit as do_submit

    from ..spec import spec_warnings

    spec, cl = _load(job, cluster, sets)
    for w in spec_warnings(spec):
        err.print(f"warning: {job}: {w}", markup=False, highlight=False, soft_wrap=True)
    rec = do_submit(spec, cl, resume=resume, source=str(job), force_resume=force_resume)
    out.print(rec["job_id"], highlight=False)
    err.print(f"run {rec['run_name']}  mlflow {_run_link(rec)}", highlight=False)
    if wait:
        state = follow(rec)
        if state != "SUCCEEDED":
            raise typer.Exit(1)


def _run_link(rec: dict) -> str:
    from mlflow.tracking import MlflowClient

    try:
        exp_id = MlflowClient(rec["tracking_uri"]).get_run(rec["mlflow_run_id"]).info.experiment_id
        return f"{rec['tracking_uri']}/#/experiments/{exp_id}/runs/{rec['mlflow_run_id']}"
    except Exception:
        return rec["tracking_uri"]


def follow(rec: dict) -> str:
    """A progress bar fed by the run's `train/step` metric until the Ray job ends."""
    from mlflow.tracking import MlflowClient

    from ..cluster.launch import client_for

    client, mlf = client_for(rec), MlflowClient(rec["tracking_uri"])
    cols = [TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*cols, console=err) as bar:
        task = bar.add_task(rec["run_name"], total=rec["steps"], info="starting")
        while True:
            state = str(client.get_job_status(rec["job_id"]).value)
            try:
                m = mlf.get_run(rec["mlflow_run_id"]).data.metrics
            except Exception:
                m = {}
            if "train/step" in m:
                info = f"loss {m.get('train/loss', float('nan')):.4f}  {m.get('train/samples_per_s', 0):.0f} samples/s"
                bar.update(task, completed=int(m["train/step"]), info=info)
            if state in ("SUCCEEDED", "FAILED", "STOPPED"):
                break
            time.sleep(1.0)
    if state != "SUCCEEDED":
        from ..credentials import redact

        logs = redact(client.get_job_logs(rec["job_id"])).strip().splitlines()
        err.print("\n".join(logs[-25:]), markup=False, highlight=False)
        err.print(f"job {rec['job_id']} {state}: {_job_error(rec) or 'see `ditforge logs ' + rec['job_id'] + '`'}",
                  markup=False, highlight=False, soft_wrap=True)
    return state


def _job_error(rec: dict) -> str | None:
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient(rec["tracking_uri"]).get_run(rec["mlflow_run_id"]).data.tags.get("ditforge.error")
    except Exception:
        return None


# ------------------------------------------------------------------------- status / logs / stop


def _find(job_id: str) -> dict:
    from ..cluster.launch import SubmitError, record

    rec = record(job_id)
    if rec is None:
        raise SubmitError(f"job '{job_id}': not submitted from here (see `ditforge status` for known jobs)")
    return rec


@app.command()
@user_errors
def status(job: Optional[str] = typer.Argument(None, help="job id (default: all jobs)")):
    """Jobs with their state, step, loss, samples/s and MLflow link."""
    from mlflow.tracking import MlflowClient

    from ..cluster.launch import all_records

    recs = [_find(job)] if job else all_records()
    table = Table("job", "state", "step", "loss", "samples/s", "mlflow", "error")
    for rec in recs:
        try:
            state = _state(rec)
        except Exception:
            state = "UNKNOWN (cluster unreachable)"
        if state == "SUCCEEDED" and _stopped_on_request(rec):
            state = "STOPPED"
        try:
            m = MlflowClient(rec["tracking_uri"]).get_run(rec["mlflow_run_id"]).data.metrics
        except Exception:
            m = {}
        step = f"{int(m['train/step'])}/{rec['steps']}" if "train/step" in m else "-"
        table.add_row(rec["job_id"], state, step, f"{m['train/loss']:.4f}" if "train/loss" in m else "-",
                      f"{m['train/samples_per_s']:.1f}" if "train/samples_per_s" in m else "-",
                      _run_link(rec), (_job_error(rec) or "") if state == "FAILED" else "")
    out.print(table)


def _state(rec: dict) -> str:
    """The Ray job's state; for a job on a Slurm allocation, with the Slurm job's beside it."""
    from ..cluster.launch import client_for

    if rec.get("slurm_job_id"):
        from ..cluster import slurm

        if rec.get("job_dir"):  # mode job: its own allocation
            return slurm.record_state(rec)
        st, _ = slurm.job_state(rec["slurm_job_id"])
        ray_state = str(client_for(rec).get_job_status(rec["job_id"]).value) if st == "RUNNING" else "UNKNOWN"
        return f"{ray_state} · slurm {rec['slurm_job_id']} {st}"
    return str(client_for(rec).get_job_status(rec["job_id"]).value)


@app.command()
@user_errors
def logs(job: str = typer.Argument(..., help="job id"), follow_: bool = typer.Option(False, "--follow", "-f")):
    """Print a job's driver and worker logs."""
    from ..cluster.launch import client_for

    rec = _find(job)
    from ..credentials import redact

    if rec.get("job_dir"):  # a Slurm allocation of its own: its log, then each attempt's Ray job log
        d = Path(rec["job_dir"])
        for f in [d / f"slurm-{rec['slurm_job_id']}.out", *sorted(d.glob("ray-*.log"))]:
            if f.exists():
                sys.stdout.write(f"==> {f} <==\n{redact(f.read_text(errors='replace'))}\n")
        return
    client = client_for(rec)
    if not follow_:
        sys.stdout.write(redact(client.get_job_logs(job)))
        return
    import asyncio

    async def tail():
        async for lines in client.tail_job_logs(job):
            sys.stdout.write(redact(lines))
            sys.stdout.flush()

    asyncio.run(tail())


@app.command()
@user_errors
def stop(job: str = typer.Argument(..., help="job id"),
         grace: float = typer.Option(120.0, help="seconds to wait for the final checkpoint before Ray stops the job")):
    """Stop a running job; with `checkpoint.on_stop: true` it saves a final checkpoint first."""
    from ..cluster.launch import stop as do_stop

    rec = _find(job)
    if rec.get("checkpoint_on_stop"):
        err.print(f"asking {job} to save a final checkpoint and stop (up to {grace:.0f}s)...", highlight=False)
    state, forced = do_stop(rec, grace)
    if _stopped_on_request(rec):
        state = "STOPPED (final checkpoint saved)" if rec.get("checkpoint_on_stop") else "STOPPED"
    out.print(f"{job}: {state}{' (stopped by Ray)' if forced else ''}", highlight=False, soft_wrap=True)


def _stopped_on_request(rec: dict) -> bool:
    """The worker left early for `ditforge stop` (Ray reports that as SUCCEEDED)."""
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient(rec["tracking_uri"]).get_run(rec["mlflow_run_id"]).data.tags.get("ditforge.stopped") == "true"
    except Exception:
        return False


@app.command()
@user_errors
def ui():
    """Print the MLflow UI address of the embedded tracking server (starting it if needed)."""
    from .. import services

    ep = services.up(ray=False)
    out.print(ep.mlflow, highlight=False)


# ---------------------------------------------------------------------------- export / sample


@app.command("export")
@user_errors
def export_cmd(
    src: str = typer.Argument(..., help="a run (s3://.../runs/RUN), a step folder, or a run name with --runs"),
    dest: str = typer.Option(..., "--out", help="URI of the folder to write (file://, s3://)"),
    runs: Optional[str] = typer.Option(None, help="checkpoint.uri to look RUN up in, when SRC is a bare run name"),
    fmt: str = typer.Option("ditforge", "--format", help="ditforge (raw + EMA safetensors, model.json) or diffusers "
                                                          "(a DiTPipeline folder)"),
    weights: str = typer.Option("ema", help="diffusers format: ema or raw weights"),
):
    """Write consolidated raw + EMA weights (safetensors) and model.json from a checkpoint, or a
    folder diffusers' DiTPipeline.from_pretrained loads (--format diffusers)."""
    from .. import storage
    from ..cluster.launch import SubmitError
    from ..spec import SpecError
    from ..train.export import export, export_diffusers

    if fmt not in ("ditforge", "diffusers"):
        raise SpecError("--format", fmt, "expected ditforge or diffusers")
    if weights not in ("ema", "raw"):
        raise SpecError("--weights", weights, "expected ema or raw")

    if "://" not in src:
        if not runs:
            raise SubmitError(f"{src}: give a checkpoint URI, or a run name together with --runs URI")
        src = storage.join(runs, src)
    try:
        if fmt == "diffusers":
            cfg = export_diffusers(storage.absolute(src), storage.absolute(dest), weights)
        else:
            cfg = export(storage.absolute(src), storage.absolute(dest))
    except FileNotFoundError as e:
        raise SubmitError(str(e)) from None
    extra = ""
    if fmt == "diffusers":
        extra = (f" (DiTPipeline, {cfg['scheduler']}, " +
                 ("vae/ included)" if cfg["vae_exported"] else f"no vae/: the {cfg['vae']['kind']} VAE has no AutoencoderKL form)"))
    out.print(f"exported step {cfg['step']} of {cfg['checkpoint']} → {dest}{extra}", highlight=False)


@app.command()
@user_errors
def register(
    run: str = typer.Argument(..., help="the run folder (s3://.../runs/RUN) whose registration failed"),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI (default: the embedded server)"),
):
    """Register a finished run's newest complete checkpoint in MLflow again (after a failed registration)."""
    from .. import services, storage
    from ..cluster.launch import SubmitError
    from ..train.driver import register as do_register

    try:
        model = do_register(storage.absolute(run), tracking_uri or services.endpoints().mlflow)
    except FileNotFoundError as e:
        raise SubmitError(f"{run}: {e}") from None
    out.print(f"registered {model} from {run}", highlight=False)


def _fetch_model(model: str, weights: str, tracking_uri: str | None = None):
    """--model (models:/, runs:/, or an export folder URI) → (DiT, model.json dict)."""
    import tempfile

    from .. import services, storage
    from ..cluster.launch import SubmitError
    from ..spec import SpecError
    from ..train.export import FILES, load_model

    if weights not in ("ema", "raw"):
        raise SpecError("--weights", weights, "expected ema or raw")
    local = Path(tempfile.mkdtemp(prefix="ditforge-model-"))
    if model.startswith(("models:/", "runs:/", "mlflow-artifacts:/")):
        import mlflow

        from ..spec import _no_password

        try:  # a tracking URI is printed in errors: it must not carry a password
            tracking_uri = _no_password(tracking_uri) or services.endpoints().mlflow
        except ValueError as e:
            raise SpecError("--tracking-uri", "", str(e)) from None
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)  # models:/ resolves through the registry, not a local file
        try:
            mlflow.artifacts.download_artifacts(artifact_uri=model, dst_path=str(local), tracking_uri=tracking_uri)
        except Exception as e:
            raise SubmitError(f"--model {model}: cannot fetch from MLflow at {tracking_uri} ({str(e).splitlines()[0]})") from None
        found = list(local.rglob("model.json"))
        if not found:
            raise SubmitError(f"--model {model}: no model.json in it (not a ditforge export)")
        local = found[0].parent
    else:
        src = storage.absolute(model)
        for f in FILES:
            if storage.exists(storage.join(src, f)):
                storage.get_file(storage.join(src, f), local / f)
        if not (local / "model.json").exists():
            raise SubmitError(f"--model {model}: no model.json there (not a ditforge export)")
    return load_model(local, weights)


@app.command()
@user_errors
def sample(
    model: str = typer.Option(..., "--model", help="models:/NAME/VERSION, runs:/ID/model, or an export folder URI"),
    png: Optional[Path] = typer.Option(None, "--out", help="PNG to write (grid); with --task .gif, .mp4 or .npy"),
    per_class: Optional[int] = typer.Option(None, help="samples per class (grid columns)"),
    steps: Optional[int] = typer.Option(None, help="Euler steps"),
    cfg_scale: Optional[float] = typer.Option(None, help="classifier-free guidance scale"),
    seed: Optional[int] = typer.Option(None),
    weights: str = typer.Option("ema", help="ema or raw"),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI",
                                               help="MLflow server for models:/ and runs:/ (default: the embedded one)"),
    task: Optional[str] = typer.Option(None, help="video task: predict | predict_backward | interpolate | "
                                                  "image_to_video | complete (needs --given)"),
    given: Optional[Path] = typer.Option(None, "--given", help="the condition: a video (mp4/webm/gif), an image, "
                                                               "or a .npy of uint8 frames (T, H, W, 3)"),
    k: Optional[int] = typer.Option(None, "--k", help="predict / interpolate: given frames (default: the most trained)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object saying what was written"),
):
    """Generate a class-conditional sample grid, or (--task) fill in a video around given frames."""
    from ..spec import SampleSpec, SpecError, VAESpec

    if task is None and (given is not None or k is not None):
        raise SpecError("--given" if given is not None else "--k", "", "needs --task")
    if task is not None:
        from ..data.clips import OUT_EXTS

        if given is None:
            raise SpecError("--task", task, "needs --given PATH (the frames to condition on)")
        if png is None or png.suffix.lower().lstrip(".") not in OUT_EXTS:
            raise SpecError("--out", str(png or ""), f"with --task, give a file ending in {', '.join('.' + e for e in OUT_EXTS)}")
    png = png or Path("samples.png")
    net, cfg = _fetch_model(model, weights, tracking_uri)
    s = SampleSpec(**cfg["sample"])
    s = s.model_copy(update={k_: v for k_, v in dict(per_class=per_class, steps=steps, cfg_scale=cfg_scale,
                                                     seed=seed).items() if v is not None})
    from ..objectives import build_objective
    from ..spec import ObjectiveSpec

    objective = build_objective(ObjectiveSpec(**cfg.get("objective", {})))  # older exports: rectified flow
    if task is not None:
        from ..data.clips import read_clip, write_clip
        from ..train.sampling import sample_task

        clip = read_clip(given)
        frames = sample_task(net, cfg, objective, task, clip, k, s)
        write_clip(frames, png)
        result = {"out": str(png), "task": task, "frames": int(frames.shape[0]), "size": list(frames.shape[1:3]),
                  "given": str(given), "steps": s.steps, "sampler": s.sampler, "weights": cfg["weights"]}
        if as_json:
            print(json.dumps(result))
        else:
            out.print(f"{png}: {task}, {frames.shape[0]} frames {frames.shape[1]}x{frames.shape[2]} from {given} "
                      f"({cfg['weights']} weights, {s.steps} {s.sampler} steps)", highlight=False)
        return
    from ..train.sampling import sample_grid

    files = sample_grid(net, tuple(cfg["latent_shape"]), s, VAESpec(**cfg["vae"]), str(png), objective=objective)
    if as_json:
        print(json.dumps({"out": files, "classes": net.cfg.num_classes, "per_class": s.per_class, "steps": s.steps,
                          "sampler": s.sampler, "weights": cfg["weights"]}))
        return
    out.print(f"{png}: {net.cfg.num_classes} classes x {s.per_class} samples ({cfg['weights']} weights, "
              f"{s.steps} {s.sampler} steps, cfg {s.cfg_scale})", highlight=False)


# ---------------------------------------------------------------------------------- bench


@app.command()
@user_errors
def bench(
    json_path: Path = typer.Option(Path("bench.json"), "--json", help="where to write the JSON results"),
    quick: bool = typer.Option(False, "--quick", help="small sizes, few repeats (CI smoke run)"),
    section: Optional[List[str]] = typer.Option(None, "--section", help="run only these sections"),
    focus: bool = typer.Option(False, "--focus", help="GPU headline only: XL/2, its ablation, fp8 vs bf16"),
):
    """Measure throughput, overhead, memory and checkpoint stalls; write JSON and print a table."""
    from ..bench.run import SECTIONS, run_all, write

    unknown = set(section or []) - set(SECTIONS)
    if unknown:
        from ..spec import SpecError

        raise SpecError("--section", ",".join(sorted(unknown)), f"unknown section (known: {', '.join(SECTIONS)})")
    # Written after each section too: a GPU run cut short by its time limit keeps what it measured.
    result = run_all(quick, section, focus, on_section=lambda r: write(r, str(json_path)),
                     command="ditforge " + " ".join(sys.argv[1:]))
    write(result, str(json_path))
    for c in result["configs"]:
        table = Table(title=f"{c['section']}: {c['name']}", show_header=False)
        for k, v in c.items():
            if k not in ("section", "name"):
                table.add_row(k, json.dumps(v) if isinstance(v, (dict, list)) else str(v))
        out.print(table)
    for name, e in result["errors"].items():
        err.print(f"bench section {name} failed: {e}", markup=False)
    out.print(f"wrote {json_path}", highlight=False)
    if result["errors"]:
        raise typer.Exit(1)


# ------------------------------------------------------------------------------- services


@services_app.command("up")
@user_errors
def services_up(cluster: Optional[Path] = ClusterOpt):
    """Start (or reuse) the S3 server, MLflow and the Ray head, all on 127.0.0.1."""
    from .. import services
    from ..spec import SpecError, load_cluster

    spec = load_cluster(cluster)
    if spec.kind != "embedded":
        raise SpecError(str(cluster), "kind", f"services up starts the embedded cluster; for kind {spec.kind} "
                                              f"use `ditforge cluster up {cluster}`")
    with err.status("starting services (S3, MLflow, Ray)..."):
        ep = services.up(spec)
    for k, v in ep.to_dict().items():
        out.print(f"{k:14s} {v}", highlight=False)


@services_app.command("down")
@user_errors
def services_down():
    """Stop the embedded services (their data stays under .ditforge/)."""
    from .. import services

    stopped = services.down()
    out.print(f"stopped: {', '.join(stopped) or 'nothing was running'}", highlight=False)


@services_app.command("status")
@user_errors
def services_status():
    from .. import services

    table = Table("service", "url", "pid", "up", "check")
    for s in services.status():
        table.add_row(s["service"], s["url"], str(s["pid"] or "-"), "yes" if s["up"] else "no", s["check"] or "passed")
    out.print(table)


# ----------------------------------------------------------------------------------- data

data_app = typer.Typer(no_args_is_help=True, help="Ingest sources into shards, encode latents, verify data sets.")
app.add_typer(data_app, name="data")


def _uri_option(name: str, value: str) -> None:
    """A URI option with an unknown scheme fails here, before Ray or a store is touched."""
    from ..spec import URI_SCHEMES, SpecError

    if "://" in value and value.split("://", 1)[0] not in URI_SCHEMES:
        raise SpecError(name, "", f"unknown URI scheme '{value.split('://', 1)[0]}://' in {value} "
                                  f"(known: {', '.join(s + '://' for s in URI_SCHEMES)})")


@data_app.command("ingest")
@user_errors
def data_ingest(
    source: str = typer.Argument(..., help="folder / URI of images or videos, a webdataset (.tar, folder of .tar, "
                                           "brace pattern), or a generated set: shapes | moving-shapes"),
    out_uri: str = typer.Option(..., "--out", help="where the shards and manifest.json go (file://, s3://, gs://)"),
    shard_size: int = typer.Option(256, help="inputs per unit of work (one shard per bucket per unit)"),
    resolution: int = typer.Option(32, help="side of the square (crop) or pixel budget side (bucket)"),
    fit: str = typer.Option("crop", help="crop: resize + centre-crop to a square; bucket: keep aspect ratio"),
    frames: int = typer.Option(8, help="videos: frames per clip (shorter clips go to F/2, F/4 buckets)"),
    stride: int = typer.Option(2, help="videos: take every STRIDE-th source frame"),
    limit: Optional[int] = typer.Option(None, help="generated sets: how many; folders and webdatasets: the first N inputs"),
    seed: int = typer.Option(0, help="generated sets: the seed"),
):
    """Turn a source into webdataset shards + manifest.json (re-running resumes)."""
    from ..data.ingest import ingest

    _uri_option("--out", out_uri)
    m = ingest(source, out_uri, resolution=resolution, fit=fit, frames=frames, stride=stride,
               shard_size=shard_size, limit=limit, seed=seed)
    buckets = ", ".join(f"{b}: {v['samples']}" for b, v in m["buckets"].items())
    out.print(f"{m['total_samples']} samples in {len(m['shards'])} shards ({buckets}); "
              f"{m['skipped_count']} skipped → {out_uri}", highlight=False)
    for s in m["skipped"][:10]:
        err.print(f"skipped: {s['item']}: {s['reason']}", markup=False, highlight=False)
    if m["skipped_count"] > 10:
        err.print(f"... and {m['skipped_count'] - 10} more (manifest.json `skipped`)", highlight=False)


@data_app.command("encode")
@user_errors
def data_encode(
    in_uri: str = typer.Argument(..., help="pixel data set (the output of `data ingest`)"),
    vae: str = typer.Option("identity", help="VAE: a YAML file (job spec or its vae: section) or KIND[,key=value...]"),
    out_uri: str = typer.Option(..., "--out", help="where the latent shards and manifest.json go"),
):
    """Encode pixel shards to latent shards with Ray Data (re-running resumes)."""
    from ..data.encode import encode_dataset, parse_vae

    _uri_option("--out", out_uri)
    m = encode_dataset(in_uri, out_uri, parse_vae(vae))
    out.print(f"{m['total_samples']} latents {tuple(m['latent_shape'])} ({m['vae']}), mean {m['latent_mean']:.4f} "
              f"std {m['latent_std']:.4f} → {out_uri}", highlight=False)


@data_app.command("verify")
@user_errors
def data_verify(uri: str = typer.Argument(..., help="a data set (folder holding manifest.json)")):
    """Check every shard against the manifest's checksums; exit 2 naming the bad ones."""
    from ..data import shards

    bad = shards.verify(uri)
    if bad:
        for name in bad:
            err.print(f"error: {uri}/{name}: checksum does not match the manifest", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2)
    out.print(f"ok: {uri} ({len(shards.read_manifest(uri)['shards'])} shards)", highlight=False)


# -------------------------------------------------------------------------------- cluster


def _cluster_files(spec, out_dir: Path, job: Optional[Path]) -> None:
    from ..cluster.render import render
    from ..spec import load_job

    files, command = render(spec, out_dir, load_job(job) if job else None)
    for f in files:
        err.print(f"wrote {f}", highlight=False)
    out.print(command, highlight=False, soft_wrap=True)


@cluster_app.command("up")
@user_errors
def cluster_up(cluster: Path = typer.Argument(..., help="cluster YAML"),
               out_dir: Path = typer.Option(Path("build/cluster"), "--out", help="where rendered files go (aws, gcp, kubernetes)"),
               job: Optional[Path] = typer.Option(None, "--job", help="also render a KubeRay RayJob for this job spec")):
    """Start a cluster that runs here (embedded, local); for aws / gcp / kubernetes write the
    rendered files and print the command that starts it."""
    from .. import services
    from ..cluster import local
    from ..spec import load_cluster

    spec = load_cluster(cluster)
    if spec.kind == "embedded":
        with err.status("starting services (S3, MLflow, Ray)..."):
            ep = services.up(spec)
        out.print(ep.ray_dashboard, highlight=False)
    elif spec.kind == "local":
        with err.status(f"starting local cluster '{spec.name}' (head + {spec.nodes} raylets)..."):
            dash = local.up(spec)
        out.print(dash, highlight=False)
    elif spec.kind == "slurm":
        from ..cluster import slurm

        with err.status(f"waiting for Slurm allocation '{spec.name}' ({spec.nodes} nodes) and Ray on it..."):
            h = slurm.up(spec)
        err.print(f"slurm job {h['slurm_job_id']}: Ray on {len(h['nodes'])} nodes "
                  f"({', '.join(n['address'] for n in h['nodes'])})", highlight=False)
        out.print(h["dashboard"], highlight=False)
    elif spec.kind == "address":
        from ..cluster.launch import connect, jobs_client

        t = connect(spec)
        jobs_client(t.dashboard, t.token_env).list_jobs()  # reachable, and the token (if any) is accepted
        out.print(t.dashboard, highlight=False)
    else:
        _cluster_files(spec, out_dir, job)


@cluster_app.command("down")
@user_errors
def cluster_down(cluster: Path = typer.Argument(..., help="cluster YAML"),
                 out_dir: Path = typer.Option(Path("build/cluster"), "--out")):
    """Stop a cluster started here (local: its head, raylets and jobs; embedded: the services)."""
    from .. import services
    from ..cluster import local
    from ..spec import SpecError, load_cluster

    spec = load_cluster(cluster)
    if spec.kind == "local":
        stopped = local.down(spec)
    elif spec.kind == "slurm":
        from ..cluster import slurm

        stopped = slurm.down(spec)
    elif spec.kind == "embedded":
        stopped = services.down()
    elif spec.kind == "address":
        raise SpecError(str(cluster), "kind", "an address cluster is not ours to stop")
    else:
        cfg = next(iter(sorted(out_dir.glob(f"{spec.name}.*.yaml"))), None)
        out.print(f"ray down -y {cfg}" if spec.kind in ("aws", "gcp") and cfg else
                  f"kubectl delete -f {cfg}" if cfg else f"render first: ditforge cluster render {cluster} --out {out_dir}",
                  highlight=False)
        return
    out.print(f"stopped: {', '.join(stopped) or 'nothing was running'}", highlight=False)


@cluster_app.command("join")
@user_errors
def cluster_join(head: str = typer.Argument(..., help="the head's address: HOST or HOST:PORT (its GCS, default 6379)"),
                 num_cpus: Optional[int] = typer.Option(None, "--num-cpus", min=0, help="CPUs this node offers (default: all)"),
                 num_gpus: Optional[int] = typer.Option(None, "--num-gpus", min=0, help="GPUs this node offers (default: all)"),
                 resources: Optional[str] = typer.Option(None, "--resources", help='custom resources, JSON: \'{"ssd": 1}\'')):
    """Join this machine to a head served beyond loopback (`services up --cluster cluster/shared.yaml`
    there) as a Ray worker node, with the Ray token of this machine's environment."""
    from ..cluster.join import JoinError, join

    res = None
    if resources:
        try:
            res = json.loads(resources)
            assert isinstance(res, dict) and all(isinstance(v, (int, float)) for v in res.values())
        except (ValueError, AssertionError):
            raise JoinError(f"--resources {resources}: expected a JSON object of numbers, e.g. '{{\"ssd\": 1}}'") from None
    rec = join(head, num_cpus, num_gpus, res)
    out.print(f"joined {rec['head']} (node pid {rec['pid']}; `ditforge cluster leave` stops it)", highlight=False)


@cluster_app.command("leave")
@user_errors
def cluster_leave():
    """Stop this machine's node of a joined cluster (nothing else)."""
    from ..cluster.join import leave

    head = leave()
    out.print(f"left {head}" if head else "not joined to any head", highlight=False)


def _nodes_table(gcs: str) -> None:
    from ..cluster.join import nodes

    table = Table("node id", "address", "alive", "head", "resources")
    for r in nodes(gcs):
        table.add_row(r["node_id"][:12], r["address"], "yes" if r["alive"] else "no", "yes" if r["head"] else "",
                      ", ".join(f"{k}={v:g}" for k, v in sorted(r["resources"].items())))
    out.print(table)


@cluster_app.command("status")
@user_errors
def cluster_status(cluster: Optional[Path] = typer.Argument(None, help="cluster YAML (default: the cluster this machine "
                                                                           "joined, else the embedded one)")):
    """The cluster's nodes: pid, alive in Ray, node id, address and resources."""
    from .. import services
    from ..cluster import local
    from ..cluster.join import joined
    from ..spec import SpecError, load_cluster

    if cluster is None:
        now = joined()
        if now:
            return _nodes_table(now["head"])
        cluster_spec = None
    else:
        cluster_spec = load_cluster(cluster)
    spec = cluster_spec or load_cluster(None)
    if spec.kind == "embedded":
        services_status()
        if services._ray_ready(services.endpoints().ray_dashboard):
            _nodes_table(services.endpoints().ray_gcs)
        return
    if spec.kind == "slurm":
        from ..cluster import slurm

        rows = slurm.status(spec)
        table = Table("slurm job", "state", "ray node", "address")
        for r in rows:
            table.add_row(r["slurm_job_id"], r["state"], r["node"], r["address"])
        out.print(table if rows else f"cluster '{spec.name}': no allocation (run `ditforge cluster up`)")
        if not rows or rows[0]["state"] != "RUNNING":
            raise typer.Exit(1)
        return
    if spec.kind != "local":
        raise SpecError(str(cluster), "kind", f"status of a {spec.kind} cluster: use `ray status` / `kubectl get rayclusters`")
    table = Table("node", "pid", "alive", "node id", "resources")
    rows = local.status(spec)
    for r in rows:
        table.add_row(r["node"], str(r["pid"] or "-"), "yes" if r["alive"] else "no", (r["node_id"] or "-")[:12],
                      ", ".join(f"{k}={v:g}" for k, v in sorted(r["resources"].items())))
    out.print(table)
    if not all(r["alive"] for r in rows):
        raise typer.Exit(1)


@cluster_app.command("render")
@user_errors
def cluster_render(cluster: Path = typer.Argument(..., help="cluster YAML (aws, gcp, kubernetes, slurm)"),
                   out_dir: Path = typer.Option(..., "--out", help="output folder"),
                   job: Optional[Path] = typer.Option(None, "--job", help="also render a KubeRay RayJob for this job spec")):
    """Write the Ray cluster-launcher YAML (aws, gcp), KubeRay manifests (kubernetes) or the batch
    script (slurm; with --job, one that runs that job)."""
    from ..spec import SpecError, load_cluster

    spec = load_cluster(cluster)
    if spec.kind not in ("aws", "gcp", "kubernetes", "slurm"):
        raise SpecError(str(cluster), "kind", f"{spec.kind} clusters run here: nothing to render (use `ditforge cluster up`)")
    _cluster_files(spec, out_dir, job)

# ----------------------------------------------------------------------------- model-info


@app.command("model-info")
@user_errors
def model_info(
    job: Path = typer.Argument(..., help="job spec YAML"),
    sets: Optional[List[str]] = SetOpt,
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
):
    """Parameters, forward GFLOPs per sample (counted), latent shape and token count of a job's model."""
    from ..models.info import model_info as info
    from ..spec import load_job

    res = info(load_job(job, sets))
    if as_json:
        print(json.dumps(res))
        return
    table = Table("", str(job))
    for k, v in res.items():
        if v is not None:
            table.add_row(k, f"{v:,}" if isinstance(v, int) else str(v))
    out.print(table)


# ----------------------------------------------------------------------------------- demo


@app.command()
@user_errors
def demo(
    job: Path = typer.Option(Path("jobs/demo-image.yaml"), help="job spec to run"),
    sets: Optional[List[str]] = SetOpt,
    images: int = typer.Option(2048, help="how many shapes images (or moving-shapes clips, for a video job) to generate"),
    as_json: bool = typer.Option(False, "--json", help="end with one JSON line of results"),
):
    """The whole pipeline on the embedded default: data → shards → latents → training → samples."""
    from mlflow.tracking import MlflowClient

    from .. import services, storage
    from ..cluster.launch import submit as do_submit
    from ..data.encode import encode_dataset
    from ..data.ingest import ingest_shapes
    from ..spec import EmbeddedCluster, load_job

    t0 = time.time()
    spec = load_job(job, sets)
    with err.status("starting services (S3, MLflow, Ray)..."):
        ep = services.up(EmbeddedCluster())
    err.print(f"services up: S3 {ep.s3}, MLflow {ep.mlflow}, Ray {ep.ray_dashboard}", highlight=False)
    if spec.data.frames > 1:  # a video job: the generated moving-shapes clips it names
        from ..data.ingest import ingest

        # The pixels beside the latents the job names (…/X-latents → …/X-pixels).
        pixels = spec.data.train.removesuffix("/").removesuffix("-latents") + "-pixels"
        ingest("moving-shapes", pixels, limit=images, resolution=spec.data.resolution, frames=spec.data.frames,
               shard_size=64)  # enough shards for every worker to read its own
        err.print(f"data: {images} moving-shapes clips ({spec.data.frames} frames) → {pixels}", highlight=False)
    else:
        pixels = storage.join(spec.data.train.rsplit("/", 1)[0], "shapes-pixels")
        ingest_shapes(pixels, limit=images, resolution=32)
        err.print(f"data: {images} shapes images → {pixels}", highlight=False)
    encode_dataset(pixels, spec.data.train, spec.vae)  # each VAE actor builds its own from the spec
    err.print(f"latents ({spec.vae.kind} VAE) → {spec.data.train}", highlight=False)
    rec = do_submit(spec, EmbeddedCluster(), source=str(job))
    err.print(f"job {rec['job_id']}  run {rec['run_name']}", highlight=False)
    state = follow(rec)
    if state != "SUCCEEDED":
        raise typer.Exit(1)
    client = MlflowClient(rec["tracking_uri"])
    hist = sorted(client.get_metric_history(rec["mlflow_run_id"], "train/loss"), key=lambda m: m.step)
    run = client.get_run(rec["mlflow_run_id"])
    result = {
        "mlflow_run_id": rec["mlflow_run_id"], "tracking_uri": rec["tracking_uri"], "mlflow_url": _run_link(rec),
        "checkpoint_uri": rec["run_uri"], "steps": hist[-1].step if hist else 0,
        "initial_loss": hist[0].value if hist else None, "final_loss": hist[-1].value if hist else None,
        "samples": f"{run.info.artifact_uri}/samples/step_{spec.train.steps:08d}.png",
        "model": run.data.tags.get("ditforge.model"), "seconds": round(time.time() - t0, 1),
    }
    task_metrics = {k.removeprefix("tasks/"): round(v, 3) for k, v in run.data.metrics.items() if k.startswith("tasks/")}
    if task_metrics:  # a video-task job: each task's PSNR next to its baseline (train/task_quality.py)
        result["tasks"] = task_metrics
    out.print(f"\n[bold green]demo finished[/] in {result['seconds']:.0f}s: loss {result['initial_loss']:.3f} → "
              f"{result['final_loss']:.3f} over {result['steps']} steps")
    out.print(f"  MLflow run:  {result['mlflow_url']}", highlight=False)
    out.print(f"  samples:     {result['samples']}", highlight=False)
    out.print(f"  checkpoints: {result['checkpoint_uri']}", highlight=False)
    out.print(f"  model:       {result['model']}  (try: ditforge sample --model {result['model']})", highlight=False)
    if as_json:
        print(json.dumps(result))


def main(argv: list[str] | None = None) -> None:
    """Usage errors too (an unknown command or option, a bad option value, a missing argument)
    are one `error:` line and exit 2, instead of click's usage block."""
    try:  # typer >= 0.2x vendors its own click
        from typer._click import exceptions as click
    except ImportError:
        from click import exceptions as click

    try:
        code = app(args=argv, prog_name="ditforge", standalone_mode=False)
    except click.NoArgsIsHelpError as e:  # bare `ditforge` or `ditforge data`: the help
        e.show()
        code = e.exit_code
    except click.UsageError as e:
        where = e.ctx.command_path if e.ctx else "ditforge"
        err.print(f"error: {where}: {' '.join(e.format_message().split())}", markup=False, highlight=False,
                  soft_wrap=True)
        code = 2
    except click.ClickException as e:
        err.print(f"error: {' '.join(e.format_message().split())}", markup=False, highlight=False, soft_wrap=True)
        code = e.exit_code
    except getattr(click, "Abort", KeyboardInterrupt):  # typer's vendored click has no Abort
        code = 1
    sys.exit(code if isinstance(code, int) else 0)

