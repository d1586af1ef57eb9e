"""The physics residual as operators: ``G`` of every block at the current weights, stacked, and ``f0``;
the checks that the model and the residuals fit the problem; the residual of any model.

The residual ``f(θ)`` stacks every block of the problem (PDE interior, boundary, initial, data),
each scaled by ``√(w_b N / N_b)``; ``G = ∂f/∂θ`` is applied matrix-free by JVPs/VJPs through the
exact input derivatives of :mod:`.fields`, or held dense (:func:`~lsr_cli.plan.choose_residual_jacobian`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lsr_cli.checkpoint import LoadedCheckpoint
from lsr_cli.config import Config
from lsr_cli.distributed import SINGLE, Comm, global_mean_square
from lsr_cli.errors import CheckpointError, ConfigError, NumericalError
from lsr_cli.linearization import JacobianOperator, ParameterSpace, StackedOperator
from lsr_cli.plan import (
    PDE_ROW_CHUNK as ROW_CHUNK,
)
from lsr_cli.plan import (
    choose_residual_jacobian,
)
from lsr_cli.prepare import prepare_module

from .problem import PdeProblem
from .unknowns import attach_unknowns, select_space
from .weights import balance_weights


@dataclass
class ResidualOperators:
    """``G`` of every block at the current weights, stacked, and ``f0``; ``jacobian`` says
    whether ``G`` is held dense or applied matrix-free, and why."""

    blocks: list[Any]
    G: StackedOperator
    f0: Tensor
    jacobian: dict[str, str]


def check_points_fit(module: nn.Module, problem: PdeProblem, where: str) -> None:
    """One forward pass on a few points: ``[N, d]`` in, one value per point out (distributed:
    of the first block this rank holds points of; nothing to check on a rank that holds none)."""
    held = [b for b in problem.blocks if b.points.shape[0] > 0]
    if not held:
        return
    x = held[0].points[:4]
    try:
        with torch.no_grad():
            out = module(x)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{where}: the model does not accept points of dimension {x.shape[1]} "
            f"(variables {problem.variables}): {first[:200]}"
        ) from None
    outputs = problem.outputs
    if not isinstance(out, Tensor) or out.shape[0] != x.shape[0] or out[0].numel() != len(outputs):
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        if len(outputs) > 1 or "outputs" in problem.raw:  # systems: pde.outputs
            raise ConfigError(
                f"config.pde.outputs: names {len(outputs)} outputs {outputs}, but the model {where} returns "
                f"{shape} for {x.shape[0]} points; name one output per column of the model"
            )
        raise CheckpointError(
            f"{where}: a PDE model must return one value per point ([N] or [N, 1]); "
            f"for {x.shape[0]} points it returned {shape} (a model with several outputs: name them with pde.outputs)"
        )


def check_blocks(module: nn.Module, problem: PdeProblem) -> None:
    """Evaluate every block's residual on a few points: one finite value per point, or a
    one-line error naming the block (user residuals included). Distributed: the blocks this
    rank holds points of (rank 0 holds a point of every block)."""
    for b in problem.blocks:
        if b.points.shape[0] == 0:
            continue
        rows = tuple(x[:3] for x in b.inputs)
        try:
            r = b.residual(module, rows)
        except Exception as exc:  # user residual code, or an equation the model cannot serve
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(
                f"config.pde: evaluating the residual of block '{b.name}' ({b.kind}, equation "
                f"{problem.equation_name}) failed: {type(exc).__name__}: {first[:200]}"
            ) from None
        if not isinstance(r, Tensor) or r.reshape(-1).shape[0] != rows[0].shape[0]:
            shape = tuple(r.shape) if isinstance(r, Tensor) else type(r).__name__
            raise ConfigError(
                f"config.pde: the residual of block '{b.name}' must give one value per point "
                f"([{rows[0].shape[0]}] for {rows[0].shape[0]} points), got {shape}"
            )


def build_operators(
    module: nn.Module,
    problem: PdeProblem,
    space: ParameterSpace,
    cfg: Config,
    row_chunk: int = ROW_CHUNK,
    comm: Comm = SINGLE,
) -> ResidualOperators:
    """Residual operators of every block; materialized (``lsr.jacobian``: auto when ``G`` fits
    half of the memory budget, or dense) so that products are BLAS-3, else matrix-free.
    Distributed: the size is the whole ``G``'s, so every rank count takes the same path."""
    lsr = cfg.lsr
    ops: list[Any] = [
        JacobianOperator(module, space, b.inputs, row_chunk, lsr.tangent_chunk, residual=b.residual)
        for b in problem.blocks
    ]
    dense, info = choose_residual_jacobian({b.name: op for b, op in zip(problem.blocks, ops, strict=True)}, lsr, comm)
    if dense is not None:
        ops = [dense[b.name] for b in problem.blocks]
    G = StackedOperator(ops)
    return ResidualOperators(ops, G, G.forward(), info)


def true_residual(model: nn.Module, problem: PdeProblem, chunk: int = 4096) -> Tensor:
    """The stacked, scaled residual of ``model`` (e.g. the refined predictor) on every block."""
    parts = []
    with torch.no_grad():
        for b in problem.blocks:
            n = b.points.shape[0]
            for s in range(0, max(n, 1), chunk):  # an empty share gives an empty part
                rows = tuple(x[s : s + chunk] for x in b.inputs)
                parts.append(b.residual(model, rows).reshape(-1).detach())
    return torch.cat(parts)


def block_losses(f: Tensor, problem: PdeProblem, comm: Comm = SINGLE) -> dict[str, float]:
    """Mean square of each block's unscaled residual (``f`` is the scaled, stacked residual;
    distributed: this rank's rows, the means are over every rank's)."""
    out, start = {}, 0
    for b in problem.blocks:
        n = b.points.shape[0]
        out[b.name] = global_mean_square(f[start : start + n] / b.scale, comm)
        start += n
    return out


def global_to_local(problem: PdeProblem) -> Tensor:
    """For every row of the global stacked residual, its row here, or −1 when another rank holds it."""
    total = sum(b.num_global for b in problem.blocks)
    out = torch.full((total,), -1, dtype=torch.long)
    g, loc = 0, 0
    for b in problem.blocks:
        n = int(b.points.shape[0])
        out[g + b.first_point : g + b.first_point + n] = torch.arange(loc, loc + n)
        g += b.num_global
        loc += n
    return out


def local_selection(rows: Tensor, to_local: Tensor) -> Tensor:
    """The global rows ``rows`` held here, as local rows (order kept)."""
    mapped = to_local[rows]
    return mapped[mapped >= 0]


def prepare_pde_run(
    ckpt: LoadedCheckpoint,
    problem: PdeProblem,
    cfg: Config,
    dtype: torch.dtype,
    device: torch.device,
    gen: torch.Generator,
    comm: Comm = SINGLE,
) -> tuple[nn.Module, ParameterSpace, ResidualOperators]:
    """The network on the device, the problem checked against it, the linearized parameters and
    the residual operators at the checkpoint (their residual must be finite)."""
    module = prepare_module(ckpt, dtype, device)
    problem.to(device, dtype)
    check_points_fit(module, problem, str(ckpt.path))
    module = attach_unknowns(module, problem.unknowns, dtype, device)  # pde.unknowns: columns after the outputs
    check_blocks(module, problem)
    space = select_space(module, cfg, gen)
    if (
        problem.raw.get("weights") == "auto"
    ):  # (parse_problem checked the value) balanced at the checkpoint, then fixed (iterate keeps them)
        problem.weights = balance_weights(module, problem, space, cfg.seed, cfg.lsr.tangent_chunk, comm)
    ops = build_operators(module, problem, space, cfg, comm=comm)
    bad = int((~torch.isfinite(ops.f0)).sum())
    if (comm.sum_int(bad) if comm.world > 1 else bad) > 0:
        raise NumericalError(f"{ckpt.path}: the physics residual at the checkpoint has non-finite values")
    return module, space, ops
