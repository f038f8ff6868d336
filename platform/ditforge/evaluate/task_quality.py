"""Per-task quality of a video-task model (VDT mask modeling), with no download.

Held-out moving-shapes clips (evaluate/quality.py's reference seed, never a training seed) have a
known truth: each task gets its conditions from a clip, the model fills in the rest, and the
generated pixels are compared with the true ones:

- `validation/tasks/<task>/psnr`: PSNR in dB (peak 255) over the generated pixels only, mean over clips;
- `validation/tasks/<task>/baseline_psnr`: the same for a trivial answer that needs no model: each missing
  frame copies the nearest given frame, or blends the two given frames around it linearly
  (prediction: copy the last given frame; interpolation: linear blend; image-to-video: repeat the
  image); `complete` fills each frame's hole with the mean colour of its given pixels;
- `validation/tasks/<task>/direction_accuracy` (with the 3D classifier of evaluate/quality.py): how often the
  classifier reads the clip's true direction of motion from the generated frames alone (and
  `..._baseline` for the baseline's frames).

Samples are drawn with the null class (no CFG): what the model continues must come from the given
frames, not from a label that names the direction.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from ..models import tasks
from ..objectives.samplers import sample
from . import quality

if TYPE_CHECKING:
    from ..models.dit import DiT
    from ..models.vae import VAE
    from ..objectives import Objective
    from ..spec import SampleSpec

EVAL_TASKS = ("predict", "predict_backward", "interpolate", "image_to_video", "any_frames", "complete")


def eval_mask(task: str, grid: tuple[int, int, int], k: int) -> torch.Tensor:
    """The fixed (gt, gh, gw) given-mask a task is scored with (random tasks get a fixed pattern:
    any_frames = every other frame from the first; complete = a centred hole in every frame)."""
    gt, gh, gw = grid
    if task == "complete":
        return tasks.centre_box(gt, gh, gw)
    if task == "any_frames":
        m = torch.zeros(gt, dtype=torch.bool)
        m[::2] = True
    else:
        k = min(k, (gt - 1) // 2 if task == "interpolate" else gt - 1)
        m = tasks.frame_mask(task, gt, max(k, 1))
    return m[:, None, None].expand(gt, gh, gw).clone()


def pixel_mask(given: torch.Tensor, pixel_shape: tuple[int, ...]) -> torch.Tensor:
    """Token mask (N, gt, gh, gw) → (N, 1, T, H, W) bool over pixels (nearest: each token covers a block)."""
    return F.interpolate(given[:, None].float(), size=pixel_shape, mode="nearest") > 0.5


def baseline(task: str, pixels: torch.Tensor, pmask: torch.Tensor) -> torch.Tensor:
    """The no-model answer (see module doc). pixels (N, 3, T, H, W), pmask (N, 1, T, H, W) given."""
    out = pixels.clone()
    if task == "complete":
        m = pmask.float()
        mean = (pixels * m).sum((3, 4), keepdim=True) / m.sum((3, 4), keepdim=True).clamp_min(1)
        return torch.where(pmask, pixels, mean.expand_as(pixels))
    T = pixels.shape[2]
    for n in range(pixels.shape[0]):
        known = [t for t in range(T) if pmask[n, 0, t].all()]
        for t in range(T):
            if t in known:
                continue
            before, after = [s for s in known if s < t], [s for s in known if s > t]
            if before and after:  # linear blend of the given frames around t
                a, b = before[-1], after[0]
                w = (t - a) / (b - a)
                out[n, :, t] = (1 - w) * pixels[n, :, a] + w * pixels[n, :, b]
            else:  # copy the nearest given frame
                out[n, :, t] = pixels[n, :, before[-1] if before else after[0]]
    return out


def psnr(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """(N,) PSNR in dB over the pixels `where` (N, 1, T, H, W) is True; a, b in [-1, 1]."""
    err = ((a.clamp(-1, 1) - b.clamp(-1, 1)) * 127.5) ** 2
    w = where.float().expand_as(err)
    mse = (err * w).flatten(1).sum(1) / w.flatten(1).sum(1).clamp_min(1)
    return 10 * torch.log10(255.0**2 / mse.clamp_min(1e-6))


def generated_frames(pixels: torch.Tensor, pmask: torch.Tensor) -> torch.Tensor:
    """The frames that hold any generated pixel, in order (the same for every clip of a task)."""
    keep = (~pmask).flatten(3).any(-1)[0, 0]  # (T,)
    return pixels[:, :, keep]


@torch.no_grad()
def score_tasks(
    model: DiT,
    objective: Objective,
    vae: VAE,
    task_names: Collection[str],
    latent_shape: tuple[int, ...],
    resolution: int,
    frames: int,
    sample_spec: SampleSpec,
    k: int,
    clips: int,
    device: torch.device,
    classifier: quality.Classifier | None = None,
    bf16: bool = False,
) -> tuple[dict[str, float], dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """→ (metrics, examples): metrics as in the module doc; examples[task] = (generated, truth,
    pixel given-mask) for the first clips, for `task_gifs`."""
    truth, labels = quality.real_pixels("moving-shapes", range(clips), resolution, frames, quality.REFERENCE_SEED)
    z_true = vae.encode(truth)  # (N, C, T', h, w)
    grid = tasks.token_grid(tuple(z_true.shape[1:]), model.cfg.patch, model.cfg.patch_t)
    y = torch.full((clips,), model.null_class, device=device) if model.cfg.num_classes else None
    metrics: dict[str, float] = {}
    examples: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    was_training = model.training
    model.eval()
    for task in [t for t in EVAL_TASKS if t in task_names]:
        given = eval_mask(task, grid, k)[None].expand(clips, *grid).clone()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            z = sample(
                objective,
                model,
                tuple(z_true.shape),
                {"y": y},
                sampler=sample_spec.sampler,
                steps=sample_spec.steps,
                cfg_scale=1.0,
                seed=sample_spec.seed,
                device=device,
                given=given.to(device),
                x_given=z_true.to(device),
            )
        gen = vae.decode(z.float().cpu())
        pm = pixel_mask(given, tuple(truth.shape[2:]))
        gen = torch.where(pm, truth, gen)  # given pixels are the condition itself
        base = baseline(task, truth, pm)
        metrics[f"validation/tasks/{task}/psnr"] = psnr(gen, truth, ~pm).mean().item()
        metrics[f"validation/tasks/{task}/baseline_psnr"] = psnr(base, truth, ~pm).mean().item()
        if classifier is not None:
            for name, px in (("direction_accuracy", gen), ("direction_accuracy_baseline", base)):
                logits = classifier(generated_frames(px, pm))
                metrics[f"validation/tasks/{task}/{name}"] = (logits.argmax(1) == labels).float().mean().item()
        examples[task] = (gen[:4], truth[:4], pm[:4])
    model.train(was_training)
    return metrics, examples


def task_gif(
    generated: torch.Tensor, truth: torch.Tensor, pmask: torch.Tensor, out: str, upscale: int | None = None
) -> str:
    """One GIF: a row per clip, [generated | truth]; given frames get a green outline, and in
    partly given frames the generated region is outlined in red. Small clips are enlarged to about
    96 px (`upscale`, by default 96 // size): a 16 px clip is unreadable in the MLflow UI, and a
    256 px clip enlarged 3x made a GIF that took PIL 3 s per task to write."""
    from PIL import Image

    def u8(x: torch.Tensor) -> np.ndarray:
        return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).numpy()  # (N, T, H, W, 3)

    g, t, m = u8(generated), u8(truth), pmask[:, 0].numpy()  # m (N, T, H, W)
    N, T, H, W, _ = g.shape
    upscale = upscale or max(1, 96 // max(H, W))
    pad = 2
    frames = []
    for ti in range(T):
        canvas = np.full((N * (H * upscale + pad) + pad, 2 * (W * upscale + pad) + pad, 3), 255, np.uint8)
        for n in range(N):
            for col, clip in enumerate((g, t)):
                img = clip[n, ti].copy()
                given = m[n, ti]
                if given.all():
                    img[0, :], img[-1, :], img[:, 0], img[:, -1] = (0, 255, 0), (0, 255, 0), (0, 255, 0), (0, 255, 0)
                elif given.any():  # the edge of the generated region
                    hole = ~given
                    edge = hole & ~(
                        np.roll(hole, 1, 0) & np.roll(hole, -1, 0) & np.roll(hole, 1, 1) & np.roll(hole, -1, 1)
                    )
                    img[edge] = (255, 0, 0)
                big = img.repeat(upscale, 0).repeat(upscale, 1)
                y0, x0 = pad + n * (H * upscale + pad), pad + col * (W * upscale + pad)
                canvas[y0 : y0 + H * upscale, x0 : x0 + W * upscale] = big
        frames.append(Image.fromarray(canvas))
    frames[0].save(out, save_all=True, append_images=frames[1:], duration=200, loop=0)
    return out
