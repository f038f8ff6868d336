"""demo: the whole pipeline on the embedded default (ditforge/demo.py), and its summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from .common import SetOpt, err, follow_with_progress, out, user_errors


@user_errors
def demo(
    job: Path = typer.Option(Path("jobs/demo-image.yaml"), help="job spec to run"),
    sets: Optional[List[str]] = SetOpt,
    images: int = typer.Option(
        2048, help="how many shapes images (or moving-shapes clips, for a video job) to generate"
    ),
    as_json: bool = typer.Option(False, "--json", help="end with one JSON line of results"),
) -> None:
    """The whole pipeline on the embedded default: data → shards → latents → training → samples."""
    from ..demo import JobEnded, run

    try:
        result = run(
            job,
            sets,
            images,
            follow=follow_with_progress,
            say=lambda line: err.print(line, highlight=False),
            waiting=err.status,
        )
    except JobEnded:  # follow_with_progress has printed the end of its log and why
        raise typer.Exit(1)
    out.print(
        f"\n[bold green]demo finished[/] in {result['seconds']:.0f}s: loss {result['initial_loss']:.3f} → "
        f"{result['final_loss']:.3f} over {result['steps']} steps"
    )
    out.print(f"  MLflow run:  {result['mlflow_url']}", highlight=False)
    out.print(f"  samples:     {result['samples']}", highlight=False)
    out.print(f"  checkpoints: {result['checkpoint_uri']}", highlight=False)
    out.print(f"  model:       {result['model']}  (try: ditforge sample --model {result['model']})", highlight=False)
    if as_json:
        print(json.dumps(result))
