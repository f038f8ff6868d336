"""ClusterSpec → the files Ray already runs: a cluster-launcher YAML (`ray up`) for AWS and GCP,
KubeRay RayCluster / RayJob manifests (`kubectl apply`) for Kubernetes.

ditforge manages no cloud machines itself: it writes these files, checks them against the schema
shipped inside the installed `ray` package, and prints the command that starts the cluster.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from ..spec import (
    GCP_ACCELERATORS,
    AWSCluster,
    CloudCluster,
    ClusterSpec,
    GCPCluster,
    HeadGroup,
    JobSpec,
    KubeGroup,
    KubernetesCluster,
    SlurmCluster,
)

RAY_VERSION = "2.60.0"


class RenderError(Exception):
    """The rendered file does not pass Ray's own checks (a bug here, or a value Ray rejects)."""


# ------------------------------------------------------------------------- ray cluster launcher


def _node_resources(group: HeadGroup) -> dict[str, int]:
    res: dict[str, int] = {}
    if group.cpus is not None:
        res["CPU"] = group.cpus
    if group.gpus:
        res["GPU"] = group.gpus
        if group.gpu_type:
            # Lets the autoscaler launch this group for a job asking `accelerator_type: A100`.
            res[f"accelerator_type:{group.gpu_type}"] = 1
    return res


def _aws_node(c: AWSCluster, group: HeadGroup) -> dict:
    node: dict[str, Any] = {
        "InstanceType": group.instance_type,
        "BlockDeviceMappings": [{"DeviceName": "/dev/sda1", "Ebs": {"VolumeSize": group.disk_gb, "VolumeType": "gp3"}}],
    }
    if c.ami:
        node["ImageId"] = c.ami
    if c.iam_instance_profile:
        node["IamInstanceProfile"] = {"Name": c.iam_instance_profile}
    if getattr(group, "spot", False):
        node["InstanceMarketOptions"] = {"MarketType": "spot"}
    return node


def _gcp_node(c: GCPCluster, group: HeadGroup) -> dict:
    node: dict = {
        "machineType": group.instance_type,
        "disks": [
            {
                "boot": True,
                "autoDelete": True,
                "type": "PERSISTENT",
                "initializeParams": {"diskSizeGb": group.disk_gb, "sourceImage": c.source_image},
            }
        ],
    }
    scheduling: dict = {}
    if group.gpus:
        assert group.gpu_type is not None  # GCPCluster's validator requires it with gpus
        node["guestAccelerators"] = [
            {"acceleratorType": GCP_ACCELERATORS[group.gpu_type], "acceleratorCount": group.gpus}
        ]
        node["metadata"] = {"items": [{"key": "install-nvidia-driver", "value": "True"}]}
        scheduling["onHostMaintenance"] = "TERMINATE"  # GPU VMs cannot live-migrate
    if getattr(group, "spot", False):
        scheduling["preemptible"] = True
    if scheduling:
        node["scheduling"] = [scheduling]  # the list form of Ray's own GCP examples
    if c.service_account:
        node["serviceAccounts"] = [
            {"email": c.service_account, "scopes": ["https://www.googleapis.com/auth/cloud-platform"]}
        ]
    return node


def ray_up_config(c: CloudCluster) -> dict:
    """The cluster-launcher config for `ray up`; defaults Ray fills in itself are left out."""
    if isinstance(c, AWSCluster):
        provider = {"type": "aws", "region": c.region, "cache_stopped_nodes": False}
        if c.availability_zone:
            provider["availability_zone"] = c.availability_zone
        node = lambda g: _aws_node(c, g)  # noqa: E731
    elif isinstance(c, GCPCluster):
        provider = {
            "type": "gcp",
            "region": c.region,
            "availability_zone": c.availability_zone,
            "project_id": c.project_id,
        }
        node = lambda g: _gcp_node(c, g)  # noqa: E731
    else:
        raise TypeError(f"no cluster-launcher config for kind {c.kind!r}")
    types = {
        "head": {"resources": _node_resources(c.head), "node_config": node(c.head), "min_workers": 0, "max_workers": 0}
    }
    for w in c.workers:
        types[w.name] = {
            "resources": _node_resources(w),
            "node_config": node(w),
            "min_workers": w.min_workers,
            "max_workers": w.max_workers,
        }
    return {
        "cluster_name": c.name,
        "max_workers": sum(w.max_workers for w in c.workers),
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": c.idle_timeout_minutes,
        "provider": provider,
        "auth": {"ssh_user": c.ssh_user},
        "docker": {
            "image": c.image,
            "container_name": "ray_container",
            "pull_before_run": True,
            "run_options": ["--ulimit nofile=65536:65536", "--shm-size=16g"],
        },
        "available_node_types": types,
        "head_node_type": "head",
        "file_mounts": {},
        "setup_commands": list(c.setup_commands),
    }


def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def validate_ray_up(config: dict) -> dict:
    """Check `config` the way `ray up` does before it calls any cloud API: the JSON schema shipped
    in the ray package, then Ray's defaults merge (prepare_config) and its validation once more.
    Returns the prepared config."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        jsonschema.validate(config, ray_schema())
        prepared = prepare_config(json.loads(json.dumps(config)))
        validate_config(prepared)
    except jsonschema.ValidationError as e:
        where = ".".join(str(p) for p in e.absolute_path) or "(top level)"
        raise RenderError(f"ray cluster-launcher schema: {where}: {e.message}") from None
    except (ValueError, RuntimeError, AssertionError) as e:
        raise RenderError(f"ray cluster-launcher config: {e}") from None
    return prepared


# ------------------------------------------------------------------------------------ kuberay


def _container_resources(g: KubeGroup, gpus: int) -> dict:
    amount = {"cpu": str(g.cpus), "memory": f"{g.memory_gb}Gi"}
    if gpus:
        amount["nvidia.com/gpu"] = str(gpus)
    return {"requests": dict(amount), "limits": dict(amount)}


def _env(c: KubernetesCluster) -> list[dict]:
    env: list[dict[str, Any]] = [{"name": "DITFORGE_HOME", "value": "/tmp/ditforge"}]
    s = c.storage
    if s.secret:
        # Credentials stay in the Secret: the manifest names it, the kubelet injects the values.
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            env.append({"name": key, "valueFrom": {"secretKeyRef": {"name": s.secret, "key": key}}})
    if s.endpoint_url:
        env.append({"name": "AWS_ENDPOINT_URL_S3", "value": s.endpoint_url})
    if s.volume_claim:  # file:// paths in a job spec may point into the shared volume (spec/paths.py, check_roots)
        env.append({"name": "DITFORGE_ROOTS", "value": s.mount_path})
    if c.tracking_uri:
        env.append({"name": "MLFLOW_TRACKING_URI", "value": c.tracking_uri})
    return env


def _pod(
    c: KubernetesCluster,
    g: KubeGroup,
    container: str,
    ports: list[dict] | None = None,
    extra_volumes: Sequence[tuple[dict, dict]] = (),
) -> dict:
    spec_c: dict = {"name": container, "image": c.image, "resources": _container_resources(g, g.gpus), "env": _env(c)}
    if ports:
        spec_c["ports"] = ports
    volumes: list[dict] = []
    mounts: list[dict] = []
    if c.storage.volume_claim:
        volumes.append({"name": "shared", "persistentVolumeClaim": {"claimName": c.storage.volume_claim}})
        mounts.append({"name": "shared", "mountPath": c.storage.mount_path})
    for vol, mount in extra_volumes:
        volumes.append(vol)
        mounts.append(mount)
    # /dev/shm sized for Ray's object store: the container default (64 MiB) is far too small.
    volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
    mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    spec_c["volumeMounts"] = mounts
    pod: dict = {"containers": [spec_c], "volumes": volumes}
    if g.node_selector:
        pod["nodeSelector"] = dict(g.node_selector)
    if g.gpus:
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"spec": pod}


def raycluster_spec(c: KubernetesCluster, extra_head_volumes: Sequence[tuple[dict, dict]] = ()) -> dict:
    head_ports = [
        {"containerPort": 6379, "name": "gcs"},
        {"containerPort": 8265, "name": "dashboard"},
        {"containerPort": 10001, "name": "client"},
    ]
    autoscale = any(w.min_replicas != w.max_replicas for w in c.workers)
    spec: dict = {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": autoscale,
        "headGroupSpec": {
            "rayStartParams": {"dashboard-host": "0.0.0.0"},
            "template": _pod(c, c.head, "ray-head", head_ports, extra_head_volumes),
        },
        "workerGroupSpecs": [
            {
                "groupName": w.name,
                "replicas": w.replicas,
                "minReplicas": w.min_replicas,
                "maxReplicas": w.max_replicas,
                "rayStartParams": {},
                "template": _pod(c, w, "ray-worker"),
            }
            for w in c.workers
        ],
    }
    return spec


def raycluster(c: KubernetesCluster) -> dict:
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": c.name, "namespace": c.namespace, "labels": {"app.kubernetes.io/managed-by": "ditforge"}},
        "spec": raycluster_spec(c),
    }


def rayjob(c: KubernetesCluster, job: JobSpec) -> list[dict]:
    """A ConfigMap with the job spec and a RayJob that runs it on a cluster of its own.

    The driver reads the spec from the mounted ConfigMap and opens its MLflow run itself (there is
    no `ditforge submit` on the client side of a RayJob); the image must contain ditforge."""
    cm_name = f"{c.name}-{job.name.lower().replace('_', '-').replace('.', '-')}"[:63].rstrip("-")
    spec = job.model_copy(deep=True)
    if c.tracking_uri and not spec.tracking.uri:
        spec.tracking.uri = c.tracking_uri
    configmap = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": cm_name, "namespace": c.namespace},
        "data": {"job.yaml": yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)},
    }
    vol = (
        {"name": "job", "configMap": {"name": cm_name}},
        {"name": "job", "mountPath": "/etc/ditforge", "readOnly": True},
    )
    job_manifest = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": cm_name, "namespace": c.namespace, "labels": {"app.kubernetes.io/managed-by": "ditforge"}},
        "spec": {
            "entrypoint": "python -m ditforge.runs.driver /etc/ditforge/job.yaml",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 600,
            "submissionMode": "K8sJobMode",
            "rayClusterSpec": raycluster_spec(c, [vol]),
        },
    }
    return [configmap, job_manifest]


# ------------------------------------------------------------------------------------- files


def render(c: ClusterSpec, out: str | Path, job: JobSpec | None = None) -> tuple[list[Path], str]:
    """Write the rendered files under `out`; return them and the command that starts the cluster."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    header = (
        f"# rendered by ditforge from ClusterSpec kind={c.kind} name={c.name}; edit the cluster YAML, not this file\n"
    )
    if isinstance(c, (AWSCluster, GCPCluster)):
        config = ray_up_config(c)
        validate_ray_up(config)
        path = out / f"{c.name}.ray-{c.kind}.yaml"
        path.write_text(header + yaml.safe_dump(config, sort_keys=False))
        return [path], f"ray up -y {path}"
    if isinstance(c, KubernetesCluster):
        files = [out / f"{c.name}.raycluster.yaml"]
        files[0].write_text(header + yaml.safe_dump(raycluster(c), sort_keys=False))
        cmd = f"kubectl apply -f {files[0]}"
        if job is not None:
            path = out / f"{c.name}.rayjob-{job.name}.yaml"
            path.write_text(header + yaml.safe_dump_all(rayjob(c, job), sort_keys=False))
            files.append(path)
            cmd += f"    # or, a cluster per job: kubectl apply -f {path}"
        return files, cmd
    if c.kind == "slurm":
        from . import slurm

        assert isinstance(c, SlurmCluster)  # the model of kind slurm
        return slurm.render(c, out, job)
    raise TypeError(f"kind {c.kind!r} is not rendered to files: it runs here (`ditforge cluster up`)")
