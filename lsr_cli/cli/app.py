"""The Typer application of ``lsr``: its help, ``--version``; the commands register on it."""

from __future__ import annotations

from typing import Annotated

import typer

from lsr_cli import __version__

app = typer.Typer(
    name="lsr",
    help="Linearized Subspace Refinement: make a trained network more accurate.\n\n"
    "Which command: `refine` for a more accurate predictor of a regressor, operator network or PINN; "
    "`iterate` for a more accurate plain network of a PINN; `instances` to refine an operator network "
    "per input function; `evaluate`, `inspect` and `report` to look at checkpoints and reports.",
    epilog="Exit codes: 0 success, 1 internal error, 2 config/usage, 3 data, 4 checkpoint, 5 numerical, "
    "6 output exists / not writable, 7 device not available. Config keys: docs/configuration.md.",
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lsr {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Exit codes: 0 success, 1 internal error, 2 config/usage, 3 data, 4 checkpoint,
    5 numerical, 6 output exists / not writable, 7 device not available."""
