"""The path sandbox: every local path a job spec names (its own path fields and DeepSpeed's
pass-through path keys) must resolve inside a root the operator allows."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import SpecError, SpecErrors, line_of, yaml_lines

if TYPE_CHECKING:
    from .job import JobSpec

ROOTS_ENV = "DITFORGE_ROOTS"
# Job-spec fields that may name a local file or folder (file://PATH, or a bare path for the
# folders handed to diffusers / transformers).
LOCAL_PATH_FIELDS = (
    "data.train",
    "checkpoint.uri",
    "train.resume",
    "vae.path",
    "model.text_encoder",
    "model.init_from",
)


# Where the shipped GPU jobs expect pretrained weights (a read-only mount on cluster nodes).
MODELS_ROOT = "/models"

# Pass-through keys that name a local file or folder (monitor outputs, NVMe offload, profiler
# files): each must lie inside the allowed roots, like the spec's own path fields.
_DS_PATH_KEY = re.compile(r"(^|_)(path|dir|directory|file|folder)s?$", re.I)  # output_path, nvme_path, log_dir


def deepspeed_paths(extra: dict, where: str = "deepspeed") -> list[tuple[str, Any]]:
    """(field.path, value) of every path-like key under the `deepspeed:` pass-through keys."""
    out = []
    for key, value in extra.items():
        if isinstance(value, dict):
            out += deepspeed_paths(value, f"{where}.{key}")
        elif _DS_PATH_KEY.search(str(key)):
            out.append((f"{where}.{key}", value))
    return out


def allowed_roots() -> list[Path]:
    """Local folders a job spec may name: the working directory (the project), $DITFORGE_HOME,
    /models, and each folder in $DITFORGE_ROOTS (os.pathsep-separated). The list is the
    operator's, from the environment, never from the spec: a spec must not widen its own sandbox."""
    home = os.environ.get("DITFORGE_HOME") or Path.cwd() / ".ditforge"
    extra = [p for p in os.environ.get(ROOTS_ENV, "").split(os.pathsep) if p.strip()]
    return [Path(p).expanduser().resolve() for p in (Path.cwd(), home, MODELS_ROOT, *extra)]


def check_roots(spec: "JobSpec", name: str) -> None:
    """Every local path in the spec resolves (symlinks and `..` followed) inside an allowed root.

    Runs where specs enter the platform (load_job, a bare spec given to the driver), not on every
    model_validate: workers re-validate the resolved spec in another working directory."""
    roots = allowed_roots()
    problems: list[SpecError] = []
    fields: list[tuple[str, Any]] = []
    for field in LOCAL_PATH_FIELDS:
        node: Any = spec
        for part in field.split("."):
            node = getattr(node, part)
        fields.append((field, node))
    fields += [(f"data.mix.{i}.train", m.train) for i, m in enumerate(spec.data.mix)]  # the further data sets
    for field, node in fields + deepspeed_paths(spec.deepspeed.model_extra or {}):
        if not isinstance(node, str):
            if node is not None:
                problems.append(SpecError(name, field, f"expected a local path, got {node!r}"))
            continue
        if field.startswith("deepspeed.") and "://" in node and not node.startswith("file://"):
            problems.append(
                SpecError(
                    name,
                    field,
                    f"'{node}': DeepSpeed writes here itself, so it must be a local path inside the allowed roots",
                )
            )
            continue
        if not node or node in ("auto", "never") or ("://" in node and not node.startswith("file://")):
            continue
        resolved = Path(node.removeprefix("file://")).expanduser().resolve()
        if not any(resolved.is_relative_to(r) for r in roots):
            problems.append(
                SpecError(
                    name,
                    field,
                    f"'{node}' resolves to {resolved}, outside the allowed roots "
                    f"({', '.join(map(str, roots))}); add a folder to ${ROOTS_ENV} to allow it",
                )
            )
    if problems:
        lines = yaml_lines(name) if Path(name).is_file() else {}
        problems.sort(key=lambda p: line_of(p.field, lines))
        raise SpecErrors(problems) if len(problems) > 1 else problems[0]
