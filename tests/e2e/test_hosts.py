"""The test hosts themselves (tests/hosts.py): each has its own address reachable from the
others over the bridge, a default route, its own /tmp and HOME, and dies when told to."""

from __future__ import annotations

import sys
import time

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.hosts]  # network-namespace hosts

SERVE = "import socket,sys; s=socket.socket(); s.bind(('0.0.0.0', 7999)); s.listen(); print('up', flush=True); c,_=s.accept(); c.send(b'hi'); c.close()"
CONNECT = "import socket,sys; s=socket.create_connection((sys.argv[1], 7999), timeout=10); print(s.recv(2).decode())"


def test_hosts_are_separate_machines_on_one_network(hosts):
    # a default route dev eth0 and the host's own address
    r = hosts.run(1, "ip route show default")
    assert r.returncode == 0 and "dev eth0" in r.stdout, r
    assert hosts.addr(1) in hosts.run(1, "ip -4 addr show eth0").stdout
    # host 0 reaches host 1 at its address
    server = hosts.popen(1, [sys.executable, "-c", SERVE], stdout=-1, text=True)
    assert server.stdout.readline().strip() == "up"
    r = hosts.run(0, [sys.executable, "-c", CONNECT, hosts.addr(1)], timeout=30)
    assert r.stdout.strip() == "hi", r
    server.wait(10)
    # own /tmp and HOME: what host 0 writes there host 1 does not see
    assert hosts.run(0, "sh -c 'echo x > /tmp/mine && echo $HOME'").stdout.strip() == str(hosts.dir(0, "home"))
    assert (hosts.dir(0, "tmp") / "mine").exists()
    assert hosts.run(1, "test -e /tmp/mine").returncode == 1
    assert hosts.run(1, "sh -c 'echo $RAY_AUTH_TOKEN'").stdout.strip() == hosts.secrets["RAY_AUTH_TOKEN"]
    assert hosts.run(1, "sh -c 'echo -n $RAY_AUTH_TOKEN'", secrets=False).stdout == ""


def test_a_cut_link_and_a_dead_host(hosts):
    hosts.link(2, up=False)
    try:
        r = hosts.run(0, [sys.executable, "-c", CONNECT.replace("timeout=10", "timeout=2"), hosts.addr(2)], timeout=30)
        assert r.returncode != 0
    finally:
        hosts.link(2, up=True)
    assert "dev eth0" in hosts.run(2, "ip route show default").stdout
    p = hosts.popen(2, "sleep 600")
    t0 = time.time()
    while not hosts.pids(2) and time.time() - t0 < 10:
        time.sleep(0.1)
    assert hosts.kill_all(2)
    assert p.wait(10) == -9 and hosts.pids(2) == []
