"""One-shot LSR on any residual: sketch, project, solve, select — the residual-agnostic core.

Given a basis operator (the Jacobian whose range is sketched: ``J`` of the outputs, or the
residual Jacobian ``G``), the residual operator ``G`` (``n × m``) with ``f0 = f(θ0)``, and the
rows that select the rank (a validation operator, held-out rows of ``G``, or none), it returns
the parameter step ``δ = P z`` of the best candidate. Rank 0 is always a candidate. With
``rank: auto`` the rank grows geometrically, reusing the sketch, until the spectrum, the cap or
overfitting stops it. Nothing here prints; progress goes to a :class:`~.runtime.ProgressSink`.

:func:`solve_subspace` orchestrates rounds (grow the sketch, project, sweep, keep the best, stop
rule); the selection and the sweep are in :mod:`.selection`, the streamed projection ``G P`` in
:mod:`.projection`, the time plan of the rounds in :mod:`.subspace_plan`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .config import LsrConfig
from .distributed import SINGLE, Comm, fault_point, global_mean_square, global_norm, merge_accumulators
from .errors import ConfigError, NumericalError
from .projection import ProgressFn, fold_rows, project_and_accumulate, row_blocks
from .runtime import ProgressSink
from .selection import (
    Selection,
    SweepEntry,
    holdout_rows,
    stratified_holdout_rows,
    sweep_leading,
    sweep_reduced,
    tikhonov_grid,
)
from .sketch import LinearOperator, RangeSketch
from .solve import QRAccumulator, ReducedProblem, leading_column_solution
from .subspace_plan import measure_and_plan, out_of_time, plan_line
from .timeplan import (
    SVD_SWEEP_MAX,
    TimePlan,
    default_candidates,
    release_rank,
    run_elapsed,
    single_round_candidates,
)

__all__ = [
    "RESIDUAL_FLOOR",
    "ProgressFn",
    "Selection",
    "SubspaceResult",
    "SweepEntry",
    "fold_rows",
    "holdout_rows",
    "project_and_accumulate",
    "row_blocks",
    "solve_subspace",
    "stratified_holdout_rows",
    "tikhonov_grid",
]

RESIDUAL_FLOOR = 1e-13
"""Relative linearized training residual below which growing the rank cannot help (float64)."""


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
    basis: Tensor | None = None  # [m, rank] the chosen P (dz = basis @ z)
    z: Tensor | None = None  # [rank]
    lambda_abs: float = 0.0  # the chosen Tikhonov λ in absolute terms (λ_rel · σ_max(A))
    selection: Selection | None = None
    # lsr.time_limit / estimate: the planned and measured times, what the budget allowed and what an
    # unlimited run would have tried (report field `time_budget`); None before it is planned
    time_budget: dict[str, Any] | None = None


@dataclass
class _Setup:
    """What every round of :func:`solve_subspace` uses and none changes."""

    train_op: LinearOperator  # G, [n_local, m]
    f0: Tensor  # [n_local] the residual at θ0
    selection: Selection
    lsr: LsrConfig
    grid: tuple[float, ...]  # relative Tikhonov λ tried per rank
    rcond: float | None
    limit: int  # the largest rank the problem allows
    label: str
    sink: ProgressSink
    memory_budget: int | None
    comm: Comm
    norm_fit: float  # ‖f0‖ on the fitted rows (all processes)
    hold_mask: Tensor | None  # [n_local] (bool) rows held out for the selection


@dataclass
class _Search:
    """What the rounds carry from one to the next: the sweep so far, the best step, the stop state."""

    sweep: list[SweepEntry]
    best_metric: float
    best: dict[str, Any]  # rank, dz [m], entry, and (rank > 0) P [m, rank], z [rank], lambda
    rounds: list[dict[str, Any]] = field(default_factory=list)
    measured: list[float] = field(default_factory=list)  # seconds per round
    rising: int = 0  # consecutive rounds whose selection loss clearly rose above the best
    timings: dict[str, float] = field(default_factory=lambda: {"sketch": 0.0, "project": 0.0, "solve": 0.0})


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
    memory_budget: int | None = None,
    comm: Comm = SINGLE,
    sketch: RangeSketch | None = None,
) -> SubspaceResult:
    """One-shot LSR: ``min_z ‖f0 + G P z‖`` over ranks/λ, ``P`` from a sketch of ``basis_op``
    (``sketch``: one already begun on ``basis_op``, e.g. by the spectral path, to continue).

    ``train_op`` is ``G`` (``n × m``) and ``f0`` its residual ``[n]``; the selection's operator
    (if any) has the same columns. Returns the best step ``dz = P z`` (``[m]``) or rank 0.

    On one process the rounds follow a time plan (:mod:`.timeplan`): measured costs, an
    estimate, and under ``lsr.time_limit`` the largest plan that fits. Ranks above
    :data:`~.timeplan.SVD_SWEEP_MAX` are scored by leading-column losses (every rank of the
    round at once, no SVD per rank, λ = 0).

    Distributed (``comm``): every operator and ``f0`` hold this rank's rows; the sketch is
    distributed (:class:`~.sketch.RangeSketch`), each rank folds its rows into its own QR
    triangles, which are merged on every rank (:func:`~.distributed.merge_accumulators`), so
    the sweep, the selection and ``z`` are the same everywhere (``dz`` is broadcast from rank 0).
    """
    n_local, m = train_op.shape
    n = comm.sum_int(n_local)
    limit = min(n, m, comm.sum_int(basis_op.shape[0]))
    ranks_wanted, rank = _plan_ranks(lsr, limit, n, m)
    grid = tikhonov_grid(lsr, selection.kind != "train_loss")
    rcond = None if lsr.truncation_rcond == "auto" else float(lsr.truncation_rcond)
    t_start = time.perf_counter()
    norm_fit, hold_mask, zero = _rank_zero(f0, selection, n_local, comm)
    setup = _Setup(
        train_op, f0, selection, lsr, grid, rcond, limit, label, sink, memory_budget, comm, norm_fit, hold_mask
    )
    best_metric = zero.val_loss if zero.val_loss is not None else zero.train_loss
    search = _Search([zero], best_metric, {"rank": 0, "dz": None, "entry": zero})
    if sketch is None:
        sketch = RangeSketch(basis_op, gen, dtype, device, lsr.power_iterations, comm=comm)
    tplan: TimePlan | None = None
    if comm.world == 1:
        tplan, ranks_wanted, rank = _plan_rounds(sketch, setup, ranks_wanted, rank, device, dtype, search.timings)
    stop_reason = _search_ranks(sketch, setup, search, tplan, ranks_wanted, rank)
    return _result(sketch, setup, search, tplan, stop_reason, time.perf_counter() - t_start)


def _rank_zero(f0: Tensor, selection: Selection, n_local: int, comm: Comm) -> tuple[float, Tensor | None, SweepEntry]:
    """``‖f0‖`` on the fitted rows, the held-out rows as a mask ``[n_local]`` (bool), and rank 0's
    entry: the mean squares of ``f0`` ``[n_local]`` on the fitted and on the selection rows."""
    fit_f = f0 if selection.fit_rows is None else f0[selection.fit_rows]
    norm_fit = global_norm(fit_f, comm)
    hold_mask: Tensor | None = None
    if selection.hold_rows is not None:
        hold_mask = torch.zeros(n_local, dtype=torch.bool, device=f0.device)
        hold_mask[selection.hold_rows.to(f0.device)] = True
    sel_f = (
        selection.f0
        if selection.op is not None
        else (f0[selection.hold_rows] if selection.hold_rows is not None else None)
    )
    train_base = global_mean_square(fit_f, comm)
    sel_base = global_mean_square(sel_f, comm) if sel_f is not None else None
    return norm_fit, hold_mask, SweepEntry(0, train_base, sel_base, 1.0, 0.0, 0, 1.0)


def _plan_rounds(
    sketch: RangeSketch,
    setup: _Setup,
    ranks_wanted: list[int],
    rank: int,
    device: torch.device,
    dtype: torch.dtype,
    timings: dict[str, float],
) -> tuple[TimePlan, list[int], int]:
    """The time plan (one process) and the fixed ranks and first rank it allows."""
    t0 = time.perf_counter()
    tplan = measure_and_plan(
        sketch,
        setup.train_op,
        setup.selection,
        setup.lsr,
        (ranks_wanted, rank),
        setup.limit,
        device,
        dtype,
        setup.memory_budget,
    )
    timings["sketch"] += time.perf_counter() - t0
    if tplan.single:
        rank = tplan.ranks[0]
        if ranks_wanted:
            ranks_wanted = sorted({min(r, rank) for r in ranks_wanted})
    _note(setup, plan_line(tplan))
    return tplan, ranks_wanted, rank


def _note(setup: _Setup, line: str) -> None:
    """Print ``line`` through the progress sink when it prints notes."""
    note = getattr(setup.sink, "note", None)
    if note is not None:
        note(line)


def _search_ranks(
    sketch: RangeSketch,
    setup: _Setup,
    search: _Search,
    tplan: TimePlan | None,
    ranks_wanted: list[int],
    rank: int,
) -> str:
    """Rounds of growing rank (one round for fixed ranks) until the stop rule fires; why it stopped."""
    lsr = setup.lsr
    while True:
        t1 = time.perf_counter()
        usable, r_eff = _grow_sketch(sketch, setup, rank, ranks_wanted, tplan, t1)
        search.timings["sketch"] += time.perf_counter() - t1
        fault_point("sketch", setup.comm)
        if r_eff == 0:
            return "the Jacobian sketch has no direction above round-off; the model is unchanged"
        metric, top = _run_round(sketch, setup, search, r_eff, usable, _candidates(ranks_wanted, r_eff, tplan))
        search.measured.append(time.perf_counter() - t1)
        # a round only counts against growth when the selection loss clearly rises: on a
        # plateau (Adam's residual in the tail of the spectrum) it stays flat until a larger
        # rank reaches the directions that matter
        search.rising = search.rising + 1 if metric > (1.0 + lsr.rise_tolerance) * search.best_metric else 0
        next_rank = min(int(math.ceil(rank * lsr.growth)), lsr.max_rank, setup.limit)
        stop_reason = _stop_reason(setup, search, tplan, ranks_wanted, rank, r_eff, next_rank, top, sketch.num_columns)
        if stop_reason:
            return stop_reason
        rank = next_rank


def _grow_sketch(
    sketch: RangeSketch,
    setup: _Setup,
    rank: int,
    ranks_wanted: list[int],
    tplan: TimePlan | None,
    t_round: float,
) -> tuple[int, int]:
    """Extend the sketch to ``rank`` + oversampling columns; (its usable rank, this round's rank).

    ``t_round``: when the round began (``time.perf_counter()``), for the time plan's shrink."""
    k_target = min(rank + setup.lsr.oversampling, setup.limit)
    new_cols = k_target - sketch.num_columns
    if new_cols > 0:
        advance = setup.sink.begin(f"sketch {setup.label} (k={k_target})", 2 * new_cols)
        sketch.extend(new_cols, advance)
        setup.sink.end()
    last = bool(ranks_wanted) or (tplan is not None and tplan.single)
    above = release_rank(setup.comm.world)
    if last and above is not None and rank > above:
        sketch.release()  # the sketch will not grow again: Q and B go (lean SVD), P is W scaled in place
    usable = sketch.usable_rank()
    r_eff = min(rank, usable)
    if tplan is not None and tplan.single:
        r_eff = tplan.shrink_after_sketch(r_eff, time.perf_counter() - t_round, ranks_wanted or None)
    if tplan is not None and usable < rank:  # the plan counted on more directions
        _note(setup, tplan.revise_after_sketch(rank, usable, r_eff, _candidates(ranks_wanted, r_eff, tplan)))
    return usable, r_eff


def _candidates(ranks_wanted: list[int], r_eff: int, tplan: TimePlan | None) -> list[int] | None:
    """The ranks a round of rank ``r_eff`` scores (None: every rank, by leading-column losses)."""
    if ranks_wanted:
        return sorted({min(r, r_eff) for r in ranks_wanted})
    if r_eff > SVD_SWEEP_MAX:
        return None
    if tplan is not None and tplan.single:
        return single_round_candidates(r_eff)
    return default_candidates(r_eff)


def _run_round(
    sketch: RangeSketch,
    setup: _Setup,
    search: _Search,
    r_eff: int,
    usable: int,
    candidates: list[int] | None,
) -> tuple[float, SweepEntry]:
    """Project onto the sketch's leading ``r_eff`` directions, sweep ``candidates``, keep the best
    in ``search``; returns the round's best selection metric and its highest-rank entry."""
    t2 = time.perf_counter()
    P, fit_qr, hold_qr, sel_qr = _project(sketch, setup, r_eff)
    search.timings["project"] += time.perf_counter() - t2
    t3 = time.perf_counter()
    leading = r_eff > SVD_SWEEP_MAX
    if leading:
        entries, round_best = sweep_leading(fit_qr, sel_qr, candidates, setup.norm_fit)
        problem = None
    else:
        problem = ReducedProblem.from_qr(fit_qr)
        entries, round_best = sweep_reduced(
            problem, sel_qr, candidates or [r_eff], setup.grid, setup.rcond, setup.norm_fit
        )
    search.sweep.extend(entries)
    if round_best is None:
        raise NumericalError("the reduced least-squares problem produced no finite solution")
    metric, entry = round_best
    top = entries[-1] if not leading else max(entries, key=lambda e: e.rank)
    search.rounds.append(
        {
            "rank": r_eff,
            "sketch_columns": sketch.num_columns,
            "usable_rank": usable,
            "best_rank": entry.rank,
            setup.selection.kind: metric,
            "linearized_residual": top.linearized_residual,
        }
    )
    if metric < search.best_metric:
        search.best_metric = metric
        search.best = _refit(P, entry, fit_qr, hold_qr, problem, setup.rcond)
    search.timings["solve"] += time.perf_counter() - t3
    return metric, top


def _project(
    sketch: RangeSketch, setup: _Setup, r_eff: int
) -> tuple[Tensor, QRAccumulator, QRAccumulator | None, QRAccumulator | None]:
    """``P`` ``[m, r_eff]`` and the QR triangles of ``[G P | f0]`` on the fitted, the held-out and
    the selection rows (merged over processes; None where there are no such rows)."""
    if sketch.released:
        P, _ = sketch.basis(r_eff, consume=True)
    else:
        P, _ = sketch.basis(r_eff)
    selection, comm = setup.selection, setup.comm
    advance = setup.sink.begin(f"project A = G P (r={r_eff})", r_eff * (2 if selection.op is not None else 1))
    fit_qr, hold_qr = project_and_accumulate(setup.train_op, P, setup.f0, setup.hold_mask, advance, setup.memory_budget)
    fit_qr = merge_accumulators(fit_qr, comm)
    hold_qr = merge_accumulators(hold_qr, comm) if hold_qr is not None else None
    sel_qr = hold_qr
    if selection.op is not None and selection.f0 is not None:
        sel_qr, _ = project_and_accumulate(selection.op, P, selection.f0, None, advance, setup.memory_budget)
        sel_qr = merge_accumulators(sel_qr, comm)
    setup.sink.end()
    return P, fit_qr, hold_qr, sel_qr


def _refit(
    P: Tensor,
    entry: SweepEntry,
    fit_qr: QRAccumulator,
    hold_qr: QRAccumulator | None,
    problem: ReducedProblem | None,
    rcond: float | None,
) -> dict[str, Any]:
    """The chosen (rank, λ) solved on all rows (held-out rows included): the step ``dz`` ``[m]``,
    ``P`` ``[m, rank]``, ``z`` ``[rank]`` and the absolute λ. ``problem`` None: scored by
    leading-column losses (λ = 0)."""
    whole = fit_qr if hold_qr is None else fit_qr.merge(hold_qr)
    if problem is None:
        z = leading_column_solution(whole, entry.rank).to(P.dtype)
        lam = 0.0
    else:
        full = problem if hold_qr is None else ReducedProblem.from_qr(whole)
        z = full.solve(entry.rank, entry.tikhonov, rcond).z.to(P.dtype)
        sigma = full.singular_values(entry.rank)
        lam = float(entry.tikhonov) * (float(sigma[0]) if sigma.numel() else 0.0)
    best = {"rank": entry.rank, "dz": P[:, : entry.rank] @ z, "entry": entry, "P": P[:, : entry.rank], "z": z}
    best["lambda"] = lam
    return best


def _stop_reason(
    setup: _Setup,
    search: _Search,
    tplan: TimePlan | None,
    ranks_wanted: list[int],
    rank: int,
    r_eff: int,
    next_rank: int,
    top: SweepEntry,
    num_columns: int,
) -> str:
    """Why the rounds stop after this one ("" to grow the rank to ``next_rank``)."""
    lsr = setup.lsr
    if ranks_wanted:
        stop_reason = "fixed ranks"
        if tplan is not None and tplan.single:
            stop_reason += f" capped by lsr.time_limit: {tplan.note}"
        return stop_reason
    if tplan is not None and tplan.single:
        return f"lsr.time_limit: {tplan.note}"
    if r_eff < rank:
        return f"rank limited to {r_eff}: the sketch has no more directions above round-off"
    if rank >= min(lsr.max_rank, setup.limit):
        return f"reached the rank cap {rank} (lsr.max_rank, residual rows, linearized parameters)"
    if search.rising >= lsr.patience:
        return f"the {setup.selection.kind} rose above its best for {search.rising} rounds (overfitting)"
    if top.linearized_residual < RESIDUAL_FLOOR:
        return "the linearized training residual reached round-off"
    if tplan is not None and tplan.limit_s is not None:
        return out_of_time(tplan, num_columns, next_rank, search.measured)
    return ""


def _result(
    sketch: RangeSketch,
    setup: _Setup,
    search: _Search,
    tplan: TimePlan | None,
    stop_reason: str,
    elapsed: float,
) -> SubspaceResult:
    """The best step (broadcast from rank 0 when distributed) with the sweep and what chose it."""
    best = search.best
    if setup.comm.world > 1 and best["dz"] is not None:  # identical everywhere already; rank 0's to be safe
        best["dz"] = setup.comm.broadcast(best["dz"])
    chosen = best["entry"]
    S = sketch.singular_values() if sketch.num_columns else torch.zeros(0)
    time_budget = None
    if tplan is not None:
        time_budget = tplan.report(elapsed, search.measured, run_elapsed())
        time_budget["ranks_run"] = [r["rank"] for r in search.rounds]
    return SubspaceResult(
        rank=int(best["rank"]),
        dz=best["dz"],
        chosen=chosen,
        sweep=search.sweep,
        rounds=search.rounds,
        stop_reason=stop_reason,
        regularization=_regularization(setup, chosen, search.rounds),
        singular_values=[float(s) for s in S.cpu()],
        timings=search.timings,
        basis=best.get("P"),
        z=best.get("z"),
        lambda_abs=float(best.get("lambda", 0.0)),
        selection=setup.selection,
        time_budget=time_budget,
    )


def _regularization(setup: _Setup, chosen: SweepEntry, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The report's ``regularization``: the truncation, the λ grid and what the chosen step used."""
    return {
        "truncation_rcond": setup.rcond if setup.rcond is not None else "auto: eps * max(n, rank)",
        "tikhonov_grid": list(setup.grid),
        "tikhonov": chosen.tikhonov,
        "tikhonov_meaning": "lambda / largest singular value of A = G P",
        "num_truncated": chosen.num_truncated,
        "cond": chosen.cond,
        "chosen_by": setup.selection.kind,
        "holdout_fraction": setup.selection.holdout_fraction,
        **(
            {"large_rank_sweep": f"ranks above {SVD_SWEEP_MAX}: leading-column losses, lambda 0"}
            if any(r["rank"] > SVD_SWEEP_MAX for r in rounds)
            else {}
        ),
    }
