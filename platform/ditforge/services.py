"""The embedded services: a SeaweedFS S3 server, an MLflow tracking server and a Ray head.

All bind to 127.0.0.1 unless the cluster spec's `host` says 0.0.0.0; then each runs with
authentication (S3 keys, MLflow basic auth, Ray token auth) or does not start at all. They keep
their state under `$DITFORGE_HOME` (`.ditforge/`) so a restart loses
nothing, and are reused when already up. Each runs in its own session, recorded by pid and start
time (procs.py), so `ditforge services down` stops it and its children, and never a stranger that
was given the same pid later. `dirs`, `spawn`, `wait_ready`, `running` and `stop_process` are the
supervision that the local cluster and `cluster join` use for their Ray nodes too.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

from . import credentials, procs, raysite, storage
from .spec import EmbeddedCluster

BUCKET = "ditforge"
S3_PORT = 8333
# Beyond loopback SeaweedFS still binds 127.0.0.1 (its other ports have no authentication), its S3
# moves here, and a relay (ditforge.relay) serves S3_PORT on the spec's host.
S3_INNER_PORT = 8334


class ServiceError(Exception):
    """A service did not come up; the message names it and its log file."""


@dataclass
class Endpoints:
    s3: str
    mlflow: str
    ray_dashboard: str
    ray_gcs: str

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def dirs() -> dict[str, Path]:
    h = storage.home()
    d = {"home": h, "run": h / "run", "logs": h / "logs", "s3": h / "s3", "mlflow": h / "mlflow"}
    for p in d.values():
        p.mkdir(parents=True, exist_ok=True)
    os.chmod(d["s3"], 0o700)  # holds the S3 keys
    return d


def require_auth(host: str) -> dict:
    """What a service bound beyond loopback needs, checked before anything starts: MLflow basic-auth
    credentials and a Ray token (S3 always has its keys). Returns the MLflow credentials, or {}."""
    if credentials.is_loopback(host):
        return {}
    try:
        mlf = credentials.mlflow_credentials()
    except ValueError as e:
        raise ServiceError(f"host {host}: {e}") from None
    missing = []
    if not mlf:
        missing.append(
            "MLflow credentials (MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or a JSON "
            f"file named by ${credentials.MLFLOW_CREDENTIALS_ENV})"
        )
    if not credentials.ray_token():
        missing.append(
            "a Ray token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token: `ray get-auth-token --generate`)"
        )
    if missing:
        raise ServiceError(
            f"host {host}: refusing to serve beyond this machine without authentication; "
            f"missing {' and '.join(missing)}"
        )
    assert mlf is not None  # `missing` names it otherwise
    return {"username": mlf[0], "password": mlf[1]}


def use_client_auth(host: str | None = None) -> None:
    """This process talks to services started with authentication: MLflow clients (beyond
    loopback) read their credentials from the environment; Ray's clients (always: the head runs
    with token auth, see start_ray) send Ray's token. `host`: where the services are bound
    (default: what `up` recorded). Called by `up` and once by the CLI, never as a side effect of
    looking up an address."""
    if host is None:
        host = _saved_ports().get("host", "127.0.0.1")
    if not credentials.is_loopback(host):
        credentials.use_mlflow_credentials()
    credentials.use_ray_token()


def advertised(host: str) -> str:
    """The address other machines reach services bound to `host` at: loopback stays loopback; a
    0.0.0.0 bind is reached at the address of the interface holding the default route (what
    Ray picks for its node address too)."""
    if credentials.is_loopback(host):
        return "127.0.0.1"
    if host not in ("0.0.0.0", "::"):
        return host
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # a UDP "connect" sends nothing: it only picks the route
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"  # no route out: nothing beyond this machine can reach us anyway


def _ports_file() -> Path:
    return storage.home() / "run" / "ports.json"


def _saved_ports() -> dict:
    """What `up` chose (`run/ports.json`: the ports and the host), or {} before any `up`."""
    saved = _ports_file()
    return json.loads(saved.read_text()) if saved.exists() else {}


def endpoints(cluster: EmbeddedCluster | None = None) -> Endpoints:
    ports = (cluster or EmbeddedCluster()).ports
    host = cluster.host if cluster else "127.0.0.1"
    p = _saved_ports() if cluster is None else {}
    if p:  # commands without a cluster file use what `up` chose
        mlflow, dash, gcs = p["mlflow"], p["ray_dashboard"], p["ray_gcs"]
        host = p.get("host", "127.0.0.1")
    else:
        mlflow, dash, gcs = ports.mlflow, ports.ray_dashboard, ports.ray_gcs
    # Served beyond loopback, the addresses handed to jobs (tracking URI, Jobs API) must work on
    # every host of the cluster, not only here. S3 stays 127.0.0.1 here: each host names its own
    # endpoint (AWS_ENDPOINT_URL_S3), and this machine's key file says 127.0.0.1.
    addr = advertised(host)
    return Endpoints(
        s3=f"http://127.0.0.1:{S3_PORT}",
        mlflow=f"http://{addr}:{mlflow}",
        ray_dashboard=f"http://{addr}:{dash}",
        ray_gcs=f"{addr}:{gcs}",
    )


# --------------------------------------------------------------------------------- helpers


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return True
    except urllib.error.HTTPError as e:
        return e.code < 500  # S3 answers 403 to an anonymous GET: it is up
    except (urllib.error.URLError, OSError, TimeoutError):
        return False


def port_open(host: str, port: int, timeout: float = 2.0) -> bool:
    """Whether a TCP connection to host:port is accepted (a hung server's still is: its kernel answers)."""
    import socket

    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def record_path(name: str) -> Path:
    """`run/<name>.pid`: the service's pid *and* start time (procs.py), so a reused pid is not it."""
    return storage.home() / "run" / f"{name}.pid"


def running(name: str) -> int | None:
    """The pid of the recorded service if that very process still runs, else None."""
    p = procs.read(record_path(name))
    return p.pid if p else None


def spawn(name: str, argv: list[str], env: dict) -> psutil.Process:
    """Start a service in its own session (it survives the CLI, and its whole group can be
    stopped), output to `logs/<name>.log`, recorded in `run/<name>.pid`."""
    d = dirs()
    return procs.spawn(record_path(name), argv, env, d["logs"] / f"{name}.log", d["home"])


def wait_ready(
    name: str,
    ready: Callable[[], object],
    timeout: float,
    proc: psutil.Process | None = None,
    why: Callable[[], str | None] | None = None,
) -> None:
    """Until `ready()`, or ServiceError when `proc` exits or `timeout` passes. `why`: what is still
    wrong (a check's reason), said in the error instead of only the log's tail."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ready():
            return
        if proc is not None and not procs.alive(proc):
            break
        time.sleep(0.5)
    log = storage.home() / "logs" / f"{name}.log"
    tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
    reason = why() if why is not None else None
    state = "exited" if proc is not None and not procs.alive(proc) else f"did not become ready in {timeout:.0f}s"
    raise ServiceError(f"{name} {state}{': ' + reason if reason else ''} (log: {log}{': ' + tail[0] if tail else ''})")


def stop_process(name: str, timeout: float = 30.0) -> bool:
    """Stop the recorded service and its group (SIGTERM, SIGKILL after `timeout`); whether it ran."""
    return procs.stop(record_path(name), timeout)


def bin_path(name: str) -> str:
    here = Path(sys.executable).parent / name  # the venv's console scripts, first
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if not found:
        raise ServiceError(f"'{name}' not found: install ditforge into this environment (make install)")
    return found


def base_env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DITFORGE_HOME"] = str(storage.home())
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        env.pop(k, None)  # services get exactly the embedded keys below, not whatever the shell had
    return env


# ------------------------------------------------------------------------------------- S3


def s3_credentials() -> dict:
    """The embedded server's keys, generated on first start into a file only the user can read."""
    d = dirs()
    path = d["s3"] / "credentials.json"
    if not path.exists():
        creds = {
            "access_key_id": "DF" + secrets.token_hex(9).upper(),
            "secret_access_key": secrets.token_urlsafe(30),
            "endpoint_url": f"http://127.0.0.1:{S3_PORT}",
        }
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(creds, f)
    return json.loads(path.read_text())


def s3_check() -> str | None:
    """None when the S3 server works (a probe object put, read back and deleted), else why not.
    Its port answering proves little: a SeaweedFS that lost its unix sockets answers every PUT
    with 500 InternalError while its port still answers."""
    if not http_ok(f"http://127.0.0.1:{S3_PORT}/"):
        return (
            f"its port 127.0.0.1:{S3_PORT} accepts connections but an HTTP request got no answer"
            if port_open("127.0.0.1", S3_PORT)
            else f"nothing answers on 127.0.0.1:{S3_PORT}"
        )
    key = f"{BUCKET}/.health/{os.getpid()}-{secrets.token_hex(4)}"
    try:
        fs, _ = storage.filesystem(f"s3://{BUCKET}")
        fs.pipe_file(key, b"ok")
        if fs.cat_file(key) != b"ok":
            return "a probe object read back differs"
        fs.rm_file(key)
        return None
    except Exception as e:
        return (
            f"probe put/get/delete failed: {credentials.redact(str(e).splitlines()[0] if str(e) else type(e).__name__)}"
        )


def _s3_ready() -> bool:
    return s3_check() is None


def _say(line: str) -> None:
    """One line about a service we repaired (stderr: stdout carries the CLI's answers)."""
    print(line, file=sys.stderr, flush=True)


def start_s3(host: str = "127.0.0.1") -> str:
    url = f"http://127.0.0.1:{S3_PORT}"  # a 0.0.0.0 bind answers on loopback too
    creds = s3_credentials()
    why = s3_check()
    if why is None and running("s3") and (credentials.is_loopback(host) or running("s3-relay")):
        return url
    if why is None and _adopt("s3", f"-dir={storage.home() / 's3' / 'data'}"):
        return url
    if running("s3"):
        _say(f"s3: running but failing its check ({why}): restarting it")
    stop_process("s3-relay")
    stop_process("s3")  # waits until it has exited: its leveldb lock is free again
    d = dirs()
    env = base_env() | {
        "AWS_ACCESS_KEY_ID": creds["access_key_id"],
        "AWS_SECRET_ACCESS_KEY": creds["secret_access_key"],
    }
    data = d["s3"] / "data"
    data.mkdir(exist_ok=True)
    # `weed mini` binds all its ports (master, volume, filer, WebDAV, Iceberg, admin, ...: no
    # authentication on most) to one address: always loopback. Only S3 checks keys, so only S3 is
    # served beyond loopback, through the relay.
    relayed = not credentials.is_loopback(host)
    proc = spawn(
        "s3",
        [
            bin_path("weed"),
            "mini",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.port={S3_INNER_PORT if relayed else S3_PORT}",
            f"-bucket={BUCKET}",
            "-admin.ui=false",
        ],
        env,
    )
    if relayed:
        wait_ready("s3", lambda: http_ok(f"http://127.0.0.1:{S3_INNER_PORT}/"), 90, proc)
        relay = spawn("s3-relay", [sys.executable, "-m", "ditforge.relay", host, str(S3_PORT), str(S3_INNER_PORT)], env)
        wait_ready("s3-relay", _s3_ready, 30, relay)
    wait_ready("s3", _s3_ready, 90, proc)
    return url


# --------------------------------------------------------------------------------- MLflow


def _secret_file(path: Path) -> str:
    """A random secret generated once into a file only the user can read (stable across restarts)."""
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32))
    return path.read_text().strip()


def _mlflow_auth_config(d: dict, username: str) -> Path:
    """The basic-auth app's config: users in their own SQLite file, nobody may read or write
    without logging in. The admin password is not in it: it reaches the server as
    MLFLOW_AUTH_ADMIN_PASSWORD, only in its environment."""
    ini = d["mlflow"] / "basic_auth.ini"
    ini.write_text(
        "[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{d['mlflow'] / 'basic_auth.db'}\n"
        f"admin_username = {username}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    return ini


def mlflow_check(url: str, auth: dict | None = None) -> str | None:
    """None when MLflow's API answers (an experiment search, logged in as `auth` or with this
    process's MLflow credentials when it has auth), else why not."""
    import base64

    req = urllib.request.Request(f"{url}/api/2.0/mlflow/experiments/search?max_results=1")
    try:
        creds = (auth["username"], auth["password"]) if auth else credentials.mlflow_credentials()
    except ValueError:
        creds = None
    if creds:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode())
    if not http_ok(f"{url}/health"):
        return "its /health does not answer"
    try:
        # Generous: with basic auth every request verifies a password hash (slow on a busy machine).
        with urllib.request.urlopen(req, timeout=60) as r:
            json.loads(r.read())
        return None
    except urllib.error.HTTPError as e:
        return f"its API answered {e.code}"
    except (urllib.error.URLError, OSError, TimeoutError, ValueError) as e:
        return f"its API did not answer ({type(e).__name__})"


def start_mlflow(port: int, host: str = "127.0.0.1", auth: dict | None = None) -> str:
    """`auth`: {"username", "password"} turns on MLflow's basic-auth app (required beyond loopback)."""
    url = f"http://127.0.0.1:{port}"
    why = mlflow_check(url, auth)
    if why is None and running("mlflow"):
        return url
    if why is None and _adopt("mlflow", str(storage.home() / "mlflow" / "mlflow.db")):
        return url
    if why and why.startswith(("its API answered 401", "its API answered 403")):
        raise ServiceError(
            f"mlflow at {url}: {why} to this machine's credentials (MLFLOW_TRACKING_USERNAME / "
            f"MLFLOW_TRACKING_PASSWORD, or ${credentials.MLFLOW_CREDENTIALS_ENV})"
        )
    if running("mlflow"):
        _say(f"mlflow: running but failing its check ({why}): restarting it")
    stop_process("mlflow")
    if http_ok(f"{url}/health"):
        raise ServiceError(f"port {port} already serves an MLflow that is not ours: stop it or set ports.mlflow")
    d = dirs()
    creds = s3_credentials()
    env = base_env() | {
        "AWS_ACCESS_KEY_ID": creds["access_key_id"],
        "AWS_SECRET_ACCESS_KEY": creds["secret_access_key"],
        "MLFLOW_S3_ENDPOINT_URL": creds["endpoint_url"],
        # MLflow's job runner (GenAI scorers, trace roll-ups: nothing ditforge uses) is six huey
        # consumer processes, ~230 MB each, polling their queue: 1-8 % of a core per server here.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    argv = [
        bin_path("mlflow"),
        "server",
        "--host",
        host,
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{d['mlflow'] / 'mlflow.db'}",
        "--artifacts-destination",
        f"s3://{BUCKET}/mlflow",
        "--workers",
        "1",
    ]
    if auth:
        env |= {
            "MLFLOW_AUTH_CONFIG_PATH": str(_mlflow_auth_config(d, auth["username"])),
            "MLFLOW_FLASK_SERVER_SECRET_KEY": _secret_file(d["mlflow"] / "flask_secret_key"),  # CSRF
            "MLFLOW_AUTH_ADMIN_USERNAME": auth["username"],
            "MLFLOW_AUTH_ADMIN_PASSWORD": auth["password"],
        }
        argv += ["--app-name", "basic-auth"]
    proc = spawn("mlflow", argv, env)
    wait_ready("mlflow", lambda: mlflow_check(url, auth) is None, 120, proc, why=lambda: mlflow_check(url, auth))
    return url


# ------------------------------------------------------------------------------------ Ray


def ray_ready(dash: str) -> bool:
    return http_ok(f"{dash}/api/version")


def ray_check(dash: str, cpus: float | None = None) -> str | None:
    """None when the head answers and its node is registered with its resources (`cpus` CPUs, when
    given), else why not. The dashboard answers before the head's node has registered: a capacity
    check then saw a cluster of 0 CPU."""
    if not ray_ready(dash):
        return f"its dashboard does not answer at {dash}"
    from .cluster import capacity

    try:
        nodes = capacity.nodes_from_dashboard(dash)
    except Exception as e:
        return f"its state API failed ({credentials.redact(str(e).splitlines()[0] if str(e) else type(e).__name__)})"
    have = sum(n.get("CPU", 0) for n in nodes)
    if not nodes or (cpus is not None and have < cpus):
        return f"{len(nodes)} node(s) with {have:g} CPU registered" + (f", {cpus:g} expected" if cpus else "")
    return None


def start_ray(cluster: EmbeddedCluster, extra_args: tuple[str, ...] = ()) -> str:
    """`extra_args`: more `ray start` flags (a test uses them to give a second head its own ports
    and temp dir beside the session's one)."""
    ep = endpoints(cluster)
    why = ray_check(ep.ray_dashboard, cluster.cpus)
    if why is None:
        if not running("ray"):  # a head of ours whose record is gone or older than procs.py
            _adopt("ray", f"start --head --block --port={cluster.ports.ray_gcs}", cwd=storage.home())
        return ep.ray_dashboard
    if running("ray") and ray_ready(ep.ray_dashboard):
        # A head still starting registers its node within seconds; one that does not is broken.
        try:
            wait_ready(
                "ray",
                lambda: ray_check(ep.ray_dashboard, cluster.cpus) is None,
                30,
                why=lambda: ray_check(ep.ray_dashboard, cluster.cpus),
            )
            return ep.ray_dashboard
        except ServiceError:
            _say(f"ray: running but failing its check ({ray_check(ep.ray_dashboard, cluster.cpus)}): restarting it")
    stop_process("ray")
    # --block keeps `ray start` in the foreground as the parent of the head's processes, so
    # `down` stops exactly this head (a bare `ray stop` would kill every Ray on the machine).
    argv = [
        bin_path("ray"),
        "start",
        "--head",
        "--block",
        f"--port={cluster.ports.ray_gcs}",
        f"--node-ip-address={advertised(cluster.host)}",
        f"--dashboard-host={cluster.host}",
        f"--dashboard-port={cluster.ports.ray_dashboard}",
        f"--num-cpus={cluster.cpus}",
        "--num-gpus=0",
        "--disable-usage-stats",
        *extra_args,
    ]
    # Token auth even on loopback: Ray's GCS, raylet, object-manager, agent and worker gRPC servers
    # listen on every interface of a machine with a routable address whatever --node-ip-address
    # says (README "Several machines"), so the token is what keeps other machines out.
    credentials.use_ray_token(create=True)
    # the token: RAY_AUTH_TOKEN(_PATH) or ~/.ray/auth_token; how soon a lost node is declared dead
    env = raysite.node_env(base_env()) | cluster.health_check.ray_env()
    proc = spawn("ray", argv, env)
    wait_ready(
        "ray",
        lambda: ray_check(ep.ray_dashboard, cluster.cpus) is None,
        120,
        proc,
        why=lambda: ray_check(ep.ray_dashboard, cluster.cpus),
    )
    return ep.ray_dashboard


# ------------------------------------------------------------------------------ lifecycle


def _adopt(name: str, marker: str, cwd: Path | None = None) -> int | None:
    """A server of ours that lost its record (e.g. two `up`s raced): find it by its command line,
    which names this home's state folder (or by `cwd`, this home, where `spawn` starts them), and
    take it back under management."""
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            leader = p.pid == os.getpgid(p.pid)
            ours = cwd is None or (marker in cmd and Path(p.cwd()) == Path(cwd).resolve())
        except (psutil.Error, OSError):
            continue
        if marker in cmd and leader and ours:
            procs.write(record_path(name), p.pid)
            return p.pid
    return None


@contextmanager
def _lock() -> Iterator[None]:
    """Serialise `up`/`down` across processes: two CLIs starting the same server would fight."""
    import fcntl

    f = open(dirs()["run"] / "services.lock", "w")
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def up(cluster: EmbeddedCluster | None = None, *, ray: bool = True) -> Endpoints:
    cluster = cluster or EmbeddedCluster()
    auth = require_auth(cluster.host)  # before anything starts or is written
    with _lock():
        return _up(cluster, auth, ray=ray)


def _up(cluster: EmbeddedCluster, auth: dict, *, ray: bool = True) -> Endpoints:
    dirs()
    p = _saved_ports()
    was = p.get("host", "127.0.0.1") if p else cluster.host
    if was != cluster.host and any(running(n) for n in ("s3", "mlflow", "ray")):
        raise ServiceError(
            f"host {cluster.host}: the services run bound to {was}; stop them first (`ditforge services down`)"
        )
    _ports_file().write_text(json.dumps(cluster.ports.model_dump() | {"host": cluster.host}))
    credentials.ensure_ray_token()  # before use_client_auth, which hands it to this process's Ray clients
    use_client_auth(cluster.host)
    start_s3(cluster.host)
    start_mlflow(cluster.ports.mlflow, cluster.host, auth or None)
    if ray:
        start_ray(cluster)
    return endpoints(cluster)


def down() -> list[str]:
    with _lock():
        return _down()


def _down() -> list[str]:
    stopped = []
    for name in ("ray", "mlflow", "s3-relay", "s3"):
        if stop_process(name):
            stopped.append(name)
    return stopped


def running_ray() -> str | None:
    """The embedded Ray head's GCS address when it answers, else None: where a data command goes
    when a Ray of its own cannot start (data/parallel.py's `fallback`)."""
    ep = endpoints()
    return ep.ray_gcs if ray_check(ep.ray_dashboard) is None else None


def status() -> list[dict]:
    """Each service with the result of its real check (`up`), and why it fails (`check`)."""
    ep = endpoints()
    checks = {"s3": s3_check(), "mlflow": mlflow_check(ep.mlflow), "ray": ray_check(ep.ray_dashboard)}
    return [
        {"service": name, "url": url, "pid": running(name), "up": checks[name] is None, "check": checks[name]}
        for name, url in (("s3", ep.s3), ("mlflow", ep.mlflow), ("ray", ep.ray_dashboard))
    ]
