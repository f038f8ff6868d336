"""bench: throughput, overhead, memory and checkpoint stalls."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from .common import err, out, user_errors


@user_errors
def bench(
    json_path: Path = typer.Option(Path("bench.json"), "--json", help="where to write the JSON results"),
    quick: bool = typer.Option(False, "--quick", help="small sizes, few repeats (CI smoke run)"),
    section: Optional[List[str]] = typer.Option(None, "--section", help="run only these sections"),
    focus: bool = typer.Option(False, "--focus", help="GPU headline only: XL/2, its ablation, fp8 vs bf16"),
) -> None:
    """Measure throughput, overhead, memory and checkpoint stalls; write JSON and print a table."""
    from ..bench.run import SECTIONS, run_all, write

    unknown = set(section or []) - set(SECTIONS)
    if unknown:
        from ..spec import SpecError

        raise SpecError("--section", ",".join(sorted(unknown)), f"unknown section (known: {', '.join(SECTIONS)})")
    # Written after each section too: a GPU run cut short by its time limit keeps what it measured.
    result = run_all(
        quick,
        section,
        focus,
        on_section=lambda r: write(r, str(json_path)),
        command="ditforge " + " ".join(sys.argv[1:]),
    )
    write(result, str(json_path))
    for c in result["configs"]:
        table = Table(title=f"{c['section']}: {c['name']}", show_header=False)
        for k, v in c.items():
            if k not in ("section", "name"):
                table.add_row(k, json.dumps(v) if isinstance(v, (dict, list)) else str(v))
        out.print(table)
    for name, e in result["errors"].items():
        err.print(f"bench section {name} failed: {e}", markup=False)
    out.print(f"wrote {json_path}", highlight=False)
    if result["errors"]:
        raise typer.Exit(1)
