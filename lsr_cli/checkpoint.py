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

import importlib
import json
import pickle
import re
import struct
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from .config import OUTPUT_FORMATS, ModelConfig
from .errors import CheckpointError, ConfigError
from .export import (
    export_refined,
    is_pt2_archive,
    load_pt2,
    preload_jvp_decompositions,
    quiet_torch_deprecations,
    save_refined_export,
)
from .models import BUILTIN_FACTORIES
from .runtime import cast_tensor
from .scripted import build_refined_script, is_refined_script, unpack_refined_script
from .usercode import import_callable, user_file

STATE_FORMAT = "lsr-refined-state-dict/1"
_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "module")
TRUST_WARNING = (
    "{path}: loaded with model.trust_checkpoint (unrestricted unpickling: any code in the file ran); "
    "use only files from sources you trust"
)
# torch modules whose functions may be named in a checkpoint (activation functions and other
# math on tensors: nothing that reads files, imports or runs code)
_TORCH_FUNCTION_MODULES = (
    "torch.nn.functional",
    "torch._C._nn",
    "torch._C._special",
    "torch._C._fft",
    "torch._C._linalg",
    "torch.special",
    "torch.fft",
    "torch.linalg",
)


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


def _is_safetensors(path: Path) -> bool:
    """A safetensors file: 8 bytes of little-endian header length, then a JSON object."""
    with path.open("rb") as fh:
        head = fh.read(9)
    if len(head) < 9:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 8 + length <= path.stat().st_size


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


def save_refined_state_dict(
    path: Path,
    ckpt: LoadedCheckpoint,
    delta: dict[str, Tensor],
    dtype: torch.dtype,
    metadata: dict[str, Any],
    safetensors: bool = False,
) -> None:
    """Write ``{θ0, δ, model spec}`` to ``path`` (loadable with ``weights_only=True``); with
    ``safetensors`` as a safetensors file: tensors ``theta0.<name>`` and ``delta.<name>``, the
    model spec and the metadata as JSON strings in its header.

    The caller makes it atomic (:func:`lsr_cli.outputs.atomic_outputs`).
    """
    if safetensors:
        from safetensors.torch import save_file

        assert ckpt.state_dict is not None and ckpt.model_spec is not None
        tensors = {f"theta0.{k}": v.detach().contiguous().clone() for k, v in ckpt.state_dict.items()}
        tensors.update({f"delta.{k}": cast_tensor(v.detach(), dtype, "cpu").contiguous() for k, v in delta.items()})
        header = {
            "lsr_format": STATE_FORMAT,
            "model": json.dumps(ckpt.model_spec),
            "dtype": str(dtype).replace("torch.", ""),
            "metadata": json.dumps(metadata),
        }
        save_file(tensors, str(path), metadata=header)
        return
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


def resolve_output_format(requested: str | None, ckpt: LoadedCheckpoint) -> str:
    """The refined checkpoint's format: ``requested`` (``output.format`` / ``--format``), else
    the input's family (TorchScript → ``torchscript``, ``.pt2`` → ``export``, weights →
    ``state-dict``). Checked before any work: a format the input cannot give is an error."""
    if ckpt.format == "refined_export":
        raise CheckpointError(
            f"{ckpt.path}: a refined predictor exported with torch.export (θ0 and δ folded into one program) "
            "cannot be refined again; refine the original checkpoint, or write refined checkpoints with "
            "--format torchscript or state-dict to refine them again"
        )
    family = {
        "torchscript": "torchscript",
        "refined_torchscript": "torchscript",
        "export": "export",
        "safetensors": "safetensors",
        "refined_safetensors": "safetensors",
    }
    fmt = requested or family.get(ckpt.format, "state-dict")
    if fmt not in OUTPUT_FORMATS:
        raise ConfigError(f"config.output.format: expected one of {', '.join(OUTPUT_FORMATS)}, got {fmt!r}")
    if fmt in ("state-dict", "safetensors") and ckpt.state_dict is None:
        raise CheckpointError(
            f"{ckpt.path}: --format {fmt} (output.format) needs a state-dict checkpoint rebuilt by "
            f"model.factory, this one is {ckpt.format}; use --format export or torchscript"
        )
    if fmt == "torchscript" and not isinstance(ckpt.module, torch.jit.ScriptModule):
        try:
            with quiet_torch_deprecations():
                torch.jit.script(ckpt.module)
        except Exception as exc:  # the network does not compile
            raise CheckpointError(
                f"{ckpt.path}: --format torchscript: the network does not compile with torch.jit.script "
                f"({_refusal_reason(exc)}); use --format export"
            ) from None
    return fmt


def save_refined(
    path: Path,
    fmt: str,
    ckpt: LoadedCheckpoint,
    base: nn.Module,
    delta: dict[str, Tensor],
    dtype: torch.dtype,
    metadata: dict[str, Any],
    inputs: tuple[Any, ...],
    shared: tuple[bool, ...] = (),
) -> dict[str, Any]:
    """Write the refined checkpoint ``q(θ0, x) + J(x) δ`` in ``fmt`` (see
    :func:`resolve_output_format`) to ``path``; the caller makes it atomic.

    ``base``: the network at ``θ0`` in the refinement dtype (on the CPU); ``inputs``: the
    data's inputs (a few rows are traced for ``export``). Returns the report's output fields:
    ``format`` and, for ``export``, whether each input kept a dynamic batch dimension.
    """
    if fmt in ("state-dict", "safetensors"):
        save_refined_state_dict(path, ckpt, delta, dtype, metadata, safetensors=fmt == "safetensors")
        return {"format": "refined_state_dict" if fmt == "state-dict" else "refined_safetensors"}
    if fmt == "torchscript":
        with quiet_torch_deprecations():
            script = base if isinstance(base, torch.jit.ScriptModule) else torch.jit.script(base)
            build_refined_script(script, delta, len(inputs), metadata).save(str(path))
        return {"format": "refined_torchscript"}
    exported = export_refined(base, delta, inputs, shared)
    names = [n for n, p in base.named_parameters() if p.is_floating_point() or p.is_complex()]
    save_refined_export(path, exported, names, metadata)
    out: dict[str, Any] = {
        "format": "refined_export",
        "dynamic_batch": exported.dynamic,
        "input_dtype": exported.dtype,
    }
    fixed = [
        i
        for i, (d, sh) in enumerate(zip(exported.dynamic, shared or (False,) * len(inputs), strict=False))
        if not d and not sh
    ]
    if fixed:
        out["warning"] = (
            f"the .pt2 runs only at batch size {exported.example_shapes[fixed[0]][0]}: tracing fixed the "
            "leading dimension of input(s) "
            + ", ".join(str(i) for i in fixed)
            + " (some derivative formulas, e.g. torch's double backward of convolutions, trace with fixed sizes); "
            "--format torchscript has no such limit"
        )
    return out


def refined_suffix(path: Path, fmt: str | None) -> str:
    """The default suffix of the refined checkpoint: ``.refined.pt2`` for ``export`` (asked for,
    or the input is a ``.pt2``), ``.refined.safetensors`` likewise for safetensors, else
    ``.refined.pt``."""
    if fmt == "export" or (fmt is None and path.is_file() and is_pt2_archive(path)):
        return ".refined.pt2"
    if fmt == "safetensors" or (fmt is None and path.is_file() and _is_safetensors(path)):
        return ".refined.safetensors"
    return ".refined.pt"
