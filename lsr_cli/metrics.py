"""Error measures of predictions against targets (the report's ``rel_l2``, ``rmse``, ``max_abs``)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .distributed import SINGLE, Comm


def error_metrics(pred: Tensor, target: Tensor) -> dict[str, float | None]:
    """Errors of ``pred`` vs ``target`` (same shape ``[N, ...]``), computed in float64.

    ``rel_l2`` = ‖pred − target‖₂ / ‖target‖₂ over the whole split; ``rel_l2_mean`` = mean over
    samples of the per-sample relative L2 error (the operator-learning convention; ``None`` for
    scalar outputs, where it would divide by point values); ``rmse``; ``max_abs``; ``mse``.
    """
    p = pred.detach().to(torch.float64).reshape(pred.shape[0], -1)
    y = target.detach().to(torch.float64).reshape(target.shape[0], -1)
    e = p - y
    norm_y = torch.linalg.norm(y)
    per_norm = torch.linalg.norm(y, dim=1)
    per = torch.linalg.norm(e, dim=1) / per_norm.clamp_min(torch.finfo(torch.float64).tiny)
    valid = per_norm > 0
    return {
        "rel_l2": float(torch.linalg.norm(e) / norm_y) if norm_y > 0 else float("nan"),
        "rel_l2_mean": float(per[valid].mean()) if y.shape[1] > 1 and bool(valid.any()) else None,
        "rmse": float(torch.sqrt(torch.mean(e * e))),
        "max_abs": float(e.abs().max()),
        "mse": float(torch.mean(e * e)),
    }


def global_error_metrics(pred: Tensor, target: Tensor, comm: Comm = SINGLE) -> dict[str, float | None]:
    """:func:`error_metrics` over the samples of every rank (``pred``/``target``: this rank's
    rows), from all-reduced sums and maxima; on one process it is :func:`error_metrics` itself."""
    if comm.world == 1:
        return error_metrics(pred, target)
    p = pred.detach().to(torch.float64).reshape(pred.shape[0], -1)
    y = target.detach().to(torch.float64).reshape(target.shape[0], -1)
    e = p - y
    per_norm = torch.linalg.norm(y, dim=1)
    per = torch.linalg.norm(e, dim=1) / per_norm.clamp_min(torch.finfo(torch.float64).tiny)
    valid = per_norm > 0
    sums = comm.allreduce_sum(
        torch.stack(
            [
                torch.sum(e * e),
                torch.sum(y * y),
                torch.sum(per[valid]),
                valid.sum().to(torch.float64),
                torch.tensor(float(e.numel()), dtype=torch.float64),
            ]
        )
    )
    max_abs = float(comm.allreduce_max(e.abs().max().reshape(1) if e.numel() else e.new_zeros(1))[0])
    sq_e, sq_y, per_sum, num_valid, count = (float(v) for v in sums)
    mse = sq_e / count
    return {
        "rel_l2": math.sqrt(sq_e) / math.sqrt(sq_y) if sq_y > 0 else float("nan"),
        "rel_l2_mean": per_sum / num_valid if y.shape[1] > 1 and num_valid > 0 else None,
        "rmse": math.sqrt(mse),
        "max_abs": max_abs,
        "mse": mse,
    }


def format_error(value: float | None) -> str:
    """An error or loss as the tables show it (``1.62e-01``); ``n/a`` when missing."""
    return "n/a" if value is None else f"{value:.2e}"


def describe_change(before: float | None, after: float | None) -> str:
    """``before → after`` of an error or loss in words: a factor from 1.1 on (``"332x lower"``,
    ``"67,600x lower"``, ``"1.5x higher"``), a percentage below it (``"0.41% lower"``),
    ``"unchanged"`` when equal, ``"n/a"`` when either is missing or not positive and finite."""
    if before is None or after is None or not (0 < before < math.inf and 0 < after < math.inf):
        return "n/a"
    if after == before:
        return "unchanged"
    direction = "lower" if after < before else "higher"
    ratio = max(before, after) / min(before, after)
    if ratio >= 1000:
        digits = math.floor(math.log10(ratio)) - 2  # three significant digits, written out
        return f"{round(ratio, -digits):,.0f}x {direction}"
    if ratio >= 1.1:
        return f"{ratio:.3g}x {direction}"
    percent = abs(after - before) / before * 100
    return f"{percent:.2g}% {direction}" if percent >= 0.01 else f"less than 0.01% {direction}"
