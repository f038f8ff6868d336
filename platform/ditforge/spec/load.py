"""From YAML and `--set` to a spec: read the file (a key given twice is an error), merge the
overrides, validate, and reword pydantic's errors into `SpecError` lines in file order.

Order of precedence (as in lingua): model defaults, then the YAML file, then `--set a.b=value`
overrides. Every validation problem becomes one `SpecError` line naming the file and the field
path, so the CLI can print it and exit 2 before anything starts."""

from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from .cluster import CLUSTER_KINDS, ClusterSpec
from .errors import SpecError, SpecErrors, line_of, yaml_lines
from .job import JobSpec
from .paths import check_roots


def _reword(err: dict, data: Any, model: type[BaseModel]) -> tuple[str, str]:
    loc = [str(p) for p in err["loc"]]
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        known = _known_fields(model, err["loc"][:-1])
        close = difflib.get_close_matches(loc[-1], known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else (f" (known: {', '.join(known)})" if known else "")
        return ".".join(loc), f"unknown key{hint}"
    if kind == "missing":
        return ".".join(loc), "required field is missing"
    if kind == "value_error":
        msg = msg.removeprefix("Value error, ")
        # model-level validators name their own field as "field.path: reason"
        if ": " in msg and re.fullmatch(r"[A-Za-z_][\w.]*", msg.split(": ", 1)[0]):
            field, reason = msg.split(": ", 1)
            return ".".join([*loc, field]), reason
    if kind == "literal_error":
        got = err.get("input")
        return ".".join(loc), f"{got!r} is not allowed; {msg[0].lower()}{msg[1:]}"
    got = err.get("input")
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return ".".join(loc), f"{msg[0].lower()}{msg[1:]} (got {got!r})"
    return ".".join(loc), f"{msg[0].lower()}{msg[1:]}"


def _known_fields(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc:
        if isinstance(part, int):  # an item of a list of models: its fields are the model's
            continue
        field = model.model_fields.get(str(part))
        ann = field.annotation if field else None
        if typing.get_origin(ann) is list:
            ann = typing.get_args(ann)[0]
        elif typing.get_args(ann):  # an optional section (`X | None`): its model's fields
            ann = next((a for a in typing.get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)), ann)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return sorted(model.model_fields)


def parse_set(items: list[str] | None, where: str = "--set") -> dict:
    """`["train.steps=50", "model.size=S"]` → nested dict; values are parsed as YAML scalars."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise SpecError(where, item, "expected key.path=value")
        key, raw = item.split("=", 1)
        if not key or any(not p for p in key.split(".")):
            raise SpecError(where, key or item, "expected key.path=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise SpecError(where, key, "conflicts with another --set")
        node[parts[-1]] = value
    return out


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice in one mapping is an error: PyYAML would keep the
    last one silently, so half of a duplicated `train:` section would vanish."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[typing.Hashable, Any]:
        seen: set[typing.Hashable] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' is given twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    name = str(path)
    if not p.exists():
        raise SpecError(name, "", "no such file")
    if p.is_dir():
        raise SpecError(name, "", "is a directory, not a YAML file")
    if not p.is_file():  # a FIFO or device would block or stream forever
        raise SpecError(name, "", "cannot read: not a regular file")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(name, "", f"cannot read: {e.__class__.__name__}: {' '.join(str(e).split())}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "YAML"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError(name, where, f"YAML syntax error: {problem}") from None
    if data is None:
        raise SpecError(name, "", "file is empty")
    if not isinstance(data, dict):
        raise SpecError(name, "", f"top level must be a mapping of keys, got {type(data).__name__}")
    return data


def build(model: type[BaseModel], data: dict, name: str, lines: dict | None = None) -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        problems, seen = [], set()
        for err in e.errors():
            # a validator that found several problems gives one line per problem
            msgs = err["msg"].split("\n") if err["type"] == "value_error" else [err["msg"]]
            for msg in msgs:
                field, reason = _reword(
                    {
                        **err,
                        "msg": msg
                        if msg.startswith("Value error, ") or err["type"] != "value_error"
                        else f"Value error, {msg}",
                    },
                    data,
                    model,
                )
                if (field, reason) not in seen:
                    seen.add((field, reason))
                    problems.append(SpecError(name, field, reason))
        problems.sort(key=lambda p: line_of(p.field, lines or {}))  # stable: pydantic's order within a line
        raise (SpecErrors(problems) if len(problems) > 1 else problems[0]) from None


def load_job(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    data = _merge(read_yaml(path), parse_set(overrides))
    spec = build(JobSpec, data, str(path), yaml_lines(path))
    check_roots(spec, str(path))  # type: ignore[arg-type]
    return spec  # type: ignore[return-value]


def build_cluster(data: dict, name: str, lines: dict | None = None) -> ClusterSpec:
    """The `kind` key picks the model, so errors name fields of that kind only."""
    kind = data.get("kind", "embedded")
    if kind not in CLUSTER_KINDS:
        raise SpecError(name, "kind", f"{kind!r} is not allowed; expected one of {', '.join(CLUSTER_KINDS)}")
    return build(CLUSTER_KINDS[kind], data, name, lines)  # type: ignore[return-value]


def load_cluster(path: str | Path | None, overrides: list[str] | None = None) -> ClusterSpec:
    if path is None:
        return build_cluster(parse_set(overrides), "--set")
    data = _merge(read_yaml(path), parse_set(overrides))
    return build_cluster(data, str(path), yaml_lines(path))


def load_any(path: str | Path) -> BaseModel:
    """For `ditforge validate`: a file with a `kind` key and no `data` is a cluster spec."""
    data = read_yaml(path)
    if "kind" in data and "data" not in data:
        return build_cluster(data, str(path), yaml_lines(path))
    spec = build(JobSpec, data, str(path), yaml_lines(path))
    check_roots(spec, str(path))  # type: ignore[arg-type]
    return spec
