"""Shared fixtures. The embedded services (S3, MLflow, Ray) are started once per session and
reused; they keep state under $DITFORGE_HOME (default: the repository's .ditforge/)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("DITFORGE_HOME", str(REPO / ".ditforge"))
# Tests put file:// data under pytest's tmp_path: allow the temp folder as a spec path root.
os.environ.setdefault("DITFORGE_ROOTS", tempfile.gettempdir())


def pytest_collection_modifyitems(config, items):
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
    from ditforge import services

    return services.up()


@pytest.fixture
def s3_prefix(embedded):
    """A fresh folder on the embedded S3 server, unique to this test."""
    return f"s3://ditforge/tests/{uuid.uuid4().hex[:10]}"


def run_cli(*args: str, timeout: float = 900, cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `ditforge ARGS...` as a user would, in a subprocess."""
    return subprocess.run([sys.executable, "-m", "ditforge.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env={**os.environ, **(env or {})})


@pytest.fixture
def cli():
    return run_cli


# Several hosts from network namespaces, one set per test run (tests/hosts.py says what each gets).
from .hosts import hosts  # noqa: E402,F401
