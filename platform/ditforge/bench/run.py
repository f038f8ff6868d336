"""Run the benchmark sections and write one JSON file + a table."""

from __future__ import annotations

import importlib
import inspect
import json
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

SECTIONS = ["train", "attention", "data", "checkpoint", "lora"]  # each a module here with run(quick) -> list[dict]


def run_all(
    quick: bool,
    sections: list[str] | None = None,
    focus: bool = False,
    on_section: Callable[[dict[str, Any]], object] | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """`focus`: the sections that take it run only their headline rows (bench/gpu_run.sh's first
    pass). `on_section(result)` after each section, so a run cut short keeps what it measured."""
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "host": platform.node(),
        "quick": quick,
        "focus": focus,
        "meta": meta(command),
        "configs": [],
        "errors": {},
    }
    for name in sections or SECTIONS:
        mod = importlib.import_module(f"ditforge.bench.{name}")
        kwargs = {"focus": focus} if "focus" in inspect.signature(mod.run).parameters else {}
        try:
            for c in mod.run(quick=quick, **kwargs):
                result["configs"].append({"section": name, **c})
        except Exception as e:  # one broken section must not hide the others' numbers
            result["errors"][name] = f"{type(e).__name__}: {e}"
        if on_section:
            on_section(result)
    return result


def meta(command: str | None = None) -> dict[str, Any]:
    """What a committed result must say about where it came from (docs/bench/README.md)."""
    import torch

    from .common import device_name

    try:
        import deepspeed

        ds = deepspeed.__version__
    except Exception:  # the bench's data section runs without it
        ds = None
    gpu = torch.cuda.is_available()
    return {
        "device": device_name(),
        "device_kind": "cuda" if gpu else "cpu",
        "cuda": torch.version.cuda if gpu else None,
        "torch": torch.__version__,
        "deepspeed": ds,
        "python": platform.python_version(),
        "command": command or " ".join(sys.argv),
        "git_commit": _git_commit(),
    }


def _git_commit() -> str | None:
    import subprocess

    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except Exception:
        return None


def write(result: dict[str, Any], path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
