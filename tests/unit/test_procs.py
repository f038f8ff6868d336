"""Process records: a recorded server is found, stopped with its whole group, and a record whose
pid now belongs to another program is never taken for ours (nor signalled)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import psutil

from ditforge import procs


def test_spawn_read_stop_the_whole_group(tmp_path):
    rec = tmp_path / "srv.json"
    # a server that starts a child of its own, as `ray start --block` and `weed mini` do
    script = "import subprocess, time; subprocess.Popen(['sleep', '300']); time.sleep(300)"
    p = procs.spawn(rec, [sys.executable, "-c", script], dict(os.environ), tmp_path / "srv.log", tmp_path)
    deadline = time.time() + 30
    while not p.children() and time.time() < deadline:
        time.sleep(0.1)
    child = p.children()[0]
    assert procs.read(rec).pid == p.pid
    assert procs.stop(rec, timeout=10) is True
    assert not psutil.pid_exists(p.pid) or p.status() == psutil.STATUS_ZOMBIE or not p.is_running()
    assert not child.is_running()
    assert not rec.exists()
    assert procs.stop(rec) is False  # nothing left to stop


def test_a_reused_pid_is_not_ours(tmp_path):
    stranger = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        rec = tmp_path / "srv.json"
        # the record of a process that had this pid before: same number, another start time
        rec.write_text(json.dumps({"pid": stranger.pid, "create_time": psutil.Process(stranger.pid).create_time() - 5}))
        assert procs.read(rec) is None
        assert procs.stop(rec, timeout=1) is False
        assert stranger.poll() is None  # never signalled
    finally:
        stranger.kill()
        stranger.wait()


def test_garbage_and_missing_records(tmp_path):
    for text in ("", "1234", '{"pid": "x"}', "[]"):
        (tmp_path / "r.json").write_text(text)
        assert procs.read(tmp_path / "r.json") is None
    assert procs.read(tmp_path / "missing.json") is None


def test_a_zombie_is_not_running(tmp_path):
    p = subprocess.Popen(["true"])
    rec = tmp_path / "z.json"
    procs.write(rec, p.pid)
    deadline = time.time() + 10
    while procs.read(rec) is not None and time.time() < deadline:
        time.sleep(0.05)
    assert procs.read(rec) is None  # exited, not yet waited for: a zombie
    p.wait()
