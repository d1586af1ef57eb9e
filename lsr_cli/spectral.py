"""One-shot LSR in the exact singular basis of a small residual Jacobian held in memory.

When ``G`` (``n × m``) is dense and small, the randomized range finder usually exhausts the
range of ``G``: a whole block of new columns adds nothing above round-off. The sketch is then an
SVD of ``G`` to round-off, ``G = U S Wᵀ`` with ``U = Q V_B`` (``B = Gᵀ Q = W S V_Bᵀ``), and with
``P = W S⁻¹`` the reduced matrix is ``A = G P = U``, orthonormal. Every truncation rank and λ is
then solved and scored at once (``z_r = −U_rᵀ f0 / (1 + λ²)``); no projection ``G P``, QR or
per-rank SVD is needed, which on a problem of a few thousand rows is most of the cost of the
adaptive path (:func:`~.subspace.solve_subspace`). At full rank the step is the dense
Gauss–Newton step (the truncated-SVD pseudo-inverse).

The rank and λ are chosen by generalized cross-validation (Golub, Heath & Wahba 1979):
``GCV(r, λ) = (‖f0 + A z‖² / n) / (1 − tr(H)/n)²`` with ``tr(H) = r / (1 + λ²)``, which uses
every row. Held-out rows would have to be left out of the basis as well as of the fit, and the
basis from the other rows alone is measurably weaker (Poisson 2-D sample: 2.6e-7 at best
against 1.3e-7). With ``lsr.holdout: 0`` the training loss chooses, as on the adaptive path.

When the sketch does not exhaust within ``lsr.max_rank``, nothing is returned and the caller
runs the adaptive path.
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor

from .config import LsrConfig
from .runtime import ProgressSink
from .sketch import LinearOperator, RangeSketch
from .subspace import Selection, SubspaceResult, SweepEntry, tikhonov_grid

SPECTRAL_MAX_ENTRIES = 1 << 24
"""Entries of ``G`` (``n · m``, 128 MB in float64) up to which the spectral path is tried."""

SPECTRAL_BLOCK = 128
"""Sketch columns per block: a block that adds nothing above round-off ends the sketch."""

REPORTED_RANKS = 32
"""Ranks listed in the report's sweep (geometrically spaced, plus the chosen one)."""


def _reported(ranks: int, chosen: int) -> list[int]:
    """About :data:`REPORTED_RANKS` ranks from 1 to ``ranks``, geometrically spaced, with ``chosen``."""
    grid = {max(1, round(ranks ** (i / (REPORTED_RANKS - 1)))) for i in range(REPORTED_RANKS)}
    return sorted(grid | {ranks, chosen} - {0})


def solve_spectral(
    G: LinearOperator,
    f0: Tensor,
    selection: Selection,
    lsr: LsrConfig,
    gen: torch.Generator,
    sink: ProgressSink,
    label: str = "G",
) -> SubspaceResult | None:
    """LSR of ``min ‖f0 + G P z‖`` with ``P`` the exact right singular vectors of ``G`` (scaled by
    ``S⁻¹``), every rank up to the numerical rank scored by generalized cross-validation (or by
    the training loss when the selection is ``train_loss``); ``None`` when the sketch of ``G``
    does not exhaust within ``lsr.max_rank`` or the selection is a separate operator."""
    if selection.op is not None:
        return None
    n, m = G.shape
    limit = min(n, m)
    timings = {"sketch": 0.0, "project": 0.0, "solve": 0.0}

    t0 = time.perf_counter()
    sketch = RangeSketch(G, gen, f0.dtype, f0.device, lsr.power_iterations, block_size=SPECTRAL_BLOCK)
    k_target = min(lsr.max_rank + SPECTRAL_BLOCK, limit)
    advance = sink.begin(f"sketch {label} (exact, k≤{k_target})", 2 * k_target)
    sketch.extend(k_target, advance)
    sink.end()
    complete = sketch.exhausted or sketch.num_columns >= limit
    usable = sketch.usable_rank()
    timings["sketch"] = time.perf_counter() - t0
    if not complete or usable == 0:
        return None

    t1 = time.perf_counter()
    W, S, Vh = sketch.svd()
    k = min(usable, lsr.max_rank)
    b = Vh[:k] @ (sketch.Q.T @ f0)  # U_kᵀ f0 with G ≈ U S Wᵀ, U = Q Vhᵀ
    timings["project"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    f_sq = float(f0.square().sum())
    b_cum = torch.cumsum(b.square(), 0)  # ‖U_rᵀ f0‖² for r = 1..k
    # ‖f0 − U_r U_rᵀ f0‖² as (part outside range(U_k)) + Σ_{i>r} b_i², not ‖f0‖² − ‖b_r‖²:
    # no cancellation when the residual falls many orders below ‖f0‖
    perp = float((f0 - sketch.Q @ (Vh[:k].T @ b)).square().sum())
    tail = torch.flip(torch.cumsum(torch.flip(b.square(), (0,)), 0), (0,)) - b.square()
    use_gcv = selection.kind != "train_loss"
    grid = tikhonov_grid(lsr, use_gcv)
    if lsr.rank == "auto":
        candidates = torch.arange(1, k + 1)
    else:
        wanted = list(lsr.rank) if isinstance(lsr.rank, list) else [int(lsr.rank)]
        candidates = torch.tensor(sorted({min(int(r), k) for r in wanted}))
    idx = candidates - 1
    ranks = candidates.to(f0.dtype)
    train_rows, gcv_rows = [], []
    for lam in grid:
        shrink = 1.0 / (1.0 + lam * lam)  # A = G P = U: Tikhonov shrinks every z_i alike
        res_sq = (perp + tail + b_cum * (lam * lam * shrink) ** 2)[idx]
        train_rows.append(res_sq / n)
        dof = (1.0 - ranks * shrink / n).clamp_min(0.0)
        gcv_rows.append(torch.where(dof > 0, res_sq / n / dof.square(), torch.inf))
    train = torch.stack(train_rows)  # [λ, candidate]
    gcv = torch.stack(gcv_rows)
    metric = torch.where(torch.isfinite(gcv if use_gcv else train), gcv if use_gcv else train, torch.inf)
    lam_of = metric.argmin(0)
    best_per_rank = metric.min(0).values
    j = int(best_per_rank.argmin())
    base_train = f_sq / max(n, 1)
    norm_f = math.sqrt(f_sq)

    def entry(i: int) -> SweepEntry:
        li = int(lam_of[i])
        return SweepEntry(
            int(candidates[i]),
            float(train[li, i]),
            float(gcv[li, i]) if use_gcv else None,
            math.sqrt(float(train[li, i]) * n) / max(norm_f, 1e-300),
            grid[li],
            0,
            float(S[0] / S[int(candidates[i]) - 1]),
        )

    shown = set(_reported(int(candidates[-1]), int(candidates[j]))) if lsr.rank == "auto" else None
    sweep = [SweepEntry(0, base_train, base_train if use_gcv else None, 1.0, 0.0, 0, 1.0)]
    sweep += [entry(i) for i in range(len(candidates)) if shown is None or int(candidates[i]) in shown]
    chosen = sweep[0]
    dz = z = basis = None
    if float(best_per_rank[j]) < base_train:
        chosen = entry(j)
        r = chosen.rank
        z = -b[:r] / (1.0 + chosen.tikhonov**2)
        basis = W[:, :r] / S[:r]
        dz = basis @ z
    timings["solve"] = time.perf_counter() - t2
    top = entry(len(candidates) - 1)
    kind = "gcv" if use_gcv else "train_loss"
    if usable > k:
        stop = f"exact: {usable} directions of {label} above round-off, capped at lsr.max_rank {k}"
    else:
        stop = f"exact: the sketch of {label} exhausted its range at {usable} directions above round-off"
    return SubspaceResult(
        rank=int(chosen.rank),
        dz=dz,
        chosen=chosen,
        sweep=sweep,
        rounds=[
            {
                "rank": k,
                "sketch_columns": sketch.num_columns,
                "usable_rank": usable,
                "best_rank": int(chosen.rank),
                kind: float(best_per_rank[j]),
                "linearized_residual": top.linearized_residual,
                "path": "spectral",
            }
        ],
        stop_reason=stop + f"; every rank up to {k} scored ({kind})",
        regularization={
            "truncation_rcond": f"spectral: directions of {label} above eps * max(n, m) of its largest",
            "tikhonov_grid": list(grid),
            "tikhonov": chosen.tikhonov,
            "tikhonov_meaning": "lambda / largest singular value of A = G P (A = U, orthonormal, here)",
            "num_truncated": 0,
            "cond": chosen.cond,
            "chosen_by": kind,
            "holdout_fraction": 0.0,
        },
        singular_values=[float(s) for s in S.cpu()],
        timings=timings,
        basis=basis,
        z=z,
        lambda_abs=float(chosen.tikhonov),
        selection=Selection(kind),
    )


__all__ = ["SPECTRAL_MAX_ENTRIES", "solve_spectral"]
