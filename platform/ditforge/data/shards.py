"""webdataset tar shards on any fsspec URI, and the manifest that makes a data set complete.

A data set is a folder of `shard-*.tar` files plus `manifest.json`. Shards are written to local
disk, checksummed and uploaded in one PUT (or rename); the manifest is written last, so a folder
without one is an unfinished write and readers refuse it. While a write is under way, each
finished unit of work leaves a small record under `_parts/` (after its shards are up), which is
what a re-run reads to skip finished work: a shard without its record is redone, never trusted.
"""

from __future__ import annotations

import hashlib
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
PARTS = "_parts"
FORMAT_VERSION = 2


class DataError(Exception):
    """A data set problem a user can fix; the CLI prints it as one line."""


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.tar"


def write_shard(uri: str, name: str, samples: Iterable[dict], **extra) -> dict:
    """Write samples (dicts with `__key__` and extension → bytes/str/np.ndarray) as one tar shard.

    Returns its manifest entry. The upload is a single PUT (or rename), so a reader sees the whole
    shard or none of it.
    """
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / name
        n = 0
        # mtime fixed: the same samples always make the same bytes (and checksum), run after run.
        with wds.TarWriter(str(local), mtime=0.0) as sink:
            for s in samples:
                sink.write(s)
                n += 1
        entry = {"name": name, "samples": n, "bytes": local.stat().st_size, "sha256": storage.sha256_file(local),
                 **extra}
        storage.put_file(local, storage.join(uri, name))
    return entry


def write_manifest(uri: str, manifest: dict) -> None:
    manifest = {"format_version": FORMAT_VERSION, **manifest}
    manifest["total_samples"] = sum(s["samples"] for s in manifest["shards"])
    storage.write_bytes(storage.join(uri, MANIFEST), json.dumps(manifest, indent=2).encode())


def write_part(uri: str, name: str, record: dict) -> None:
    storage.write_bytes(storage.join(uri, PARTS, f"{name}.json"), json.dumps(record).encode())


def read_part(uri: str, name: str) -> dict | None:
    try:
        return json.loads(storage.read_bytes(storage.join(uri, PARTS, f"{name}.json")))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def read_parts(uri: str) -> dict[str, dict]:
    """All finished-unit records of an unfinished (or finished) write, by name."""
    out = {}
    for f in storage.listdir(storage.join(uri, PARTS)):
        if f.endswith(".json") and (rec := read_part(uri, f[: -len(".json")])) is not None:
            out[f[: -len(".json")]] = rec
    return out


def read_manifest(uri: str) -> dict:
    try:
        raw = storage.read_bytes(storage.join(uri, MANIFEST))
    except FileNotFoundError:
        raise DataError(f"{uri}: no {MANIFEST}: not a ditforge data set, or its writing did not finish") from None
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DataError(f"{uri}/{MANIFEST}: not valid JSON ({e})") from None
    if manifest.get("format_version", 1) > FORMAT_VERSION:
        raise DataError(f"{uri}/{MANIFEST}: format_version {manifest['format_version']} is newer than this "
                        f"ditforge reads ({FORMAT_VERSION}): upgrade ditforge")
    return manifest


def read_shard(uri: str, entry: dict) -> list[dict]:
    """All samples of one shard, in tar order, after checking its checksum against the manifest."""
    try:
        data = storage.read_bytes(storage.join(uri, entry["name"]))
    except FileNotFoundError:
        raise DataError(f"{uri}/{entry['name']}: listed in the manifest but missing") from None
    if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise DataError(f"{uri}/{entry['name']}: checksum does not match the manifest (shard changed or corrupt)")
    return list(iter_tar(io.BytesIO(data), entry["name"]))


def verify(uri: str) -> list[str]:
    """Names of the shards whose bytes do not match the manifest (missing ones included)."""
    bad = []
    for entry in read_manifest(uri)["shards"]:
        try:
            read_shard(uri, entry)
        except DataError:
            bad.append(entry["name"])
    return bad


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
