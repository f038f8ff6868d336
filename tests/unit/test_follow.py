"""`follow`, the loop behind `submit --wait` and `demo`: the job's state every poll, the run's
metrics (MLflow's costly get_run) only every `metrics_s` and once at the end, never without a
progress callback."""

from __future__ import annotations

from types import SimpleNamespace

from ditforge.cluster import jobs
from ditforge.runs import follow as follow_mod


def _fake(monkeypatch, states: list[str]) -> list[int]:
    """A Ray job that goes through STATES, one per poll; returns the list that counts MLflow reads."""
    it = iter(states)
    client = SimpleNamespace(get_job_status=lambda job_id: SimpleNamespace(value=next(it)))
    monkeypatch.setattr(jobs, "client_for", lambda rec: client)
    reads: list[int] = []

    def metrics(rec):
        reads.append(1)
        return {"train/step": float(len(reads))}

    monkeypatch.setattr(follow_mod, "metrics", metrics)
    return reads


def test_metrics_are_read_every_metrics_s_and_at_the_end(monkeypatch):
    reads = _fake(monkeypatch, ["PENDING", "RUNNING", "RUNNING", "RUNNING", "SUCCEEDED"])
    seen: list[dict] = []
    state = follow_mod.follow({"job_id": "j"}, seen.append, poll_s=0.0, metrics_s=3600.0)
    assert state == "SUCCEEDED"
    assert len(reads) == 2 and [m["train/step"] for m in seen] == [1.0, 2.0]  # the first poll, then the end


def test_every_poll_reads_metrics_when_metrics_s_is_zero(monkeypatch):
    reads = _fake(monkeypatch, ["RUNNING", "RUNNING", "FAILED"])
    assert follow_mod.follow({"job_id": "j"}, lambda m: None, poll_s=0.0, metrics_s=0.0) == "FAILED"
    assert len(reads) == 3


def test_no_metrics_without_a_progress_callback(monkeypatch):
    reads = _fake(monkeypatch, ["RUNNING", "STOPPED"])
    assert follow_mod.follow({"job_id": "j"}, poll_s=0.0) == "STOPPED"
    assert reads == []
