"""services: the embedded S3 server, MLflow server and Ray head (up, down, status); ui."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .common import ClusterOpt, err, out, user_errors

app = typer.Typer(no_args_is_help=True, help="The embedded S3 server, MLflow server and Ray head.")


@user_errors
def ui() -> None:
    """Print the MLflow UI address of the embedded tracking server (starting it if needed), in its model-training view."""
    from .. import services
    from ..train.tracking import ui_link

    ep = services.up(ray=False)
    out.print(ui_link(ep.mlflow), highlight=False)


@app.command("up")
@user_errors
def services_up(cluster: Optional[Path] = ClusterOpt) -> None:
    """Start (or reuse) the S3 server, MLflow and the Ray head, all on 127.0.0.1."""
    from .. import services
    from ..spec import EmbeddedCluster, SpecError, load_cluster

    spec = load_cluster(cluster)
    if spec.kind != "embedded":
        raise SpecError(
            str(cluster),
            "kind",
            f"services up starts the embedded cluster; for kind {spec.kind} use `ditforge cluster up {cluster}`",
        )
    assert isinstance(spec, EmbeddedCluster)  # load_cluster builds the model of its kind
    with err.status("starting services (S3, MLflow, Ray)..."):
        ep = services.up(spec)
    for k, v in ep.to_dict().items():
        out.print(f"{k:14s} {v}", highlight=False)


@app.command("down")
@user_errors
def services_down() -> None:
    """Stop the embedded services (their data stays under .ditforge/)."""
    from .. import services

    stopped = services.down()
    out.print(f"stopped: {', '.join(stopped) or 'nothing was running'}", highlight=False)


@app.command("status")
@user_errors
def services_status() -> None:
    from .. import services

    table = Table("service", "url", "pid", "up", "check")
    for s in services.status():
        table.add_row(s["service"], s["url"], str(s["pid"] or "-"), "yes" if s["up"] else "no", s["check"] or "passed")
    out.print(table)
