"""Writing outputs safely: never over an input, never half-written, all or nothing."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from .errors import OutputError


def check_output_path(out: Path, inputs: list[Path], force: bool, what: str) -> None:
    """Fail fast, before any work: ``out`` must not be an input, must not exist unless
    ``force``, and its folder must exist (or be creatable) and be writable."""
    for src in inputs:
        if out.resolve() == src.resolve():
            raise OutputError(f"{out}: the {what} would overwrite the input {src}; choose another path")
    if out.is_dir():
        raise OutputError(f"{out}: the {what} path is a directory")
    if out.exists() and not force:
        raise OutputError(f"{out}: exists; pass --force to overwrite it")
    parent = out.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{out}: cannot create the {what}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{out}: cannot write the {what}: {parent} is not writable")


@contextmanager
def _temporary_beside(target: Path) -> Iterator[Path]:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise OutputError(f"{target}: cannot write: {exc.strerror or exc}") from None
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
    finally:
        tmp_path.unlink(missing_ok=True)


@contextmanager
def atomic_outputs(*targets: Path) -> Iterator[list[Path]]:
    """Yield one temporary path per target; rename them all onto the targets only if the
    block succeeds, so an error or interruption leaves every existing file untouched."""
    with ExitStack() as stack:
        temps = [stack.enter_context(_temporary_beside(t)) for t in targets]
        yield temps
        try:
            for tmp, target in zip(temps, targets, strict=True):
                os.replace(tmp, target)
        except OSError as exc:
            raise OutputError(f"cannot move the output into place: {exc}") from None
