"""Sources → webdataset pixel shards + manifest. (Only the generated `shapes` set for now.)"""

from __future__ import annotations

import io

from rich.progress import Progress

from . import shards, synthetic


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def ingest_shapes(out: str, *, limit: int = 2048, resolution: int = 32, shard_size: int = 256, seed: int = 0,
                  progress: bool = True) -> dict:
    """Generate `limit` shapes images into shards at `out`. An existing complete set with the same
    settings is reused rather than rewritten."""
    settings = {"source": "shapes", "resolution": resolution, "limit": limit, "shard_size": shard_size, "seed": seed}
    try:
        old = shards.read_manifest(out)
        if old.get("settings") == settings:
            return old
    except shards.DataError:
        pass
    entries = []
    n_shards = (limit + shard_size - 1) // shard_size
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"ingest shapes → {out}", total=limit)
        for s in range(n_shards):
            idx = range(s * shard_size, min(limit, (s + 1) * shard_size))

            def samples(idx=idx):
                for i in idx:
                    img, cls, caption = synthetic.shape_image(i, resolution, seed)
                    yield {"__key__": f"{i:08d}", "png": _png(img), "cls": str(cls), "txt": caption}
                    bar.advance(task)

            entries.append(shards.write_shard(out, shards.shard_name(s), samples()))
    manifest = {"kind": "pixels", "settings": settings, "resolution": resolution, "channels": 3,
                "classes": synthetic.CLASSES, "shards": entries}
    shards.write_manifest(out, manifest)
    return shards.read_manifest(out)
