"""The memory budget as a bound: what a run holds, the smallest plan, and the chunk sizes.

Before the first heavy stage (the sketch), :func:`plan_memory` adds up what the run must hold
from then on and sizes the rest from what remains of ``lsr.max_memory``:

- ``held``: what is resident now above the run's start (data, the model's outputs and
  residuals, a dense Jacobian), measured by the :class:`~.runtime.MemoryMeter`;
- ``sketch``: the range finder at its largest width ``k`` — ``Y``, ``Q`` and the copies of its
  orthonormalization over the sketched rows, ``Ω``, ``B = JᵀQ``, its SVD and the basis ``P``
  (``m × k`` each), the small ``k × k`` factors; a fixed rank above the sweep limit on one
  process releases its sketch before the SVD and is counted that way
  (:func:`released_sketch_bytes`, about ``2 m k``);
- ``projection``: the streaming QR of ``[G P | f0]`` — a batch of folded rows and its copies, the
  triangles — at the largest rank;
- the autodiff ``workspace`` of one Jacobian-product chunk, measured on the model itself (one
  JVP and one VJP chunk on a few samples), per sample and tangent column.

When the budget cannot hold ``held + sketch + projection`` plus the workspace of one sample and
one tangent column, a smaller plan is tried (``lsr.rank: auto``: a lower rank cap); failing that
the run stops with a :class:`~.errors.ConfigError` naming the minimum and what to change.
Otherwise the chunks (samples per JVP/VJP chunk, tangent columns per chunk) are the largest that
fit what remains. Planned sizes are float64 sizes scaled by the run's element size, and the
plan keeps :data:`SAFETY` of the budget: the process's resident set also holds allocator slack,
HDF5 caches and Python objects.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from .distributed import SINGLE, Comm
from .errors import ConfigError
from .runtime import MemoryMeter

SAFETY = 0.85
"""Share of the budget the plan fills (the rest: allocator slack, HDF5 caches, Python objects)."""

PROBE_SAMPLES = 64
PROBE_TANGENTS = 8
"""The workspace probe: one JVP and one VJP chunk of this many samples and tangent columns."""

MMAP_THRESHOLD = 64 * 1024
"""glibc: allocations from this size on are memory-mapped, so freeing them returns the memory."""


def limit_allocator_slack() -> bool:
    """Make glibc return freed blocks of :data:`MMAP_THRESHOLD` bytes and more to the system at once.

    By default glibc raises its mmap threshold each time a large block is freed (up to 32 MB), so
    later blocks of that size come from the heap and stay resident after they are freed: the
    resident set then grows by tens of MB in a way that depends on the order of allocations
    (measured: a 48 MB run peaked at 57-62 MB, and at 49 MB with the threshold fixed). Called when
    the user gives a budget; a no-op where glibc is absent."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD)) and bool(
            libc.mallopt(m_trim_threshold, 2 * MMAP_THRESHOLD)
        )
    except (OSError, AttributeError):
        return False


def _mb(b: float) -> str:
    return f"{b / 1e6:.1f} MB"


@dataclass
class MemoryPlan:
    """What the run may use from the sketch on, and the chunk sizes chosen to fit (bytes)."""

    budget: int
    held: int
    sketch: int
    projection: int
    workspace_per_unit: float  # bytes per (sample, tangent column) of a Jacobian-product chunk
    workspace_measured: bool
    fold_budget: int  # what the streaming QR's fold batches may use (see subspace.fold_rows)
    row_chunk: int
    tangent_chunk: int
    max_columns: int
    minimum: int
    adapted: list[str] = field(default_factory=list)

    def report(self) -> dict[str, Any]:
        return {
            "budget_bytes": self.budget,
            "planned_fraction": SAFETY,
            "held_bytes": self.held,
            "sketch_bytes": self.sketch,
            "projection_bytes": self.projection,
            "workspace_bytes_per_sample_column": self.workspace_per_unit,
            "workspace_measured": self.workspace_measured,
            "minimum_budget_bytes": self.minimum,
            "fold_budget_bytes": self.fold_budget,
            "row_chunk_samples": self.row_chunk,
            "tangent_chunk": self.tangent_chunk,
            "max_sketch_columns": self.max_columns,
            "adapted": self.adapted,
        }


SKETCH_BLOCK = 128
"""Columns the range finder adds at a time (:class:`~.sketch.RangeSketch`'s block)."""

MIN_FOLD_ROWS = 64
"""The fewest rows the streaming QR folds at a time (:func:`~.subspace.fold_rows`)."""


def sketch_bytes(rows: int, m: int, k: int, itemsize: int = 8) -> int:
    """The range finder at ``k`` columns over ``rows`` sketched rows and ``m`` parameters: ``Q``
    while it grows (the old and the new, concatenated), the block being added (``Y`` or its
    orthonormal copy; ``Ω``), ``B = JᵀQ`` while it grows, its SVD factor ``W`` and the basis
    ``P`` (``m × k`` each), and the ``k × k`` factors. LAPACK's SVD of ``B`` takes about as
    much again as ``W``: a budget counted with ``3 m k`` was exceeded by 14 % at k = 2 005
    (`benchmarks/paper_operators.py`), so the count stays at ``4 m k`` and ``2 k`` rows of
    ``Q`` although ``Q`` now grows in place. The last round of a large rank needs less
    (:meth:`~.sketch.RangeSketch.release`)."""
    b = min(k, SKETCH_BLOCK)
    return itemsize * (rows * (2 * k + b) + m * b + 4 * m * k + 2 * k * k)


def released_sketch_bytes(rows: int, m: int, k: int, itemsize: int = 8) -> int:
    """The range finder of a run that builds its sketch once and releases it before the SVD
    (:meth:`~.sketch.RangeSketch.release`: one round of a fixed rank above the sweep limit, on one
    process). The peak is the largest of: the growth (``Q`` and ``B`` in their buffers, one
    block's ``Ω``, ``Y``, its orthonormal copies, ``JᵀQ_b`` and its norm's copies); the
    Householder QR of ``B`` beside ``B`` (``2 m k`` and ``R_B``); ``Q_B`` with the SVD of ``R_B``
    (LAPACK's copies and workspace, about ``8 k²``); and ``W = Q_B U`` formed in place, a block
    of at most 2²⁴ entries at a time (and BLAS's packed copies). ``P`` then replaces ``W``.
    Measured on a 1 500 × 6 000 operator at k = 700 (`tests/test_budget.py`), the peak stays
    within this count."""
    b = min(k, SKETCH_BLOCK)
    growth = rows * (k + 3 * b) + m * (k + 5 * b)
    in_place = m * k + 2 * min(m, max(1, (1 << 24) // k)) * k + 3 * k * k  # the block and BLAS's copies
    return itemsize * max(growth, 2 * m * k + k * k, m * k + 8 * k * k, in_place)


def triangle_bytes(r: int) -> int:
    """The reduced problem at rank ``r`` (float64): the QR triangles (fit, held-out or
    validation, merged) and the SVD of the chosen rank's triangle."""
    return 8 * 6 * (r + 1) ** 2


def fold_bytes(r: int, rows: int) -> int:
    """A streaming-QR fold of ``rows`` rows at rank ``r``: the batch, its concatenation with
    the triangle and the QR's copy (float64)."""
    return 8 * 3 * (rows + r + 1) * (r + 1)


def measure_workspace(op: Any, meter: MemoryMeter) -> tuple[float, bool]:
    """Bytes per (sample, tangent column) of one JVP and one VJP chunk of ``op`` (a
    :class:`~.linearization.JacobianOperator`), measured on its first samples; a dense operator
    has no autodiff workspace. ``(per_unit, measured)``; not measured where the peak counter
    cannot be reset (then a conservative guess from the output size)."""
    from .linearization import JacobianOperator

    if not isinstance(op, JacobianOperator) or op.num_samples == 0:
        return 0.0, True
    s = min(PROBE_SAMPLES, op.num_samples)
    t = min(PROBE_TANGENTS, op.tangent_chunk)
    sub = op.head(s, s, t)
    gen = torch.Generator().manual_seed(0)  # probing only; the run's random stream is untouched
    V = torch.randn(sub.shape[1], t, generator=gen, dtype=sub.dtype).to(sub.device)
    U = torch.randn(sub.shape[0], t, generator=gen, dtype=sub.dtype).to(sub.device)
    sub.matmat(V), sub.rmatmat(U)  # warm-up: one-time allocations are not per-chunk costs

    def both() -> None:
        sub.matmat(V)
        sub.rmatmat(U)

    peak = meter.measure(both)
    if peak is None:
        return 64.0 * sub.dtype.itemsize * max(1, sub.out_numel) * 64, False
    return peak / (s * t), True


def plan_memory(
    budget: int,
    meter: MemoryMeter,
    op: Any,
    sketch_rows: int,
    m: int,
    max_columns: int,
    min_columns: int,
    max_rank: int,
    out_numel: int,
    row_chunk: int,
    tangent_chunk: int,
    adaptable: bool,
    comm: Comm = SINGLE,
    itemsize: int = 8,
    full_svd_columns: int | None = None,
) -> MemoryPlan:
    """The plan of a supervised run from the sketch on (see the module doc).

    ``sketch_rows``: rows of this rank's sketched operator; ``max_columns``: the widest sketch the
    run may build (``min_columns`` the narrowest useful one); ``adaptable``: the rank is chosen
    by the run (``auto``), so a narrower sketch is a smaller plan rather than a different
    request. ``full_svd_columns``: the run releases its sketch before the SVD whenever it is wider
    than this (:func:`released_sketch_bytes`; a narrower one takes the full SVD of ``B``), and
    its projection then holds only ``P`` beside the triangles, folds and chunks; None: never.
    Distributed: every rank plans its own rows; the chunk sizes and the refusal are made the
    same on every rank (the most constrained rank decides)."""
    per_unit, measured = measure_workspace(op, meter)
    held = meter.current_above_start()
    usable = SAFETY * budget

    def rank_at(k: int) -> int:  # the largest rank a sketch of k columns serves
        return max(1, min(max_rank, k))

    def released(k: int) -> bool:  # a sketch of k columns is released before its SVD
        return full_svd_columns is not None and k > full_svd_columns

    def sketch_at(k: int) -> int:
        if not released(k):
            return sketch_bytes(sketch_rows, m, k, itemsize)
        assert full_svd_columns is not None
        return max(
            released_sketch_bytes(sketch_rows, m, k, itemsize), sketch_bytes(sketch_rows, m, full_svd_columns, itemsize)
        )

    def fixed(k: int) -> int:
        r = rank_at(k)
        projection = triangle_bytes(r) + fold_bytes(r, MIN_FOLD_ROWS)
        if not released(k):
            return held + sketch_at(k) + projection
        # released: the projection holds only P (W scaled in place) and the k × k factors
        return held + max(sketch_at(k), itemsize * (m * k + 2 * k * k) + projection)

    def chunk_bytes(rows: int, tangents: int, k: int) -> float:  # autodiff workspace + its rows of G P
        return per_unit * rows * tangents + itemsize * out_numel * rank_at(k) * rows

    def smallest_chunk(k: int) -> float:  # one sample, one tangent column
        return chunk_bytes(1, 1, k)

    def fits_in(k: int) -> bool:
        return fixed(k) + smallest_chunk(k) <= usable

    def fits_fast(k: int) -> bool:  # with the requested chunks and QR folds of 2r rows
        return fixed(k) + chunk_bytes(row_chunk, tangent_chunk, k) + fold_bytes(rank_at(k), 2 * rank_at(k)) <= usable

    k = max_columns
    adapted: list[str] = []
    if adaptable and k > min_columns and not fits_fast(k):
        # the widest sketch that still leaves room for efficient products and folds (bisection:
        # the need grows with k). Measured on the paper DeepONet with 14 GB: halving the width
        # stopped at 2 252 of 9 010 columns; the widest that merely fits (4 280) left folds of 64
        # rows at rank 4 270, a QR estimated at 117 000 s (a fold costs ~2 (r + rows) r² flop);
        # with max_rank 4 000 the full 4 010 columns merely fitted and the run overran its
        # 20-minute limit in the QR
        ok = fits_fast if fits_fast(min_columns) else fits_in
        lo, hi = min_columns, k
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if ok(mid) else (lo, mid)
        k = lo
    k = min(comm.allgather_object(k))  # the same sketch width on every rank
    minimum = math.ceil((fixed(max_columns if not adaptable else min_columns) + smallest_chunk(min_columns)) / SAFETY)
    if not comm.all_ok(fits_in(k)):
        where = "" if comm.world == 1 else " (on the most loaded rank)"
        needed = max(comm.allgather_object(minimum))
        raise ConfigError(
            f"lsr.max_memory: {_mb(budget)} is below the {_mb(needed)} this run needs{where} "
            f"(held {_mb(held)}, sketch {_mb(sketch_at(k))} at {k} columns, "
            f"autodiff {per_unit / 1e3:.1f} kB per sample and tangent); raise --max-memory or lower lsr.max_rank, "
            "lsr.sketch_rows or lsr.parameters.fraction"
        )
    if k < max_columns:
        adapted.append(f"sketch width capped at {k} columns (from {max_columns}) to fit the memory budget")
    room = usable - fixed(k)
    r = rank_at(k)
    tangents = max(1, min(tangent_chunk, int(room // max(smallest_chunk(k), 1.0))))
    rows = max(1, min(row_chunk, int(room // max(chunk_bytes(1, tangents, k), 1.0))))
    rows, tangents = min(comm.allgather_object(rows)), min(comm.allgather_object(tangents))
    chunk = chunk_bytes(rows, tangents, k)
    # the folds take what the chunks leave (fold_rows sizes a batch to a quarter of this per copy)
    fold_budget = int(max(room - chunk, 0) + fold_bytes(r, MIN_FOLD_ROWS))
    if rows < row_chunk:
        adapted.append(f"{rows} samples per Jacobian-product chunk (from {row_chunk}) to fit the memory budget")
    if tangents < tangent_chunk:
        adapted.append(f"{tangents} tangent columns per chunk (from {tangent_chunk}) to fit the memory budget")
    return MemoryPlan(
        budget=budget,
        held=held,
        sketch=sketch_at(k),
        projection=triangle_bytes(r) + fold_bytes(r, MIN_FOLD_ROWS) + int(itemsize * out_numel * r * rows),
        workspace_per_unit=per_unit,
        workspace_measured=measured,
        fold_budget=fold_budget,
        row_chunk=rows,
        tangent_chunk=tangents,
        max_columns=k,
        minimum=minimum,
        adapted=adapted,
    )


__all__ = [
    "MemoryPlan",
    "fold_bytes",
    "limit_allocator_slack",
    "measure_workspace",
    "plan_memory",
    "released_sketch_bytes",
    "sketch_bytes",
    "triangle_bytes",
]
