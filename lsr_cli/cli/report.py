"""``lsr report``: plots and an HTML page from a saved report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from lsr_cli.errors import ConfigError
from lsr_cli.outputs import atomic_outputs, check_output_path
from lsr_cli.report import output_console

from .guard import guard
from .options import (
    OUTPUT,
    DebugOpt,
    ForceOpt,
    Option,
)
from .output import (
    check_plots,
)

REPORT_EXAMPLES = """\
Examples (from the repository root):

# the report that `lsr refine`'s first example wrote
lsr report runs/regression.refined.report.json --html runs/regression.html
"""


def report_cmd(
    report: Annotated[Path, typer.Argument(help="A JSON report of lsr refine, iterate or instances.")],
    html: Annotated[
        Path, Option("--html", help="HTML page to write (PNGs go in a folder beside it).", rich_help_panel=OUTPUT)
    ],
    force: ForceOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Plots and an HTML page from a saved report (needs matplotlib)."""
    with guard(debug):
        from lsr_cli.plots import write_html, write_plots

        check_output_path(html, [report], force, "HTML page")
        check_plots(html.with_suffix(""), [report])
        if not report.is_file():
            raise ConfigError(f"{report}: report file not found")
        try:
            payload = json.loads(report.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ConfigError(f"{report}: not a JSON report ({exc})") from None
        if not isinstance(payload, dict) or "command" not in payload:
            raise ConfigError(f"{report}: not an lsr report (no 'command' field)")
        folder = html.with_name(html.stem + "_files")
        images = write_plots(payload, folder)
        with atomic_outputs(html) as (tmp_html,):
            write_html(payload, tmp_html, images)
        output_console().print(escape(f"wrote {html} ({len(images)} plots in {folder})"), highlight=False)
