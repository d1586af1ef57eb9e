"""Importing code a user named explicitly in the config (a model factory, a PDE residual).

``"package.module:callable"`` is imported as a module; ``"path/to/file.py:callable"`` is loaded
from that file (relative paths: as given, else relative to the config file). Nothing else in
``lsr`` runs user code.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import ConfigError


def user_file(target: str, base_dir: Path | None) -> Path:
    """The file of a ``path/file.py:callable`` spec: as given, else relative to the config."""
    file = Path(target)
    if not file.is_absolute() and not file.exists() and base_dir is not None:
        file = base_dir / file
    return file


def import_callable(spec: str, key: str, base_dir: Path | None = None) -> Callable[..., Any]:
    """The callable named by ``spec``; any failure is one :class:`ConfigError` naming ``key``."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ConfigError(f"{key}: expected 'package.module:callable' or 'file.py:callable', got {spec!r}")
    try:
        if target.endswith(".py"):
            file = user_file(target, base_dir)
            if not file.is_file():
                raise ConfigError(f"{key}: file {target} not found")
            name = f"_lsr_user_{abs(hash(str(file.resolve())))}"
            mspec = importlib.util.spec_from_file_location(name, file)
            if mspec is None or mspec.loader is None:
                raise ConfigError(f"{key}: cannot import {file}")
            module = importlib.util.module_from_spec(mspec)
            sys.modules[name] = module
            mspec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ConfigError:
        raise
    except Exception as exc:  # user code: report any import failure in one line
        raise ConfigError(f"{key}: importing {target!r} failed: {type(exc).__name__}: {exc}") from None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise ConfigError(f"{key}: {target!r} has no callable {attr!r}")
    return fn
