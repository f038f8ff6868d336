"""A real Slurm for the tests: munged, slurmctld and one slurmd per host, all from Debian's
`slurm-wlm` 22.05, with their own key, socket, ports, state and logs in one folder.

`Slurm(root, controller, nodes)` starts it: `controller` is (address, wrap) of the host that runs
slurmctld (and the client commands: the login node), `nodes` a list of (name, address, wrap), one
slurmd each, where `wrap(argv)` is the argv that runs a command on that host, e.g.
`("n1", hosts.addr(1), lambda a: hosts._argv(1, a))` for a namespace host of tests/hosts.py. Clients (`sbatch`, `squeue`, …) find it through `SLURM_CONF`; `stop()` ends every daemon by
the pid in its pid file, never by name: other Slurms, Rays and engineers share this machine.

Settings that differ from a site's, and why:
  ProctrackType=proctrack/linuxproc, TaskPlugin=task/none   no cgroup delegation in a test box
  SlurmdParameters=config_overrides                        several slurmds share one machine's
                                                           CPUs: trust the CPUs written here
  AuthInfo=socket=…                                        our munged, not the system's
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable

NEEDED = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "scontrol", "srun", "sinfo")


def missing() -> str | None:
    """Why the Slurm tests cannot run here, or None."""
    absent = [b for b in NEEDED if not shutil.which(b, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")]
    if absent:
        return f"Slurm not installed ({', '.join(absent)} missing): apt-get install slurm-wlm munge"
    if os.geteuid() != 0:
        return "the test Slurm runs its daemons as root (SlurmUser=root)"
    return None


def _sbin(name: str) -> str:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") or name


class Slurm:
    def __init__(
        self,
        root: Path,
        controller: tuple[str, Callable[[list[str]], list[str]]],
        nodes: list[tuple[str, str, Callable[[list[str]], list[str]]]],
        *,
        cpus: int = 2,
        partition: str = "debug",
        port: int = 16817,
        kill_wait: int = 10,
    ):
        self.root, self.controller, self.nodes, self.partition = Path(root), controller, nodes, partition
        self.root.mkdir(parents=True, exist_ok=True)
        self.conf = self.root / "slurm.conf"
        self.socket = self.root / "munge.sock"
        self.pids: dict[str, Path] = {}
        try:
            self._munge()
            self._write_conf(cpus, port, kill_wait)
            self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
            self._start(
                "slurmctld", controller[1], [_sbin("slurmctld"), "-f", str(self.conf)], self.root / "slurmctld.pid"
            )
            for name, _addr, wrap in nodes:
                self._start(
                    f"slurmd-{name}",
                    wrap,
                    [_sbin("slurmd"), "-f", str(self.conf), "-N", name],
                    self.root / f"slurmd-{name}.pid",
                )
            self._wait_idle(len(nodes))
        except BaseException:
            self.stop()
            raise

    # ---------------------------------------------------------------------------- start

    def _munge(self) -> None:
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        pid = self.root / "munged.pid"
        subprocess.run(
            [
                _sbin("munged"),
                "--key-file",
                str(key),
                "--socket",
                str(self.socket),
                "--pid-file",
                str(pid),
                "--log-file",
                str(self.root / "munged.log"),
                "--seed-file",
                str(self.root / "munge.seed"),
                "--force",
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        self.pids["munged"] = pid
        self._until(lambda: self.socket.exists(), 10, "munged did not open its socket")

    def _write_conf(self, cpus: int, port: int, kill_wait: int) -> None:
        r = self.root
        ctl_addr = self.controller[0]
        lines = [
            "ClusterName=ditforge-test",
            # the controller's name must be this machine's short host name (namespace hosts share it)
            f"SlurmctldHost={socket.gethostname().split('.')[0]}({ctl_addr})",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            f"AuthInfo=socket={self.socket}",
            "CredType=cred/munge",
            f"SlurmctldPort={port}",
            f"SlurmdPort={port + 1}",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool-%n",
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/slurmctld.log",
            f"SlurmdLogFile={r}/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SlurmdParameters=config_overrides",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "MpiDefault=none",
            "ReturnToService=2",
            "JobRequeue=1",
            f"KillWait={kill_wait}",
            "InactiveLimit=0",
            "MinJobAge=600",
            "SlurmdTimeout=60",
            "SchedulerParameters=batch_sched_delay=0,sched_min_interval=100000",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
        ]
        for name, addr, _ in self.nodes:
            (r / f"spool-{name}").mkdir(exist_ok=True)
            lines.append(f"NodeName={name} NodeAddr={addr} CPUs={cpus} State=UNKNOWN")
        lines.append(
            f"PartitionName={self.partition} Nodes={','.join(n for n, _, _ in self.nodes)} "
            "Default=YES MaxTime=INFINITE State=UP"
        )
        (r / "state").mkdir(exist_ok=True)
        self.conf.write_text("\n".join(lines) + "\n")

    def _start(self, name: str, wrap, argv: list[str], pid_file: Path) -> None:
        # Each daemon forks into the background and writes its pid file; we stop it by that pid.
        self.pids[name] = pid_file
        # slurmd 22.05 loads a cgroup plugin even with proctrack/linuxproc and fails when nothing is
        # mounted on /sys/fs/cgroup, which is so after `ip netns exec` (it mounts a fresh /sys): an
        # tmpfs there with the machine's `name=systemd` v1 hierarchy under it (in that command's own
        # mount namespace) satisfies the cgroup/v1 plugin, which then stays unused.
        argv = [
            "sh",
            "-c",
            'mountpoint -q /sys/fs/cgroup || { mount -t tmpfs none /sys/fs/cgroup && mkdir /sys/fs/cgroup/systemd && mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd; }; exec "$@"',
            "sh",
            *argv,
        ]
        r = subprocess.run(
            wrap(argv), capture_output=True, text=True, timeout=60, env={**os.environ, "SLURM_CONF": str(self.conf)}
        )
        if r.returncode:
            raise RuntimeError(f"{name} did not start: {r.stderr.strip() or r.stdout.strip()}")
        self._until(lambda: _read_pid(pid_file) is not None, 30, f"{name} wrote no pid file ({pid_file})")

    def _wait_idle(self, n: int, timeout: float = 90) -> None:
        def idle() -> bool:
            r = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
            states = [line.split()[1] for line in r.stdout.splitlines() if line.strip()]
            return len(states) == n and all(s.startswith("idle") for s in states)

        self._until(idle, timeout, f"slurm nodes not idle: {self.run('sinfo', '-N', check=False).stdout}")

    @staticmethod
    def _until(ok, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while not ok():
            if time.time() > deadline:
                raise RuntimeError(what)
            time.sleep(0.3)

    # ------------------------------------------------------------------------------ use

    def run(self, *argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """A Slurm client command against this cluster, run on the controller's host (the login node)."""
        r = subprocess.run(
            self.controller[1]([_sbin(argv[0]), *argv[1:]]),
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
        )
        if check and r.returncode:
            raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip()}")
        return r

    def daemon_pids(self) -> dict[str, int | None]:
        return {name: _read_pid(f) for name, f in self.pids.items()}

    def stop(self) -> None:
        """slurmds, then slurmctld, then munged: each by its pid, SIGTERM then SIGKILL."""
        order = [n for n in self.pids if n.startswith("slurmd-")] + ["slurmctld", "munged"]
        for name in order:
            pid = _read_pid(self.pids[name]) if name in self.pids else None
            if pid is None:
                continue
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    break
                deadline = time.time() + 15
                while _alive(pid) and time.time() < deadline:
                    time.sleep(0.2)
                if not _alive(pid):
                    break


def _read_pid(f: Path) -> int | None:
    try:
        pid = int(f.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if _alive(pid) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def job_processes(job_id: str) -> list[int]:
    """Pids of every process on this machine that belongs to Slurm job `job_id` (Slurm puts
    SLURM_JOB_ID into the environment of every task, and its children inherit it)."""
    mark = f"SLURM_JOB_ID={job_id}".encode()
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if mark in env and _alive(int(d.name)):
            found.append(int(d.name))
    return found
