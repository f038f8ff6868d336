"""Process supervision for the servers and nodes ditforge starts itself (the embedded S3, MLflow and
Ray head, the `local` cluster's raylets, hosts joined with `cluster join`).

Each one runs in its own session (so it outlives the CLI that started it, and its whole process
group can be stopped) and is recorded in a small JSON file: its pid *and* its start time. A pid
alone is not an identity: after a reboot or a long uptime the kernel hands the same number to an
unrelated program, and signalling "our" group would then hit that program's. Every read checks the
start time with psutil, so a stale record is simply "not running".
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import psutil


def spawn(record: Path, argv: list[str], env: dict[str, str], log: Path, cwd: Path) -> psutil.Process:
    """Start `argv` in a new session, output appended to `log`, and record it in `record`."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    return write(record, proc.pid)


def write(record: Path, pid: int) -> psutil.Process:
    """Record a running process (e.g. one found again by its command line)."""
    p = psutil.Process(pid)
    record.parent.mkdir(parents=True, exist_ok=True)
    tmp = record.with_name(record.name + ".tmp")
    tmp.write_text(json.dumps({"pid": pid, "create_time": p.create_time()}))
    tmp.replace(record)  # a reader never sees half a record
    return p


def read(record: Path) -> psutil.Process | None:
    """The recorded process if it is still the one recorded and still running, else None."""
    try:
        rec = json.loads(record.read_text())
        p = psutil.Process(int(rec["pid"]))
        if abs(p.create_time() - float(rec["create_time"])) > 0.01:
            return None  # the pid now belongs to another program
        return p if alive(p) else None
    except (OSError, ValueError, KeyError, TypeError, psutil.Error):
        return None


def alive(p: psutil.Process | int) -> bool:
    """Running, and not a zombie (a dead child of ours that nobody has waited for yet)."""
    try:
        p = p if isinstance(p, psutil.Process) else psutil.Process(p)
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def stop(record: Path, timeout: float = 30.0) -> bool:
    """Stop the recorded process and its whole group: SIGTERM, then SIGKILL after `timeout`.
    Returns whether there was something to stop. The record is removed either way."""
    leader = read(record)
    if leader is None:
        record.unlink(missing_ok=True)
        return False
    group = [leader, *_group_members(leader)]
    _signal_group(leader.pid, signal.SIGTERM)
    _signal_group(leader.pid, signal.SIGCONT)  # a stopped (hung) process acts on SIGTERM only once continued
    _, left = psutil.wait_procs(group, timeout=timeout)
    if left:
        _signal_group(leader.pid, signal.SIGKILL)
        for p in left:  # a member that left the group (setsid) still belongs to us
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(left, timeout=10)
    _reap(leader.pid)
    record.unlink(missing_ok=True)
    return True


def _group_members(leader: psutil.Process) -> list[psutil.Process]:
    try:
        return leader.children(recursive=True)
    except psutil.Error:
        return []


def _signal_group(pgid: int, sig: int) -> None:
    # Only ever called with a leader whose start time was checked: the group is ours.
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _reap(pid: int) -> None:
    """A server this very process started is its child: collect it so it leaves no zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
