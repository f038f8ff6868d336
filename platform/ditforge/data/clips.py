"""Reading and writing whole clips as (T, H, W, 3) uint8 arrays, for `ditforge sample --task`:
`.npy`, images (one frame), and videos through PyAV (mp4 / webm / gif in, gif / mp4 H.264 out).
Nothing is resized: a clip that does not fit the model is the caller's error to word."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .media import IMAGE_EXTS, VIDEO_EXTS
from .shards import DataError

OUT_EXTS = ("gif", "mp4", "npy")


def read_clip(path: str | Path) -> np.ndarray:
    """→ (T, H, W, 3) uint8; DataError (one line naming the file) when it cannot be read."""
    p = Path(path)
    ext = p.suffix.lower().lstrip(".")
    if not p.is_file():
        raise DataError(f"--given {path}: no such file")
    try:
        if ext == "npy":
            arr = np.load(p, allow_pickle=False)  # no pickles: a .npy must never run code
        elif ext in IMAGE_EXTS:
            from PIL import Image

            with Image.open(p) as img:
                arr = np.asarray(img.convert("RGB"))[None]
        elif ext in VIDEO_EXTS:
            import av

            with av.open(str(p)) as container:
                arr = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
        else:
            raise DataError(
                f"--given {path}: unknown extension '.{ext}' (use .npy, an image "
                f"({', '.join(sorted(IMAGE_EXTS))}) or a video ({', '.join(sorted(VIDEO_EXTS))}))"
            )
    except DataError:
        raise
    except Exception as e:  # numpy, PIL and av raise many types for broken files
        raise DataError(f"--given {path}: cannot read ({type(e).__name__}: {' '.join(str(e).split())[:100]})") from None
    if arr.ndim == 3 and ext == "npy":
        arr = arr[None]  # one frame (H, W, 3)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise DataError(f"--given {path}: expected uint8 frames (T, H, W, 3), got {arr.dtype} {tuple(arr.shape)}")
    return arr


def write_clip(frames: np.ndarray, out: str | Path, fps: int = 8) -> str:
    """(T, H, W, 3) uint8 → OUT; its extension picks the format (.gif, .mp4 H.264, .npy)."""
    out = Path(out)
    ext = out.suffix.lower().lstrip(".")
    if ext == "npy":
        np.save(out, frames)
    elif ext == "gif":
        from PIL import Image

        imgs = [Image.fromarray(f) for f in frames]
        imgs[0].save(out, save_all=True, append_images=imgs[1:], duration=1000 // fps, loop=0)
    elif ext == "mp4":
        import av

        T, H, W, _ = frames.shape
        # yuv420p (what every player decodes) needs even sides: pad by repeating the edge.
        frames = np.pad(frames, ((0, 0), (0, H % 2), (0, W % 2), (0, 0)), mode="edge")
        with av.open(str(out), mode="w") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
            stream.options = {"crf": "12"}
            for f in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    else:
        raise ValueError(f"unknown output extension '.{ext}'")
    return str(out)
