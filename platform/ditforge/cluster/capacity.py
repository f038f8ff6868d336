"""Does a job fit the cluster? Checked before Ray Train asks for a placement group, because on a
fixed-size cluster an impossible placement group waits forever instead of failing."""

from __future__ import annotations

import math

from ..spec import ResourcesSpec


def slots(node: dict[str, float], bundle: dict[str, float]) -> int:
    """How many worker bundles fit on one node's total resources."""
    return min((math.floor(node.get(k, 0.0) / v + 1e-9) for k, v in bundle.items() if v > 0), default=0)


def shortfall(res: ResourcesSpec, nodes: list[dict[str, float]]) -> str | None:
    """None when `res.workers` bundles fit on `nodes` (each a node's total resources) under the
    placement strategy; otherwise one sentence saying what is missing."""
    bundle = res.per_worker()
    # an elastic job starts with what fits (elastic: min_workers is set)
    workers = res.min_workers if res.elastic and res.min_workers is not None else res.workers
    need = {k: v * workers for k, v in bundle.items() if not k.startswith("accelerator_type:")}
    have = {k: sum(n.get(k, 0.0) for n in nodes) for k in need}
    ask = f"{workers} workers x {_fmt(bundle)}"
    for k, v in need.items():
        if have[k] < v:
            return f"the job needs {ask} = {v:g} {k}, but the cluster has {have[k]:g} {k} in all"
    for k in bundle:
        if k.startswith("accelerator_type:") and not any(k in n for n in nodes):
            return f"the job needs {k.split(':', 1)[1]} GPUs (resources.accelerator_type), but no node has them"
    per_node = [slots(n, bundle) for n in nodes]
    if res.placement == "STRICT_SPREAD":
        fit = sum(1 for s in per_node if s > 0)
        where = "on different nodes"
    elif res.placement == "STRICT_PACK":
        fit = max(per_node, default=0)
        where = "on one node"
    else:  # PACK and SPREAD are preferences: any node with room may take a worker
        fit = sum(per_node)
        where = "on the cluster's nodes"
    if fit < workers:
        return f"the job needs {ask} {where} (placement {res.placement}), but only {fit} fit: per node {per_node}"
    return None


def _fmt(bundle: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in bundle.items() if not k.startswith("accelerator_type:")) + "}"


def nodes_from_dashboard(dashboard: str) -> list[dict[str, float]]:
    """Alive nodes' total resources through the dashboard's state API (no ray.init needed)."""
    from ray.util.state import list_nodes

    from .. import credentials

    credentials.use_ray_token()  # our heads run with token auth; the state API sends it in this mode
    nodes = list_nodes(address=dashboard, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
    return [dict(n.resources_total) for n in nodes]


def nodes_in_cluster() -> list[dict[str, float]]:
    """From inside a Ray job (after ray.init)."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def autoscaling() -> bool:
    """An autoscaling cluster grows to fit: Ray Train itself checks it against the autoscaler's
    maximum (a private Ray API, so any failure counts as "fixed size")."""
    try:
        from ray._private.state import state

        return bool(state.get_max_resources_from_cluster_config())
    except Exception:
        return False
