"""Operators built from :class:`~.linearization.JacobianOperator`: held in memory or stacked.

:func:`materialize` forms ``J`` (``n × m``) block by block when it fits a memory share and the
model is pointwise, as a :class:`DenseOperator` (BLAS-3 products); :class:`StackedOperator`
stacks the rows of several operators with the same columns (``[G_1; G_2; …]``). Both have the
operator interface of :class:`~.linearization.JacobianOperator` (``shape``, ``matmat``,
``rmatmat``, ``iter_matmat``, ``forward``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .blas import mm

if TYPE_CHECKING:
    from .linearization import JacobianOperator

__all__ = ["PATH_CHECK_RTOL", "DenseOperator", "StackedOperator", "materialize"]

ProgressFn = Callable[[int], None]


class DenseOperator:
    """``J`` (``n × m``) held in memory, built from a :class:`JacobianOperator` block by block;
    the same interface (``matmat``, ``rmatmat``, ``iter_matmat``, ``forward``) as BLAS-3 products."""

    def __init__(self, op: JacobianOperator, J: Tensor) -> None:
        self.op = op
        self.J = J

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.J.shape[0]), int(self.J.shape[1]))

    def forward(self, params: dict[str, Tensor] | None = None) -> Tensor:
        return self.op.forward(params)

    def matmat(self, V: Tensor, progress: ProgressFn | None = None) -> Tensor:
        out = mm(self.J, V)
        if progress is not None:
            progress(V.shape[1])
        return out

    def iter_matmat(self, V: Tensor, progress: ProgressFn | None = None) -> Iterator[tuple[int, Tensor]]:
        n = self.J.shape[0]
        step = max(1, 8192)
        for s in range(0, n, step):
            yield s, mm(self.J[s : s + step], V)
        if progress is not None:
            progress(V.shape[1])

    def matvec(self, v: Tensor, precise: bool = False) -> Tensor:
        """``J v`` (``precise``: accepted for the interface of :class:`JacobianOperator`; the held
        ``J`` is in the operator's dtype)."""
        return self.J @ v

    def rmatmat(self, U: Tensor, progress: ProgressFn | None = None) -> Tensor:
        out = mm(self.J.T, U)
        if progress is not None:
            progress(U.shape[1])
        return out


PATH_CHECK_RTOL = 1e-8
"""Relative mismatch between the materialized rows and JVPs above which a residual is not pointwise."""


def materialize(
    op: JacobianOperator, max_bytes: int, gen: torch.Generator, progress: ProgressFn | None = None
) -> tuple[DenseOperator | None, str]:
    """``J`` of ``op`` in memory when it fits ``max_bytes`` and is pointwise; else ``(None, why)``.

    The first block is checked against JVPs with a random vector: a model that mixes samples
    (batch statistics, attention over the batch) fails the check and stays matrix-free."""
    n, m = op.shape
    need = n * m * torch.empty(0, dtype=op.dtype).element_size()
    if need > max_bytes:
        return (
            None,
            f"the dense Jacobian ({n} x {m}, {need / 1e6:.0f} MB) exceeds its memory share ({max_bytes / 1e6:.0f} MB)",
        )
    J = torch.empty(n, m, dtype=op.dtype, device=op.device)
    per_sample = op.out_numel * m * 8
    step = max(1, min(op.num_samples, (64 * 2**20) // max(1, per_sample)))
    try:
        for s in range(0, op.num_samples, step):
            e = min(op.num_samples, s + step)
            J[s * op.out_numel : e * op.out_numel] = op.jacobian_rows(s, e)
            if s == 0:
                v = torch.randn(m, 1, generator=gen, dtype=op.dtype).to(op.device)
                e0 = min(e, max(1, min(op.num_samples, 64)))
                ref = op.matmat(v, precise=True)[: e0 * op.out_numel]  # JVPs over all rows; cheap (one column)
                got = J[: e0 * op.out_numel] @ v
                scale = float(ref.abs().max()) or 1.0
                if float((got - ref).abs().max()) > PATH_CHECK_RTOL * scale:
                    return None, "the rows of one sample depend on other samples (not pointwise)"
            if progress is not None:
                progress(e - s)
    except Exception as exc:  # a model that vmap over samples cannot handle
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, f"materializing per-sample Jacobians failed ({type(exc).__name__}: {first[:120]})"
    return DenseOperator(op, J), f"the dense Jacobian ({n} x {m}, {need / 1e6:.0f} MB) fits the memory budget"


class StackedOperator:
    """Rows of several operators with the same columns, stacked: ``[G_1; G_2; …]``."""

    def __init__(self, ops: Sequence[JacobianOperator]) -> None:
        self.ops = list(ops)
        self.row_counts = [op.shape[0] for op in self.ops]

    @property
    def shape(self) -> tuple[int, int]:
        return (sum(self.row_counts), self.ops[0].shape[1])

    def forward(self, params: dict[str, Tensor] | None = None) -> Tensor:
        return torch.cat([op.forward(params).reshape(-1) for op in self.ops])

    def iter_matmat(self, V: Tensor, progress: ProgressFn | None = None) -> Iterator[tuple[int, Tensor]]:
        """Row blocks of ``[G_1; G_2; …] V`` as ``(first_row, block)``, operator after operator."""
        offset = 0
        for i, (op, count) in enumerate(zip(self.ops, self.row_counts, strict=True)):
            for start, block in op.iter_matmat(V, _share(progress, len(self.ops), i)):
                yield offset + start, block
            offset += count

    def matmat(self, V: Tensor, progress: ProgressFn | None = None) -> Tensor:
        return torch.cat([op.matmat(V, _share(progress, len(self.ops), i)) for i, op in enumerate(self.ops)])

    def matvec(self, v: Tensor) -> Tensor:
        return self.matmat(v[:, None])[:, 0]

    def rmatmat(self, U: Tensor, progress: ProgressFn | None = None) -> Tensor:
        out = None
        start = 0
        for i, (op, count) in enumerate(zip(self.ops, self.row_counts, strict=True)):
            part = op.rmatmat(U[start : start + count], _share(progress, len(self.ops), i))
            out = part if out is None else out + part
            start += count
        assert out is not None
        return out


def _share(progress: ProgressFn | None, parts: int, index: int) -> ProgressFn | None:
    """Report only the last part's progress, so totals stay those of one operator."""
    return progress if index == parts - 1 else None
