"""cluster: start, stop, join, leave, show and render clusters described by a cluster YAML."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.table import Table

from .common import err, out, user_errors
from .services import services_status

if TYPE_CHECKING:
    from ..spec import ClusterSpec

app = typer.Typer(no_args_is_help=True, help="Start, stop and render clusters described by a cluster YAML.")


def _cluster_files(spec: ClusterSpec, out_dir: Path, job: Optional[Path]) -> None:
    from ..cluster.render import render
    from ..spec import load_job

    files, command = render(spec, out_dir, load_job(job) if job else None)
    for f in files:
        err.print(f"wrote {f}", highlight=False)
    out.print(command, highlight=False, soft_wrap=True)


@app.command("up")
@user_errors
def cluster_up(
    cluster: Path = typer.Argument(..., help="cluster YAML"),
    out_dir: Path = typer.Option(Path("build/cluster"), "--out", help="where rendered files go (aws, gcp, kubernetes)"),
    job: Optional[Path] = typer.Option(None, "--job", help="also render a KubeRay RayJob for this job spec"),
) -> None:
    """Start a cluster that runs here (embedded, local); for aws / gcp / kubernetes write the
    rendered files and print the command that starts it."""
    from .. import services
    from ..cluster import local
    from ..spec import AddressCluster, EmbeddedCluster, LocalCluster, SlurmCluster, load_cluster

    spec = load_cluster(cluster)
    if spec.kind == "embedded":
        assert isinstance(spec, EmbeddedCluster)  # load_cluster builds the model of its kind
        with err.status("starting services (S3, MLflow, Ray)..."):
            ep = services.up(spec)
        out.print(ep.ray_dashboard, highlight=False)
    elif spec.kind == "local":
        assert isinstance(spec, LocalCluster)
        with err.status(f"starting local cluster '{spec.name}' (head + {spec.nodes} raylets)..."):
            dash = local.up(spec)
        out.print(dash, highlight=False)
    elif spec.kind == "slurm":
        from ..cluster import slurm

        assert isinstance(spec, SlurmCluster)
        with err.status(f"waiting for Slurm allocation '{spec.name}' ({spec.nodes} nodes) and Ray on it..."):
            h = slurm.up(spec)
        err.print(
            f"slurm job {h['slurm_job_id']}: Ray on {len(h['nodes'])} nodes "
            f"({', '.join(n['address'] for n in h['nodes'])})",
            highlight=False,
        )
        out.print(h["dashboard"], highlight=False)
    elif spec.kind == "address":
        from ..cluster.jobs import jobs_client
        from ..cluster.launch import connect

        assert isinstance(spec, AddressCluster)
        t = connect(spec)
        jobs_client(t.dashboard, t.token_env).list_jobs()  # reachable, and the token (if any) is accepted
        out.print(t.dashboard, highlight=False)
    else:
        _cluster_files(spec, out_dir, job)


@app.command("down")
@user_errors
def cluster_down(
    cluster: Path = typer.Argument(..., help="cluster YAML"),
    out_dir: Path = typer.Option(Path("build/cluster"), "--out"),
) -> None:
    """Stop a cluster started here (local: its head, raylets and jobs; embedded: the services)."""
    from .. import services
    from ..cluster import local
    from ..spec import LocalCluster, SlurmCluster, SpecError, load_cluster

    spec = load_cluster(cluster)
    if spec.kind == "local":
        assert isinstance(spec, LocalCluster)  # load_cluster builds the model of its kind
        stopped = local.down(spec)
    elif spec.kind == "slurm":
        from ..cluster import slurm

        assert isinstance(spec, SlurmCluster)
        stopped = slurm.down(spec)
    elif spec.kind == "embedded":
        stopped = services.down()
    elif spec.kind == "address":
        raise SpecError(str(cluster), "kind", "an address cluster is not ours to stop")
    else:
        cfg = next(iter(sorted(out_dir.glob(f"{spec.name}.*.yaml"))), None)
        out.print(
            f"ray down -y {cfg}"
            if spec.kind in ("aws", "gcp") and cfg
            else f"kubectl delete -f {cfg}"
            if cfg
            else f"render first: ditforge cluster render {cluster} --out {out_dir}",
            highlight=False,
        )
        return
    out.print(f"stopped: {', '.join(stopped) or 'nothing was running'}", highlight=False)


@app.command("join")
@user_errors
def cluster_join(
    head: str = typer.Argument(..., help="the head's address: HOST or HOST:PORT (its GCS, default 6379)"),
    num_cpus: Optional[int] = typer.Option(None, "--num-cpus", min=0, help="CPUs this node offers (default: all)"),
    num_gpus: Optional[int] = typer.Option(None, "--num-gpus", min=0, help="GPUs this node offers (default: all)"),
    resources: Optional[str] = typer.Option(None, "--resources", help="custom resources, JSON: '{\"ssd\": 1}'"),
) -> None:
    """Join this machine to a head served beyond loopback (`services up --cluster cluster/shared.yaml`
    there) as a Ray worker node, with the Ray token of this machine's environment."""
    from ..cluster.join import JoinError, join

    res = None
    if resources:
        try:
            res = json.loads(resources)
            assert isinstance(res, dict) and all(isinstance(v, (int, float)) for v in res.values())
        except (ValueError, AssertionError):
            raise JoinError(
                f"--resources {resources}: expected a JSON object of numbers, e.g. '{{\"ssd\": 1}}'"
            ) from None
    rec = join(head, num_cpus, num_gpus, res)
    out.print(f"joined {rec['head']} (node pid {rec['pid']}; `ditforge cluster leave` stops it)", highlight=False)


@app.command("leave")
@user_errors
def cluster_leave() -> None:
    """Stop this machine's node of a joined cluster (nothing else)."""
    from ..cluster.join import leave

    head = leave()
    out.print(f"left {head}" if head else "not joined to any head", highlight=False)


def _nodes_table(gcs: str) -> None:
    from ..cluster.join import nodes

    table = Table("node id", "address", "alive", "head", "resources")
    for r in nodes(gcs):
        table.add_row(
            r["node_id"][:12],
            r["address"],
            "yes" if r["alive"] else "no",
            "yes" if r["head"] else "",
            ", ".join(f"{k}={v:g}" for k, v in sorted(r["resources"].items())),
        )
    out.print(table)


@app.command("status")
@user_errors
def cluster_status(
    cluster: Optional[Path] = typer.Argument(
        None, help="cluster YAML (default: the cluster this machine joined, else the embedded one)"
    ),
) -> None:
    """The cluster's nodes: pid, alive in Ray, node id, address and resources."""
    from .. import services
    from ..cluster import local
    from ..cluster.join import joined
    from ..spec import LocalCluster, SlurmCluster, SpecError, load_cluster

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
        if services.ray_ready(services.endpoints().ray_dashboard):
            _nodes_table(services.endpoints().ray_gcs)
        return
    if spec.kind == "slurm":
        from ..cluster import slurm

        assert isinstance(spec, SlurmCluster)  # load_cluster builds the model of its kind
        rows = slurm.status(spec)
        table = Table("slurm job", "state", "ray node", "address")
        for r in rows:
            table.add_row(r["slurm_job_id"], r["state"], r["node"], r["address"])
        out.print(table if rows else f"cluster '{spec.name}': no allocation (run `ditforge cluster up`)")
        if not rows or rows[0]["state"] != "RUNNING":
            raise typer.Exit(1)
        return
    if spec.kind != "local":
        raise SpecError(
            str(cluster), "kind", f"status of a {spec.kind} cluster: use `ray status` / `kubectl get rayclusters`"
        )
    assert isinstance(spec, LocalCluster)
    table = Table("node", "pid", "alive", "node id", "resources")
    rows = local.status(spec)
    for r in rows:
        table.add_row(
            r["node"],
            str(r["pid"] or "-"),
            "yes" if r["alive"] else "no",
            (r["node_id"] or "-")[:12],
            ", ".join(f"{k}={v:g}" for k, v in sorted(r["resources"].items())),
        )
    out.print(table)
    if not all(r["alive"] for r in rows):
        raise typer.Exit(1)


@app.command("render")
@user_errors
def cluster_render(
    cluster: Path = typer.Argument(..., help="cluster YAML (aws, gcp, kubernetes, slurm)"),
    out_dir: Path = typer.Option(..., "--out", help="output folder"),
    job: Optional[Path] = typer.Option(None, "--job", help="also render a KubeRay RayJob for this job spec"),
) -> None:
    """Write the Ray cluster-launcher YAML (aws, gcp), KubeRay manifests (kubernetes) or the batch
    script (slurm; with --job, one that runs that job)."""
    from ..spec import SpecError, load_cluster

    spec = load_cluster(cluster)
    if spec.kind not in ("aws", "gcp", "kubernetes", "slurm"):
        raise SpecError(
            str(cluster), "kind", f"{spec.kind} clusters run here: nothing to render (use `ditforge cluster up`)"
        )
    _cluster_files(spec, out_dir, job)
