"""Error measures of predictions against targets (the report's ``rel_l2``, ``rmse``, ``max_abs``)."""

from __future__ import annotations

import torch
from torch import Tensor


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
