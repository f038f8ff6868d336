"""NOT YET RUN TO GREEN (so not collected: the name does not start with test_). Written for issue 14;
on the shared 2-core machine at load 100-400 the head's `services up` beyond loopback never came
up within the services' own timeouts (MLflow 120 s, S3 90 s), so none of these tests has passed
yet. Rename to tests/test_multihost.py once it passes on a quiet machine.

Several machines for real: three network-namespace hosts (tests/hosts.py) with their own
addresses and default routes. Host 0 serves the head (`services up --cluster shared.yaml`: the
embedded services beyond loopback, with authentication), host 1 and host 2 join it with
`ditforge cluster join`, a 2-worker ZeRO-2 job runs one worker per joined host, and a stranger
(host 2 before it joins, without the secrets) scans every TCP port of the head and gets nothing.

One head and one data set for the whole module (the test budget is minutes, not tens of them);
the tests run in file order and each leaves the cluster as the next one expects.
"""

from __future__ import annotations

import base64
import json
import sys
import time
import urllib.error
import urllib.request

import pytest

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "ditforge.cli"]
WEED_INTERNAL = {7333, 8181, 8888, 9101, 9333, 9340, 18333, 18888, 19333, 19340, 23646, 33646, 8334, 18334}

SCAN = """
import asyncio, sys
async def probe(port, sem, out):
    async with sem:
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection(sys.argv[1], port), 2.0)
            out.append(port); w.close()
        except Exception:
            pass
async def main():
    sem, out = asyncio.Semaphore(512), []
    await asyncio.gather(*(probe(p, sem, out) for p in range(1, 65536)))
    print(" ".join(map(str, sorted(out))))
asyncio.run(main())
"""

# What an intruder tries on an open port it knows nothing about: an HTTP request (the answer must
# be 401/403, or not HTTP at all), then a gRPC call to a method of each of Ray's services (the
# answer must never be OK).
PROBE = """
import json, sys, urllib.request, urllib.error, grpc
host, port = sys.argv[1], int(sys.argv[2])
res = {"port": port}
try:
    urllib.request.urlopen(f"http://{host}:{port}/", timeout=5)
    res["http"] = 200
except urllib.error.HTTPError as e:
    res["http"] = e.code
except Exception as e:
    res["http"] = type(e).__name__
codes = {}
for m in ["/ray.rpc.NodeInfoGcsService/GetAllNodeInfo", "/ray.rpc.NodeManagerService/GetNodeStats",
          "/ray.rpc.CoreWorkerService/GetCoreWorkerStats", "/ray.rpc.ObjectManagerService/Pull",
          "/ray.rpc.ReporterService/GetProfilingStats", "/ray.rpc.RuntimeEnvService/GetRuntimeEnvsInfo",
          "/ray.rpc.JobInfoGcsService/GetAllJobInfo"]:
    with grpc.insecure_channel(f"{host}:{port}") as ch:
        try:
            ch.unary_unary(m, request_serializer=lambda b: b, response_deserializer=lambda b: b)(b"", timeout=5)
            codes[m] = "OK"
        except grpc.RpcError as e:
            codes[m] = e.code().name
res["grpc"] = codes
print(json.dumps(res))
"""

TASK = """
import sys, ray
ray.init(address=sys.argv[1])
print("RAN", ray.get(ray.remote(lambda: 6 * 7).remote()))
"""


def _cli(hosts, i, *args, env=None, timeout=600, secrets=True):
    return hosts.run(i, [*CLI, *args], env=env, timeout=timeout, secrets=secrets)


@pytest.fixture(scope="module")
def head(hosts):
    """Host 0 serving the embedded services beyond loopback; the S3 keys other hosts need."""
    shared = hosts.dir(0) / "shared.yaml"
    # cpus: 0 — the head only coordinates: both workers must land on joined hosts.
    shared.write_text("kind: embedded\nname: shared\nhost: 0.0.0.0\ncpus: 0\n")
    t0 = time.time()
    r = _cli(hosts, 0, "services", "up", "--cluster", str(shared), timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    up_s = time.time() - t0
    creds = json.loads((hosts.dir(0, "ditforge") / "s3" / "credentials.json").read_text())
    addr = hosts.addr(0)
    s3_env = {
        "AWS_ACCESS_KEY_ID": creds["access_key_id"],
        "AWS_SECRET_ACCESS_KEY": creds["secret_access_key"],
        "AWS_ENDPOINT_URL_S3": f"http://{addr}:8333",
    }
    yield {"addr": addr, "shared": shared, "s3_env": s3_env, "up_s": up_s, "stdout": r.stdout}
    _cli(hosts, 0, "services", "down", timeout=300)


def test_services_up_beyond_loopback_advertises_the_head_address(hosts, head):
    assert f"http://{head['addr']}:5005" in head["stdout"] and f"{head['addr']}:6379" in head["stdout"]
    print(f"services up on the head: {head['up_s']:.0f}s")


def test_a_stranger_gets_nothing_from_the_head(hosts, head):
    addr = head["addr"]
    t0 = time.time()
    r = hosts.run(2, [sys.executable, "-c", SCAN, addr], secrets=False, timeout=300)
    open_ports = sorted(int(p) for p in r.stdout.split())
    print(f"open TCP ports on the head's address, seen from another host ({time.time() - t0:.0f}s): {open_ports}")
    assert open_ports, r.stderr
    # SeaweedFS's own ports (master, volume, filer, WebDAV, Iceberg, Lance, admin, gRPC) stay on
    # loopback: most have no authentication at all.
    assert not WEED_INTERNAL & set(open_ports), open_ports

    # S3: anonymous and wrong keys are refused
    for headers in (
        {},
        {
            "Authorization": "AWS4-HMAC-SHA256 Credential=DFWRONG/20260101/us-east-1/s3/aws4_request, "
            "SignedHeaders=host, Signature=" + "0" * 64
        },
    ):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(f"http://{addr}:8333/ditforge", headers=headers), timeout=30)
        assert e.value.code == 403
    # MLflow: no credentials and wrong ones get 401
    search = f"http://{addr}:5005/api/2.0/mlflow/experiments/search?max_results=1"
    for headers in ({}, {"Authorization": "Basic " + base64.b64encode(b"ditforge:wrong").decode()}):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(search, headers=headers), timeout=60)
        assert e.value.code == 401
    # Jobs API: no list, no submit, without the token or with a wrong one
    wrong = {"Authorization": "Bearer " + "0" * 64}
    for method, body in (("GET", None), ("POST", json.dumps({"entrypoint": "touch /tmp/pwned"}).encode())):
        for headers in ({}, wrong):
            req = urllib.request.Request(
                f"http://{addr}:8265/api/jobs/",
                data=body,
                method=method,
                headers=headers | {"Content-Type": "application/json"},
            )
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(req, timeout=30)
            assert e.value.code in (401, 403), (method, headers, e.value.code)
    # A driver (GCS) and a Ray Client (ray://) cannot run a task, without a token or with a wrong one
    for env in ({}, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}):
        for address in (f"{addr}:6379", f"ray://{addr}:10001"):
            try:
                r = hosts.run(2, [sys.executable, "-c", TASK, address], env=env, secrets=False, timeout=90)
                assert r.returncode != 0 and "RAN" not in r.stdout, (address, env, r.stdout)
            except Exception as e:  # still trying after 90 s: it ran nothing either
                assert "TimeoutExpired" in type(e).__name__, e
    # Joining as a node: one line, exit 2, within 30 s, without the token or with a wrong one
    for env, why in (
        ({}, "wants a token and this machine has none"),
        ({"RAY_AUTH_TOKEN": "0" * 64}, "refused this machine's token"),
    ):
        t = time.time()
        r = _cli(hosts, 2, "cluster", "join", addr, env=env, secrets=False, timeout=60)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and why in r.stderr, r.stdout + r.stderr
        assert time.time() - t < 30
    # Every other open port refuses a stranger: HTTP 401/403 or no HTTP at all, and no gRPC call OK
    known = {8333, 5005, 8265}
    for port in sorted(set(open_ports) - known):
        r = hosts.run(2, [sys.executable, "-c", PROBE, addr, str(port)], secrets=False, timeout=120)
        res = json.loads(r.stdout)
        print(f"port {port}: {res}")
        assert res["http"] in (401, 403) or isinstance(res["http"], str), res
        assert "OK" not in res["grpc"].values(), res


def test_join_with_no_head_there_is_one_line_exit_2(hosts, head):
    t = time.time()
    r = _cli(hosts, 1, "cluster", "join", f"{hosts.subnet}.99", timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no Ray head answers" in r.stderr, r.stderr
    assert time.time() - t < 30


def test_health_check_restarts_an_s3_that_answers_but_fails_writes(hosts, head):
    """SeaweedFS that lost its unix sockets answers on its port but fails every PUT: `status` says
    so, `up` restarts it in one line and returns only when the probe passes."""
    socks = list(hosts.dir(0, "tmp").glob("seaweedfs-*.sock"))
    assert socks
    for s in socks:
        s.unlink()
    r = _cli(hosts, 0, "services", "status", env={"COLUMNS": "250"})
    row = next(ln for ln in r.stdout.splitlines() if "s3" in ln and "8333" in ln)
    assert " no " in row and "probe put/get/delete failed" in row, r.stdout
    r = _cli(hosts, 0, "services", "up", "--cluster", str(head["shared"]), timeout=600)
    assert r.returncode == 0, r.stderr
    restarted = [ln for ln in r.stderr.splitlines() if ln.startswith("s3: running but failing its check")]
    assert len(restarted) == 1 and restarted[0].endswith("restarting it"), r.stderr
    r = _cli(hosts, 0, "services", "status", env={"COLUMNS": "250"})
    assert r.stdout.count(" yes ") == 3 and "passed" in r.stdout, r.stdout


def test_hosts_join_and_status_lists_them(hosts, head):
    for i in (1, 2):
        t = time.time()
        r = _cli(hosts, i, "cluster", "join", head["addr"], "--num-cpus", "1", env=head["s3_env"], timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        print(f"host {i} joined in {time.time() - t:.0f}s")
    deadline = time.time() + 60
    while True:
        r = _cli(hosts, 0, "cluster", "status", env={"COLUMNS": "250"})
        rows = [ln for ln in r.stdout.splitlines() if hosts.subnet in ln]
        if len(rows) == 3 or time.time() > deadline:
            break
        time.sleep(2)
    assert r.returncode == 0, r.stderr
    assert {hosts.addr(i) for i in range(3)} <= set(r.stdout.split()), r.stdout
    # from a joined host too
    r = _cli(hosts, 1, "cluster", "status", env={"COLUMNS": "250"})
    assert r.returncode == 0 and {hosts.addr(i) for i in range(3)} <= set(r.stdout.split()), r.stdout + r.stderr


DATA = """
from ditforge.data.ingest import ingest_shapes
from ditforge.data.encode import encode_dataset
from ditforge.models.vae import IdentityVAE
ingest_shapes("s3://ditforge/multihost/pixels", limit=128, resolution=32, shard_size=64, progress=False)
encode_dataset("s3://ditforge/multihost/pixels", "s3://ditforge/multihost/latents", IdentityVAE(2), progress=False)
print("DATA OK")
"""

RUN = """
import json, sys
from mlflow.tracking import MlflowClient
from ditforge.credentials import use_mlflow_credentials
use_mlflow_credentials()
rec = json.load(open(sys.argv[1]))
c = MlflowClient(rec["tracking_uri"])
run = c.get_run(rec["mlflow_run_id"])
print(json.dumps({"status": run.info.status, "tags": run.data.tags}))
"""


def test_training_across_hosts(hosts, head):
    """2 workers, ZeRO-2, STRICT_SPREAD: one worker per joined host, gloo over the hosts' network,
    shards and checkpoints on the head's S3 and metrics in its MLflow (basic auth), all over the
    network; SUCCEEDED with the model registered."""
    t0 = time.time()
    r = hosts.run(0, [sys.executable, "-c", DATA], timeout=900)
    assert "DATA OK" in r.stdout, r.stdout + r.stderr
    print(f"data on the head's S3: {time.time() - t0:.0f}s")
    job = str(__import__("pathlib").Path(__file__).resolve().parents[2] / "jobs" / "demo-image.yaml")
    t0 = time.time()
    r = _cli(
        hosts,
        0,
        "submit",
        job,
        "--cluster",
        str(head["shared"]),
        "--wait",
        "--set",
        "data.train=s3://ditforge/multihost/latents",
        "--set",
        "checkpoint.uri=s3://ditforge/multihost/runs",
        "--set",
        "train.steps=20",
        "--set",
        "train.warmup=2",
        "--set",
        "checkpoint.every_steps=10",
        "--set",
        "tracking.log_every=5",
        "--set",
        "tracking.experiment=multihost",
        "--set",
        "resources.placement=STRICT_SPREAD",
        "--set",
        "deepspeed.zero_stage=2",
        timeout=1200,
    )
    print(f"job across hosts: {time.time() - t0:.0f}s")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    job_id = r.stdout.strip().splitlines()[-1]
    rec_path = hosts.dir(0, "ditforge") / "jobs" / f"{job_id}.json"
    r = hosts.run(0, [sys.executable, "-c", RUN, str(rec_path)], timeout=120)
    run = json.loads(r.stdout.strip().splitlines()[-1])
    tags = run["tags"]
    assert run["status"] == "FINISHED" and tags.get("ditforge.model", "").startswith("models:/demo-image/"), run
    ips = {tags["ditforge.node_ip.rank0"], tags["ditforge.node_ip.rank1"]}
    assert ips == {hosts.addr(1), hosts.addr(2)}, tags
    assert tags["ditforge.node_id.rank0"] != tags["ditforge.node_id.rank1"]
    master = tags["ditforge.process_group"].split(":")[0]
    assert master in ips, tags  # gloo's rendezvous on a host's own address, not loopback
