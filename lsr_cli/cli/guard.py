"""Errors to exit codes: every :class:`~lsr_cli.errors.LsrError` becomes one line on stderr and its exit
code; an unexpected exception is a bug: one line and exit code 1, or the traceback with ``--debug``."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from lsr_cli.distributed import SINGLE, Comm, launched_by_torchrun
from lsr_cli.errors import ConfigError, LsrError

stderr_console = Console(stderr=True)

STATUS_ENV = "LSR_STATUS_FILE"
"""Set by ``lsr refine --nproc``: the rank that reports the error writes its exit code there."""

current_comm: dict[str, Comm] = {"comm": SINGLE}  # the running command's communicator (set under torchrun)


def _reports_errors() -> bool:
    """Whether this process prints the error line: always on one process; under ``torchrun``
    only the first rank that fails (ranks agree through the process group's store), or rank 0
    before the process group exists (errors there are the same on every rank)."""
    comm = current_comm["comm"]
    if comm.distributed:
        return comm.claim_error_report()
    if launched_by_torchrun():
        return os.environ.get("RANK", "0") == "0"
    return True


def fail(message: str, code: int) -> typer.Exit:
    comm = current_comm["comm"]
    if not _reports_errors():
        return typer.Exit(code)
    if comm.world > 1:
        message = f"rank {comm.rank} of {comm.world}: {message}"
    stderr_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    status = os.environ.get(STATUS_ENV)
    if status:
        with contextlib.suppress(OSError):
            Path(status).write_text(str(code), encoding="ascii")
    return typer.Exit(code)


def single_process_only(command: str) -> None:
    """``instances`` does not run distributed yet: refuse under torchrun with several ranks."""
    if launched_by_torchrun() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            f"lsr {command} does not run on several processes yet (only `lsr refine` and `lsr iterate` do); "
            "run it without torchrun"
        )


class PeerFailed(Exception):
    """Another rank failed (it reported the error); this one exits without a message."""


@contextlib.contextmanager
def guard(debug: bool):
    """Map errors to one line + exit code (tracebacks only with ``--debug``)."""
    try:
        yield
    except typer.Exit:
        raise
    except PeerFailed:
        raise typer.Exit(1) from None
    except LsrError as exc:
        if debug:
            raise
        raise fail(str(exc), exc.exit_code) from None
    except KeyboardInterrupt:
        raise fail("interrupted; nothing was written", 130) from None
    except Exception as exc:  # a bug
        if debug:
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise fail(f"internal error: {type(exc).__name__}: {msg} (rerun with --debug for the traceback)", 1) from None


def warn(messages: list[str], quiet: bool) -> None:
    if not quiet:
        for m in messages:
            stderr_console.print(f"[yellow]warning:[/] {escape(m)}", highlight=False, soft_wrap=True)
