"""Run the benchmark sections and write one JSON file + a table."""

from __future__ import annotations

import importlib
import json
import platform
import time

SECTIONS = ["train", "data", "checkpoint"]  # each a module in this package with run(quick) -> list[dict]


def run_all(quick: bool, sections: list[str] | None = None) -> dict:
    configs, errors = [], {}
    for name in sections or SECTIONS:
        mod = importlib.import_module(f"ditforge.bench.{name}")
        try:
            for c in mod.run(quick=quick):
                configs.append({"section": name, **c})
        except Exception as e:  # one broken section must not hide the others' numbers
            errors[name] = f"{type(e).__name__}: {e}"
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node(), "quick": quick,
            "configs": configs, "errors": errors}


def write(result: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
