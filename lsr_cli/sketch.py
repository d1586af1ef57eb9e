"""Matrix-free randomized range finder and SVD of a Jacobian operator.

Halko–Martinsson–Tropp with block growth: ``Y = J Ω`` (JVPs), ``Q = orth(Y)``,
``B = Jᵀ Q`` (VJPs), ``B = W S Uᵀ`` (so ``Qᵀ J ≈ U S Wᵀ``). Columns can be added later
(:meth:`RangeSketch.extend`): the new block is orthogonalized against the current ``Q``, so
``Q`` and ``B`` only grow and earlier products are reused. One sketch at the largest rank
serves every smaller rank (:meth:`RangeSketch.basis`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from .blas import mm
from .distributed import SINGLE, Comm, global_norm, orthonormalize


class LinearOperator(Protocol):
    """What the sketch needs: ``shape = (n, m)``, ``matmat`` and ``rmatmat``."""

    @property
    def shape(self) -> tuple[int, int]: ...

    def matmat(self, V: Tensor, progress: Callable[[int], None] | None = None) -> Tensor: ...

    def rmatmat(self, U: Tensor, progress: Callable[[int], None] | None = None) -> Tensor: ...


def _orthonormalize_against(Y: Tensor, Q: Tensor | None, comm: Comm = SINGLE, passes: int = 2) -> Tensor:
    """Orthonormal basis of ``(I - Q Qᵀ) Y``.

    Two passes of (project out ``Q``, Householder QR): the QR after each projection
    renormalizes, so columns of ``Y`` that lie (numerically) inside ``range(Q)`` become
    round-off directions that the second pass makes orthogonal to ``Q`` as well. With rows
    spread over ranks, ``Qᵀ Y`` is all-reduced and the QR is a TSQR
    (:func:`~.distributed.orthonormalize`).
    """
    if Q is None or Q.shape[1] == 0:
        return orthonormalize(Y, comm)
    for _ in range(passes):
        Y = Y - mm(Q, comm.allreduce_sum(mm(Q.T, Y)))
        Y = orthonormalize(Y, comm)
    return Y


class RangeSketch:
    """Growing randomized sketch of ``J`` (``n × m``).

    Attributes after :meth:`extend`: ``Q`` ``[n, k]`` orthonormal, ``B = Jᵀ Q`` ``[m, k]``.
    ``Ω`` has i.i.d. standard normal entries drawn on the CPU from ``generator`` (so results
    do not depend on the device) in ``dtype``.

    Distributed (``comm`` with several ranks): ``op`` holds this rank's rows, ``Q`` is its
    rows of the global orthonormal basis, ``Ω`` is drawn identically on every rank (same
    generator state), ``B = Σ_ranks J_iᵀ Q_i`` is all-reduced, and every norm that decides
    something is global; ``B``, the SVD and the basis are then the same on every rank.
    """

    def __init__(
        self,
        op: LinearOperator,
        generator: torch.Generator,
        dtype: torch.dtype,
        device: torch.device,
        power_iterations: int = 0,
        block_size: int = 128,
        comm: Comm = SINGLE,
    ) -> None:
        self.op = op
        self.comm = comm
        self.generator = generator
        self.dtype = dtype
        self.device = device
        self.power_iterations = int(power_iterations)
        n_local, m = op.shape
        self.num_rows = comm.sum_int(n_local)  # global row count
        self.Q = torch.zeros(n_local, 0, dtype=dtype, device=device)
        self.B = torch.zeros(m, 0, dtype=dtype, device=device)
        self.block_size = max(1, int(block_size))
        self.exhausted = False
        self._top = 0.0  # largest singular value of the first block's Qᵀ J (≈ that of J)
        self._svd: tuple[Tensor, Tensor, Tensor] | None = None
        # measured cost of the products (seconds and columns), for the time plan (timeplan.py)
        self.seconds = {"jvp": 0.0, "vjp": 0.0, "orth": 0.0}
        self.columns = {"jvp": 0, "vjp": 0}
        self.released = False
        self._consumed = False

    @property
    def num_columns(self) -> int:
        if self.released and self._svd is not None:
            return int(self._svd[1].shape[0])
        return int(self.Q.shape[1])

    def extend(self, num_new: int, progress: Callable[[int], None] | None = None) -> None:
        """Add up to ``num_new`` sketch columns (JVPs + VJPs: ``(2 + 2q)·num_new`` products).

        Columns are added in blocks of ``block_size``; once a block adds nothing above
        round-off (``‖(I − QQᵀ) J Ω_b‖ ≤ rtol · ‖J Ω_b‖`` with the :meth:`usable_rank` rtol)
        the range of ``J`` is exhausted and the remaining blocks are skipped
        (:attr:`exhausted` becomes true).
        """
        _, m = self.op.shape
        n = self.num_rows
        comm = self.comm
        num_new = min(int(num_new), min(n, m) - self.num_columns)
        rtol = torch.finfo(self.dtype).eps * max(n, m)
        if self.released:
            raise RuntimeError("RangeSketch.extend after release()")
        self._reserve(num_new)
        while num_new > 0 and not self.exhausted:
            size = min(self.block_size, num_new)
            num_new -= size
            omega = torch.randn(m, size, generator=self.generator, dtype=self.dtype)
            t0 = time.perf_counter()
            Y = self.op.matmat(omega.to(self.device), progress)
            t1 = time.perf_counter()
            self.seconds["jvp"] += t1 - t0
            self.columns["jvp"] += size
            if self.Q.shape[1] > 0:
                left = Y - mm(self.Q, comm.allreduce_sum(mm(self.Q.T, Y)))
                if global_norm(left, comm) <= rtol * global_norm(Y, comm):
                    self.exhausted = True
                    if progress is not None:
                        progress(size + 2 * num_new)  # the skipped VJPs and blocks
                    break
                # the test's projection is the first Gram–Schmidt pass; one more keeps Q orthonormal
                Qn = _orthonormalize_against(orthonormalize(left, comm), self.Q, comm, passes=1)
            else:
                Qn = _orthonormalize_against(Y, self.Q, comm)
            for _ in range(self.power_iterations):
                Z = comm.allreduce_sum(self.op.rmatmat(Qn))
                Z = torch.linalg.qr(Z, mode="reduced").Q
                Qn = _orthonormalize_against(self.op.matmat(Z), self.Q, comm)
            t2 = time.perf_counter()
            self.seconds["orth"] += t2 - t1
            Bn = comm.allreduce_sum(self.op.rmatmat(Qn, progress))
            self.seconds["vjp"] += time.perf_counter() - t2
            self.columns["vjp"] += int(Qn.shape[1])
            top = float(torch.linalg.matrix_norm(Bn, 2))  # largest singular value of Qnᵀ J
            if self.Q.shape[1] == 0:
                self._top = top
            elif top <= rtol * self._top:  # nothing in this block above round-off: not kept
                self.exhausted = True
                if progress is not None:
                    progress(2 * num_new)
                break
            k0, k1 = self.num_columns, self.num_columns + int(Qn.shape[1])
            self._Q_buf[:, k0:k1] = Qn
            self._B_buf[:, k0:k1] = Bn
            self.Q, self.B = self._Q_buf[:, :k1], self._B_buf[:, :k1]
            self._svd = None

    def _reserve(self, num_new: int) -> None:
        """Room for ``num_new`` more columns of ``Q`` and ``B``: one copy per :meth:`extend`
        instead of one per block (at k = 9 000 the per-block copies moved ~200 GB)."""
        k = self.num_columns
        cap = getattr(self, "_Q_buf", self.Q).shape[1]
        if k + num_new <= cap:
            return
        n_local, m = self.Q.shape[0], self.B.shape[0]
        Q_buf = self.Q.new_empty(n_local, k + num_new)
        B_buf = self.B.new_empty(m, k + num_new)
        Q_buf[:, :k] = self.Q
        B_buf[:, :k] = self.B
        self._Q_buf, self._B_buf = Q_buf, B_buf
        self.Q, self.B = Q_buf[:, :k], B_buf[:, :k]

    def release(self) -> None:
        """Drop ``Q`` and ``B`` once the sketch will not grow again, keeping their SVD: at large
        ranks they are the largest arrays of the run (``(rows + m) · k`` entries). ``Q`` goes
        first; the SVD of ``B`` is then taken as ``B = Q_B R_B`` (Householder), ``R_B = U S Vh``,
        ``W = Q_B U`` formed in place block by block, so the peak is ``2 m k`` entries instead
        of LAPACK's ``gesdd`` copies (same factors to round-off)."""
        self.Q = self.Q.new_zeros(self.Q.shape[0], 0)
        self._Q_buf = self.Q
        if self._svd is None and self.B.shape[1] > 0:
            B = self.B
            self.B = self._B_buf = B.new_zeros(B.shape[0], 0)
            Qb, Rb = torch.linalg.qr(B, mode="reduced")
            del B
            U, S, Vh = torch.linalg.svd(Rb)
            del Rb
            step = max(1, (1 << 24) // max(Qb.shape[1], 1))
            for start in range(0, Qb.shape[0], step):
                Qb[start : start + step] = Qb[start : start + step] @ U
            self._svd = (Qb, S, Vh)
        self.B = self._B_buf = self.B.new_zeros(self.B.shape[0], 0)
        self.released = True

    def rates(self) -> dict[str, float]:
        """Measured seconds per (row · column) of the JVPs and VJPs over the sketched rows."""
        rows = max(self.num_rows, 1)
        return {
            "jvp_row_column_s": self.seconds["jvp"] / max(self.columns["jvp"] * rows, 1),
            "vjp_row_column_s": self.seconds["vjp"] / max(self.columns["vjp"] * rows, 1),
            "orth_s": self.seconds["orth"],
        }

    def singular_values(self) -> Tensor:
        """Singular values ``S`` ``[k]`` of ``Qᵀ J`` (estimates of those of ``J``), descending."""
        return self.svd()[1]

    def svd(self) -> tuple[Tensor, Tensor, Tensor]:
        """``B = W diag(S) Vh`` (so ``J ≈ Q Vhᵀ diag(S) Wᵀ``), computed once per size of the sketch."""
        if self._svd is None:
            self._svd = torch.linalg.svd(self.B, full_matrices=False)
        return self._svd

    def basis(self, rank: int, consume: bool = False) -> tuple[Tensor, Tensor]:
        """``P = W[:, :r] · diag(1/S[:r])`` ``[m, r]`` and ``S[:r]``.

        The scaling makes ``J P`` nearly orthonormal, so the reduced matrix is well
        conditioned. ``rank`` must not exceed :meth:`usable_rank`. ``consume``: scale ``W`` in
        place (no copy of ``m × r``; for the last round of a large rank, after :meth:`release`);
        no basis can be taken afterwards.
        """
        if self._consumed:
            raise RuntimeError("RangeSketch.basis after basis(consume=True)")
        W, S, _ = self.svd()
        if consume:
            self._consumed = True
            return W[:, :rank].div_(S[:rank]), S[:rank]
        return W[:, :rank] / S[:rank], S[:rank]

    def usable_rank(self, rtol: float | None = None) -> int:
        """Number of sketch singular values above ``rtol · S[0]``.

        Default ``rtol = eps(dtype) · max(n, m)`` (directions below it are round-off).
        """
        S = self.singular_values()
        if S.numel() == 0 or S[0] <= 0:
            return 0
        if rtol is None:
            rtol = torch.finfo(self.dtype).eps * max(self.num_rows, self.op.shape[1])
        return int((S > rtol * S[0]).sum())
