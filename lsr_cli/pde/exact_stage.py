"""The exact-residual stage of a nonlinear equation: LSR's step moved to minimize the refined
predictor's *exact* residual inside LSR's subspace (:mod:`.subspace_newton`), within a time cap."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lsr_cli.config import Config
from lsr_cli.distributed import SINGLE, Comm, global_mean_square, global_norm
from lsr_cli.linearization import ParameterSpace
from lsr_cli.linearized import LinearizedModel
from lsr_cli.runtime import (
    ProgressSink,
    resolve_memory_budget,
)
from lsr_cli.subspace import SubspaceResult

from .problem import PdeProblem
from .residual import ResidualOperators, true_residual
from .subspace_newton import layouts, levenberg_marquardt, table_bytes, tabulate

STAGE_MIN_SECONDS = 120.0


STAGE_TIME_FACTOR = 3.0


def stage_time_limit(sub: SubspaceResult) -> float:
    """Wall-time cap of the exact-residual stage: a few times what LSR's own step took (at
    least two minutes), so that on a large problem it cannot dominate the run."""
    lsr_seconds = sum(sub.timings.get(k, 0.0) for k in ("sketch", "project", "solve"))
    return max(STAGE_MIN_SECONDS, STAGE_TIME_FACTOR * lsr_seconds)


@dataclass
class ExactStep:
    """The step ``dz`` (``None``: the input is kept), the residuals of its predictor — the
    Gauss–Newton model's ``f0 + G dz`` (``f_lin``) and the predictor's own (``f_after``) — and
    what the exact-residual stage did (``info``, for the report)."""

    dz: Tensor | None
    f_lin: Tensor
    f_after: Tensor
    info: dict[str, Any]


def _step_residuals(
    module: nn.Module, problem: PdeProblem, space: ParameterSpace, ops: ResidualOperators, dz: Tensor
) -> tuple[Tensor, Tensor]:
    """``f0 + G dz`` and the residual of the refined predictor ``q0 + J dz`` itself (they differ
    by the equation's nonlinear terms, e.g. ``w·w_x`` for Burgers with ``w = J dz``)."""
    f_lin = ops.f0 + ops.G.matvec(dz)
    return f_lin, true_residual(LinearizedModel(module, space.unflatten_vector(dz)), problem)


def exact_step(
    module: nn.Module,
    problem: PdeProblem,
    space: ParameterSpace,
    ops: ResidualOperators,
    sub: SubspaceResult,
    cfg: Config,
    comm: Comm = SINGLE,
    sink: ProgressSink | None = None,
    validation: PdeProblem | None = None,
    deadline: float = math.inf,
) -> ExactStep:
    """LSR's step ``sub.dz``, moved to minimize the refined predictor's *exact* residual in
    LSR's subspace (see :mod:`.subspace_newton`) when the equation is nonlinear. ``deadline``
    (a ``time.perf_counter()`` value) caps the stage below :func:`stage_time_limit` as well."""
    if sub.dz is None:
        return ExactStep(None, ops.f0, ops.f0, {"ran": False, "reason": "LSR kept the input (rank 0)"})
    f_lin, f_after = _step_residuals(module, problem, space, ops, sub.dz)
    z, info = _exact_stage(module, problem, space, ops, sub, f_lin, f_after, cfg, comm, sink, validation, deadline)
    if z is None:
        return ExactStep(sub.dz, f_lin, f_after, info)
    assert sub.basis is not None
    dz = sub.basis @ z
    return ExactStep(dz, *_step_residuals(module, problem, space, ops, dz), info)


def _exact_stage(
    module: nn.Module,
    problem: PdeProblem,
    space: ParameterSpace,
    ops: ResidualOperators,
    sub: SubspaceResult,
    f_lin: Tensor,
    f_after: Tensor,
    cfg: Config,
    comm: Comm,
    sink: ProgressSink | None,
    validation: PdeProblem | None = None,
    deadline: float = math.inf,
) -> tuple[Tensor | None, dict[str, Any]]:
    """The new reduced step ``z`` (``None``: keep LSR's) and what was done."""
    info: dict[str, Any] = {"ran": False}
    limit = problem.nonlinear_iterations
    gap = global_norm(f_after - f_lin, comm)
    info["exact_minus_linearized_norm"] = gap
    info["lsr_step_residual_loss"] = global_mean_square(f_after, comm)
    if limit == 0:
        info["reason"] = "pde.nonlinear_iterations: 0"
        return None, info
    if sub.basis is None or sub.z is None:
        info["reason"] = "LSR kept the input (rank 0)"
        return None, info
    if gap <= 1e-8 * max(global_norm(ops.f0, comm), 1e-300):
        info["reason"] = "the equation is linear here: the predictor's residual equals the linearized one"
        return None, info
    layout = layouts(problem, module)
    need = table_bytes(problem, layout, int(sub.z.shape[0]))
    if validation is not None:
        need += table_bytes(validation, layouts(validation, module), int(sub.z.shape[0]))
    need = comm.sum_int(need)  # all ranks: the same choice for any N
    budget = resolve_memory_budget(cfg.lsr.max_memory, ops.f0.device)
    info["table_bytes"] = need
    if need > budget // 2:
        info["reason"] = f"its tables need {need / 2**20:.0f} MiB, more than half of the memory budget"
        return None, info
    t0 = time.perf_counter()
    time_limit = min(stage_time_limit(sub), max(0.0, deadline - t0))
    try:
        dense = ops.jacobian["path"] == "dense"
        tables = tabulate(module, problem, space, sub.basis, cfg.lsr.tangent_chunk, dense, layout)
        info["tables"] = "per-point Jacobians x P" if dense else "JVPs"
        check = torch.cat([t.at(sub.z) for t in tables])
        mismatch = global_norm(check - f_after, comm) / max(global_norm(f_after, comm), 1e-300)
        if mismatch > 1e-6:
            info["reason"] = f"the tabulated residual differs from the predictor's by {mismatch:.1e} (not pointwise?)"
            return None, info
        sel = sub.selection
        fit_rows = sel.fit_rows if sel is not None else None
        hold_rows = sel.hold_rows if sel is not None else None
        if validation is not None:  # monitored: the predictor's exact residual at the validation points
            n_fit = int(check.shape[0])
            val_tables = tabulate(module, validation, space, sub.basis, cfg.lsr.tangent_chunk, dense)
            n_val = sum(int(t.base.shape[0]) for t in val_tables)
            tables = tables + val_tables
            fit_rows = torch.arange(n_fit, device=check.device)
            hold_rows = torch.arange(n_fit, n_fit + n_val, device=check.device)
        result = levenberg_marquardt(
            tables,
            sub.z,
            sub.lambda_abs,
            fit_rows,
            hold_rows,
            limit,
            time_limit=time_limit,
            progress=sink,
            comm=comm,
        )
    except RuntimeError as exc:  # a user residual asking for something the tables lack, ...
        info["reason"] = f"skipped: {str(exc).splitlines()[0][:200]}"
        return None, info
    h = result.history
    info.update(
        {
            "ran": True,
            "iterations": result.iterations,
            "kept_iteration": result.kept_iteration,
            "stop_reason": result.stop_reason,
            "lambda": sub.lambda_abs,
            "time_limit": time_limit,
            "monitor": (
                "validation points' exact residual"
                if validation is not None
                else "holdout exact residual"
                if sub.selection and sub.selection.hold_rows is not None
                else "fit"
            ),
            "monitor_start": h[0]["monitor"],
            "monitor_best": min(e["monitor"] for e in h),
            "history": h,
            "time": time.perf_counter() - t0,
        }
    )
    if bool(torch.equal(result.z, sub.z)):
        info["reason"] = "no iterate lowered the monitored exact residual; LSR's step kept"
        return None, info
    return result.z, info
