"""The package's layering, read from the source: every relative import resolves, there is no import
cycle between ditforge's modules, and no module reaches into another's private names. Imports
inside functions count everywhere: a lazy import hides a cycle, it does not remove it, and a lazy
`from .data.parallel import ...` once broke `make bench` only when its branch ran."""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

from ..conftest import REPO

PACKAGE = REPO / "platform" / "ditforge"


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PACKAGE.rglob("*.py"):
        parts = p.relative_to(PACKAGE.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return mods


MODULES = _modules()


def _import_nodes(path: Path):
    """Every import statement of a file, those inside functions included."""
    return [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, (ast.Import, ast.ImportFrom))]


def _target(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module a `from ... import` names."""
    if not node.level:
        return node.module or ""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    return importlib.util.resolve_name("." * node.level + (node.module or ""), package)


def _known(name: str) -> str | None:
    """The ditforge module `name` is, or is inside (a name imported from a module), or None."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> list[tuple[str, str, str | None]]:
    """(imported module, bound name, imported attribute or None) for every import in `module`."""
    path = MODULES[module]
    out = []
    for node in _import_nodes(path):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("ditforge"):
                    out.append((a.name, a.asname or a.name, None))
        elif isinstance(node, ast.ImportFrom):
            base = _target(module, path, node)
            if not base.startswith("ditforge"):
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in MODULES:  # `from . import services`: the module itself
                    out.append((sub, a.asname or a.name, None))
                else:
                    out.append((base, a.asname or a.name, a.name))
    return out


def test_every_relative_import_resolves():
    bad = []
    for module, path in sorted(MODULES.items()):
        for node in _import_nodes(path):
            if not (isinstance(node, ast.ImportFrom) and node.level):
                continue
            base = _target(module, path, node)
            targets = [f"{base}.{a.name}" for a in node.names] if node.module is None else [base]
            for t in targets:
                found = importlib.util.find_spec(t) is not None or (
                    node.module is None and hasattr(importlib.import_module(base), t.rsplit(".", 1)[1])
                )
                if not found:
                    bad.append(f"{path.relative_to(REPO)}:{node.lineno}: {t}")
    assert not bad, bad


def test_no_import_cycle_between_modules():
    graph = {
        m: {k for imp, _, _ in _imports(m) if (k := _known(imp)) and k != m and not m.startswith(k + ".")}
        for m in MODULES
    }
    cycles, state, stack = [], {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycles.append(" -> ".join(stack[stack.index(n) :] + [n]))
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "\n".join(cycles)


def test_no_private_name_is_used_across_modules():
    found = []
    for module, path in MODULES.items():
        aliases = {}
        for imp, bound, attr in _imports(module):
            if attr is None:
                aliases[bound] = imp
            elif attr.startswith("_") and not attr.startswith("__") and _known(imp) != module:
                found.append(f"{module}: from {imp} import {attr}")
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                found.append(f"{module}:{node.lineno}: {aliases[node.value.id]}.{node.attr}")
    assert not found, "\n".join(found)


# The pipeline (data -> latents -> model + objective -> worker -> checkpoint / tracking, and what
# uses its results) runs inside Ray tasks and workers; the control plane starts and finds them.
PIPELINE = ("data", "models", "objectives", "train", "evaluate", "inference", "storage", "spec")
CONTROL = ("services", "cluster", "cli", "runs", "demo", "bench", "relay")
SHARED = {"ditforge.runs.folder"}  # the run folder's protocol: the CLI, the driver and the workers


def test_the_pipeline_imports_nothing_of_the_control_plane():
    up = [
        f"{m} -> {k}"
        for m in sorted(MODULES)
        if m.split(".")[1:2] and m.split(".")[1] in PIPELINE
        for imp, _, _ in _imports(m)
        if (k := _known(imp)) and k.split(".")[1:2] and k.split(".")[1] in CONTROL and k not in SHARED
    ]
    assert not up, "\n".join(up)


IMPORT_ALL = """
import importlib, json, logging, os, pkgutil
import deepspeed, mlflow, mlflow.pyfunc, ray, ray.train, torch  # their own import-time settings are theirs
import ditforge
before = dict(os.environ)
loggers = ("ray", "mlflow", "deepspeed", "torch", "")
levels = {n: logging.getLogger(n).level for n in loggers}
for m in pkgutil.walk_packages(ditforge.__path__, "ditforge."):
    if not m.name.endswith("__main__"):
        importlib.import_module(m.name)
from ditforge import services
services.endpoints()  # a look-up: the saved ports say 0.0.0.0, and credentials exist
print(json.dumps({"env": sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)),
                  "loggers": [n for n in loggers if logging.getLogger(n).level != levels[n]]}))
"""


def test_importing_any_module_or_looking_up_an_address_changes_nothing(tmp_path):
    """No import-time side effects (environment, logging), and `services.endpoints()` does not
    hand credentials to the process: `use_client_auth` does that, when asked."""
    import json
    import os
    import subprocess
    import sys

    home = tmp_path / "home"
    (home / "run").mkdir(parents=True)
    (home / "run" / "ports.json").write_text(
        json.dumps({"mlflow": 5005, "ray_dashboard": 8265, "ray_gcs": 6379, "host": "0.0.0.0"})
    )
    creds = tmp_path / "mlflow.json"
    creds.write_text(json.dumps({"username": "u", "password": "p"}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_"))}
    env |= {"DITFORGE_HOME": str(home), "DITFORGE_MLFLOW_CREDENTIALS": str(creds)}
    r = subprocess.run([sys.executable, "-c", IMPORT_ALL], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {"env": [], "loggers": []}
