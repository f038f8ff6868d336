"""How much of the package is typed, measured from the source: a function counts as fully annotated
when its return and every parameter but `self`/`cls` carry an annotation (`__init__` needs no
return). mypy (`make lint`) checks the bodies; this keeps the share of typed signatures, which
mypy would otherwise skip, from sliding back."""

from __future__ import annotations

import ast

from ..conftest import REPO

PACKAGE = REPO / "platform" / "ditforge"
MIN_SHARE = 0.95


def _untyped(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    a = fn.args
    params = [*a.posonlyargs, *a.args, *a.kwonlyargs, *[p for p in (a.vararg, a.kwarg) if p]]
    missing = [p.arg for p in params if p.annotation is None and p.arg not in ("self", "cls")]
    return bool(missing) or (fn.returns is None and fn.name != "__init__")


def annotation_share() -> tuple[float, list[str]]:
    """(share of fully annotated functions, 'file:line name' of the others)."""
    total, untyped = 0, []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                total += 1
                if _untyped(node):
                    untyped.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}")
    return 1 - len(untyped) / total, untyped


def test_at_least_95_percent_of_functions_are_fully_annotated():
    share, untyped = annotation_share()
    assert share >= MIN_SHARE, f"{share:.1%} fully annotated (< {MIN_SHARE:.0%}); untyped:\n" + "\n".join(untyped)


def test_the_measure_sees_what_is_missing():
    tree = ast.parse(
        "def a(x: int) -> int: ...\ndef b(x) -> int: ...\ndef c(self, x: int): ...\ndef __init__(self): ..."
    )
    assert [_untyped(f) for f in tree.body] == [False, True, True, False]
