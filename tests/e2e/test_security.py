"""Security defaults: loopback binds, authentication beyond loopback, no secret in any output,
no code execution from a checkpoint, no spec path outside the allowed roots."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import torch

from ditforge import credentials, services, storage
from ditforge.spec import SpecError, load_job
from ditforge.bench.common import free_port

from ..conftest import run_cli


# ------------------------------------------------------------------------------ spec paths


def _job(tmp_path: Path, body: str) -> Path:
    f = tmp_path / "job.yaml"
    f.write_text(f"name: j\n{body}\n")
    return f


@pytest.mark.parametrize(
    "body, field",
    [
        ("data: {train: file://../../../etc}", "data.train"),
        ("data: {train: file:///etc/ditforge}", "data.train"),
        ("data: {train: s3://ditforge/x}\ncheckpoint: {uri: 'file://{root}/../outside'}", "checkpoint.uri"),
        ("data: {train: s3://ditforge/x}\ntrain: {resume: 'file:///var/tmp/runs/r/step_00000010'}", "train.resume"),
        ("data: {train: s3://ditforge/x}\nvae: {kind: own, path: 'file://{root}/a/../../b'}", "vae.path"),
        ("data: {train: s3://ditforge/x}\nvae: {kind: diffusers, path: '{root}/../vae'}", "vae.path"),
        ("data: {train: s3://ditforge/x}\nmodel: {text: transformers, text_encoder: ~/t5}", "model.text_encoder"),
    ],
)
def test_spec_paths_cannot_escape_the_roots(tmp_path, monkeypatch, body, field):
    root = tmp_path / "project"
    (root / "a").mkdir(parents=True)
    monkeypatch.chdir(root)  # the working directory is a root ...
    monkeypatch.setenv("DITFORGE_HOME", str(root / ".ditforge"))  # ... and so is the home
    monkeypatch.setenv("DITFORGE_ROOTS", "")
    with pytest.raises(SpecError) as e:
        load_job(_job(tmp_path, body.replace("{root}", str(root))))
    assert f": {field}: " in str(e.value) and "outside the allowed roots" in str(e.value), str(e.value)


def test_spec_paths_inside_the_roots_are_accepted(tmp_path, monkeypatch):
    root, extra = tmp_path / "project", tmp_path / "shared-data"
    root.mkdir()
    extra.mkdir()
    monkeypatch.chdir(root)
    monkeypatch.setenv("DITFORGE_HOME", str(root / ".ditforge"))
    monkeypatch.setenv("DITFORGE_ROOTS", str(extra))
    spec = load_job(
        _job(
            tmp_path,
            f"data: {{train: file://data/../latents}}\ncheckpoint: {{uri: file://{extra}/runs}}\n"
            "vae: {kind: own, path: file://.ditforge/vae}",
        )
    )
    assert spec.data.train == "file://data/../latents"  # `..` that stays inside is fine
    # a symlink that points outside is followed, and refused
    (root / "link").symlink_to("/etc")
    with pytest.raises(SpecError, match="data.train: 'file://link/x' resolves to /etc/x"):
        load_job(_job(tmp_path, "data: {train: file://link/x}"))


def test_escaping_path_on_the_cli_is_one_line_exit_2_and_nothing_written(tmp_path):
    job = _job(tmp_path, "data: {train: s3://ditforge/x}\ncheckpoint: {uri: file://../../../../tmp/escape}")
    home = tmp_path / "home"
    r = run_cli("submit", str(job), cwd=tmp_path, env={"DITFORGE_HOME": str(home), "DITFORGE_ROOTS": ""})
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"error: {job}: checkpoint.uri: '"), r.stderr
    assert not home.exists() and not Path("/tmp/escape").exists()


def test_a_password_in_a_spec_is_refused_without_repeating_it(tmp_path):
    secret = "sentinel-" + os.urandom(6).hex()
    job = _job(tmp_path, f"data: {{train: s3://ditforge/x}}\ntracking: {{uri: 'http://me:{secret}@127.0.0.1:5005'}}")
    cluster = tmp_path / "c.yaml"
    cluster.write_text(f"kind: address\naddress: http://admin:{secret}@head:8265\n")
    r = run_cli("validate", str(job), str(cluster))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2 and f"{job}: tracking.uri: holds a password" in lines[0], r.stderr
    assert f"{cluster}: address: holds a password" in lines[1], r.stderr
    assert secret not in r.stdout + r.stderr


# --------------------------------------------------------------------------- listening sockets


def _listening(pid: int) -> list[tuple[str, str, int]]:
    procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    out = []
    for p in procs:
        try:
            out += [
                (p.name(), c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="inet") if c.status == "LISTEN"
            ]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def test_redact_masks_variables_named_key(monkeypatch):
    from ditforge.credentials import redact

    monkeypatch.setenv("DITFORGE_TEST_API_KEY", "k3y-value-0123456789")
    monkeypatch.setenv("wandb_api_key", "lower-case-key-value")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDNOTASECRET01")  # an id, not a secret
    text = "key k3y-value-0123456789 / lower-case-key-value / id AKIDNOTASECRET01"
    assert redact(text) == "key *** / *** / id AKIDNOTASECRET01"


def test_deepspeed_paths_inside_the_roots_pass_through(tmp_path, monkeypatch):
    from ditforge.train.engine import deepspeed_config

    monkeypatch.chdir(tmp_path)
    spec = load_job(
        _job(
            tmp_path,
            "data: {train: s3://ditforge/x}\ndeepspeed: {tensorboard: {enabled: true, output_path: tb, job_name: j}}",
        )
    )
    assert deepspeed_config(spec)["tensorboard"] == {"enabled": True, "output_path": "tb", "job_name": "j"}


def test_embedded_services_listen_on_loopback_only(embedded):
    """Every socket the S3 server and MLflow listen on, and Ray's dashboard / Jobs API, is on 127.0.0.1.

    Ray's core gRPC servers (GCS 6379, raylet, object manager, workers) bind every interface
    (Ray hardcodes 0.0.0.0 / ::), and `ray start` swaps --node-ip-address=127.0.0.1 for the
    machine's IP: see README, Security defaults."""
    for name in ("s3", "mlflow"):
        socks = _listening(services.running(name))
        assert socks, name
        assert {ip for _, ip, _ in socks} == {"127.0.0.1"}, (name, socks)
    dash = int(embedded.ray_dashboard.rsplit(":", 1)[1])
    ray_socks = _listening(services.running("ray"))
    assert {ip for _, ip, port in ray_socks if port == dash} == {"127.0.0.1"}, ray_socks


def test_embedded_ray_wants_its_token_even_on_loopback(embedded):
    """Ray's core ports listen beyond loopback on a machine with a routable address whatever we ask
    (tests/test_multihost.py measures it), so the embedded head always runs with token auth: a
    request without the token, or with a wrong one, is refused; the platform's client gets in."""
    from ditforge import credentials
    from ditforge.cluster.jobs import jobs_client

    jobs = f"{embedded.ray_dashboard}/api/jobs/"
    for headers in ({}, {"Authorization": "Bearer " + "0" * 64}):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(jobs, headers=headers), timeout=30)
        assert e.value.code in (401, 403), e.value.code
    assert credentials.ray_token()
    assert isinstance(jobs_client(embedded.ray_dashboard, "RAY_AUTH_TOKEN").list_jobs(), list)


def test_serving_beyond_loopback_without_credentials_is_refused(tmp_path):
    home = tmp_path / "home"
    cluster = tmp_path / "c.yaml"
    cluster.write_text("kind: embedded\nhost: 0.0.0.0\n")
    env = {
        "DITFORGE_HOME": str(home),
        "HOME": str(tmp_path),
        "MLFLOW_TRACKING_USERNAME": "",
        "MLFLOW_TRACKING_PASSWORD": "",
        "RAY_AUTH_TOKEN": "",
        "RAY_AUTH_TOKEN_PATH": "",
        "DITFORGE_MLFLOW_CREDENTIALS": "",
    }
    r = run_cli("services", "up", "-c", str(cluster), env=env, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.count("\n") == 1 and "refusing to serve beyond this machine without authentication" in r.stderr
    assert "MLflow credentials" in r.stderr and "Ray token" in r.stderr
    assert not home.exists()  # nothing started, nothing written


def test_mlflow_basic_auth_rejects_anonymous_and_accepts_the_platform_client(tmp_path, monkeypatch):
    """A second MLflow server of our own (temp home, free port): the shared one stays untouched."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("DITFORGE_HOME", str(tmp_path / "home"))
    password = "pw-" + os.urandom(8).hex()
    url = services.start_mlflow(free_port(), auth={"username": "dfadmin", "password": password})
    try:
        search = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(search, timeout=30)
        assert e.value.code == 401
        wrong = base64.b64encode(b"dfadmin:nope").decode()
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(
                urllib.request.Request(search, headers={"Authorization": f"Basic {wrong}"}), timeout=30
            )
        assert e.value.code == 401
        # the platform's clients: credentials from a named file, put into MLflow's environment variables
        creds = tmp_path / "mlflow-credentials.json"
        creds.write_text(json.dumps({"username": "dfadmin", "password": password}))
        monkeypatch.setenv("DITFORGE_MLFLOW_CREDENTIALS", str(creds))
        monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
        from ditforge.credentials import use_mlflow_credentials

        use_mlflow_credentials()
        exp = MlflowClient(url).create_experiment("auth-test")
        assert MlflowClient(url).get_experiment(exp).name == "auth-test"
    finally:
        services.stop_process("mlflow")
        for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            os.environ.pop(k, None)
    log = (tmp_path / "home" / "logs" / "mlflow.log").read_text()
    assert "401" in log and password not in log


@pytest.mark.serial  # a second Ray head on this machine
def test_ray_beyond_loopback_wants_the_token(tmp_path, monkeypatch):
    """A Ray head of our own bound beyond loopback (temp home and temp dir, its own ports): its Jobs
    API refuses requests without Ray's token, and the platform's client gets in with it."""
    import shutil
    import tempfile

    from ditforge.cluster.jobs import jobs_client
    from ditforge.spec import EmbeddedCluster, ServicePorts

    monkeypatch.setenv("DITFORGE_HOME", str(tmp_path / "home"))
    # The head gets this process's own Ray token, not a new one: Ray caches the token a process
    # first loads, so after any earlier test's Ray call a fresh RAY_AUTH_TOKEN would make the
    # state API here send the old one (seen in the full suite: "Invalid authentication token").
    credentials.ensure_ray_token()
    temp = tempfile.mkdtemp(prefix="/tmp/rt")  # short: Ray's socket paths live under it
    b = 24000 + os.getpid() % 50 * 100  # a port block of its own, away from the other heads' ports
    ports = ServicePorts(mlflow=free_port(), ray_dashboard=free_port(), ray_gcs=free_port())
    cluster = EmbeddedCluster(host="0.0.0.0", cpus=1, ports=ports)
    extra = (
        f"--temp-dir={temp}",
        f"--ray-client-server-port={free_port()}",
        f"--node-manager-port={b}",
        f"--object-manager-port={b + 1}",
        f"--dashboard-agent-listen-port={b + 2}",
        f"--dashboard-agent-grpc-port={b + 3}",
        f"--metrics-export-port={b + 4}",
        f"--runtime-env-agent-port={b + 5}",
        f"--min-worker-port={b + 10}",
        f"--max-worker-port={b + 99}",
    )
    try:
        dash = services.start_ray(cluster, extra)
        jobs = f"{dash}/api/jobs/"
        for headers in ({}, {"Authorization": "Bearer " + "0" * 64}):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(urllib.request.Request(jobs, headers=headers), timeout=30)
            assert e.value.code in (401, 403), e.value.code
        assert jobs_client(dash, "RAY_AUTH_TOKEN").list_jobs() == []  # the token from the environment
    finally:
        services.stop_process("ray")
        shutil.rmtree(temp, ignore_errors=True)


# ------------------------------------------------------------------------------ safe loading


class _Evil:
    """Unpickling this runs `touch MARKER`: what a crafted checkpoint file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant_malicious_checkpoint(step_uri: str, marker: Path) -> None:
    """A step folder whose DeepSpeed files are pickles that run code, with a matching manifest."""
    files = {}
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        buf = io.BytesIO()
        torch.save({"module": {}, "optimizer_state_dict": _Evil(marker)}, buf)
        data = buf.getvalue()
        storage.write_bytes(storage.join(step_uri, name), data)
        files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "rank": 0}
    model_json = json.dumps({"dit": {}, "latent_shape": [4, 16, 16]}).encode()
    storage.write_bytes(storage.join(step_uri, "model.json"), model_json)
    files["model.json"] = {"bytes": len(model_json), "sha256": hashlib.sha256(model_json).hexdigest(), "rank": 0}
    manifest = {"step": 10, "tag": "step_00000010", "world_size": 1, "created": 0, "files": files}
    storage.write_bytes(storage.join(step_uri, "manifest.json"), json.dumps(manifest).encode())


def test_export_refuses_a_malicious_checkpoint(s3_prefix, tmp_path):
    marker = tmp_path / "PWNED"
    step = f"{s3_prefix}/runs/evil/step_00000010"
    plant_malicious_checkpoint(step, marker)
    r = run_cli("export", step, "--out", f"file://{tmp_path}/out")
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.count("\n") == 1 and "refused to load: not a plain tensor checkpoint" in r.stderr, r.stderr
    assert "posix.system" in r.stderr  # names what it would have called
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_deepspeed_checkpoint_files_pass_the_safe_loader(tmp_path):
    """What DeepSpeed itself writes (model and ZeRO optimizer states) loads with weights_only=True."""
    from ditforge.train.checkpoint import check_pickles, safe_torch_load
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    state = {
        "optimizer_state_dict": {
            "loss_scaler": LossScaler(1.0),
            "zero_stage": ZeroStageEnum.gradients,
            "state": {0: {"exp_avg": torch.ones(3)}},
        },
        "ds_version": "0.19.8",
    }
    torch.save(state, tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    check_pickles(tmp_path, "here")
    assert safe_torch_load(tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt")["ds_version"] == "0.19.8"
