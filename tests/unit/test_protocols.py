"""The three seams are `typing.Protocol`s (train/tracking.Tracker, objectives.Objective,
train/engine.Engine): mypy checks them where the package builds one (a tracker in
train/session.py, an objective in `build_objective`). This test keeps the implementers that mypy
does not see together with their Protocol: the tests' recording tracker, and every signature
against the Protocol's, as `inspect.signature` reads them. Nothing here starts a service:
MlflowTracker, whose constructor talks to a server, is checked as a class."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ditforge.objectives import Objective, build_objective
from ditforge.objectives.ddpm import DDPM
from ditforge.objectives.flow import RectifiedFlow
from ditforge.objectives.samplers import SAMPLERS
from ditforge.spec import ObjectiveSpec
from ditforge.train.engine import Engine
from ditforge.train.tracking import MlflowTracker, NullTracker, Tracker

from ..loops import FileTracker

EMPTY = inspect.Parameter.empty
STAR = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def _methods(proto: type) -> list[str]:
    """The Protocol's public methods (its data members are in `__annotations__`)."""
    return sorted(n for n, v in vars(proto).items() if callable(v) and not n.startswith("_"))


def _mismatches(want_fn: Callable[..., Any], have_fn: Callable[..., Any]) -> list[str]:
    """How `have_fn` fails to accept every call `want_fn`'s signature allows (both unbound
    methods: `self` is dropped). Annotations are compared where both sides have one."""
    want = list(inspect.signature(want_fn).parameters.values())[1:]
    have = list(inspect.signature(have_fn).parameters.values())[1:]
    by_name = {p.name: p for p in have}
    out = []
    for i, w in enumerate(want):
        h = by_name.get(w.name)
        if h is None:
            out.append(f"no parameter {w.name!r}")
            continue
        if h.kind != w.kind:
            out.append(f"{w.name!r} is {h.kind.description}, not {w.kind.description}")
        if w.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD) and (
            i >= len(have) or have[i].name != w.name
        ):
            out.append(f"{w.name!r} is not positional argument {i + 1}")
        if w.default is not EMPTY and h.default is EMPTY:
            out.append(f"{w.name!r} needs a default")
        if w.annotation is not EMPTY and h.annotation is not EMPTY and h.annotation != w.annotation:
            out.append(f"{w.name!r}: {h.annotation} instead of {w.annotation}")
    names = {w.name for w in want}
    out += [
        f"extra parameter {h.name!r} without a default"
        for h in have
        if h.name not in names and h.default is EMPTY and h.kind not in STAR
    ]
    rw, rh = inspect.signature(want_fn).return_annotation, inspect.signature(have_fn).return_annotation
    if rw is not EMPTY and rh is not EMPTY and rh != rw:
        out.append(f"returns {rh} instead of {rw}")
    return out


def _check(proto: type, cls: type) -> None:
    problems = {
        name: (_mismatches(getattr(proto, name), getattr(cls, name)) if hasattr(cls, name) else ["missing"])
        for name in _methods(proto)
    }
    assert not {n: p for n, p in problems.items() if p}, f"{cls.__name__} does not satisfy {proto.__name__}"


def test_the_tracker_protocol_is_what_every_tracker_answers():
    assert _methods(Tracker) == ["artifact", "close", "drain", "log", "params", "tags"]


@pytest.mark.parametrize("cls", [MlflowTracker, NullTracker, FileTracker])
def test_trackers_satisfy_the_protocol(cls):
    _check(Tracker, cls)


def test_tracker_instances_answer_as_the_protocol_says(tmp_path: Path):
    trackers: list[Tracker] = [NullTracker(), FileTracker(tmp_path / "track.jsonl")]
    for t in trackers:
        t.log({"train/loss": 1.0}, 1)
        t.params({"world_size": 1})
        t.tags({"ditforge.resumed_from_step": 0})
        assert t.drain(0.1) is True
        assert t.close(0.1) is True
    mlflow_class: type[Tracker] = MlflowTracker  # checked as a class: building one talks to a server
    assert mlflow_class.__name__ == "MlflowTracker"


@pytest.mark.parametrize("cls", [RectifiedFlow, DDPM])
def test_objectives_satisfy_the_protocol(cls):
    _check(Objective, cls)
    objective: Objective = cls()
    assert set(Objective.__annotations__) == {"kind", "cfg_dropout"}
    assert isinstance(objective.kind, str) and objective.kind in SAMPLERS
    assert isinstance(objective.cfg_dropout, float)


@pytest.mark.parametrize("kind, cls", [("rectified_flow", RectifiedFlow), ("ddpm", DDPM)])
def test_build_objective_returns_an_objective(kind, cls):
    objective: Objective = build_objective(ObjectiveSpec(kind=kind))
    assert type(objective) is cls and objective.kind == kind


def test_the_engine_protocol_declares_what_the_trainer_calls():
    members = set(_methods(Engine)) | {n for n, v in vars(Engine).items() if isinstance(v, property)}
    assert {"module", "optimizer", "client_optimizer", "lr_scheduler"} <= members
    # DeepSpeed's private attributes stay out of the seam (the one use is in train/reshard.py)
    assert not {m for m in members if m.startswith("_") and not m.startswith("__")}
    assert {"backward", "step", "train", "get_lr", "zero_optimization_stage"} <= members
    assert {"save_checkpoint", "load_checkpoint", "__call__"} <= set(vars(Engine))
