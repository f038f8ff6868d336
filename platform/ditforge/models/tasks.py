"""Video tasks as token masks (VDT, Lu et al. 2023: "General-purpose video diffusion transformers
via mask modeling").

One video DiT serves every task; the task is only *which latent tokens are given*. A mask is a
bool tensor over the token grid (gt, gh, gw) after patching: True = given (the clean latent of
the condition enters the transformer), False = generated (noised, and the only tokens the loss
counts). Masks are drawn from the step's seeded generator, so a resumed run draws the same ones.

Tasks (k = given latent frames, drawn from the spec's range for each sample):
  generate           nothing given (plain generation)
  predict            the first k frames given
  predict_backward   the last k frames given
  interpolate        the first k and the last k frames given
  image_to_video     the first frame given
  any_frames         a random subset of frames given (at least one given, one generated)
  complete           everything given except one or two random spatio-temporal boxes (inpainting)

Images trained beside the videos (`data.mix`) are one-frame clips (gt = 1): no frame can be given
and another generated, so they draw only from the one-frame tasks (`generate`, `complete`: a box
to fill in the image), with the mixture's weights of those two (`generate` alone if both are 0).
"""

from __future__ import annotations

import torch

TASKS = ("generate", "predict", "predict_backward", "interpolate", "image_to_video", "any_frames", "complete")
# Tasks whose conditions are whole frames (the sampler CLI takes a clip or image for them).
FRAME_TASKS = ("predict", "predict_backward", "interpolate", "image_to_video", "any_frames")
# What a one-frame clip (an image in joint image-video training) can be trained on.
ONE_FRAME_TASKS = ("generate", "complete")


def frame_mask(task: str, gt: int, k: int = 1) -> torch.Tensor:
    """(gt,) bool: which latent frames a frame task gives (deterministic tasks only)."""
    m = torch.zeros(gt, dtype=torch.bool)
    if task == "predict":
        m[:k] = True
    elif task == "predict_backward":
        m[gt - k :] = True
    elif task == "interpolate":
        m[:k] = True
        m[gt - k :] = True
    elif task == "image_to_video":
        m[0] = True
    elif task != "generate":
        raise ValueError(f"{task!r} is not a deterministic frame task")
    return m


def centre_box(gt: int, gh: int, gw: int) -> torch.Tensor:
    """(gt, gh, gw) bool: `complete` at sampling time by default: everything given except a
    centred box of half the height and width, in every frame."""
    m = torch.ones(gt, gh, gw, dtype=torch.bool)
    m[:, gh // 4 : gh // 4 + max(1, gh // 2), gw // 4 : gw // 4 + max(1, gw // 2)] = False
    return m


def _randint(lo: int, hi: int, gen: torch.Generator) -> int:
    """Uniform integer in [lo, hi], from `gen`."""
    return int(torch.randint(lo, hi + 1, (1,), generator=gen, device=gen.device).item())


def draw_one(task: str, grid: tuple[int, int, int], k_range: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """One sample's (gt, gh, gw) given-mask for `task`, random parts from `gen`."""
    gt, gh, gw = grid
    if task in ("predict", "predict_backward", "interpolate"):
        k_max = min(k_range[1], (gt - 1) // 2 if task == "interpolate" else gt - 1)
        k = _randint(min(k_range[0], k_max), k_max, gen)
        return frame_mask(task, gt, k)[:, None, None].expand(gt, gh, gw).clone()
    if task in ("generate", "image_to_video"):
        return frame_mask(task, gt)[:, None, None].expand(gt, gh, gw).clone()
    if task == "any_frames":
        m = torch.rand(gt, generator=gen, device=gen.device).cpu() < 0.5
        m[_randint(0, gt - 1, gen)] = True  # at least one given frame...
        free = (~m).nonzero().flatten()
        if len(free) == 0:  # ...and at least one generated
            m[_randint(0, gt - 1, gen)] = False
        return m[:, None, None].expand(gt, gh, gw).clone()
    if task == "complete":  # VDT's spatial-temporal completion: random boxes to fill in
        m = torch.ones(gt, gh, gw, dtype=torch.bool)
        for _ in range(_randint(1, 2, gen)):
            t0, t1 = sorted((_randint(0, gt - 1, gen), _randint(0, gt - 1, gen)))
            h, w = (
                _randint(max(1, gh // 4), max(1, 3 * gh // 4), gen),
                _randint(max(1, gw // 4), max(1, 3 * gw // 4), gen),
            )
            y, x = _randint(0, gh - h, gen), _randint(0, gw - w, gen)
            m[t0 : t1 + 1, y : y + h, x : x + w] = False
        return m
    raise ValueError(f"unknown video task {task!r} (known: {', '.join(TASKS)})")


def draw(
    weights: dict[str, float],
    k_range: tuple[int, int],
    batch: int,
    grid: tuple[int, int, int],
    gen: torch.Generator,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's masks: each sample draws its task from `weights` (probabilities over TASKS),
    then its mask. → (given (B, gt, gh, gw) bool on `device`, task index into TASKS (B,)).
    One-frame clips (gt = 1) draw from ONE_FRAME_TASKS only (see the module docstring)."""
    if grid[0] == 1:
        weights = {t: weights.get(t, 0) for t in ONE_FRAME_TASKS}
        if not any(w > 0 for w in weights.values()):
            weights = {"generate": 1.0}
    names = [t for t in TASKS if weights.get(t, 0) > 0]
    p = torch.tensor([weights[t] for t in names], dtype=torch.float64)
    picks = torch.multinomial(p.to(gen.device), batch, replacement=True, generator=gen).cpu().tolist()
    masks = torch.stack([draw_one(names[i], grid, k_range, gen) for i in picks])
    return masks.to(device), torch.tensor([TASKS.index(names[i]) for i in picks])


def token_grid(latent_shape: tuple[int, ...], patch: int, patch_t: int) -> tuple[int, int, int]:
    """(C, T, h, w) latents → the (gt, gh, gw) token grid the DiT cuts them into; an image's
    (C, h, w) is a one-frame clip, (1, gh, gw) (the DiT takes it with a temporal patch of 1)."""
    if len(latent_shape) == 3:
        C, h, w = latent_shape
        return 1, h // patch, w // patch
    C, T, h, w = latent_shape
    return T // patch_t, h // patch, w // patch
