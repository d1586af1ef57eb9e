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
import resource
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from .checkpoint import LoadedCheckpoint
from .config import Config
from .data import Split
from .errors import CheckpointError, ConfigError, DeviceError, NumericalError
from .linearization import JacobianOperator, ParameterSpace, make_functional
from .linearized import LinearizedModel
from .metrics import error_metrics
from .sketch import RangeSketch
from .solve import DEFAULT_TIKHONOV_GRID, ReducedProblem

TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32}
ROW_BUDGET = 16384
"""Default row chunk: samples × outputs per chunk (512 scalar rows × 32 tangents measured fastest here)."""


RESIDUAL_FLOOR = 1e-13
"""Relative linearized training residual below which growing the rank cannot help (float64)."""


class ProgressSink(Protocol):
    """Receives progress: ``begin`` returns an ``advance(amount)`` callable; ``end`` closes it."""

    def begin(self, description: str, total: int) -> Callable[[int], None]: ...

    def end(self) -> None: ...


class _NoProgress:
    def begin(self, description: str, total: int) -> Callable[[int], None]:
        return lambda amount: None

    def end(self) -> None:
        return None


def resolve_device(spec: str) -> torch.device:
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``; raises :class:`DeviceError`."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"device {spec!r} requested but CUDA is not available on this machine; use --device cpu")
    dev = torch.device(spec)
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DeviceError(f"device {spec!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return dev


@contextmanager
def no_tf32() -> Iterator[None]:
    """Disable TF32 (it silently ruins least-squares accuracy) for the duration."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def peak_memory_bytes(device: torch.device) -> tuple[int, str]:
    """Peak memory so far: CUDA allocator peak on a GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "process_peak_rss"


@dataclass
class SweepEntry:
    rank: int
    train_loss: float
    val_loss: float | None
    linearized_residual: float  # ‖f0 + A z‖ / ‖f0‖ on the training rows
    tikhonov: float  # relative λ (times s_max of A)
    num_truncated: int
    cond: float

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in self.__dict__.items()}


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


@dataclass
class _Selection:
    """Rows that select rank and λ: a validation split, or held-out training samples."""

    kind: str  # "val_loss" | "holdout_loss" | "train_loss"
    fit_rows: Tensor | None  # training rows used to fit when holding out (None: all)
    hold_rows: Tensor | None


def _holdout_rows(
    num_samples: int, out_numel: int, fraction: float, gen: torch.Generator
) -> tuple[Tensor, Tensor] | None:
    """Row indices (fit, hold) holding out ``fraction`` of the training samples, or ``None``."""
    num_hold = int(round(fraction * num_samples))
    if fraction <= 0 or num_hold < 2 or num_samples - num_hold < 2:
        return None
    perm = torch.randperm(num_samples, generator=gen)
    hold = torch.sort(perm[:num_hold]).values
    fit = torch.sort(perm[num_hold:]).values

    def rows(samples: Tensor) -> Tensor:
        return (samples[:, None] * out_numel + torch.arange(out_numel)).reshape(-1)

    return rows(fit), rows(hold)


def _sweep(
    problem: ReducedProblem,
    sel_A: Tensor | None,
    sel_f: Tensor | None,
    candidates: list[int],
    grid: tuple[float, ...],
    rcond: float | None,
    norm_f0: float,
) -> tuple[list[SweepEntry], tuple[float, SweepEntry] | None]:
    """Solve every (rank, λ); keep the best λ per rank; return those entries and the best overall.

    The metric is the MSE on the selection rows (``sel_A z + sel_f``), else the training MSE.
    """
    entries: list[SweepEntry] = []
    best: tuple[float, SweepEntry] | None = None
    for r in candidates:
        rank_best: tuple[float, SweepEntry] | None = None
        for lam in grid:
            sol = problem.solve(r, lam, rcond)
            res = problem.residual(sol)
            train_loss = float(torch.mean(res * res))
            sel_loss = None
            if sel_A is not None and sel_f is not None:
                rv = sel_A[:, :r].to(torch.float64) @ sol.z + sel_f.to(torch.float64)
                sel_loss = float(torch.mean(rv * rv))
            metric = sel_loss if sel_loss is not None else train_loss
            if not math.isfinite(metric):
                continue
            entry = SweepEntry(
                r,
                train_loss,
                sel_loss,
                float(torch.linalg.norm(res)) / max(norm_f0, 1e-300),
                lam,
                sol.num_truncated,
                sol.cond,
            )
            if rank_best is None or metric < rank_best[0]:
                rank_best = (metric, entry)
        if rank_best is not None:
            entries.append(rank_best[1])
            if best is None or rank_best[0] < best[0]:
                best = rank_best
    return entries, best


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


def _finite_or_raise(t: Tensor, what: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise NumericalError(f"{what}: {int((~torch.isfinite(t)).sum())} non-finite value(s)")


def _tikhonov_grid(cfg: Config, has_val: bool) -> tuple[float, ...]:
    t = cfg.lsr.tikhonov
    if t == "auto":
        return DEFAULT_TIKHONOV_GRID if has_val else (0.0,)
    if isinstance(t, list):
        return tuple(t)
    return (float(t),)


def refine(
    ckpt: LoadedCheckpoint, splits: dict[str, Split], cfg: Config, progress: ProgressSink | None = None
) -> RefineResult:
    """Run one-shot LSR on ``ckpt`` with the training split of ``splits`` (see module doc)."""
    sink = progress or _NoProgress()
    timings: dict[str, float] = {}
    warnings: list[str] = []
    dtype = TORCH_DTYPES[cfg.dtype]
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    with no_tf32():
        t0 = time.perf_counter()
        module = prepare_module(ckpt, dtype, device)
        data = {
            name: Split(
                s.name,
                s.group,
                tuple(x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device) for x in s.inputs),
                s.targets.to(device=device, dtype=dtype),
                s.input_names,
            )
            for name, s in splits.items()
        }
        for name in list(data):
            data[name] = check_fit(module, data[name], f"{ckpt.path} on split '{data[name].group}'")

        named = dict(module.named_parameters())
        space = ParameterSpace(
            {n: p.detach() for n, p in named.items()},
            include=cfg.lsr.parameters.include,
            exclude=cfg.lsr.parameters.exclude,
            fraction=cfg.lsr.parameters.fraction,
            generator=gen,
        )
        if space.num == 0:
            raise ConfigError(
                f"config.lsr.parameters: no floating-point parameter is selected; parameter names are {list(named)[:8]}"
            )
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
        limit = min(n, m)
        lsr = cfg.lsr
        if lsr.rank == "auto":
            ranks_wanted: list[int] = []
            rank = min(lsr.start_rank, lsr.max_rank, limit)
        else:
            ranks_wanted = list(lsr.rank) if isinstance(lsr.rank, list) else [int(lsr.rank)]
            too_big = [r for r in ranks_wanted if r > limit]
            if too_big:
                raise ConfigError(
                    f"config.lsr.rank: must be between 1 and {limit} (the smaller of {n} residual rows and "
                    f"{m} linearized parameters), got {too_big[0]}"
                )
            rank = max(ranks_wanted)
        has_val = "val" in data
        split_rows = None if has_val else _holdout_rows(train.num_samples, out_numel, lsr.holdout, gen)
        if has_val:
            selection = _Selection("val_loss", None, None)
        elif split_rows is not None:
            selection = _Selection("holdout_loss", *split_rows)
        else:
            selection = _Selection("train_loss", None, None)
        metric_name = selection.kind
        grid = _tikhonov_grid(cfg, selection.kind != "train_loss")
        rcond = None if lsr.truncation_rcond == "auto" else float(lsr.truncation_rcond)

        fit_f = f0["train"] if selection.fit_rows is None else f0["train"][selection.fit_rows]
        if has_val:
            sel_f: Tensor | None = f0["val"]
        elif selection.hold_rows is not None:
            sel_f = f0["train"][selection.hold_rows]
        else:
            sel_f = None
        train_base = float(torch.mean(fit_f**2))
        sel_base = float(torch.mean(sel_f**2)) if sel_f is not None else None
        sweep = [SweepEntry(0, train_base, sel_base, 1.0, 0.0, 0, 1.0)]
        best_metric = sel_base if sel_base is not None else train_base
        best: dict[str, Any] = {"rank": 0, "dz": None, "entry": sweep[0]}
        rounds: list[dict[str, Any]] = []
        sketch = RangeSketch(ops["train"], gen, dtype, device, lsr.power_iterations)
        rising = 0
        stop_reason = ""
        timings.update(sketch=0.0, project=0.0, solve=0.0)
        while True:
            t1 = time.perf_counter()
            k_target = min(rank + lsr.oversampling, limit)
            new_cols = k_target - sketch.num_columns
            if new_cols > 0:
                advance = sink.begin(f"sketch J (k={k_target})", 2 * new_cols)
                sketch.extend(new_cols, advance)
                sink.end()
            usable = sketch.usable_rank()
            r_eff = min(rank, usable)
            timings["sketch"] += time.perf_counter() - t1
            if r_eff == 0:
                stop_reason = "the Jacobian sketch has no direction above round-off; the model is unchanged"
                warnings.append(stop_reason)
                break
            if ranks_wanted:
                candidates = sorted({min(r, r_eff) for r in ranks_wanted})
            else:
                candidates = sorted({max(1, r_eff // 4), max(1, r_eff // 2), r_eff})
            t2 = time.perf_counter()
            P, _ = sketch.basis(r_eff)
            advance = sink.begin(f"project A = J P (r={r_eff})", r_eff * (2 if has_val else 1))
            A = ops["train"].matmat(P, advance)
            A_val = ops["val"].matmat(P, advance) if has_val else None
            sink.end()
            timings["project"] += time.perf_counter() - t2
            t3 = time.perf_counter()
            if selection.fit_rows is None:
                problem = ReducedProblem(A, f0["train"])
                sel_A = A_val
            else:
                problem = ReducedProblem(A[selection.fit_rows], fit_f)
                sel_A = A[selection.hold_rows]
            entries, round_best = _sweep(
                problem, sel_A, sel_f, candidates, grid, rcond, float(torch.linalg.norm(fit_f))
            )
            sweep.extend(entries)
            if round_best is None:
                raise NumericalError("the reduced least-squares problem produced no finite solution")
            metric, entry = round_best
            top = entries[-1]
            rounds.append(
                {
                    "rank": r_eff,
                    "sketch_columns": sketch.num_columns,
                    "usable_rank": usable,
                    "best_rank": entry.rank,
                    metric_name: metric,
                    "linearized_residual": top.linearized_residual,
                }
            )
            if metric < best_metric:
                best_metric = metric
                # the chosen (rank, λ) is solved on all training rows (held-out rows included)
                full = problem if selection.fit_rows is None else ReducedProblem(A, f0["train"])
                z = full.solve(entry.rank, entry.tikhonov, rcond).z
                best = {"rank": entry.rank, "dz": P[:, : entry.rank] @ z.to(P.dtype), "entry": entry}
            timings["solve"] += time.perf_counter() - t3
            # a round only counts against growth when the selection loss clearly rises: on a
            # plateau (Adam's residual in the tail of the spectrum) it stays flat until a larger
            # rank reaches the directions that matter
            rising = rising + 1 if metric > (1.0 + lsr.rise_tolerance) * best_metric else 0
            if ranks_wanted:
                stop_reason = "fixed ranks"
                break
            if r_eff < rank:
                stop_reason = f"rank limited to {r_eff}: the sketch has no more directions above round-off"
                break
            if rank >= min(lsr.max_rank, limit):
                stop_reason = f"reached the rank cap {rank} (lsr.max_rank, residual rows, linearized parameters)"
                break
            if rising >= lsr.patience:
                stop_reason = f"the {metric_name} rose above its best for {rising} rounds (overfitting)"
                break
            if top.linearized_residual < RESIDUAL_FLOOR:
                stop_reason = "the linearized training residual reached round-off"
                break
            rank = min(int(math.ceil(rank * lsr.growth)), lsr.max_rank, limit)
            del A, A_val, sel_A, problem

        t4 = time.perf_counter()
        dz = best["dz"]
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

    chosen = best["entry"]
    if best["rank"] == 0:
        status, message = (
            "unchanged",
            (f"no rank lowered the {metric_name} below the starting model's; the refined predictor equals the input"),
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
        message = f"rank {best['rank']} (chosen on {chosen_on}) lowered the {split} relative L2 error {ratio:.3g}x"
    peak, kind = peak_memory_bytes(device)
    S = sketch.singular_values() if sketch.num_columns else torch.zeros(0)
    return RefineResult(
        status=status,
        message=message,
        model=LinearizedModel(module, delta),
        delta=delta,
        rank=int(best["rank"]),
        selection_metric=metric_name,
        regularization={
            "truncation_rcond": rcond if rcond is not None else "auto: eps * max(n, rank)",
            "tikhonov_grid": list(grid),
            "tikhonov": chosen.tikhonov,
            "tikhonov_meaning": "lambda / largest singular value of A = J P",
            "num_truncated": chosen.num_truncated,
            "cond": chosen.cond,
            "chosen_by": metric_name,
            "holdout_fraction": lsr.holdout if selection.kind == "holdout_loss" else 0.0,
        },
        rank_sweep=sweep,
        errors=errors,
        timings=timings,
        singular_values=[float(s) for s in S.cpu()],
        num_parameters=sum(p.numel() for p in named.values()),
        num_linearized_parameters=space.num,
        num_residuals=n,
        device=str(device),
        dtype=cfg.dtype,
        peak_memory_bytes=peak,
        peak_memory_kind=kind,
        warnings=warnings,
        rounds=rounds,
        stop_reason=stop_reason,
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
            s = Split(
                s.name,
                s.group,
                tuple(x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device) for x in s.inputs),
                s.targets.to(device=device, dtype=dtype),
                s.input_names,
            )
            s = check_fit(model, s, f"{ckpt.path} on split '{s.group}'")
            pred = predict(model, s.inputs, row_chunk).reshape(s.targets.shape)
            _finite_or_raise(pred, f"{ckpt.path}: model output on split '{s.group}'")
            out[name] = error_metrics(pred, s.targets)
    return out
