"""Job and cluster specs: typed pydantic models loaded from YAML.

Order of precedence (as in lingua): model defaults, then the YAML file, then `--set a.b=value`
overrides. Every validation problem becomes one `SpecError` line naming the file and the field
path, so the CLI can print it and exit 2 before anything starts.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

URI_SCHEMES = ("file", "s3", "gs")


class SpecError(Exception):
    """One user-facing line: `<file>: <field.path>: <reason>`."""

    def __init__(self, file: str, field: str, reason: str):
        self.file, self.field, self.reason = file, field, reason
        super().__init__(f"{file}: {field}: {reason}" if field else f"{file}: {reason}")


class Strict(BaseModel):
    # Unknown keys are errors: a typo like `zero_stag: 3` must not silently train with stage 2.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _check_uri(value: str) -> str:
    scheme = value.split("://", 1)[0] if "://" in value else None
    if scheme is None:
        raise ValueError(f"'{value}' is not a URI: write file://PATH, s3://BUCKET/PATH or gs://BUCKET/PATH")
    if scheme not in URI_SCHEMES:
        raise ValueError(f"unknown URI scheme '{scheme}://' (known: {', '.join(s + '://' for s in URI_SCHEMES)})")
    return value


def _no_password(value: str | None) -> str | None:
    """Specs are logged, saved with checkpoints and sent to MLflow: they must not hold secrets."""
    from .credentials import has_userinfo_password

    if value and has_userinfo_password(value):
        # the value itself is not repeated: it holds the secret
        raise ValueError("holds a password (scheme://user:PASSWORD@host): give credentials through the "
                         "environment or a named file (see README, Security defaults), never in a spec")
    return value


# ---------------------------------------------------------------------------------------- job


class DataSpec(Strict):
    train: str = Field(description="URI of the latent shards (a folder holding manifest.json)")
    batch_size: int = Field(32, gt=0, description="micro-batch per worker")
    shuffle_buffer: int = Field(0, ge=0, description="0: shuffle whole shards in memory")
    # Pixel size of the samples; model-info and the quality metric use them before any data is read.
    resolution: int = Field(32, gt=0, description="pixel height = width")
    frames: int = Field(1, gt=0, description="1 = images; > 1 = video clips of this many frames")
    # Bad data (a corrupt shard, a NaN latent...) is skipped and counted; past this fraction of a
    # rank's samples in one epoch the run stops instead (data/loader.py).
    max_bad_fraction: float = Field(0.01, ge=0, le=1, description="bad samples a rank may skip per epoch, as a fraction")
    storage_timeout_s: float = Field(300, gt=0, description="how long the loader retries a store that does not answer")

    _uri = field_validator("train")(_check_uri)


class VAESpec(Strict):
    # `identity` turns pixels into latents by pixel-unshuffle (space-to-depth): no weights, but the
    # same encode/decode seam that a real autoencoder plugs into. `own`: the project's KL
    # autoencoder (models/vae.py), trained by a `task: vae` job into `path`. `diffusers`: an
    # AutoencoderKL saved with save_pretrained in a local folder.
    kind: Literal["identity", "own", "diffusers"] = "identity"
    path: str | None = Field(None, description="own: URI of the trained weights; diffusers: local folder")
    downsample: int = Field(2, ge=1, le=16, description="spatial factor (identity, own)")
    temporal_downsample: Literal[1, 2, 4] = Field(1, description="own video autoencoder: frames per latent frame")
    latent_channels: int = Field(4, gt=0, description="own autoencoder")
    base_channels: int = Field(32, gt=0, description="own autoencoder width")
    kl_weight: float = Field(1e-6, ge=0, description="own autoencoder training: KL term weight")
    scale: float = Field(1.0, gt=0, description="latent = (z - shift) * scale; stored with the model")
    shift: float = 0.0

    @field_validator("path")
    @classmethod
    def _path_uri(cls, v: str | None) -> str | None:
        return _check_uri(v) if v and "://" in v else v  # a plain folder stays allowed (diffusers)

    @model_validator(mode="after")
    def _path(self) -> "VAESpec":
        if self.kind in ("own", "diffusers") and not self.path:
            raise ValueError(f"path: required for vae.kind '{self.kind}'")
        if self.kind == "own":
            try:
                _check_uri(self.path)
            except ValueError as e:
                raise ValueError(f"path: {e}") from None
        return self


class ModelSpec(Strict):
    size: Literal["T", "S", "B", "L", "XL"] = "T"
    patch: Literal[1, 2, 4, 8] = 2
    patch_t: Literal[1, 2, 4] = Field(1, description="temporal patch size for videos")
    num_classes: int = Field(10, ge=0, description="0 = unconditional")
    # `sdpa` is the skeleton's name for `auto`; see models/attention.py for what each kernel needs.
    attention: Literal["auto", "flash_attn", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "math", "sdpa"] = "auto"
    grad_checkpointing: bool = Field(False, description="activation checkpointing per block")
    # torch.compile per transformer block ("regional": one compile serves every block, in seconds
    # rather than the minutes a whole-model compile takes). auto = blocks on GPU, off on CPU, where
    # the compile time is longer than the short runs it would speed up.
    compile: Literal["auto", "off", "blocks", "full"] = Field("auto", description="torch.compile: off | blocks | full")
    video_attention: Literal["full", "factorised"] = Field("full", description="full 3D, or spatial then temporal")
    pos_embed: Literal["sincos", "rope"] = "sincos"
    text: Literal["none", "own", "transformers"] = Field(
        "none", description="caption conditioning: own = small trainable encoder; transformers = frozen local model")
    text_encoder: str | None = Field(None, description="text: transformers: local folder of the encoder")
    text_len: int = Field(64, gt=0, description="caption length in tokens")
    mixer_depth: int = Field(0, ge=0, description="unmasked patch-mixer blocks before the masked backbone")
    # Pretrained weights to start from (models/convert.py): a facebookresearch/DiT state dict
    # (`.pt`, opened with weights_only=True) or a diffusers DiTTransformer2DModel folder (the
    # `transformer/` of a DiTPipeline). Shapes are checked against this spec before training.
    init_from: str | None = Field(None, description="local .pt (facebookresearch/DiT) or diffusers transformer folder")

    @field_validator("init_from")
    @classmethod
    def _init_from(cls, v: str | None) -> str | None:
        if v and "://" in v and not v.startswith("file://"):
            raise ValueError(f"'{v}': a local file or folder (file://PATH or PATH); copy remote weights here first")
        return v

    @model_validator(mode="after")
    def _text(self) -> "ModelSpec":
        if self.text == "transformers" and not self.text_encoder:
            raise ValueError("text_encoder: required when model.text is 'transformers' (a local folder)")
        return self


class ObjectiveSpec(Strict):
    kind: Literal["rectified_flow", "ddpm"] = "rectified_flow"
    t_sampling: Literal["uniform", "logit_normal", "mode"] = Field("logit_normal", description="rectified flow")
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0)
    mode_scale: float = 1.29
    prediction: Literal["eps", "v"] = Field("eps", description="ddpm")
    schedule: Literal["linear", "cosine"] = Field("linear", description="ddpm")
    timesteps: int = Field(1000, gt=1, description="ddpm")
    weighting: Literal["none", "min_snr"] = "none"
    snr_gamma: float = Field(5.0, gt=0)
    cfg_dropout: float = Field(0.1, ge=0, lt=1, description="probability of dropping the class label / caption")


class TrainSpec(Strict):
    steps: int = Field(300, gt=0)
    lr: float = Field(1e-3, gt=0)
    warmup: int = Field(20, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0, description="0 = off")
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # auto: continue this job's newest unfinished run if there is one; never: always a fresh run;
    # or a checkpoint URI (a run folder or one step_XXXXXXXX folder) to start a new run from.
    resume: str = "auto"
    max_failures: int = Field(0, ge=0, description="worker-group restarts (Ray Train FailureConfig)")
    ema_decay: float = Field(0.999, ge=0, lt=1, description="0 = no EMA")
    mask_ratio: float = Field(0.0, ge=0, lt=1, description="fraction of patch tokens dropped (MicroDiT)")
    unmask_last: float = Field(0.1, ge=0, le=1, description="final fraction of steps trained unmasked")
    # A NaN/Inf loss skips its step (weights, optimizer and EMA unchanged); this many in a row stop
    # the run with a checkpoint of the last good weights (train/nonfinite.py).
    max_nonfinite_steps: int = Field(10, ge=1, description="consecutive non-finite losses before the run stops")
    debug_nan_steps: list[int] = Field(default_factory=list, description="testing aid: the loss is NaN at these steps")

    @field_validator("resume")
    @classmethod
    def _resume(cls, v: str) -> str:
        return v if v in ("auto", "never") else _check_uri(v)


class DeepSpeedSpec(BaseModel):
    # Any further DeepSpeed config key passes through untouched (e.g. `zero_optimization` tuning).
    model_config = ConfigDict(extra="allow")
    zero_stage: Literal[0, 1, 2, 3] = 2
    # Gradient reduce / parameter all-gather bucket size. Bigger buckets mean fewer, larger
    # collectives (better bandwidth), smaller ones more overlap with the backward pass.
    bucket_mb: float = Field(200.0, gt=0, description="ZeRO reduce / all-gather bucket size in MB")
    # Off by default: DeepSpeed's overlap path synchronises the whole device before each bucket
    # (measured: ~4 device syncs per step at DiT-XL/2), which stops the CPU queueing kernels ahead.
    overlap_comm: bool = Field(False, description="overlap gradient reduction with backward (DeepSpeed overlap_comm)")

    @model_validator(mode="after")
    def _typos(self) -> "DeepSpeedSpec":
        # Pass-through keys are not checked, but one that is nearly `zero_stage` is a typo that
        # would silently train with the default stage.
        for key in self.model_extra or {}:
            if difflib.get_close_matches(key, ["zero_stage"], n=1, cutoff=0.75):
                raise ValueError(f"{key}: unknown key (did you mean 'zero_stage'?)")
        return self


class ResourcesSpec(Strict):
    workers: int = Field(2, gt=0)
    use_gpu: bool = False
    cpus_per_worker: int = Field(1, gt=0)
    # Ray Train ScalingConfig: one placement-group bundle per worker.
    gpus_per_worker: int = Field(1, ge=1, description="used when use_gpu is true")
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="PACK fills a node before the next; SPREAD puts workers on different nodes")
    accelerator_type: str | None = Field(None, description="Ray accelerator type, e.g. A100, H100, L4")

    @model_validator(mode="after")
    def _gpu(self) -> "ResourcesSpec":
        if self.accelerator_type and not self.use_gpu:
            raise ValueError(f"accelerator_type: {self.accelerator_type} needs use_gpu: true")
        return self

    def per_worker(self) -> dict[str, float]:
        """One worker's Ray resources (the bundle Ray Train reserves for it)."""
        res: dict[str, float] = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            res["GPU"] = self.gpus_per_worker
        if self.accelerator_type:
            res[f"accelerator_type:{self.accelerator_type}"] = 0.001  # how Ray Train asks for a type
        return res


class CheckpointSpec(Strict):
    uri: str = "s3://ditforge/runs"
    every_steps: int = Field(100, gt=0)
    keep_last: int = Field(3, ge=1)
    keep_every: int = Field(0, ge=0, description="also keep every checkpoint whose step is a multiple (0 = off)")
    upload_timeout_s: float = Field(600, gt=0, description="a save not complete by then is marked failed")
    on_stop: bool = Field(False, description="`ditforge stop` lets the job save a final checkpoint before it ends")

    _uri = field_validator("uri")(_check_uri)


class TrackingSpec(Strict):
    experiment: str = "ditforge"
    uri: str | None = Field(None, description="MLflow tracking URI; default: the embedded server")
    log_every: int = Field(10, gt=0)
    sample_every: int = Field(0, ge=0, description="sample grid every N steps (0 = only at the end)")
    system_metrics: bool = True
    register_model: bool = True

    _uri = field_validator("uri")(_no_password)


class SampleSpec(Strict):
    per_class: int = Field(8, gt=0, description="grid columns; one row per class")
    sampler: Literal["auto", "euler", "heun", "ddim", "ddpm"] = Field("auto", description="auto: euler / ddim")
    steps: int = Field(25, gt=0, description="sampler steps")
    cfg_scale: float = Field(2.0, ge=0)
    seed: int = 0


class EvalSpec(Strict):
    # Generated-set quality: a classifier the project trains on the generated shapes / moving-shapes
    # sets scores class-conditional samples (accuracy, Fréchet distance in its feature space).
    quality: bool = Field(True, description="at the end of the run, when the data is a generated set")
    every_steps: int = Field(0, ge=0, description="also every N steps; 0 = end only")
    per_class: int = Field(16, gt=0, description="samples per class")
    steps: int = Field(10, gt=0, description="sampler steps")


class JobSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    task: Literal["dit", "vae"] = Field("dit", description="vae: train the own autoencoder into vae.path")
    data: DataSpec
    vae: VAESpec = VAESpec()
    model: ModelSpec = ModelSpec()
    objective: ObjectiveSpec = ObjectiveSpec()
    train: TrainSpec = TrainSpec()
    deepspeed: DeepSpeedSpec = DeepSpeedSpec()
    resources: ResourcesSpec = ResourcesSpec()
    checkpoint: CheckpointSpec = CheckpointSpec()
    tracking: TrackingSpec = TrackingSpec()
    sample: SampleSpec = SampleSpec()
    eval: EvalSpec = EvalSpec()

    @model_validator(mode="after")
    def _consistent(self) -> "JobSpec":
        gpu_only = ("flash_attn", "sdpa_cudnn", "sdpa_efficient")
        if self.model.attention in gpu_only and not self.resources.use_gpu:
            raise ValueError(f"model.attention: {self.model.attention} needs resources.use_gpu: true "
                             "(on CPU use auto, sdpa_flash or math)")
        sampler_ok = {"rectified_flow": ("auto", "euler", "heun"), "ddpm": ("auto", "ddim", "ddpm")}
        if self.sample.sampler not in sampler_ok[self.objective.kind]:
            raise ValueError(f"sample.sampler: {self.sample.sampler} does not fit objective.kind "
                             f"{self.objective.kind} (use {' or '.join(sampler_ok[self.objective.kind][1:])})")
        if self.task == "vae" and self.vae.kind != "own":
            raise ValueError("vae.kind: task 'vae' trains the own autoencoder: set vae.kind: own and vae.path")
        if self.train.precision == "bf16" and not self.resources.use_gpu:
            raise ValueError("train.precision: bf16 needs resources.use_gpu: true (CPU trains in fp32)")
        bad = [s for s in self.train.debug_nan_steps if not 1 <= s <= self.train.steps]
        if bad:
            raise ValueError(f"train.debug_nan_steps: step {bad[0]} is outside 1..train.steps ({self.train.steps})")
        if self.train.warmup >= self.train.steps and self.train.warmup > 0:
            raise ValueError(f"train.warmup: {self.train.warmup} must be smaller than train.steps ({self.train.steps})")
        return self

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:12]


def spec_warnings(spec: JobSpec) -> list[str]:
    """Allowed, but probably not what was meant: one `field.path: reason` line each (printed as
    `warning:`; the exit code stays 0)."""
    out = []
    if spec.deepspeed.zero_stage == 3 and spec.model.size in ("T", "S"):
        out.append(f"deepspeed.zero_stage: 3 with model.size {spec.model.size}: too small to shard sensibly "
                   "(gathering the weights every step costs more than the memory it saves); stage 2 fits it")
    return out


# ------------------------------------------------------------------------------------ cluster


class ServicePorts(Strict):
    mlflow: int = Field(5005, gt=0, lt=65536)
    ray_dashboard: int = Field(8265, gt=0, lt=65536)
    ray_gcs: int = Field(6379, gt=0, lt=65536)


class ClusterSpec(Strict):
    """Base of every cluster kind; `load_cluster` picks the subclass from `kind`."""

    kind: str
    name: str = Field("ditforge", pattern=r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$",
                      description="lower-case letters, digits and '-': it names cloud and Kubernetes objects")


class EmbeddedCluster(ClusterSpec):
    # Ray, MLflow and the S3 server run on this machine, bound to 127.0.0.1 unless `host` says
    # otherwise; then each must run with authentication (see services.require_auth).
    kind: Literal["embedded"] = "embedded"
    cpus: int = Field(4, gt=0, description="logical CPUs the embedded Ray head offers")
    ports: ServicePorts = ServicePorts()
    host: str = Field("127.0.0.1", description="address the services bind: 127.0.0.1 (default, this machine "
                                               "only) or 0.0.0.0 (every interface: needs credentials)")

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
            raise ValueError(f"ports.nodes_from: {self.ports.nodes_from} leaves no room for {self.nodes + 1} nodes x 100 ports")
        for name in ("gcs", "dashboard", "client"):
            if self.ports.nodes_from <= getattr(self.ports, name) < last:
                raise ValueError(f"ports.{name}: {getattr(self.ports, name)} falls inside the node port range "
                                 f"{self.ports.nodes_from}-{last - 1}")
        return self


class AddressCluster(ClusterSpec):
    """An existing Ray cluster, reached through its Jobs API."""

    kind: Literal["address"] = "address"
    address: str | None = Field(None, description="dashboard http(s)://head:8265, or ray://head:10001")
    token_env: str | None = Field(None, description="environment variable holding a bearer token for the dashboard")
    tracking_uri: str | None = Field(None, description="MLflow server the cluster's workers can reach")

    _no_secret = field_validator("address", "tracking_uri")(_no_password)

    @model_validator(mode="after")
    def _address(self) -> "AddressCluster":
        if not self.address:
            raise ValueError("address: required when kind is 'address' (e.g. http://head:8265)")
        if not self.address.startswith(("http://", "https://", "ray://")):
            raise ValueError(f"address: '{self.address}' must start with http://, https:// or ray://")
        return self


# Ray's accelerator type names (what `resources.accelerator_type` asks for) → GCP accelerator names.
GCP_ACCELERATORS = {"T4": "nvidia-tesla-t4", "L4": "nvidia-l4", "V100": "nvidia-tesla-v100", "P100": "nvidia-tesla-p100",
                    "A100": "nvidia-tesla-a100", "A100-80G": "nvidia-a100-80gb", "H100": "nvidia-h100-80gb",
                    "H200": "nvidia-h200-141gb"}


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
    node_selector: dict[str, str] = Field(default_factory=dict, description="e.g. {cloud.google.com/gke-accelerator: nvidia-l4}")


class KubeWorkerGroup(KubeGroup):
    name: str = Field("workers", pattern=r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")
    replicas: int = Field(1, ge=0)
    min_replicas: int = Field(0, ge=0)
    max_replicas: int = Field(4, ge=0)

    @model_validator(mode="after")
    def _range(self) -> "KubeWorkerGroup":
        if not self.min_replicas <= self.replicas <= self.max_replicas:
            raise ValueError(f"replicas: {self.replicas} must lie in min_replicas..max_replicas "
                             f"({self.min_replicas}..{self.max_replicas})")
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

    _no_secret = field_validator("tracking_uri")(_no_password)


CLUSTER_KINDS: dict[str, type[ClusterSpec]] = {
    "embedded": EmbeddedCluster, "local": LocalCluster, "address": AddressCluster,
    "aws": AWSCluster, "gcp": GCPCluster, "kubernetes": KubernetesCluster,
}


# ------------------------------------------------------------------------------------ loading


def _reword(err: dict, data: Any, model: type[BaseModel]) -> tuple[str, str]:
    loc = [str(p) for p in err["loc"]]
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        known = _known_fields(model, err["loc"][:-1])
        close = difflib.get_close_matches(loc[-1], known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else (f" (known: {', '.join(known)})" if known else "")
        return ".".join(loc), f"unknown key{hint}"
    if kind == "missing":
        return ".".join(loc), "required field is missing"
    if kind == "value_error":
        msg = msg.removeprefix("Value error, ")
        # model-level validators name their own field as "field.path: reason"
        if ": " in msg and re.fullmatch(r"[A-Za-z_][\w.]*", msg.split(": ", 1)[0]):
            field, reason = msg.split(": ", 1)
            return ".".join([*loc, field]), reason
    if kind == "literal_error":
        got = err.get("input")
        return ".".join(loc), f"{got!r} is not allowed; {msg[0].lower()}{msg[1:]}"
    got = err.get("input")
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return ".".join(loc), f"{msg[0].lower()}{msg[1:]} (got {got!r})"
    return ".".join(loc), f"{msg[0].lower()}{msg[1:]}"


def _known_fields(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc:
        if isinstance(part, int):  # an item of a list of models: its fields are the model's
            continue
        field = model.model_fields.get(str(part))
        ann = field.annotation if field else None
        if typing.get_origin(ann) is list:
            ann = typing.get_args(ann)[0]
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return sorted(model.model_fields)


def parse_set(items: list[str] | None, where: str = "--set") -> dict:
    """`["train.steps=50", "model.size=S"]` → nested dict; values are parsed as YAML scalars."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise SpecError(where, item, "expected key.path=value")
        key, raw = item.split("=", 1)
        if not key or any(not p for p in key.split(".")):
            raise SpecError(where, key or item, "expected key.path=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise SpecError(where, key, "conflicts with another --set")
        node[parts[-1]] = value
    return out


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice in one mapping is an error: PyYAML would keep the
    last one silently, so half of a duplicated `train:` section would vanish."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key '{key}' is given twice in one mapping",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    name = str(path)
    if not p.exists():
        raise SpecError(name, "", "no such file")
    if p.is_dir():
        raise SpecError(name, "", "is a directory, not a YAML file")
    if not p.is_file():  # a FIFO or device would block or stream forever
        raise SpecError(name, "", "cannot read: not a regular file")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(name, "", f"cannot read: {e.__class__.__name__}: {' '.join(str(e).split())}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "YAML"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError(name, where, f"YAML syntax error: {problem}") from None
    if data is None:
        raise SpecError(name, "", "file is empty")
    if not isinstance(data, dict):
        raise SpecError(name, "", f"top level must be a mapping of keys, got {type(data).__name__}")
    return data


def build(model: type[BaseModel], data: dict, name: str) -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        field, reason = _reword(e.errors()[0], data, model)
        raise SpecError(name, field, reason) from None


# ------------------------------------------------------------------------------ path roots

ROOTS_ENV = "DITFORGE_ROOTS"
# Job-spec fields that may name a local file or folder (file://PATH, or a bare path for the
# folders handed to diffusers / transformers).
LOCAL_PATH_FIELDS = ("data.train", "checkpoint.uri", "train.resume", "vae.path", "model.text_encoder", "model.init_from")


# Where the shipped GPU jobs expect pretrained weights (a read-only mount on cluster nodes).
MODELS_ROOT = "/models"


def allowed_roots() -> list[Path]:
    """Local folders a job spec may name: the working directory (the project), $DITFORGE_HOME,
    /models, and each folder in $DITFORGE_ROOTS (os.pathsep-separated). The list is the
    operator's, from the environment, never from the spec: a spec must not widen its own sandbox."""
    home = os.environ.get("DITFORGE_HOME") or Path.cwd() / ".ditforge"
    extra = [p for p in os.environ.get(ROOTS_ENV, "").split(os.pathsep) if p.strip()]
    return [Path(p).expanduser().resolve() for p in (Path.cwd(), home, MODELS_ROOT, *extra)]


def check_roots(spec: "JobSpec", name: str) -> None:
    """Every local path in the spec resolves (symlinks and `..` followed) inside an allowed root.

    Runs where specs enter the platform (load_job, a bare spec given to the driver), not on every
    model_validate: workers re-validate the resolved spec in another working directory."""
    roots = allowed_roots()
    for field in LOCAL_PATH_FIELDS:
        node: Any = spec
        for part in field.split("."):
            node = getattr(node, part)
        if not node or node in ("auto", "never") or ("://" in node and not node.startswith("file://")):
            continue
        resolved = Path(node.removeprefix("file://")).expanduser().resolve()
        if not any(resolved.is_relative_to(r) for r in roots):
            raise SpecError(name, field, f"'{node}' resolves to {resolved}, outside the allowed roots "
                                         f"({', '.join(map(str, roots))}); add a folder to ${ROOTS_ENV} to allow it")


def load_job(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    data = _merge(read_yaml(path), parse_set(overrides))
    spec = build(JobSpec, data, str(path))
    check_roots(spec, str(path))  # type: ignore[arg-type]
    return spec  # type: ignore[return-value]


def build_cluster(data: dict, name: str) -> ClusterSpec:
    """The `kind` key picks the model, so errors name fields of that kind only."""
    kind = data.get("kind", "embedded")
    if kind not in CLUSTER_KINDS:
        raise SpecError(name, "kind", f"{kind!r} is not allowed; expected one of {', '.join(CLUSTER_KINDS)}")
    return build(CLUSTER_KINDS[kind], data, name)  # type: ignore[return-value]


def load_cluster(path: str | Path | None, overrides: list[str] | None = None) -> ClusterSpec:
    if path is None:
        return build_cluster(parse_set(overrides), "--set")
    data = _merge(read_yaml(path), parse_set(overrides))
    return build_cluster(data, str(path))


def load_any(path: str | Path) -> BaseModel:
    """For `ditforge validate`: a file with a `kind` key and no `data` is a cluster spec."""
    data = read_yaml(path)
    if "kind" in data and "data" not in data:
        return build_cluster(data, str(path))
    spec = build(JobSpec, data, str(path))
    check_roots(spec, str(path))  # type: ignore[arg-type]
    return spec
