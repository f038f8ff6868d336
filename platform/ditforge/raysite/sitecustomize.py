"""Run at start-up by every Python process of a Ray node that ditforge starts (see __init__.py):
servers made with `wsgiref.simple_server.make_server` for every interface ("", 0.0.0.0 or ::)
bind to $DITFORGE_METRICS_HOST instead. Those are Ray's Prometheus exporters (prometheus_client
and Ray's own exporter both build on `make_server`, imported when they load, after this runs).
Another `sitecustomize` later on sys.path (a distribution's) still runs after this one."""

import os
import sys
from typing import Any


def _bind_servers_to(bind: str) -> None:
    import wsgiref.simple_server as ws

    make = ws.make_server

    def make_server(host: str, port: int, app: Any, *args: Any, **kwargs: Any) -> Any:
        return make(bind if host in ("", "0.0.0.0", "::") else host, port, app, *args, **kwargs)

    ws.make_server = make_server


def _chain() -> None:
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None and spec.origin != os.path.abspath(__file__):
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


if os.environ.get("DITFORGE_METRICS_HOST"):
    _bind_servers_to(os.environ["DITFORGE_METRICS_HOST"])
_chain()
