"""The checkpoint protocol (train/checkpoint.py over runs/folder.py) on `file://`, without services or
Ray: a fake engine writes the shard files; every rank uploads its files and then its marker under
`_ranks/`, rank 0 writes the manifest last, after every rank's marker, and only a step with a
manifest counts. Failed uploads, a marker that never comes, half-written steps, bounded waits."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from ditforge import storage
from ditforge.runs.folder import MANIFEST, RANKS, all_steps, complete_steps, discard_after, join_step, resolve
from ditforge.train import checkpoint
from ditforge.train.checkpoint import PG_TIMEOUT_S, Checkpointer, FinalCheckpointFailed


class FakeEngine:
    """What Checkpointer needs of a DeepSpeed engine: a save that writes this rank's shard file."""

    def __init__(self, rank: int = 0):
        self.rank = rank

    def zero_optimization_stage(self) -> int:
        return 0

    def save_checkpoint(self, root, tag, client_state, save_latest):
        d = Path(root) / tag
        d.mkdir(parents=True)
        torch.save({"client_state": client_state}, d / f"mp_rank_{self.rank:02d}_model_states.pt")


def _ckpt(tmp_path, rank: int = 0, world: int = 1, **kw) -> Checkpointer:
    kw.setdefault("retry_backoff_s", 0.05)
    return Checkpointer(f"file://{tmp_path}/run", rank, world, **kw)


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
    assert [s.ok for s in seen] == [False]  # `train_checkpoint/failed` is what MLflow gets
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


@pytest.fixture
def one_process_group():
    """save() and wait() are collective (a barrier when world > 1): ranks played in one process
    share a one-member gloo group, on an in-process store."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_the_manifest_waits_for_every_ranks_marker_and_lists_every_file(tmp_path, one_process_group):
    """Two ranks of one save, in one process (close() is the non-collective wait): rank 0's
    manifest goes out only once rank 1's marker is there, and names both ranks' files."""
    r0, r1 = _ckpt(tmp_path, world=2, manifest_timeout_s=30), _ckpt(tmp_path, world=2, rank=1)
    r0.save(FakeEngine(), 10, {"step": 10})
    time.sleep(0.5)
    assert complete_steps(r0.run_uri) == []  # rank 1 has not uploaded: no manifest yet
    r1.save(FakeEngine(rank=1), 10, {"step": 10})
    assert r1.close(10).ok
    stats = r0.close(10)
    assert stats.ok and stats.complete, stats
    manifest = json.loads(storage.read_bytes(join_step(r0.run_uri, 10) + f"/{MANIFEST}"))
    assert manifest["world_size"] == 2 and {m["rank"] for m in manifest["files"].values()} == {0, 1}
    assert set(manifest["files"]) == {"mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"}


def test_a_marker_that_never_comes_leaves_the_step_half_written_and_a_restart_drops_it(tmp_path, one_process_group):
    ck = _ckpt(tmp_path)
    ck.save(FakeEngine(), 10, {"step": 10})
    assert ck.wait().complete
    # step 20 at world size 2, rank 1 died before its marker: rank 0 gives up, writes no manifest
    r0 = _ckpt(tmp_path, world=2, manifest_timeout_s=0.5)
    r0.save(FakeEngine(), 20, {"step": 20})
    stats = r0.close(10)
    assert not stats.ok and not stats.complete and "[1]" in stats.error, stats
    assert all_steps(ck.run_uri) == [10, 20] and complete_steps(ck.run_uri) == [10]
    assert storage.exists(join_step(ck.run_uri, 20) + f"/{RANKS}/rank_0.json")
    assert resolve(ck.run_uri) == join_step(ck.run_uri, 10)  # what a resume loads
    assert discard_after(ck.run_uri, 10) == [20] and all_steps(ck.run_uri) == [10]


def test_a_download_checks_every_file_against_the_manifest(tmp_path):
    ck = _ckpt(tmp_path)
    ck.save(FakeEngine(), 10, {"step": 10})
    assert ck.wait().complete
    step = join_step(ck.run_uri, 10)
    folder, manifest = checkpoint.download(step, tmp_path / "ok")
    assert manifest["step"] == 10 and (folder / "mp_rank_00_model_states.pt").exists()
    storage.write_bytes(step + "/mp_rank_00_model_states.pt", b"changed after the manifest")
    with pytest.raises(RuntimeError, match="checksum does not match"):
        checkpoint.download(step, tmp_path / "bad")


def test_a_host_downloads_a_step_once_for_all_its_ranks(tmp_path, monkeypatch):
    """Ranks of one host (here: threads; the lock is a file lock, as between processes) resuming
    the same step: one downloads and verifies it, the others wait for it and read the same files.
    A folder an earlier attempt left half-done is fetched again; `release` removes it."""
    monkeypatch.setattr(checkpoint.tempfile, "gettempdir", lambda: str(tmp_path / "host-tmp"))
    (tmp_path / "host-tmp").mkdir()
    ck = _ckpt(tmp_path)
    ck.save(FakeEngine(), 10, {"step": 10})
    assert ck.wait().complete
    step = join_step(ck.run_uri, 10)
    downloads, real = [], checkpoint.download

    def counting(uri, root):
        downloads.append(uri)
        time.sleep(0.3)  # the others arrive meanwhile
        return real(uri, root)

    monkeypatch.setattr(checkpoint, "download", counting)
    got: list = []
    ranks = [
        threading.Thread(target=lambda: got.append(checkpoint.fetch_once_per_host(step, ck.run_uri))) for _ in range(3)
    ]
    for t in ranks:
        t.start()
    for t in ranks:
        t.join(30)
    assert len(got) == 3 and downloads == [step]
    assert sorted(downloaded for _, _, downloaded, _ in got) == [False, False, True]
    folder = got[0][0]
    assert {g[0] for g in got} == {folder} and (folder / "mp_rank_00_model_states.pt").exists()
    assert folder.parent == checkpoint.host_folder(step, ck.run_uri)

    (folder.parent / ".complete").unlink()  # an attempt that died mid-download
    assert checkpoint.fetch_once_per_host(step, ck.run_uri)[2] and len(downloads) == 2
    checkpoint.release(folder)
    assert list((tmp_path / "host-tmp").iterdir()) == []
    # another run resuming the same step keeps a folder of its own
    assert checkpoint.host_folder(step, "file:///elsewhere/run") != folder.parent
