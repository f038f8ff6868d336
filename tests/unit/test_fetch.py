"""Fetching a model from MLflow leaves the process's MLflow settings as they were."""

from __future__ import annotations

import os

import mlflow
import pytest

from ditforge.models import fetch


def test_fetch_from_mlflow_leaves_no_server_behind_for_subprocesses(monkeypatch):
    # mlflow.set_tracking_uri / set_registry_uri write MLFLOW_*_URI into os.environ: a fetch that
    # left them there sent every later subprocess to this server's registry.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", "http://registry.example:5000")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # nothing listens on port 9: fail at once
    before = mlflow.get_tracking_uri()
    with pytest.raises(fetch.FetchError, match="cannot fetch from MLflow at http://127.0.0.1:9"):
        fetch.fetch_model("models:/nothing/1", tracking_uri="http://127.0.0.1:9")
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert os.environ["MLFLOW_REGISTRY_URI"] == "http://registry.example:5000"
    assert mlflow.get_tracking_uri() == before


def test_inside_the_block_mlflow_talks_to_the_given_server(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    with fetch._mlflow_server("http://127.0.0.1:9"):
        assert mlflow.get_tracking_uri() == mlflow.get_registry_uri() == "http://127.0.0.1:9"
    assert "MLFLOW_REGISTRY_URI" not in os.environ and "MLFLOW_TRACKING_URI" not in os.environ
