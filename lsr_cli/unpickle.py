"""Restricted unpickling of ``torch.save`` checkpoints: ``weights_only=True`` plus an allow-list of the
globals a checkpoint names (:func:`allowed_globals`), or unrestricted with ``model.trust_checkpoint``."""

from __future__ import annotations

import importlib
import pickle
import re
import sys
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from .checkpoint_formats import (
    _TORCH_FUNCTION_MODULES,
    TRUST_WARNING,
    _refusal_reason,
)
from .config import ModelConfig
from .errors import CheckpointError


def _factory_package(factory: str | None) -> str | None:
    """The top-level package of a ``package.module:callable`` factory (``None`` for built-ins
    and files): its classes may be named in the checkpoint, since the user runs its code."""
    if not factory or ":" not in factory:
        return None
    target = factory.rpartition(":")[0]
    if target.endswith(".py") or not re.fullmatch(r"[A-Za-z_][\w.]*", target):
        return None
    package = target.split(".")[0]
    # torch and the standard library are never allowed wholesale (torch.load, os.system, …)
    return None if package == "torch" or package in sys.stdlib_module_names else package


def _resolve_global(name: str) -> Any:
    """The object that ``module.attr`` names (the longest importable module prefix, then attributes)."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(name)


def allowed_globals(names: list[str], factory: str | None) -> tuple[list[tuple[Any, str]], list[str]]:
    """Split the globals a checkpoint pickles into ``(allowed, refused)``.

    Allowed: torch's math functions (``torch.nn.functional.*``, ``torch._C._nn.*``, …), torch's
    ``nn.Module`` classes, and classes and functions defined in the factory's package. Nothing
    is imported for a refused name; modules are imported only under ``torch`` and that package.
    """
    package = _factory_package(factory)
    allowed: list[tuple[Any, str]] = []
    refused: list[str] = []
    for name in names:
        module = name.rpartition(".")[0]
        ok = False
        try:
            if module in _TORCH_FUNCTION_MODULES:
                obj = _resolve_global(name)
                ok = callable(obj) and not isinstance(obj, type)
            elif module.startswith("torch.nn.modules."):
                obj = _resolve_global(name)
                ok = isinstance(obj, type) and issubclass(obj, nn.Module)
            elif package is not None and (module == package or module.startswith(package + ".")):
                obj = _resolve_global(name)
                origin = str(getattr(obj, "__module__", "") or "")
                ok = (isinstance(obj, type) or callable(obj)) and (
                    origin == package or origin.startswith(package + ".")
                )
        except Exception:  # not importable: refused below
            ok = False
        if ok:
            allowed.append((obj, name))
        else:
            refused.append(name)
    return allowed, refused


def _pickled_globals(path: Path) -> list[str]:
    """Globals a ``torch.save`` file needs beyond torch's default allow-list (read, not run)."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # the legacy (non-zip) format: ask the unpickler one global at a time
        found: list[str] = []
        for _ in range(64):
            try:
                with torch.serialization.safe_globals(cast(Any, [(object(), n) for n in found])):
                    torch.load(str(path), map_location="cpu", weights_only=True)
                return found
            except Exception as exc:  # a dummy stands in for each global found: nothing runs
                m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
                if m is None or m.group(1) in found:
                    return found
                found.append(m.group(1))
        return found


def _torch_load(path: Path, model: ModelConfig, warnings: list[str]) -> Any:
    """``torch.load`` with ``weights_only=True`` plus :func:`allowed_globals`; with
    ``model.trust_checkpoint`` unrestricted (and a warning)."""
    if model.trust_checkpoint:
        warnings.append(TRUST_WARNING.format(path=path))
        try:
            return torch.load(str(path), map_location="cpu", weights_only=False)
        except Exception as exc:
            raise CheckpointError(f"{path}: not a PyTorch checkpoint: {_refusal_reason(exc)}") from None
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = exc
    except Exception as exc:
        raise CheckpointError(
            f"{path}: not a PyTorch checkpoint (neither TorchScript, torch.export, safetensors nor torch.save): "
            f"{_refusal_reason(exc)}"
        ) from None
    allowed, refused = allowed_globals(_pickled_globals(path), model.factory)
    if refused or not allowed:
        refused = sorted(refused)
        what = (
            f"it pickles the Python object{'s' if len(refused) > 1 else ''} {', '.join(refused[:4])}"
            if refused
            else _refusal_reason(first)
        )
        package = _factory_package(model.factory)
        scope = "torch's functions and module classes" + (f" and the factory's package {package}" if package else "")
        libraries = sorted({n.split(".")[0] for n in refused} - {"torch", "builtins", *sys.stdlib_module_names})
        hint = (
            f"a state dict of {libraries[0]} loads when model.factory names its constructor "
            f"('{libraries[0]}.module:Class'), since that package's classes are then allowed; else save "
            if libraries and libraries[0] != package
            else "save "
        )
        raise CheckpointError(
            f"{path}: refused: not plain weights ({what}; allowed are {scope}); {hint}"
            "torch.save(model.state_dict(), path), or if you trust the file set model.trust_checkpoint: true "
            "or pass --trust-checkpoint"
        )
    try:
        with torch.serialization.safe_globals(cast(Any, allowed)):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: refused: not plain weights ({_refusal_reason(exc)})") from None
