"""Block weights balanced by the residual Jacobian (``pde.weights: auto``).

The weights ``w_b`` of the loss ``Σ_b w_b · mean_b(r²)`` decide what a least-squares step
prefers: a boundary block weighted too lightly is traded away for the interior equation, whose
rows are larger (``−Δu`` scales like ``k²·u`` for a solution of wavenumber ``k``). The balance
used here is the neural-tangent-kernel one of Wang, Yu & Perdikaris ("When and why PINNs fail
to train", J. Comput. Phys. 2022), in the mean-square form of this loss: each block contributes
the same to the trace of the Gauss–Newton matrix ``GᵀG``,

    w_b · m_b = w_p · m_p,    m_b = mean_i ‖∂r_{b,i}/∂θ‖²,

where ``p`` is the first ``pde`` block (its weight stays as configured) and ``m_b`` is estimated
at the checkpoint with :data:`PROBES` seeded Gaussian probes, ``‖G_b‖_F² ≈ mean_j ‖G_b v_j‖²``
(Hutchinson; the relative error of the estimate is about ``√(2/PROBES)`` at worst and much less
for the low-rank ``G_b`` of a network). A configured block weight multiplies the balanced one,
so ``weight: 2`` still means "twice as important".
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lsr_cli.distributed import SINGLE, Comm, global_norm
from lsr_cli.linearization import JacobianOperator, ParameterSpace

from .problem import PdeProblem, set_scales

PROBES = 16
SEED_OFFSET = 271828
ROW_CHUNK = 256


def gradient_norms(
    module: nn.Module, problem: PdeProblem, space: ParameterSpace, seed: int, tangent_chunk: int, comm: Comm = SINGLE
) -> dict[str, float]:
    """``m_b``: the mean squared norm of a block's residual gradients (unweighted), estimated."""
    first = problem.blocks[0].points
    gen = torch.Generator().manual_seed(int(seed) + SEED_OFFSET)
    V = torch.randn(space.num, PROBES, generator=gen, dtype=torch.float64).to(first.device, first.dtype)
    out: dict[str, float] = {}
    for b in problem.blocks:
        op = JacobianOperator(module, space, b.inputs, ROW_CHUNK, tangent_chunk, residual=b.residual)
        Y = op.matmat(V) if op.shape[0] else V.new_zeros(0, PROBES)
        frob = global_norm(Y.reshape(-1), comm) ** 2 / PROBES
        out[b.name] = frob / (b.scale**2 * max(b.num_global, 1))
    return out


def balance_weights(
    module: nn.Module, problem: PdeProblem, space: ParameterSpace, seed: int, tangent_chunk: int, comm: Comm = SINGLE
) -> dict[str, Any]:
    """Set every block's weight to the balanced one (times its configured weight) and the row
    scales to match; returns what was done (for the report)."""
    norms = gradient_norms(module, problem, space, seed, tangent_chunk, comm)
    ref = next((b for b in problem.blocks if b.kind == "pde"), problem.blocks[0])
    m_ref = norms[ref.name]
    configured = {b.name: b.weight for b in problem.blocks}
    for b in problem.blocks:
        m = norms[b.name]
        if b is not ref and m > 0 and m_ref > 0:
            b.weight = configured[b.name] * m_ref / m
    set_scales(problem.blocks)
    return {
        "mode": "auto",
        "rule": "w_b * mean|grad r_b|^2 equal across blocks (NTK trace balance), times the configured weight",
        "reference_block": ref.name,
        "gradient_norms": norms,
        "configured": configured,
        "weights": {b.name: b.weight for b in problem.blocks},
        "probes": PROBES,
    }


__all__ = ["PROBES", "balance_weights", "gradient_norms"]
