"""Job and cluster specs: typed pydantic models loaded from YAML.

Order of precedence (as in lingua): model defaults, then the YAML file, then `--set a.b=value`
overrides. Every validation problem becomes one `SpecError` line naming the file and the field
path, so the CLI can print it and exit 2 before anything starts.
"""

from __future__ import annotations

import difflib
import hashlib
import json
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


# ---------------------------------------------------------------------------------------- job


class DataSpec(Strict):
    train: str = Field(description="URI of the latent shards (a folder holding manifest.json)")
    batch_size: int = Field(32, gt=0, description="micro-batch per worker")
    shuffle_buffer: int = Field(0, ge=0, description="0: shuffle whole shards in memory")

    _uri = field_validator("train")(_check_uri)


class VAESpec(Strict):
    # `identity` turns pixels into latents by pixel-unshuffle (space-to-depth): no weights, but the
    # same encode/decode seam that a real autoencoder plugs into.
    kind: Literal["identity"] = "identity"
    downsample: int = Field(2, ge=1, le=8)
    scale: float = Field(1.0, gt=0, description="latent = (z - shift) * scale; stored with the model")
    shift: float = 0.0


class ModelSpec(Strict):
    size: Literal["T", "S", "B", "L", "XL"] = "T"
    patch: Literal[1, 2, 4, 8] = 2
    num_classes: int = Field(10, ge=0, description="0 = unconditional")
    attention: Literal["auto", "sdpa", "math"] = "auto"
    grad_checkpointing: bool = False


class ObjectiveSpec(Strict):
    kind: Literal["rectified_flow"] = "rectified_flow"
    t_sampling: Literal["uniform", "logit_normal"] = "logit_normal"
    cfg_dropout: float = Field(0.1, ge=0, lt=1, description="probability of dropping the class label")


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

    @field_validator("resume")
    @classmethod
    def _resume(cls, v: str) -> str:
        return v if v in ("auto", "never") else _check_uri(v)


class DeepSpeedSpec(BaseModel):
    # Any further DeepSpeed config key passes through untouched (e.g. `zero_optimization` tuning).
    model_config = ConfigDict(extra="allow")
    zero_stage: Literal[0, 1, 2, 3] = 2


class ResourcesSpec(Strict):
    workers: int = Field(2, gt=0)
    use_gpu: bool = False
    cpus_per_worker: int = Field(1, gt=0)


class CheckpointSpec(Strict):
    uri: str = "s3://ditforge/runs"
    every_steps: int = Field(100, gt=0)
    keep_last: int = Field(3, ge=1)
    keep_every: int = Field(0, ge=0, description="also keep every checkpoint whose step is a multiple (0 = off)")
    upload_timeout_s: float = Field(600, gt=0, description="a save not complete by then is marked failed")

    _uri = field_validator("uri")(_check_uri)


class TrackingSpec(Strict):
    experiment: str = "ditforge"
    uri: str | None = Field(None, description="MLflow tracking URI; default: the embedded server")
    log_every: int = Field(10, gt=0)
    sample_every: int = Field(0, ge=0, description="sample grid every N steps (0 = only at the end)")
    system_metrics: bool = True
    register_model: bool = True


class SampleSpec(Strict):
    per_class: int = Field(8, gt=0, description="grid columns; one row per class")
    steps: int = Field(25, gt=0, description="Euler steps")
    cfg_scale: float = Field(2.0, ge=0)
    seed: int = 0


class JobSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
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

    @model_validator(mode="after")
    def _consistent(self) -> "JobSpec":
        if self.train.precision == "bf16" and not self.resources.use_gpu:
            raise ValueError("train.precision: bf16 needs resources.use_gpu: true (CPU trains in fp32)")
        if self.train.warmup >= self.train.steps and self.train.warmup > 0:
            raise ValueError(f"train.warmup: {self.train.warmup} must be smaller than train.steps ({self.train.steps})")
        return self

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------ cluster


class ServicePorts(Strict):
    mlflow: int = Field(5005, gt=0, lt=65536)
    ray_dashboard: int = Field(8265, gt=0, lt=65536)
    ray_gcs: int = Field(6379, gt=0, lt=65536)


class ClusterSpec(Strict):
    kind: Literal["embedded", "address"] = "embedded"
    # embedded: Ray, MLflow and the S3 server run on this machine, bound to 127.0.0.1.
    cpus: int = Field(4, gt=0, description="logical CPUs the embedded Ray head offers")
    ports: ServicePorts = ServicePorts()
    # address: an existing Ray cluster's dashboard (http://host:8265), where the Jobs API lives.
    address: str | None = None

    @model_validator(mode="after")
    def _address(self) -> "ClusterSpec":
        if self.kind == "address" and not self.address:
            raise ValueError("address: required when kind is 'address' (e.g. http://head:8265)")
        if self.address and not self.address.startswith(("http://", "https://", "ray://")):
            raise ValueError(f"address: '{self.address}' must start with http://, https:// or ray://")
        return self


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
        if not loc and ": " in msg:
            field, reason = msg.split(": ", 1)
            return field, reason
    if kind == "literal_error":
        got = err.get("input")
        return ".".join(loc), f"{got!r} is not allowed; {msg[0].lower()}{msg[1:]}"
    got = err.get("input")
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return ".".join(loc), f"{msg[0].lower()}{msg[1:]} (got {got!r})"
    return ".".join(loc), f"{msg[0].lower()}{msg[1:]}"


def _known_fields(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = field.annotation if field else None
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


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    name = str(path)
    if not p.exists():
        raise SpecError(name, "", "no such file")
    if p.is_dir():
        raise SpecError(name, "", "is a directory, not a YAML file")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(name, "", f"cannot read: {e.__class__.__name__}: {e}") from None
    try:
        data = yaml.safe_load(text)
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


def load_job(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    data = _merge(read_yaml(path), parse_set(overrides))
    return build(JobSpec, data, str(path))  # type: ignore[return-value]


def load_cluster(path: str | Path | None, overrides: list[str] | None = None) -> ClusterSpec:
    if path is None:
        return ClusterSpec.model_validate(parse_set(overrides))
    data = _merge(read_yaml(path), parse_set(overrides))
    return build(ClusterSpec, data, str(path))  # type: ignore[return-value]


def load_any(path: str | Path) -> BaseModel:
    """For `ditforge validate`: a file with a `kind` key and no `data` is a cluster spec."""
    data = read_yaml(path)
    is_cluster = "kind" in data and "data" not in data
    return build(ClusterSpec if is_cluster else JobSpec, data, str(path))
