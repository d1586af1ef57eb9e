"""The time plan of a one-shot solve: measured costs, the estimate, the largest plan that fits.

Before the long stages of :func:`~.subspace.solve_subspace` the run measures what its stages
cost on this machine, on this model:

- the sketch's first block of columns (JVPs and VJPs over the sketched rows, timed apart);
- a JVP probe on the residual operator: the first row blocks of ``G V`` for one tangent block,
  until a sixteenth of the rows or two seconds (JVP cost is linear in rows and columns);
- a QR of a ``2048 × 256`` matrix, for the dense algebra (QR folds, SVDs, orthogonalization).

From these, one round at rank ``r`` after a sketch of ``k₀`` columns costs about

    sketch   (k − k₀) · rows_s · (t_jvp + t_vjp) + 3 rows_s (k² − k₀²) + 4 m k² + 20 k³   (k = r + oversampling)
    project  r · rows · t_jvp + 2 rows · r²
    solve    Σ 20 c³ over the candidate ranks c (an SVD each), or r³ for the leading-column sweep

(dense terms in flops at the measured rate; the SVD constant 20 was measured here: a full SVD
of a 3 000 × 3 000 matrix took as long as 18 r³ flops of QR). With ``lsr.time_limit`` the plan
is the whole rank ladder when it fits, otherwise one round at the largest rank that fits (the
ladder re-projects every round, one round does not), with every smaller rank scored from its
QR. Without a limit the estimate is reported all the same. The run's clock starts in
:func:`~.runtime.start_run`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .projection import fold_rows

SVD_FLOPS_PER_CUBE = 20.0
"""A full SVD of an ``r × r`` matrix costs about this many ``r³`` flops at the QR rate."""

SVD_SWEEP_MAX = 2048
"""Above this rank a round scores its ranks by leading-column losses (one triangular solve,
:func:`~.solve.leading_column_losses`) instead of an SVD per candidate rank."""


def release_rank(world: int) -> int | None:
    """A last round (it will not grow again) of a rank above this releases its sketch before the
    SVD (:meth:`~.sketch.RangeSketch.release`); ``None``: never (several processes keep it). The
    one rule that ``subspace._grow_sketch`` follows and the memory plan counts."""
    return SVD_SWEEP_MAX if world == 1 else None


PROBE_SECONDS = 2.0
"""Longest JVP probe of the residual operator."""

PROJECTION_OVERHEAD = 1.2
"""The whole projection per row · column over the probe's: measured 0.66–1.06× the other way
round on an FNO (mean 0.8; the projection also copies its blocks and folds them, and the probe
runs on the first, warm rows), `benchmarks/fno_time_limit.py`."""

_RUN_CLOCK = [time.perf_counter()]


def mark_run_start() -> None:
    """Start the run's clock (called by :func:`~.runtime.start_run`)."""
    _RUN_CLOCK[0] = time.perf_counter()


def run_elapsed() -> float:
    """Seconds since the run started."""
    return time.perf_counter() - _RUN_CLOCK[0]


LARGE_QR_SPEEDUP = 1.8
"""Rate of a large QR (``20 000 × 2 000``) over that of the ``2048 × 256`` probe, measured here
(20.3 and 10.1 GFLOP/s on one core; 14.9 at ``4096 × 512``). The probe stays small so that it
fits any memory budget (4 MB)."""


def dense_rate(device: torch.device, dtype: torch.dtype = torch.float64) -> float:
    """Flop rate of large thin QRs (``2 n k²`` flops), from a ``2048 × 256`` probe."""
    n, k = 2048, 256
    X = torch.randn(n, k, generator=torch.Generator().manual_seed(0), dtype=dtype).to(device)
    torch.linalg.qr(X[:k], mode="r")  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    torch.linalg.qr(X, mode="r")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return LARGE_QR_SPEEDUP * 2.0 * n * k * k / max(time.perf_counter() - t0, 1e-6)


def probe_jvp(op: Any, columns: int, dtype: torch.dtype, device: torch.device) -> float:
    """Seconds per (row · column) of ``op``'s JVPs: the first row blocks of ``op V`` for one
    block of ``columns`` tangents, until a sixteenth of the rows or :data:`PROBE_SECONDS`."""
    n, m = op.shape
    V = torch.randn(m, columns, dtype=dtype, generator=torch.Generator().manual_seed(0)).to(device)
    it = getattr(op, "iter_matmat", None)
    t0 = time.perf_counter()
    rows = 0
    if it is None:
        rows = int(op.matmat(V).shape[0])
    else:
        blocks: Iterator[tuple[int, torch.Tensor]] = it(V, None)
        for _, block in blocks:
            rows += int(block.shape[0])
            if rows * 16 >= n or time.perf_counter() - t0 >= PROBE_SECONDS:
                break
        close = getattr(blocks, "close", None)
        if close is not None:
            close()
    return PROJECTION_OVERHEAD * (time.perf_counter() - t0) / max(rows * columns, 1)


def limited_sketch_rows(limit_s: float, jvp_s: float, rows: int, oversampling: int, floor: int = 8192) -> int:
    """Residual rows to sketch under ``lsr.time_limit`` (``sketch_rows: auto``): 16 per column
    of the rank the limit could afford at the probed JVP cost (the sketch and the projection
    take about three products per row and column), at least ``floor``. Without it the sketch is
    sized for the whole rank ladder and its first block alone took 60 % of a 10-minute budget on
    an FNO (`benchmarks/fno_time_limit.py`)."""
    affordable = limit_s / max(3.0 * jvp_s * max(rows, 1), 1e-12)
    return max(floor, int(16 * (min(affordable, 1e9) + oversampling)))


VJP_OVER_JVP = 1.2
"""Seconds of a VJP column over a JVP column where no VJP probe is possible (measured 1.16–1.17
on the sketches of an FNO and of a DeepONet here)."""


def probe_vjp(op: Any, columns: int, dtype: torch.dtype, device: torch.device) -> float | None:
    """Seconds per (row · column) of ``op``'s VJPs, timed on its first samples (a sixteenth,
    at least one row chunk), or ``None`` when ``op`` is not a
    :class:`~.linearization.JacobianOperator`."""
    from .linearization import JacobianOperator

    if not isinstance(op, JacobianOperator) or op.num_samples == 0:
        return None
    s = min(op.num_samples, max(op.vjp_row_chunk, op.num_samples // 16))
    sub = op.head(s, op.row_chunk, columns)
    sub.vjp_row_chunk = op.vjp_row_chunk
    gen = torch.Generator().manual_seed(0)  # timing only: the run's random stream is untouched
    U = torch.randn(sub.shape[0], columns, generator=gen, dtype=dtype).to(device)
    t0 = time.perf_counter()
    sub.rmatmat(U)
    return (time.perf_counter() - t0) / max(sub.shape[0] * columns, 1)


def qr_fold_factor(r: int, fold_budget: int | None) -> float:
    """The streaming QR's cost over ``2 n r²`` with the folds a memory budget allows, relative to
    the unlimited folds of ``4r + 64`` rows the QR rate was calibrated with. Folding ``f`` rows
    into the triangle is a QR of ``(r + f) × r``: ``(4/3) r³ + 2 f r²`` flops per fold, ``n / f``
    folds, so ``2 n r² (1 + 2r / 3f)``. Folds of 64 rows at r = 4 000 cost 37× the unlimited ones."""

    def per_row(f: int) -> float:
        return 1.0 + 2.0 * r / (3.0 * f)

    return per_row(fold_rows(r, fold_budget)) / per_row(fold_rows(r, None))


@dataclass
class Costs:
    """Measured unit costs and the sizes they apply to."""

    jvp_s: float  # seconds per row · column of the residual operator's JVPs
    sketch_jvp_s: float  # per row · column over the sketched rows
    sketch_vjp_s: float
    flops: float  # dense algebra rate
    rows: int  # rows projected per column (fitted + selection rows)
    rows_sketch: int
    m: int
    oversampling: int
    eval_rows: int = 0  # rows evaluated after the solve (every split)
    fold_budget: int | None = None  # the memory plan's room for QR folds (None: unlimited)

    def round_parts(self, k0: int, r: int, candidates: list[int]) -> dict[str, float]:
        """Seconds of one round at rank ``r`` after a sketch of ``k0`` columns."""
        k = max(k0, r + self.oversampling)
        new = k - k0
        sketch = new * self.rows_sketch * (self.sketch_jvp_s + self.sketch_vjp_s)
        sketch += (3.0 * self.rows_sketch * (k * k - k0 * k0) + 4.0 * self.m * k * k) / self.flops
        sketch += SVD_FLOPS_PER_CUBE * float(k) ** 3 / self.flops
        qr = 2.0 * self.rows * float(r) ** 2 * qr_fold_factor(r, self.fold_budget)
        project = r * self.rows * self.jvp_s + qr / self.flops
        if r > SVD_SWEEP_MAX:
            solve = float(r) ** 3 / self.flops
        else:
            solve = sum(SVD_FLOPS_PER_CUBE * float(c) ** 3 for c in candidates) / self.flops
        return {"sketch": sketch, "project": project, "solve": solve}

    def round_seconds(self, k0: int, r: int, candidates: list[int]) -> float:
        return sum(self.round_parts(k0, r, candidates).values())

    def reserve(self) -> float:
        """After the solve: the evaluation (one JVP and forward passes per split) and saving."""
        return 3.0 * self.eval_rows * self.jvp_s + 2.0

    def to_dict(self) -> dict[str, float]:
        return {
            "jvp_row_column_s": self.jvp_s,
            "sketch_jvp_row_column_s": self.sketch_jvp_s,
            "sketch_vjp_row_column_s": self.sketch_vjp_s,
            "dense_gflops": self.flops / 1e9,
        }


def ladder(first: int, growth: float, cap: int) -> list[int]:
    """The ranks of ``rank: auto``: ``first``, then ×``growth`` up to ``cap``."""
    out = [max(1, min(first, cap))]
    while out[-1] < cap:
        out.append(min(int(math.ceil(out[-1] * growth)), cap))
    return out


def default_candidates(r: int) -> list[int]:
    """The ranks a round of ``auto`` scores: ``r/4, r/2, r`` (SVD sweep), every rank above
    :data:`SVD_SWEEP_MAX` (the leading-column sweep scores them all at once)."""
    return sorted({max(1, r // 4), max(1, r // 2), r})


def single_round_candidates(r: int) -> list[int]:
    """One budget-limited round: ``r/16 … r`` by factors of two (every rank above
    :data:`SVD_SWEEP_MAX`)."""
    return sorted({max(1, r >> i) for i in range(5)})


@dataclass
class TimePlan:
    """The ranks to run and what they are estimated to cost."""

    ranks: list[int]  # the rounds
    estimate_s: float  # the rounds, from the plan on
    single: bool  # one budget-limited round instead of the ladder
    limit_s: float | None
    elapsed_before_s: float
    unlimited_ranks: list[int]
    unlimited_estimate_s: float
    costs: Costs
    round_estimates: list[float] = field(default_factory=list)
    note: str = ""
    k0: int = 0  # sketch columns when the plan was made
    replanned: str = ""
    revised: dict[str, Any] = field(default_factory=dict)

    def after_sketch_s(self, r: int, candidates: list[int] | None) -> float:
        """Seconds of a round at rank ``r`` once its sketch is done: the projection and the sweep
        (``candidates``; ``None``: a budget-limited round's)."""
        parts = self.costs.round_parts(r + self.costs.oversampling, r, candidates or single_round_candidates(r))
        return parts["project"] + parts["solve"]

    def shrink_after_sketch(self, rank: int, sketch_s: float, candidates: list[int] | None) -> int:
        """The one budget-limited round, after its sketch: the largest rank ``≤ rank`` whose
        projection and sweep, scaled by how much slower the sketch ran than estimated, still fit
        the time left (other jobs may have slowed the machine since the costs were measured)."""
        if self.limit_s is None or not self.single:
            return rank
        est_sketch = self.costs.round_parts(self.k0, self.ranks[0], [])["sketch"]
        scale = max(1.0, sketch_s / max(est_sketch, 1e-9))
        left = self.limit_s - run_elapsed() - self.costs.reserve()

        def rest(r: int) -> float:
            return scale * self.after_sketch_s(r, candidates)

        if rest(rank) <= left:
            return rank
        lo, hi = 1, rank
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if rest(mid) <= left:
                lo = mid
            else:
                hi = mid - 1
        self.replanned = (
            f"after the sketch ({sketch_s:.0f} s, estimated {est_sketch:.0f} s) rank {rank} no longer fitted the "
            f"{max(left, 0):.0f} s left: rank {lo}"
        )
        return lo

    def revise_after_sketch(self, planned: int, usable: int, r: int, candidates: list[int] | None) -> str:
        """The sketch's range ran out below the ``planned`` rank (``usable`` directions above
        round-off, rank ``r`` run): the run estimated again from the time elapsed and the rest of
        this round at ``r`` (the plan could not know; measured on the paper DeepONet, 53.5 min
        planned for rank 9 000 where the range held 4 460 and the run took 23.2 min). Recorded
        in the report's ``time_budget.revised``; returns the line to print."""
        elapsed = run_elapsed()
        total = elapsed + self.after_sketch_s(r, candidates) + self.costs.reserve()
        self.revised = {
            "planned_rank": planned,
            "usable_rank": usable,
            "rank": r,
            "elapsed_s": round(elapsed, 3),
            "estimate_total_s": round(total, 3),
        }
        return (
            f"time plan: the sketch's range holds {usable} directions above round-off (rank {planned} planned): "
            f"rank {r}, the whole run now estimated at {total:.0f} s ({elapsed:.0f} s elapsed)"
        )

    def report(self, solve_s: float, rounds_measured: list[float], total_elapsed_s: float) -> dict[str, Any]:
        """``estimate_s`` and ``measured_s`` cover the same span, the planned rounds; ``solve_s``
        is the whole one-shot solve (the timed first block and the probes included), and
        ``estimate_total_s`` compares with ``elapsed_after_solve_s`` (both from the run's start)."""
        out: dict[str, Any] = {
            "limit_s": self.limit_s,
            "elapsed_before_s": round(self.elapsed_before_s, 3),
            "estimate_s": round(self.estimate_s, 3),
            "measured_s": round(sum(rounds_measured), 3),
            "solve_s": round(solve_s, 3),
            "estimate_total_s": round(self.elapsed_before_s + self.estimate_s + self.costs.reserve(), 3),
            "elapsed_after_solve_s": round(total_elapsed_s, 3),
            "ranks_planned": self.ranks,
            "plan": self.note,
            **({"replanned": self.replanned} if self.replanned else {}),
            **({"revised": self.revised} if self.revised else {}),
            "unlimited_ranks": self.unlimited_ranks,
            "unlimited_estimate_s": round(self.unlimited_estimate_s, 3),
            "rounds": [
                {"rank": r, "estimate_s": round(e, 3), "measured_s": round(t, 3)}
                for r, e, t in zip(self.ranks, self.round_estimates, rounds_measured, strict=False)
            ],
            "costs": self.costs.to_dict(),
        }
        return out


def _ladder_estimates(costs: Costs, ranks: list[int], k0: int, fixed: list[int]) -> list[float]:
    out, k = [], k0
    for r in ranks:
        cands = sorted({min(w, r) for w in fixed}) if fixed else default_candidates(r)
        out.append(costs.round_seconds(k, r, cands))
        k = max(k, r + costs.oversampling)
    return out


def plan_time(
    costs: Costs,
    ranks: list[int],
    fixed: list[int],
    k0: int,
    limit_s: float | None,
    elapsed_s: float,
) -> TimePlan:
    """The plan for ``ranks`` (the ladder, or the one round of fixed ranks) under ``limit_s``.

    Fits: the ladder as it is. Does not fit: one round at the largest rank whose estimate fits
    the time left (at least rank 1; ``note`` says when even that does not fit)."""
    est = _ladder_estimates(costs, ranks, k0, fixed)
    total = sum(est)
    plan = TimePlan(list(ranks), total, False, limit_s, elapsed_s, list(ranks), total, costs, est, k0=k0)
    if limit_s is None:
        plan.note = "no time limit: the whole plan"
        return plan
    left = limit_s - elapsed_s - costs.reserve()
    if total <= left:
        plan.note = f"the whole plan fits the time left ({left:.0f} s)"
        return plan

    def one(r: int) -> float:
        cands = sorted({min(w, r) for w in fixed}) if fixed else single_round_candidates(r)
        return costs.round_seconds(k0, r, cands)

    lo, hi = 1, max(ranks)
    if one(lo) > left:
        best = lo
        plan.note = f"even rank 1 is estimated at {one(lo):.0f} s, over the {max(left, 0):.0f} s left"
    else:
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if one(mid) <= left:
                lo = mid
            else:
                hi = mid - 1
        best = lo
        plan.note = (
            f"one round at rank {best}: the plan up to rank {max(ranks)} is estimated at {total:.0f} s, "
            f"over the {left:.0f} s left"
        )
    plan.ranks = [best]
    plan.single = True
    plan.round_estimates = [one(best)]
    plan.estimate_s = plan.round_estimates[0]
    return plan
