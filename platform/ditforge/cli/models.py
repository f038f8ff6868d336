"""Models: export, register, sample, model-info."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, List, Optional

import typer
from rich.table import Table

from .common import SetOpt, out, user_errors

if TYPE_CHECKING:
    from ..models.dit import DiT


@user_errors
def export_cmd(
    src: str = typer.Argument(..., help="a run (s3://.../runs/RUN), a step folder, or a run name with --runs"),
    dest: str = typer.Option(..., "--out", help="URI of the folder to write (file://, s3://)"),
    runs: Optional[str] = typer.Option(None, help="checkpoint.uri to look RUN up in, when SRC is a bare run name"),
    fmt: str = typer.Option(
        "ditforge", "--format", help="ditforge (raw + EMA safetensors, model.json) or diffusers (a DiTPipeline folder)"
    ),
    weights: str = typer.Option("ema", help="diffusers format: ema or raw weights"),
) -> None:
    """Write consolidated raw + EMA weights (safetensors) and model.json from a checkpoint, or a
    folder diffusers' DiTPipeline.from_pretrained loads (--format diffusers)."""
    from .. import storage
    from ..cluster.jobs import SubmitError
    from ..spec import SpecError
    from ..inference.export import export, export_diffusers

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
        extra = f" (DiTPipeline, {cfg['scheduler']}, " + (
            "vae/ included)"
            if cfg["vae_exported"]
            else f"no vae/: the {cfg['vae']['kind']} VAE has no AutoencoderKL form)"
        )
    if cfg.get("lora"):  # merged weights, and the adapter alone beside them (models/lora.py)
        where = "adapter/ (peft)"
        if fmt == "diffusers":
            adapter = cfg.get("lora_adapter") or ""
            where = "transformer_lora/ (peft)" if adapter == "transformer_lora" else f"no adapter: {adapter}"
        extra += f"; LoRA rank {cfg['lora']['rank']} merged, {where}"
    out.print(f"exported step {cfg['step']} of {cfg['checkpoint']} → {dest}{extra}", highlight=False)


@user_errors
def register(
    run: str = typer.Argument(..., help="the run folder (s3://.../runs/RUN) whose registration failed"),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI (default: the embedded server)"),
) -> None:
    """Register a finished run's newest complete checkpoint in MLflow again (after a failed registration)."""
    from .. import services, storage
    from ..cluster.jobs import SubmitError
    from ..runs.register import register as do_register

    try:
        model = do_register(storage.absolute(run), tracking_uri or services.endpoints().mlflow)
    except FileNotFoundError as e:
        raise SubmitError(f"{run}: {e}") from None
    out.print(f"registered {model} from {run}", highlight=False)


def _fetch(model: str, weights: str, tracking_uri: Optional[str]) -> tuple[DiT, dict[str, Any]]:
    """--model / --weights / --tracking-uri → (DiT, model.json dict), problems worded as those options."""
    from .. import services
    from ..cluster.jobs import SubmitError
    from ..models.fetch import FetchError, fetch_model, from_mlflow
    from ..spec import SpecError

    if weights not in ("ema", "raw"):
        raise SpecError("--weights", weights, "expected ema or raw")
    if from_mlflow(model) and not tracking_uri:  # the embedded tracking server
        tracking_uri = services.endpoints().mlflow
    try:
        return fetch_model(model, weights, tracking_uri)
    except FetchError as e:
        if e.about == "tracking_uri":
            raise SpecError("--tracking-uri", "", e.reason) from None
        raise SubmitError(f"--model {model}: {e.reason}") from None


@user_errors
def sample(
    model: str = typer.Option(..., "--model", help="models:/NAME/VERSION, runs:/ID/model, or an export folder URI"),
    png: Optional[Path] = typer.Option(None, "--out", help="PNG to write (grid); with --task .gif, .mp4 or .npy"),
    per_class: Optional[int] = typer.Option(None, help="samples per class (grid columns)"),
    steps: Optional[int] = typer.Option(None, help="Euler steps"),
    cfg_scale: Optional[float] = typer.Option(None, help="classifier-free guidance scale"),
    seed: Optional[int] = typer.Option(None),
    weights: str = typer.Option("ema", help="ema or raw"),
    tracking_uri: Optional[str] = typer.Option(
        None,
        "--tracking-uri",
        envvar="MLFLOW_TRACKING_URI",
        help="MLflow server for models:/ and runs:/ (default: the embedded one)",
    ),
    task: Optional[str] = typer.Option(
        None,
        help="video task: predict | predict_backward | interpolate | image_to_video | any_frames | complete "
        "(needs --given)",
    ),
    given: Optional[Path] = typer.Option(
        None, "--given", help="the condition: a video (mp4/webm/gif), an image, or a .npy of uint8 frames (T, H, W, 3)"
    ),
    k: Optional[int] = typer.Option(
        None, "--k", help="predict / interpolate: given frames (default: the most trained)"
    ),
    frames_given: Optional[str] = typer.Option(
        None, "--frames", help="any_frames: the given frames, e.g. 0,3 (of the whole clip; --given may hold only these)"
    ),
    region: Optional[str] = typer.Option(
        None,
        "--region",
        help="complete: the box to generate, T0:T1,Y0:Y1,X0:X1 in frames and pixels, ends excluded "
        "(default: the centre half of every frame)",
    ),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object saying what was written"),
) -> None:
    """Generate a class-conditional sample grid, or (--task) fill in a video around given frames."""
    from ..spec import SampleSpec, SpecError, VAESpec

    for name, value in (("--given", given), ("--k", k), ("--frames", frames_given), ("--region", region)):
        if task is None and value is not None:
            raise SpecError(name, str(value), "needs --task")
    if task is not None:
        from ..data.clips import OUT_EXTS

        if given is None:
            raise SpecError("--task", task, "needs --given PATH (the frames to condition on)")
        if png is None or png.suffix.lower().lstrip(".") not in OUT_EXTS:
            raise SpecError(
                "--out", str(png or ""), f"with --task, give a file ending in {', '.join('.' + e for e in OUT_EXTS)}"
            )
    png = png or Path("samples.png")
    net, cfg = _fetch(model, weights, tracking_uri)
    s = SampleSpec(**cfg["sample"])
    s = s.model_copy(
        update={
            k_: v
            for k_, v in dict(per_class=per_class, steps=steps, cfg_scale=cfg_scale, seed=seed).items()
            if v is not None
        }
    )
    from ..objectives import build_objective
    from ..spec import ObjectiveSpec

    objective = build_objective(ObjectiveSpec(**cfg.get("objective", {})))  # older exports: rectified flow
    if task is not None:
        from ..data.clips import read_clip, write_clip
        from ..inference.sampling import sample_task

        assert given is not None  # checked above: --task needs --given
        clip = read_clip(given)
        frames = sample_task(net, cfg, objective, task, clip, k, s, frames_given=frames_given, region=region)
        write_clip(frames, png)
        result = {
            "out": str(png),
            "task": task,
            "frames": int(frames.shape[0]),
            "size": list(frames.shape[1:3]),
            "given": str(given),
            "steps": s.steps,
            "sampler": s.sampler,
            "weights": cfg["weights"],
        }
        if as_json:
            print(json.dumps(result))
        else:
            out.print(
                f"{png}: {task}, {frames.shape[0]} frames {frames.shape[1]}x{frames.shape[2]} from {given} "
                f"({cfg['weights']} weights, {s.steps} {s.sampler} steps)",
                highlight=False,
            )
        return
    from ..inference.sampling import sample_grid

    files = sample_grid(net, tuple(cfg["latent_shape"]), s, VAESpec(**cfg["vae"]), str(png), objective=objective)
    if as_json:
        print(
            json.dumps(
                {
                    "out": files,
                    "classes": net.cfg.num_classes,
                    "per_class": s.per_class,
                    "steps": s.steps,
                    "sampler": s.sampler,
                    "weights": cfg["weights"],
                }
            )
        )
        return
    out.print(
        f"{png}: {net.cfg.num_classes} classes x {s.per_class} samples ({cfg['weights']} weights, "
        f"{s.steps} {s.sampler} steps, cfg {s.cfg_scale})",
        highlight=False,
    )


@user_errors
def model_info(
    job: Path = typer.Argument(..., help="job spec YAML"),
    sets: Optional[List[str]] = SetOpt,
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
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
