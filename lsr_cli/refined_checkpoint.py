"""Writing a refined checkpoint (``q(θ0, x) + J(x) δ``) in each output format, and the output format
and file suffix a run resolves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .checkpoint import LoadedCheckpoint
from .checkpoint_formats import (
    STATE_FORMAT,
    _is_safetensors,
    _refusal_reason,
)
from .config import OUTPUT_FORMATS
from .errors import CheckpointError, ConfigError
from .export import (
    export_refined,
    is_pt2_archive,
    quiet_torch_deprecations,
    save_refined_export,
)
from .runtime import cast_tensor
from .scripted import build_refined_script


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
