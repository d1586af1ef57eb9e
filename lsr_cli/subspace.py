"""One-shot LSR on any residual: sketch, project, solve, select — the residual-agnostic core.

Given a basis operator (the Jacobian whose range is sketched: ``J`` of the outputs, or the
residual Jacobian ``G``), the residual operator ``G`` (``n × m``) with ``f0 = f(θ0)``, and the
rows that select the rank (a validation operator, held-out rows of ``G``, or none), it returns
the parameter step ``δ = P z`` of the best candidate. Rank 0 is always a candidate. With
``rank: auto`` the rank grows geometrically, reusing the sketch, until the spectrum, the cap or
overfitting stops it. Nothing here prints; progress goes to a :class:`~.runtime.ProgressSink`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .config import LsrConfig
from .errors import ConfigError, NumericalError
from .runtime import ProgressSink
from .sketch import LinearOperator, RangeSketch
from .solve import DEFAULT_TIKHONOV_GRID, ReducedProblem

RESIDUAL_FLOOR = 1e-13
"""Relative linearized training residual below which growing the rank cannot help (float64)."""


@dataclass
class SweepEntry:
    """The best λ at one rank: losses are mean squares of the linearized residual."""

    rank: int
    train_loss: float
    val_loss: float | None  # on the selection rows
    linearized_residual: float  # ‖f0 + A z‖ / ‖f0‖ on the fitted rows
    tikhonov: float  # relative λ (times s_max of A)
    num_truncated: int
    cond: float

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in self.__dict__.items()}


@dataclass
class Selection:
    """What chooses rank and λ: ``val_loss`` (a separate operator), ``holdout_loss`` (rows of
    the residual held out, then refitted on all rows) or ``train_loss``."""

    kind: str
    op: LinearOperator | None = None
    f0: Tensor | None = None
    fit_rows: Tensor | None = None
    hold_rows: Tensor | None = None
    holdout_fraction: float = 0.0


@dataclass
class SubspaceResult:
    rank: int
    dz: Tensor | None  # [m] step in the linearized parameters (None: rank 0)
    chosen: SweepEntry
    sweep: list[SweepEntry]
    rounds: list[dict[str, Any]]
    stop_reason: str
    regularization: dict[str, Any]
    singular_values: list[float]
    timings: dict[str, float] = field(default_factory=dict)


def holdout_rows(
    num_groups: int, group_size: int, fraction: float, gen: torch.Generator
) -> tuple[Tensor, Tensor] | None:
    """Row indices (fit, hold) holding out ``fraction`` of ``num_groups`` groups of
    ``group_size`` consecutive rows (a sample's outputs stay together), or ``None``."""
    num_hold = int(round(fraction * num_groups))
    if fraction <= 0 or num_hold < 2 or num_groups - num_hold < 2:
        return None
    perm = torch.randperm(num_groups, generator=gen)

    def rows(groups: Tensor) -> Tensor:
        return (torch.sort(groups).values[:, None] * group_size + torch.arange(group_size)).reshape(-1)

    return rows(perm[num_hold:]), rows(perm[:num_hold])


def tikhonov_grid(lsr: LsrConfig, selecting: bool) -> tuple[float, ...]:
    t = lsr.tikhonov
    if t == "auto":
        return DEFAULT_TIKHONOV_GRID if selecting else (0.0,)
    if isinstance(t, list):
        return tuple(t)
    return (float(t),)


def _sweep(
    problem: ReducedProblem,
    sel_A: Tensor | None,
    sel_f: Tensor | None,
    candidates: list[int],
    grid: tuple[float, ...],
    rcond: float | None,
    norm_f0: float,
) -> tuple[list[SweepEntry], tuple[float, SweepEntry] | None]:
    """Solve every (rank, λ); keep the best λ per rank; return those entries and the best overall."""
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


def _plan_ranks(lsr: LsrConfig, limit: int, n: int, m: int) -> tuple[list[int], int]:
    """(fixed ranks or [] for auto, first rank); validates fixed ranks against ``limit``."""
    if lsr.rank == "auto":
        return [], min(lsr.start_rank, lsr.max_rank, limit)
    wanted = list(lsr.rank) if isinstance(lsr.rank, list) else [int(lsr.rank)]
    too_big = [r for r in wanted if r > limit]
    if too_big:
        raise ConfigError(
            f"config.lsr.rank: must be between 1 and {limit} (the smaller of {n} residual rows and "
            f"{m} linearized parameters), got {too_big[0]}"
        )
    return wanted, max(wanted)


def solve_subspace(
    basis_op: LinearOperator,
    train_op: LinearOperator,
    f0: Tensor,
    selection: Selection,
    lsr: LsrConfig,
    gen: torch.Generator,
    dtype: torch.dtype,
    device: torch.device,
    sink: ProgressSink,
    label: str = "J",
) -> SubspaceResult:
    """One-shot LSR: ``min_z ‖f0 + G P z‖`` over ranks/λ, ``P`` from a sketch of ``basis_op``.

    ``train_op`` is ``G`` (``n × m``) and ``f0`` its residual ``[n]``; the selection's operator
    (if any) has the same columns. Returns the best step ``dz = P z`` (``[m]``) or rank 0.
    """
    n, m = train_op.shape
    limit = min(n, m, basis_op.shape[0])
    ranks_wanted, rank = _plan_ranks(lsr, limit, n, m)
    grid = tikhonov_grid(lsr, selection.kind != "train_loss")
    rcond = None if lsr.truncation_rcond == "auto" else float(lsr.truncation_rcond)
    timings = {"sketch": 0.0, "project": 0.0, "solve": 0.0}

    fit_f = f0 if selection.fit_rows is None else f0[selection.fit_rows]
    sel_f = (
        selection.f0
        if selection.op is not None
        else (f0[selection.hold_rows] if selection.hold_rows is not None else None)
    )
    train_base = float(torch.mean(fit_f**2))
    sel_base = float(torch.mean(sel_f**2)) if sel_f is not None else None
    sweep = [SweepEntry(0, train_base, sel_base, 1.0, 0.0, 0, 1.0)]
    best_metric = sel_base if sel_base is not None else train_base
    best: dict[str, Any] = {"rank": 0, "dz": None, "entry": sweep[0]}
    rounds: list[dict[str, Any]] = []
    sketch = RangeSketch(basis_op, gen, dtype, device, lsr.power_iterations)
    rising = 0
    stop_reason = ""
    while True:
        t1 = time.perf_counter()
        k_target = min(rank + lsr.oversampling, limit)
        new_cols = k_target - sketch.num_columns
        if new_cols > 0:
            advance = sink.begin(f"sketch {label} (k={k_target})", 2 * new_cols)
            sketch.extend(new_cols, advance)
            sink.end()
        usable = sketch.usable_rank()
        r_eff = min(rank, usable)
        timings["sketch"] += time.perf_counter() - t1
        if r_eff == 0:
            stop_reason = "the Jacobian sketch has no direction above round-off; the model is unchanged"
            break
        if ranks_wanted:
            candidates = sorted({min(r, r_eff) for r in ranks_wanted})
        else:
            candidates = sorted({max(1, r_eff // 4), max(1, r_eff // 2), r_eff})
        t2 = time.perf_counter()
        P, _ = sketch.basis(r_eff)
        advance = sink.begin(f"project A = G P (r={r_eff})", r_eff * (2 if selection.op is not None else 1))
        A = train_op.matmat(P, advance)
        A_sel = selection.op.matmat(P, advance) if selection.op is not None else None
        sink.end()
        timings["project"] += time.perf_counter() - t2
        t3 = time.perf_counter()
        if selection.fit_rows is None:
            problem = ReducedProblem(A, f0)
        else:
            problem = ReducedProblem(A[selection.fit_rows], fit_f)
            A_sel = A[selection.hold_rows]
        entries, round_best = _sweep(problem, A_sel, sel_f, candidates, grid, rcond, float(torch.linalg.norm(fit_f)))
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
                selection.kind: metric,
                "linearized_residual": top.linearized_residual,
            }
        )
        if metric < best_metric:
            best_metric = metric
            # the chosen (rank, λ) is solved on all rows (held-out rows included)
            full = problem if selection.fit_rows is None else ReducedProblem(A, f0)
            z = full.solve(entry.rank, entry.tikhonov, rcond).z
            best = {"rank": entry.rank, "dz": P[:, : entry.rank] @ z.to(P.dtype), "entry": entry}
        timings["solve"] += time.perf_counter() - t3
        # a round only counts against growth when the selection loss clearly rises: on a
        # plateau (Adam's residual in the tail of the spectrum) it stays flat until a larger
        # rank reaches the directions that matter
        rising = rising + 1 if metric > (1.0 + lsr.rise_tolerance) * best_metric else 0
        if ranks_wanted:
            stop_reason = "fixed ranks"
        elif r_eff < rank:
            stop_reason = f"rank limited to {r_eff}: the sketch has no more directions above round-off"
        elif rank >= min(lsr.max_rank, limit):
            stop_reason = f"reached the rank cap {rank} (lsr.max_rank, residual rows, linearized parameters)"
        elif rising >= lsr.patience:
            stop_reason = f"the {selection.kind} rose above its best for {rising} rounds (overfitting)"
        elif top.linearized_residual < RESIDUAL_FLOOR:
            stop_reason = "the linearized training residual reached round-off"
        if stop_reason:
            break
        rank = min(int(math.ceil(rank * lsr.growth)), lsr.max_rank, limit)
        del A, A_sel, problem

    chosen = best["entry"]
    S = sketch.singular_values() if sketch.num_columns else torch.zeros(0)
    return SubspaceResult(
        rank=int(best["rank"]),
        dz=best["dz"],
        chosen=chosen,
        sweep=sweep,
        rounds=rounds,
        stop_reason=stop_reason,
        regularization={
            "truncation_rcond": rcond if rcond is not None else "auto: eps * max(n, rank)",
            "tikhonov_grid": list(grid),
            "tikhonov": chosen.tikhonov,
            "tikhonov_meaning": "lambda / largest singular value of A = G P",
            "num_truncated": chosen.num_truncated,
            "cond": chosen.cond,
            "chosen_by": selection.kind,
            "holdout_fraction": selection.holdout_fraction,
        },
        singular_values=[float(s) for s in S.cpu()],
        timings=timings,
    )
