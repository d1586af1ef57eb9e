"""The small dense least-squares problem ``min_z ‖A z + f0‖² + λ²‖z‖²`` and its rank sweep.

``A = G P`` is ``n × r`` (residual Jacobian times basis), always solved in float64 by a
direct method: a QR of the augmented matrix ``[A | f0] = Q [[R, c], [0, ρ]]``, then for a
leading-column rank ``r'`` the SVD of ``R[:r', :r']`` (``A[:, :r']`` = ``Q[:, :r'] R[:r', :r']``,
so every rank of the sweep reuses the one QR). The QR is accumulated over row blocks
(:class:`QRAccumulator`: for each block ``qr([R_aug; [A_b | f_b]])``), so ``A`` is never held
whole: this is the streaming QR of METHOD.md §2, and the in-memory case is the same code
with fewer blocks. Losses at any ``z`` follow from ``R_aug`` alone:
``‖A[:, :r'] z + f0‖² = ‖R[:r', :r'] z + c[:r']‖² + ‖c[r':]‖² + ρ²`` (no cancellation).

Regularization is explicit: singular values below ``rcond · s_max`` are truncated (default
``rcond = eps · max(n, r')``, scipy's rule) and an optional Tikhonov ``λ`` damps the rest.
Nothing here prints.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

DEFAULT_TIKHONOV_GRID = (0.0, 1e-12, 1e-10, 1e-8, 1e-6, 1e-4, 1e-2)
"""Relative λ candidates (times the largest singular value of ``A``) tried on validation data."""


@dataclass
class ReducedSolution:
    """Solution at one (rank, λ): ``z`` ``[rank]`` and its bookkeeping."""

    rank: int
    z: Tensor
    tikhonov: float  # absolute λ
    tikhonov_rel: float  # λ / s_max
    rcond: float
    num_truncated: int
    cond: float  # s_max / s_min of the kept singular values


class QRAccumulator:
    """Streaming QR of ``[A | f0]`` (``n × (r + 1)``) over row blocks, in float64.

    Holds only the ``(r + 1) × (r + 1)`` triangle ``R_aug`` and the row count. Blocks may
    arrive in any order and accumulators of disjoint rows merge (:meth:`merge`); the result
    equals the QR of all rows up to the signs of ``R_aug``'s rows.
    """

    def __init__(self, r: int, device: torch.device | str = "cpu") -> None:
        self.r = int(r)
        self.n = 0
        self.R_aug = torch.zeros(0, self.r + 1, dtype=torch.float64, device=device)

    def add(self, A_block: Tensor, f_block: Tensor) -> None:
        """Append rows: ``A_block`` ``[b, r]`` and ``f_block`` ``[b]``."""
        if A_block.shape[0] == 0:
            return
        block = torch.cat([A_block.to(torch.float64), f_block.to(torch.float64).reshape(-1, 1)], dim=1)
        self._fold(block)
        self.n += int(A_block.shape[0])

    def merge(self, other: QRAccumulator) -> QRAccumulator:
        """A new accumulator of the union of both row sets."""
        out = QRAccumulator(self.r, self.R_aug.device)
        out.R_aug = self.R_aug
        out._fold(other.R_aug)
        out.n = self.n + other.n
        return out

    def _fold(self, rows: Tensor) -> None:
        stacked = torch.cat([self.R_aug, rows], dim=0)
        R = torch.linalg.qr(stacked, mode="r").R
        self.R_aug = R[: self.r + 1]

    def parts(self) -> tuple[Tensor, Tensor, float]:
        """``(R [r, r], c [r], ρ)`` with zero padding when fewer than ``r + 1`` rows arrived."""
        R_aug = self.R_aug
        if R_aug.shape[0] < self.r + 1:
            pad = R_aug.new_zeros(self.r + 1 - R_aug.shape[0], self.r + 1)
            R_aug = torch.cat([R_aug, pad], dim=0)
        return R_aug[: self.r, : self.r], R_aug[: self.r, self.r], float(R_aug[self.r, self.r].abs())

    def loss_sum(self, z: Tensor) -> float:
        """``‖A[:, :len(z)] z + f0‖²`` over the accumulated rows (``z`` padded with zeros)."""
        R, c, rho = self.parts()
        k = z.shape[0]
        v = R[:, :k] @ z.to(torch.float64) + c
        return float(v @ v) + rho * rho


class ReducedProblem:
    """Least squares ``min ‖A z + f0‖`` over the leading columns of ``A`` (``[n, r]``).

    Built from ``A`` and ``f0`` directly, or from a :class:`QRAccumulator` (:meth:`from_qr`,
    streaming: :meth:`residual` is then unavailable, :meth:`loss_sum` works).
    """

    def __init__(self, A: Tensor | None, f0: Tensor | None, qr: QRAccumulator | None = None) -> None:
        if qr is None:
            assert A is not None and f0 is not None
            qr = QRAccumulator(A.shape[1], A.device)
            qr.add(A, f0)
        self.A = A.to(torch.float64) if A is not None else None
        self.f0 = f0.to(torch.float64) if f0 is not None else None
        self.qr = qr
        self.n, self.r = qr.n, qr.r
        self.R, self.c, self.rho = qr.parts()
        self._svd: dict[int, tuple[Tensor, Tensor, Tensor]] = {}

    @classmethod
    def from_qr(cls, qr: QRAccumulator) -> ReducedProblem:
        return cls(None, None, qr)

    def loss_sum(self, sol: ReducedSolution) -> float:
        """``‖A[:, :rank] z + f0‖²`` from the triangle (see module doc)."""
        return self.qr.loss_sum(sol.z)

    def _svd_of(self, rank: int) -> tuple[Tensor, Tensor, Tensor]:
        if rank not in self._svd:
            self._svd[rank] = torch.linalg.svd(self.R[:rank, :rank])
        return self._svd[rank]

    def singular_values(self, rank: int) -> Tensor:
        """Singular values of ``A[:, :rank]``, descending."""
        return self._svd_of(rank)[1]

    def solve(self, rank: int, tikhonov_rel: float = 0.0, rcond: float | None = None) -> ReducedSolution:
        """Minimizer of ``‖A[:, :rank] z + f0‖² + λ²‖z‖²`` with ``λ = tikhonov_rel · s_max``."""
        U, s, Vh = self._svd_of(rank)
        if rcond is None:
            rcond = torch.finfo(torch.float64).eps * max(self.n, rank)
        s_max = float(s[0]) if s.numel() else 0.0
        keep = s > rcond * s_max
        lam = tikhonov_rel * s_max
        s_kept = s[keep]
        filt = torch.where(keep, s / (s * s + lam * lam).clamp_min(torch.finfo(s.dtype).tiny), 0.0)
        z = -(Vh.T @ (filt * (U.T @ self.c[:rank])))
        cond = float(s_kept[0] / s_kept[-1]) if s_kept.numel() else float("inf")
        return ReducedSolution(
            rank=rank,
            z=z,
            tikhonov=lam,
            tikhonov_rel=tikhonov_rel,
            rcond=float(rcond),
            num_truncated=int((~keep).sum()),
            cond=cond,
        )

    def residual(self, sol: ReducedSolution) -> Tensor:
        """``A[:, :rank] z + f0`` ``[n]`` (computed directly; only when built from ``A``)."""
        if self.A is None or self.f0 is None:
            raise ValueError("residual() needs A and f0; a streamed problem has only loss_sum()")
        return self.A[:, : sol.rank] @ sol.z + self.f0


def leading_column_losses(fit: QRAccumulator, sel: QRAccumulator | None) -> tuple[Tensor, Tensor | None, int]:
    """Loss sums of the leading-column solutions at every rank, from the QR triangles alone.

    With ``A = Q [R, c; 0, ρ]`` and ``z_r = −R[:r, :r]⁻¹ c[:r]`` (no truncation, no λ: the rank
    is the regularizer, as the method's authors use it at ranks in the thousands), the fitted
    rows' loss is ``‖c[r:]‖² + ρ²``. Rows with the triangle ``[R_s, c_s; 0, ρ_s]`` (a validation
    split or held-out rows) give ``R_s[:, :r] z_r = −T[:, :r] c[:r]`` with ``T = R_s R⁻¹``
    (``R⁻¹`` is upper triangular, so its leading block inverts ``R[:r, :r]``), and every rank's
    loss ``‖c_s − cumsum(T · c)[:, r]‖² + ρ_s²`` follows from one triangular solve and one
    cumulative sum: ``O(r³/3 + r²)`` for the whole sweep instead of an SVD per rank.

    Returns ``(fit [r + 1], sel [r + 1] or None, usable)``: index ``i`` is rank ``i`` (0 = no
    step); ``usable`` is the largest rank whose leading block is not numerically singular
    (``|R_ii| > eps · r · max |R_jj|``); losses above it are ``inf``.
    """
    R, c, rho = fit.parts()
    r = R.shape[0]
    d = R.diagonal().abs()
    tiny = torch.finfo(torch.float64).eps * max(r, 1) * (float(d.max()) if r else 0.0)
    bad = torch.nonzero(d <= tiny)
    usable = int(bad[0]) if bad.numel() else r
    tail = torch.flip(torch.cumsum(torch.flip(c * c, [0]), 0), [0])  # tail[i] = Σ_{j ≥ i} c_j²
    fit_loss = torch.full((r + 1,), float("inf"), dtype=torch.float64, device=R.device)
    fit_loss[: usable + 1] = torch.cat([tail[:usable], tail.new_zeros(1)]) + rho * rho
    if sel is None:
        return fit_loss, None, usable
    Rs, cs, rho_s = sel.parts()
    sel_loss = torch.full((r + 1,), float("inf"), dtype=torch.float64, device=R.device)
    sel_loss[0] = float(cs @ cs) + rho_s * rho_s
    if usable:
        u = usable
        T = torch.linalg.solve_triangular(R[:u, :u], Rs[:, :u], upper=True, left=False)
        T.mul_(c[:u])
        T.cumsum_(dim=1)
        T.sub_(cs[:, None])  # −(c_s − cumsum): the sign does not change the squared norm
        sel_loss[1 : u + 1] = T.square_().sum(0) + rho_s * rho_s
        del T
    return fit_loss, sel_loss, usable


def leading_column_solution(fit: QRAccumulator, rank: int) -> Tensor:
    """``z = −R[:r, :r]⁻¹ c[:r]``: the least-squares solution on the leading ``rank`` columns."""
    R, c, _ = fit.parts()
    if rank == 0:
        return c.new_zeros(0)
    return -torch.linalg.solve_triangular(R[:rank, :rank], c[:rank, None], upper=True).reshape(-1)
