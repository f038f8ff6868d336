"""Resolution and duration buckets: the fixed set of shapes a data set is cut into.

Images keep (roughly) their aspect ratio by going to the bucket whose ratio is nearest, as in
SDXL (Podell et al. 2023, §2.3) and SD3: every bucket has about resolution² pixels, with sides a
multiple of `multiple` so that any VAE downsample × patch size divides them. Videos take F frames
at a fixed stride; a clip too short for F falls to the longest duration bucket it fills (F/2,
F/4), so short clips are used instead of dropped or padded. A batch is always drawn from one
bucket (see loader.py), so shapes never mix inside a batch.
"""

from __future__ import annotations

import math

# Width:height ratios (landscape, square, portrait), the SDXL/SD3 set trimmed to the common ones.
ASPECT_RATIOS = [(1, 1), (4, 3), (3, 4), (3, 2), (2, 3), (16, 9), (9, 16), (2, 1), (1, 2)]


def multiple_for(resolution: int) -> int:
    # 64 px at 1024 like SDXL, never finer than 8 (VAE downsample 8 or 4 × patch 2).
    return max(8, resolution // 16)


def image_buckets(resolution: int) -> list[tuple[int, int]]:
    """→ [(width, height)], the first one square."""
    m = multiple_for(resolution)
    out: list[tuple[int, int]] = []
    for w_r, h_r in ASPECT_RATIOS:
        ar = w_r / h_r
        w = max(m, round(resolution * math.sqrt(ar) / m) * m)
        h = max(m, round(resolution / math.sqrt(ar) / m) * m)
        if (w, h) not in out:
            out.append((w, h))
    return out


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    # Compare ratios in log space: 2:1 and 1:2 are equally far from 1:1.
    target = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - target))


def duration_buckets(frames: int) -> list[int]:
    """Frame counts a clip may have after sampling: F, F/2, F/4 (at least 1), longest first."""
    out = []
    for d in (1, 2, 4):
        t = max(1, frames // d)
        if t not in out:
            out.append(t)
    return out


def bucket_name(shape: tuple[int, ...]) -> str:
    """(H, W) → 'img-HxW'; (T, H, W) → 'vid-TxHxW'. Shapes are pixel shapes, height first."""
    return ("vid-" if len(shape) == 3 else "img-") + "x".join(str(s) for s in shape)
