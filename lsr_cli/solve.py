"""The small dense least-squares problem ``min_z ‖A z + f0‖² + λ²‖z‖²`` and its rank sweep.

``A = G P`` is ``n × r`` (residual Jacobian times basis), always solved in float64 by a
direct method: one thin QR ``A = Q_A R``, then for a leading-column rank ``r'`` the SVD of
``R[:r', :r']`` (``A[:, :r']`` = ``Q_A[:, :r'] R[:r', :r']``, so every rank of the sweep
reuses the one QR). Regularization is explicit: singular values below
``rcond · s_max`` are truncated (default ``rcond = eps · max(n, r')``, scipy's rule) and an
optional Tikhonov ``λ`` damps the rest. Nothing here prints.
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


class ReducedProblem:
    """Least squares ``min ‖A z + f0‖`` over the leading columns of ``A`` (``[n, r]``)."""

    def __init__(self, A: Tensor, f0: Tensor) -> None:
        self.A = A.to(torch.float64)
        self.f0 = f0.to(torch.float64)
        self.n, self.r = self.A.shape
        Q, R = torch.linalg.qr(self.A, mode="reduced")
        self.R = R
        self.c = Q.T @ self.f0
        self._svd: dict[int, tuple[Tensor, Tensor, Tensor]] = {}

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
        """``A[:, :rank] z + f0`` ``[n]`` (computed directly, no cancellation)."""
        return self.A[:, : sol.rank] @ sol.z + self.f0
