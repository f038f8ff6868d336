"""The worker-side latent stream: disjoint, deterministic, bucket-pure, exactly resumable."""

from __future__ import annotations

import itertools
import json
import threading
import time

import numpy as np
import pytest
import torch

from ditforge.data import shards
from ditforge.data.loader import LatentLoader, Position, skipped_metrics

from ..datasets import make_latents


def take(loader: LatentLoader, n: int) -> list[list[str]]:
    return [keys for _, _, keys, _ in itertools.islice(iter(loader), n)]


@pytest.fixture
def data(tmp_path):
    uri = f"file://{tmp_path}/lat"
    make_latents(uri, [13, 9, 16, 7, 11, 20, 8], shapes=[(4, 2, 2), (4, 2, 3)])
    return uri


def test_ranks_are_disjoint_deterministic_and_equal_length(data):
    world, bs = 3, 4
    loaders = [LatentLoader(data, bs, r, world, seed=7) for r in range(world)]
    n = loaders[0].batches_per_epoch(0)
    assert n > 0 and all(ld.batches_per_epoch(0) == n for ld in loaders)
    per_rank = [take(ld, n) for ld in loaders]
    flat = [k for keys in per_rank for b in keys for k in b]
    assert len(flat) == len(set(flat)) == world * n * bs  # disjoint, no duplicates
    # Deterministic: fresh loaders give the same keys; another seed or epoch gives another order.
    assert per_rank == [take(LatentLoader(data, bs, r, world, seed=7), n) for r in range(world)]
    assert take(LatentLoader(data, bs, 0, world, seed=8), n) != per_rank[0]
    n1 = loaders[0].batches_per_epoch(1)  # epochs re-deal shards, so their lengths may differ
    epoch1 = take(loaders[0], n1)  # a fresh iterator continues at the position: epoch 1
    assert loaders[0].position == Position(1, n1, world, bs) and epoch1 != per_rank[0]


def test_resume_yields_exactly_the_uninterrupted_batches(data):
    bs, world = 3, 2
    n = LatentLoader(data, bs, 1, world, seed=0).batches_per_epoch(0)
    straight = take(LatentLoader(data, bs, 1, world, seed=0), 2 * n + 3)
    for stop in (1, 4, n - 1, n, n + 2):  # mid-shard, shard edges, epoch boundary, second epoch
        first = LatentLoader(data, bs, 1, world, seed=0)
        head = take(first, stop)
        saved = first.position.to_dict()  # what the checkpoint holds
        resumed = LatentLoader(data, bs, 1, world, seed=0)
        resumed.position = Position(**saved)
        assert head + take(resumed, 2 * n + 3 - stop) == straight, f"resume after {stop} batches"


def test_world_size_change_on_resume(data, capsys):
    bs = 2
    two = LatentLoader(data, bs, 0, 2, seed=3)
    n2 = two.batches_per_epoch(0)
    take(two, n2 // 2)  # half of epoch 0 at world 2
    one = LatentLoader(data, bs, 0, 1, seed=3)
    one.position = Position(**two.position.to_dict())
    n1 = one.batches_per_epoch(0)
    assert one.position.epoch == 0 and one.position.batch == (n2 // 2) * n1 // n2  # same fraction of the epoch
    assert one.position.world == 1 and "world=2" in capsys.readouterr().out
    rest = take(one, n1 - one.position.batch)
    assert len(rest) == n1 - (n2 // 2) * n1 // n2 and one.position.epoch == 0
    # From the next epoch on: exactly a fresh world-1 run.
    fresh = LatentLoader(data, bs, 0, 1, seed=3)
    fresh.position = Position(1, 0)
    assert take(one, n1) == take(fresh, n1)


def test_batches_never_mix_buckets(data):
    loader = LatentLoader(data, 3, 0, 1, seed=0)
    shapes = set()
    for x, y, keys, _captions in itertools.islice(iter(loader), 2 * loader.batches_per_epoch(0)):
        # every sample of a batch carries its key as value: all from shards of one shape
        assert x.shape[0] == len(keys) == y.shape[0] == 3
        assert [int(v) for v in x.flatten(1)[:, 0]] == [int(k) for k in keys]
        shapes.add(tuple(x.shape[1:]))
    assert shapes == {(4, 2, 2), (4, 2, 3)}
    assert loader.latent_shape == (4, 2, 2)


def test_tampered_shard_is_reported_by_name(data, tmp_path):
    victim = shards.read_manifest(data)["shards"][2]["name"]
    path = tmp_path / "lat" / victim
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one changed byte in the middle of the shard
    path.write_bytes(bytes(raw))
    assert shards.verify(data) == [victim]
    loader = LatentLoader(data, 2, 0, 1, seed=0)
    with pytest.raises(shards.DataError, match=victim):
        for _ in loader:
            pass


def test_refuses_unusable_sets(tmp_path):
    with pytest.raises(shards.DataError, match="no manifest.json"):
        LatentLoader(f"file://{tmp_path}/nothing", 2, 0, 1, 0)
    uri = f"file://{tmp_path}/small"
    make_latents(uri, [3, 3])
    with pytest.raises(shards.DataError, match="cannot feed 3 workers"):
        LatentLoader(uri, 2, 0, 3, 0)
    with pytest.raises(shards.DataError, match="full batch of 4"):
        LatentLoader(uri, 4, 0, 1, 0)


# ----------------------------------------------------------------------------------- bad data


def _sample(k: int, latent: np.ndarray | None, cls: str | None = None) -> dict:
    s = {"__key__": f"{k:06d}", "txt": ""}
    if latent is not None:
        s["latent.npy"] = shards.npy_bytes(latent)
    if cls is not None or latent is not None:
        s["cls"] = cls if cls is not None else str(k % 10)
    return s


@pytest.fixture
def dirty(tmp_path):
    """6 shards of 8: a non-integer class and a misshapen latent; 2 non-finite latents; a sample
    without `cls` and one with a garbled .npy; video latents with a zero-frame clip; a truncated
    shard; a changed shard. 23 of 48 samples are bad."""
    uri, img, vid = f"file://{tmp_path}/dirty", (4, 2, 2), (4, 2, 2, 2)
    rows = [
        [_sample(8 * i + j, np.full(vid if i == 3 else img, 8 * i + j, np.float32)) for j in range(8)] for i in range(6)
    ]
    rows[1][2]["latent.npy"] = shards.npy_bytes(np.full(img, np.nan, np.float32))
    rows[1][5]["latent.npy"] = shards.npy_bytes(np.full(img, np.inf, np.float32))
    rows[0][1]["cls"] = "one"
    rows[0][7]["latent.npy"] = shards.npy_bytes(np.zeros((4, 2, 3), np.float32))
    del rows[2][4]["cls"]
    rows[2][6]["latent.npy"] = b"\x93NUMPY\x01\x00garbled"
    rows[3][6]["latent.npy"] = shards.npy_bytes(np.zeros((4, 0, 2, 2), np.float32))
    entries = [
        shards.write_shard(
            uri,
            f"shard-{i:06d}.tar",
            r,
            bucket="x".join(map(str, vid if i == 3 else img)),
            shape=list(vid if i == 3 else img),
        )
        for i, r in enumerate(rows)
    ]
    shards.write_manifest(uri, {"kind": "latents", "latent_shape": list(img), "shards": entries})
    raw = (tmp_path / "dirty" / "shard-000004.tar").read_bytes()
    (tmp_path / "dirty" / "shard-000004.tar").write_bytes(raw[: len(raw) // 2])  # cut off mid-upload
    raw = bytearray((tmp_path / "dirty" / "shard-000005.tar").read_bytes())
    raw[700] ^= 0xFF  # one byte changed after the manifest was written
    (tmp_path / "dirty" / "shard-000005.tar").write_bytes(bytes(raw))
    bad_keys = {"000001", "000007", "000010", "000013", "000020", "000022", "000030"} | {
        f"{k:06d}" for k in range(32, 48)
    }
    return uri, bad_keys


EXPECTED = {
    "truncated_shard": 8,
    "checksum_mismatch": 8,
    "missing_key": 1,
    "unreadable_latent": 1,
    "nonfinite_latent": 2,
    "zero_frames": 1,
    "wrong_shape": 1,
    "bad_class": 1,
}


def test_bad_data_is_skipped_counted_and_keeps_ranks_in_step(dirty, capsys):
    uri, bad_keys = dirty
    world, bs = 2, 2
    loaders = [LatentLoader(uri, bs, r, world, seed=1, max_bad_fraction=1.0) for r in range(world)]
    n = loaders[0].batches_per_epoch(0)
    assert n == 12  # as if the data were clean: 3 shards of 8 per rank
    seen = set()
    for ld in loaders:
        batches = list(itertools.islice(iter(ld), n))
        assert len(batches) == n and ld.position.batch == n  # every rank as many batches as promised
        for x, y, keys, _ in batches:
            assert torch.isfinite(x).all() and x.shape[0] == bs and x.shape[2] == 2  # no zero-frame clip
            assert [int(v) for v in x.flatten(1)[:, 0]] == [int(k) for k in keys]  # one bucket, own values
            seen |= set(keys)
    assert not seen & bad_keys and seen == {f"{k:06d}" for k in range(48)} - bad_keys
    counts = [ld.skipped_counts() for ld in loaders]
    total = [sum(c) for c in zip(*counts)]  # what the worker's all-reduce gives
    assert skipped_metrics(total) == {
        "train_data/skipped": 23.0,
        **{f"train_data/skipped/{r}": float(v) for r, v in EXPECTED.items()},
    }
    out = capsys.readouterr().out
    assert "shard-000004.tar: truncated" in out and "shard-000005.tar: checksum does not match" in out


def test_bad_data_resume_is_exact_and_counts_once(dirty):
    uri, _ = dirty
    bs, world = 2, 2
    n = LatentLoader(uri, bs, 0, world, seed=1).batches_per_epoch(0)
    for rank in range(world):
        straight = LatentLoader(uri, bs, rank, world, seed=1, max_bad_fraction=1.0)
        keys = take(straight, n + 2)
        for stop in (1, 4, 5, 9, n, n + 1):  # inside, at and past shard edges, the epoch boundary
            first = LatentLoader(uri, bs, rank, world, seed=1, max_bad_fraction=1.0)
            head = take(first, stop)
            saved = json.loads(json.dumps(first.position.to_dict()))  # through the checkpoint's JSON
            resumed = LatentLoader(uri, bs, rank, world, seed=1, max_bad_fraction=1.0)
            resumed.position = Position(**saved)
            assert head + take(resumed, n + 2 - stop) == keys, f"rank {rank}, resume after {stop}"
            assert resumed.position.skipped == straight.position.skipped  # nothing counted twice


def test_run_stops_past_max_bad_fraction(dirty):
    uri, _ = dirty  # 23 of 48 bad (47.9 %) on one rank
    ok = LatentLoader(uri, 2, 0, 1, seed=1, max_bad_fraction=0.48)
    assert len(take(ok, ok.batches_per_epoch(0))) == 24 and ok.skipped_counts()[0] == 23
    strict = LatentLoader(uri, 2, 0, 1, seed=1, max_bad_fraction=0.4)
    with pytest.raises(
        shards.DataError, match=r"rank 0 met \d+ bad samples of its 48 in epoch 0 .*max_bad_fraction 0.4"
    ):
        take(strict, 24)


def test_max_bad_fraction_is_a_checked_spec_field(tmp_path):
    from ditforge.spec import SpecError, load_job

    job = tmp_path / "job.yaml"
    job.write_text(f"name: j\ndata: {{train: file://{tmp_path}/d}}\n")  # inside the allowed roots
    assert load_job(job).data.max_bad_fraction == 0.01
    assert load_job(job, ["data.max_bad_fraction=0.25"]).data.max_bad_fraction == 0.25
    with pytest.raises(SpecError, match=r"job.yaml: data.max_bad_fraction: .*less than or equal to 1"):
        load_job(job, ["data.max_bad_fraction=1.5"])


# ------------------------------------------------------------------------------- storage faults


@pytest.mark.fault
@pytest.mark.slow
@pytest.mark.serial  # stops the session's S3 server
def test_stream_rides_out_an_s3_outage_or_fails_naming_the_shard(s3_prefix, capsys):
    from ditforge import services, storage

    make_latents(s3_prefix, [4] * 8)
    bs, seed = 2, 5
    n = LatentLoader(s3_prefix, bs, 0, 1, seed).batches_per_epoch(0)
    straight = take(LatentLoader(s3_prefix, bs, 0, 1, seed), n)
    loader = LatentLoader(s3_prefix, bs, 0, 1, seed, storage_timeout_s=120)
    impatient = LatentLoader(s3_prefix, bs, 0, 1, seed, storage_timeout_s=2)  # manifests read while S3 is up
    batches = iter(loader)
    head = [next(batches)[2] for _ in range(2)]  # the first shard; the reader is a few shards ahead
    services.stop_process("s3")
    restart = threading.Timer(15, services.start_s3)  # a ~15 s outage
    try:
        restart.start()
        t0 = time.monotonic()
        with pytest.raises(
            storage.StorageUnavailable,
            match=r"shard-0000\d\d\.tar: the store did not answer .*"
            r"data.storage_timeout_s: 2",
        ):
            next(iter(impatient))
        assert time.monotonic() - t0 < 12  # gave up after its 2 s, not after the outage
        rest = [next(batches)[2] for _ in range(n - 2)]
    finally:
        restart.join()
        services.start_s3()  # a no-op when the timer's start worked
    assert head + rest == straight and loader.skipped_counts()[0] == 0  # nothing skipped, nothing repeated
    out = capsys.readouterr().out
    # the patient loader met the outage (it logs "the store is back" only after failed reads)
    assert "failed (" in out and "retrying in" in out and "the store is back" in out
