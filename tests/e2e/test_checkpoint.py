"""Run-folder housekeeping on a (re)start, on the real embedded S3 server."""

from __future__ import annotations

import json

from ditforge import storage
from ditforge.runs.folder import MANIFEST, all_steps, complete_steps, discard_after, join_step


def test_restart_discards_half_written_steps_newer_than_its_resume_point(s3_prefix):
    run = f"{s3_prefix}/run"
    storage.write_bytes(join_step(run, 10) + f"/{MANIFEST}", b"{}")  # complete
    # a killed attempt's step 20: rank 1's marker made it, rank 0's upload and the manifest did not;
    # left there, that stale marker would let the manifest of a new step 20 go out before rank 1's
    # new upload was done
    storage.write_bytes(join_step(run, 20) + "/_ranks/rank_1.json", json.dumps({"x": {"rank": 1}}).encode())
    storage.write_bytes(join_step(run, 20) + "/mp_rank_00_model_states.pt", b"partial")
    assert discard_after(run, 10) == [20]
    assert all_steps(run) == complete_steps(run) == [10]
    assert discard_after(run, 10) == []  # nothing more to do


# ---------------------------------------------------------------- saving under faults (file://)

import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from ditforge.train import checkpoint  # noqa: E402
from ditforge.train.checkpoint import PG_TIMEOUT_S, Checkpointer, FinalCheckpointFailed  # noqa: E402


class FakeEngine:
    """What Checkpointer needs of a DeepSpeed engine: a save that writes a shard file."""

    def zero_optimization_stage(self) -> int:
        return 0

    def save_checkpoint(self, root, tag, client_state, save_latest):
        d = Path(root) / tag
        d.mkdir(parents=True)
        torch.save({"client_state": client_state}, d / "mp_rank_00_model_states.pt")


def _ckpt(tmp_path, **kw) -> Checkpointer:
    kw.setdefault("retry_backoff_s", 0.05)
    return Checkpointer(f"file://{tmp_path}/run", 0, 1, **kw)


def _failing(monkeypatch, times: int, exc=OSError("503 Slow Down")) -> list:
    """storage.put_file fails its first `times` calls (a store outage), then works."""
    calls, real = [], checkpoint.storage.put_file

    def put_file(local, uri):
        calls.append(uri)
        if len(calls) <= times:
            raise checkpoint.storage.StorageUnavailable(str(exc))
        return real(local, uri)

    monkeypatch.setattr(checkpoint.storage, "put_file", put_file)
    return calls


def test_a_save_whose_manifest_fails_is_reported_failed(tmp_path, monkeypatch):
    seen = []
    ck = _ckpt(tmp_path, on_done=seen.append)

    def no_manifest(*a):
        raise checkpoint.storage.StorageUnavailable("manifest PUT: 500")

    monkeypatch.setattr(ck, "_write_manifest", no_manifest)
    ck.save(FakeEngine(), 10, {"step": 10})
    stats = ck.wait()
    assert not stats.ok and not stats.complete and "500" in stats.error
    assert [s.ok for s in seen] == [False]  # `checkpoint/failed` is what MLflow gets
    assert complete_steps(ck.run_uri) == []


def test_final_save_retries_through_an_outage(tmp_path, monkeypatch):
    calls = _failing(monkeypatch, 3)
    ck = _ckpt(tmp_path, final_timeout_s=30)
    ck.save(FakeEngine(), 10, {"step": 10}, rank_state={"data": {"bad": 2}}, final=True)
    stats = ck.wait()
    assert stats.ok and stats.complete and stats.attempts == 4, stats
    assert len(calls) > 3
    assert complete_steps(ck.run_uri) == [10]
    folder, _ = checkpoint.download(join_step(ck.run_uri, 10), tmp_path / "dl")
    assert checkpoint.rank_state(folder, 0, {"data": {"bad": 0}}) == {"data": {"bad": 2}}


def test_an_ordinary_save_does_not_retry_and_the_next_one_does(tmp_path, monkeypatch):
    _failing(monkeypatch, 1)
    ck = _ckpt(tmp_path, final_timeout_s=30)
    ck.save(FakeEngine(), 10, {"step": 10})
    assert not ck.wait().ok  # training goes on; the next save tries again
    ck.save(FakeEngine(), 20, {"step": 20})
    assert ck.wait().complete
    assert complete_steps(ck.run_uri) == [20]


def test_final_save_gives_up_at_its_deadline_and_names_the_newest_complete(tmp_path, monkeypatch):
    from ditforge.train.session import Session
    from ditforge.train.tracking import NullTracker

    ck = _ckpt(tmp_path, final_timeout_s=0.5)
    ck.save(FakeEngine(), 10, {"step": 10})
    ck.wait()
    _failing(monkeypatch, 10**6)
    spec = type("S", (), {"checkpoint": type("C", (), {"final_timeout_s": 0.5})()})()
    run = Session(spec, {}, 0, 1, torch.device("cpu"), NullTracker(), ck, ck.run_uri)
    t0 = time.monotonic()
    with pytest.raises(FinalCheckpointFailed) as e:
        run.final_save(lambda step, final: ck.save(FakeEngine(), step, {"step": step}, final=final), 20)
    assert time.monotonic() - t0 < 15
    msg = str(e.value)
    assert "\n" not in msg and "step 20" in msg and join_step(ck.run_uri, 10) in msg and "ditforge export" in msg
    assert complete_steps(ck.run_uri) == [10]


def test_close_on_an_exception_path_is_bounded_and_leaves_no_manifest(tmp_path, monkeypatch):
    release = threading.Event()
    real = checkpoint.storage.put_file

    def slow_put(local, uri):
        release.wait(30)
        return real(local, uri)

    monkeypatch.setattr(checkpoint.storage, "put_file", slow_put)
    ck = _ckpt(tmp_path)
    ck.save(FakeEngine(), 10, {"step": 10})
    t0 = time.monotonic()
    stats = ck.close(timeout_s=0.3)  # not collective: the other ranks may be gone
    assert time.monotonic() - t0 < 5 and not stats.ok
    assert all_steps(ck.run_uri) in ([], [10]) and complete_steps(ck.run_uri) == []  # visibly incomplete
    release.set()


def test_waits_are_bounded_below_the_process_group_timeout(tmp_path):
    ck = _ckpt(tmp_path, manifest_timeout_s=10**6, final_timeout_s=10**6)
    assert ck.wait_bound_s() < PG_TIMEOUT_S
