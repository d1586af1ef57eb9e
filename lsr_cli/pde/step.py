"""One LSR step on the physics residual and what it is chosen on: held-out residual rows (or GCV on
the exact path) or fresh validation points (:mod:`.validation`), with the validation guard that
keeps the input when no step lowers the exact residual at points never fitted."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lsr_cli.config import Config
from lsr_cli.dense import held_dense
from lsr_cli.distributed import SINGLE, Comm, global_mean_square
from lsr_cli.linearization import JacobianOperator, ParameterSpace, StackedOperator
from lsr_cli.linearized import LinearizedModel
from lsr_cli.plan import (
    PDE_ROW_CHUNK as ROW_CHUNK,
)
from lsr_cli.plan import (
    RunPlan,
    basis_point_count,
    choose_basis,
    pde_solve_path,
)
from lsr_cli.prepare import finite_or_raise
from lsr_cli.runtime import (
    ProgressSink,
)
from lsr_cli.sketch import RangeSketch
from lsr_cli.spectral import solve_exact_first
from lsr_cli.subspace import Selection, SubspaceResult, solve_subspace, stratified_holdout_rows

from .exact_stage import ExactStep, exact_step
from .problem import PdeProblem, set_scales
from .residual import ResidualOperators, block_losses, global_to_local, local_selection, true_residual
from .validation import validation_problem


def lsr_step(
    module: nn.Module,
    problem: PdeProblem,
    space: ParameterSpace,
    ops: ResidualOperators,
    cfg: Config,
    gen: torch.Generator,
    sink: ProgressSink,
    comm: Comm = SINGLE,
    basis_chunk: int = 4 * ROW_CHUNK,
    memory_budget: int | None = None,
    validation: Selection | None = None,
) -> SubspaceResult:
    """One-shot LSR of the stacked physics residual at the module's current weights.

    Distributed (``comm``): ``problem`` and ``ops`` hold this rank's points of every block
    (:meth:`~.problem.PdeProblem.shard`); hold-out rows and basis points are drawn over the
    global rows, as on one process, and each rank keeps its own."""
    lsr = cfg.lsr
    to_local = global_to_local(problem)
    if validation is not None:  # fresh points, never fitted (validation.py): every fit row is fitted
        selection = validation
    else:
        split = stratified_holdout_rows([b.num_global for b in problem.blocks], lsr.holdout, gen)
        if split is not None and comm.world > 1:
            split = (local_selection(split[0], to_local), local_selection(split[1], to_local))
        selection = (
            Selection("holdout_loss", fit_rows=split[0], hold_rows=split[1], holdout_fraction=lsr.holdout)
            if split is not None
            else Selection("train_loss")
        )
    basis, why = choose_basis(module, problem, space, ops, comm)
    ops.jacobian["basis"], ops.jacobian["basis_reason"] = basis, why
    if basis == "residual":
        basis_op: Any = ops.G
        label = "G"
    else:
        pts = problem.all_points()
        total = int(to_local.shape[0])
        idx = torch.randperm(total, generator=gen)[: basis_point_count(problem, lsr, total)]
        if comm.world > 1:
            idx = local_selection(idx, to_local)
        idx = idx.to(pts.device)
        basis_op = JacobianOperator(module, space, (pts[idx],), basis_chunk, lsr.tangent_chunk, probe=(pts[:1],))
        if ops.jacobian["path"] == "dense":
            basis_op = held_dense({"basis": basis_op}, lsr.max_memory, 2, comm)["basis"]
        label = "J"

    def adaptive(sketch: RangeSketch | None = None) -> SubspaceResult:
        dtype, device = ops.f0.dtype, ops.f0.device
        return solve_subspace(
            basis_op,
            ops.G,
            ops.f0,
            selection,
            lsr,
            gen,
            dtype,
            device,
            sink,
            label,
            memory_budget=memory_budget,
            comm=comm,
            sketch=sketch,
        )

    shape = (comm.sum_int(ops.G.shape[0]), ops.G.shape[1])
    spectral, _ = pde_solve_path(lsr, basis, ops.jacobian["path"], shape)  # G dense: products are matrix products
    if spectral:
        return solve_exact_first(ops.G, ops.f0, selection, lsr, gen, sink, label, adaptive, comm)
    return adaptive()


@dataclass
class Validation:
    """The validation points (this rank's share, on the device), their residual operators as a
    selection (``val_loss``), and what was done per block (for the report)."""

    problem: PdeProblem | None
    selection: Selection | None
    info: dict[str, Any]


def make_validation(
    module: nn.Module, problem: PdeProblem, space: ParameterSpace, ops: ResidualOperators, cfg: Config, comm: Comm
) -> Validation:
    """Fresh validation points for ``problem`` (:mod:`.validation`) and the selection that scores
    the refined predictor's linearized residual there; ``None`` parts when no block allows them."""
    if problem.instance is not None:  # lsr instances: thousands of small runs, each chosen as before
        return Validation(None, None, {"source": "lsr instances: none (rank chosen as configured)"})
    val, info = validation_problem(problem, cfg.seed)
    if val is None:
        return Validation(None, None, info)
    fit_weights = {b.name: b.weight for b in problem.blocks}
    for vb in val.blocks:  # weighted as in the loss (pde.weights: auto resolved them)
        vb.weight = fit_weights.get(vb.name, vb.weight)
    set_scales(val.blocks)
    val.shard(comm.rank, comm.world)
    val.to(ops.f0.device, ops.f0.dtype)
    val_ops: list[Any] = [
        JacobianOperator(module, space, b.inputs, ROW_CHUNK, cfg.lsr.tangent_chunk, residual=b.residual)
        for b in val.blocks
    ]
    if ops.jacobian["path"] == "dense":  # products as matrix products, like G's, when they fit too
        named = held_dense({b.name: op for b, op in zip(val.blocks, val_ops, strict=True)}, cfg.lsr.max_memory, 4, comm)
        val_ops = [named[b.name] for b in val.blocks]
    G_val = StackedOperator(val_ops)
    f_val = G_val.forward()
    finite_or_raise(f_val, "the physics residual at the validation points", comm)
    info["loss_before"] = global_mean_square(f_val, comm)
    return Validation(val, Selection("val_loss", op=G_val, f0=f_val), info)


def predictor(module: nn.Module, space: ParameterSpace, dz: Tensor | None) -> nn.Module:
    """The refined predictor ``q(θ0, x) + J(x) dz`` (the network itself when ``dz`` is ``None``)."""
    return LinearizedModel(module, space.unflatten_vector(dz)) if dz is not None else module


def validation_parts(
    module: nn.Module, space: ParameterSpace, dz: Tensor | None, val: PdeProblem, comm: Comm
) -> tuple[float, dict[str, float]]:
    """The refined predictor's exact weighted residual loss at the validation points, and each
    block's part ``w_b · mean_b(r²)`` of it (the parts sum to the loss), from one evaluation."""
    f = true_residual(predictor(module, space, dz), val)
    weights = {b.name: b.weight for b in val.blocks}
    parts = {name: weights[name] * loss for name, loss in block_losses(f, val, comm).items()}
    return global_mean_square(f, comm), parts


def validation_loss(module: nn.Module, space: ParameterSpace, dz: Tensor, val: PdeProblem, comm: Comm) -> float:
    """The refined predictor's exact weighted residual loss at the validation points."""
    return global_mean_square(true_residual(predictor(module, space, dz), val), comm)


def validation_report(
    validation: Validation, module: nn.Module, space: ParameterSpace, dz: Tensor | None, comm: Comm
) -> dict[str, Any]:
    """What the choices were made on, and the refined predictor's exact residual loss there."""
    info = dict(validation.info)
    if validation.problem is not None:
        info["loss_after"] = (
            validation_loss(module, space, dz, validation.problem, comm) if dz is not None else info["loss_before"]
        )
    return info


def choose_step(
    module: nn.Module,
    problem: PdeProblem,
    space: ParameterSpace,
    ops: ResidualOperators,
    cfg: Config,
    plan: RunPlan,
    gen: torch.Generator,
    sink: ProgressSink,
    comm: Comm,
    validation: Validation,
) -> tuple[SubspaceResult, ExactStep]:
    """The one-shot step as ``pde.validation`` says: chosen on the validation points (``choose``),
    or by held-out rows / GCV and kept only if it lowers the validation loss (``auto``: else
    chosen again on the validation points, else the input is kept)."""
    mode = problem.raw.get("validation", "auto")

    def one_shot(selection: Selection | None) -> tuple[SubspaceResult, ExactStep]:
        sub = lsr_step(
            module, problem, space, ops, cfg, gen, sink, comm, plan.row_chunk, plan.memory.fold_budget, selection
        )
        return sub, exact_step(module, problem, space, ops, sub, cfg, comm, sink, validation.problem)

    sub, step = one_shot(validation.selection if mode == "choose" else None)
    if mode != "auto" or validation.problem is None:
        return sub, step
    # the guard: a step that raises the exact residual at points never fitted is not kept, and
    # one the held-out rows or GCV refused is tried on the points never fitted
    before = float(validation.info["loss_before"])
    after = validation_loss(module, space, step.dz, validation.problem, comm) if step.dz is not None else before
    guard: dict[str, Any] = {"loss_before": before, "loss_after_first_choice": after}
    validation.info["guard"] = guard
    if after < before:
        guard["outcome"] = "kept: the step lowered the validation loss"
        return sub, step
    step_first = step.dz
    sub, step = one_shot(validation.selection)
    again = validation_loss(module, space, step.dz, validation.problem, comm) if step.dz is not None else before
    guard["loss_after_validation_choice"] = again
    if again < before:
        guard["outcome"] = (
            "the held-out-rows or GCV choice raised the validation loss; chosen on the validation points"
            if step_first is not None
            else "the held-out rows or GCV kept the input; chosen on the validation points"
        )
        return sub, step
    guard["outcome"] = "no step lowered the validation loss: the input is kept"
    sub = dataclasses.replace(sub, rank=0, dz=None, basis=None, z=None)
    return sub, ExactStep(None, ops.f0, ops.f0, {"ran": False, "reason": "the input is kept (validation guard)"})
