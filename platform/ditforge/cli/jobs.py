"""Jobs: validate, submit, status, logs, stop."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from .common import ClusterOpt, SetOpt, err, follow_with_progress, load_specs, out, print_error, user_errors, warn


@user_errors
def validate(files: List[Path] = typer.Argument(..., help="job or cluster YAML files")) -> None:
    """Check job and cluster specs; print one line per problem."""
    from ..spec import JobSpec, SpecError, load_any, spec_warnings

    bad = 0
    for f in files:
        try:
            spec = load_any(f)
            out.print(f"ok: {f} ({type(spec).__name__})", highlight=False)
            for w in spec_warnings(spec) if isinstance(spec, JobSpec) else []:
                warn(f"{f}: {w}")
        except SpecError as e:
            print_error(e)
            bad += 1
    if bad:
        raise typer.Exit(2)


@user_errors
def submit(
    job: Path = typer.Argument(..., help="job spec YAML"),
    cluster: Optional[Path] = ClusterOpt,
    sets: Optional[List[str]] = SetOpt,
    resume: Optional[str] = typer.Option(None, help="continue run RUN from its latest complete checkpoint"),
    wait: bool = typer.Option(False, "--wait", help="follow the job with a progress bar until it ends"),
    force_resume: bool = typer.Option(
        False, "--force-resume", help="continue the run even though a field that defines it changed"
    ),
) -> None:
    """Submit a training job through the Ray Jobs API and print its job id."""
    from ..cluster.launch import submit as do_submit
    from ..runs.follow import run_link
    from ..spec import spec_warnings

    spec, cl = load_specs(job, cluster, sets)
    for w in spec_warnings(spec):
        warn(f"{job}: {w}")
    rec = do_submit(spec, cl, resume=resume, source=str(job), force_resume=force_resume)
    out.print(rec["job_id"], highlight=False)
    err.print(f"run {rec['run_name']}  mlflow {run_link(rec)}", highlight=False)
    if wait:
        state = follow_with_progress(rec)
        if state != "SUCCEEDED":
            raise typer.Exit(1)


@user_errors
def status(job: Optional[str] = typer.Argument(None, help="job id (default: all jobs)")) -> None:
    """Jobs with their state, step, loss, samples/s and MLflow link."""
    from ..cluster.jobs import all_records
    from ..runs.follow import find_record, status as job_status

    recs = [find_record(job)] if job else all_records()
    table = Table("job", "state", "step", "loss", "samples/s", "mlflow", "error")
    for rec in recs:
        s = job_status(rec)
        m = s["metrics"]
        step = f"{int(m['train/step'])}/{rec['steps']}" if "train/step" in m else "-"
        table.add_row(
            rec["job_id"],
            s["state"],
            step,
            f"{m['train/loss']:.4f}" if "train/loss" in m else "-",
            f"{m['train/samples_per_s']:.1f}" if "train/samples_per_s" in m else "-",
            s["link"],
            s["error"],
        )
    out.print(table)


@user_errors
def logs(job: str = typer.Argument(..., help="job id"), follow_: bool = typer.Option(False, "--follow", "-f")) -> None:
    """Print a job's driver and worker logs."""
    from ..runs.follow import find_record, write_logs

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    write_logs(find_record(job), write, follow=follow_)


@user_errors
def stop(
    job: str = typer.Argument(..., help="job id"),
    grace: float = typer.Option(120.0, help="seconds to wait for the final checkpoint before Ray stops the job"),
) -> None:
    """Stop a running job; with `checkpoint.on_stop: true` it saves a final checkpoint first."""
    from ..cluster.launch import stop as do_stop
    from ..runs.follow import find_record, stopped_on_request

    rec = find_record(job)
    if rec.get("checkpoint_on_stop"):
        err.print(f"asking {job} to save a final checkpoint and stop (up to {grace:.0f}s)...", highlight=False)
    state, forced = do_stop(rec, grace)
    if stopped_on_request(rec):
        state = "STOPPED (final checkpoint saved)" if rec.get("checkpoint_on_stop") else "STOPPED"
    out.print(f"{job}: {state}{' (stopped by Ray)' if forced else ''}", highlight=False, soft_wrap=True)
