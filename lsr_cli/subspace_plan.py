"""The time plan of :func:`~.subspace.solve_subspace`'s rounds: measured, planned and worded.

:func:`measure_and_plan` probes the products' costs and plans the rounds
(:func:`~.timeplan.plan_time`); :func:`plan_line` words the plan for the progress display and
:func:`out_of_time` says why the next round of the rank ladder does not fit ``lsr.time_limit``.
"""

from __future__ import annotations

import torch

from .config import LsrConfig
from .selection import Selection
from .sketch import LinearOperator, RangeSketch
from .timeplan import (
    VJP_OVER_JVP,
    Costs,
    TimePlan,
    default_candidates,
    dense_rate,
    ladder,
    plan_time,
    probe_jvp,
    probe_vjp,
    run_elapsed,
)

__all__ = ["measure_and_plan", "out_of_time", "plan_line"]


def measure_and_plan(
    sketch: RangeSketch,
    train_op: LinearOperator,
    selection: Selection,
    lsr: LsrConfig,
    plan_ranks: tuple[list[int], int],
    limit: int,
    device: torch.device,
    dtype: torch.dtype,
    fold_budget: int | None = None,
) -> TimePlan:
    """Measure the costs and plan the rounds, before any heavy stage: probes of the sketched
    operator's JVPs and VJPs (on its first rows) and of the residual operator's JVPs, a QR rate;
    a sketch already begun (the spectral path's) gives its measured rates instead.
    ``fold_budget``: the memory plan's room for the QR's folds (smaller folds cost more)."""
    ranks_wanted, rank = plan_ranks
    cols = max(1, min(int(getattr(train_op, "tangent_chunk", 32)), 32))
    if sketch.columns["jvp"] > 0 and sketch.columns["vjp"] > 0:
        rates = sketch.rates()
        sketch_jvp, sketch_vjp = rates["jvp_row_column_s"], rates["vjp_row_column_s"]
    else:
        sketch_jvp = probe_jvp(sketch.op, cols, dtype, device)
        vjp = probe_vjp(sketch.op, cols, dtype, device)
        sketch_vjp = vjp if vjp is not None else VJP_OVER_JVP * sketch_jvp
    sel_rows = selection.op.shape[0] if selection.op is not None else 0
    costs = Costs(
        jvp_s=probe_jvp(train_op, cols, dtype, device),
        sketch_jvp_s=sketch_jvp,
        sketch_vjp_s=sketch_vjp,
        flops=dense_rate(device),
        rows=train_op.shape[0] + sel_rows,
        rows_sketch=sketch.num_rows,
        m=train_op.shape[1],
        oversampling=lsr.oversampling,
        eval_rows=train_op.shape[0] + sel_rows,
        fold_budget=fold_budget,
    )
    planned = ladder(rank, lsr.growth, min(lsr.max_rank, limit)) if not ranks_wanted else [rank]
    return plan_time(costs, planned, ranks_wanted, sketch.num_columns, lsr.time_limit, run_elapsed())


def plan_line(plan: TimePlan) -> str:
    ranks = ", ".join(str(r) for r in plan.ranks)
    limit = f"limit {plan.limit_s:.0f} s, " if plan.limit_s is not None else ""
    return (
        f"time plan: ranks {ranks}, estimate {plan.estimate_s:.0f} s "
        f"({limit}{plan.elapsed_before_s:.0f} s elapsed); {plan.note}"
    )


def out_of_time(plan: TimePlan, k0: int, next_rank: int, measured: list[float]) -> str:
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
