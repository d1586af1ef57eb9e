"""The ``lsr`` command line (Typer): the only package that imports Typer, prints errors and exits.

One module per command (:mod:`.refine`, :mod:`.iterate`, :mod:`.instances`, :mod:`.evaluate`,
:mod:`.inspect`, :mod:`.report`) on the shared parts: :mod:`.app` (the Typer app),
:mod:`.guard` (errors to exit codes), :mod:`.options` (shared options, config overrides,
paths), :mod:`.output` (tables, report fields, plots) and :mod:`.launch` (``--nproc``).
Outputs are written only when everything succeeded, atomically.
"""

from __future__ import annotations

from lsr_cli.errors import EXIT_CODES, OutputError

from . import evaluate, inspect, instances, iterate, refine, report
from .app import app
from .iterate import ITERATE_METADATA

COMMANDS = (
    ("refine", refine.refine_cmd, refine.REFINE_EXAMPLES),
    ("evaluate", evaluate.evaluate_cmd, evaluate.EVALUATE_EXAMPLES),
    ("inspect", inspect.inspect_cmd, inspect.INSPECT_EXAMPLES),
    ("report", report.report_cmd, report.REPORT_EXAMPLES),
    ("instances", instances.instances_cmd, instances.INSTANCES_EXAMPLES),
    ("iterate", iterate.iterate_cmd, iterate.ITERATE_EXAMPLES),
)
"""Every command: its name, function and ``--help`` examples, in the order ``lsr --help`` lists them."""

for _name, _command, _examples in COMMANDS:
    app.command(_name, epilog=_examples)(_command)


def main() -> None:
    """Console-script entry point."""
    app()


__all__ = ["EXIT_CODES", "ITERATE_METADATA", "OutputError", "app", "main"]
