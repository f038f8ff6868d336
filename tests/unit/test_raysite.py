"""The environment of the Ray nodes we start (ditforge/raysite): token auth, this Python first on
PATH, and Ray's Prometheus exporters (built on wsgiref's make_server) bound to loopback even when
asked for every interface. The real exporters are checked from another host in
tests/e2e/test_multihost.py; here, the same servers in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ditforge import raysite

SERVE = """
import json, prometheus_client
from wsgiref.simple_server import make_server
from ray._private import prometheus_exporter  # noqa: F401  (imports make_server as Ray does)
a, _ = prometheus_client.start_http_server(0)              # the autoscaler's and dashboard's way
b = make_server("", 0, prometheus_client.make_wsgi_app())  # the agent's way (address "")
c = make_server("127.0.0.2", 0, prometheus_client.make_wsgi_app())  # an explicit address is kept
print(json.dumps([a.server_address[0], b.server_address[0], c.server_address[0]]))
"""


def test_node_env_has_the_token_mode_our_python_and_the_hook():
    env = raysite.node_env({"PATH": "/usr/bin:/bin", "PYTHONPATH": "/x"})
    assert env["RAY_AUTH_MODE"] == "token" and env[raysite.METRICS_HOST_ENV] == "127.0.0.1"
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert env["PYTHONPATH"].split(os.pathsep) == [str(raysite.HERE), "/x"]
    assert raysite.node_env(env) == env  # applying it twice changes nothing


def test_servers_for_every_interface_bind_loopback_under_the_hook():
    env = raysite.node_env(dict(os.environ))
    r = subprocess.run([sys.executable, "-c", SERVE], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == ["127.0.0.1", "127.0.0.1", "127.0.0.2"]
    plain = {k: v for k, v in os.environ.items() if k != raysite.METRICS_HOST_ENV}
    r = subprocess.run([sys.executable, "-c", SERVE], env=plain, capture_output=True, text=True, timeout=120)
    assert json.loads(r.stdout.strip().splitlines()[-1])[:2] == ["0.0.0.0", "0.0.0.0"]  # what Ray does alone
