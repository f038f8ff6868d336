"""Which network interface a worker's gloo process group uses.

Gloo binds each rank to the address its host name resolves to. Where the name resolves to
127.0.0.1 (a common /etc/hosts line, and every network-namespace host of the tests) each rank
offers loopback to the others, and ranks on two machines never connect ("Gloo connectFullMesh
failed ... remote=[127.0.0.1]", seen here). Ray already knows the node's address: gloo uses the
interface that holds it. Runs in every worker process of a job, before Ray Train makes the
process group (Ray's `worker_process_setup_hook`, set by cluster/jobs.py).
"""

from __future__ import annotations

import os
import socket


def interface_of(ip: str) -> str | None:
    """The name of the interface holding IPv4 address `ip`, or None."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == ip for a in addrs):
            return name
    return None


def use_node_interface() -> None:
    """GLOO_SOCKET_IFNAME := the interface of this Ray node's address, unless the user set it."""
    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return
    import ray

    name = interface_of(ray.util.get_node_ip_address())
    if name:
        os.environ["GLOO_SOCKET_IFNAME"] = name
