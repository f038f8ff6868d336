"""This machine as a Ray worker node of a head elsewhere: `ditforge cluster join HEAD`, `leave`.

The head is `ditforge services up --cluster cluster/shared.yaml` on another machine (the embedded
services served beyond loopback, Ray with token auth). The node is one `ray start --address=HEAD
--block` in its own session with a pid file (`$DITFORGE_HOME/run/node.pid`), like the embedded
head, so `leave` stops exactly that node (`ray stop` would stop every Ray on the machine). Before
anything starts, the head is asked over gRPC whether it answers and whether it takes this
machine's token: a bad join is one line within seconds, not a raylet retrying for minutes.

What the node's workers need reaches them through its environment (Ray workers inherit the
raylet's): the Ray token, the S3 keys and endpoint of the head (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL_S3=http://HEAD:8333) and the MLflow credentials, all
from the environment of `ditforge cluster join`.
"""

from __future__ import annotations

import json
import os
import re
import time

from .. import credentials, procs, raysite, services, storage

NODE = "node"  # service name: run/node.pid, run/node.json, logs/node.log
GCS_PORT = 6379


class JoinError(services.ServiceError):
    """A join that cannot work (one line for the CLI, exit 2)."""


def parse_head(head: str) -> tuple[str, int]:
    m = re.fullmatch(r"(?:ray://)?([0-9A-Za-z.-]+)(?::(\d+))?", head.strip())
    if not m or not m.group(1):
        raise JoinError(f"{head}: not a head address (HOST or HOST:PORT, e.g. 10.0.0.10:6379)")
    return m.group(1), int(m.group(2) or GCS_PORT)


def check_head(host: str, port: int, token: str | None, timeout: float = 10.0) -> str | None:
    """None when a Ray head answers at host:port and accepts `token`, else why not. One gRPC call
    to the GCS with the token Ray's own clients would send."""
    import grpc

    with grpc.insecure_channel(f"{host}:{port}") as ch:
        call = ch.unary_unary(
            "/ray.rpc.NodeInfoGcsService/GetClusterId",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        meta = (("authorization", f"Bearer {token}"),) if token else ()
        try:
            call(b"", timeout=timeout, metadata=meta, wait_for_ready=True)
            return None
        except grpc.RpcError as e:
            code = e.code()
            if code == grpc.StatusCode.UNAUTHENTICATED:
                return (
                    f"the Ray head at {host}:{port} refused this machine's token"
                    if token
                    else f"the Ray head at {host}:{port} wants a token and this machine has none"
                )
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return f"no Ray head answers at {host}:{port} (within {timeout:.0f}s)"
            return f"the Ray head at {host}:{port} answered {code.name}: {e.details()}"


def joined() -> dict | None:
    """The head this machine is joined to, while its node runs ({"head", "pid", ...}), else None."""
    f = storage.home() / "run" / f"{NODE}.json"
    pid = services.running(NODE)
    if not pid or not f.exists():
        return None
    return json.loads(f.read_text()) | {"pid": pid}


def join(
    head: str,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    resources: dict | None = None,
    timeout: float = 120.0,
) -> dict:
    host, port = parse_head(head)
    now = joined()
    if now:
        raise JoinError(f"already joined to {now['head']} (node pid {now['pid']}): `ditforge cluster leave` first")
    token = credentials.ray_token()
    if not token:
        raise JoinError(
            f"{host}:{port}: no Ray token on this machine: copy the head's into RAY_AUTH_TOKEN, "
            "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (on the head: `ray get-auth-token`)"
        )
    # A wrong head or token fails here, within seconds. Starting the node itself may take long on a
    # busy machine: `ray start` took over 25 s (the earlier bound) at load 20 on 2 cores, beside
    # other jobs; a node that dies on the way fails as soon as it does.
    why = check_head(host, port, token, timeout=min(5.0, timeout))
    if why:
        raise JoinError(why)
    argv = [services.bin_path("ray"), "start", f"--address={host}:{port}", "--block", "--disable-usage-stats"]
    if num_cpus is not None:
        argv.append(f"--num-cpus={num_cpus}")
    if num_gpus is not None:
        argv.append(f"--num-gpus={num_gpus}")
    if resources:
        argv.append(f"--resources={json.dumps(resources)}")
    env = raysite.node_env(services.base_env())
    # services.base_env drops the AWS_* keys (the embedded server has its own); a joined node's
    # workers need exactly the ones given to `join`, to reach the head's S3.
    env |= {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    env.pop("RAY_ADDRESS", None)
    log = storage.home() / "logs" / f"{NODE}.log"
    services.dirs()
    log.write_text("")  # this join's lines only: the wait below reads them
    proc = services.spawn(NODE, argv, env)
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = log.read_text(errors="replace")
        if "Ray runtime started" in text:
            rec = {"head": f"{host}:{port}", "started_at": time.time()}
            (storage.home() / "run" / f"{NODE}.json").write_text(json.dumps(rec))
            return rec | {"pid": proc.pid}
        if not procs.alive(proc):
            break
        time.sleep(0.3)
    services.stop_process(NODE, timeout=10)
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    tail = credentials.redact(lines[-1].strip()) if lines else "no output"
    raise JoinError(f"the node did not start within {timeout:.0f}s (log: {log}: {tail})")


def leave() -> str | None:
    """Stop this machine's node (its raylet and workers); returns the head it had joined, or None."""
    now = joined()
    services.stop_process(NODE)
    (storage.home() / "run" / f"{NODE}.json").unlink(missing_ok=True)
    return now["head"] if now else None


def nodes(gcs: str, timeout: float = 30.0) -> list[dict]:
    """Every node of the cluster whose GCS is `gcs` (HOST:PORT): id, address, alive, head, resources."""
    import ray

    credentials.use_ray_token()
    # ray.init annotates logging_level as int; it takes a level name too (its own default is "info")
    ray.init(address=gcs, log_to_driver=False, logging_level="ERROR", configure_logging=False)  # type: ignore[arg-type]
    try:
        rows = [
            {
                "node_id": n["NodeID"],
                "address": n["NodeManagerAddress"],
                "alive": bool(n["Alive"]),
                "head": "node:__internal_head__" in n.get("Resources", {}),
                "resources": {
                    k: v
                    for k, v in n.get("Resources", {}).items()
                    if not k.startswith(("node:", "object_store_memory", "memory"))
                },
            }
            for n in ray.nodes()
        ]
    finally:
        ray.shutdown()
    return sorted(rows, key=lambda r: (not r["head"], not r["alive"], r["address"]))
