"""Property test: the fast tar reader (`shards._members_fast`) agrees with Python's `tarfile` on
archives tarfile writes (ustar, pax, GNU formats; any names, sizes and payloads), and on those
archives corrupted (bytes flipped, cut short): it returns exactly tarfile's regular-file members,
or None (then `iter_tar` hands the archive to tarfile), never something tarfile would not read."""

from __future__ import annotations

import io
import tarfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ditforge.data import shards

FORMATS = [tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT, tarfile.GNU_FORMAT]
names = st.text(alphabet="abcdefghij0123456789_-/", min_size=1, max_size=120).filter(
    lambda s: not s.startswith("/") and "//" not in s and not s.endswith("/")
)
members = st.lists(st.tuples(names, st.binary(max_size=1500)), min_size=0, max_size=6)


def build(items: list[tuple[str, bytes]], fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, payload in items:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def by_tarfile(data: bytes) -> list[tuple[str, bytes]] | None:
    """Regular-file members as tarfile reads them, or None when tarfile refuses the archive."""
    out = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as tar:
            for m in tar:
                if m.isfile():
                    out.append((m.name, tar.extractfile(m).read()))
    except (tarfile.TarError, EOFError):
        return None
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(members, st.sampled_from(FORMATS))
def test_fast_reader_matches_tarfile(items, fmt):
    try:
        data = build(items, fmt)
    except ValueError:  # a name ustar cannot hold: tarfile refuses to write it
        return
    fast = shards._members_fast(data)
    assert fast is not None or fmt == tarfile.GNU_FORMAT  # ustar and pax are always read fast
    if fast is not None:
        assert fast == by_tarfile(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(members.filter(bool), st.sampled_from(FORMATS), st.data())
def test_fast_reader_on_corrupted_archives(items, fmt, data):
    try:
        archive = bytearray(build(items, fmt))
    except ValueError:
        return
    how = data.draw(st.sampled_from(["flip", "cut"]))
    if how == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(archive) - 1))
            archive[i] ^= data.draw(st.integers(1, 255))
    else:
        archive = archive[: data.draw(st.integers(0, len(archive) - 1))]
    fast = shards._members_fast(bytes(archive))
    if fast is not None:  # what the fast path returns, tarfile must read the same way
        assert fast == by_tarfile(bytes(archive))


def test_shards_written_by_webdataset_are_reproducible_and_read_by_the_fast_path(tmp_path):
    """`write_shard` writes with webdataset's TarWriter: the same samples give the same bytes (and
    checksum) twice, webdataset's own reader reads them back, and so does the fast path (no pax
    header: mtime is an integer)."""
    import webdataset as wds

    samples = [{"__key__": f"s{i:03d}", "cls": str(i % 3), "latent.npy": bytes([i]) * (100 + i)} for i in range(5)]
    entries = [shards.write_shard(f"file://{tmp_path}/{d}", "shard-000000.tar", samples) for d in ("a", "b")]
    assert entries[0]["sha256"] == entries[1]["sha256"] and entries[0]["samples"] == 5
    data = (tmp_path / "a" / "shard-000000.tar").read_bytes()
    fast = shards._members_fast(data)
    assert fast is not None and [n for n, _ in fast][:2] == ["s000.cls", "s000.latent.npy"]
    back = list(wds.WebDataset(str(tmp_path / "a" / "shard-000000.tar"), shardshuffle=False))
    assert [b["__key__"] for b in back] == [s["__key__"] for s in samples]
    assert all(b["latent.npy"] == s["latent.npy"] and b["cls"] == s["cls"].encode() for b, s in zip(back, samples))
