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

    @property
    def lines(self) -> list[str]:
        """Each problem's line (the CLI prints each as `error: <line>`)."""
        return [str(self)]


class SpecErrors(SpecError):
    """Every problem of one spec, in file order; behaves as the first one where one is expected."""

    def __init__(self, problems: list[SpecError]):
        self.problems = problems
        super().__init__(problems[0].file, problems[0].field, problems[0].reason)

    @property
    def lines(self) -> list[str]:
        return [str(p) for p in self.problems]

    def __str__(self) -> str:
        return "\n".join(self.lines)


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


def no_password(value: str | None) -> str | None:
    """Specs are logged, saved with checkpoints and sent to MLflow: they must not hold secrets."""
    from .credentials import has_userinfo_password

    if value and has_userinfo_password(value):
        # the value itself is not repeated: it holds the secret
        raise ValueError("holds a password (scheme://user:PASSWORD@host): give credentials through the "
                         "environment or a named file (see README, Security defaults), never in a spec")
    return value


# ---------------------------------------------------------------------------------------- job


class AutoBatchSpec(Strict):
    # The probe (train/batch.py) runs train steps of growing micro-batches on the worker's GPU and
    # keeps the largest whose peak memory, plus the optimizer state DeepSpeed adds, fits this fraction.
    memory_fraction: float = Field(0.85, gt=0, le=1, description="share of device memory the probe may fill")
    fallback: int = Field(32, gt=0, description="micro-batch on CPU, where nothing is probed")
    max: int = Field(1024, gt=0, description="never probe beyond this micro-batch")
    multiple: int = Field(8, gt=0, description="the probed micro-batch is a multiple of this")


class DataSpec(Strict):
    train: str = Field(description="URI of the latent shards (a folder holding manifest.json)")
    # auto: probed at start-up on each worker's GPU (train/batch.py); on CPU it is auto_batch.fallback.
    batch_size: int | Literal["auto"] = Field(32, description="micro-batch per worker, or auto")
    auto_batch: AutoBatchSpec = AutoBatchSpec()
    # Samples per optimizer step over all workers; gradient accumulation makes up what the
    # micro-batches do not hold (global = micro-batch x workers x accumulation steps).
    global_batch: int | None = Field(None, gt=0, description="samples per optimizer step, all workers")
    # Pixel size of the samples; model-info and the quality metric use them before any data is read.
    resolution: int = Field(32, gt=0, description="pixel height = width")
    frames: int = Field(1, gt=0, description="1 = images; > 1 = video clips of this many frames")
    # Bad data (a corrupt shard, a NaN latent...) is skipped and counted; past this fraction of a
    # rank's samples in one epoch the run stops instead (data/loader.py).
    max_bad_fraction: float = Field(0.01, ge=0, le=1, description="bad samples a rank may skip per epoch, as a fraction")
    storage_timeout_s: float = Field(300, gt=0, description="how long the loader retries a store that does not answer")

    _uri = field_validator("train")(_check_uri)

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch(cls, v: Any) -> Any:
        # One clear message instead of pydantic's two (one per member of the union).
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            return v
        if isinstance(v, str) and v.strip().isdigit() and int(v) > 0:
            return int(v)  # --set data.batch_size=64 arrives as a string
        raise ValueError(f"{v!r} is not allowed; give a positive integer or auto")

    def fixed_batch(self) -> int:
        """The micro-batch when nothing is probed (CPU, the VAE trainer): the number, or auto's fallback."""
        return self.auto_batch.fallback if self.batch_size == "auto" else self.batch_size


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


class VideoTasksSpec(Strict):
    """VDT-style task mixture (models/tasks.py): each sample draws a task with these weights
    (normalised), and the task says which latent tokens are given."""

    generate: float = Field(0.0, ge=0, description="nothing given")
    predict: float = Field(0.0, ge=0, description="first k latent frames given")
    predict_backward: float = Field(0.0, ge=0, description="last k latent frames given")
    interpolate: float = Field(0.0, ge=0, description="first and last k latent frames given")
    image_to_video: float = Field(0.0, ge=0, description="first latent frame given")
    any_frames: float = Field(0.0, ge=0, description="a random subset of frames given")
    complete: float = Field(0.0, ge=0, description="everything given but random spatio-temporal boxes")
    k: tuple[int, int] = Field((1, 2), description="[min, max] given latent frames for predict / interpolate")

    @model_validator(mode="after")
    def _weights(self) -> "VideoTasksSpec":
        if not any(v > 0 for v in self.weights().values()):
            raise ValueError("give at least one task a weight > 0 (e.g. predict: 1.0)")
        if not 1 <= self.k[0] <= self.k[1]:
            raise ValueError(f"k: [{self.k[0]}, {self.k[1]}] must satisfy 1 <= min <= max")
        return self

    def weights(self) -> dict[str, float]:
        from .models.tasks import TASKS

        return {t: getattr(self, t) for t in TASKS}

    def trained(self) -> list[str]:
        return [t for t, w in self.weights().items() if w > 0]


class TrainSpec(Strict):
    steps: int = Field(300, gt=0)
    lr: float = Field(1e-3, gt=0)
    warmup: int = Field(20, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0, description="0 = off")
    seed: int = 0
    # fp8: bf16 training with the transformer blocks' linear layers in float8 (torchao), GPUs of
    # compute capability 8.9+ (Ada, Hopper and later).
    precision: Literal["auto", "fp32", "bf16", "fp8"] = "auto"
    # auto: continue this job's newest unfinished run if there is one; never: always a fresh run;
    # or a checkpoint URI (a run folder or one step_XXXXXXXX folder) to start a new run from.
    resume: str = "auto"
    max_failures: int = Field(0, ge=0, description="worker-group restarts (Ray Train FailureConfig)")
    ema_decay: float = Field(0.999, ge=0, lt=1, description="0 = no EMA")
    mask_ratio: float = Field(0.0, ge=0, lt=1, description="fraction of patch tokens dropped (MicroDiT)")
    unmask_last: float = Field(0.1, ge=0, le=1, description="final fraction of steps trained unmasked")
    video_tasks: VideoTasksSpec | None = Field(None, description="VDT task mixture (videos): which tokens are given")
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
    # bf16: DeepSpeed's gradient overflow check reads a flag on the host every step. bf16 has
    # fp32's range (no loss scale to adjust), and the NaN guard skips non-finite steps on the
    # device, so it can go; on until `ditforge bench`'s ablation has measured it on a GPU.
    overflow_check: bool = Field(True, description="bf16: DeepSpeed's per-step gradient overflow check (a host sync)")

    @model_validator(mode="after")
    def _typos(self) -> "DeepSpeedSpec":
        # Pass-through keys are not checked, but one that is nearly `zero_stage` is a typo that
        # would silently train with the default stage.
        problems = []
        for key, value in (self.model_extra or {}).items():
            if difflib.get_close_matches(key, ["zero_stage"], n=1, cutoff=0.75):
                problems.append(f"{key}: unknown key (did you mean 'zero_stage'?)")
            # Keys that train/engine.py sets from other spec fields: passed through, they would
            # silently override the field (or clash with the client optimizer), so they are refused.
            if key in DEEPSPEED_OWN:
                problems.append(f"{key}: set by ditforge itself ({DEEPSPEED_OWN[key]})")
            if key == "zero_optimization" and isinstance(value, dict):
                problems += [f"zero_optimization.{sub}: set by ditforge itself ({ZERO_OWN[sub]})"
                             for sub in value if sub in ZERO_OWN]
        if problems:  # one line each (see _reword)
            raise ValueError("\n".join(problems))
        return self


# DeepSpeed config keys that train/engine.py derives from the spec → the spec field to use instead.
DEEPSPEED_OWN = {
    "train_batch_size": "use data.batch_size and resources.workers",
    "train_micro_batch_size_per_gpu": "use data.batch_size",
    "gradient_accumulation_steps": "always 1",
    "gradient_clipping": "use train.grad_clip",
    "bf16": "use train.precision", "fp16": "use train.precision", "amp": "use train.precision",
    "optimizer": "ditforge passes torch's AdamW; use train.lr, train.weight_decay",
    "scheduler": "ditforge passes its warmup schedule; use train.warmup",
    "zero_allow_untested_optimizer": "needed for the client AdamW",
    "steps_per_print": "ditforge logs to MLflow; use tracking.log_every",
}
ZERO_OWN = {"stage": "use deepspeed.zero_stage", "reduce_bucket_size": "use deepspeed.bucket_mb",
            "allgather_bucket_size": "use deepspeed.bucket_mb", "overlap_comm": "use deepspeed.overlap_comm",
            "contiguous_gradients": "always on"}
# Pass-through keys that name a local file or folder (monitor outputs, NVMe offload, profiler
# files): each must lie inside the allowed roots, like the spec's own path fields.
_DS_PATH_KEY = re.compile(r"(^|_)(path|dir|directory|file|folder)s?$", re.I)  # output_path, nvme_path, log_dir


def deepspeed_paths(extra: dict, where: str = "deepspeed") -> list[tuple[str, Any]]:
    """(field.path, value) of every path-like key under the `deepspeed:` pass-through keys."""
    out = []
    for key, value in extra.items():
        if isinstance(value, dict):
            out += deepspeed_paths(value, f"{where}.{key}")
        elif _DS_PATH_KEY.search(str(key)):
            out.append((f"{where}.{key}", value))
    return out


class ResourcesSpec(Strict):
    workers: int = Field(2, gt=0)
    use_gpu: bool = False
    cpus_per_worker: int = Field(1, gt=0)
    # Ray Train ScalingConfig: one placement-group bundle per worker.
    gpus_per_worker: int = Field(1, ge=1, description="used when use_gpu is true")
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="PACK fills a node before the next; SPREAD puts workers on different nodes")
    accelerator_type: str | None = Field(None, description="Ray accelerator type, e.g. A100, H100, L4")
    # Elastic (README "Elastic training and resuming at another size"): with min_workers < workers
    # Ray Train runs the job with between min_workers and workers workers; a lost host restarts
    # it smaller from the newest complete checkpoint, regained capacity grows it back.
    min_workers: int | None = Field(None, description="elastic: the fewest workers the job may run with")
    resize_interval_s: float = Field(60.0, gt=0, description="elastic: how often Ray Train looks for room to grow")
    # per_worker: each worker keeps data.batch_size, so the global batch follows the world size and
    # the LR follows `lr_scaling` (of train.lr at `workers` workers).
    batch_policy: Literal["per_worker"] = "per_worker"
    lr_scaling: Literal["none", "linear", "sqrt"] = Field(
        "none", description="LR at w workers: train.lr x 1 | w/workers | sqrt(w/workers)")

    @model_validator(mode="after")
    def _gpu(self) -> "ResourcesSpec":
        if self.accelerator_type and not self.use_gpu:
            raise ValueError(f"accelerator_type: {self.accelerator_type} needs use_gpu: true")
        if self.min_workers is not None and self.min_workers < 1:
            raise ValueError(f"min_workers: {self.min_workers}: an elastic job needs at least 1 worker")
        if self.min_workers is not None and self.min_workers > self.workers:
            raise ValueError(f"min_workers: {self.min_workers} is larger than workers ({self.workers})")
        return self

    @property
    def elastic(self) -> bool:
        return self.min_workers is not None and self.min_workers < self.workers

    def lr_factor(self, world: int) -> float:
        """The LR multiplier at `world` workers (1 at `workers`)."""
        ratio = world / self.workers
        return {"none": 1.0, "linear": ratio, "sqrt": ratio ** 0.5}[self.lr_scaling]

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
    # Under the workers' 1800 s collective timeout (train/checkpoint.py PG_TIMEOUT_S), which the
    # other ranks wait through meanwhile.
    final_timeout_s: float = Field(900, gt=0, le=1500, description="the last save retries with backoff this long")

    _uri = field_validator("uri")(_check_uri)


class TrackingSpec(Strict):
    experiment: str = "ditforge"
    uri: str | None = Field(None, description="MLflow tracking URI; default: the embedded server")
    log_every: int = Field(10, gt=0)
    sample_every: int = Field(0, ge=0, description="sample grid every N steps (0 = only at the end)")
    system_metrics: bool = True
    register_model: bool = True

    _uri = field_validator("uri")(no_password)


class SampleSpec(Strict):
    per_class: int = Field(8, gt=0, le=64, description="grid columns; one row per class")
    classes: list[int] | None = Field(None, description="the classes shown, one row each (default: up to "
                                      "max_classes spread evenly over all classes)")
    max_classes: int = Field(64, gt=0, le=256, description="grid rows at most, so the grid stays readable")
    batch_size: int = Field(64, gt=0, description="samples generated (and decoded) at a time per worker")
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
    batch_size: int = Field(64, gt=0, description="samples generated (and decoded) at a time per worker")

    # Video tasks (train.video_tasks) on moving-shapes: PSNR of each task's generated frames against
    # the held-out truth, next to a no-model baseline (train/task_quality.py).
    tasks: bool = Field(True, description="score each trained video task (moving-shapes data)")
    task_clips: int = Field(32, gt=0, description="held-out clips per task")


# Accelerator types (Ray's names) without fp8 tensor cores.
PRE_FP8_GPUS = ("V100", "P100", "P4", "T4", "K80", "A100", "A10", "A30", "A40", "A6000", "M60")


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
        problems = []  # every inconsistency, one line each (see _reword)
        gpu_only = ("flash_attn", "sdpa_cudnn", "sdpa_efficient")
        if self.model.attention in gpu_only and not self.resources.use_gpu:
            problems.append(f"model.attention: {self.model.attention} needs resources.use_gpu: true "
                             "(on CPU use auto, sdpa_flash or math)")
        sampler_ok = {"rectified_flow": ("auto", "euler", "heun"), "ddpm": ("auto", "ddim", "ddpm")}
        if self.sample.sampler not in sampler_ok[self.objective.kind]:
            problems.append(f"sample.sampler: {self.sample.sampler} does not fit objective.kind "
                             f"{self.objective.kind} (use {' or '.join(sampler_ok[self.objective.kind][1:])})")
        if self.task == "vae" and self.vae.kind != "own":
            problems.append("vae.kind: task 'vae' trains the own autoencoder: set vae.kind: own and vae.path")
        if self.train.precision == "bf16" and not self.resources.use_gpu:
            problems.append("train.precision: bf16 needs resources.use_gpu: true (CPU trains in fp32)")
        if self.train.precision == "fp8":
            if not self.resources.use_gpu:
                problems.append("train.precision: fp8 needs resources.use_gpu: true and a GPU of compute "
                                 "capability 8.9+ (Ada, Hopper or later); CPU trains in fp32")
            acc = (self.resources.accelerator_type or "").upper()
            if any(acc.startswith(old) for old in PRE_FP8_GPUS):
                problems.append(f"train.precision: fp8 needs compute capability 8.9+ (Ada, Hopper or later); "
                                 f"resources.accelerator_type {self.resources.accelerator_type} has no fp8 tensor cores")
        if self.data.global_batch is not None:
            w, b = self.resources.workers, self.data.batch_size
            per = w * (1 if b == "auto" else b)
            if self.data.global_batch % per:
                what = f"{w} workers" if b == "auto" else f"data.batch_size {b} x {w} workers"
                problems.append(f"data.global_batch: {self.data.global_batch} is not a multiple of {what} = {per}")
            if self.task == "vae":
                problems.append("data.global_batch: the VAE trainer does not accumulate gradients; leave it unset")
        bad = [s for s in self.train.debug_nan_steps if not 1 <= s <= self.train.steps]
        if bad:
            problems.append(f"train.debug_nan_steps: step {bad[0]} is outside 1..train.steps ({self.train.steps})")
        if self.resources.elastic and self.train.max_failures < 1:
            problems.append(f"train.max_failures: {self.train.max_failures}: an elastic job (resources.min_workers: "
                             f"{self.resources.min_workers}) restarts smaller after a host loss, which Ray Train "
                             "counts as a failure: set train.max_failures to 1 or more")
        if self.resources.elastic and self.task == "vae":
            problems.append("resources.min_workers: task 'vae' cannot resume at another world size; drop min_workers")
        if self.train.video_tasks is not None:
            gt = self.data.frames // self.vae.temporal_downsample // self.model.patch_t  # latent token frames
            if gt < 2:
                problems.append(f"train.video_tasks: needs clips of at least 2 latent token frames (data.frames "
                                 f"{self.data.frames} gives {gt})")
            k_max = self.train.video_tasks.k[1]
            for task, need in (("predict", k_max + 1), ("predict_backward", k_max + 1), ("interpolate", 2 * k_max + 1)):
                if getattr(self.train.video_tasks, task) > 0 and need > gt:
                    problems.append(f"train.video_tasks.k: {task} with k up to {k_max} needs {need} latent frames; "
                                     f"the clips have {gt}")
        if self.train.warmup >= self.train.steps and self.train.warmup > 0:
            problems.append(f"train.warmup: {self.train.warmup} must be smaller than train.steps ({self.train.steps})")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:12]


# Fields that may change when a run is continued (`resume: auto`, `--resume RUN`): how long and how
# fast it trains, where and how often it logs, samples and saves, and on how many workers. Every
# other field defines the run (model, patch, VAE, data set, objective, seed, precision, EMA, ...):
# a change there is refused, since the checkpoint would be loaded into another experiment.
RESUMABLE = ("train.steps", "train.lr", "train.warmup", "train.weight_decay", "train.grad_clip", "train.resume",
             "train.max_failures", "train.max_nonfinite_steps", "train.debug_nan_steps",
             "data.batch_size", "data.shuffle_buffer", "data.max_bad_fraction", "data.storage_timeout_s",
             "model.compile", "model.attention", "model.grad_checkpointing",
             "deepspeed", "resources", "checkpoint", "tracking", "sample", "eval")
RUN_DEFINING = ("deepspeed.zero_stage",)  # inside a resumable section, still defining: shards differ per stage


def _flat(d: dict, at: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{at}.{k}" if at else str(k)
        if isinstance(v, dict) and v:
            out |= _flat(v, key)
        else:
            out[key] = v
    return out


def _resumable(field: str) -> bool:
    def under(prefixes):
        return any(field == p or field.startswith(p + ".") for p in prefixes)
    return under(RESUMABLE) and not under(RUN_DEFINING)


def run_fields(spec: dict) -> dict[str, Any]:
    """The run-defining fields of a resolved spec dump, flattened (`model.size` → 'S')."""
    return {k: v for k, v in _flat(spec).items() if not _resumable(k)}


def run_digest(spec: dict) -> str:
    return hashlib.sha256(json.dumps(run_fields(spec), sort_keys=True, default=str).encode()).hexdigest()[:12]


def spec_changes(old: dict, new: dict) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """(run-defining, resumable) fields that differ between two spec dumps: field → (old, new).
    Both are completed with the defaults first, so an older spec that left a field out compares
    by its default."""
    def complete(d: dict) -> dict:
        try:
            return _flat(JobSpec.model_validate(d).model_dump(mode="json"))
        except ValidationError:  # a spec of an older version: compare what it says
            return _flat(d)

    a, b = complete(old), complete(new)
    diff = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
    return ({k: v for k, v in diff.items() if not _resumable(k)}, {k: v for k, v in diff.items() if _resumable(k)})


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
    cpus: int = Field(4, ge=0, description="logical CPUs the embedded Ray head offers (0: a head that only "
                                           "coordinates; its jobs' workers run on joined hosts)")
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

    _no_secret = field_validator("address", "tracking_uri")(no_password)

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

    _no_secret = field_validator("tracking_uri")(no_password)


# Slurm's time formats (sbatch --time): M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.
_SLURM_TIME = re.compile(r"^(\d+(:\d{1,2}){0,2}|\d+-\d{1,2}(:\d{1,2}){0,2})$")
_SLURM_NAME = re.compile(r"^[A-Za-z0-9_.,:=+-]+$")  # partition, account, QoS: no spaces, no shell


class SlurmCluster(ClusterSpec):
    """A Ray cluster inside one Slurm allocation: the batch script starts a Ray head on the first
    node and a Ray worker node on each other node (srun). `mode: standing` holds the allocation
    until `ditforge cluster down` (scancel); `mode: job` runs one job and ends with it."""

    kind: Literal["slurm"] = "slurm"
    mode: Literal["standing", "job"] = Field("standing", description="standing: until `cluster down`; "
                                                                       "job: one allocation per `ditforge submit`")
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
    setup: list[str] = Field(default_factory=list, description="shell lines run on the nodes before Ray starts "
                                                               "(module load …, source venv/bin/activate)")
    python: str = Field("python", description="the interpreter with ditforge installed, after `setup`")
    # Preemption and the time limit: Slurm sends SIGUSR1 this long before it ends the job; the
    # run saves a checkpoint (as on `ditforge stop`) and the allocation is requeued.
    signal_grace_s: int = Field(180, ge=10, le=65535, description="--signal=B:USR1@N")
    requeue: bool = Field(True, description="--requeue: a preempted / timed-out allocation resumes the run")
    ports_from: int = Field(26000, ge=1024, lt=65436, description="Ray uses ports P…P+99 on every node")
    object_store_mb: int | None = Field(None, ge=80, description="per node; default: Ray's (30% of memory)")
    tracking_uri: str | None = Field(None, description="MLflow server the nodes can reach")
    state_dir: str | None = Field(None, description="a folder on a file system the login and compute nodes "
                                                    "share; default $DITFORGE_HOME/slurm/<name>")
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
    "embedded": EmbeddedCluster, "local": LocalCluster, "address": AddressCluster,
    "aws": AWSCluster, "gcp": GCPCluster, "kubernetes": KubernetesCluster, "slurm": SlurmCluster,
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
        elif typing.get_args(ann):  # an optional section (`X | None`): its model's fields
            ann = next((a for a in typing.get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)), ann)
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


def yaml_lines(path: str | Path) -> dict[tuple[str, ...], tuple[int, int]]:
    """Field path (list items by index) → (line, column) where it starts, to order problems as in the file."""
    out: dict[tuple[str, ...], tuple[int, int]] = {}

    def walk(node, at: tuple[str, ...]) -> None:
        out.setdefault(at, (node.start_mark.line, node.start_mark.column))
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                out.setdefault((*at, str(k.value)), (k.start_mark.line, k.start_mark.column))
                walk(v, (*at, str(k.value)))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                walk(v, (*at, str(i)))

    try:
        root = yaml.compose(Path(path).read_text(), Loader=yaml.SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return out
    if root is not None:
        walk(root, ())
    return out


def _line_of(field: str, lines: dict) -> tuple[float, int]:
    """A problem's line: its field's, else its nearest enclosing section's (a missing key)."""
    parts = tuple(field.split(".")) if field else ()
    for n in range(len(parts), -1, -1):
        if parts[:n] in lines:
            return lines[parts[:n]]
    return float("inf"), 0


def build(model: type[BaseModel], data: dict, name: str,
          lines: dict | None = None) -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        problems, seen = [], set()
        for err in e.errors():
            # a validator that found several problems gives one line per problem
            msgs = err["msg"].split("\n") if err["type"] == "value_error" else [err["msg"]]
            for msg in msgs:
                field, reason = _reword({**err, "msg": msg if msg.startswith("Value error, ") or err["type"] != "value_error"
                                         else f"Value error, {msg}"}, data, model)
                if (field, reason) not in seen:
                    seen.add((field, reason))
                    problems.append(SpecError(name, field, reason))
        problems.sort(key=lambda p: _line_of(p.field, lines or {}))  # stable: pydantic's order within a line
        raise (SpecErrors(problems) if len(problems) > 1 else problems[0]) from None


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
    problems: list[SpecError] = []
    fields: list[tuple[str, Any]] = []
    for field in LOCAL_PATH_FIELDS:
        node: Any = spec
        for part in field.split("."):
            node = getattr(node, part)
        fields.append((field, node))
    for field, node in fields + deepspeed_paths(spec.deepspeed.model_extra or {}):
        if not isinstance(node, str):
            if node is not None:
                problems.append(SpecError(name, field, f"expected a local path, got {node!r}"))
            continue
        if field.startswith("deepspeed.") and "://" in node and not node.startswith("file://"):
            problems.append(SpecError(name, field, f"'{node}': DeepSpeed writes here itself, so it must be a local "
                                                   "path inside the allowed roots"))
            continue
        if not node or node in ("auto", "never") or ("://" in node and not node.startswith("file://")):
            continue
        resolved = Path(node.removeprefix("file://")).expanduser().resolve()
        if not any(resolved.is_relative_to(r) for r in roots):
            problems.append(SpecError(name, field, f"'{node}' resolves to {resolved}, outside the allowed roots "
                                                   f"({', '.join(map(str, roots))}); add a folder to ${ROOTS_ENV} to allow it"))
    if problems:
        lines = yaml_lines(name) if Path(name).is_file() else {}
        problems.sort(key=lambda p: _line_of(p.field, lines))
        raise SpecErrors(problems) if len(problems) > 1 else problems[0]


def load_job(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    data = _merge(read_yaml(path), parse_set(overrides))
    spec = build(JobSpec, data, str(path), yaml_lines(path))
    check_roots(spec, str(path))  # type: ignore[arg-type]
    return spec  # type: ignore[return-value]


def build_cluster(data: dict, name: str, lines: dict | None = None) -> ClusterSpec:
    """The `kind` key picks the model, so errors name fields of that kind only."""
    kind = data.get("kind", "embedded")
    if kind not in CLUSTER_KINDS:
        raise SpecError(name, "kind", f"{kind!r} is not allowed; expected one of {', '.join(CLUSTER_KINDS)}")
    return build(CLUSTER_KINDS[kind], data, name, lines)  # type: ignore[return-value]


def load_cluster(path: str | Path | None, overrides: list[str] | None = None) -> ClusterSpec:
    if path is None:
        return build_cluster(parse_set(overrides), "--set")
    data = _merge(read_yaml(path), parse_set(overrides))
    return build_cluster(data, str(path), yaml_lines(path))


def load_any(path: str | Path) -> BaseModel:
    """For `ditforge validate`: a file with a `kind` key and no `data` is a cluster spec."""
    data = read_yaml(path)
    if "kind" in data and "data" not in data:
        return build_cluster(data, str(path), yaml_lines(path))
    spec = build(JobSpec, data, str(path), yaml_lines(path))
    check_roots(spec, str(path))  # type: ignore[arg-type]
    return spec
