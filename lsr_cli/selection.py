"""What chooses the rank and λ of a one-shot LSR: the selection rows and the sweep over them.

A :class:`Selection` names the rows that choose (a validation operator, rows of the residual held
out, or the training rows themselves); :func:`sweep_reduced` and :func:`sweep_leading` score the
candidate ranks (and Tikhonov λ) of one round from the QR triangles of the projected problem and
return one :class:`SweepEntry` per rank and the best of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .config import LsrConfig
from .sketch import LinearOperator
from .solve import DEFAULT_TIKHONOV_GRID, QRAccumulator, ReducedProblem, leading_column_losses

__all__ = [
    "Selection",
    "SweepEntry",
    "holdout_rows",
    "stratified_holdout_rows",
    "sweep_leading",
    "sweep_reduced",
    "tikhonov_grid",
]


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


def sweep_reduced(
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


def sweep_leading(
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
