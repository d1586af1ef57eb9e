"""Checkpoints: tell formats apart by content, load them safely, save refined ones atomically.

Formats (``LoadedCheckpoint.format``; docs/formats.md has the table):

- ``export``: a ``torch.export.save`` archive (``.pt2``; :mod:`lsr_cli.export` loads it after
  checking that nothing in it is unpickled unrestricted);
- ``torchscript``: a ``torch.jit.save`` archive (``torch.jit.load``);
- ``safetensors``: a safetensors file (header length + JSON header), weights only;
- ``state_dict``: ``torch.save`` of a mapping of tensors (or a training / Lightning checkpoint
  holding one, selected by ``model.key`` and ``model.prefix``), loaded with ``weights_only=True``
  plus an allow-list (:func:`allowed_globals`); the network comes from ``config.model.factory``;
- ``refined_torchscript`` / ``refined_state_dict`` / ``refined_safetensors``: outputs of
  ``lsr refine`` (``q(θ0, x) + J(x) δ``), which can be evaluated and refined again; ``refined_export``: the
  refined predictor as one ``.pt2`` program (evaluated, not refined again).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .checkpoint_formats import (
    STATE_FORMAT,
    TRUST_WARNING,
    _is_safetensors,
    _is_torchscript_archive,
    _refusal_reason,
)
from .config import ModelConfig
from .errors import CheckpointError, ConfigError
from .export import (
    is_pt2_archive,
    load_pt2,
    preload_jvp_decompositions,
    quiet_torch_deprecations,
)
from .models import BUILTIN_FACTORIES
from .scripted import is_refined_script, unpack_refined_script
from .unpickle import _torch_load, allowed_globals
from .usercode import import_callable, user_file

_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "module")


@dataclass
class LoadedCheckpoint:
    """A loaded checkpoint.

    ``module``: the base network at ``θ0`` (plain or TorchScript, original dtype, eval mode).
    ``delta``: the ``δ`` of a refined checkpoint (by parameter name), else ``None``.
    ``model_spec``: ``{"factory", "kwargs"}`` for state-dict formats.
    ``state_dict``: ``θ0`` as loaded (state-dict formats), to be saved again unchanged.
    ``warnings``: what the user should know (a nested key used, entries skipped, trust).
    """

    path: Path
    format: str
    module: nn.Module
    delta: dict[str, Tensor] | None = None
    model_spec: dict[str, Any] | None = None
    state_dict: dict[str, Tensor] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    example_inputs: tuple[Tensor, ...] | None = None  # of a torch.export program

    @property
    def is_refined(self) -> bool:
        return self.delta is not None

    @property
    def num_inputs(self) -> int | None:
        """Number of positional tensor inputs of ``forward`` when it can be read off."""
        if isinstance(self.module, torch.jit.ScriptModule):
            try:
                return len(self.module.forward.schema.arguments) - 1  # type: ignore[attr-defined]
            except (AttributeError, RuntimeError):
                return None
        return len(self.example_inputs) if self.example_inputs is not None else None


def require_plain_network(ckpt: LoadedCheckpoint) -> None:
    """`lsr iterate` starts from a plain network: a refined (linearized) checkpoint is refused."""
    if ckpt.delta is not None:
        raise CheckpointError(
            f"{ckpt.path}: `lsr iterate` starts from a plain network, not from a refined "
            "(linearized) checkpoint; pass the network that was refined"
        )


def canonical_factory(spec: str, base_dir: Path | None = None) -> str:
    """``spec`` with a file path made absolute, so that a refined checkpoint records a path
    that :func:`lsr_cli.load_refined` finds from any working directory."""
    target, sep, attr = spec.rpartition(":")
    if sep and target.endswith(".py"):
        return f"{user_file(target, base_dir).resolve()}:{attr}"
    return spec


def resolve_factory(spec: str, base_dir: Path | None = None) -> Callable[..., nn.Module]:
    """A built-in factory name, ``package.module:callable`` or ``path/to/file.py:callable``.

    User code is imported only here, and only because the user named it.
    """
    if spec in BUILTIN_FACTORIES:
        return BUILTIN_FACTORIES[spec]
    if ":" not in spec:
        raise ConfigError(
            f"config.model.factory: expected a built-in name ({', '.join(BUILTIN_FACTORIES)}) or "
            f"'package.module:callable' or 'file.py:callable', got {spec!r}"
        )
    return import_callable(spec, "config.model.factory", base_dir)


def _infer_mlp_kwargs(state: dict[str, Tensor], kwargs: dict[str, Any]) -> dict[str, Any]:
    weights = sorted(
        ((int(m.group(1)), t) for k, t in state.items() if (m := re.fullmatch(r"(?:[\w.]+\.)?net\.(\d+)\.weight", k))),
        key=lambda it: it[0],
    )
    if not weights:
        return kwargs
    out = dict(kwargs)
    out.setdefault("in_features", int(weights[0][1].shape[1]))
    out.setdefault("out_features", int(weights[-1][1].shape[0]))
    out.setdefault("hidden", [int(w.shape[0]) for _, w in weights[:-1]])
    return out


def _strip_common_prefix(state: dict[str, Tensor], expected: dict[str, Any]) -> tuple[dict[str, Tensor], str]:
    """``state`` without a first name component that every key shares and the model lacks
    (``module.`` of DataParallel, ``model.`` of a Lightning module), when that makes it fit."""
    heads = {k.split(".", 1)[0] for k in state}
    if len(heads) != 1 or not all("." in k for k in state):
        return state, ""
    prefix = heads.pop() + "."
    stripped = {k[len(prefix) :]: v for k, v in state.items()}
    return (stripped, prefix) if set(stripped) == set(expected) else (state, "")


def build_model(
    spec: ModelConfig | dict[str, Any],
    state: dict[str, Tensor],
    where: str,
    base_dir: Path | None = None,
    warnings: list[str] | None = None,
) -> tuple[nn.Module, dict[str, Any], dict[str, Tensor]]:
    """Instantiate the factory and load ``state`` strictly; returns the module, the spec and the
    state as loaded (a prefix shared by every key stripped when that made it fit)."""
    factory = spec.factory if isinstance(spec, ModelConfig) else spec.get("factory")
    kwargs = dict(spec.kwargs if isinstance(spec, ModelConfig) else spec.get("kwargs") or {})
    if not factory:
        raise ConfigError(
            f"config.model.factory: required for the state-dict checkpoint {where}; use the "
            "built-in 'mlp' (with kwargs in_features, out_features, hidden, activation) or "
            "'package.module:callable'"
        )
    if factory == "mlp":
        kwargs = _infer_mlp_kwargs(state, kwargs)
    fn = resolve_factory(factory, base_dir)
    try:
        model = fn(**kwargs)
    except Exception as exc:  # user code
        raise ConfigError(
            f"config.model: calling factory {factory!r} with kwargs {kwargs} failed: {type(exc).__name__}: {exc}"
        ) from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"config.model.factory: {factory!r} returned {type(model).__name__}, not a torch.nn.Module")
    # tensors only: some libraries put a non-tensor '_metadata' entry into their state dicts
    expected = {k: v for k, v in model.state_dict().items() if isinstance(v, Tensor)}
    if state and set(state) != set(expected):
        state, prefix = _strip_common_prefix(state, expected)
        if prefix and prefix != "module." and warnings is not None:
            warnings.append(f"{where}: stripped the prefix '{prefix}' of every key (model.prefix sets it)")
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing {missing[:4]}{'…' if len(missing) > 4 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:4]}{'…' if len(unexpected) > 4 else ''}")
        if mismatched:
            parts.append(f"shape mismatch (checkpoint vs model) {mismatched[:3]}")
        raise CheckpointError(f"{where}: state dict does not fit the model built by {factory!r}: {'; '.join(parts)}")
    model.load_state_dict(state, strict=True)
    return model.eval(), {"factory": canonical_factory(factory, base_dir), "kwargs": kwargs}, state


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:  # pragma: no cover - safetensors is a dependency
        raise CheckpointError(f"{path}: a safetensors file; install the safetensors package") from None
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # a corrupt header
        raise CheckpointError(f"{path}: not a readable safetensors file: {_refusal_reason(exc)}") from None


def _refined_safetensors(path: Path, tensors: dict[str, Tensor]) -> dict[str, Any] | None:
    """The payload of :func:`save_refined_state_dict` when ``path`` is a refined safetensors file
    (its metadata says so), else ``None``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    if meta.get("lsr_format") != STATE_FORMAT:
        return None
    try:
        return {
            "lsr_format": STATE_FORMAT,
            "model": json.loads(meta["model"]),
            "state_dict": {k[len("theta0.") :]: v for k, v in tensors.items() if k.startswith("theta0.")},
            "delta": {k[len("delta.") :]: v for k, v in tensors.items() if k.startswith("delta.")},
            "metadata": json.loads(meta.get("metadata", "{}")),
        }
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: a refined safetensors file with unreadable metadata ({exc})") from None


def _select_key(obj: Any, key: str, where: str) -> Any:
    """``obj[key]``; ``a/b`` goes down nested mappings."""
    for part in key.strip("/").split("/"):
        if not isinstance(obj, dict) or part not in obj:
            keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
            raise CheckpointError(f"{where}: config.model.key {key!r}: no entry {part!r}; found {keys}")
        obj = obj[part]
    return obj


def _select_prefix(state: dict[str, Tensor], prefix: str, where: str) -> dict[str, Tensor]:
    picked = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not picked:
        raise CheckpointError(
            f"{where}: config.model.prefix {prefix!r}: no entry starts with it; keys look like {list(state)[:4]}"
        )
    return picked


def _extract_state_dict(obj: Any, where: str, warnings: list[str]) -> dict[str, Tensor]:
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{where}: expected a state dict (mapping of names to tensors), found {type(obj).__name__}"
        )
    if obj and all(isinstance(v, Tensor) for v in obj.values()):
        return obj
    for key in _NESTED_KEYS:
        inner = obj.get(key)
        if isinstance(inner, dict) and inner and all(isinstance(v, Tensor) for v in inner.values()):
            warnings.append(f"{where}: using the state dict stored under key '{key}' (model.key chooses another)")
            return inner
    tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise CheckpointError(
            f"{where}: no tensors found; top-level keys: {list(obj)[:8]} (model.key selects a nested state dict)"
        )
    skipped = [k for k in obj if k not in tensors]
    warnings.append(f"{where}: skipped non-tensor entries {skipped[:6]}")
    return tensors


def load_checkpoint(
    path: str | Path, model: ModelConfig | None = None, base_dir: Path | None = None
) -> LoadedCheckpoint:
    """Load any supported checkpoint (see module docstring); nothing but weights is unpickled
    unless ``model.trust_checkpoint``."""
    p = Path(path)
    model = model or ModelConfig()
    if not p.is_file():
        raise CheckpointError(f"{p}: checkpoint file not found")
    warnings: list[str] = []
    preload_jvp_decompositions()
    if is_pt2_archive(p):
        if model.trust_checkpoint:
            warnings.append(TRUST_WARNING.format(path=p))
        program = load_pt2(p, trust=model.trust_checkpoint)
        if program.lsr is not None:
            return LoadedCheckpoint(p, "refined_export", program.module, metadata=program.lsr, warnings=warnings)
        return LoadedCheckpoint(p, "export", program.module, warnings=warnings, example_inputs=program.example_inputs)
    if _is_torchscript_archive(p):
        try:
            with quiet_torch_deprecations():
                module = torch.jit.load(str(p), map_location="cpu")
        except Exception as exc:  # corrupt archive
            raise CheckpointError(f"{p}: not a loadable TorchScript archive: {_refusal_reason(exc)}") from None
        module.eval()
        if is_refined_script(module):
            base, delta, meta = unpack_refined_script(module)
            return LoadedCheckpoint(p, "refined_torchscript", base, delta=delta, metadata=meta)
        return LoadedCheckpoint(p, "torchscript", module)
    if _is_safetensors(p):
        obj: Any = _load_safetensors(p)
        fmt = "safetensors"
        refined = _refined_safetensors(p, obj)
        if refined is not None:
            obj = refined
    else:
        obj = _torch_load(p, model, warnings)
        fmt = "state_dict"
    if isinstance(obj, dict) and obj.get("lsr_format") == STATE_FORMAT:
        spec = obj["model"]
        if model.factory:
            spec = {"factory": model.factory, "kwargs": model.kwargs or spec.get("kwargs", {})}
        state = obj["state_dict"]
        module, spec, state = build_model(spec, state, str(p), base_dir)
        return LoadedCheckpoint(
            p,
            "refined_safetensors" if fmt == "safetensors" else "refined_state_dict",
            module,
            delta=dict(obj["delta"]),
            model_spec=spec,
            state_dict=state,
            metadata=obj.get("metadata", {}),
        )
    if model.key:
        obj = _select_key(obj, model.key, str(p))
    state = _extract_state_dict(obj, str(p), warnings)
    if model.prefix:
        state = _select_prefix(state, model.prefix, str(p))
    module, spec, state = build_model(model, state, str(p), base_dir, warnings)
    return LoadedCheckpoint(p, fmt, module, model_spec=spec, state_dict=state, warnings=warnings)


__all__ = [
    "STATE_FORMAT",
    "LoadedCheckpoint",
    "allowed_globals",
    "build_model",
    "load_checkpoint",
    "require_plain_network",
]
