"""Registered models are MLflow pyfunc models: loadable and callable by any MLflow user, here
from a separate (non-embedded) MLflow server, in a fresh process."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import save_file

from ditforge.models.dit import DiT, dit_config
from ditforge.spec import ModelSpec, ObjectiveSpec, SampleSpec, VAESpec
from ditforge.inference import pyfunc
from ditforge.bench.common import free_port

from ..conftest import run_cli

pytestmark = pytest.mark.slow


def _export(folder, latent_shape, frames: int = 1):
    """An export folder (what `ditforge export` writes) for a small, untrained class-conditional DiT."""
    torch.manual_seed(0)
    model = DiT(dit_config(ModelSpec(size="T", patch=2, num_classes=10, attention="math"), latent_shape[0]))
    folder.mkdir(parents=True)
    save_file(model.state_dict(), str(folder / "ema.safetensors"))
    (folder / "model.json").write_text(
        json.dumps(
            {
                "dit": dataclasses.asdict(model.cfg),
                "latent_shape": list(latent_shape),
                "vae": VAESpec(kind="identity", downsample=2).model_dump(mode="json"),
                "sample": SampleSpec(steps=3).model_dump(mode="json"),
                "objective": ObjectiveSpec().model_dump(mode="json"),
                "classes": [],
                "job": "pyfunc-test",
                "step": 1,
                "checkpoint": "file://none",
            }
        )
    )
    return folder


def _listens(proc: subprocess.Popen, port: int) -> bool:
    """Whether `proc` or a process it started listens on `port` (not some other process)."""
    import psutil

    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        return any(c.laddr.port == port and c.status == "LISTEN" for p in tree for c in p.net_connections("tcp"))
    except psutil.Error:
        return False


@pytest.fixture(scope="module")
def remote_mlflow(tmp_path_factory):
    """A plain `mlflow server` of its own (sqlite + proxied local artifacts), not ditforge's embedded one.
    The port is free when chosen but may be taken before the server binds it (another test's Ray
    picks ports from the same range): then this tries another, rather than talk to a stranger."""
    root = tmp_path_factory.mktemp("remote-mlflow")
    for attempt in range(3):
        port = free_port()
        log = root / f"server-{attempt}.log"
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--backend-store-uri",
                f"sqlite:///{root}/mlflow.db",
                "--workers",
                "1",
                "--artifacts-destination",
                f"file://{root}/artifacts",
            ],
            cwd=root,
            stdout=open(log, "w"),
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 180
        while proc.poll() is None and time.time() < deadline:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                if _listens(proc, port):
                    break
            except OSError:
                pass
            time.sleep(1)
        if proc.poll() is None and _listens(proc, port):
            break
        proc.kill()
        proc.wait(30)
    else:
        raise RuntimeError(f"mlflow server did not come up: {log.read_text()[-2000:]}")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def _register(url: str, export_folder, model_dir, name: str) -> str:
    """What the driver's finalize does: pyfunc folder → run artifacts → a registered version."""
    client = MlflowClient(url, registry_uri=url)
    exp = client.get_experiment_by_name("pyfunc") or None
    exp_id = exp.experiment_id if exp else client.create_experiment("pyfunc")
    run_id = client.create_run(exp_id).info.run_id
    pyfunc.save(export_folder, model_dir)
    client.log_artifacts(run_id, str(model_dir), "model")
    client.create_registered_model(name)
    mv = client.create_model_version(name, f"{client.get_run(run_id).info.artifact_uri}/model", run_id=run_id)
    return f"models:/{name}/{mv.version}"


PREDICT = """
import json, sys, mlflow, pandas
mlflow.set_tracking_uri(sys.argv[1])
m = mlflow.pyfunc.load_model(sys.argv[2])
out = m.predict(pandas.DataFrame({"class": [3, 7], "seed": [0, 1]}), params={"steps": 2})
one = m.predict(pandas.DataFrame({"class": [7], "seed": [1]}), params={"steps": 2})
sig = m.metadata.signature.to_dict()
print(json.dumps({"dtype": str(out.dtype), "shape": list(out.shape), "row_alone": bool((one[0] == out[1]).all()),
                  "differ": bool((out[0] != out[1]).any()), "inputs": sig["inputs"], "outputs": sig["outputs"]}))
"""


def test_registered_pyfunc_predicts_images_in_a_fresh_process_from_a_remote_server(remote_mlflow, tmp_path):
    uri = _register(remote_mlflow, _export(tmp_path / "export", (12, 16, 16)), tmp_path / "pyfunc", "pyfunc-image")
    # a fresh interpreter that knows only the server and the model URI (nothing of this process)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    r = subprocess.run(
        [sys.executable, "-c", PREDICT, remote_mlflow, uri],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["dtype"] == "uint8" and res["shape"] == [2, 32, 32, 3]
    assert res["row_alone"] and res["differ"]  # a row's seed fixes its image; different rows differ
    assert '"class"' in res["inputs"] and '"uint8"' in res["outputs"] and "[-1, 32, 32, 3]" in res["outputs"]
    # the CLI samples from the same remote registry (not the embedded server)
    png = tmp_path / "grid.png"
    r = run_cli(
        "sample", "--model", uri, "--tracking-uri", remote_mlflow, "--out", str(png), "--per-class", "1", "--steps", "2"
    )
    assert r.returncode == 0, r.stderr[-3000:]
    from PIL import Image

    assert Image.open(png).size == (1 * 66 + 2, 10 * 66 + 2)  # 10 classes x 1, 32 px upscaled 2x, 2 px gaps


def test_video_pyfunc_returns_clips(tmp_path):
    import mlflow.pyfunc
    import pandas

    folder = _export(tmp_path / "export", (12, 4, 8, 8))
    m = mlflow.pyfunc.load_model(str(pyfunc.save(folder, tmp_path / "pyfunc")))
    out = m.predict(pandas.DataFrame({"class": [1, 2, 3]}), params={"steps": 2})
    assert out.dtype == np.uint8 and out.shape == (3, 4, 16, 16, 3)  # (N, T, H, W, RGB)
    with pytest.raises(Exception, match="class"):
        m.predict(pandas.DataFrame({"class": [10]}))
