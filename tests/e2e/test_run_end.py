"""The end of a run and per-rank resume state, on the real DiT loop (2 CPU ranks, no Ray; see
tests/loops.py): the final checkpoint is complete before sampling starts, the grid is bounded and
shared over the ranks, and each rank resumes its own data position (bad / skipped counts)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ditforge import storage
from ditforge.data import shards
from ditforge.data.loader import LatentLoader
from ditforge.runs.folder import MANIFEST, complete_steps, join_step

from ..loops import dit_spec, metric, records, run_loop
from ..datasets import make_latents

pytestmark = pytest.mark.timeout(600)


def _record_sampling(rank: int, out: Path) -> None:
    """In each rank: note whether the final checkpoint was complete when sampling began, and
    how many chunks this rank generated."""
    from ditforge.inference import sampling
    from ditforge.train import worker

    run_uri = (out / "run_uri.txt").read_text()
    sample, chunks = worker._sample, sampling.generate_chunks

    def recording_sample(*a, **k):
        step = a[-1]
        with open(out / f"sampled_rank_{rank}.jsonl", "a") as f:
            f.write(
                json.dumps({"step": step, "complete": storage.exists(join_step(run_uri, step) + "/" + MANIFEST)}) + "\n"
            )
        return sample(*a, **k)

    def counting_chunks(*a, **k):
        got = chunks(*a, **k)
        with open(out / f"chunks_rank_{rank}.txt", "a") as f:
            f.write(f"{len(got)}\n")
        return got

    worker._sample = recording_sample
    sampling.generate_chunks = counting_chunks


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """4 shards of 16 latents (12, 4, 4); one NaN latent in rank 1's first shard only."""
    root = tmp_path_factory.mktemp("run-end")
    uri = f"file://{root}/latents"
    make_latents(uri, [16, 16, 16, 16], shapes=[(12, 4, 4)])
    first_of_rank1 = LatentLoader(uri, 4, 1, 2, 0, max_bad_fraction=0.5).assignment(0, 1)[0]
    m = shards.read_manifest(uri)
    i = next(i for i, e in enumerate(m["shards"]) if e["name"] == first_of_rank1["name"])
    rows = shards.read_shard(uri, m["shards"][i])
    rows[5]["latent.npy"] = shards.npy_bytes(np.full((12, 4, 4), np.nan, np.float32))
    m["shards"][i] = shards.write_shard(uri, m["shards"][i]["name"], rows, bucket="12x4x4", shape=[12, 4, 4])
    shards.write_manifest(uri, m)
    return uri, root


@pytest.fixture(scope="module")
def first_run(data):
    """Steps 1-2 with sampling at the end, its final checkpoint at step 2."""
    uri, root = data
    run_uri, out = f"file://{root}/runs/a", root / "a"
    out.mkdir()
    (out / "run_uri.txt").write_text(run_uri)
    spec = dit_spec(uri, f"file://{root}/runs", train={"steps": 2})
    return run_loop("ditforge.train.worker.train_loop", spec, run_uri, out, setup=_record_sampling), run_uri, out


def test_final_checkpoint_is_complete_before_sampling_and_the_grid_is_bounded_and_shared(first_run):
    res, run_uri, out = first_run
    assert res == {0: None, 1: None}, res
    assert complete_steps(run_uri) == [2]
    for r in (0, 1):  # every rank samples (its share), and only after the final manifest is there
        seen = [json.loads(line) for line in (out / f"sampled_rank_{r}.jsonl").read_text().splitlines()]
        assert seen == [{"step": 2, "complete": True}], (r, seen)
    # 3 classes (sample.max_classes) x 2 per class = 6 samples in chunks of 4: chunk 0 on rank 0,
    # chunk 1 on rank 1
    assert [(out / f"chunks_rank_{r}.txt").read_text().split() for r in (0, 1)] == [["1"], ["1"]]
    art = [r for r in records(out, 0, "artifact") if r["folder"] == "samples"]
    assert len(art) == 1
    w, h = Image.open(art[0]["path"]).size
    # 8x8 pixels, upscaled 2x, 2 px padding: 3 rows, 2 columns
    assert (w, h) == (2 * (16 + 2) + 2, 3 * (16 + 2) + 2)
    assert not records(out, 1, "artifact")  # rank 0 alone writes the grid


def test_each_rank_resumes_its_own_skipped_counts(data, first_run):
    """Rank 1 met one bad latent before the checkpoint, rank 0 none. Under ZeRO-2 DeepSpeed keeps
    client_state in rank 0's file only, so a resume that read it gave rank 1 rank 0's count (0)."""
    _, run_uri, out = first_run
    uri, root = data
    before = metric(out, "train_data/skipped")
    assert before[2] == 1.0, before  # summed over ranks: rank 1's one NaN latent
    out_b = root / "b"
    spec = dit_spec(uri, f"file://{root}/runs", train={"steps": 4}, sample={"per_class": 1, "max_classes": 1})
    res = run_loop(
        "ditforge.train.worker.train_loop", spec, f"file://{root}/runs/b", out_b, resume_from=join_step(run_uri, 2)
    )
    assert res == {0: None, 1: None}, res
    after = metric(out_b, "train_data/skipped")
    assert sorted(after) == [3, 4]
    assert after[3] == after[4] == 1.0, after  # the same one bad sample, counted once, on rank 1


def _fail_at_step_3_with_upload_in_flight(rank: int, out: Path) -> None:
    from ditforge.train import checkpoint, worker

    step, put = worker.train_step, checkpoint.storage.put_file

    def slow_put(local, uri):  # rank 0's upload of step 2 is still going when step 3 fails
        import time

        time.sleep(0.5)
        return put(local, uri)

    def failing_step(*a, **k):
        if rank == 0 and a[-1] == 3:
            raise RuntimeError("injected failure at step 3")
        return step(*a, **k)

    if rank == 0:
        checkpoint.storage.put_file = slow_put
    worker.train_step = failing_step


def test_an_exception_lets_the_upload_in_flight_finish_and_flushes_tracking(data):
    uri, root = data
    out, run_uri = root / "fail", f"file://{root}/runs/fail"
    spec = dit_spec(uri, f"file://{root}/runs", train={"steps": 6})
    res = run_loop("ditforge.train.worker.train_loop", spec, run_uri, out, setup=_fail_at_step_3_with_upload_in_flight)
    assert res[0] and res[0].startswith("RuntimeError: injected failure at step 3"), res
    assert complete_steps(run_uri) == [2]  # saved at step 2, uploaded after the exception
    assert records(out, 0)[-1]["kind"] == "close"  # buffered records flushed on the way out
