"""A narrow tracking interface (the `Tracker` protocol): `log(metrics, step)`, `params`, `tags`,
`artifact(path)`, `drain`, `close()`. `MlflowTracker` on rank 0, `NullTracker` on the others.

MLflow calls never block the training step: `log` appends to a buffer that a background thread
flushes. If the server is away, the buffer keeps everything (in order, with the original step and
timestamp) and the thread retries with backoff, so the series has no gap once it returns.

That thread does the retrying, so while an MlflowTracker is open (in a training worker) MLflow's own
HTTP retry loop is off (it would hold the buffer's lock for minutes). Nothing is changed at import:
the driver and the CLI, which import this module too, keep MLflow's retries for their calls.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import mlflow
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from ..credentials import redact, redact_obj, use_mlflow_credentials

if TYPE_CHECKING:
    from ..spec import JobSpec

# While an MlflowTracker is open: fail fast, our flush thread retries (see the module docstring).
WORKER_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}

T = TypeVar("T")


class Tracker(Protocol):
    """What every tracker answers: `MlflowTracker` (rank 0), `NullTracker` (the other ranks) and the
    tests' recording tracker. Never blocks the training step; `drain` and `close` are bounded."""

    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def params(self, params: dict[str, Any]) -> None: ...

    def tags(self, tags: dict[str, Any]) -> None: ...

    def artifact(self, path: str, folder: str | None = None) -> None: ...

    def drain(self, timeout: float) -> bool:
        """Deliver what is buffered now, for at most `timeout` s; True if nothing is left."""
        ...

    def close(self, timeout: float = ...) -> bool:
        """Flush everything (at most `timeout` s); True if nothing is left behind."""
        ...


class MlflowTracker:
    def __init__(self, tracking_uri: str, run_id: str, flush_every_s: float = 1.0, system_metrics: bool = True) -> None:
        use_mlflow_credentials()  # a server with basic auth: the credentials file, never the job's env
        self._saved_env = {k: os.environ.get(k) for k in WORKER_HTTP_ENV}
        os.environ.update({k: v for k, v in WORKER_HTTP_ENV.items() if os.environ.get(k) is None})
        self.client, self.run_id, self.tracking_uri = MlflowClient(tracking_uri), run_id, tracking_uri
        self._pending: deque[tuple[Any, ...]] = (
            deque()
        )  # ("metrics", [Metric]) | ("params", [Param]) | ("artifact", path, folder)
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._stop = threading.Event()
        self._flush_every = flush_every_s
        self.failures = 0
        self._thread = threading.Thread(target=self._run, daemon=True, name="mlflow-flush")
        self._thread.start()
        self._system: Any = None
        if system_metrics:
            self._start_system_metrics()

    def _start_system_metrics(self) -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._system = SystemMetricsMonitor(
                self.run_id, sampling_interval=5, samples_before_logging=1, tracking_uri=self.tracking_uri
            )
            self._system.start()
        except Exception as e:  # psutil missing or similar: metrics still work without it
            print(f"system metrics off: {e}", flush=True)

    # ------------------------------------------------------------------------- interface

    def log(self, metrics: dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        with self._lock:
            self._pending.append(("metrics", [Metric(k, float(v), ts, step) for k, v in metrics.items()]))

    def params(self, params: dict[str, Any]) -> None:
        if params:
            with self._lock:
                self._pending.append(("params", [Param(k, redact(str(v))[:6000]) for k, v in params.items()]))

    def artifact(self, path: str, folder: str | None = None) -> None:
        keep = os.path.join(tempfile.mkdtemp(prefix="ditforge-art-"), os.path.basename(path))
        shutil.copy(path, keep)  # the caller may delete its file before the upload happens
        with self._lock:
            self._pending.append(("artifact", keep, folder))

    def close(self, timeout: float = 120.0) -> bool:
        """Flush everything; True if nothing is left behind."""
        if self._system is not None:
            try:
                self._system.finish()
            except Exception:
                pass
        self.drain(timeout)
        self._stop.set()
        self._thread.join(timeout=5)
        if self._pending:
            print(f"MLflow unreachable: {len(self._pending)} tracking records not delivered", flush=True)
        for k, v in self._saved_env.items():  # MLflow's own retries back for whatever runs next
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        return not self._pending

    def drain(self, timeout: float) -> bool:
        """Deliver what is buffered now, for at most `timeout` s; True if nothing is left."""
        deadline = time.time() + timeout
        while self._pending and time.time() < deadline:
            self._flush()
            if self._pending:
                time.sleep(1.0)
        return not self._pending

    # ----------------------------------------------------------------------- background

    def _run(self) -> None:
        backoff = self._flush_every
        while not self._stop.wait(backoff):
            ok = self._flush()
            backoff = self._flush_every if ok else min(30.0, backoff * 2)

    def _flush(self) -> bool:
        with self._flush_lock:  # close() and the background thread may both flush
            return self._flush_locked()

    def _flush_locked(self) -> bool:
        while True:
            with self._lock:
                if not self._pending:
                    return True
                item = self._pending[0]
                # merge consecutive metric records into one request (MLflow takes up to 1000)
                batch: list[Metric] = []
                n = 0
                if item[0] == "metrics":
                    for it in self._pending:
                        if it[0] != "metrics" or len(batch) + len(it[1]) > 1000:
                            break
                        batch += it[1]
                        n += 1
            try:
                if item[0] == "metrics":
                    self.client.log_batch(self.run_id, metrics=batch)
                elif item[0] == "params":
                    self.client.log_batch(self.run_id, params=item[1])
                elif item[0] == "tags":
                    self.client.log_batch(self.run_id, tags=item[1])
                else:
                    self.client.log_artifact(self.run_id, item[1], item[2])
                    shutil.rmtree(os.path.dirname(item[1]), ignore_errors=True)
            except Exception as e:
                if _rejected(e):  # an answer, not an outage: retrying it would hold up every later record
                    print(f"MLflow rejected a {item[0]} record, dropped: {str(e)[:300]}", flush=True)
                    with self._lock:
                        for _ in range(max(n, 1)):
                            self._pending.popleft()
                    continue
                self.failures += 1
                if self.failures == 1 or self.failures % 10 == 0:
                    print(
                        f"MLflow unreachable ({type(e).__name__}); buffering {len(self._pending)} records", flush=True
                    )
                return False
            with self._lock:
                for _ in range(max(n, 1)):
                    self._pending.popleft()

    def tags(self, tags: dict[str, Any]) -> None:
        if tags:
            with self._lock:
                self._pending.append(
                    ("tags", [mlflow.entities.RunTag(k, redact(str(v))[:5000]) for k, v in tags.items()])
                )


def _rejected(e: Exception) -> bool:
    """The server answered and said no (e.g. a param logged again with another value)."""
    from mlflow.exceptions import RestException

    return isinstance(e, RestException) and e.error_code in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST")


class NullTracker:
    """What ranks other than 0 get: one MLflow run per job, not one per worker."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def params(self, params: dict[str, Any]) -> None:
        pass

    def artifact(self, path: str, folder: str | None = None) -> None:
        pass

    def drain(self, timeout: float = 0) -> bool:
        return True

    def close(self, timeout: float = 0) -> bool:
        return True

    def tags(self, tags: dict[str, Any]) -> None:
        pass


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


# MLflow 3's UI opens an experiment without a kind in its GenAI view (Traces, Judges, Prompts; our
# runs filed under "Evaluation runs"). This tag (ExperimentKind in the UI's source) makes it a
# model-training experiment: runs, metric charts and artifacts. A kind set by the user is kept.
EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_TAGS = {EXPERIMENT_KIND: "custom_model_development"}
# MLflow 3.17's UI takes the view from its GenAI / Model training switch (kept in the browser,
# GenAI by default) rather than from that tag, unless the address says which: every link ditforge
# prints carries it (checked in Chromium: tests/e2e/test_jobs_e2e.py::test_the_demo_run_in_the_mlflow_ui).
UI_VIEW = "workflowType=machine_learning"

# Metric names. The run page's "Model metrics" tab groups charts by the part before the first "/",
# sections in code-point order (digits, capitals, then lower case; names without "/" last) and
# charts alphabetically within one. So `train/` comes first with loss, lr and samples_per_s as its
# first three charts; the rest sort after it: `train_checkpoint/`, `train_data/`, `validation/`
# (generated-set quality and video tasks). Runs logged before this naming keep the old names
# (before 2026-12: checkpoint/ → train_checkpoint/, data/ → train_data/, quality/ → validation/,
# tasks/ → validation/tasks/, train/mask_ratio → train/token_mask_ratio); train/loss, train/lr and
# train/samples_per_s kept theirs.


def ui_link(tracking_uri: str, experiment_id: str | None = None, run_id: str | None = None) -> str:
    """The MLflow UI address of the experiment list, an experiment or a run, in the model-training view."""
    path = "/#/experiments" + (f"/{experiment_id}" if experiment_id else "") + (f"/runs/{run_id}" if run_id else "")
    return f"{tracking_uri.rstrip('/')}{path}?{UI_VIEW}"


def create_run(
    tracking_uri: str,
    spec: JobSpec,
    run_name: str,
    source_yaml: str | None,
    *,
    parent_run_id: str | None = None,
    resumed_from: str | None = None,
) -> str:
    """One MLflow run per job, created before submission so its id and link exist at once. A
    resumed run is a child of the run it continues (nested in the UI)."""
    import yaml

    use_mlflow_credentials()
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(spec.tracking.experiment)
    exp_id = exp.experiment_id if exp else _create_experiment(client, spec.tracking.experiment)
    if exp and EXPERIMENT_KIND not in exp.tags:  # made before this tag existed, or by hand: the kind the UI needs
        client.set_experiment_tag(exp_id, EXPERIMENT_KIND, EXPERIMENT_TAGS[EXPERIMENT_KIND])
    tags = {"ditforge.job": spec.name, "ditforge.run": run_name, "ditforge.spec_digest": spec.digest()}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id  # the UI nests the resumed run under its parent
    if resumed_from:
        tags["ditforge.resumed_from"] = resumed_from
    run = client.create_run(exp_id, run_name=run_name if not parent_run_id else f"{run_name}-resume", tags=tags)
    run_id = run.info.run_id
    dump = redact_obj(spec.model_dump(mode="json"))  # specs hold no secrets; this makes sure
    params = flatten(dump)
    client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    with tempfile.TemporaryDirectory() as d:
        resolved = os.path.join(d, "job.resolved.yaml")
        with open(resolved, "w") as f:
            yaml.safe_dump(dump, f, sort_keys=False)
        client.log_artifact(run_id, resolved, "spec")
        if source_yaml:  # the user's file as written, redacted like everything else
            source = os.path.join(d, os.path.basename(source_yaml))
            with open(source_yaml) as src, open(source, "w") as f:
                f.write(redact(src.read()))
            client.log_artifact(run_id, source, "spec")
    return run_id


def _create_experiment(client: MlflowClient, name: str) -> str:
    """A new experiment's id; when another submission created it since we looked (two jobs started
    together), that one's (RESOURCE_ALREADY_EXISTS)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(name, tags=EXPERIMENT_TAGS)
    except MlflowException as e:
        exp = client.get_experiment_by_name(name) if e.error_code == "RESOURCE_ALREADY_EXISTS" else None
        if exp is None:
            raise
        return str(exp.experiment_id)


def retry_final(
    fn: Callable[..., T], *args: Any, what: str, attempts: int = 5, base_delay_s: float = 2.0, **kwargs: Any
) -> T:
    """The driver's last MLflow calls come after a whole run: one network blip must not lose them.
    (MLflow's own HTTP retries are on in the driver; this covers an outage that outlasts them.)"""
    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if i == attempts - 1:
                raise
            wait = base_delay_s * 2**i
            print(
                f"ditforge: {what} failed ({type(e).__name__}: {str(e)[:200]}); retrying in {wait:.0f}s",
                file=sys.stderr,
                flush=True,
            )
            time.sleep(wait)
    raise ValueError(f"retry_final: attempts must be at least 1, not {attempts}")  # never called at all


def end_run(client: MlflowClient, run_id: str, status: str, error: str | None = None) -> None:
    """FINISHED, FAILED or KILLED, with the error as the `ditforge.error` tag; never raises (the
    job's own outcome is what the caller reports)."""
    try:
        if error:
            retry_final(client.set_tag, run_id, "ditforge.error", redact(error)[:500], what="tagging the run")
        retry_final(client.set_terminated, run_id, status, what=f"ending the MLflow run as {status}")
    except Exception as e:
        print(
            f"ditforge: could not end MLflow run {run_id} as {status}: {type(e).__name__}: {e}",
            file=sys.stderr,
            flush=True,
        )
