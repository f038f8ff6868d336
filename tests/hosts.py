"""Test hosts: N Linux network namespaces on one bridge, each posing as a separate machine.

    hosts = Hosts(4)                       # or the session fixture `hosts` (4 hosts, shared)
    hosts.addr(0)                          # "10.X.Y.10": host 0's address (host i: .10+i)
    hosts.run(1, ["ray", "status"], env={...}, timeout=60)   # CompletedProcess (text, captured)
    p = hosts.popen(1, argv, env={...}, stdout=..., ...)     # a subprocess.Popen on host 1
    hosts.env(1)                           # the environment a command on host 1 starts with
    hosts.secrets                          # the secrets put in every host's env (see below)
    hosts.pids(1); hosts.kill_all(1)       # host 1's processes; SIGKILL them all ("the host dies")
    hosts.link(1, up=False)                # cut host 1's cable (eth0 down); up=True plugs it back
    hosts.close()                          # kill every process of every host, delete everything

What each host gets, as a separate machine would have:
  * its own network namespace `df<pid>h<i>` with `eth0` (a veth whose peer is on a bridge with no
    address and no uplink: nothing leaves), an address in a private /24 of its own, `lo` up and
    a default route `dev eth0` (Ray picks its node address from the default route: without one
    every socket binds loopback and a test proves nothing);
  * a private /tmp (a mount namespace per command, /tmp bind-mounted from the host's own folder:
    SeaweedFS puts unix sockets at fixed /tmp paths and Ray keeps /tmp/ray/session_latest);
  * its own HOME, DITFORGE_HOME and Ray temp dir (/tmp/ray inside its private /tmp), all outside
    /tmp under `/var/tmp/df<pid>-hosts/h<i>/`;
  * the secrets in its environment (`hosts.secrets`: RAY_AUTH_TOKEN, MLFLOW_TRACKING_USERNAME /
    MLFLOW_TRACKING_PASSWORD, made fresh per run); `env(i, secrets=False)` / `run(..., secrets=False)`
    starts a command without them (a stranger). S3 keys are the head's to hand out (the embedded
    server makes them): pass AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL_S3 in `env`.
Shared on purpose: the code and the venv (PATH, PYTHONPATH) and the torch extensions build cache
(DeepSpeed's JIT op, no secrets), which every real host would build once for itself.

Names carry this process's pid (`/run/netns` is machine-wide, and other test runs use the same
fixture at the same time); the bridge and the host-side veths live in the caller's network
namespace, so the fixture works both in CI's root namespace and inside an isolation namespace.
Teardown kills only the processes inside these namespaces, by pid (`ip netns pids`), then
deletes the namespaces, the bridge and the folders; never `ray stop`, `pkill` or a name match.
"""

from __future__ import annotations

import os
import secrets as _secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# What a command on a host must not inherit from the test process: each host has its own.
_DROP = ("RAY_", "MLFLOW_", "AWS_", "DITFORGE_", "TMPDIR")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def netns_available() -> str | None:
    """None if `ip netns add` works here, else why not (the reason a test skips with)."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    # Each host sees its own /tmp (a bind mount over it): code or a Python that lives under /tmp
    # would vanish inside the hosts.
    for what, path in (("this checkout", Path(__file__).resolve().parents[1]), ("this Python", Path(sys.executable))):
        if Path("/tmp") in path.parents:
            return f"{what} lives under /tmp ({path}), which every test host replaces with its own /tmp"
    probe = f"df{os.getpid()}probe"
    r = _ip("netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"`ip netns add` is refused here: {r.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


class Hosts:
    def __init__(self, n: int, base: Path | None = None):
        tag = f"df{os.getpid()}"
        self.n = n
        self.ns = [f"{tag}h{i}" for i in range(n)]
        self.bridge = f"{tag}br"
        self._veth = [f"{tag}v{i}" for i in range(n)]
        # A /24 of its own, from the pid: two runs on one L2 (CI's root namespace) do not collide.
        pid = os.getpid()
        self.subnet = f"10.{100 + (pid >> 8) % 150}.{pid % 256}"
        self.base = base or Path(f"/var/tmp/{tag}-hosts")  # outside /tmp: /tmp is replaced per host
        self.secrets = {
            "RAY_AUTH_TOKEN": _secrets.token_hex(32),
            "MLFLOW_TRACKING_USERNAME": "ditforge",
            "MLFLOW_TRACKING_PASSWORD": _secrets.token_urlsafe(24),
        }
        self._torch_ext = os.environ.get("TORCH_EXTENSIONS_DIR") or str(Path.home() / ".cache" / "torch_extensions")
        try:
            self._create()
        except BaseException:
            self.close()
            raise

    def _create(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("link", "set", self.bridge, "up")  # no address: the bridge is a switch, not a host
        for i, ns in enumerate(self.ns):
            for d in ("tmp", "home", "ditforge"):
                self.dir(i, d).mkdir(parents=True, exist_ok=True)
            os.chmod(self.dir(i, "tmp"), 0o1777)
            _ip("netns", "add", ns)
            _ip("link", "add", self._veth[i], "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", self._veth[i], "master", self.bridge)
            _ip("link", "set", self._veth[i], "up")
            for cmd in (
                ["addr", "add", f"{self.addr(i)}/24", "dev", "eth0"],
                ["link", "set", "eth0", "up"],
                ["link", "set", "lo", "up"],
                ["route", "add", "default", "dev", "eth0"],
            ):
                _ip("-n", ns, *cmd)

    # ------------------------------------------------------------------------------ queries

    def addr(self, i: int) -> str:
        return f"{self.subnet}.{10 + i}"

    def dir(self, i: int, what: str = "") -> Path:
        """Host i's own folders: `tmp` (its /tmp), `home` (HOME), `ditforge` (DITFORGE_HOME)."""
        return self.base / f"h{i}" / what

    def env(self, i: int, secrets: bool = True, **extra: str) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(_DROP)}
        env |= {
            "HOME": str(self.dir(i, "home")),
            "DITFORGE_HOME": str(self.dir(i, "ditforge")),
            "TMPDIR": "/tmp",
            "DITFORGE_ROOTS": "/tmp",
            "TORCH_EXTENSIONS_DIR": self._torch_ext,
            "PYTHONUNBUFFERED": "1",
        }
        if secrets:
            env |= self.secrets
        return env | extra

    def _argv(self, i: int, cmd) -> list[str]:
        argv = shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]
        # A mount namespace per command, /tmp replaced by the host's own: commands of one host
        # share it (same folder), hosts do not.
        return [
            "ip",
            "netns",
            "exec",
            self.ns[i],
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            'mount --bind "$0" /tmp && cd "$HOME" && exec "$@"',
            str(self.dir(i, "tmp")),
            *argv,
        ]

    def run(
        self, i: int, cmd, env: dict | None = None, timeout: float = 120, secrets: bool = True, check: bool = False
    ) -> subprocess.CompletedProcess:
        """Run `cmd` (a list, or a string split like a shell would) on host i and wait."""
        return subprocess.run(
            self._argv(i, cmd),
            env=self.env(i, secrets) | (env or {}),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
            stdin=subprocess.DEVNULL,
        )

    def popen(self, i: int, cmd, env: dict | None = None, secrets: bool = True, **kw) -> subprocess.Popen:
        kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.Popen(self._argv(i, cmd), env=self.env(i, secrets) | (env or {}), **kw)

    def pids(self, i: int) -> list[int]:
        r = _ip("netns", "pids", self.ns[i], check=False)
        return [int(p) for p in r.stdout.split()] if r.returncode == 0 else []

    # ------------------------------------------------------------------------------ faults

    def kill_all(self, i: int, timeout: float = 30) -> list[int]:
        """SIGKILL every process of host i (the machine dies); returns their pids."""
        killed: list[int] = []
        deadline = time.time() + timeout
        while (pids := self.pids(i)) and time.time() < deadline:
            for p in pids:
                try:
                    os.kill(p, signal.SIGKILL)
                    killed.append(p)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        return sorted(set(killed))

    def link(self, i: int, up: bool) -> None:
        """Plug host i's cable in or out (its eth0 up or down; the default route comes back with it)."""
        _ip("-n", self.ns[i], "link", "set", "eth0", "up" if up else "down")
        if up:
            _ip("-n", self.ns[i], "route", "replace", "default", "dev", "eth0", check=False)

    # ------------------------------------------------------------------------------ teardown

    def close(self) -> None:
        for i, ns in enumerate(self.ns):
            self.kill_all(i)
            _ip("netns", "del", ns, check=False)  # takes its eth0 and so the veth pair with it
        for v in self._veth:
            _ip("link", "del", v, check=False)
        _ip("link", "del", self.bridge, check=False)
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="session")
def hosts():
    """Four hosts for every multi-host test of the run (host 0 is the head by convention).
    Tests must leave them as they found them: their services stopped, links up."""
    why = netns_available()
    if why:
        pytest.skip(why)
    h = Hosts(4)
    try:
        yield h
    finally:
        h.close()
