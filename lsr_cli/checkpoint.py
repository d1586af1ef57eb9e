"""Checkpoints: tell formats apart by content, load them safely, save refined ones atomically.

Formats (``LoadedCheckpoint.format``):

- ``torchscript``: a ``torch.jit.save`` archive (``torch.jit.load``);
- ``state_dict``: ``torch.save`` of a mapping of tensors, loaded with ``weights_only=True``;
  the network comes from ``config.model.factory`` (built-in ``mlp`` or user code named there);
- ``refined_torchscript`` / ``refined_state_dict``: outputs of ``lsr refine``
  (``q(θ0, x) + J(x) δ``), which can be evaluated and refined again.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .config import ModelConfig
from .errors import CheckpointError, ConfigError
from .models import BUILTIN_FACTORIES
from .runtime import cast_tensor
from .scripted import is_refined_script, unpack_refined_script
from .usercode import import_callable, user_file

STATE_FORMAT = "lsr-refined-state-dict/1"
_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "module")


@dataclass
class LoadedCheckpoint:
    """A loaded checkpoint.

    ``module``: the base network at ``θ0`` (plain or TorchScript, original dtype, eval mode).
    ``delta``: the ``δ`` of a refined checkpoint (by parameter name), else ``None``.
    ``model_spec``: ``{"factory", "kwargs"}`` for state-dict formats.
    ``state_dict``: ``θ0`` as loaded (state-dict formats), to be saved again unchanged.
    """

    path: Path
    format: str
    module: nn.Module
    delta: dict[str, Tensor] | None = None
    model_spec: dict[str, Any] | None = None
    state_dict: dict[str, Tensor] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

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
        return None


def _is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    return any("/code/" in n or n.endswith("constants.pkl") for n in names)


def _refusal_reason(exc: Exception) -> str:
    text = str(exc)
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if m:
        return f"it pickles the Python object {m.group(1)}"
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    if len(first) < 8 or first.isdigit():
        return f"unrecognized content ({type(exc).__name__})"
    return first[:160]


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
        ((int(m.group(1)), t) for k, t in state.items() if (m := re.fullmatch(r"net\.(\d+)\.weight", k))),
        key=lambda it: it[0],
    )
    if not weights:
        return kwargs
    out = dict(kwargs)
    out.setdefault("in_features", int(weights[0][1].shape[1]))
    out.setdefault("out_features", int(weights[-1][1].shape[0]))
    out.setdefault("hidden", [int(w.shape[0]) for _, w in weights[:-1]])
    return out


def build_model(
    spec: ModelConfig | dict[str, Any], state: dict[str, Tensor], where: str, base_dir: Path | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Instantiate the factory and load ``state`` strictly; returns the module and the spec."""
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
    expected = model.state_dict()
    if state and all(k.startswith("module.") for k in state) and not any(k.startswith("module.") for k in expected):
        state = {k[len("module.") :]: v for k, v in state.items()}
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
    return model.eval(), {"factory": canonical_factory(factory, base_dir), "kwargs": kwargs}


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
            warnings.append(f"{where}: using the state dict stored under key '{key}'")
            return inner
    tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise CheckpointError(f"{where}: no tensors found; top-level keys: {list(obj)[:8]}")
    skipped = [k for k in obj if k not in tensors]
    warnings.append(f"{where}: skipped non-tensor entries {skipped[:6]}")
    return tensors


def load_checkpoint(
    path: str | Path, model: ModelConfig | None = None, base_dir: Path | None = None
) -> LoadedCheckpoint:
    """Load any supported checkpoint (see module docstring); nothing but weights is unpickled."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: checkpoint file not found")
    if _is_torchscript_archive(p):
        try:
            module = torch.jit.load(str(p), map_location="cpu")
        except Exception as exc:  # corrupt archive
            raise CheckpointError(f"{p}: not a loadable TorchScript archive: {_refusal_reason(exc)}") from None
        module.eval()
        if is_refined_script(module):
            base, delta, meta = unpack_refined_script(module)
            return LoadedCheckpoint(p, "refined_torchscript", base, delta=delta, metadata=meta)
        return LoadedCheckpoint(p, "torchscript", module)
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{p}: refused: not plain weights ({_refusal_reason(exc)}); save "
            "torch.save(model.state_dict(), path) or a TorchScript module instead"
        ) from None
    except Exception as exc:
        raise CheckpointError(
            f"{p}: not a PyTorch checkpoint (neither TorchScript nor torch.save): {_refusal_reason(exc)}"
        ) from None
    warnings: list[str] = []
    if isinstance(obj, dict) and obj.get("lsr_format") == STATE_FORMAT:
        spec = obj["model"]
        if model is not None and model.factory:
            spec = {"factory": model.factory, "kwargs": model.kwargs or spec.get("kwargs", {})}
        state = obj["state_dict"]
        module, spec = build_model(spec, state, str(p), base_dir)
        return LoadedCheckpoint(
            p,
            "refined_state_dict",
            module,
            delta=dict(obj["delta"]),
            model_spec=spec,
            state_dict=state,
            metadata=obj.get("metadata", {}),
        )
    state = _extract_state_dict(obj, str(p), warnings)
    module, spec = build_model(model or ModelConfig(), state, str(p), base_dir)
    return LoadedCheckpoint(p, "state_dict", module, model_spec=spec, state_dict=state, warnings=warnings)


def save_refined_state_dict(
    path: Path, ckpt: LoadedCheckpoint, delta: dict[str, Tensor], dtype: torch.dtype, metadata: dict[str, Any]
) -> None:
    """Write ``{θ0, δ, model spec}`` to ``path`` (loadable with ``weights_only=True``).

    The caller makes it atomic (:func:`lsr_cli.outputs.atomic_outputs`).
    """
    assert ckpt.state_dict is not None and ckpt.model_spec is not None
    payload = {
        "lsr_format": STATE_FORMAT,
        "model": ckpt.model_spec,
        "state_dict": ckpt.state_dict,
        "delta": {k: cast_tensor(v.detach(), dtype, "cpu") for k, v in delta.items()},
        "dtype": str(dtype).replace("torch.", ""),
        "metadata": metadata,
    }
    torch.save(payload, path)
