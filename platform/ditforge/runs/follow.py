"""Following a submitted job: its record, its Ray (and Slurm) state, its MLflow run's metrics, link and
error, its logs, and a polling loop until it ends. Display is the caller's: `follow` reports progress
through a callback and returns the final state.

The Ray Jobs client and MLflow are imported inside the functions: importing this module starts nothing."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from mlflow.entities import Run

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def find_record(job_id: str) -> dict:
    """The record `submit` saved for JOB_ID; SubmitError when it was not submitted from here."""
    from ..cluster.jobs import SubmitError, record

    rec = record(job_id)
    if rec is None:
        raise SubmitError(f"job '{job_id}': not submitted from here (see `ditforge status` for known jobs)")
    return rec


def _run(rec: dict) -> Run:
    from mlflow.tracking import MlflowClient

    return MlflowClient(rec["tracking_uri"]).get_run(rec["mlflow_run_id"])


def run_link(rec: dict) -> str:
    """The MLflow UI address of the job's run (the tracking URI alone when MLflow does not answer)."""
    try:
        from ..train.tracking import ui_link

        return ui_link(rec["tracking_uri"], _run(rec).info.experiment_id, rec["mlflow_run_id"])
    except Exception:
        return rec["tracking_uri"]


def metrics(rec: dict) -> dict:
    """The run's latest metrics ({} when MLflow does not answer)."""
    try:
        return _run(rec).data.metrics
    except Exception:
        return {}


def job_error(rec: dict) -> str | None:
    """The one line the worker left on its run (`ditforge.error` tag) saying why it failed."""
    try:
        return _run(rec).data.tags.get("ditforge.error")
    except Exception:
        return None


def stopped_on_request(rec: dict) -> bool:
    """The worker left early for `ditforge stop` (Ray reports that as SUCCEEDED)."""
    try:
        return _run(rec).data.tags.get("ditforge.stopped") == "true"
    except Exception:
        return False


def job_state(rec: dict) -> str:
    """The Ray job's state; for a job on a Slurm allocation, with the Slurm job's beside it."""
    from ..cluster.jobs import client_for

    if rec.get("slurm_job_id"):
        from ..cluster import slurm

        if rec.get("job_dir"):  # mode job: its own allocation
            return slurm.record_state(rec)
        st, _ = slurm.job_state(rec["slurm_job_id"])
        ray_state = str(client_for(rec).get_job_status(rec["job_id"]).value) if st == "RUNNING" else "UNKNOWN"
        return f"{ray_state} · slurm {rec['slurm_job_id']} {st}"
    return str(client_for(rec).get_job_status(rec["job_id"]).value)


def status(rec: dict) -> dict:
    """One job as `ditforge status` shows it: state (UNKNOWN when the cluster does not answer, STOPPED
    when it left for `ditforge stop`), the run's metrics, its MLflow link and, when it failed, why."""
    try:
        state = job_state(rec)
    except Exception:
        state = "UNKNOWN (cluster unreachable)"
    if state == "SUCCEEDED" and stopped_on_request(rec):
        state = "STOPPED"
    return {
        "state": state,
        "metrics": metrics(rec),
        "link": run_link(rec),
        "error": (job_error(rec) or "") if state == "FAILED" else "",
    }


def follow(
    rec: dict, on_progress: Callable[[dict], None] | None = None, poll_s: float = 1.0, metrics_s: float = 3.0
) -> str:
    """Poll the Ray job every POLL_S until it ends and return its state (SUCCEEDED, FAILED or
    STOPPED). Every METRICS_S, and once at the end, a run with a `train/step` metric calls
    on_progress with the run's metrics. (MLflow's get_run is the costly part of a poll: every
    param and metric of the run, parsed on both sides; a waiting `submit` did it every second.)"""
    from ..cluster.jobs import client_for

    client = client_for(rec)
    last = float("-inf")  # the first poll reads them
    while True:
        state = str(client.get_job_status(rec["job_id"]).value)
        if on_progress is not None and (state in TERMINAL or time.monotonic() - last >= metrics_s):
            last = time.monotonic()
            m = metrics(rec)
            if "train/step" in m:
                on_progress(m)
        if state in TERMINAL:
            return state
        time.sleep(poll_s)


def log_tail(rec: dict, lines: int = 25) -> str:
    """The last LINES lines of the Ray job's log, secrets redacted."""
    from ..cluster.jobs import client_for
    from ..credentials import redact

    return "\n".join(redact(client_for(rec).get_job_logs(rec["job_id"])).strip().splitlines()[-lines:])


def write_logs(rec: dict, write: Callable[[str], None], follow: bool = False) -> None:
    """The job's driver and worker logs, secrets redacted, through WRITE: for a job on a Slurm
    allocation of its own, its Slurm log then each attempt's Ray job log; else the Ray job's log,
    with FOLLOW as it grows until the job ends."""
    from ..credentials import redact

    if rec.get("job_dir"):
        if follow:
            from ..cluster import slurm

            slurm.follow_logs(rec, write)
            return
        d = Path(rec["job_dir"])
        for f in [d / f"slurm-{rec['slurm_job_id']}.out", *sorted(d.glob("ray-*.log"))]:
            if f.exists():
                write(f"==> {f} <==\n{redact(f.read_text(errors='replace'))}\n")
        return
    from ..cluster.jobs import client_for

    client = client_for(rec)
    if not follow:
        write(redact(client.get_job_logs(rec["job_id"])))
        return
    import asyncio

    async def tail() -> None:
        async for lines in client.tail_job_logs(rec["job_id"]):
            write(redact(lines))

    asyncio.run(tail())
