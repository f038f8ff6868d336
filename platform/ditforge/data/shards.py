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
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from .. import storage

if TYPE_CHECKING:
    import fsspec

MANIFEST = "manifest.json"
PARTS = "_parts"
FORMAT_VERSION = 2


class DataError(Exception):
    """A data set problem a user can fix; the CLI prints it as one line."""


class BadShard(DataError):
    """One shard cannot be used (missing, truncated, changed, not a tar). `reason` is a short
    name for metrics: missing_shard, truncated_shard, checksum_mismatch or unreadable_shard."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.tar"


def write_shard(uri: str, name: str, samples: Iterable[dict], **extra: Any) -> dict:
    """Write samples (dicts with `__key__` and extension → bytes/str) as one webdataset tar shard.

    Returns its manifest entry (plus `extra` fields). The upload is a single PUT (or rename), so a
    reader sees the whole shard or none of it.
    """
    import webdataset as wds

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / name
        n = 0
        # webdataset's own writer. mtime 0 (an int): the same samples always make the same bytes
        # and checksum, run after run, and no member needs a pax header (a float mtime would add
        # a 1 KB one per member), so the reader's fast path reads every shard we write.
        with open(local, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0, user="", group="") as tar:
            for s in samples:
                tar.write(
                    {k: v if k == "__key__" else v.encode() if isinstance(v, str) else bytes(v) for k, v in s.items()}
                )
                n += 1
        entry = {
            "name": name,
            "samples": n,
            "bytes": local.stat().st_size,
            "sha256": storage.sha256_file(local),
            **extra,
        }
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
        raise DataError(
            f"{uri}/{MANIFEST}: format_version {manifest['format_version']} is newer than this "
            f"ditforge reads ({FORMAT_VERSION}): upgrade ditforge"
        )
    return manifest


def read_shard(uri: str, entry: dict, fs: tuple[fsspec.AbstractFileSystem, str] | None = None) -> list[dict]:
    """All samples of one shard, in tar order, after checking its checksum against the manifest.
    `fs`: the (filesystem, root path) of `uri`, when the caller reads many shards (an S3
    filesystem costs ~0.1 s to set up: more than reading a 5 MB shard over loopback)."""
    try:
        if fs is None:
            data = storage.read_bytes(storage.join(uri, entry["name"]))
        else:
            data = storage.retry(fs[0].cat_file, f"{fs[1].rstrip('/')}/{entry['name']}")
    except FileNotFoundError:
        raise BadShard("missing_shard", f"{uri}/{entry['name']}: listed in the manifest but missing") from None
    return parse_shard(uri, entry, data)


def parse_shard(uri: str, entry: dict, data: bytes) -> list[dict]:
    """A shard's bytes → its samples, after the checksum check; BadShard says what is wrong."""
    where = f"{uri}/{entry['name']}"
    if len(data) < entry["bytes"]:
        raise BadShard(
            "truncated_shard",
            f"{where}: truncated ({len(data)} of {entry['bytes']} bytes); checksum does not match the manifest",
        )
    if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise BadShard("checksum_mismatch", f"{where}: checksum does not match the manifest (shard changed or corrupt)")
    try:
        return list(iter_tar(data, entry["name"]))
    except DataError as e:  # written that way: the checksum matches a broken tar
        raise BadShard("unreadable_shard", f"{where}: {e}") from None


def verify(uri: str) -> list[str]:
    """Names of the shards whose bytes do not match the manifest (missing ones included)."""
    bad = []
    for entry in read_manifest(uri)["shards"]:
        try:
            read_shard(uri, entry)
        except DataError:
            bad.append(entry["name"])
    return bad


def iter_tar(data: bytes | IO[bytes], name: str = "shard") -> Iterator[dict]:
    """Group tar members `KEY.EXT` into samples {"__key__": KEY, EXT: bytes}, webdataset-style.
    `data`: the whole tar as bytes (fast path), or a file object."""
    if isinstance(data, (bytes, bytearray)):
        fast = _members_fast(data)
        members = fast if fast is not None else _members(io.BytesIO(data), name)
    else:
        members = _members(data, name)
    current: dict | None = None
    for member, payload in members:
        key, _, ext = member.partition(".")
        if current is None or current["__key__"] != key:
            if current is not None:
                yield current
            current = {"__key__": key}
        current[ext] = payload
    if current is not None:
        yield current


def _members(fileobj: IO[bytes], name: str) -> Iterator[tuple[str, bytes]]:
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
            for member in tar:
                if member.isfile():
                    f = tar.extractfile(member)
                    assert f is not None  # a regular file always has its data
                    yield member.name, f.read()
    except tarfile.TarError as e:
        raise DataError(f"{name}: unreadable tar ({e})") from None


def _members_fast(data: bytes) -> list[tuple[str, bytes]] | None:
    """Regular-file members read straight from the ustar header blocks, honouring pax extended
    headers (Python's tarfile, and so webdataset, writes one per member); tarfile itself spends
    ~10x longer per member. None when anything else shows up: the caller then uses tarfile."""
    out: list[tuple[str, bytes]] = []
    pos, view = 0, memoryview(data)
    pax: dict[bytes, bytes] = {}
    while pos + 512 <= len(data):
        header = data[pos : pos + 512]
        if header.count(0) == 512:
            return out  # end-of-archive marker
        kind = header[156:157]
        if header[257:262] != b"ustar" or kind not in (b"0", b"\0", b"x", b"g"):
            return None  # long-name / link / directory / pre-POSIX: leave it to tarfile
        try:
            size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
            checksum = int(header[148:156].split(b"\0", 1)[0].strip() or b"-1", 8)
        except ValueError:
            return None
        # The header checksum (its field counted as spaces), as tarfile checks it: a damaged header
        # goes to tarfile, which refuses it, rather than being read here as something else.
        if checksum != sum(header[:148]) + 256 + sum(header[156:]):
            return None
        start = pos + 512
        if start + size > len(data):
            return None
        pos = start + (size + 511) // 512 * 512
        if kind in (b"x", b"g"):
            if kind == b"x":
                records = _pax_records(data[start : start + size])
                if records is None:
                    return None
                pax = records
            continue
        if b"size" in pax:
            return None  # a size too big for the header field: rare, let tarfile do it
        name = pax.get(b"path") or header[:100].split(b"\0", 1)[0]
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix and b"path" not in pax:
            name = prefix + b"/" + name
        pax = {}
        out.append((name.decode("utf-8"), bytes(view[start : start + size])))
    return None  # ran off the end without the end-of-archive marker: truncated


def _pax_records(block: bytes) -> dict[bytes, bytes] | None:
    """'LEN key=value\\n' records → {key: value}."""
    out, i = {}, 0
    while i < len(block) and block[i] != 0:
        sp = block.find(b" ", i)
        if sp < 0:
            return None
        try:
            n = int(block[i:sp])
        except ValueError:
            return None
        key, _, value = block[sp + 1 : i + n - 1].partition(b"=")
        out[key] = value
        i += n
    return out


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...]]] = {}


def npy_load(b: bytes) -> np.ndarray:
    """.npy bytes → array (a read-only view of `b` for the common case). allow_pickle=False: a
    shard from storage must never be able to run code."""
    # Every latent of a bucket has the same header; parsing it (ast.literal_eval) dominates.
    if b[:6] == b"\x93NUMPY" and b[6] == 1:
        end = 10 + int.from_bytes(b[8:10], "little")
        meta = _NPY_HEADERS.get(b[:end])
        if meta is not None:
            return np.frombuffer(b, meta[0], offset=end).reshape(meta[1])
        a = np.load(io.BytesIO(b), allow_pickle=False)
        if not a.dtype.hasobject and (a.flags.c_contiguous or a.ndim < 2) and len(_NPY_HEADERS) < 256:
            _NPY_HEADERS[b[:end]] = (a.dtype, a.shape)
        return a
    return np.load(io.BytesIO(b), allow_pickle=False)
