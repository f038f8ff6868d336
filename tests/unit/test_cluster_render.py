"""Cluster specs and what they render to: Ray cluster-launcher YAML (checked against the schema
shipped in the installed ray package) and KubeRay manifests (no secret values inline)."""

from __future__ import annotations

import json

import jsonschema
import pytest
import yaml

from ditforge import storage
from ditforge.cluster.render import RenderError, ray_schema, ray_up_config, render, validate_ray_up
from ditforge.spec import SpecError, build_cluster, load_cluster, load_job

from ..conftest import REPO, run_cli

CLUSTERS = REPO / "cluster"


def test_every_example_cluster_validates():
    r = run_cli("validate", *sorted(str(p) for p in CLUSTERS.glob("*.yaml")))
    assert r.returncode == 0, r.stderr
    kinds = {load_cluster(p).kind for p in CLUSTERS.glob("*.yaml")}
    assert kinds == {"embedded", "local", "address", "aws", "gcp", "kubernetes", "slurm"}


@pytest.mark.parametrize(
    "data, field",
    [
        ({"kind": "ec2"}, "kind"),
        ({"kind": "local", "nodez": 2}, "nodez"),
        (
            {
                "kind": "aws",
                "head": {"instance_type": "m6i.large"},
                "workers": [{"instance_type": "g6.xlarge", "min_workers": 3, "max_workers": 1}],
            },
            "workers.0.min_workers",
        ),
        (
            {
                "kind": "gcp",
                "project_id": "p",
                "head": {"instance_type": "n2-standard-4", "cpus": 4},
                "workers": [{"instance_type": "a2-highgpu-1g", "cpus": 12, "gpus": 1, "gpu_type": "A1000"}],
            },
            "workers.0.gpu_type",
        ),
        (
            {
                "kind": "kubernetes",
                "image": "x",
                "head": {"cpus": 1, "memory_gb": 2},
                "workers": [{"cpus": 1, "memory_gb": 2, "replicas": 9, "max_replicas": 4}],
            },
            "workers.0.replicas",
        ),
        ({"kind": "address", "address": "head:8265"}, "address"),
    ],
)
def test_bad_cluster_specs_name_the_field(data, field):
    with pytest.raises(SpecError) as e:
        build_cluster(data, "c.yaml")
    assert e.value.field == field, str(e.value)


def test_validate_prints_one_line_with_the_field_path(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: local\nnodes: 0\n")
    r = run_cli("validate", str(bad))
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: {bad}: nodes: input should be greater than or equal to 1"


@pytest.mark.parametrize("kind", ["aws", "gcp"])
def test_cloud_render_passes_the_ray_cluster_launcher_schema(kind, tmp_path):
    spec = load_cluster(CLUSTERS / f"{kind}.yaml")
    files, command = render(spec, tmp_path)
    assert command == f"ray up -y {files[0]}"
    config = yaml.safe_load(files[0].read_text())
    jsonschema.validate(config, ray_schema())  # the schema file inside site-packages/ray/autoscaler/
    validate_ray_up(config)  # and what `ray up` does before any cloud call: defaults merge + validate
    types = config["available_node_types"]
    assert config["head_node_type"] == "head" and types["head"]["max_workers"] == 0
    assert config["max_workers"] == sum(w.max_workers for w in spec.workers)
    for w in spec.workers:
        t = types[w.name]
        assert (t["min_workers"], t["max_workers"]) == (w.min_workers, w.max_workers)
        assert t["resources"]["GPU"] == w.gpus and t["resources"][f"accelerator_type:{w.gpu_type}"] == 1
    assert config["docker"]["image"] == spec.image and config["setup_commands"] == spec.setup_commands
    if kind == "aws":
        assert types["a100"]["node_config"]["InstanceType"] == "p4d.24xlarge"
        assert "InstanceMarketOptions" not in types["a100"]["node_config"]
        assert types["l4-spot"]["node_config"]["InstanceMarketOptions"] == {"MarketType": "spot"}
        assert types["a100"]["node_config"]["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"] == 1000
        assert types["a100"]["node_config"]["IamInstanceProfile"] == {"Name": "ditforge-s3-access"}
    else:
        node = types["a100"]["node_config"]
        assert node["guestAccelerators"] == [{"acceleratorType": "nvidia-tesla-a100", "acceleratorCount": 8}]
        assert node["scheduling"] == [{"onHostMaintenance": "TERMINATE", "preemptible": True}]
        assert node["disks"][0]["initializeParams"]["diskSizeGb"] == 1000
        assert config["provider"]["project_id"] == "my-gcp-project"


def test_schema_check_rejects_what_ray_up_would_reject():
    config = ray_up_config(load_cluster(CLUSTERS / "aws.yaml"))
    config["available_node_types"]["a100"]["gpu_count"] = 8  # not a node-type key Ray knows
    with pytest.raises(RenderError, match="available_node_types.a100"):
        validate_ray_up(config)
    config = ray_up_config(load_cluster(CLUSTERS / "aws.yaml"))
    config["available_node_types"]["a100"]["resources"]["GPU"] = 0.5  # resources are integers
    with pytest.raises(RenderError):
        validate_ray_up(config)


def test_kubernetes_manifests(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-SENTINEL-KEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sentinel-secret-value")
    spec = load_cluster(CLUSTERS / "kubernetes.yaml")
    files, command = render(spec, tmp_path, load_job(REPO / "jobs" / "demo-image.yaml"))
    assert command.startswith(f"kubectl apply -f {files[0]}")
    docs = [d for f in files for d in yaml.safe_load_all(f.read_text())]
    assert [(d["apiVersion"], d["kind"]) for d in docs] == [
        ("ray.io/v1", "RayCluster"),
        ("v1", "ConfigMap"),
        ("ray.io/v1", "RayJob"),
    ]
    cluster, configmap, job = docs
    assert cluster["metadata"] == {
        "name": "dit-k8s",
        "namespace": "ml",
        "labels": {"app.kubernetes.io/managed-by": "ditforge"},
    }
    for rc in (cluster["spec"], job["spec"]["rayClusterSpec"]):
        assert rc["rayVersion"] == "2.60.0" and rc["enableInTreeAutoscaling"] is True
        head = rc["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert head["image"] == spec.image
        assert head["resources"]["limits"] == {"cpu": "4", "memory": "16Gi"}
        (group,) = rc["workerGroupSpecs"]
        assert (group["groupName"], group["replicas"], group["minReplicas"], group["maxReplicas"]) == ("gpu", 2, 0, 4)
        pod = group["template"]["spec"]
        worker = pod["containers"][0]
        assert worker["resources"]["limits"] == {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "1"}
        assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
        assert {"name": "shared", "persistentVolumeClaim": {"claimName": "ditforge-shared"}} in pod["volumes"]
        for c in (head, worker):
            env = {e["name"]: e for e in c["env"]}
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                assert env[key] == {"name": key, "valueFrom": {"secretKeyRef": {"name": "ditforge-s3", "key": key}}}
            assert env["AWS_ENDPOINT_URL_S3"]["value"] == "http://minio.storage.svc:9000"
    # the job: its spec mounted from the ConfigMap, read by the driver
    assert job["spec"]["entrypoint"] == "python -m ditforge.runs.driver /etc/ditforge/job.yaml"
    mounted = yaml.safe_load(configmap["data"]["job.yaml"])
    assert mounted["name"] == "demo-image" and mounted["tracking"]["uri"] == "http://mlflow.ml.svc:5000"
    head_pod = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert {"name": "job", "configMap": {"name": configmap["metadata"]["name"]}} in head_pod["volumes"]
    # no secret values anywhere: no Secret objects, no key material from the environment or the embedded store
    text = "".join(f.read_text() for f in files)
    assert all(d["kind"] != "Secret" for d in docs)
    assert "sentinel-secret-value" not in text and "AKIA-SENTINEL-KEY" not in text

    if storage.credentials_file().exists():
        secret = json.loads(storage.credentials_file().read_text())["secret_access_key"]
        assert secret not in text


def test_cli_render_and_up_print_the_command(tmp_path):
    r = run_cli("cluster", "render", str(CLUSTERS / "gcp.yaml"), "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"ray up -y {tmp_path / 'dit-gcp.ray-gcp.yaml'}"
    r = run_cli("cluster", "up", str(CLUSTERS / "kubernetes.yaml"), "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"kubectl apply -f {tmp_path / 'dit-k8s.raycluster.yaml'}"
    r = run_cli("cluster", "render", str(CLUSTERS / "local.yaml"), "--out", str(tmp_path))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
