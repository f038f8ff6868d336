"""Sources → webdataset pixel shards + manifest, written in parallel by Ray tasks.

Sources: a folder (or fsspec URI) of images and/or videos, an existing webdataset (a folder of
.tar files, one .tar, or a brace pattern `.../shard-{000000..000099}.tar`), or a generated set
(`shapes`, `moving-shapes`). The driver lists the source and cuts it into units of
`shard_size` inputs; one Ray task per unit decodes, fits and writes that unit's shards, one per
bucket it met (so every shard holds one shape), then leaves a record under `_parts/`. A re-run
skips units whose record matches; the manifest is written last, from the records.

Samples: `png` (H, W, 3) for images, `frames.npy` (T, H, W, 3) uint8 for videos, `cls` (class
id, -1 when the source has none), `txt` (caption, may be empty), `json` (where it came from).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import IO, Any

import numpy as np

from .. import storage
from . import buckets, media, shards, synthetic

INGEST_VERSION = 1
GENERATED = ("shapes", "moving-shapes")


@dataclass(frozen=True)
class Settings:
    source: str
    resolution: int = 32
    fit: str = "crop"  # "crop": resize + centre-crop to a square; "bucket": nearest aspect-ratio bucket
    frames: int = 8  # videos: at most F frames...
    stride: int = 2  # ...taken every `stride` source frames; shorter clips go to shorter duration buckets
    shard_size: int = 256
    limit: int | None = None  # generated sets: how many; folders and webdatasets: the first N inputs
    seed: int = 0

    def check(self) -> None:
        if self.fit not in ("crop", "bucket"):
            raise shards.DataError(f"--fit: '{self.fit}' is not 'crop' or 'bucket'")
        for k in ("resolution", "frames", "stride", "shard_size"):
            if getattr(self, k) < 1:
                raise shards.DataError(f"--{k.replace('_', '-')}: must be at least 1, got {getattr(self, k)}")
        if self.resolution % 8:
            raise shards.DataError(
                f"--resolution: {self.resolution} is not a multiple of 8 (VAE × patch must divide it)"
            )
        if self.source in GENERATED and not self.limit:
            raise shards.DataError(f"--limit: say how many '{self.source}' samples to generate")


# ----------------------------------------------------------------------------------- planning


def _root(src: str) -> str:
    return storage.absolute(src if "://" in src else f"file://{src}")


def _webdataset_urls(src: str) -> list[str] | None:
    """The .tar URLs when `src` is a webdataset, else None."""
    if "{" in src:
        import braceexpand

        return [_root(u) for u in braceexpand.braceexpand(src)]
    if src.endswith(".tar"):
        return [_root(src)]
    root = _root(src)
    names = storage.listdir(root)
    if names and all(n.endswith(".tar") or n in (shards.MANIFEST, shards.PARTS) or n.startswith(".") for n in names):
        return [storage.join(root, n) for n in names if n.endswith(".tar")]
    return None


def plan(s: Settings) -> tuple[list[dict], list[dict], list[str], str]:
    """→ (units, skipped at listing time, class names, source kind). Deterministic for a source."""
    if s.source in GENERATED:
        n = s.limit
        assert n is not None  # Settings.check: a generated set needs --limit
        units: list[dict[str, Any]] = [
            {"kind": s.source, "range": [a, min(n, a + s.shard_size)]} for a in range(0, n, s.shard_size)
        ]
        classes = synthetic.CLASSES if s.source == "shapes" else synthetic.DIRECTIONS
        return units, [], classes, s.source
    tars = _webdataset_urls(s.source)
    if tars is not None:
        if not tars:
            raise shards.DataError(f"{s.source}: no .tar shards found")
        return _webdataset_units(tars, s.limit), [], [], "webdataset"
    root = _root(s.source)
    fs, base = storage.filesystem(root)
    if not fs.isdir(base):
        raise shards.DataError(
            f"{s.source}: not a folder, a .tar / webdataset pattern, or one of {', '.join(GENERATED)}"
        )
    files = sorted(p[len(base) :].lstrip("/") for p in fs.find(base))
    files = [f for f in files if not f.startswith(shards.PARTS)]
    stems = {f.rsplit(".", 1)[0] for f in files if f.lower().endswith(".txt")}
    items, skipped = [], []
    for rel in files:
        ext = rel.rsplit(".", 1)[-1].lower() if "." in rel.rsplit("/", 1)[-1] else ""
        if ext in media.CAPTION_EXTS:
            continue  # read together with its image/video
        if ext not in media.IMAGE_EXTS | media.VIDEO_EXTS:
            skipped.append({"item": rel, "reason": f"unsupported extension '.{ext}'" if ext else "no extension"})
            continue
        stem = rel.rsplit(".", 1)[0]
        items.append(
            {
                "rel": rel,
                "kind": "video" if ext in media.VIDEO_EXTS else "image",
                "caption": f"{stem}.txt" if stem in stems else None,
            }
        )
    if s.limit:
        items = items[: s.limit]
    if not items:
        raise shards.DataError(
            f"{s.source}: no images ({', '.join(sorted(media.IMAGE_EXTS))}) or videos "
            f"({', '.join(sorted(media.VIDEO_EXTS))}) found"
        )
    # Class = the top-level sub-folder, when there is one (ImageNet layout: train/<class>/<file>).
    classes = sorted({it["rel"].split("/", 1)[0] for it in items if "/" in it["rel"]})
    index = {c: i for i, c in enumerate(classes)}
    for i, it in enumerate(items):
        it["key"] = f"{i:08d}"
        it["cls"] = index.get(it["rel"].split("/", 1)[0], -1) if "/" in it["rel"] else -1
    units = [
        {"kind": "folder", "root": root, "items": items[a : a + s.shard_size]}
        for a in range(0, len(items), s.shard_size)
    ]
    return units, skipped, classes, "folder"


def _webdataset_units(tars: list[str], limit: int | None) -> list[dict]:
    """One unit per tar; with a limit, the first `limit` samples in (tar, member) order: the tars
    are counted one after another, and the last one used is cut with `take`."""
    if not limit:
        return [{"kind": "webdataset", "tar": t} for t in tars]
    units, left = [], limit
    for t in tars:
        if left <= 0:
            break
        try:
            n = storage.retry(_count_samples, t, left)
        except (shards.DataError, OSError):
            n = 1  # unreadable: the unit records it as one skipped input, as without a limit
        units.append({"kind": "webdataset", "tar": t, **({"take": left} if n >= left else {})})
        left -= n
    return units


def _count_samples(tar_uri: str, most: int) -> int:
    """Samples in a tar, counting no further than `most` (streamed: a big tar is not downloaded
    to take its first few samples)."""
    fs, path = storage.filesystem(tar_uri)
    with fs.open(path, "rb") as f:
        return sum(1 for _ in itertools.islice(shards.iter_tar(f, tar_uri), most))


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------- one unit


def _safe_key(key: str) -> str:
    # webdataset splits a member name at the first dot: keys must not contain one (or a slash).
    return re.sub(r"[^A-Za-z0-9_-]", "_", key)


def _sample(key: str, pixels: np.ndarray, cls: int, txt: str, meta: dict | None) -> tuple[dict, tuple[int, ...]]:
    """→ (sample, pixel shape without channels: (H, W) or (T, H, W))."""
    s: dict[str, str | bytes] = {"__key__": key, "cls": str(cls), "txt": txt}
    if pixels.ndim == 4:
        s["frames.npy"] = shards.npy_bytes(pixels)  # (T, H, W, 3) uint8
    else:
        s["png"] = media.png(pixels)
    if meta:
        s["json"] = json.dumps(meta)
    return s, pixels.shape[:-1]


def _unit_samples(unit: dict, s: Settings, skipped: list[dict]) -> Iterator[tuple[dict, tuple[int, ...]]]:
    """Yield samples of one unit; bad inputs go to `skipped` with the reason, never raise."""
    kind = unit["kind"]
    if kind == "shapes":
        for i in range(*unit["range"]):
            img, cls, cap = synthetic.shape_image(i, s.resolution, s.seed)
            yield _sample(f"{i:08d}", np.asarray(img), cls, cap, None)
    elif kind == "moving-shapes":
        for i in range(*unit["range"]):
            clip, cls, cap = synthetic.moving_shapes_video(i, s.resolution, s.frames, s.seed)
            yield _sample(f"{i:08d}", clip, cls, cap, None)
    elif kind == "folder":
        for it in unit["items"]:
            try:
                data = storage.read_bytes(storage.join(unit["root"], it["rel"]))
                cap = (
                    media.caption(storage.read_bytes(storage.join(unit["root"], it["caption"])))
                    if it["caption"]
                    else ""
                )
                if it["kind"] == "video":
                    pixels = media.video(data, s.resolution, s.fit, s.frames, s.stride)
                else:
                    pixels = media.image(data, s.resolution, s.fit)
            except media.BadSample as e:
                skipped.append({"item": it["rel"], "reason": str(e)})
                continue
            except OSError as e:  # unreadable file (permissions, vanished): that one input only
                skipped.append({"item": it["rel"], "reason": f"unreadable ({type(e).__name__}: {str(e)[:80]})"})
                continue
            yield _sample(it["key"], pixels, it["cls"], cap, {"src": it["rel"]})
    elif kind == "webdataset":
        yield from _webdataset_samples(unit["tar"], s, skipped, unit.get("take"))
    else:
        raise ValueError(kind)


def _read_webdataset_tar(fileobj: IO[bytes], url: str, take: int | None = None) -> list[dict]:
    """A source tar's samples through webdataset's own tar iterator and key grouping (a sample is
    the members sharing a key; extensions lower-cased), its first `take` only when given."""
    import tarfile

    from webdataset.tariterators import group_by_keys, tar_file_iterator

    try:
        files = ({**f, "__url__": url} for f in tar_file_iterator(fileobj))
        return list(itertools.islice(group_by_keys(files), take))
    except (tarfile.TarError, ValueError, EOFError) as e:
        raise shards.DataError(f"{url}: {e}") from None


def _webdataset_samples(
    tar_uri: str, s: Settings, skipped: list[dict], take: int | None = None
) -> Iterator[tuple[dict, tuple[int, ...]]]:
    name = tar_uri.rsplit("/", 1)[-1]
    fs, path = storage.filesystem(tar_uri)

    def read() -> list[dict]:
        with fs.open(path, "rb") as f:
            return _read_webdataset_tar(f, name, take)

    try:
        samples = storage.retry(read)
    except (shards.DataError, OSError) as e:
        skipped.append({"item": name, "reason": f"unreadable shard ({str(e)[:100]})"})
        return
    for smp in samples:
        item = f"{name}:{smp['__key__']}"
        exts = {k.lower(): k for k in smp if not k.startswith("__")}  # not __key__, __url__
        img = next((exts[e] for e in ("jpg", "jpeg", "png", "webp") if e in exts), None)
        vid = next((exts[e] for e in ("mp4", "webm", "gif") if e in exts), None)
        try:
            if img is not None:
                pixels = media.image(smp[img], s.resolution, s.fit)
            elif vid is not None:
                pixels = media.video(smp[vid], s.resolution, s.fit, s.frames, s.stride)
            else:
                raise media.BadSample(f"no image or video member (has: {', '.join(sorted(exts)) or 'nothing'})")
            txt_key = next((exts[e] for e in ("txt", "caption") if e in exts), None)
            cap = media.caption(smp[txt_key]) if txt_key else ""
            cls_key = next((exts[e] for e in ("cls", "class", "label") if e in exts), None)
            try:
                cls = int(smp[cls_key].decode().strip()) if cls_key else -1
            except ValueError:
                raise media.BadSample(f"'{cls_key}' is not an integer class id") from None
        except media.BadSample as e:
            skipped.append({"item": item, "reason": str(e)})
            continue
        yield _sample(_safe_key(smp["__key__"]), pixels, cls, cap, {"src": item})


def ingest_unit(out: str, index: int, unit: dict, s: Settings, digest: str) -> dict:
    """Process one unit: shards by bucket, then the `_parts` record that marks it finished."""
    skipped: list[dict] = []
    by_bucket: dict[str, list[dict]] = {}
    shapes: dict[str, list[int]] = {}
    for smp, shape in _unit_samples(unit, s, skipped):
        name = buckets.bucket_name(shape)
        by_bucket.setdefault(name, []).append(smp)
        shapes[name] = list(shape)
    entries = []
    for name in sorted(by_bucket):
        entries.append(
            shards.write_shard(out, f"shard-{index:06d}-{name}.tar", by_bucket[name], bucket=name, shape=shapes[name])
        )
    n_in = (
        len(unit["items"])
        if unit["kind"] == "folder"
        else (
            unit["range"][1] - unit["range"][0]
            if "range" in unit
            else sum(e["samples"] for e in entries) + len(skipped)
        )
    )
    record = {"unit": index, "digest": digest, "shards": entries, "skipped": skipped, "inputs": n_in}
    shards.write_part(out, f"unit-{index:06d}", record)
    return record


# ------------------------------------------------------------------------------------ driver


def ingest(
    source: str,
    out: str,
    *,
    resolution: int = 32,
    fit: str = "crop",
    frames: int = 8,
    stride: int = 2,
    shard_size: int = 256,
    limit: int | None = None,
    seed: int = 0,
    progress: bool = True,
    ray_fallback: Callable[[], str | None] | None = None,
) -> dict:
    """Ingest `source` into shards + manifest at `out`; resumes a previous run's finished units.
    Ray starts only when there is work (bad input fails first, a finished ingest returns at once);
    `ray_fallback`: see `ray_session`."""
    import ray
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .parallel import ray_session

    s = Settings(source, resolution, fit, frames, stride, shard_size, limit, seed)
    s.check()
    out = storage.absolute(out)
    storage.check(out)  # a bad --out or source URI fails now, before anything is read or written
    if "://" in source:
        storage.check(source)
    units, listing_skipped, classes, kind = plan(s)
    digests = [_digest({"unit": u, "settings": asdict(s), "version": INGEST_VERSION}) for u in units]
    plan_digest = _digest(digests)
    try:
        old = shards.read_manifest(out)
        if old.get("plan_digest") == plan_digest:
            return old  # this exact ingest already finished
        storage.remove(storage.join(out, shards.MANIFEST))  # another data set is being written here now
    except shards.DataError:
        pass

    done = {}
    for i, d in enumerate(digests):
        rec = shards.read_part(out, f"unit-{i:06d}")
        if rec is not None and rec.get("digest") == d:
            done[i] = rec
    todo = [i for i in range(len(units)) if i not in done]
    total = sum(_unit_inputs(u) for u in units)
    cols = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
    ]
    with Progress(*cols, console=Console(stderr=True), disable=not progress, transient=True) as bar:
        task = bar.add_task(
            f"ingest {kind} → {out}", total=total, rate="", completed=sum(_unit_inputs(units[i]) for i in done)
        )
        if todo:
            with ray_session(fallback=ray_fallback):
                remote = ray.remote(num_cpus=1, max_retries=2)(ingest_unit)
                pending = {remote.remote(out, i, units[i], s, digests[i]): i for i in todo}
                t0, n_new = time.perf_counter(), 0
                while pending:
                    ready, _ = ray.wait(list(pending), num_returns=1)
                    for ref in ready:
                        i = pending.pop(ref)
                        done[i] = ray.get(ref)
                        n_new += _unit_inputs(units[i])
                        bar.update(
                            task,
                            advance=_unit_inputs(units[i]),
                            rate=f"{n_new / (time.perf_counter() - t0):.0f} samples/s",
                        )

    entries = [e for i in range(len(units)) for e in done[i]["shards"]]
    skipped = listing_skipped + [x for i in range(len(units)) for x in done[i]["skipped"]]
    bucket_counts: Counter = Counter()
    bucket_shapes = {}
    for e in entries:
        bucket_counts[e["bucket"]] += e["samples"]
        bucket_shapes[e["bucket"]] = e["shape"]
    manifest = {
        "kind": "pixels",
        "ingest_version": INGEST_VERSION,
        "source": source,
        "source_kind": kind,
        "settings": asdict(s),
        "plan_digest": plan_digest,
        "resolution": resolution,
        "fit": fit,
        "frames": frames,
        "stride": stride,
        "channels": 3,
        "classes": classes,
        "buckets": {b: {"shape": bucket_shapes[b], "samples": n} for b, n in sorted(bucket_counts.items())},
        "skipped_count": len(skipped),
        "skipped": skipped,
        "shards": entries,
    }
    if not entries:
        raise shards.DataError(
            f"{source}: every input was skipped ({len(skipped)}), e.g. {skipped[0]['item']}: {skipped[0]['reason']}"
            if skipped
            else f"{source}: no inputs"
        )
    shards.write_manifest(out, manifest)
    return shards.read_manifest(out)


def _unit_inputs(unit: dict) -> int:
    if "range" in unit:
        return unit["range"][1] - unit["range"][0]
    if unit["kind"] == "folder":
        return len(unit["items"])
    if "take" in unit:
        return unit["take"]
    return 1  # a webdataset tar: its sample count is unknown until it is read


def ingest_shapes(
    out: str, *, limit: int = 2048, resolution: int = 32, shard_size: int = 256, seed: int = 0, progress: bool = True
) -> dict:
    """The generated `shapes` set (the demo's data)."""
    return ingest(
        "shapes", out, limit=limit, resolution=resolution, shard_size=shard_size, seed=seed, progress=progress
    )
