"""Sizes every run plans with: the default row chunk, the sketch's rows and columns, the largest
rank (the rules :mod:`.plan` and :mod:`.refine` share)."""

from __future__ import annotations

from .config import LsrConfig

ROW_BUDGET = 16384
"""Default row chunk: samples × outputs per chunk (512 scalar rows × 32 tangents measured fastest here)."""

SKETCH_ROWS_MIN = 8192
"""``lsr.sketch_rows: auto`` sketches every residual row up to ``max(SKETCH_ROWS_MIN, 16 k)``."""

DENSE_MIN_COLUMNS = 128
"""Below this many sketch columns, ``lsr.jacobian: auto`` stays matrix-free (materializing J costs
about as much as 100 JVP columns; measured in benchmarks/throughput.py)."""

PDE_ROW_CHUNK = 256
"""Collocation points per Jacobian-product chunk (second derivatives make each row costlier)."""


def largest_rank(lsr: LsrConfig) -> int:
    """The largest rank a run may reach: the largest fixed rank, or ``max_rank`` for ``auto``."""
    if lsr.rank == "auto":
        return int(lsr.max_rank)
    return max(int(r) for r in lsr.rank) if isinstance(lsr.rank, list) else int(lsr.rank)


def planned_columns(lsr: LsrConfig) -> int:
    """Sketch columns the first round will use: the (largest) fixed rank, or ``start_rank``, plus oversampling."""
    if lsr.rank == "auto":
        return min(lsr.start_rank, lsr.max_rank) + lsr.oversampling
    top = max(lsr.rank) if isinstance(lsr.rank, list) else int(lsr.rank)
    return top + lsr.oversampling


def sketch_samples(lsr: LsrConfig, num_samples: int, out_numel: int) -> int:
    """How many samples the basis sketch uses (all, or a random subset for very large data).

    ``auto``: every sample while the residual rows are at most ``max(8192, 16 k)`` with ``k``
    the largest sketch size (largest rank + oversampling); beyond that a seeded random subset
    of that many rows (whole samples). The rule does not depend on the memory budget, so a
    streamed run gives the in-memory run's result.
    """
    if lsr.sketch_rows == "auto":
        rows = max(SKETCH_ROWS_MIN, 16 * (largest_rank(lsr) + lsr.oversampling))
    else:
        rows = int(lsr.sketch_rows)
    return min(num_samples, max(1, rows // max(1, out_numel)))


def chunk_rows(out_numel: int, cfg_row_chunk: int | str) -> int:
    """Samples per Jacobian-product chunk: ``lsr.row_chunk``, or for ``auto`` :data:`ROW_BUDGET`
    scalar rows over 32 tangents."""
    if cfg_row_chunk == "auto":
        return max(1, ROW_BUDGET // max(1, out_numel) // 32)
    return int(cfg_row_chunk)


def budget_source(lsr: LsrConfig) -> str:
    """Where the memory budget came from, for the report."""
    return "lsr.max_memory" if lsr.max_memory != "auto" else "auto: half of the free memory"
