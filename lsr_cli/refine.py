"""One-shot LSR end to end, as a library call: :func:`refine` and :func:`evaluate`.

``refine`` linearizes the training residual ``f(θ) = vec(q(θ, X) − Y)`` at the checkpoint's
weights, sketches the Jacobian (:mod:`.sketch`), projects it on the scaled basis ``P``
(``A = J P`` by JVPs), solves the reduced problem in float64 for a sweep of ranks and
regularizations (:mod:`.solve`), and keeps the candidate with the lowest validation loss
(training loss without a validation split). Rank 0, the unchanged model, is always a
candidate. With ``rank: auto`` the rank grows geometrically, reusing the sketch, while the
selection loss keeps falling. Nothing here prints; progress goes to an optional sink.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .checkpoint import LoadedCheckpoint
from .config import Config
from .data import Split
from .errors import CheckpointError, ConfigError, NumericalError
from .linearization import JacobianOperator, ParameterSpace, make_functional
from .linearized import LinearizedModel
from .metrics import error_metrics
from .runtime import (
    TORCH_DTYPES,
    NoProgress,
    ProgressSink,
    no_tf32,
    peak_memory_bytes,
    resolve_device,
    start_run,
)
from .subspace import Selection, SweepEntry, holdout_rows, solve_subspace

__all__ = ["TORCH_DTYPES", "ProgressSink", "RefineResult", "evaluate", "refine", "resolve_device"]

ROW_BUDGET = 16384
"""Default row chunk: samples × outputs per chunk (512 scalar rows × 32 tangents measured fastest here)."""


@dataclass
class RefineResult:
    """Everything :func:`refine` measured; ``model`` computes the refined predictor."""

    status: str
    message: str
    model: LinearizedModel
    delta: dict[str, Tensor]
    rank: int
    selection_metric: str
    regularization: dict[str, Any]
    rank_sweep: list[SweepEntry]
    errors: dict[str, dict[str, dict[str, float | None]]]
    timings: dict[str, float]
    singular_values: list[float]
    num_parameters: int
    num_linearized_parameters: int
    num_residuals: int
    device: str
    dtype: str
    peak_memory_bytes: int
    peak_memory_kind: str
    warnings: list[str] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    stop_reason: str = ""
    residual_blocks: dict[str, dict[str, float]] | None = None  # PDE: mean square per block
    residual_loss: dict[str, float] | None = None  # PDE: weighted total before/after


def _chunk_rows(out_numel: int, cfg_row_chunk: int | str) -> int:
    if cfg_row_chunk == "auto":
        return max(1, ROW_BUDGET // max(1, out_numel) // 32)
    return int(cfg_row_chunk)


def prepare_module(ckpt: LoadedCheckpoint, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The base network in the refinement dtype on the device, eval mode (floating buffers cast too)."""
    try:
        module = ckpt.module.to(device=device, dtype=dtype)
    except Exception as exc:  # exotic modules
        raise CheckpointError(f"{ckpt.path}: cannot move the model to {device}/{dtype}: {exc}") from None
    module.eval()
    return module


def predict(
    module: nn.Module, inputs: tuple[Tensor, ...], row_chunk: int, params: dict[str, Tensor] | None = None
) -> Tensor:
    """Model output ``[N, ...]`` in row chunks without autograd (optionally with replaced parameters)."""
    call = make_functional(module) if params is not None else None
    outs = []
    n = inputs[0].shape[0]
    with torch.no_grad():
        for s in range(0, n, row_chunk):
            rows = tuple(x[s : s + row_chunk] for x in inputs)
            out = call(params, rows) if call is not None and params is not None else module(*rows)
            outs.append(out.detach())
    return torch.cat(outs)


def check_fit(module: nn.Module, split: Split, where: str, num_rows: int = 4) -> Split:
    """One forward pass on a few rows: the inputs must fit the model and the output the targets.

    Returns the split with targets reshaped to the output shape when only the layout differs
    (e.g. targets ``[N]`` for outputs ``[N, 1]``).
    """
    rows = tuple(x[:num_rows] for x in split.inputs)
    try:
        with torch.no_grad():
            out = module(*rows)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        shapes = ", ".join(f"{n} {tuple(x.shape[1:])}" for n, x in zip(split.input_names, split.inputs, strict=True))
        raise CheckpointError(
            f"{where}: the model does not accept the inputs ({shapes} per sample, "
            f"{len(split.inputs)} positional input(s)): {first[:200]}"
        ) from None
    if not isinstance(out, Tensor):
        raise CheckpointError(f"{where}: the model returned {type(out).__name__}; lsr needs a single tensor output")
    if out.shape[0] != rows[0].shape[0]:
        raise CheckpointError(
            f"{where}: the model output's leading dimension {out.shape[0]} is not the batch size {rows[0].shape[0]}"
        )
    t_shape = tuple(split.targets.shape[1:])
    o_shape = tuple(out.shape[1:])
    if t_shape != o_shape:
        if math.prod(t_shape) != math.prod(o_shape):
            raise CheckpointError(f"{where}: targets have shape {t_shape} per sample but the model outputs {o_shape}")
        split = Split(
            split.name,
            split.group,
            split.inputs,
            split.targets.reshape(split.targets.shape[0], *o_shape),
            split.input_names,
        )
    return split


def select_parameters(module: nn.Module, cfg: Config, gen: torch.Generator) -> ParameterSpace:
    """The linearized parameters of ``module`` chosen by ``config.lsr.parameters`` (error if none)."""
    named = {n: p.detach() for n, p in module.named_parameters()}
    par = cfg.lsr.parameters
    space = ParameterSpace(named, include=par.include, exclude=par.exclude, fraction=par.fraction, generator=gen)
    if space.num == 0:
        raise ConfigError(
            f"config.lsr.parameters: no floating-point parameter is selected; parameter names are {list(named)[:8]}"
        )
    return space


def _moved(split: Split, device: torch.device, dtype: torch.dtype) -> Split:
    """The split on ``device``, floating arrays in ``dtype`` (integer inputs keep their dtype)."""
    inputs = tuple(x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device) for x in split.inputs)
    return Split(split.name, split.group, inputs, split.targets.to(device=device, dtype=dtype), split.input_names)


def _finite_or_raise(t: Tensor, what: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise NumericalError(f"{what}: {int((~torch.isfinite(t)).sum())} non-finite value(s)")


def refine(
    ckpt: LoadedCheckpoint, splits: dict[str, Split], cfg: Config, progress: ProgressSink | None = None
) -> RefineResult:
    """Run one-shot LSR on ``ckpt`` with the training split of ``splits`` (see module doc)."""
    sink = progress or NoProgress()
    timings: dict[str, float] = {}
    warnings: list[str] = []
    dtype, device, gen = start_run(cfg.dtype, cfg.device, cfg.seed)
    with no_tf32():
        t0 = time.perf_counter()
        module = prepare_module(ckpt, dtype, device)
        data = {
            name: check_fit(module, _moved(s, device, dtype), f"{ckpt.path} on split '{s.group}'")
            for name, s in splits.items()
        }

        named = dict(module.named_parameters())
        space = select_parameters(module, cfg, gen)
        prev_delta = {k: v.to(device=device, dtype=dtype) for k, v in (ckpt.delta or {}).items()}
        before_model = LinearizedModel(module, prev_delta) if prev_delta else module

        train = data["train"]
        out_numel = math.prod(train.targets.shape[1:])
        row_chunk = _chunk_rows(out_numel, cfg.lsr.row_chunk)
        ops = {
            name: JacobianOperator(module, space, s.inputs, row_chunk, cfg.lsr.tangent_chunk)
            for name, s in data.items()
        }
        before = {name: predict(before_model, s.inputs, row_chunk).reshape(s.targets.shape) for name, s in data.items()}
        for name, pred in before.items():
            _finite_or_raise(pred, f"{ckpt.path}: model output on split '{data[name].group}'")
        f0 = {name: (before[name] - s.targets).reshape(-1) for name, s in data.items()}
        timings["baseline"] = time.perf_counter() - t0

        n, m = ops["train"].shape
        lsr = cfg.lsr
        has_val = "val" in data
        if has_val:
            selection = Selection("val_loss", op=ops["val"], f0=f0["val"])
        else:
            split_rows = holdout_rows(train.num_samples, out_numel, lsr.holdout, gen)
            selection = (
                Selection("holdout_loss", fit_rows=split_rows[0], hold_rows=split_rows[1], holdout_fraction=lsr.holdout)
                if split_rows is not None
                else Selection("train_loss")
            )
        sub = solve_subspace(ops["train"], ops["train"], f0["train"], selection, lsr, gen, dtype, device, sink)
        timings.update(sub.timings)
        metric_name = selection.kind
        if sub.rank == 0 and sub.stop_reason.startswith("the Jacobian sketch has no direction"):
            warnings.append(sub.stop_reason)

        t4 = time.perf_counter()
        dz = sub.dz
        delta_new = space.unflatten_vector(dz) if dz is not None else {}
        delta = {k: v.clone() for k, v in prev_delta.items()}
        for k, v in delta_new.items():
            delta[k] = delta[k] + v if k in delta else v
        if not delta:
            delta = {n: torch.zeros_like(named[n]) for n in space.names[:1]}
        errors: dict[str, dict[str, dict[str, float | None]]] = {}
        advance = sink.begin("evaluate", len(data))
        for name, s in data.items():
            after = before[name]
            if dz is not None:
                after = before[name] + ops[name].matvec(dz).reshape(s.targets.shape)
            net_params = {k: named[k].detach() + v for k, v in delta.items()}
            net = predict(module, s.inputs, row_chunk, net_params).reshape(s.targets.shape)
            errors[name] = {
                "before": error_metrics(before[name], s.targets),
                "after": error_metrics(after, s.targets),
                "network_after": error_metrics(net, s.targets),
            }
            advance(1)
        sink.end()
        timings["evaluate"] = time.perf_counter() - t4

    if sub.rank == 0:
        status = "unchanged"
        message = (
            f"no rank lowered the {metric_name} below the starting model's; the refined predictor equals the input"
        )
    else:
        split = "val" if has_val else "train"
        ratio = (errors[split]["before"]["rel_l2"] or 0.0) / max(errors[split]["after"]["rel_l2"] or 0.0, 1e-300)
        chosen_on = {
            "val_loss": "the validation split",
            "holdout_loss": f"{lsr.holdout:.0%} of the training samples held out",
            "train_loss": "the training loss (no validation data)",
        }[metric_name]
        status = "improved"
        message = f"rank {sub.rank} (chosen on {chosen_on}) lowered the {split} relative L2 error {ratio:.3g}x"
    peak, kind = peak_memory_bytes(device)
    return RefineResult(
        status=status,
        message=message,
        model=LinearizedModel(module, delta),
        delta=delta,
        rank=sub.rank,
        selection_metric=metric_name,
        regularization=sub.regularization,
        rank_sweep=sub.sweep,
        errors=errors,
        timings=timings,
        singular_values=sub.singular_values,
        num_parameters=sum(p.numel() for p in named.values()),
        num_linearized_parameters=space.num,
        num_residuals=n,
        device=str(device),
        dtype=cfg.dtype,
        peak_memory_bytes=peak,
        peak_memory_kind=kind,
        warnings=warnings,
        rounds=sub.rounds,
        stop_reason=sub.stop_reason,
    )


def evaluate(
    ckpt: LoadedCheckpoint,
    splits: dict[str, Split],
    dtype_name: str = "float64",
    device_spec: str = "cpu",
    row_chunk: int = 4096,
) -> dict[str, dict[str, float | None]]:
    """Errors of any checkpoint (plain or refined) on each split."""
    dtype = TORCH_DTYPES[dtype_name]
    device = resolve_device(device_spec)
    with no_tf32():
        module = prepare_module(ckpt, dtype, device)
        model = (
            LinearizedModel(module, {k: v.to(device=device, dtype=dtype) for k, v in ckpt.delta.items()})
            if ckpt.delta
            else module
        )
        out = {}
        for name, s in splits.items():
            s = _moved(s, device, dtype)
            s = check_fit(model, s, f"{ckpt.path} on split '{s.group}'")
            pred = predict(model, s.inputs, row_chunk).reshape(s.targets.shape)
            _finite_or_raise(pred, f"{ckpt.path}: model output on split '{s.group}'")
            out[name] = error_metrics(pred, s.targets)
    return out
