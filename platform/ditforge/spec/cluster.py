"""Cluster specs, one model per `kind`: embedded, local, address, aws, gcp, kubernetes, slurm
(`CLUSTER_KINDS`); `load.build_cluster` picks the model from the `kind` key."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from .errors import Strict, no_password


class ServicePorts(Strict):
    mlflow: int = Field(5005, gt=0, lt=65536)
    ray_dashboard: int = Field(8265, gt=0, lt=65536)
    ray_gcs: int = Field(6379, gt=0, lt=65536)


class HealthCheck(Strict):
    """How soon Ray declares a node dead (its raylet gone, or its machine cut off): after `failures`
    health checks in a row fail, one every `period_s`, each given `timeout_s`. Then Ray Train
    restarts the job's workers from the newest complete checkpoint, elsewhere (docs/reliability.md).
    Ray's own defaults are 3 s, 10 s and 5; shorter fails over sooner, and on a busy network may
    declare a slow node dead."""

    period_s: float = Field(3.0, gt=0, le=600)
    timeout_s: float = Field(10.0, gt=0, le=600)
    failures: int = Field(5, ge=1, le=100)

    def ray_env(self) -> dict[str, str]:
        """The head's environment for it (GCS system config)."""
        return {
            "RAY_health_check_period_ms": str(int(self.period_s * 1000)),
            "RAY_health_check_timeout_ms": str(int(self.timeout_s * 1000)),
            "RAY_health_check_failure_threshold": str(self.failures),
        }


class ClusterSpec(Strict):
    """Base of every cluster kind; `load_cluster` picks the subclass from `kind`."""

    kind: str
    name: str = Field(
        "ditforge",
        pattern=r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$",
        description="lower-case letters, digits and '-': it names cloud and Kubernetes objects",
    )


class EmbeddedCluster(ClusterSpec):
    # Ray, MLflow and the S3 server run on this machine, bound to 127.0.0.1 unless `host` says
    # otherwise; then each must run with authentication (see services.require_auth).
    kind: Literal["embedded"] = "embedded"
    cpus: int = Field(
        4,
        ge=0,
        description="logical CPUs the embedded Ray head offers (0: a head that only "
        "coordinates; its jobs' workers run on joined hosts)",
    )
    ports: ServicePorts = ServicePorts()
    health_check: HealthCheck = HealthCheck()
    host: str = Field(
        "127.0.0.1",
        description="address the services bind: 127.0.0.1 (default, this machine "
        "only) or 0.0.0.0 (every interface: needs credentials)",
    )

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        import ipaddress

        try:
            ip = ipaddress.ip_address(v)
        except ValueError:
            raise ValueError(f"'{v}' is not an IP address (127.0.0.1 or 0.0.0.0)") from None
        # Clients on this machine reach a wildcard bind through 127.0.0.1; a single other interface
        # would need every client (and the S3 endpoint in the key file) to name it.
        if not (ip.is_loopback or ip.is_unspecified):
            raise ValueError(f"{v}: bind 127.0.0.1 (this machine) or 0.0.0.0 (every interface, with authentication)")
        return v


class LocalPorts(Strict):
    # Away from the embedded head's 6379 / 8265 / 10001, so both can run on one machine.
    gcs: int = Field(6390, gt=0, lt=65536)
    dashboard: int = Field(8275, gt=0, lt=65536)
    client: int = Field(10011, gt=0, lt=65536)
    nodes_from: int = Field(21000, ge=1024, lt=60000, description="node i (0 = head) uses ports nodes_from+100*i … +99")


class LocalCluster(ClusterSpec):
    """A simulated multi-node cluster: one head and `nodes` worker raylets on 127.0.0.1."""

    kind: Literal["local"] = "local"
    name: str = Field("local", pattern=r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")
    nodes: int = Field(2, ge=1, le=8, description="worker raylets besides the head")
    cpus_per_node: int = Field(1, gt=0)
    head_cpus: int = Field(0, ge=0, description="0: the head runs only the job driver, never a training worker")
    object_store_mb: int = Field(256, ge=80, description="per raylet; Ray's default (30% of RAM each) is too much x N")
    ports: LocalPorts = LocalPorts()

    @model_validator(mode="after")
    def _ports(self) -> "LocalCluster":
        last = self.ports.nodes_from + 100 * (self.nodes + 1)
        if last >= 65536:
            raise ValueError(
                f"ports.nodes_from: {self.ports.nodes_from} leaves no room for {self.nodes + 1} nodes x 100 ports"
            )
        for name in ("gcs", "dashboard", "client"):
            if self.ports.nodes_from <= getattr(self.ports, name) < last:
                raise ValueError(
                    f"ports.{name}: {getattr(self.ports, name)} falls inside the node port range "
                    f"{self.ports.nodes_from}-{last - 1}"
                )
        return self


class AddressCluster(ClusterSpec):
    """An existing Ray cluster, reached through its Jobs API."""

    kind: Literal["address"] = "address"
    address: str | None = Field(None, description="dashboard http(s)://head:8265, or ray://head:10001")
    token_env: str | None = Field(None, description="environment variable holding a bearer token for the dashboard")
    tracking_uri: str | None = Field(None, description="MLflow server the cluster's workers can reach")

    _no_secret = field_validator("address", "tracking_uri")(no_password)

    @model_validator(mode="after")
    def _address(self) -> "AddressCluster":
        if not self.address:
            raise ValueError("address: required when kind is 'address' (e.g. http://head:8265)")
        if not self.address.startswith(("http://", "https://", "ray://")):
            raise ValueError(f"address: '{self.address}' must start with http://, https:// or ray://")
        return self


# Ray's accelerator type names (what `resources.accelerator_type` asks for) → GCP accelerator names.
GCP_ACCELERATORS = {
    "T4": "nvidia-tesla-t4",
    "L4": "nvidia-l4",
    "V100": "nvidia-tesla-v100",
    "P100": "nvidia-tesla-p100",
    "A100": "nvidia-tesla-a100",
    "A100-80G": "nvidia-a100-80gb",
    "H100": "nvidia-h100-80gb",
    "H200": "nvidia-h200-141gb",
}


class HeadGroup(Strict):
    instance_type: str = Field(description="AWS instance type or GCP machine type")
    cpus: int | None = Field(None, gt=0, description="CPUs Ray advertises (GCP needs it; AWS detects it)")
    gpus: int = Field(0, ge=0)
    gpu_type: str | None = Field(None, description="Ray accelerator type: A100, H100, L4, …")
    disk_gb: int = Field(200, ge=20)


class WorkerGroup(HeadGroup):
    name: str = Field("workers", pattern=r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")
    min_workers: int = Field(0, ge=0)
    max_workers: int = Field(2, ge=0)
    spot: bool = Field(False, description="AWS spot / GCP preemptible instances")

    @model_validator(mode="after")
    def _range(self) -> "WorkerGroup":
        if self.min_workers > self.max_workers:
            raise ValueError(f"min_workers: {self.min_workers} is larger than max_workers ({self.max_workers})")
        return self


class CloudCluster(ClusterSpec):
    """Head and worker node groups, rendered to a Ray cluster-launcher YAML for `ray up`."""

    region: str
    image: str = Field("rayproject/ray:2.60.0-py311-gpu", description="Docker image every node runs Ray in")
    setup_commands: list[str] = Field(default_factory=list, description="run on every node after the image starts")
    idle_timeout_minutes: int = Field(5, ge=1)
    ssh_user: str = "ubuntu"
    head: HeadGroup
    workers: list[WorkerGroup] = Field(min_length=1)

    @model_validator(mode="after")
    def _groups(self) -> "CloudCluster":
        names = [w.name for w in self.workers]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"workers: group name '{sorted(dup)[0]}' is used twice")
        return self


class AWSCluster(CloudCluster):
    kind: Literal["aws"] = "aws"
    region: str = "us-west-2"
    availability_zone: str | None = None
    ami: str | None = Field(None, description="AMI id; default: Ray's deep-learning AMI for the region")
    iam_instance_profile: str | None = Field(None, description="worker S3 access by IAM role, never by keys")


class GCPCluster(CloudCluster):
    kind: Literal["gcp"] = "gcp"
    region: str = "us-central1"
    availability_zone: str = "us-central1-a"
    project_id: str
    source_image: str = "projects/deeplearning-platform-release/global/images/family/common-cu124"
    service_account: str | None = Field(None, description="e-mail of the service account nodes run as (GCS access)")

    @model_validator(mode="after")
    def _gcp(self) -> "GCPCluster":
        groups = [("head", self.head)] + [(f"workers.{i}", w) for i, w in enumerate(self.workers)]
        for where, g in groups:
            if g.cpus is None:
                raise ValueError(f"{where}.cpus: required on GCP (Ray cannot detect a machine type's CPUs there)")
            if g.gpus and g.gpu_type not in GCP_ACCELERATORS:
                raise ValueError(f"{where}.gpu_type: {g.gpu_type!r} is not one of {', '.join(GCP_ACCELERATORS)}")
        return self


class KubeGroup(Strict):
    cpus: int = Field(gt=0)
    memory_gb: int = Field(gt=0)
    gpus: int = Field(0, ge=0)
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="e.g. {cloud.google.com/gke-accelerator: nvidia-l4}"
    )


class KubeWorkerGroup(KubeGroup):
    name: str = Field("workers", pattern=r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")
    replicas: int = Field(1, ge=0)
    min_replicas: int = Field(0, ge=0)
    max_replicas: int = Field(4, ge=0)

    @model_validator(mode="after")
    def _range(self) -> "KubeWorkerGroup":
        if not self.min_replicas <= self.replicas <= self.max_replicas:
            raise ValueError(
                f"replicas: {self.replicas} must lie in min_replicas..max_replicas "
                f"({self.min_replicas}..{self.max_replicas})"
            )
        return self


class KubeStorage(Strict):
    # Credentials are named, never given: the Secret is created out of band (kubectl create secret …).
    secret: str | None = Field(None, description="Secret holding AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    endpoint_url: str | None = Field(None, description="S3 endpoint (not a secret), e.g. http://minio.storage:9000")
    volume_claim: str | None = Field(None, description="a shared PersistentVolumeClaim mounted on every pod")
    mount_path: str = "/data"


class KubernetesCluster(ClusterSpec):
    """Rendered to KubeRay RayCluster / RayJob manifests for `kubectl apply`."""

    kind: Literal["kubernetes"] = "kubernetes"
    namespace: str = "default"
    image: str = Field(description="a Ray 2.60 image with ditforge installed (pip install .)")
    head: KubeGroup
    workers: list[KubeWorkerGroup] = Field(min_length=1)
    storage: KubeStorage = KubeStorage()
    tracking_uri: str | None = Field(None, description="MLflow server the pods can reach")

    _no_secret = field_validator("tracking_uri")(no_password)


# Slurm's time formats (sbatch --time): M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.
_SLURM_TIME = re.compile(r"^(\d+(:\d{1,2}){0,2}|\d+-\d{1,2}(:\d{1,2}){0,2})$")
_SLURM_NAME = re.compile(r"^[A-Za-z0-9_.,:=+-]+$")  # partition, account, QoS: no spaces, no shell


class SlurmCluster(ClusterSpec):
    """A Ray cluster inside one Slurm allocation: the batch script starts a Ray head on the first
    node and a Ray worker node on each other node (srun). `mode: standing` holds the allocation
    until `ditforge cluster down` (scancel); `mode: job` runs one job and ends with it."""

    kind: Literal["slurm"] = "slurm"
    mode: Literal["standing", "job"] = Field(
        "standing", description="standing: until `cluster down`; job: one allocation per `ditforge submit`"
    )
    partition: str | None = None
    nodes: int = Field(2, ge=1, le=4096)
    cpus_per_node: int = Field(8, gt=0, description="--cpus-per-task (one task per node); Ray's CPUs per node")
    gpus_per_node: int = Field(0, ge=0, description="--gres=gpu[:type]:N; Ray's GPUs per node")
    gpu_type: str | None = Field(None, description="GRES type name at your site (e.g. a100, h100)")
    mem_per_node_gb: int | None = Field(None, gt=0, description="--mem; default: the partition's")
    time_limit: str = Field("04:00:00", description="--time: M, M:S, H:M:S, D-H, D-H:M or D-H:M:S")
    account: str | None = None
    qos: str | None = None
    constraint: str | None = Field(None, description="--constraint (node features, e.g. 'a100&ib')")
    exclusive: bool = Field(False, description="--exclusive: whole nodes, no other job beside Ray")
    sbatch_args: list[str] = Field(default_factory=list, description="more sbatch options, e.g. --reservation=r1")
    setup: list[str] = Field(
        default_factory=list,
        description="shell lines run on the nodes before Ray starts (module load …, source venv/bin/activate)",
    )
    python: str = Field("python", description="the interpreter with ditforge installed, after `setup`")
    # Preemption and the time limit: Slurm sends SIGUSR1 this long before it ends the job; the
    # run saves a checkpoint (as on `ditforge stop`) and the allocation is requeued.
    signal_grace_s: int = Field(180, ge=10, le=65535, description="--signal=B:USR1@N")
    requeue: bool = Field(True, description="--requeue: a preempted / timed-out allocation resumes the run")
    ports_from: int = Field(26000, ge=1024, lt=65436, description="Ray uses ports P…P+99 on every node")
    object_store_mb: int | None = Field(None, ge=80, description="per node; default: Ray's (30% of memory)")
    tracking_uri: str | None = Field(None, description="MLflow server the nodes can reach")
    state_dir: str | None = Field(
        None,
        description="a folder on a file system the login and compute nodes share; default $DITFORGE_HOME/slurm/<name>",
    )
    up_timeout_s: float = Field(900, gt=0, description="how long `cluster up` waits for the allocation to start")

    _no_secret = field_validator("tracking_uri")(no_password)

    @field_validator("time_limit")
    @classmethod
    def _time(cls, v: str) -> str:
        if not _SLURM_TIME.match(v):
            raise ValueError(f"'{v}' is not a Slurm time (M, M:S, H:M:S, D-H, D-H:M or D-H:M:S, e.g. 04:00:00)")
        return v

    @field_validator("partition", "account", "qos", "gpu_type")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not _SLURM_NAME.match(v):
            raise ValueError(f"'{v}': letters, digits and _ . , : = + - only")
        return v

    @field_validator("sbatch_args")
    @classmethod
    def _args(cls, v: list[str]) -> list[str]:
        for a in v:
            if not a.startswith("--") or any(c in a for c in "\n\r"):
                raise ValueError(f"'{a}': one long sbatch option per item, e.g. --reservation=r1")
        return v

    @field_validator("setup")
    @classmethod
    def _setup(cls, v: list[str]) -> list[str]:
        if any("\n" in line for line in v):
            raise ValueError("one shell line per item")
        return v

    @model_validator(mode="after")
    def _gpus(self) -> "SlurmCluster":
        if self.gpu_type and not self.gpus_per_node:
            raise ValueError(f"gpu_type: {self.gpu_type} needs gpus_per_node of 1 or more")
        return self


CLUSTER_KINDS: dict[str, type[ClusterSpec]] = {
    "embedded": EmbeddedCluster,
    "local": LocalCluster,
    "address": AddressCluster,
    "aws": AWSCluster,
    "gcp": GCPCluster,
    "kubernetes": KubernetesCluster,
    "slurm": SlurmCluster,
}
