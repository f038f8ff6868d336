"""The job spec: `JobSpec` and its sections (data, vae, model, objective, train, deepspeed,
resources, checkpoint, tracking, sample, eval), each checked on its own and against the others."""

from __future__ import annotations

import difflib
import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .errors import Strict, check_uri, no_password


# The final save's retries end this long before the collective timeout (two margins of the
# checkpoint protocol, train/checkpoint.py PG_MARGIN_S, and room for the manifest).
FINAL_SAVE_MARGIN_S = 300.0


class AutoBatchSpec(Strict):
    # The probe (train/batch.py) runs train steps of growing micro-batches on the worker's GPU and
    # keeps the largest whose peak memory, plus the optimizer state DeepSpeed adds, fits this fraction.
    memory_fraction: float = Field(0.85, gt=0, le=1, description="share of device memory the probe may fill")
    fallback: int = Field(32, gt=0, description="micro-batch on CPU, where nothing is probed")
    max: int = Field(1024, gt=0, description="never probe beyond this micro-batch")
    multiple: int = Field(8, gt=0, description="the probed micro-batch is a multiple of this")


class MixSourceSpec(Strict):
    """A further latent data set trained in the same job (joint image-video training): each step
    draws one set, `data.train` or one of these, with probability proportional to its weight
    (data/mix.py). An image set (frames: 1) trains a video model on one-frame clips."""

    train: str = Field(description="URI of this set's latent shards (a folder holding manifest.json)")
    weight: float = Field(gt=0, description="share of the steps, relative to data.weight and the other sets")
    frames: int = Field(1, gt=0, description="1 = images (one-frame clips); > 1 = video clips of this many frames")
    resolution: int | None = Field(None, gt=0, description="pixel height = width (default: data.resolution)")
    batch_size: int | None = Field(None, gt=0, description="micro-batch per worker (default: data.batch_size)")
    # The class ids of another data set mean other things (shapes: the shape; moving-shapes: the
    # direction): `drop` trains this set with the null class and no caption (unconditionally).
    labels: Literal["keep", "drop"] = Field("keep", description="keep: its classes / captions condition; drop: null")

    _uri = field_validator("train")(check_uri)


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
    max_bad_fraction: float = Field(
        0.01, ge=0, le=1, description="bad samples a rank may skip per epoch, as a fraction"
    )
    storage_timeout_s: float = Field(300, gt=0, description="how long the loader retries a store that does not answer")
    # Joint training on several data sets (e.g. images beside the videos): `data.train` is the
    # primary set (the model's sample shape, classes and evaluation come from it) with `weight`;
    # each step draws one set by weight, the same on every rank (data/mix.py).
    weight: float = Field(1.0, gt=0, description="with data.mix: data.train's share of the steps")
    mix: list[MixSourceSpec] = Field(default_factory=list, description="further data sets trained in the same job")

    _uri = field_validator("train")(check_uri)

    def sources(self) -> list[MixSourceSpec]:
        """Every data set of the job, `data.train` first, each with its own settings filled in."""
        first = MixSourceSpec(
            train=self.train,
            weight=self.weight,
            frames=self.frames,
            resolution=self.resolution,
            batch_size=self.fixed_batch(),
        )
        rest = [
            s.model_copy(
                update={"resolution": s.resolution or self.resolution, "batch_size": s.batch_size or self.fixed_batch()}
            )
            for s in self.mix
        ]
        return [first, *rest]

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
        return check_uri(v) if v and "://" in v else v  # a plain folder stays allowed (diffusers)

    @model_validator(mode="after")
    def _path(self) -> "VAESpec":
        if self.kind in ("own", "diffusers") and not self.path:
            raise ValueError(f"path: required for vae.kind '{self.kind}'")
        if self.kind == "own":
            assert self.path is not None  # checked just above
            try:
                check_uri(self.path)
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
        "none", description="caption conditioning: own = small trainable encoder; transformers = frozen local model"
    )
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
        from ..models.tasks import TASKS

        return {t: getattr(self, t) for t in TASKS}

    def trained(self) -> list[str]:
        return [t for t, w in self.weights().items() if w > 0]


# LoRA's default targets: every transformer block's attention and MLP linears (models/lora.py).
LORA_TARGETS = ["blocks.*.attn.qkv", "blocks.*.attn.proj", "blocks.*.mlp.0", "blocks.*.mlp.2"]


class LoraSpec(Strict):
    """Low-rank adapters (peft LoRA) on a frozen, imported DiT (models/lora.py): W x + (alpha / rank)·B A x,
    with only A and B trained; checkpoints hold the adapters, export the merged weights and the adapter."""

    rank: int = Field(8, gt=0, le=1024, description="r: the adapters' inner dimension")
    alpha: float | None = Field(None, gt=0, description="scale = alpha / rank; default: rank (scale 1)")
    targets: list[str] = Field(
        default_factory=lambda: list(LORA_TARGETS),
        min_length=1,
        description="linear layers to adapt: full names or suffixes, * for any block (blocks.*.attn.qkv)",
    )

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank


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
    lora: LoraSpec | None = Field(None, description="train low-rank adapters on the frozen model.init_from weights")

    @field_validator("resume")
    @classmethod
    def _resume(cls, v: str) -> str:
        return v if v in ("auto", "never") else check_uri(v)


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
                problems += [
                    f"zero_optimization.{sub}: set by ditforge itself ({ZERO_OWN[sub]})"
                    for sub in value
                    if sub in ZERO_OWN
                ]
        if problems:  # one line each (see load._reword)
            raise ValueError("\n".join(problems))
        return self


# DeepSpeed config keys that train/engine.py derives from the spec → the spec field to use instead.
DEEPSPEED_OWN = {
    "train_batch_size": "use data.batch_size and resources.workers",
    "train_micro_batch_size_per_gpu": "use data.batch_size",
    "gradient_accumulation_steps": "always 1",
    "gradient_clipping": "use train.grad_clip",
    "bf16": "use train.precision",
    "fp16": "use train.precision",
    "amp": "use train.precision",
    "optimizer": "ditforge passes torch's AdamW; use train.lr, train.weight_decay",
    "scheduler": "ditforge passes its warmup schedule; use train.warmup",
    "zero_allow_untested_optimizer": "needed for the client AdamW",
    "steps_per_print": "ditforge logs to MLflow; use tracking.log_every",
}
ZERO_OWN = {
    "stage": "use deepspeed.zero_stage",
    "reduce_bucket_size": "use deepspeed.bucket_mb",
    "allgather_bucket_size": "use deepspeed.bucket_mb",
    "overlap_comm": "use deepspeed.overlap_comm",
    "contiguous_gradients": "always on",
}


class ResourcesSpec(Strict):
    workers: int = Field(2, gt=0)
    use_gpu: bool = False
    cpus_per_worker: int = Field(1, gt=0)
    # Ray Train ScalingConfig: one placement-group bundle per worker.
    gpus_per_worker: int = Field(1, ge=1, description="used when use_gpu is true")
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="PACK fills a node before the next; SPREAD puts workers on different nodes"
    )
    accelerator_type: str | None = Field(None, description="Ray accelerator type, e.g. A100, H100, L4")
    # Elastic (README "Elastic training and resuming at another size"): with min_workers < workers
    # Ray Train runs the job with between min_workers and workers workers; a lost host restarts
    # it smaller from the newest complete checkpoint, regained capacity grows it back.
    min_workers: int | None = Field(None, description="elastic: the fewest workers the job may run with")
    resize_interval_s: float = Field(60.0, gt=0, description="elastic: how often Ray Train looks for room to grow")
    # Ray Train's worker-group start timeout: right after a host dies Ray may still count its CPUs,
    # and Ray Train waits this long for a group it cannot place before it tries again (an elastic
    # job then smaller). Ray's default is 60 s.
    placement_timeout_s: float = Field(
        60.0, ge=5, le=3600, description="how long Ray Train waits to place the workers before trying again"
    )
    # per_worker: each worker keeps data.batch_size, so the global batch follows the world size and
    # the LR follows `lr_scaling` (of train.lr at `workers` workers). global: the global batch stays
    # (data.global_batch, default batch_size x workers) and gradient accumulation makes up for
    # fewer workers; the LR stays too.
    batch_policy: Literal["per_worker", "global"] = Field(
        "per_worker", description="elastic: per_worker keeps data.batch_size, global keeps the global batch"
    )
    lr_scaling: Literal["none", "linear", "sqrt"] = Field(
        "none", description="LR at w workers: train.lr x 1 | w/workers | sqrt(w/workers)"
    )
    # How long a rank waits in one collective (torch.distributed's timeout) before it fails. A lost
    # host is normally noticed sooner, by Ray's node health checks (the cluster spec's
    # `health_check`); this bounds what Ray cannot see, e.g. two workers cut off from each other
    # but not from the head. Every bounded wait of the checkpoint protocol is sized under it.
    collective_timeout_s: float = Field(
        1800, ge=300, le=86400, description="a collective that takes longer fails the job (then restarts it)"
    )

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
        return {"none": 1.0, "linear": ratio, "sqrt": ratio**0.5}[self.lr_scaling]

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
    # Under the workers' collective timeout (resources.collective_timeout_s), which the other ranks
    # wait through meanwhile: checked with it in JobSpec.
    final_timeout_s: float = Field(900, gt=0, description="the last save retries with backoff this long")

    _uri = field_validator("uri")(check_uri)


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
    classes: list[int] | None = Field(
        None, description="the classes shown, one row each (default: up to max_classes spread evenly over all classes)"
    )
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
    # the held-out truth, next to a no-model baseline (evaluate/task_quality.py).
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
        problems = []  # every inconsistency, one line each (see load._reword)
        gpu_only = ("flash_attn", "sdpa_cudnn", "sdpa_efficient")
        if self.model.attention in gpu_only and not self.resources.use_gpu:
            problems.append(
                f"model.attention: {self.model.attention} needs resources.use_gpu: true "
                "(on CPU use auto, sdpa_flash or math)"
            )
        sampler_ok = {"rectified_flow": ("auto", "euler", "heun"), "ddpm": ("auto", "ddim", "ddpm")}
        if self.sample.sampler not in sampler_ok[self.objective.kind]:
            problems.append(
                f"sample.sampler: {self.sample.sampler} does not fit objective.kind "
                f"{self.objective.kind} (use {' or '.join(sampler_ok[self.objective.kind][1:])})"
            )
        if self.task == "vae" and self.vae.kind != "own":
            problems.append("vae.kind: task 'vae' trains the own autoencoder: set vae.kind: own and vae.path")
        if self.train.precision == "bf16" and not self.resources.use_gpu:
            problems.append("train.precision: bf16 needs resources.use_gpu: true (CPU trains in fp32)")
        if self.train.precision == "fp8":
            if not self.resources.use_gpu:
                problems.append(
                    "train.precision: fp8 needs resources.use_gpu: true and a GPU of compute "
                    "capability 8.9+ (Ada, Hopper or later); CPU trains in fp32"
                )
            acc = (self.resources.accelerator_type or "").upper()
            if any(acc.startswith(old) for old in PRE_FP8_GPUS):
                problems.append(
                    f"train.precision: fp8 needs compute capability 8.9+ (Ada, Hopper or later); "
                    f"resources.accelerator_type {self.resources.accelerator_type} has no fp8 tensor cores"
                )
        r = self.resources
        room = r.collective_timeout_s - FINAL_SAVE_MARGIN_S
        if self.checkpoint.final_timeout_s > room:
            problems.append(
                f"checkpoint.final_timeout_s: {self.checkpoint.final_timeout_s:g} must be at most {room:g}: the other "
                f"ranks wait through it in a collective (resources.collective_timeout_s {r.collective_timeout_s:g} "
                f"less {FINAL_SAVE_MARGIN_S:g} s)"
            )
        if r.batch_policy == "global":
            if self.data.global_batch is None and self.data.batch_size == "auto":
                problems.append("resources.batch_policy: global with data.batch_size: auto needs data.global_batch")
            if r.lr_scaling != "none":
                problems.append(
                    f"resources.lr_scaling: {r.lr_scaling}: with batch_policy global the global batch, "
                    "and so the LR, does not change with the world size; use none"
                )
            g = self.global_batch()
            sizes = range(r.min_workers or r.workers, r.workers + 1)
            odd = [w for w in sizes if g is not None and g % w]
            if odd:
                problems.append(
                    f"resources.batch_policy: global: the global batch {g} does not split over {odd[0]} workers "
                    f"(an elastic job runs with {sizes.start} to {r.workers}): choose data.global_batch divisible by each"
                )
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
            problems.append(
                f"train.max_failures: {self.train.max_failures}: an elastic job (resources.min_workers: "
                f"{self.resources.min_workers}) restarts smaller after a host loss, which Ray Train "
                "counts as a failure: set train.max_failures to 1 or more"
            )
        if self.resources.elastic and self.task == "vae":
            problems.append("resources.min_workers: task 'vae' cannot resume at another world size; drop min_workers")
        if self.train.video_tasks is not None:
            # Every video set of the job (data.train, and video sets in data.mix) takes the task masks;
            # image sets (one-frame clips) take the one-frame tasks only (models/tasks.py).
            videos = [("data.frames", self.data.frames)] + [
                (f"data.mix.{i}.frames", s.frames) for i, s in enumerate(self.data.mix) if s.frames > 1
            ]
            for field, frames in videos:
                gt = frames // self.vae.temporal_downsample // self.model.patch_t  # latent token frames
                if gt < 2:
                    problems.append(
                        f"train.video_tasks: needs clips of at least 2 latent token frames ({field} {frames} gives {gt})"
                    )
                    continue
                k_max = self.train.video_tasks.k[1]
                for task, need in (
                    ("predict", k_max + 1),
                    ("predict_backward", k_max + 1),
                    ("interpolate", 2 * k_max + 1),
                ):
                    if getattr(self.train.video_tasks, task) > 0 and need > gt:
                        clips = (
                            "the clips" if field == "data.frames" else f"the clips of {field.removesuffix('.frames')}"
                        )
                        problems.append(
                            f"train.video_tasks.k: {task} with k up to {k_max} needs {need} latent frames; "
                            f"{clips} have {gt}"
                        )
        problems += self._mix_problems()
        if self.train.lora is not None:
            problems += _lora_problems(self)
        if self.train.warmup >= self.train.steps and self.train.warmup > 0:
            problems.append(f"train.warmup: {self.train.warmup} must be smaller than train.steps ({self.train.steps})")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def _mix_problems(self) -> list[str]:
        """`data.mix` against the rest of the spec: one line per problem."""
        d = self.data
        if not d.mix:
            return []
        out = []
        if self.task == "vae":
            out.append("data.mix: task 'vae' trains the autoencoder on data.train alone; drop data.mix")
        if d.batch_size == "auto":
            out.append(
                "data.batch_size: auto probes one data set; with data.mix give each set's micro-batch as a number"
            )
        if d.global_batch is not None:
            out.append(
                "data.global_batch: not with data.mix (each set's batch_size is its micro-batch, one per step); "
                "leave it unset"
            )
        elif self.resources.batch_policy == "global":
            out.append("resources.batch_policy: global accumulates gradients, which data.mix does not; use per_worker")
        seen = {d.train.rstrip("/"): "data.train"}
        for i, s in enumerate(d.mix):
            at = f"data.mix.{i}"
            uri = s.train.rstrip("/")
            if uri in seen:
                out.append(f"{at}.train: {s.train} is already {seen[uri]}; list each data set once")
            seen.setdefault(uri, f"{at}.train")
            if s.frames > 1 and d.frames == 1:
                out.append(
                    f"{at}.frames: {s.frames}: an image job (data.frames 1) mixes in image sets only; "
                    "make the video set data.train and the images a data.mix entry"
                )
            elif s.frames > 1 and s.frames % self.vae.temporal_downsample:
                out.append(
                    f"{at}.frames: {s.frames} is not a multiple of vae.temporal_downsample "
                    f"({self.vae.temporal_downsample}); images use frames: 1"
                )
        return out

    def global_batch(self) -> int | None:
        """Samples per optimizer step over all workers, when fixed: `data.global_batch`, or with
        `resources.batch_policy: global` the batch at full size (batch_size x workers). None: each
        worker takes data.batch_size, whatever the world size."""
        d, r = self.data, self.resources
        if d.global_batch is not None:
            return d.global_batch
        if r.batch_policy == "global" and d.batch_size != "auto":
            return d.batch_size * r.workers
        return None

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:12]


def _lora_problems(spec: JobSpec) -> list[str]:
    out = []
    if spec.task != "dit":
        out.append("train.lora: adapters train a DiT (task: dit), not the VAE")
    if not spec.model.init_from:
        out.append(
            "train.lora: needs model.init_from, the pretrained weights the adapters adapt "
            "(a diffusers transformer folder or a facebookresearch/DiT .pt)"
        )
    if spec.deepspeed.zero_stage == 3:
        out.append(
            "train.lora: runs under deepspeed.zero_stage 0, 1 or 2 (the adapters are small; stage 3 gains nothing)"
        )
    if spec.train.precision == "fp8":
        out.append("train.lora: not with train.precision: fp8 (use bf16 or fp32)")
    if spec.resources.elastic:
        out.append("train.lora: an elastic job (resources.min_workers) cannot resume adapters at another size")
    return out


def spec_warnings(spec: JobSpec) -> list[str]:
    """Allowed, but probably not what was meant: one `field.path: reason` line each (printed as
    `warning:`; the exit code stays 0)."""
    out = []
    if spec.deepspeed.zero_stage == 3 and spec.model.size in ("T", "S"):
        out.append(
            f"deepspeed.zero_stage: 3 with model.size {spec.model.size}: too small to shard sensibly "
            "(gathering the weights every step costs more than the memory it saves); stage 2 fits it"
        )
    return out
