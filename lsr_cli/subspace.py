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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .config import LsrConfig
from .distributed import SINGLE, Comm, fault_point, global_mean_square, global_norm, merge_accumulators
from .errors import ConfigError, NumericalError
from .runtime import ProgressSink
from .sketch import LinearOperator, RangeSketch
from .solve import (
    DEFAULT_TIKHONOV_GRID,
    QRAccumulator,
    ReducedProblem,
    leading_column_losses,
    leading_column_solution,
)
from .timeplan import (
    SVD_SWEEP_MAX,
    Costs,
    TimePlan,
    default_candidates,
    dense_rate,
    ladder,
    plan_time,
    probe_jvp,
    run_elapsed,
    single_round_candidates,
)

ProgressFn = Callable[[int], None]

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
    the residual held out, then refitted on all rows) or ``train_loss``.

    ``fit_rows``/``hold_rows`` index the rows of the residual operator this process holds
    (all rows on one process, this rank's rows when distributed)."""

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
    basis: Tensor | None = None  # [m, rank] the chosen P (dz = basis @ z)
    z: Tensor | None = None  # [rank]
    lambda_abs: float = 0.0  # the chosen Tikhonov λ in absolute terms (λ_rel · σ_max(A))
    selection: Selection | None = None
    # lsr.time_limit / estimate: the planned and measured times, what the budget allowed and what an
    # unlimited run would have tried (report field `time_budget`); None before it is planned
    time_budget: dict[str, Any] | None = None


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


def stratified_holdout_rows(
    counts: list[int], fraction: float, gen: torch.Generator, min_rows: int = 20
) -> tuple[Tensor, Tensor] | None:
    """(fit, hold) row indices holding out ``fraction`` of each block of consecutive rows.

    Blocks with fewer than ``min_rows`` rows are never held out: a boundary block of a few
    points may be the only thing fixing a constant, and holding it out would reject every rank.
    """
    fit, hold = [], []
    start = 0
    for c in counts:
        rows = torch.arange(start, start + c)
        k = int(round(fraction * c)) if c >= min_rows else 0
        perm = rows[torch.randperm(c, generator=gen)] if k else rows
        hold.append(torch.sort(perm[:k]).values)
        fit.append(torch.sort(perm[k:]).values)
        start += c
    hold_t = torch.cat(hold) if hold else torch.zeros(0, dtype=torch.long)
    if fraction <= 0 or hold_t.numel() < 2:
        return None
    return torch.cat(fit), hold_t


def tikhonov_grid(lsr: LsrConfig, selecting: bool) -> tuple[float, ...]:
    t = lsr.tikhonov
    if t == "auto":
        return DEFAULT_TIKHONOV_GRID if selecting else (0.0,)
    if isinstance(t, list):
        return tuple(t)
    return (float(t),)


def _sweep(
    problem: ReducedProblem,
    sel: QRAccumulator | None,
    candidates: list[int],
    grid: tuple[float, ...],
    rcond: float | None,
    norm_f0: float,
) -> tuple[list[SweepEntry], tuple[float, SweepEntry] | None]:
    """Solve every (rank, λ); keep the best λ per rank; return those entries and the best overall.

    Losses come from the QR triangles: ``problem`` (fitted rows) and ``sel`` (selection rows)."""
    entries: list[SweepEntry] = []
    best: tuple[float, SweepEntry] | None = None
    for r in candidates:
        rank_best: tuple[float, SweepEntry] | None = None
        for lam in grid:
            sol = problem.solve(r, lam, rcond)
            res_sq = problem.loss_sum(sol)
            train_loss = res_sq / max(problem.n, 1)
            sel_loss = sel.loss_sum(sol.z) / max(sel.n, 1) if sel is not None else None
            metric = sel_loss if sel_loss is not None else train_loss
            if not math.isfinite(metric):
                continue
            entry = SweepEntry(
                r,
                train_loss,
                sel_loss,
                math.sqrt(max(res_sq, 0.0)) / max(norm_f0, 1e-300),
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


def row_blocks(op: LinearOperator, V: Tensor, progress: ProgressFn | None = None) -> Iterator[tuple[int, Tensor]]:
    """``(first_row, block)`` of ``op V``: streamed when the operator can, else one block."""
    it = getattr(op, "iter_matmat", None)
    if it is not None:
        yield from it(V, progress)
    else:
        yield 0, op.matmat(V, progress)


class _Folder:
    """Feeds row blocks to a :class:`QRAccumulator` in batches of at least ``min_rows`` rows
    (each fold costs ``O((r + b) r²)``, so small blocks are batched first)."""

    def __init__(self, acc: QRAccumulator, min_rows: int) -> None:
        self.acc = acc
        self.min_rows = max(1, min_rows)
        self.A: list[Tensor] = []
        self.f: list[Tensor] = []
        self.rows = 0

    def add(self, A: Tensor, f: Tensor) -> None:
        if A.shape[0] == 0:
            return
        self.A.append(A)
        self.f.append(f)
        self.rows += int(A.shape[0])
        if self.rows >= self.min_rows:
            self.flush()

    def flush(self) -> QRAccumulator:
        if self.A:
            self.acc.add(torch.cat(self.A), torch.cat(self.f))
            self.A, self.f, self.rows = [], [], 0
        return self.acc


def fold_rows(r: int, memory_budget: int | None) -> int:
    """Rows batched per QR fold: ``4r + 64`` (amortizes the fold: 18 % faster than ``2r`` at
    r = 1500 here, little gain beyond), fewer under a tight budget."""
    rows = 4 * r + 64
    if memory_budget is not None:
        rows = min(rows, max(64, memory_budget // (4 * 8 * (r + 1)) - r))
    return rows


def project_and_accumulate(
    op: LinearOperator,
    P: Tensor,
    f0: Tensor,
    hold_mask: Tensor | None = None,
    progress: ProgressFn | None = None,
    memory_budget: int | None = None,
) -> tuple[QRAccumulator, QRAccumulator | None]:
    """Streaming QR of ``[G P | f0]`` over ``op``'s row blocks; ``hold_mask`` ``[n]`` (bool)
    sends rows to a second accumulator (held out). Never holds ``G P`` whole."""
    r = P.shape[1]
    batch = fold_rows(r, memory_budget)
    fit = _Folder(QRAccumulator(r, P.device), batch)
    hold = _Folder(QRAccumulator(r, P.device), batch) if hold_mask is not None else None
    for start, block in row_blocks(op, P, progress):
        f = f0[start : start + block.shape[0]]
        if hold is None or hold_mask is None:
            fit.add(block, f)
            continue
        mask = hold_mask[start : start + block.shape[0]]
        fit.add(block[~mask], f[~mask])
        hold.add(block[mask], f[mask])
        del block
    return fit.flush(), (hold.flush() if hold is not None else None)


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


def _leading_sweep(
    fit_qr: QRAccumulator,
    sel_qr: QRAccumulator | None,
    candidates: list[int] | None,
    norm_fit: float,
) -> tuple[list[SweepEntry], tuple[float, SweepEntry] | None]:
    """Every rank (``candidates`` None) or the given ranks scored by leading-column losses
    (:func:`~.solve.leading_column_losses`); reported: about 32 ranks and the best."""
    fit_loss, sel_loss, usable = leading_column_losses(fit_qr, sel_qr)
    ranks = list(range(1, usable + 1)) if candidates is None else sorted({min(c, usable) for c in candidates} - {0})
    if not ranks:
        return [], None
    n_fit, n_sel = max(fit_qr.n, 1), max(sel_qr.n, 1) if sel_qr is not None else 1
    idx = torch.tensor(ranks)
    metric = (sel_loss[idx] / n_sel) if sel_loss is not None else (fit_loss[idx] / n_fit)
    best_i = int(torch.argmin(metric))
    if not math.isfinite(float(metric[best_i])):
        return [], None
    diag = fit_qr.parts()[0].diagonal().abs()

    def entry(r: int) -> SweepEntry:
        d = diag[:r]
        return SweepEntry(
            r,
            float(fit_loss[r]) / n_fit,
            float(sel_loss[r]) / n_sel if sel_loss is not None else None,
            math.sqrt(max(float(fit_loss[r]), 0.0)) / max(norm_fit, 1e-300),
            0.0,
            0,
            float(d.max() / d.min()),  # a cheap proxy: the triangle's diagonal ratio
        )

    shown = ranks if len(ranks) <= 32 else sorted({ranks[round(i * (len(ranks) - 1) / 31)] for i in range(32)})
    chosen = ranks[best_i]
    entries = [entry(r) for r in sorted(set(shown) | {chosen})]
    return entries, (float(metric[best_i]), entry(chosen))


def _time_plan(
    sketch: RangeSketch,
    train_op: LinearOperator,
    selection: Selection,
    lsr: LsrConfig,
    plan_ranks: tuple[list[int], int],
    limit: int,
    sink: ProgressSink,
    device: torch.device,
    dtype: torch.dtype,
) -> TimePlan:
    """Measure the costs (the sketch's first block, a JVP probe, a QR) and plan the rounds."""
    ranks_wanted, rank = plan_ranks
    if sketch.columns["jvp"] == 0:  # the first block, timed (a whole block: the same Ω as unplanned runs)
        k = min(sketch.block_size, rank + lsr.oversampling, limit)
        advance = sink.begin(f"sketch {lsr_label(sketch)} (first {k} columns, timed)", 2 * k)
        sketch.extend(k, advance)
        sink.end()
    rates = sketch.rates()
    cols = max(1, min(int(getattr(train_op, "tangent_chunk", 32)), 32))
    sel_rows = selection.op.shape[0] if selection.op is not None else 0
    costs = Costs(
        jvp_s=probe_jvp(train_op, cols, dtype, device),
        sketch_jvp_s=rates["jvp_row_column_s"],
        sketch_vjp_s=rates["vjp_row_column_s"],
        flops=dense_rate(device),
        rows=train_op.shape[0] + sel_rows,
        rows_sketch=sketch.num_rows,
        m=train_op.shape[1],
        oversampling=lsr.oversampling,
        eval_rows=train_op.shape[0] + sel_rows,
    )
    planned = ladder(rank, lsr.growth, min(lsr.max_rank, limit)) if not ranks_wanted else [rank]
    return plan_time(costs, planned, ranks_wanted, sketch.num_columns, lsr.time_limit, run_elapsed())


def lsr_label(sketch: RangeSketch) -> str:
    return getattr(sketch, "label", "J")


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
    timings = {"sketch": 0.0, "project": 0.0, "solve": 0.0}
    t_start = time.perf_counter()

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
    sweep = [SweepEntry(0, train_base, sel_base, 1.0, 0.0, 0, 1.0)]
    best_metric = sel_base if sel_base is not None else train_base
    best: dict[str, Any] = {"rank": 0, "dz": None, "entry": sweep[0]}
    rounds: list[dict[str, Any]] = []
    if sketch is None:
        sketch = RangeSketch(basis_op, gen, dtype, device, lsr.power_iterations, comm=comm)
    sketch.label = label  # type: ignore[attr-defined]
    tplan: TimePlan | None = None
    if comm.world == 1:
        t0 = time.perf_counter()
        tplan = _time_plan(sketch, train_op, selection, lsr, (ranks_wanted, rank), limit, sink, device, dtype)
        timings["sketch"] += time.perf_counter() - t0
        if tplan.single:
            rank = tplan.ranks[0]
            if ranks_wanted:
                ranks_wanted = sorted({min(r, rank) for r in ranks_wanted})
        note = getattr(sink, "note", None)
        if note is not None:
            note(_plan_line(tplan))
    rounds_measured: list[float] = []
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
        last = bool(ranks_wanted) or (tplan is not None and tplan.single)
        if last and rank > SVD_SWEEP_MAX and comm.world == 1:
            sketch.release()  # the sketch will not grow again: Q and B go (lean SVD), P is W scaled in place
        usable = sketch.usable_rank()
        r_eff = min(rank, usable)
        if tplan is not None and tplan.single:
            r_eff = tplan.shrink_after_sketch(r_eff, time.perf_counter() - t1, ranks_wanted or None)
        timings["sketch"] += time.perf_counter() - t1
        fault_point("sketch", comm)
        if r_eff == 0:
            stop_reason = "the Jacobian sketch has no direction above round-off; the model is unchanged"
            break
        if ranks_wanted:
            candidates: list[int] | None = sorted({min(r, r_eff) for r in ranks_wanted})
        elif r_eff > SVD_SWEEP_MAX:
            candidates = None  # every rank, by leading-column losses
        elif tplan is not None and tplan.single:
            candidates = single_round_candidates(r_eff)
        else:
            candidates = default_candidates(r_eff)
        t2 = time.perf_counter()
        if sketch.released:
            P, _ = sketch.basis(r_eff, consume=True)
        else:
            P, _ = sketch.basis(r_eff)
        advance = sink.begin(f"project A = G P (r={r_eff})", r_eff * (2 if selection.op is not None else 1))
        fit_qr, hold_qr = project_and_accumulate(train_op, P, f0, hold_mask, advance, memory_budget)
        fit_qr = merge_accumulators(fit_qr, comm)
        hold_qr = merge_accumulators(hold_qr, comm) if hold_qr is not None else None
        sel_qr = hold_qr
        if selection.op is not None and selection.f0 is not None:
            sel_qr, _ = project_and_accumulate(selection.op, P, selection.f0, None, advance, memory_budget)
            sel_qr = merge_accumulators(sel_qr, comm)
        sink.end()
        timings["project"] += time.perf_counter() - t2
        t3 = time.perf_counter()
        leading = r_eff > SVD_SWEEP_MAX
        if leading:
            entries, round_best = _leading_sweep(fit_qr, sel_qr, candidates, norm_fit)
            problem = None
        else:
            problem = ReducedProblem.from_qr(fit_qr)
            entries, round_best = _sweep(problem, sel_qr, candidates or [r_eff], grid, rcond, norm_fit)
        sweep.extend(entries)
        if round_best is None:
            raise NumericalError("the reduced least-squares problem produced no finite solution")
        metric, entry = round_best
        top = entries[-1] if not leading else max(entries, key=lambda e: e.rank)
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
            whole = fit_qr if hold_qr is None else fit_qr.merge(hold_qr)
            if leading:
                z = leading_column_solution(whole, entry.rank).to(P.dtype)
                lam = 0.0
            else:
                full = problem if hold_qr is None or problem is None else ReducedProblem.from_qr(whole)
                assert full is not None
                z = full.solve(entry.rank, entry.tikhonov, rcond).z.to(P.dtype)
                sigma = full.singular_values(entry.rank)
                lam = float(entry.tikhonov) * (float(sigma[0]) if sigma.numel() else 0.0)
            best = {"rank": entry.rank, "dz": P[:, : entry.rank] @ z, "entry": entry, "P": P[:, : entry.rank], "z": z}
            best["lambda"] = lam
        timings["solve"] += time.perf_counter() - t3
        rounds_measured.append(time.perf_counter() - t1)
        # a round only counts against growth when the selection loss clearly rises: on a
        # plateau (Adam's residual in the tail of the spectrum) it stays flat until a larger
        # rank reaches the directions that matter
        rising = rising + 1 if metric > (1.0 + lsr.rise_tolerance) * best_metric else 0
        next_rank = min(int(math.ceil(rank * lsr.growth)), lsr.max_rank, limit)
        if ranks_wanted:
            stop_reason = "fixed ranks"
            if tplan is not None and tplan.single:
                stop_reason += f" capped by lsr.time_limit: {tplan.note}"
        elif tplan is not None and tplan.single:
            stop_reason = f"lsr.time_limit: {tplan.note}"
        elif r_eff < rank:
            stop_reason = f"rank limited to {r_eff}: the sketch has no more directions above round-off"
        elif rank >= min(lsr.max_rank, limit):
            stop_reason = f"reached the rank cap {rank} (lsr.max_rank, residual rows, linearized parameters)"
        elif rising >= lsr.patience:
            stop_reason = f"the {selection.kind} rose above its best for {rising} rounds (overfitting)"
        elif top.linearized_residual < RESIDUAL_FLOOR:
            stop_reason = "the linearized training residual reached round-off"
        elif tplan is not None and tplan.limit_s is not None:
            stop_reason = _out_of_time(tplan, sketch.num_columns, next_rank, rounds_measured)
        if stop_reason:
            break
        rank = next_rank
        del fit_qr, hold_qr, sel_qr, problem

    if comm.world > 1 and best["dz"] is not None:  # identical everywhere already; rank 0's to be safe
        best["dz"] = comm.broadcast(best["dz"])
    chosen = best["entry"]
    S = sketch.singular_values() if sketch.num_columns else torch.zeros(0)
    time_budget = None
    if tplan is not None:
        time_budget = tplan.report(time.perf_counter() - t_start, rounds_measured, run_elapsed())
        time_budget["ranks_run"] = [r["rank"] for r in rounds]
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
            **(
                {"large_rank_sweep": f"ranks above {SVD_SWEEP_MAX}: leading-column losses, lambda 0"}
                if any(r["rank"] > SVD_SWEEP_MAX for r in rounds)
                else {}
            ),
        },
        singular_values=[float(s) for s in S.cpu()],
        timings=timings,
        basis=best.get("P"),
        z=best.get("z"),
        lambda_abs=float(best.get("lambda", 0.0)),
        selection=selection,
        time_budget=time_budget,
    )


def _plan_line(plan: TimePlan) -> str:
    ranks = ", ".join(str(r) for r in plan.ranks)
    limit = f"limit {plan.limit_s:.0f} s, " if plan.limit_s is not None else ""
    return (
        f"time plan: ranks {ranks}, estimate {plan.estimate_s:.0f} s "
        f"({limit}{plan.elapsed_before_s:.0f} s elapsed); {plan.note}"
    )


def _out_of_time(plan: TimePlan, k0: int, next_rank: int, measured: list[float]) -> str:
    """Why the next round of the ladder is not run under ``lsr.time_limit`` ("" when it fits):
    its estimate, scaled by how the rounds so far compared with theirs."""
    assert plan.limit_s is not None
    done = sum(plan.round_estimates[: len(measured)]) or 1.0
    scale = max(1.0, sum(measured) / done)
    est = scale * plan.costs.round_seconds(k0, next_rank, default_candidates(next_rank))
    left = plan.limit_s - run_elapsed() - plan.costs.reserve()
    if est <= left:
        return ""
    return f"lsr.time_limit: the next round (rank {next_rank}) is estimated at {est:.0f} s, over the {left:.0f} s left"
