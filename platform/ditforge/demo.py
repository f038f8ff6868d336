"""The demo: the whole pipeline on the embedded default (services up, generated data → pixel shards →
latents, a training job submitted and followed to its end) and what it made. `ditforge demo` prints it."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Callable, ContextManager


class JobEnded(Exception):
    """The demo's training job ended other than SUCCEEDED (the follow callback has shown why)."""

    def __init__(self, rec: dict, state: str):
        self.rec, self.state = rec, state
        super().__init__(f"job {rec['job_id']} {state}")


def run(
    job: Path,
    sets: list[str] | None,
    images: int,
    *,
    follow: Callable[[dict], str],
    say: Callable[[str], None] = lambda line: None,
    waiting: Callable[[str], ContextManager] = lambda what: contextlib.nullcontext(),
) -> dict:
    """Run the demo of job spec JOB (with --set SETS) on IMAGES generated images (or clips, for a video
    job) and return its results: MLflow run and link, checkpoints, loss over the steps, samples, model.

    FOLLOW(job record) follows the submitted job and returns its final state; SAY gets one line per
    step done; WAITING(what) wraps starting the services. JobEnded when the job does not succeed."""
    from mlflow.tracking import MlflowClient

    from . import services, storage
    from .cluster.launch import submit
    from .data.encode import encode_dataset
    from .data.ingest import ingest_shapes
    from .data.parallel import ray_session
    from .runs.follow import run_link
    from .spec import EmbeddedCluster, load_job

    t0 = time.time()
    spec = load_job(job, sets)
    with waiting("starting services (S3, MLflow, Ray)..."):
        ep = services.up(EmbeddedCluster())
    say(f"services up: S3 {ep.s3}, MLflow {ep.mlflow}, Ray {ep.ray_dashboard}")
    with ray_session(fallback=services.running_ray):  # one Ray for the ingest and the encode
        if spec.data.frames > 1:  # a video job: the generated moving-shapes clips it names
            from .data.ingest import ingest

            # The pixels beside the latents the job names (…/X-latents → …/X-pixels).
            pixels = spec.data.train.removesuffix("/").removesuffix("-latents") + "-pixels"
            ingest(
                "moving-shapes",
                pixels,
                limit=images,
                resolution=spec.data.resolution,
                frames=spec.data.frames,
                shard_size=64,
            )  # enough shards for every worker to read its own
            say(f"data: {images} moving-shapes clips ({spec.data.frames} frames) → {pixels}")
        else:
            pixels = storage.join(spec.data.train.rsplit("/", 1)[0], "shapes-pixels")
            ingest_shapes(pixels, limit=images, resolution=32)
            say(f"data: {images} shapes images → {pixels}")
        encode_dataset(pixels, spec.data.train, spec.vae)  # each VAE actor builds its own from the spec
        say(f"latents ({spec.vae.kind} VAE) → {spec.data.train}")
        for src in spec.data.mix:  # joint training: the further sets, generated the same way
            from .data.ingest import ingest

            pixels = src.train.removesuffix("/").removesuffix("-latents") + "-pixels"
            kind = "moving-shapes" if src.frames > 1 else "shapes"
            res = src.resolution or spec.data.resolution
            ingest(kind, pixels, limit=images, resolution=res, frames=src.frames, shard_size=64)
            say(f"data: {images} {kind} {'clips' if src.frames > 1 else 'images'} ({res} px) → {pixels}")
            encode_dataset(pixels, src.train, spec.vae)
            say(f"latents ({spec.vae.kind} VAE) → {src.train}")
    rec = submit(spec, EmbeddedCluster(), source=str(job))
    say(f"job {rec['job_id']}  run {rec['run_name']}")
    state = follow(rec)
    if state != "SUCCEEDED":
        raise JobEnded(rec, state)
    client = MlflowClient(rec["tracking_uri"])
    hist = sorted(client.get_metric_history(rec["mlflow_run_id"], "train/loss"), key=lambda m: m.step)
    run = client.get_run(rec["mlflow_run_id"])
    result = {
        "mlflow_run_id": rec["mlflow_run_id"],
        "tracking_uri": rec["tracking_uri"],
        "mlflow_url": run_link(rec),
        "checkpoint_uri": rec["run_uri"],
        "steps": hist[-1].step if hist else 0,
        "initial_loss": hist[0].value if hist else None,
        "final_loss": hist[-1].value if hist else None,
        "samples": f"{run.info.artifact_uri}/samples/step_{spec.train.steps:08d}.png",
        "model": run.data.tags.get("ditforge.model"),
        "seconds": round(time.time() - t0, 1),
    }
    task_metrics = {
        k.removeprefix("validation/tasks/"): round(v, 3)
        for k, v in run.data.metrics.items()
        if k.startswith("validation/tasks/")
    }
    if task_metrics:  # a video-task job: each task's PSNR next to its baseline (evaluate/task_quality.py)
        result["tasks"] = task_metrics
    return result
