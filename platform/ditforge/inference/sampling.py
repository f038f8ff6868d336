"""Sample grids from a DiT: one row per class, fixed seed. Used by the worker and `ditforge sample`.

Bounded at any model size: the grid shows at most `sample.max_classes` classes (a spread-out
subset, or `sample.classes`), samples are generated and decoded `batch_size` at a time on the
worker's device, and in a multi-worker run the chunks are shared out over the ranks (each holds the
full sampling weights anyway), so no rank waits long for another. Chunk k's noise is seeded by
(seed, k) alone: the grid is the same whatever the number of workers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from ..models.vae import build_vae
from ..objectives.flow import RectifiedFlow
from ..objectives.samplers import sample

if TYPE_CHECKING:
    from ..models.dit import DiT
    from ..models.vae import VAE
    from ..objectives import Objective
    from ..spec import SampleSpec, VAESpec


@torch.no_grad()
def generate(
    model: DiT,
    objective: Objective | None,
    latent_shape: tuple[int, ...],
    y: torch.Tensor | None,
    sample_spec: SampleSpec,
    device: torch.device = torch.device("cpu"),
    bf16: bool = False,
) -> torch.Tensor:
    """Latents (N, *latent_shape) for classes `y` (None: `per_class` unconditional samples) with the
    spec's sampler, steps, CFG scale and seed; captions, if the model takes them, are the null one."""
    was_training = model.training
    model.eval()
    n = len(y) if y is not None else sample_spec.per_class
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        z = sample(
            objective or RectifiedFlow(),
            model,
            (n, *latent_shape),
            {"y": y},
            sampler=sample_spec.sampler,
            steps=sample_spec.steps,
            cfg_scale=sample_spec.cfg_scale,
            seed=sample_spec.seed,
            device=device,
        )
    model.train(was_training)
    return z.float()


def grid_classes(num_classes: int, sample_spec: SampleSpec) -> list[int]:
    """The grid's rows: `sample.classes`, else at most `max_classes` spread evenly over all."""
    if sample_spec.classes:
        bad = [c for c in sample_spec.classes if not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"sample.classes: class {bad[0]} is outside 0..{num_classes - 1}")
        return list(sample_spec.classes[: sample_spec.max_classes])
    k = min(num_classes, sample_spec.max_classes)
    return [i * num_classes // k for i in range(k)]


def _on_device(vae: VAE, device: torch.device) -> VAE:
    """The VAE's network (own or diffusers) on the worker's device: decoding on the CPU is what
    made the end of a large run take hours."""
    if hasattr(vae, "net"):
        vae.net.to(device)
    return vae


def _chunk_seed(seed: int, k: int) -> int:
    return seed * 1_000_003 + k


@torch.no_grad()
def generate_chunks(
    model: DiT,
    objective: Objective | None,
    latent_shape: tuple[int, ...],
    y: torch.Tensor | None,
    n: int,
    sample_spec: SampleSpec,
    device: torch.device,
    bf16: bool,
    batch_size: int,
    decode: Callable[[torch.Tensor], Any] | None = None,
    rank: int = 0,
    world: int = 1,
) -> list[tuple[int, object]]:
    """This rank's share of `n` samples (labels `y`, or None): chunks k = rank, rank + world, …
    of `batch_size` each → [(k, decode(latents) or latents on the CPU)]."""
    out: list[tuple[int, object]] = []
    for k in range(rank, -(-n // batch_size), world):
        lo, hi = k * batch_size, min(n, (k + 1) * batch_size)
        spec_k = sample_spec.model_copy(update={"seed": _chunk_seed(sample_spec.seed, k), "per_class": hi - lo})
        z = generate(model, objective, latent_shape, None if y is None else y[lo:hi].to(device), spec_k, device, bf16)
        out.append((k, decode(z) if decode else z.cpu()))
    return out


def gather_chunks(mine: list, world: int) -> list | None:
    """Rank 0: every rank's chunks in chunk order; other ranks: None. Collective when world > 1."""
    if world == 1:
        return [v for _, v in sorted(mine, key=lambda kv: kv[0])]
    parts: list[Any] | None = [None] * world if dist.get_rank() == 0 else None
    dist.gather_object(mine, parts, dst=0)
    if parts is None:
        return None
    return [v for _, v in sorted((kv for p in parts for kv in p), key=lambda kv: kv[0])]


@torch.no_grad()
def sample_grid(
    model: DiT,
    latent_shape: tuple[int, ...],
    sample_spec: SampleSpec,
    vae_spec: VAESpec,
    out: str,
    device: torch.device = torch.device("cpu"),
    bf16: bool = False,
    objective: Objective | None = None,
    rank: int = 0,
    world: int = 1,
) -> list[str]:
    """Generate `per_class` samples for each grid class with CFG, decode, write one PNG to `out`
    (videos: every clip's frames side by side, plus an animated GIF beside it). Collective when
    world > 1: every rank generates its share; rank 0 writes the files. Returns the files written."""
    classes = grid_classes(model.cfg.num_classes, sample_spec) if model.cfg.num_classes else [0]
    n_cls, cols = len(classes), sample_spec.per_class
    y = torch.tensor(classes).repeat_interleave(cols) if model.cfg.num_classes else None
    vae = _on_device(build_vae(vae_spec), device)
    # uint8 on the CPU: what travels to rank 0 is a quarter of the float pixels
    to_u8 = lambda z: ((vae.decode(z).float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()  # noqa: E731
    mine = generate_chunks(
        model,
        objective,
        latent_shape,
        y,
        n_cls * cols,
        sample_spec,
        device,
        bf16,
        sample_spec.batch_size,
        to_u8,
        rank,
        world,
    )
    chunks = gather_chunks(mine, world)
    if chunks is None:
        return []
    pixels = torch.cat(chunks).float() / 127.5 - 1  # (N, 3, [T,] H, W) in [-1, 1]
    if pixels.dim() == 4:
        return [save_grid(pixels, rows=n_cls, cols=cols, out=out)]
    gif = out.rsplit(".", 1)[0] + ".gif"
    frames = [Image.open(save_grid(pixels[:, :, t], n_cls, cols, f"{out}.{t}.png")) for t in range(pixels.shape[2])]
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=150, loop=0)
    return [save_grid(torch.cat(pixels.unbind(2), dim=3), rows=n_cls, cols=cols, out=out), gif]


def save_grid(pixels: torch.Tensor, rows: int, cols: int, out: str, upscale: int = 2, pad: int = 2) -> str:
    """(N, 3, H, W) in [-1, 1] → one PNG, one row per class."""
    imgs = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    H, W = imgs.shape[1] * upscale, imgs.shape[2] * upscale
    grid = np.full((rows * (H + pad) + pad, cols * (W + pad) + pad, 3), 255, dtype=np.uint8)
    for i, img in enumerate(imgs[: rows * cols]):
        r, c = divmod(i, cols)
        big = img.repeat(upscale, 0).repeat(upscale, 1)
        grid[pad + r * (H + pad) : pad + r * (H + pad) + H, pad + c * (W + pad) : pad + c * (W + pad) + W] = big
    Image.fromarray(grid).save(out)
    return out


# ------------------------------------------------------------------------------ video tasks

SAMPLE_TASKS = ("predict", "predict_backward", "interpolate", "image_to_video", "any_frames", "complete")


def _parse_frames(text: str, T: int, per_token: int) -> list[int]:
    """`--frames 0,3`: the pixel frames given to `any_frames`, whole latent frames only."""
    from ..spec import SpecError

    try:
        frames = sorted({int(f) for f in text.split(",")})
    except ValueError:
        raise SpecError("--frames", text, "give frame numbers separated by commas, e.g. 0,3") from None
    if frames[0] < 0 or frames[-1] >= T:
        raise SpecError("--frames", text, f"frames are numbered 0 to {T - 1}")
    listed = set(frames)
    for f in frames:
        group = range(f // per_token * per_token, (f // per_token + 1) * per_token)
        if not set(group) <= listed:
            raise SpecError(
                "--frames",
                text,
                f"frames come in groups of {per_token} (one latent frame each): give all of {group[0]}-{group[-1]}",
            )
    if len(frames) == T:
        raise SpecError("--frames", text, "leave at least one frame to generate")
    return frames


def _parse_region(text: str, dims: tuple[int, int, int], token: tuple[int, int, int]) -> torch.Tensor:
    """`--region T0:T1,Y0:Y1,X0:X1` (pixel frames and rows / columns, ends excluded): the box
    `complete` generates; every token it touches is generated → the (gt, gh, gw) given-mask."""
    from ..spec import SpecError

    parts = text.split(",")
    try:
        spans = [tuple(int(v) for v in part.split(":")) for part in parts]
    except ValueError:
        spans = []
    if len(spans) != 3 or any(len(sp) != 2 for sp in spans):
        raise SpecError("--region", text, "give T0:T1,Y0:Y1,X0:X1 (frames, rows, columns; ends excluded)")
    grid = [d // t for d, t in zip(dims, token)]
    given = torch.ones(*grid, dtype=torch.bool)
    box = []
    for (a, b), d, t, axis in zip(spans, dims, token, ("frames", "rows", "columns")):
        if not 0 <= a < b <= d:
            raise SpecError("--region", text, f"{axis} {a}:{b} must satisfy 0 <= start < end <= {d}")
        box.append(slice(a // t, -(-b // t)))
    given[tuple(box)] = False
    if not given.any():
        raise SpecError("--region", text, "covers the whole clip: leave something given")
    return given


def task_plan(
    cfg: dict,
    task: str,
    n_frames: int,
    size: tuple[int, int],
    k: int | None,
    frames_given: str | None = None,
    region: str | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """Check a `--task` request against the model (model.json) → (token given-mask (gt, gh, gw),
    the pixel frames the input clip fills). `frames_given` (`--frames`): any_frames' given frames;
    `region` (`--region`): the box `complete` generates (default: a centred box in every frame).
    Raises SpecError / DataError with one line."""
    from ..data.shards import DataError
    from ..models import tasks
    from ..spec import SpecError, VAESpec, VideoTasksSpec

    vt = cfg.get("video_tasks")
    if task not in SAMPLE_TASKS:
        raise SpecError("--task", task, f"unknown task (use one of {', '.join(SAMPLE_TASKS)})")
    if not vt:
        raise SpecError(
            "--task", task, f"model of job '{cfg.get('job')}' was not trained with video tasks (train.video_tasks)"
        )
    vt = VideoTasksSpec(**vt)
    if task not in vt.trained():
        raise SpecError("--task", task, f"the model was not trained for it (trained: {', '.join(vt.trained())})")
    if frames_given is not None and task != "any_frames":
        raise SpecError("--frames", frames_given, "only with --task any_frames")
    if region is not None and task != "complete":
        raise SpecError("--region", region, "only with --task complete")
    if task == "any_frames" and frames_given is None:
        raise SpecError("--task", task, "needs --frames LIST (the given frames, e.g. 0,3)")
    C, Tl, h, w = cfg["latent_shape"]
    vae = build_vae(VAESpec(**cfg["vae"]))
    pt = cfg["dit"]["patch_t"]
    per_token = vae.temporal_downsample * pt  # pixel frames per latent token frame
    T, H, W = Tl * vae.temporal_downsample, h * vae.f, w * vae.f
    gt, gh, gw = tasks.token_grid((C, Tl, h, w), cfg["dit"]["patch"], pt)
    if size != (H, W):
        raise DataError(f"--given: frames are {size[0]}x{size[1]}, the model takes {H}x{W}")
    if k is None:
        k = vt.k[1] * per_token
    if task in ("predict", "predict_backward", "interpolate"):
        if k % per_token or not vt.k[0] <= k // per_token <= vt.k[1]:
            raise SpecError(
                "--k",
                str(k),
                f"the model was trained with k in [{vt.k[0] * per_token}, "
                f"{vt.k[1] * per_token}] frames, in steps of {per_token}",
            )
    if task == "complete":
        if region is None:
            given = tasks.centre_box(gt, gh, gw)
        else:
            p = cfg["dit"]["patch"] * vae.f
            given = _parse_region(region, (T, H, W), (per_token, p, p))
        frames = list(range(T))
    else:
        if task == "any_frames":
            assert frames_given is not None  # checked above
            fm = torch.zeros(gt, dtype=torch.bool)
            fm[[f // per_token for f in _parse_frames(frames_given, T, per_token)]] = True  # whole latent frames
        else:
            fm = tasks.frame_mask(task, gt, k // per_token)
        given = fm[:, None, None].expand(gt, gh, gw).clone()
        frames = [t for t in range(T) if fm[t // per_token]]
    if n_frames not in (len(frames), T):
        want = f"{len(frames)} given frames or the whole {T}-frame clip" if len(frames) != T else f"{T} frames"
        raise DataError(f"--given: {n_frames} frames, {task} takes {want}")
    return given, frames


@torch.no_grad()
def sample_task(
    model: DiT,
    cfg: dict,
    objective: Objective,
    task: str,
    clip: np.ndarray,
    k: int | None,
    sample_spec: SampleSpec,
    device: torch.device = torch.device("cpu"),
    frames_given: str | None = None,
    region: str | None = None,
) -> np.ndarray:
    """Fill in what `task` leaves to generate around the given frames of `clip` (T or fewer frames,
    uint8 (n, H, W, 3)) → the whole clip (T, H, W, 3) uint8, given pixels at their places.
    Unconditional (the null class, no CFG): the given frames are the condition."""
    import torch.nn.functional as F

    from ..spec import VAESpec

    given, frames = task_plan(cfg, task, clip.shape[0], tuple(clip.shape[1:3]), k, frames_given, region)
    C, Tl, h, w = cfg["latent_shape"]
    vae = build_vae(VAESpec(**cfg["vae"]))
    T, H, W = Tl * vae.temporal_downsample, h * vae.f, w * vae.f
    full = np.zeros((T, H, W, 3), dtype=np.uint8)
    full[frames] = clip if clip.shape[0] == len(frames) else clip[frames]
    pixels = torch.from_numpy(full).permute(3, 0, 1, 2)[None].float() / 127.5 - 1  # (1, 3, T, H, W)
    z_given = vae.encode(pixels)
    y = torch.full((1,), model.null_class, device=device) if model.cfg.num_classes else None
    was_training = model.training
    model.eval()
    z = sample(
        objective,
        model,
        tuple(z_given.shape),
        {"y": y},
        sampler=sample_spec.sampler,
        steps=sample_spec.steps,
        cfg_scale=1.0,
        seed=sample_spec.seed,
        device=device,
        given=given[None].to(device),
        x_given=z_given.to(device),
    )
    model.train(was_training)
    out = vae.decode(z.float().cpu())
    pm = F.interpolate(given[None, None].float(), size=(T, H, W), mode="nearest") > 0.5
    out = torch.where(pm, pixels, out)  # the given pixels exactly, not their VAE round trip
    return ((out[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
