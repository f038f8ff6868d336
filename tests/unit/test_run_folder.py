"""The run folder's protocol (runs/folder.py) on `file://`, without services: what a submission
continues, which checkpoints count, the reshard check before submitting, and the stop marker."""

from __future__ import annotations

import json

import pytest

from ditforge import storage
from ditforge.runs import folder
from ditforge.spec import JobSpec


def _spec(tmp_path, **train) -> JobSpec:
    return folder.resolve_paths(
        JobSpec.model_validate(
            {
                "name": "j",
                "data": {"train": f"file://{tmp_path}/data"},
                "checkpoint": {"uri": f"file://{tmp_path}/runs"},
                "train": {"steps": 20, "warmup": 2, **train},
                "resources": {"workers": 2},
                "deepspeed": {"zero_stage": 2},
            }
        )
    )


def _run(spec: JobSpec, name: str, complete: list[int], half: list[int] = (), world: int = 2, stage: int = 2) -> str:
    uri = storage.join(spec.checkpoint.uri, name)
    storage.write_bytes(
        storage.join(uri, folder.RUN_INFO),
        json.dumps({"run_name": name, "mlflow_run_id": f"m-{name}", "job": spec.name}).encode(),
    )
    for s in complete:
        storage.write_bytes(
            storage.join(folder.join_step(uri, s), folder.MANIFEST),
            json.dumps({"step": s, "world_size": world, "zero_stage": stage}).encode(),
        )
    for s in half:  # a killed save: one rank's marker, no manifest
        storage.write_bytes(storage.join(folder.join_step(uri, s), folder.RANKS, "rank_1.json"), b"{}")
    return uri


def test_auto_continues_the_newest_unfinished_run_and_only_complete_steps_count(tmp_path):
    spec = _spec(tmp_path)  # train.resume: auto is the default
    _run(spec, "j-20260101-000000-aaaa", [10])
    newest = _run(spec, "j-20260102-000000-bbbb", [10], half=[15])
    _run(spec, "j-20260103-000000-cccc", [10, 20])  # finished: nothing to continue
    _run(spec, "other-20260104-000000-dddd", [10])  # another job's run
    cont = folder.continuation(spec, None)
    assert (cont.run_name, cont.how, cont.info["mlflow_run_id"]) == (
        "j-20260102-000000-bbbb",
        "train.resume: auto",
        "m-j-20260102-000000-bbbb",
    )
    assert cont.steps == [10] and folder.all_steps(newest) == [10, 15]
    assert cont.newest == folder.join_step(newest, 10) == folder.resolve(newest)
    assert folder.discard_after(newest, 10) == [15] and folder.all_steps(newest) == [10]


def test_never_and_a_name_win_over_auto(tmp_path):
    spec = _spec(tmp_path, resume="never")
    _run(spec, "j-20260101-000000-aaaa", [10])
    assert folder.continuation(spec, None) == folder.Continuation()  # a fresh run
    cont = folder.continuation(spec, "j-20260101-000000-aaaa")  # --resume NAME wins over the spec
    assert cont.run_name == "j-20260101-000000-aaaa" and cont.how == "--resume"


@pytest.mark.parametrize(
    "name, message",
    [
        ("../elsewhere", "a run name (letters, digits, '_', '.', '-'), not a path"),
        ("s3://b/x", "not a path"),
        ("j-nope", "no run named 'j-nope' under file://"),
    ],
)
def test_a_bad_run_name_is_one_line(tmp_path, name, message):
    with pytest.raises(folder.RunError, match=r"^--resume ") as e:
        folder.continuation(_spec(tmp_path), name)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_checkpoint_to_start_from_must_be_complete_and_fit_the_job(tmp_path):
    spec = _spec(tmp_path)
    run = _run(spec, "src", [10], half=[20], stage=3)
    with pytest.raises(folder.RunError, match=r"^train\.resume: .*step_00000020: incomplete checkpoint"):
        folder.continuation(_spec(tmp_path, resume=folder.join_step(run, 20)), None)
    with pytest.raises(folder.RunError, match=r"^train\.resume: .*saved with ZeRO-3, the job asks for ZeRO-2"):
        folder.continuation(_spec(tmp_path, resume=run), None)  # a run folder: its newest complete step
    ok = _run(spec, "src2", [10], world=4)  # another world size, same stage: resharded on load
    assert folder.continuation(_spec(tmp_path, resume=ok), None).resume_from == folder.join_step(ok, 10)
    assert folder.reshard_plan(ok, {"world_size": 4, "zero_stage": 2}, 2, 2) is True


def test_the_stop_marker_is_asked_seen_and_cleared(tmp_path):
    run = _run(_spec(tmp_path), "r", [10])
    assert not folder.stop_marked(run)
    folder.request_stop(run, by="test")
    assert folder.stop_marked(run)
    assert json.loads(storage.read_bytes(storage.join(run, folder.STOP)))["by"] == "test"
    folder.clear_stop(run)
    assert not folder.stop_marked(run)
    assert folder.complete_steps(run) == [10]  # the checkpoints are untouched
