"""One-shot LSR end to end, as a library call: :func:`refine` and :func:`evaluate`.

``refine`` linearizes the training residual ``f(θ) = vec(q(θ, X) − Y)`` at the checkpoint's
weights, sketches the Jacobian (:mod:`.sketch`), projects it on the scaled basis ``P``
(``A = J P`` by JVPs), solves the reduced problem in float64 for a sweep of ranks and
regularizations (:mod:`.solve`), and keeps the candidate with the lowest validation loss
(training loss without a validation split). Rank 0, the unchanged model, is always a
candidate. With ``rank: auto`` the rank grows geometrically, reusing the sketch, while the
selection loss keeps falling. Nothing here prints; progress goes to an optional sink.
The decisions (Jacobian path, solve path, chunks, compile, memory) are :mod:`.plan`'s.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .checkpoint import LoadedCheckpoint
from .config import Config, LsrConfig, check_product_dtype
from .data import LazyArray, Split
from .dense import estimated_costs  # noqa: F401  (re-exported: its old place)
from .distributed import SINGLE, Comm, local_rows
from .errors import DataError
from .linearization import Inputs, JacobianOperator, ParameterSpace, low_precision_copy, real_numel, take_rows
from .linearized import LinearizedModel
from .metrics import error_metrics, global_error_metrics
from .plan import ROW_BUDGET, RunPlan, SupervisedOperators, chunk_rows, plan_supervised, sketch_samples
from .prepare import check_fit, finite_or_raise, predict, prepare_module, select_parameters, shared_flags
from .prepare import moved as _moved  # noqa: F401  (re-exported: iterate_supervised)
from .result import RefineResult
from .runtime import (
    TORCH_DTYPES,
    MemoryMeter,
    NoProgress,
    ProgressSink,
    cast_tensor,
    no_tf32,
    peak_memory_bytes,
    resolve_device,
    resolve_memory_budget,
    start_run,
    warm_up_autodiff,
)
from .spectral import solve_exact_first
from .subspace import Selection, SubspaceResult, fold_rows, holdout_rows, solve_subspace
from .timeplan import limited_sketch_rows, probe_jvp

__all__ = [
    "ROW_BUDGET",
    "TORCH_DTYPES",
    "ProgressSink",
    "RefineResult",
    "evaluate",
    "peak_memory_bytes",
    "predict",
    "prepare_module",
    "refine",
    "resolve_device",
    "select_parameters",
]


RELATIVE_SPREAD_WARNING = 1e4
"""``lsr.loss: relative`` warns when its weights ``c / ‖y_i‖`` span more than this factor."""

FLOAT32_FLOOR_FACTOR = 100.0
"""``--dtype float32`` results within this factor of float32's epsilon are floor-limited."""


def float32_floor_warning(dtype_name: str, errors: dict[str, dict[str, dict[str, float | None]]]) -> str | None:
    """A warning when a float32 run's refined error sits near float32 round-off (1.2e-7)."""
    if dtype_name != "float32":
        return None
    eps = torch.finfo(torch.float32).eps
    hit = [
        f"{name} {e['after']['rel_l2']:.2e}"
        for name, e in errors.items()
        if e["after"]["rel_l2"] is not None and e["after"]["rel_l2"] < FLOAT32_FLOOR_FACTOR * eps
    ]
    if not hit:
        return None
    return (
        f"--dtype float32: the refined relative errors ({', '.join(hit)}) are within {FLOAT32_FLOOR_FACTOR:g}x "
        f"of float32 round-off ({eps:.1e}); the float32 floor may limit them: rerun with --dtype float64"
    )


@dataclass
class Baseline:
    """A supervised run at the checkpoint's weights ``θ0``: the module, its parameters and the
    linearized ones, the starting δ of a refined checkpoint, every split on the device, the
    starting model's predictions and residuals ``f0`` per split, outputs per sample."""

    module: torch.nn.Module
    named: dict[str, torch.nn.Parameter]
    space: ParameterSpace
    prev_delta: dict[str, Tensor]
    data: dict[str, Split]
    before: dict[str, Tensor]
    f0: dict[str, Tensor]
    out_numel: int
    weights: dict[str, Tensor] | None = None  # lsr.loss: relative: each sample's row weight [N]


def _baseline(
    ckpt: LoadedCheckpoint,
    splits: dict[str, Split],
    cfg: Config,
    dtype: torch.dtype,
    device: torch.device,
    gen: torch.Generator,
    comm: Comm,
) -> Baseline:
    """The module and data on the device, checked against each other, and the starting model's
    predictions (a refined checkpoint starts from its linearized predictor)."""
    module = prepare_module(ckpt, dtype, device)
    data = {
        name: check_fit(module, _moved(s, device, dtype), f"{ckpt.path} on split '{s.group}'")
        for name, s in splits.items()
    }
    named = dict(module.named_parameters())
    space = select_parameters(module, cfg, gen)
    prev_delta = {k: cast_tensor(v, dtype, device) for k, v in (ckpt.delta or {}).items()}
    before_model = LinearizedModel(module, prev_delta) if prev_delta else module
    out_numel = math.prod(data["train"].targets.shape[1:])
    row_chunk = chunk_rows(out_numel, cfg.lsr.row_chunk)
    before = {
        name: predict(before_model, s.inputs, row_chunk, shared=s.shared).reshape(s.targets.shape)
        for name, s in data.items()
    }
    for name, pred in before.items():
        finite_or_raise(pred, f"{ckpt.path}: model output on split '{data[name].group}'", comm)
    weights = sample_weights(data, cfg.lsr.loss, cfg.data.path, comm)
    f0 = {name: _weigh(before[name] - s.targets, weights, name).reshape(-1) for name, s in data.items()}
    return Baseline(module, named, space, prev_delta, data, before, f0, out_numel, weights)


def sample_weights(
    data: dict[str, Split], loss: str, path: str | None, comm: Comm = SINGLE
) -> dict[str, Tensor] | None:
    """``lsr.loss: relative``: per split, each sample's row weight ``c / ‖y_i‖`` (``[N]``), with ``c``
    the root mean square of the training targets' norms over every rank, so that the weighted loss
    keeps the scale of ``mse``; ``None`` for ``mse``. A sample whose target is all zero has no
    relative error: a :class:`~.errors.DataError` naming it (on every rank, or on none)."""
    if loss == "mse":
        return None
    norms = {name: torch.linalg.norm(s.targets.reshape(s.targets.shape[0], -1), dim=1) for name, s in data.items()}
    zero = [
        (s, int(torch.nonzero(norms[name] == 0)[0]) + s.first_row)
        for name, s in data.items()
        if (norms[name] == 0).any()
    ]
    if comm.world > 1:
        zero = [z for found in comm.allgather_object(zero) for z in found]
    if zero:
        split, index = zero[0]
        where = split.source or f"{path or 'data'}: split '{split.group}'"
        raise DataError(
            f"{where}: sample {index} is all zero, so it has no relative error "
            "(lsr.loss: relative divides each sample's error by its target's norm); use lsr.loss: mse"
        )
    train = norms["train"]
    total = comm.sum_float(float(train.square().sum()))
    count = comm.sum_int(int(train.numel()))
    scale = math.sqrt(total / max(count, 1))
    return {name: scale / n for name, n in norms.items()}


def weigh_samples(t: Tensor, w: Tensor | None, inverse: bool = False) -> Tensor:
    """``t`` ``[N, ...]`` with each sample's entries times its weight ``w`` (``N`` values; ``inverse``:
    divided by it); ``t`` itself without weights."""
    if w is None:
        return t
    w = w.reshape((-1,) + (1,) * (t.dim() - 1))
    return t / w if inverse else t * w


def _weigh(t: Tensor, weights: dict[str, Tensor] | None, split: str, inverse: bool = False) -> Tensor:
    return weigh_samples(t, None if weights is None else weights[split], inverse)


def weighted_output(net: Callable[..., Tensor], rows: Inputs) -> Tensor:
    """The residual rows of ``lsr.loss: relative``: the network on ``rows[:-1]``, each sample's
    outputs times its weight ``rows[-1]`` (``[N, 1]``, appended to the inputs)."""
    return weigh_samples(net(*rows[:-1]), rows[-1])


def _product_model(module: nn.Module, cfg: Config) -> nn.Module | None:
    """The float32 copy of the network the matrix-free products run on (``lsr.product_dtype:
    float32`` with ``dtype: float64``), or ``None`` (products in ``dtype``)."""
    check_product_dtype(cfg)  # again: the command line may have set dtype or --compile
    if cfg.lsr.product_dtype in ("auto", cfg.dtype):
        return None
    return low_precision_copy(module, torch.float32)


def _products_report(cfg: Config, products: nn.Module | None, path: str) -> dict[str, Any] | None:
    """The report's ``products`` (only when ``lsr.product_dtype`` asks for other than ``dtype``)."""
    if products is None:
        return None
    if path != "matrix_free":
        return {
            "dtype": cfg.dtype,
            "requested": cfg.lsr.product_dtype,
            "used": False,
            "reason": f"the dense path ran: its products are BLAS on J held in {cfg.dtype}",
        }
    return {"dtype": cfg.lsr.product_dtype, "requested": cfg.lsr.product_dtype, "used": True}


def _operators(
    base: Baseline, lsr: LsrConfig, gen: torch.Generator, comm: Comm, products: nn.Module | None = None
) -> SupervisedOperators:
    """The Jacobian operator of every split and the one the basis is sketched on: the training
    split's, or a seeded random subset of its samples (:func:`~.plan.sketch_samples`, drawn over
    every rank's samples; each rank keeps its own). ``products``: the lower-precision copy of the
    network their sketch and projection products run on (:func:`_product_model`)."""
    row_chunk = chunk_rows(base.out_numel, lsr.row_chunk)
    residual = None if base.weights is None else weighted_output
    inputs = {name: _operator_inputs(base, name) for name in base.data}
    ops: dict[str, Any] = {
        name: JacobianOperator(
            base.module,
            base.space,
            inputs[name][0],
            row_chunk,
            lsr.tangent_chunk,
            residual=residual,
            shared=inputs[name][1],
            products=products,
        )
        for name in base.data
    }
    train = base.data["train"]
    train_inputs, train_shared = inputs["train"]
    num_sketch = sketch_samples(lsr, train.num_global, base.out_numel)
    if lsr.time_limit is not None and lsr.sketch_rows == "auto" and comm.world == 1:
        # sized for the rank the limit affords, not the whole ladder (a probe at the default chunk)
        train_op = ops["train"]
        jvp = probe_jvp(train_op, min(lsr.tangent_chunk, 32), train_op.dtype, train_op.device)
        limited = limited_sketch_rows(lsr.time_limit, jvp, sum(op.shape[0] for op in ops.values()), lsr.oversampling)
        num_sketch = min(num_sketch, max(1, limited // max(1, base.out_numel)))
    basis: Any = ops["train"]
    idx = None
    if num_sketch < train.num_global:
        idx = torch.sort(torch.randperm(train.num_global, generator=gen)[:num_sketch]).values
        idx = local_rows(idx, train.first_row, train.first_row + train.num_samples)
        rows = tuple(x if sh else x[idx] for x, sh in zip(train_inputs, train_shared, strict=True))
        basis = JacobianOperator(
            base.module,
            base.space,
            rows,
            row_chunk,
            lsr.tangent_chunk,
            residual=residual,
            shared=train_shared,
            probe=take_rows(train_inputs, 0, 1, train_shared),
            products=products,
        )
    return SupervisedOperators(
        ops=ops,
        basis=basis,
        sketch_rows=idx,
        num_samples={name: s.num_samples for name, s in base.data.items()},
        streamed=any(isinstance(x, LazyArray) for sp in base.data.values() for x in sp.inputs),
        dtype=base.f0["train"].dtype,
        num_sketch=num_sketch,
    )


def _loss_report(base: Baseline, comm: Comm) -> dict[str, Any] | None:
    """The report's ``loss`` (``lsr.loss: relative`` only): the scale ``c`` of the weights ``c / ‖y_i‖``
    and their range on the training split."""
    if base.weights is None:
        return None
    w = base.weights["train"]
    # collectives on every rank, also one that holds no training sample
    low = -float(comm.allreduce_max(-(w.min().reshape(1) if w.numel() else w.new_full((1,), math.inf)))[0])
    high = float(comm.allreduce_max(w.max().reshape(1) if w.numel() else w.new_zeros(1))[0])
    scale = float(w[0] * torch.linalg.norm(base.data["train"].targets[0])) if w.numel() else None
    return {
        "kind": "relative",
        "weights": "c / ||y_i|| per sample, c = root mean square of the training targets' norms",
        "scale": scale,
        "train_weight_min": low,
        "train_weight_max": high,
    }


def relative_spread_warning(loss: dict[str, Any] | None) -> str | None:
    """A warning when ``lsr.loss: relative`` weights its samples over more than
    :data:`RELATIVE_SPREAD_WARNING` (targets near zero dominate the fit)."""
    if loss is None or not loss["train_weight_min"] > 0:
        return None
    spread = loss["train_weight_max"] / loss["train_weight_min"]
    if spread <= RELATIVE_SPREAD_WARNING:
        return None
    return (
        f"lsr.loss: relative: the training targets' norms span {spread:.1e}x, so the samples with the smallest "
        "targets dominate the fit; if those are near zero by chance (scalar targets crossing zero), "
        "lsr.loss: mse may suit better"
    )


def _operator_inputs(base: Baseline, split: str) -> tuple[Inputs, tuple[bool, ...]]:
    """The inputs of ``split``'s Jacobian operator and their shared flags: the split's own, and with
    ``lsr.loss: relative`` each sample's weight appended as a last input ``[N, 1]``
    (:func:`weighted_output` reads it)."""
    s = base.data[split]
    if base.weights is None:
        return s.inputs, s.shared
    return (*s.inputs, base.weights[split].reshape(-1, 1)), (*shared_flags(s), False)


def _holdout(base: Baseline, lsr: LsrConfig, gen: torch.Generator, comm: Comm) -> tuple[Tensor, Tensor] | None:
    """Without a validation split: the training rows held out to choose the rank (this rank's
    rows of a split drawn over every rank's samples), or ``None``."""
    if "val" in base.data:
        return None
    train = base.data["train"]
    split_rows = holdout_rows(train.num_global, base.out_numel, lsr.holdout, gen)
    if split_rows is not None and comm.world > 1:  # this rank's rows of the global split
        lo, hi = train.first_row * base.out_numel, (train.first_row + train.num_samples) * base.out_numel
        split_rows = (local_rows(split_rows[0], lo, hi), local_rows(split_rows[1], lo, hi))
    return split_rows


def _selection(base: Baseline, run: SupervisedOperators, split_rows: Any, lsr: LsrConfig) -> Selection:
    """What the rank and λ are chosen on: the validation split, held-out training rows, or the training loss."""
    if "val" in base.data:
        return Selection("val_loss", op=run.ops["val"], f0=base.f0["val"])
    if split_rows is not None:
        return Selection("holdout_loss", fit_rows=split_rows[0], hold_rows=split_rows[1], holdout_fraction=lsr.holdout)
    return Selection("train_loss")


def _solve(
    base: Baseline,
    run: SupervisedOperators,
    plan: RunPlan,
    selection: Selection,
    gen: torch.Generator,
    sink: ProgressSink,
    comm: Comm,
) -> SubspaceResult:
    """The reduced problem on the plan's path: the held ``J`` sketched to exhaustion with every
    rank scored at once (:mod:`.spectral`), else the adaptive sketch (:mod:`.subspace`)."""

    def adaptive(sketch: Any = None) -> SubspaceResult:
        return solve_subspace(
            run.basis,
            run.ops["train"],
            base.f0["train"],
            selection,
            plan.lsr,
            gen,
            run.dtype,
            base.f0["train"].device,
            sink,
            memory_budget=plan.memory.fold_budget,
            comm=comm,
            sketch=sketch,
        )

    if plan.spectral:
        return solve_exact_first(
            run.ops["train"], base.f0["train"], selection, plan.lsr, gen, sink, "J", adaptive, comm
        )
    return adaptive()


def _delta(base: Baseline, dz: Tensor | None) -> dict[str, Tensor]:
    """The checkpoint's δ (if refined) plus the step ``dz``; a zero δ on one parameter when both are empty."""
    delta = {k: v.clone() for k, v in base.prev_delta.items()}
    for k, v in (base.space.unflatten_vector(dz) if dz is not None else {}).items():
        delta[k] = delta[k] + v if k in delta else v
    if not delta:
        delta = {n: torch.zeros_like(base.named[n]) for n in base.space.names[:1]}
    return delta


def _errors(
    base: Baseline,
    run: SupervisedOperators,
    dz: Tensor | None,
    delta: dict[str, Tensor],
    row_chunk: int,
    sink: ProgressSink,
    comm: Comm,
) -> dict[str, dict[str, dict[str, float | None]]]:
    """Per split: the errors before, of the refined predictor after, and of the plain network at θ0 + δ."""
    errors: dict[str, dict[str, dict[str, float | None]]] = {}
    advance = sink.begin("evaluate", len(base.data))
    for name, s in base.data.items():
        after = base.before[name]
        if dz is not None:
            # in the run's dtype even when the products ran lower (lsr.product_dtype): what the checkpoint computes
            step = run.ops[name].matvec(dz, precise=True).reshape(s.targets.shape)
            after = base.before[name] + _weigh(step, base.weights, name, inverse=True)
        net_params = {k: base.named[k].detach() + v for k, v in delta.items()}
        net = predict(base.module, s.inputs, row_chunk, net_params, s.shared).reshape(s.targets.shape)
        errors[name] = {
            "before": global_error_metrics(base.before[name], s.targets, comm),
            "after": global_error_metrics(after, s.targets, comm),
            "network_after": global_error_metrics(net, s.targets, comm),
        }
        advance(1)
    sink.end()
    return errors


def _outcome(
    sub: SubspaceResult, errors: dict[str, dict[str, dict[str, float | None]]], lsr: LsrConfig, metric: str
) -> tuple[str, str]:
    """The run's status and its one-line message."""
    if sub.rank == 0:
        return "unchanged", (
            f"no rank lowered the {metric} below the starting model's; the refined predictor equals the input"
        )
    split = "val" if "val" in errors else "train"
    ratio = (errors[split]["before"]["rel_l2"] or 0.0) / max(errors[split]["after"]["rel_l2"] or 0.0, 1e-300)
    chosen_on = {
        "val_loss": "the validation split",
        "holdout_loss": f"{lsr.holdout:.0%} of the training samples held out",
        "train_loss": "the training loss (no validation data)",
    }[metric]
    return "improved", f"rank {sub.rank} (chosen on {chosen_on}) lowered the {split} relative L2 error {ratio:.3g}x"


def refine(
    ckpt: LoadedCheckpoint,
    splits: dict[str, Split],
    cfg: Config,
    progress: ProgressSink | None = None,
    meter: MemoryMeter | None = None,
    comm: Comm = SINGLE,
) -> RefineResult:
    """Run one-shot LSR on ``ckpt`` with the training split of ``splits`` (see module doc).

    ``meter`` measures the peak memory of the run (default: one started here, after a warm-up
    of the autodiff machinery); pass one started before reading the data to count it too.

    Distributed (``comm`` with several ranks): ``splits`` hold this rank's contiguous share of
    the samples (:func:`~.data.read_data` with ``shard``); the random draws (sketch subset,
    hold-out rows) are made over all samples as on one process and each rank keeps its part,
    so the result does not depend on the number of ranks; errors are global."""
    sink = progress or NoProgress()
    timings: dict[str, float] = {}
    dtype, device, gen = start_run(cfg.dtype, cfg.device, cfg.seed)
    if meter is None:
        warm_up_autodiff(device)
        meter = MemoryMeter(device)
    budget = resolve_memory_budget(cfg.lsr.max_memory, device)
    with no_tf32():
        t0 = time.perf_counter()
        base = _baseline(ckpt, splits, cfg, dtype, device, gen, comm)
        products = _product_model(base.module, cfg)
        run = _operators(base, cfg.lsr, gen, comm, products)
        timings["baseline"] = time.perf_counter() - t0
        stage_peaks = {"baseline": meter.peak_above_start()}
        split_rows = _holdout(base, cfg.lsr, gen, comm)
        kind = "val_loss" if "val" in base.data else "holdout_loss" if split_rows is not None else "train_loss"
        row_chunk = chunk_rows(base.out_numel, cfg.lsr.row_chunk)
        plan = plan_supervised(run, cfg.lsr, budget, meter, kind, base.out_numel, row_chunk, sink, comm)
        timings.update(plan.timings)
        warnings = list(plan.warnings)
        sub = _solve(base, run, plan, _selection(base, run, split_rows, cfg.lsr), gen, sink, comm)
        timings.update(sub.timings)
        if plan.compiled is not None and not plan.compiled.status["used"]:
            warnings.append(f"lsr.compile: {plan.compiled.status['reason']}")
        stage_peaks["sketch_project_solve"] = meter.peak_above_start()
        if sub.rank == 0 and sub.stop_reason.startswith("the Jacobian sketch has no direction"):
            warnings.append(sub.stop_reason)
        t4 = time.perf_counter()
        delta = _delta(base, sub.dz)
        errors = _errors(base, run, sub.dz, delta, plan.row_chunk, sink, comm)
        timings["evaluate"] = time.perf_counter() - t4
        floor_warning = float32_floor_warning(cfg.dtype, errors)
        if floor_warning:
            warnings.append(floor_warning)
        loss = _loss_report(base, comm)
        spread_warning = relative_spread_warning(loss)
        if spread_warning:
            warnings.append(spread_warning)
    status, message = _outcome(sub, errors, plan.lsr, kind)
    peak, peak_kind = peak_memory_bytes(device)
    streamed = [s.name for s in splits.values() if any(isinstance(x, LazyArray) for x in s.inputs)]
    memory = plan.memory_report(
        meter,
        {**stage_peaks, "evaluate": meter.peak_above_start()},
        streamed_splits=streamed,
        sketch_samples=run.num_sketch,
        row_chunk_samples=plan.row_chunk,
        vjp_row_chunk_samples=plan.vjp_row_chunk,
        qr_fold_rows=fold_rows(sub.rank or 1, plan.memory.fold_budget),
    )
    return RefineResult(
        status=status,
        message=message,
        model=LinearizedModel(base.module, delta),
        delta=delta,
        rank=sub.rank,
        selection_metric=kind,
        regularization=sub.regularization,
        rank_sweep=sub.sweep,
        errors=errors,
        timings=timings,
        singular_values=sub.singular_values,
        num_parameters=sum(real_numel(p) for p in base.named.values()),
        num_linearized_parameters=base.space.num,
        num_residuals=comm.sum_int(run.ops["train"].shape[0]),
        device=str(device),
        dtype=cfg.dtype,
        peak_memory_bytes=peak,
        peak_memory_kind=peak_kind,
        warnings=warnings,
        rounds=sub.rounds,
        stop_reason=sub.stop_reason,
        memory=memory,
        jacobian=plan.jacobian,
        compile=plan.compile_report(),
        products=_products_report(cfg, products, plan.jacobian["path"]),
        loss=loss,
        time_budget=sub.time_budget,
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
            LinearizedModel(module, {k: cast_tensor(v, dtype, device) for k, v in ckpt.delta.items()})
            if ckpt.delta
            else module
        )
        out = {}
        for name, s in splits.items():
            s = _moved(s, device, dtype)
            s = check_fit(model, s, f"{ckpt.path} on split '{s.group}'")
            pred = predict(model, s.inputs, row_chunk, shared=s.shared).reshape(s.targets.shape)
            finite_or_raise(pred, f"{ckpt.path}: model output on split '{s.group}'")
            out[name] = error_metrics(pred, s.targets)
    return out
