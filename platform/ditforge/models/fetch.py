"""A trained model from where it is kept: an MLflow model (models:/NAME/VERSION, runs:/ID/model,
mlflow-artifacts:/...) fetched from a given tracking server, or an export folder (file://, s3://, gs://).
Either way a `inference/export.py` folder: model.json beside raw / EMA safetensors."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .dit import DiT

MLFLOW_PREFIXES = ("models:/", "runs:/", "mlflow-artifacts:/")


class FetchError(Exception):
    """The model cannot be fetched; `about` names the input at fault: "model" or "tracking_uri"."""

    def __init__(self, about: str, reason: str):
        self.about, self.reason = about, reason
        super().__init__(reason)


def from_mlflow(model: str) -> bool:
    """MODEL is fetched from an MLflow tracking server (it needs a tracking URI)."""
    return model.startswith(MLFLOW_PREFIXES)


@contextmanager
def _mlflow_server(uri: str) -> Iterator[None]:
    """MLflow's tracking and registry URIs set to URI inside the block only. mlflow.set_*_uri also
    write MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI into os.environ, which every later subprocess
    would inherit (a fresh process then looked up another server's registry): put all of it back."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry
    from mlflow.tracking._tracking_service import utils as tracking

    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    env = {k: os.environ.get(k) for k in names}
    before = (tracking._tracking_uri, registry._registry_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)  # models:/ resolves through the registry, not a local file
    try:
        yield
    finally:
        tracking._tracking_uri, registry._registry_uri = before
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def fetch_model(model: str, weights: str = "ema", tracking_uri: str | None = None) -> tuple[DiT, dict]:
    """MODEL → (DiT, model.json dict), with WEIGHTS ("ema" or "raw") loaded. An MLflow model is
    fetched from TRACKING_URI, which must then be given, without a password (it is printed in errors)."""
    from .. import storage
    from ..spec import no_password
    from ..inference.export import FILES, load_model

    if weights not in ("ema", "raw"):
        raise ValueError(f"weights {weights!r}: expected ema or raw")
    local = Path(tempfile.mkdtemp(prefix="ditforge-model-"))
    if from_mlflow(model):
        import mlflow

        if not tracking_uri:
            raise ValueError(f"{model}: an MLflow model needs a tracking URI")
        try:  # a tracking URI is printed in errors: it must not carry a password
            no_password(tracking_uri)
        except ValueError as e:
            raise FetchError("tracking_uri", str(e)) from None
        try:
            with _mlflow_server(tracking_uri):
                mlflow.artifacts.download_artifacts(artifact_uri=model, dst_path=str(local), tracking_uri=tracking_uri)
        except Exception as e:
            raise FetchError(
                "model", f"cannot fetch from MLflow at {tracking_uri} ({str(e).splitlines()[0]})"
            ) from None
        found = list(local.rglob("model.json"))
        if not found:
            raise FetchError("model", "no model.json in it (not a ditforge export)")
        local = found[0].parent
    else:
        src = storage.absolute(model)
        for f in FILES:
            if storage.exists(storage.join(src, f)):
                storage.get_file(storage.join(src, f), local / f)
        if not (local / "model.json").exists():
            raise FetchError("model", "no model.json there (not a ditforge export)")
    return load_model(local, weights)
