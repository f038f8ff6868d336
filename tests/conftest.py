"""Shared fixtures of both tiers: `tests/unit` (no services, no Ray, no servers: `make test-fast`)
and `tests/e2e` (the embedded services, Ray jobs, several hosts).

The embedded services (S3, MLflow, Ray) start once per session, the first time an e2e test asks
for them, under a DITFORGE_HOME of the session's own: never the working copy's `.ditforge/`,
whose services and runs are the developer's. They are stopped when the session ends, and the home
is removed when every test passed. `DITFORGE_TEST_HOME=DIR` pins the home (its services are then
reused by the next session, and left running)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PINNED_HOME = os.environ.get("DITFORGE_TEST_HOME")
# `make test` runs the suite in two pytest-xdist workers: they share their controller's home, and
# with it one set of services (the controller removes it; `embedded` starts the services once).
# A pytest a test runs itself is not a worker of ours, whatever it inherits: it gets its own home.
_OWN_WORKER = "PYTEST_XDIST_WORKER" in os.environ and os.environ.get("DITFORGE_TEST_CONTROLLER") == str(os.getppid())
TEST_HOME = Path(
    PINNED_HOME
    or (os.environ["DITFORGE_TEST_SESSION_HOME"] if _OWN_WORKER else None)
    or tempfile.mkdtemp(prefix="ditforge-tests-")
)
if not _OWN_WORKER:
    os.environ.update(DITFORGE_TEST_SESSION_HOME=str(TEST_HOME), DITFORGE_TEST_CONTROLLER=str(os.getpid()))
os.environ["DITFORGE_HOME"] = str(TEST_HOME)
# Tests put file:// data under pytest's tmp_path: allow the temp folder as a spec path root.
os.environ.setdefault("DITFORGE_ROOTS", tempfile.gettempdir())


# An MLflow client without a registry / tracking URI falls back to `sqlite:///mlflow.db` in the
# working directory, which for the tests is the repository (seen: `mlflow.artifacts.download_artifacts`
# of a `models:/` URI with only `tracking_uri` given). No test may create one: an audit hook names
# the in-process caller, and the session fails at its end if the file is there.
STRAY_DB = REPO / "mlflow.db"
_stray_callers: list[str] = []


def _watch_sqlite(event: str, args: tuple) -> None:
    if event == "sqlite3.connect" and args and str(args[0]).endswith("mlflow.db"):
        if Path(str(args[0])).resolve() == STRAY_DB and not _stray_callers:
            import traceback

            _stray_callers.append("".join(traceback.format_stack(limit=25)))


sys.addaudithook(_watch_sqlite)


def pytest_sessionfinish(session, exitstatus):
    if not PINNED_HOME and not _OWN_WORKER:
        import shutil

        from ditforge import services

        stopped = services.down()
        if stopped:
            session.config.get_terminal_writer().line(f"stopped the session's services: {', '.join(stopped)}")
        if exitstatus == 0:
            shutil.rmtree(TEST_HOME, ignore_errors=True)
        else:
            session.config.get_terminal_writer().line(f"the session's DITFORGE_HOME (logs): {TEST_HOME}")
    if STRAY_DB.exists():
        where = (
            ("\nfirst opened in this process by:\n" + _stray_callers[0])
            if _stray_callers
            else " (not by the pytest process itself: a subprocess, e.g. a `ditforge` CLI run from the repository)"
        )
        session.config.get_terminal_writer().line(
            f"error: {STRAY_DB} exists after the tests: an MLflow client fell back to its default local store{where}",
            red=True,
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


UNIT = REPO / "tests" / "unit"
SERVERS = ("embedded", "s3_prefix", "hosts", "data_ray")  # fixtures that start servers


# The longest e2e files, in the order `make test`'s two xdist workers (`--dist loadfile`: a file is
# one unit, so its module fixtures run once) should start them, so that neither is left with a long
# one at the end (durations of a `make test` run from a fresh clone, 2026-12-07).
LONGEST_FIRST = [
    "e2e/test_jobs_e2e.py",  # 501 s
    "e2e/test_train_e2e.py",  # 464 s
    "e2e/test_restart.py",  # 237 s
    "e2e/test_video_e2e.py",  # 219 s
    "e2e/test_bench.py",  # 179 s
    "e2e/test_quality.py",  # 104 s
    "e2e/test_nonfinite.py",  # 100 s
    "e2e/test_reshard.py",  # 80 s
    "e2e/test_security.py",  # 75 s
    "e2e/test_security_e2e.py",  # 74 s
    "e2e/test_data.py",  # 55 s
    "e2e/test_vae_loop.py",  # 53 s
    "e2e/test_bad_data_e2e.py",  # 51 s
    "e2e/test_readme_commands.py",  # 37 s
    "e2e/test_run_end.py",
    "unit/test_batch.py",
]


def pytest_collection_modifyitems(config, items):
    rank = {f: i for i, f in enumerate(LONGEST_FIRST)}
    # stable: the rest keep their order
    items.sort(key=lambda i: rank.get(Path(str(i.path)).relative_to(REPO / "tests").as_posix(), len(rank)))
    unit_with_servers = [
        i.nodeid
        for i in items
        if Path(str(i.path)).is_relative_to(UNIT) and set(SERVERS) & set(getattr(i, "fixturenames", ()))
    ]
    if unit_with_servers:
        raise pytest.UsageError(
            f"tests/unit may not start servers ({', '.join(SERVERS)}): move these to tests/e2e: "
            + ", ".join(unit_with_servers)
        )
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """One intra-op thread: on a 2-core machine, 2 threads per test ran ~20x slower under load."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def embedded():
    """The embedded services, up (started if needed, reused if already running)."""
    import fcntl

    from ditforge import services

    try:
        with open(TEST_HOME / ".services.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # the other xdist worker may be starting them right now
            return services.up()
    except services.ServiceError as e:  # most often: the working copy's own services hold the ports
        raise services.ServiceError(
            f"{e}; if another DITFORGE_HOME's services run on this machine (e.g. "
            f"`make demo`'s), stop them first (`make down`)"
        ) from None


@pytest.fixture(scope="module")
def data_ray():
    """One private Ray for a module's in-process ingests and encodes: each call would otherwise
    start (and stop) its own, ~8 s apiece on the 2-core CI machine."""
    from ditforge.data.parallel import ray_session

    with ray_session(num_cpus=2):
        yield


@pytest.fixture
def s3_prefix(embedded):
    """A fresh folder on the embedded S3 server, unique to this test."""
    return f"s3://ditforge/tests/{uuid.uuid4().hex[:10]}"


def run_cli(*args: str, timeout: float = 900, cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `ditforge ARGS...` as a user would, in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "ditforge.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def cli():
    return run_cli


# Several hosts from network namespaces, one set per test run (tests/hosts.py says what each gets).
from .hosts import hosts  # noqa: E402,F401
