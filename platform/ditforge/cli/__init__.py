"""`ditforge`: each verb parses its arguments, calls one function, and turns user errors into one
`error: ...` line with exit code 2. One module per verb group (common.py: what they share); this one
puts their commands on the app, in the order `ditforge --help` lists them."""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING

import typer

from . import bench, cluster, data, demo, jobs, models, services
from .common import err

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Train latent diffusion transformers on Ray + DeepSpeed."
)
for fn in (jobs.validate, jobs.submit, jobs.status, jobs.logs, jobs.stop, services.ui):
    app.command()(fn)
app.command("export")(models.export_cmd)
for fn in (models.register, models.sample, bench.bench, models.model_info, demo.demo):
    app.command()(fn)
app.add_typer(services.app, name="services")
app.add_typer(cluster.app, name="cluster")
app.add_typer(data.app, name="data")


def main(argv: list[str] | None = None) -> None:
    """Usage errors too (an unknown command or option, a bad option value, a missing argument)
    are one `error:` line and exit 2, instead of click's usage block."""
    if TYPE_CHECKING:  # typed as click's own; at run time typer's vendored copy where there is one
        from click import exceptions as click
    else:
        try:  # typer >= 0.2x vendors its own click
            from typer._click import exceptions as click
        except ImportError:
            from click import exceptions as click

    logging.getLogger("ray").setLevel(logging.WARNING)  # the Jobs SDK's "uploading package" chatter
    try:
        code = app(args=argv, prog_name="ditforge", standalone_mode=False)
    except click.NoArgsIsHelpError as e:  # bare `ditforge` or `ditforge data`: the help
        e.show()
        code = e.exit_code
    except click.UsageError as e:
        where = e.ctx.command_path if e.ctx else "ditforge"
        err.print(
            f"error: {where}: {' '.join(e.format_message().split())}", markup=False, highlight=False, soft_wrap=True
        )
        code = 2
    except click.ClickException as e:
        err.print(f"error: {' '.join(e.format_message().split())}", markup=False, highlight=False, soft_wrap=True)
        code = e.exit_code
    except getattr(click, "Abort", KeyboardInterrupt):  # typer's vendored click has no Abort
        code = 1
    sys.exit(code if isinstance(code, int) else 0)
