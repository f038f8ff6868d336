"""What every verb module shares: the consoles, user errors → one `error:` line and exit 2, the
`--set` / `--cluster` options, spec loading and following a job with a progress bar."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional, ParamSpec, TypeVar

import typer
from rich.console import Console

if TYPE_CHECKING:
    from ..spec import ClusterSpec, JobSpec

_P = ParamSpec("_P")
_R = TypeVar("_R")

out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True)

SetOpt = typer.Option(None, "--set", help="override a spec field: --set train.steps=100 (repeatable)")
ClusterOpt = typer.Option(None, "--cluster", "-c", help="cluster YAML (default: embedded)")


def user_errors(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Known user errors → one line on stderr and exit 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        from ..cluster.jobs import SubmitError
        from ..cluster.render import RenderError
        from ..data.shards import DataError
        from ..services import ServiceError
        from ..spec import SpecError
        from ..storage import URIError
        from ..models.convert import PretrainedError
        from ..runs.folder import RunError
        from ..train.checkpoint import UnsafeCheckpoint
        from .. import services

        try:  # the services this machine runs may want credentials, and Ray always its token
            services.use_client_auth()
        except ValueError as e:  # a credentials file that is not what it should be
            print_error(e)
            raise typer.Exit(2)
        try:
            return fn(*args, **kwargs)
        except (
            SpecError,
            DataError,
            SubmitError,
            ServiceError,
            RenderError,
            URIError,
            UnsafeCheckpoint,
            PretrainedError,
            RunError,
        ) as e:
            print_error(e)
            raise typer.Exit(2)

    return wrapper


def print_error(e: Exception) -> None:
    """`error: <line>` on stderr, one per problem (a spec with several problems has several lines)."""
    from ..credentials import redact

    for line in getattr(e, "lines", None) or [str(e)]:
        err.print(f"error: {redact(line)}", markup=False, highlight=False, soft_wrap=True)


def warn(line: str) -> None:
    err.print(f"warning: {line}", markup=False, highlight=False, soft_wrap=True)


def load_specs(job: Path, cluster: Optional[Path], sets: Optional[List[str]]) -> tuple[JobSpec, ClusterSpec]:
    """(job spec, cluster spec): `--set cluster.mode=job` overrides the cluster spec; every other
    --set, the job spec."""
    from ..spec import load_cluster, load_job

    cluster_sets = [x.removeprefix("cluster.") for x in sets or [] if x.startswith("cluster.")]
    job_sets = [x for x in sets or [] if not x.startswith("cluster.")]
    return load_job(job, job_sets), load_cluster(cluster, cluster_sets)


def follow_with_progress(rec: dict) -> str:
    """Follow a submitted job with a progress bar fed by the run's `train/step` metric until the Ray
    job ends; when it did not succeed, the end of its log and why. Returns the job's final state."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from ..runs.follow import follow, job_error, log_tail

    cols = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*cols, console=err) as bar:
        task = bar.add_task(rec["run_name"], total=rec["steps"], info="starting")

        def progress(m: dict) -> None:
            info = f"loss {m.get('train/loss', float('nan')):.4f}  {m.get('train/samples_per_s', 0):.0f} samples/s"
            bar.update(task, completed=int(m["train/step"]), info=info)

        state = follow(rec, progress)
    if state != "SUCCEEDED":
        err.print(log_tail(rec), markup=False, highlight=False)
        err.print(
            f"job {rec['job_id']} {state}: {job_error(rec) or 'see `ditforge logs ' + rec['job_id'] + '`'}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    return state
