"""What the report says about a system's components and unknown constants.

The reference solution (``/reference/values`` ``[N, C_ref]``) is compared with the model's first
``C_ref`` output columns: all together (``splits.reference``, as for one output) and, for a
system, component by component (``components``: ``velocity`` errors of a Navier–Stokes model
without its pressure, whose level is fixed only up to a constant, are read there).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from lsr_cli.distributed import SINGLE, Comm
from lsr_cli.linearization import JacobianOperator, ParameterSpace
from lsr_cli.metrics import global_error_metrics
from lsr_cli.prepare import predict

from .problem import PdeProblem

EVAL_CHUNK = 4096


def reference_errors(
    module: nn.Module,
    space: ParameterSpace,
    dz: Tensor | None,
    net_params: dict[str, Tensor],
    problem: PdeProblem,
    tangent_chunk: int,
    comm: Comm = SINGLE,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Errors against the reference of the input, the refined predictor and the network at
    ``θ0 + δ``: over every compared column, and per component when there are several."""
    assert problem.reference is not None
    x_ref, u_ref = problem.reference
    n, c = u_ref.shape[0], u_ref.shape[1]
    u0 = predict(module, (x_ref,), EVAL_CHUNK).reshape(n, -1)[:, :c]
    u_lin = u0
    if dz is not None:
        step = JacobianOperator(module, space, (x_ref,), EVAL_CHUNK, tangent_chunk).matvec(dz)
        u_lin = u0 + step.reshape(n, -1)[:, :c]
    u_net = predict(module, (x_ref,), EVAL_CHUNK, net_params).reshape(n, -1)[:, :c]
    total = {
        "before": global_error_metrics(u0, u_ref, comm),
        "after": global_error_metrics(u_lin, u_ref, comm),
        "network_after": global_error_metrics(u_net, u_ref, comm),
    }
    if c == 1:
        return total, None
    per: dict[str, Any] = {}
    for j, name in enumerate(problem.outputs[:c]):
        per[name] = {
            "before": global_error_metrics(u0[:, j : j + 1], u_ref[:, j : j + 1], comm),
            "after": global_error_metrics(u_lin[:, j : j + 1], u_ref[:, j : j + 1], comm),
            "network_after": global_error_metrics(u_net[:, j : j + 1], u_ref[:, j : j + 1], comm),
        }
    return total, per


def unknowns_message(report: dict[str, dict[str, Any]]) -> str:
    """``nu 0.05 -> 0.0101 (true 0.01)`` for every unknown, for the run's one-line message."""
    parts = []
    for name, e in report.items():
        true = f" (true {e['true']:.6g})" if "true" in e else ""
        parts.append(f"{name} {e['before']:.6g} -> {e['after']:.6g}{true}")
    return "; ".join(parts)


__all__ = ["reference_errors", "unknowns_message"]
