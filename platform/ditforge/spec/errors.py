"""What every spec module shares: the one-line `SpecError` (and `SpecErrors`, all of one spec's
problems), the `Strict` base model, the URI and no-password field validators, and where a field
sits in its YAML file (`yaml_lines`, `line_of`), so that problems print in file order."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict

URI_SCHEMES = ("file", "s3", "gs")


class SpecError(Exception):
    """One user-facing line: `<file>: <field.path>: <reason>`."""

    def __init__(self, file: str, field: str, reason: str):
        self.file, self.field, self.reason = file, field, reason
        super().__init__(f"{file}: {field}: {reason}" if field else f"{file}: {reason}")

    @property
    def lines(self) -> list[str]:
        """Each problem's line (the CLI prints each as `error: <line>`)."""
        return [str(self)]


class SpecErrors(SpecError):
    """Every problem of one spec, in file order; behaves as the first one where one is expected."""

    def __init__(self, problems: list[SpecError]):
        self.problems = problems
        super().__init__(problems[0].file, problems[0].field, problems[0].reason)

    @property
    def lines(self) -> list[str]:
        return [str(p) for p in self.problems]

    def __str__(self) -> str:
        return "\n".join(self.lines)


class Strict(BaseModel):
    # Unknown keys are errors: a typo like `zero_stag: 3` must not silently train with stage 2.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def check_uri(value: str) -> str:
    scheme = value.split("://", 1)[0] if "://" in value else None
    if scheme is None:
        raise ValueError(f"'{value}' is not a URI: write file://PATH, s3://BUCKET/PATH or gs://BUCKET/PATH")
    if scheme not in URI_SCHEMES:
        raise ValueError(f"unknown URI scheme '{scheme}://' (known: {', '.join(s + '://' for s in URI_SCHEMES)})")
    return value


def no_password(value: str | None) -> str | None:
    """Specs are logged, saved with checkpoints and sent to MLflow: they must not hold secrets."""
    from ..credentials import has_userinfo_password

    if value and has_userinfo_password(value):
        # the value itself is not repeated: it holds the secret
        raise ValueError(
            "holds a password (scheme://user:PASSWORD@host): give credentials through the "
            "environment or a named file (see README, Security defaults), never in a spec"
        )
    return value


def yaml_lines(path: str | Path) -> dict[tuple[str, ...], tuple[int, int]]:
    """Field path (list items by index) → (line, column) where it starts, to order problems as in the file."""
    out: dict[tuple[str, ...], tuple[int, int]] = {}

    def walk(node: yaml.Node, at: tuple[str, ...]) -> None:
        out.setdefault(at, (node.start_mark.line, node.start_mark.column))
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                out.setdefault((*at, str(k.value)), (k.start_mark.line, k.start_mark.column))
                walk(v, (*at, str(k.value)))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                walk(v, (*at, str(i)))

    try:
        root = yaml.compose(Path(path).read_text(), Loader=yaml.SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return out
    if root is not None:
        walk(root, ())
    return out


def line_of(field: str, lines: dict) -> tuple[float, int]:
    """A problem's line: its field's, else its nearest enclosing section's (a missing key)."""
    parts = tuple(field.split(".")) if field else ()
    for n in range(len(parts), -1, -1):
        if parts[:n] in lines:
            return lines[parts[:n]]
    return float("inf"), 0
