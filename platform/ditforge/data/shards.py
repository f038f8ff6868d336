"""webdataset tar shards on any fsspec URI, and the manifest that makes a data set complete.

A data set is a folder of `shard-NNNNNN.tar` files plus `manifest.json`. Shards are written to
local disk, checksummed and uploaded; the manifest is written last, so a folder without one is
an unfinished write and readers refuse it.
"""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import webdataset as wds

from .. import storage

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class DataError(Exception):
    """A data set problem a user can fix; the CLI prints it as one line."""


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.tar"


def write_shard(uri: str, name: str, samples: Iterable[dict]) -> dict:
    """Write samples (dicts with `__key__` and extension → bytes/str/np.ndarray) as one tar shard.

    Returns its manifest entry. The upload is a single PUT (or rename), so a reader sees the whole
    shard or none of it.
    """
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / name
        n = 0
        with wds.TarWriter(str(local)) as sink:
            for s in samples:
                sink.write(s)
                n += 1
        entry = {"name": name, "samples": n, "bytes": local.stat().st_size, "sha256": storage.sha256_file(local)}
        storage.put_file(local, storage.join(uri, name))
    return entry


def write_manifest(uri: str, manifest: dict) -> None:
    manifest = {"format_version": FORMAT_VERSION, **manifest}
    manifest["total_samples"] = sum(s["samples"] for s in manifest["shards"])
    storage.write_bytes(storage.join(uri, MANIFEST), json.dumps(manifest, indent=2).encode())


def read_manifest(uri: str) -> dict:
    try:
        raw = storage.read_bytes(storage.join(uri, MANIFEST))
    except FileNotFoundError:
        raise DataError(f"{uri}: no {MANIFEST}: not a ditforge data set, or its writing did not finish") from None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise DataError(f"{uri}/{MANIFEST}: not valid JSON ({e})") from None


def read_shard(uri: str, entry: dict) -> list[dict]:
    """All samples of one shard, in tar order, after checking its checksum against the manifest."""
    import hashlib

    data = storage.read_bytes(storage.join(uri, entry["name"]))
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise DataError(f"{uri}/{entry['name']}: checksum does not match the manifest (shard changed or corrupt)")
    return list(iter_tar(io.BytesIO(data), entry["name"]))


def iter_tar(fileobj, name: str = "shard") -> Iterator[dict]:
    """Group tar members `KEY.EXT` into samples {"__key__": KEY, EXT: bytes}, webdataset-style."""
    current: dict | None = None
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                payload = tar.extractfile(member).read()
                if current is None or current["__key__"] != key:
                    if current is not None:
                        yield current
                    current = {"__key__": key}
                current[ext] = payload
    except tarfile.TarError as e:
        raise DataError(f"{name}: unreadable tar ({e})") from None
    if current is not None:
        yield current


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def npy_load(b: bytes) -> np.ndarray:
    # allow_pickle=False: a shard from storage must never be able to run code.
    return np.load(io.BytesIO(b), allow_pickle=False)
