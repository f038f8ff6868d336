"""Resuming a ZeRO checkpoint at another world size is exact (train/reshard.py).

N gloo processes train and save through the real Checkpointer; K processes load through the
real `checkpoint.load`; the consolidated fp32 weights, AdamW moments, step counts and LR schedule
must be equal (`torch.equal`, no tolerance). See tests/e2e/reshard_harness.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from safetensors.torch import load_file

from ditforge import storage
from ditforge.runs import folder
from ditforge.inference.export import export

from . import reshard_harness

# ZeRO-2 and 3 in every direction the issue names; ZeRO-0 and 1 once each
CASES = [(stage, n, k) for stage in (2, 3) for n, k in ((2, 1), (1, 2), (2, 3))] + [(0, 2, 1), (1, 2, 3)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One saved run per (ZeRO stage, world size), shared by the cases that load it."""
    root = tmp_path_factory.mktemp("reshard")
    cache: dict = {}

    def get(stage: int, n: int) -> tuple[str, dict]:
        if (stage, n) not in cache:
            uri = f"file://{root}/z{stage}-w{n}"
            cache[(stage, n)] = uri, reshard_harness.run(n, stage, "save", uri, str(root / f"z{stage}-w{n}.pt"))
        return cache[(stage, n)]

    return get


@pytest.mark.parametrize("stage,n,k", CASES, ids=[f"zero{s}-{n}to{k}" for s, n, k in CASES])
def test_resume_at_another_world_size_is_exact(saved, tmp_path, stage, n, k):
    uri, before = saved(stage, n)
    manifest = json.loads(storage.read_bytes(storage.join(folder.resolve(uri), folder.MANIFEST)))
    assert (manifest["world_size"], manifest["zero_stage"]) == (n, stage)
    after = reshard_harness.run(k, stage, "load", uri, str(tmp_path / "after.pt"))
    assert before["tensors"].keys() == after["tensors"].keys() and len(before["tensors"]) > 0
    unequal = [name for name, t in before["tensors"].items() if not torch.equal(t, after["tensors"][name])]
    assert unequal == []
    # the moments are not trivially equal (zeros, or the weights): the test could fail
    assert any(t.abs().sum() > 0 for name, t in after["tensors"].items() if name.startswith("exp_avg_sq/"))
    assert before["adam_steps"] == after["adam_steps"] == [3.0]
    assert before["global_steps"] == after["global_steps"] == 3
    assert before["sched"] == after["sched"] == 3 and before["lr"] == after["lr"]
    assert after["client"] == {"step": 3, "data": {"epoch": 0, "batch": 3, "world": n}}

    # export is world-size free: the checkpoint written at N and the one the K ranks wrote after the
    # reshard consolidate to the same weights, which are the engine's own
    exported = {}
    for name, src in (("n", uri), ("k", f"{uri}-resaved-w{k}")):
        export(src, f"file://{tmp_path}/export-{name}")
        exported[name] = load_file(str(tmp_path / f"export-{name}" / "raw.safetensors"))
    assert exported["n"].keys() == exported["k"].keys() == {t[5:] for t in before["tensors"] if t.startswith("fp32/")}
    assert all(torch.equal(exported["n"][p], before["tensors"][f"fp32/{p}"]) for p in exported["n"])
    assert all(torch.equal(exported["n"][p], exported["k"][p]) for p in exported["n"])


def test_manifest_without_what_resharding_needs_is_one_line(tmp_path):
    uri = "s3://b/runs/r/step_00000040"
    with pytest.raises(folder.ReshardError, match=r"^s3://b/runs/r/step_00000040: .*no zero_stage.*workers=2$"):
        folder.reshard_plan(uri, {"world_size": 2}, 1, 2)
    with pytest.raises(folder.ReshardError, match="no world_size"):
        folder.reshard_plan(uri, {"zero_stage": 2}, 1, 2)
    for world in (1, 2):  # another stage is refused at any world size: DeepSpeed would fail deep inside
        with pytest.raises(folder.ReshardError, match="saved with ZeRO-2, the job asks for ZeRO-3"):
            folder.reshard_plan(uri, {"world_size": 2, "zero_stage": 2}, world, 3)
    assert (
        folder.reshard_plan(uri, {"world_size": 2}, 2, 2) is False
    )  # same size: nothing to reshard, old manifests load
    assert folder.reshard_plan(uri, {"world_size": 2, "zero_stage": 0}, 3, 0) is False  # ZeRO-0: every rank has it all
    assert folder.reshard_plan(uri, {"world_size": 2, "zero_stage": 3}, 3, 3) is True
