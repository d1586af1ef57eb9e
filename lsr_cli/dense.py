"""The dense Jacobian path: whether it fits, what it costs against JVPs, and materializing it.

:mod:`.plan` decides with these; a decision taken by timing is made on rank 0 and broadcast
(:func:`on_root`), so that every rank and every number of ranks takes the same path.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from .distributed import SINGLE, Comm
from .linearization import DenseOperator, JacobianOperator, materialize, take_rows
from .runtime import resolve_memory_budget

DENSE_GEMM_FLOPS = 1e9
"""Floor of the float64 GEMM rate (flop/s) measured for the dense path's cost estimate."""


def estimated_costs(t_col: float, t_mat: float, n: int, m: int, k: int, gemm_rate: float) -> tuple[float, float]:
    """Seconds of (matrix-free, dense) for ``k`` sketch columns: ``3k`` Jacobian products over
    all rows at ``t_col`` each, against materializing ``J`` (``t_mat``) plus three GEMMs of
    ``2nmk`` flops at ``gemm_rate``."""
    return 3 * k * t_col, t_mat + 3 * 2 * n * m * k / gemm_rate


def on_root(comm: Comm, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` (a decision by timing) on rank 0, its answer broadcast to every
    rank: the run takes the same path on every rank and for any number of ranks."""
    if comm.world == 1:
        return fn(*args, **kwargs)
    answer = fn(*args, **kwargs) if comm.is_root else None
    return comm.allgather_object(answer)[0]


def matrix_free_is_cheaper(
    op: JacobianOperator,
    columns: int,
    num_rows: int | None = None,
    probe_samples: int = 32,
    max_bytes: int | None = None,
) -> str | None:
    """Time both paths on a few samples and extrapolate to ``columns`` sketch columns; the reason
    when JVPs win, else ``None``.

    Matrix-free: about ``3 k`` Jacobian products over every row (sketch ``JΩ``, ``JᵀQ``,
    projection ``JP``). Dense: materializing the per-sample Jacobians plus the same products as
    GEMMs. Cheap models with shared inputs (a Cartesian DeepONet) favour JVPs; deep networks with
    many parameters favour the dense path. ``num_rows``: the rows of the whole run (distributed:
    every rank's; default ``op``'s), to which the timings on ``op``'s first samples are
    extrapolated; the caller runs it on one rank (:func:`on_root`), timings differ between ranks.
    ``max_bytes``: what the probe's Jacobian rows and GEMM operands may take (fewer samples and
    rows under a tight memory budget).
    """
    n_rows = op.shape[0] if num_rows is None else int(num_rows)
    if max_bytes is not None:  # per-sample Jacobian rows (out · m) and GEMM rows (m) of 8 bytes
        per_sample = 8 * max(1, op.out_numel) * op.shape[1]
        probe_samples = max(1, min(probe_samples, max_bytes // (2 * per_sample)))
    n_samples = max(1, n_rows // max(1, op.out_numel))
    s = min(probe_samples, n_samples)
    sub = JacobianOperator(
        op.module,
        op.space,
        take_rows(op.inputs, 0, s, op.shared),
        op.row_chunk,
        op.tangent_chunk,
        op.residual,
        op.shared,
    )
    k = columns
    cols = min(k, op.tangent_chunk)
    V = torch.randn(sub.shape[1], cols, generator=torch.Generator().manual_seed(0), dtype=sub.dtype).to(sub.device)
    sub.matmat(V)  # warm-up
    t0 = time.perf_counter()
    sub.matmat(V)
    t_col = (time.perf_counter() - t0) / cols * (n_samples / s)
    t0 = time.perf_counter()
    try:
        sub.jacobian_rows(0, s)
    except Exception:  # not vmappable over samples: materialize() will say why
        return None
    t_mat = (time.perf_counter() - t0) * (n_samples / s)
    n, m = n_rows, op.shape[1]
    rows = min(n, 2048) if max_bytes is None else max(1, min(n, 2048, max_bytes // (2 * 8 * m)))
    gen = torch.Generator().manual_seed(0)  # timing only; keeps the global RNG untouched
    A = torch.randn(rows, m, dtype=sub.dtype, generator=gen).to(sub.device)
    B = torch.randn(m, 64, dtype=sub.dtype, generator=gen).to(sub.device)
    A @ B  # warm-up
    t0 = time.perf_counter()
    A @ B
    gemm_rate = max(2 * rows * m * 64 / max(time.perf_counter() - t0, 1e-9), DENSE_GEMM_FLOPS)
    del A, B
    free, dense = estimated_costs(t_col, t_mat, n, m, k, gemm_rate)
    if free < dense:
        return (
            f"JVPs are estimated cheaper for {k} sketch columns ({free:.1f} s against {dense:.1f} s to materialize "
            f"J and multiply; timed on {s} samples)"
        )
    return None


def dense_too_large(ops: dict[str, Any], max_bytes: int, comm: Comm = SINGLE) -> str | None:
    """Why the operators' dense Jacobian (every rank's rows, float64) cannot be held in
    ``max_bytes``, or ``None`` when it can."""
    n = comm.sum_int(sum(op.shape[0] for op in ops.values()))
    m = next(iter(ops.values())).shape[1]
    if n * m * 8 <= max_bytes:
        return None
    return f"the dense Jacobian ({n} x {m}, {n * m * 8 / 1e6:.0f} MB) exceeds half of the memory budget ({max_bytes / 1e6:.0f} MB)"


def choose_dense(
    ops: dict[str, JacobianOperator],
    max_bytes: int,
    progress: Callable[[int], None] | None = None,
    comm: Comm = SINGLE,
) -> tuple[dict[str, DenseOperator] | None, str]:
    """Materialize every operator when together they fit ``max_bytes`` and are pointwise
    (:func:`~.linearization.materialize`); else ``(None, why)``. The check vector comes from a
    fixed private generator, so the run's random stream is the same on either path.

    Distributed (``comm``): the size is that of the whole ``J`` (every rank's rows), so the
    choice is the one a single process makes, whatever the number of ranks; each rank holds
    its own rows, and the dense path is taken only when it succeeds on every rank."""
    too_large = dense_too_large(ops, max_bytes, comm)
    if too_large is not None:
        return None, too_large
    n = comm.sum_int(sum(op.shape[0] for op in ops.values()))
    m = next(iter(ops.values())).shape[1]
    total = n * m * 8
    out: dict[str, DenseOperator] = {}
    why = ""
    for name, op in ops.items():
        dense, why = materialize(op, max_bytes, torch.Generator().manual_seed(0), progress)
        if dense is None:
            break
        out[name] = dense
    here = len(out) == len(ops)
    if not comm.all_ok(here):  # every rank takes the same path
        return None, why if not here else "materializing the Jacobian failed on another rank"
    return out, (
        f"the dense Jacobian ({n} x {m}, {total / 1e6:.0f} MB) fits half of the memory budget "
        f"({max_bytes / 1e6:.0f} MB) and the residual is pointwise"
    )


def held_dense(ops: dict[str, Any], max_memory: int | str, fraction: int, comm: Comm = SINGLE) -> dict[str, Any]:
    """``ops`` materialized when they fit ``1/fraction`` of the memory budget (``lsr.max_memory``) (the PDE basis and
    validation operators follow ``G`` onto the dense path), else unchanged."""
    budget = resolve_memory_budget(max_memory, next(iter(ops.values())).device)
    dense, _ = choose_dense(ops, budget // fraction, None, comm)
    return dict(dense) if dense is not None else ops
