"""One-shot LSR in the exact singular basis of a Jacobian held in memory.

When ``G`` (``n × m``) is dense and not too large, the randomized range finder usually exhausts
the range of ``G``: a whole block of new columns adds nothing above round-off. The sketch is
then an SVD of ``G`` to round-off, ``G = U S Wᵀ`` with ``U = Q V_B`` (``B = Gᵀ Q = W S V_Bᵀ``),
and with ``P = W S⁻¹`` the reduced matrix is ``A = G P = U``, orthonormal. Every truncation rank
and λ is then solved and scored at once (``z_r = −U_rᵀ f0 / (1 + λ²)``); no projection ``G P``,
QR or per-rank SVD is needed, which is most of the cost of the adaptive path
(:func:`~.subspace.solve_subspace`) when the Jacobian is held. At full rank the step is the
dense Gauss–Newton step (the truncated-SVD pseudo-inverse).

What chooses the rank and λ:

- a separate validation operator (supervised data with a ``val`` split): ``Z = J_val P`` is
  formed once, row block by row block, and the validation loss of every rank and λ follows from
  cumulative sums of its columns (:func:`_selection_losses`);
- otherwise generalized cross-validation (Golub, Heath & Wahba 1979),
  ``GCV(r, λ) = (‖f0 + A z‖² / n) / (1 − tr(H)/n)²`` with ``tr(H) = r / (1 + λ²)``, which uses
  every row. Held-out rows would have to be left out of the basis as well as of the fit, and the
  basis from the other rows alone is measurably weaker (Poisson 2-D sample: 2.6e-7 at best
  against 1.3e-7);
- with ``lsr.holdout: 0`` (``train_loss``) the training loss, as on the adaptive path.

When the sketch does not exhaust within ``lsr.max_rank``, nothing is returned; the caller runs
the adaptive path, which can reuse the sketch (pass the same :class:`~.sketch.RangeSketch`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .config import LsrConfig
from .distributed import SINGLE, Comm
from .runtime import ProgressSink
from .sketch import LinearOperator, RangeSketch
from .subspace import Selection, SubspaceResult, SweepEntry, _plan_ranks, row_blocks, tikhonov_grid

SPECTRAL_MAX_ENTRIES = 1 << 24
"""Entries of a PDE's ``G`` (``n · m``, 128 MB in float64) up to which its spectral path is tried
(and ``pde.basis: auto`` may choose the residual basis)."""

SPECTRAL_MAX_WORK = 1 << 38
"""Largest ``n · m · min(n, m, lsr.max_rank + block)`` for which a held supervised Jacobian is
sketched to exhaustion (the worst case: about half a minute of products on one core here, then
the adaptive path reuses the sketch)."""

SPECTRAL_BLOCK = 128
"""Sketch columns per block: a block that adds nothing above round-off ends the sketch."""

REPORTED_RANKS = 32
"""Ranks listed in the report's sweep (geometrically spaced, plus the chosen one)."""


def _reported(ranks: int, chosen: int) -> list[int]:
    """About :data:`REPORTED_RANKS` ranks from 1 to ``ranks``, geometrically spaced, with ``chosen``."""
    grid = {max(1, round(ranks ** (i / (REPORTED_RANKS - 1)))) for i in range(REPORTED_RANKS)}
    return sorted(grid | {ranks, chosen} - {0})


def _selection_losses(
    op: LinearOperator, f_sel: Tensor, P: Tensor, w: Tensor, shrinks: list[float], comm: Comm = SINGLE
) -> Tensor:
    """``[len(shrinks), k]``: ``‖f_sel + s · Σ_{i≤r} (op P)_i w_i‖²`` for every rank ``r`` and
    shrink factor ``s``, streamed over ``op``'s row blocks (``op P`` is never held whole);
    distributed: summed over every rank's rows."""
    out = torch.zeros(len(shrinks), P.shape[1], dtype=f_sel.dtype, device=f_sel.device)
    for start, Z in row_blocks(op, P):
        f = f_sel[start : start + Z.shape[0], None]
        C = torch.cumsum(Z * w, dim=1)  # row block of the predictions' change at every rank
        del Z
        for j, shrink in enumerate(shrinks):
            out[j] += (f + shrink * C).square().sum(0)
    return comm.allreduce_sum(out)


@dataclass
class _Scores:
    """Every candidate rank scored for every λ of the grid (CPU tensors)."""

    candidates: Tensor  # [c] the candidate ranks
    train: Tensor  # [len(grid), c] training loss (mean square of the linearized residual)
    sel: Tensor  # [len(grid), c] selection loss (validation loss or GCV)
    kind: str  # what scores: val_loss, gcv or train_loss
    grid: tuple[float, ...]
    n: int  # residual rows (all processes)
    f_sq: float  # ‖f0‖²
    num_sel: int  # validation rows (0 without a validation operator)
    S: Tensor  # [K] the singular values of G
    lam_of: Tensor = field(init=False)  # [c] index of the best λ per rank
    best_per_rank: Tensor = field(init=False)  # [c] the best score per rank
    best: int = field(init=False)  # index of the best candidate

    def __post_init__(self) -> None:
        scored = self.train if self.kind == "train_loss" else self.sel
        metric = torch.where(torch.isfinite(scored), scored, torch.inf)
        self.lam_of = metric.argmin(0)
        self.best_per_rank = metric.min(0).values
        self.best = int(self.best_per_rank.argmin())

    def entry(self, i: int) -> SweepEntry:
        """The sweep entry of candidate ``i`` at its best λ."""
        li = int(self.lam_of[i])
        norm_f = math.sqrt(self.f_sq)
        return SweepEntry(
            int(self.candidates[i]),
            float(self.train[li, i]),
            float(self.sel[li, i]) if self.kind != "train_loss" else None,
            math.sqrt(float(self.train[li, i]) * self.n) / max(norm_f, 1e-300),
            self.grid[li],
            0,
            float(self.S[0] / self.S[int(self.candidates[i]) - 1]),
        )


def solve_spectral(
    G: LinearOperator,
    f0: Tensor,
    selection: Selection,
    lsr: LsrConfig,
    gen: torch.Generator,
    sink: ProgressSink,
    label: str = "G",
    sketch: RangeSketch | None = None,
    comm: Comm = SINGLE,
) -> SubspaceResult | None:
    """LSR of ``min ‖f0 + G P z‖`` with ``P`` the exact right singular vectors of ``G`` (scaled by
    ``S⁻¹``), every rank up to the numerical rank scored on the selection's validation operator,
    by generalized cross-validation, or by the training loss (``train_loss``); ``None`` when the
    sketch of ``G`` (``sketch``, a new one if not given) does not exhaust within ``lsr.max_rank``.

    Distributed (``comm``): ``G``, ``f0`` and the selection hold this rank's rows; the sketch is
    the distributed range finder, and every sum over rows (``Uᵀ f0``, the residual norms, the
    validation losses) is all-reduced, so the scores, the choice and ``z`` are the same on
    every rank and do not depend on the number of ranks."""
    if (selection.op is None) != (selection.f0 is None) or (selection.kind == "val_loss" and selection.op is None):
        return None
    n_local, m = G.shape
    n = comm.sum_int(n_local)
    limit = min(n, m)
    ranks_wanted, _ = _plan_ranks(lsr, limit, n, m)  # fixed ranks above the limit: a config error, as adaptive
    timings = {"sketch": 0.0, "project": 0.0, "solve": 0.0}

    t0 = time.perf_counter()
    sketch = _exhaust_sketch(G, f0, lsr, gen, sink, label, sketch, limit, comm)
    complete = sketch.exhausted or sketch.num_columns >= limit
    usable = sketch.usable_rank()
    timings["sketch"] = time.perf_counter() - t0
    if not complete or usable == 0:
        return None

    t1 = time.perf_counter()
    W, S, Vh = sketch.svd()
    k = min(usable, lsr.max_rank)
    b = Vh[:k] @ comm.allreduce_sum(sketch.Q.T @ f0)  # U_kᵀ f0 with G ≈ U S Wᵀ, U = Q Vhᵀ
    kind = "gcv" if selection.kind in ("holdout_loss", "gcv") else selection.kind
    grid = tikhonov_grid(lsr, kind != "train_loss")
    shrinks = [1.0 / (1.0 + lam * lam) for lam in grid]  # A = G P = U: Tikhonov shrinks every z_i alike
    sel_sq: Tensor | None = None
    if selection.op is not None and selection.f0 is not None:
        advance = sink.begin(f"validation rows x P (k={k})", 1)
        sel_sq = _selection_losses(selection.op, selection.f0, W[:, :k] / S[:k], -b, shrinks, comm)
        advance(1)
        sink.end()
    timings["project"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    scores = _score_ranks(f0, sketch.Q, Vh[:k], b, S, selection, sel_sq, ranks_wanted, kind, grid, shrinks, n, comm)
    base_train, base_sel, base_metric = _baselines(scores, selection, sel_sq, comm)
    shown = None if ranks_wanted else set(_reported(int(scores.candidates[-1]), int(scores.candidates[scores.best])))
    sweep = [SweepEntry(0, base_train, base_sel, 1.0, 0.0, 0, 1.0)]
    sweep += [
        scores.entry(i) for i in range(len(scores.candidates)) if shown is None or int(scores.candidates[i]) in shown
    ]
    chosen = sweep[0]
    dz = z = basis = None
    if float(scores.best_per_rank[scores.best]) < base_metric:
        chosen = scores.entry(scores.best)
        z = -b[: chosen.rank] / (1.0 + chosen.tikhonov**2)
        basis = W[:, : chosen.rank] / S[: chosen.rank]
        dz = basis @ z
        if comm.world > 1:  # identical everywhere already; rank 0's, as on the adaptive path
            dz = comm.broadcast(dz)
    timings["solve"] = time.perf_counter() - t2
    return SubspaceResult(
        rank=int(chosen.rank),
        dz=dz,
        chosen=chosen,
        sweep=sweep,
        rounds=[_round(scores, k, sketch.num_columns, usable, chosen)],
        stop_reason=_stop_reason(label, usable, k, kind),
        regularization=_regularization(label, grid, chosen, kind),
        singular_values=[float(s) for s in S.cpu()],
        timings=timings,
        basis=basis,
        z=z,
        lambda_abs=float(chosen.tikhonov),
        selection=Selection(kind) if selection.op is None else selection,
    )


def _exhaust_sketch(
    G: LinearOperator,
    f0: Tensor,
    lsr: LsrConfig,
    gen: torch.Generator,
    sink: ProgressSink,
    label: str,
    sketch: RangeSketch | None,
    limit: int,
    comm: Comm,
) -> RangeSketch:
    """``sketch`` (a new one of ``G`` if None) extended to ``lsr.max_rank`` + a block of columns,
    or fewer when a block adds nothing above round-off."""
    if sketch is None:
        sketch = RangeSketch(G, gen, f0.dtype, f0.device, lsr.power_iterations, SPECTRAL_BLOCK, comm)
    k_target = min(lsr.max_rank + SPECTRAL_BLOCK, limit)
    new_cols = k_target - sketch.num_columns
    if new_cols > 0:
        advance = sink.begin(f"sketch {label} (exact, k≤{k_target})", 2 * new_cols)
        sketch.extend(new_cols, advance)
        sink.end()
    return sketch


def _score_ranks(
    f0: Tensor,
    Q: Tensor,
    Vh_k: Tensor,
    b: Tensor,
    S: Tensor,
    selection: Selection,
    sel_sq: Tensor | None,
    ranks_wanted: list[int],
    kind: str,
    grid: tuple[float, ...],
    shrinks: list[float],
    n: int,
    comm: Comm,
) -> _Scores:
    """The training and selection losses of every candidate rank and λ.

    ``f0`` ``[n_local]``; ``Q`` ``[n_local, K]`` the sketch's basis; ``Vh_k`` ``[k, K]``; ``b``
    ``[k]`` = ``U_kᵀ f0``; ``S`` ``[K]``; ``sel_sq`` ``[len(grid), k]`` the validation losses (sums),
    or None: GCV (or the training loss for ``train_loss``)."""
    k = b.shape[0]
    f_sq = comm.sum_float(float(f0.square().sum()))
    # the scores are computed on the CPU (k numbers per λ), whatever the device
    b2 = b.square().cpu()
    b_cum = torch.cumsum(b2, 0)  # ‖U_rᵀ f0‖² for r = 1..k
    # ‖f0 − U_r U_rᵀ f0‖² as (part outside range(U_k)) + Σ_{i>r} b_i², not ‖f0‖² − ‖b_r‖²:
    # no cancellation when the residual falls many orders below ‖f0‖
    perp = comm.sum_float(float((f0 - Q @ (Vh_k.T @ b)).square().sum()))
    tail = torch.flip(torch.cumsum(torch.flip(b2, (0,)), 0), (0,)) - b2
    if ranks_wanted:
        candidates = torch.tensor(sorted({min(r, k) for r in ranks_wanted}))
    else:
        candidates = torch.arange(1, k + 1)
    idx = candidates - 1
    ranks = candidates.to(f0.dtype)
    num_sel = comm.sum_int(selection.f0.numel()) if selection.f0 is not None else 0
    train_rows, sel_rows = [], []
    for j, (lam, shrink) in enumerate(zip(grid, shrinks, strict=True)):
        res_sq = (perp + tail + b_cum * (lam * lam * shrink) ** 2)[idx]
        train_rows.append(res_sq / n)
        if sel_sq is not None:
            sel_rows.append(sel_sq[j].cpu()[idx] / max(num_sel, 1))
        else:
            dof = (1.0 - ranks * shrink / n).clamp_min(0.0)
            sel_rows.append(torch.where(dof > 0, res_sq / n / dof.square(), torch.inf))
    train = torch.stack(train_rows).cpu()  # [λ, candidate]
    sel = torch.stack(sel_rows)
    return _Scores(candidates, train, sel, kind, grid, n, f_sq, num_sel, S)


def _baselines(
    scores: _Scores, selection: Selection, sel_sq: Tensor | None, comm: Comm
) -> tuple[float, float | None, float]:
    """Rank 0's training loss, selection loss (None for ``train_loss``) and the metric that scores."""
    base_train = scores.f_sq / max(scores.n, 1)
    if sel_sq is not None and selection.f0 is not None:
        base_sel: float | None = comm.sum_float(float(selection.f0.square().sum())) / max(scores.num_sel, 1)
    else:
        base_sel = base_train if scores.kind == "gcv" else None
    base_metric = base_train if scores.kind == "train_loss" else float(base_sel)  # type: ignore[arg-type]
    return base_train, base_sel, base_metric


def _round(scores: _Scores, k: int, num_columns: int, usable: int, chosen: SweepEntry) -> dict[str, Any]:
    """The report's one round of the spectral path."""
    top = scores.entry(len(scores.candidates) - 1)
    return {
        "rank": k,
        "sketch_columns": num_columns,
        "usable_rank": usable,
        "best_rank": int(chosen.rank),
        scores.kind: float(scores.best_per_rank[scores.best]),
        "linearized_residual": top.linearized_residual,
        "path": "spectral",
    }


def _stop_reason(label: str, usable: int, k: int, kind: str) -> str:
    if usable > k:
        stop = f"exact: {usable} directions of {label} above round-off, capped at lsr.max_rank {k}"
    else:
        stop = f"exact: the sketch of {label} exhausted its range at {usable} directions above round-off"
    return stop + f"; every rank up to {k} scored ({kind})"


def _regularization(label: str, grid: tuple[float, ...], chosen: SweepEntry, kind: str) -> dict[str, Any]:
    return {
        "truncation_rcond": f"spectral: directions of {label} above eps * max(n, m) of its largest",
        "tikhonov_grid": list(grid),
        "tikhonov": chosen.tikhonov,
        "tikhonov_meaning": "lambda / largest singular value of A = G P (A = U, orthonormal, here)",
        "num_truncated": 0,
        "cond": chosen.cond,
        "chosen_by": kind,
        "holdout_fraction": 0.0,
    }


def solve_exact_first(
    G: LinearOperator,
    f0: Tensor,
    selection: Selection,
    lsr: LsrConfig,
    gen: torch.Generator,
    sink: ProgressSink,
    label: str,
    adaptive: Callable[[RangeSketch], SubspaceResult],
    comm: Comm = SINGLE,
) -> SubspaceResult:
    """:func:`solve_spectral` on a new sketch of ``G``; when it does not exhaust, ``adaptive``
    (the caller's :func:`~.subspace.solve_subspace` with ``G`` as its basis operator) continues
    from that sketch, and the time of the attempt counts in its ``sketch`` stage."""
    t0 = time.perf_counter()
    sketch = RangeSketch(G, gen, f0.dtype, f0.device, lsr.power_iterations, SPECTRAL_BLOCK, comm)
    sub = solve_spectral(G, f0, selection, lsr, gen, sink, label, sketch, comm)
    if sub is not None:
        return sub
    spent = time.perf_counter() - t0
    sub = adaptive(sketch)
    sub.timings["sketch"] = sub.timings.get("sketch", 0.0) + spent
    return sub


__all__ = ["SPECTRAL_MAX_ENTRIES", "SPECTRAL_MAX_WORK", "solve_exact_first", "solve_spectral"]
