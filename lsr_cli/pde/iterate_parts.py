"""The parts of ``lsr iterate`` around its loop: reference errors, fit points, unknown constants,
the validation set and the criterion that keeps an iteration."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lsr_cli.config import Config
from lsr_cli.distributed import SINGLE, Comm, global_mean_square, global_norm
from lsr_cli.linearization import ParameterSpace
from lsr_cli.linearized import LinearizedModel
from lsr_cli.metrics import global_error_metrics
from lsr_cli.refine import predict

from .adaptive import candidates, redraw
from .problem import PdeProblem
from .refine_pde import true_residual
from .unknowns import WithUnknowns
from .validation import SEED_OFFSET, validation_problem


def reference_errors(
    module: nn.Module, problem: PdeProblem, dz_u: Tensor | None = None, comm: Comm = SINGLE
) -> dict[str, float | None] | None:
    """Errors of the first ``C_ref`` output columns against ``/reference/values`` ``[N, C_ref]``
    (``dz_u``: the predictor's step there, ``[N · columns]``)."""
    errors = component_errors(module, problem, dz_u, comm)
    return None if errors is None else errors[0]


def component_errors(
    module: nn.Module, problem: PdeProblem, dz_u: Tensor | None = None, comm: Comm = SINGLE
) -> tuple[dict[str, float | None], dict[str, dict[str, float | None]]] | None:
    """The errors over every compared column, and per component (name → metrics; empty for one)."""
    if problem.reference is None:
        return None
    x_ref, u_ref = problem.reference
    n = u_ref.shape[0]
    c = u_ref.reshape(n, -1).shape[1]
    u = predict(module, (x_ref,), 4096).reshape(n, -1)
    if dz_u is not None:
        u = u + dz_u.reshape(n, -1)
    u = u[:, :c]
    r = u_ref.reshape(n, c)
    total = global_error_metrics(u.reshape(u_ref.shape), u_ref, comm)
    if c == 1:
        return total, {}
    per = {
        name: global_error_metrics(u[:, j : j + 1], r[:, j : j + 1], comm) for j, name in enumerate(problem.outputs[:c])
    }
    return total, per


def fit_points(problem: PdeProblem) -> list[Tensor]:
    """Every block's points once: the row groups of a system's block (``interior.a``,
    ``walls.u``, …) share one tensor of points, fitted once with every output column."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    out = []
    for block in problem.blocks:
        key = (block.points.data_ptr(), tuple(block.points.shape))
        if key not in seen:
            seen.add(key)
            out.append(block.points)
    return out


def unknown_steps(module: nn.Module, space: Any, dz: Tensor | None) -> dict[str, float]:
    """Each unknown constant's ``δ`` in the LSR step ``dz`` (zero when it is not linearized)."""
    if not isinstance(module, WithUnknowns):
        return {}
    steps = dict.fromkeys(module.names, 0.0)
    if dz is None:
        return steps
    delta = space.unflatten_vector(dz)
    for name, path in zip(module.names, module.paths, strict=True):
        if path in delta:
            steps[name] = float(delta[path].detach())
    return steps


def apply_unknown_steps(module: nn.Module, steps: dict[str, float]) -> None:
    """``ν ← ν + δν`` for every unknown: they are parameters, set directly, never fitted."""
    if not isinstance(module, WithUnknowns):
        return
    with torch.no_grad():
        for name, path in zip(module.names, module.paths, strict=True):
            module._parameter(path).add_(steps.get(name, 0.0))


def distance(u: Tensor, target: Tensor, comm: Comm = SINGLE) -> float:
    """``‖u − u*‖ / ‖u*‖`` over the rows of every rank."""
    if comm.world == 1:
        return float(torch.linalg.norm(u - target) / torch.linalg.norm(target).clamp_min(1e-300))
    return global_norm(u - target, comm) / max(global_norm(target, comm), 1e-300)


def broadcast_parameters(module: nn.Module, comm: Comm) -> None:
    """Rank 0's weights on every rank (they are equal already: the steps are; this keeps
    round-off differences of the collectives from ever drifting the replicas apart)."""
    if comm.world == 1:
        return
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(comm.broadcast(p.detach()))


def validation_set(
    problem: PdeProblem, cfg: Config, comm: Comm, offset: int = SEED_OFFSET
) -> tuple[PdeProblem | None, dict[str, Any]]:
    """Fresh validation points (:mod:`.validation`, as one-shot PDE refinement draws them; another
    ``offset`` draws other points by the same rules), this rank's share on the problem's device;
    ``None`` when no block allows them."""
    if problem.instance is not None:
        return None, {"source": "lsr instances: none"}
    val, info = validation_problem(problem, cfg.seed, offset=offset)
    if val is None:
        return None, info
    val.shard(comm.rank, comm.world)
    x = problem.blocks[0].points
    val.to(x.device, x.dtype)
    return val, info


FRESH_OFFSET = 7919
"""The fresh points of the physics pass of iteration ``k`` are seeded ``seed + FRESH_OFFSET + k``."""


PHYSICS_ROUNDS = 1000
"""The physics pass of iteration ``k`` draws its residual-weighted candidates as an adaptive round
``PHYSICS_ROUNDS + k`` would (:func:`~.adaptive.candidates`): never the rounds of ``lsr refine``."""


def fresh_points(
    problem: PdeProblem, cfg: Config, comm: Comm, k: int, module: nn.Module | None = None
) -> tuple[PdeProblem | None, dict[str, int]]:
    """The physics pass's fresh points of iteration ``k`` and the points drawn where the residual
    is large, per ``pde`` block. Drawn as the validation points are, from a seed of their own
    (:func:`validation_set` with another offset); with ``iterate.physics_points: adaptive`` and
    the ``module``, each ``pde`` block's fresh points are drawn instead where the module's
    residual is large (:func:`~.adaptive.redraw`: RAD from candidates 4× the block, as many
    points), so a pass costs what it did with uniform points. Measured with `lsr iterate`'s
    defaults (`docs/benchmarks/unseen_pinns.md`): on a Burgers PINN that Adam and L-BFGS left at
    2.65e-2, 5.53e-4 with uniform points and 2.17e-4 with these."""
    fresh = validation_set(problem, cfg, comm, FRESH_OFFSET + k)[0]
    if fresh is None or module is None or cfg.iterate.physics_points != "adaptive":
        return fresh, {}
    cand = candidates(problem, cfg.seed, PHYSICS_ROUNDS + k)
    if cand is None:
        return fresh, {}
    gen = torch.Generator().manual_seed(cfg.seed + FRESH_OFFSET + k)
    return redraw(fresh, cand, module, gen, comm)


def predictor_validation_loss(
    module: nn.Module, space: ParameterSpace, dz: Tensor | None, val: PdeProblem, comm: Comm = SINGLE
) -> float:
    """The LSR predictor's ``q(θ, x) + J(x) dz`` exact weighted residual loss at the validation
    points (the network's own when ``dz`` is ``None``)."""
    model = LinearizedModel(module, space.unflatten_vector(dz)) if dz is not None else module
    return global_mean_square(true_residual(model, val), comm)


def criterion_value(
    select: str, val: PdeProblem | None, module: nn.Module, net_loss: float, fit: float, comm: Comm
) -> float:
    """The value the kept network minimizes: the network's exact weighted residual loss at the
    validation points (``validation``; the fit points' when there are none), at the fit points
    (``residual``), or its distance to this iteration's LSR predictor (``distance``)."""
    if select == "distance":
        return fit
    if select == "validation" and val is not None:
        return global_mean_square(true_residual(module, val), comm)
    return net_loss


CRITERIA = {
    "validation": "network's residual loss at the validation points",
    "residual": "network's weighted residual loss",
    "distance": "network's distance to the LSR predictor",
}
