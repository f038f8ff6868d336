"""Sample quality with no download: a small classifier the project trains on its own generated sets.

For `shapes` (images; class = shape) and `moving-shapes` (videos; class = direction of motion) a
small CNN (2D, or 3D for clips) is trained on freshly generated samples, then scores the class-
conditional samples of a run:

- `validation/class_accuracy`: how often the classifier assigns a sample the class it was generated
  for (chance = 1 / classes);
- `validation/fd`: the Fréchet distance (FID's formula, Heusel et al. 2017) between the classifier's
  penultimate features of generated and of real samples. Only comparable between runs scored
  with the same classifier and sample count.

The classifier is a pure function of (set, input size, input frames, seed), trained in seconds on
CPU, and cached under $DITFORGE_HOME/cache/quality. It works at most at `MAX_SIZE` px and
`MAX_FRAMES` frames: shape and direction of motion are plain at 32 px and 8 frames, and 1200
training clips of 16 frames at 256 px would be 15 GB (seen: a 256 px video job's end-of-run
evaluation killed for memory). Larger samples are scored after an area downscale to that size, and
longer clips after keeping `MAX_FRAMES` evenly spaced frames (a moving-shapes clip crosses the same
path whatever its length, so 8 of 16 frames show the same motion); one classifier then serves
every resolution and length above those, trained once. Measured on one CPU thread (held-out
accuracy, time to train): shapes 0.975 in 9 s at 32 px but 0.673 in 41 s at 64 px; moving-shapes,
16 frames, 0.998 in 60 s at 32 px, about 250 s at 64 px; for a 256 px 16-frame job, the 32 px
8-frame one in 10 s, accuracy 1.000 on 200 held-out 16-frame clips at 32 px (2026-12-04, the 2-core
development machine, `train_classifier("moving-shapes", 256, 16, cache=False)`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import synthetic

VERSION = 3
MAX_SIZE, MAX_FRAMES = 32, 8
CLASSIFIER_SEED, REFERENCE_SEED = 7_001, 7_002  # neither is a training set's seed (0)


def which_set(classes: list[str] | None, frames: int) -> str | None:
    """The generated set a latent manifest's class list names, if any."""
    if frames == 1 and list(classes or []) == synthetic.CLASSES:
        return "shapes"
    if frames > 1 and list(classes or []) == getattr(synthetic, "DIRECTIONS", None):
        return "moving-shapes"
    return None


def real_pixels(
    name: str, indices: Iterable[int], resolution: int, frames: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """→ pixels (N, 3, [T,] H, W) in [-1, 1], classes (N,)."""
    xs, ys = [], []
    for i in indices:
        if name == "shapes":
            img, cls, _ = synthetic.shape_image(int(i), resolution, seed)
            arr = np.asarray(img, dtype=np.float32).transpose(2, 0, 1)  # (3, H, W)
        else:
            clip, cls, _ = synthetic.moving_shapes_video(int(i), resolution, frames, seed)
            arr = clip.astype(np.float32).transpose(3, 0, 1, 2)  # (3, T, H, W)
        xs.append(arr)
        ys.append(cls)
    return torch.from_numpy(np.stack(xs)) / 127.5 - 1, torch.tensor(ys)


class Classifier(nn.Module):
    def __init__(self, num_classes: int, video: bool, width: int = 16, size: int = MAX_SIZE, frames: int = MAX_FRAMES):
        super().__init__()
        # inputs larger than `size` px are downscaled to it; longer than `frames`, subsampled to it
        self.video, self.size, self.frames = video, size, frames
        Conv: Callable[..., nn.Module] = nn.Conv3d if video else nn.Conv2d
        # normalisation: 0.4 → 0.99 accuracy here
        Norm: Callable[..., nn.Module] = nn.BatchNorm3d if video else nn.BatchNorm2d
        s = (1, 2, 2) if video else 2  # keep time until the last layer: motion is the class
        w = width
        self.body = nn.Sequential(  # small on purpose: it trains in seconds on a shared 2-core CPU
            # Images keep full resolution in the first layer (shape detail is the class); clips
            # halve it at once (motion is the class, and there are T times more pixels).
            Conv(3, w, 3, stride=s if video else 1, padding=1),
            Norm(w),
            nn.SiLU(),
            Conv(w, 2 * w, 3, stride=s, padding=1),
            Norm(2 * w),
            nn.SiLU(),
            Conv(2 * w, 4 * w, 3, stride=s, padding=1),
            Norm(4 * w),
            nn.SiLU(),
            Conv(4 * w, 4 * w, 3, stride=2, padding=1),
            Norm(4 * w),
            nn.SiLU(),
        )
        self.head = nn.Linear(4 * w, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, [T,] H, W) → (B, 4·width) pooled features."""
        if self.video and x.shape[2] > self.frames:
            x = x[:, :, torch.linspace(0, x.shape[2] - 1, self.frames).round().long()]
        if x.shape[-1] > self.size:
            x = F.interpolate(x, size=(*x.shape[2:-2], self.size, self.size), mode="area")
        return self.body(x).flatten(2).mean(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _cache_dir() -> Path:
    home = os.environ.get("DITFORGE_HOME")
    return Path(home) / "cache" / "quality" if home else Path.home() / ".cache" / "ditforge" / "quality"


def train_classifier(
    name: str,
    resolution: int,
    frames: int = 1,
    *,
    n: int | None = None,
    epochs: int = 6,
    cache: bool = True,
    log: Callable[[str], object] = print,
) -> Classifier:
    video = name == "moving-shapes"
    classes = synthetic.DIRECTIONS if video else synthetic.CLASSES
    n = n or (1200 if video else 2000)
    # Trained on samples rendered at this size and length: the cache key, so a 256 px 16-frame job
    # reuses the 32 px 8-frame classifier.
    size, frames = min(resolution, MAX_SIZE), min(frames, MAX_FRAMES)
    key = hashlib.sha256(repr((VERSION, name, size, frames, n, epochs)).encode()).hexdigest()[:12]
    path = _cache_dir() / f"{name}-{size}px-{frames}f-{key}.pt"
    model = Classifier(len(classes), video, size=size, frames=frames)
    if cache and path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    torch.manual_seed(CLASSIFIER_SEED)
    x, y = real_pixels(name, range(n), size, frames, CLASSIFIER_SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    bs = 128
    steps = epochs * (n // bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(n)
        for b in range(n // bs):
            idx = perm[b * bs : (b + 1) * bs]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    xv, yv = real_pixels(name, range(n, n + 400), size, frames, CLASSIFIER_SEED)
    with torch.no_grad():
        acc = (model(xv).argmax(1) == yv).float().mean().item()
    log(f"quality classifier for {name} {resolution}px (at {size}px, {frames} frames): held-out accuracy {acc:.3f}")
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(model.state_dict(), tmp)
        tmp.replace(path)  # atomic: concurrent workers never read half a file
    return model


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖μa − μb‖² + tr(Σa + Σb − 2(Σa^½ Σb Σa^½)^½), in float64 via symmetric eigendecompositions."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(ca)
    sqrt_a = (v * w.clamp_min(0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(sqrt_a @ cb @ sqrt_a).clamp_min(0).sqrt().sum()
    return float(((mu_a - mu_b) ** 2).sum() + ca.trace() + cb.trace() - 2 * cross)


@torch.no_grad()
def classify(classifier: Classifier, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """pixels (N, 3, [T,] H, W) in [-1, 1] → (features (N, D), predicted classes (N,)), on the CPU."""
    feats, preds = [], []
    for chunk in pixels.split(128):
        f = classifier.features(chunk.float())
        feats.append(f.cpu())
        preds.append(classifier.head(f).argmax(1).cpu())
    return torch.cat(feats), torch.cat(preds)


@torch.no_grad()
def score_features(
    classifier: Classifier,
    feats: torch.Tensor,
    preds: torch.Tensor,
    labels: torch.Tensor,
    name: str,
    resolution: int,
    frames: int = 1,
) -> dict[str, float]:
    """Accuracy and FD of generated samples' (features, predictions) against as many real samples."""
    real, _ = real_pixels(name, range(len(feats)), resolution, frames, REFERENCE_SEED)
    real_feats = torch.cat([classifier.features(c) for c in real.split(128)])
    return {
        "validation/class_accuracy": (preds == labels.cpu()).float().mean().item(),
        "validation/fd": frechet_distance(feats, real_feats),
    }


@torch.no_grad()
def score(
    classifier: Classifier, pixels: torch.Tensor, labels: torch.Tensor, name: str, resolution: int, frames: int = 1
) -> dict[str, float]:
    """pixels (N, 3, [T,] H, W) in [-1, 1] generated for `labels` → accuracy and FD vs N real samples."""
    feats, preds = classify(classifier, pixels)
    return score_features(classifier, feats, preds, labels, name, resolution, frames)
