"""One-shot LSR on a physics residual (``lsr refine`` with a ``pde:`` config).

The residual ``f(θ)`` stacks every block of the problem (PDE interior, boundary, initial, data),
each scaled by ``√(w_b N / N_b)``; ``G = ∂f/∂θ`` is applied matrix-free by JVPs/VJPs through the
exact input derivatives of :mod:`.fields`. The basis ``P`` comes from a sketch of the output
Jacobian ``J`` on a random subset of the collocation points (``pde.basis: output``, the
authors' choice, cheaper) or of ``G`` itself (``pde.basis: residual``); ``auto`` (the default)
takes ``residual`` for a small ``G`` held dense on a linear equation (:func:`choose_basis`),
which then runs the exact spectral path (:mod:`lsr_cli.spectral`, rank by generalized
cross-validation). Otherwise the reduced problem uses every residual row and rank and λ are
chosen on held-out residual rows (``lsr.holdout``).
The refined predictor ``q(θ0, x) + J(x) δ`` is compared with the reference solution when the
data file has one.
The decisions (Jacobian path, basis, solve path, memory) are :mod:`lsr_cli.plan`'s; the parts
live beside this module: :mod:`.residual` (operators), :mod:`.step` (one step and its
selection), :mod:`.exact_stage` (nonlinear equations), :mod:`.rounds` (adaptive collocation).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lsr_cli.checkpoint import LoadedCheckpoint
from lsr_cli.config import Config
from lsr_cli.distributed import SINGLE, Comm, global_mean_square
from lsr_cli.errors import CheckpointError
from lsr_cli.linearization import ParameterSpace
from lsr_cli.linearized import LinearizedModel
from lsr_cli.plan import RunPlan, choose_basis, equation_is_linear, plan_pde_memory
from lsr_cli.result import RefineResult
from lsr_cli.runtime import (
    MemoryMeter,
    NoProgress,
    ProgressSink,
    no_tf32,
    peak_memory_bytes,
    start_run,
    warm_up_autodiff,
)
from lsr_cli.subspace import SubspaceResult

from .adaptive import adaptive_settings
from .exact_stage import ExactStep, exact_step
from .problem import PdeProblem
from .residual import (
    ResidualOperators,
    block_losses,
    build_operators,
    check_blocks,
    check_points_fit,
    prepare_pde_run,
    true_residual,
)
from .rounds import adaptive_rounds
from .step import Validation, choose_step, lsr_step, make_validation, validation_report
from .system_report import reference_errors, unknowns_message
from .unknowns import WithUnknowns, split_delta, unknowns_report


@dataclass
class PdeStep:
    """The outcome of the step (after the validation guard and any adaptive rounds): the final
    problem and operators, LSR's result, the exact-residual step, the plan and the validation."""

    problem: PdeProblem
    ops: ResidualOperators
    sub: SubspaceResult
    step: ExactStep
    plan: RunPlan
    validation: Validation


def _run_step(
    module: nn.Module,
    problem: PdeProblem,
    space: ParameterSpace,
    ops: ResidualOperators,
    cfg: Config,
    meter: MemoryMeter,
    gen: torch.Generator,
    sink: ProgressSink,
    comm: Comm,
) -> PdeStep:
    """Plan, choose the step (:func:`~.step.choose_step`), then add collocation points in rounds
    while ``pde.adaptive`` allows (:func:`~.rounds.adaptive_rounds`)."""
    validation = make_validation(module, problem, space, ops, cfg, comm)
    settings = adaptive_settings(problem.raw)
    run_cfg, plan = plan_pde_memory(problem, ops, cfg, meter, comm)
    sub, step = choose_step(module, problem, space, ops, run_cfg, plan, gen, sink, comm, validation)
    if settings is not None and validation.problem is not None:
        problem, ops, sub, step, plan = adaptive_rounds(
            module, problem, space, ops, cfg, meter, gen, sink, comm, validation, settings, (sub, step, plan)
        )
    return PdeStep(problem, ops, sub, step, plan, validation)


def _residuals(
    problem: PdeProblem, ops: ResidualOperators, step: ExactStep, f_net: Tensor, comm: Comm
) -> dict[str, dict[str, float]]:
    """Per block: the mean square residual before, of the refined predictor after, of its
    linearization, and of the plain network at θ0 + δ; and the block's weight."""
    before_b, after_b, lin_b, net_b = (
        block_losses(f, problem, comm) for f in (ops.f0, step.f_after, step.f_lin, f_net)
    )
    residuals = {
        name: {
            "before": before_b[name],
            "after": after_b[name],
            "after_linearized": lin_b[name],
            "network_after": net_b[name],
        }
        for name in before_b
    }
    for b in problem.blocks:
        residuals[b.name]["weight"] = b.weight
    return residuals


def _outcome(
    run: PdeStep, loss: dict[str, Any], errors: dict[str, Any], unknowns: dict[str, Any] | None
) -> tuple[str, str, list[str]]:
    """The status, the one-line message and the warnings of the run."""
    total_before, total_after, lin_total = loss["before"], loss["after"], loss["after_linearized"]
    nonlinear, rank = run.step.info, run.sub.rank
    if rank == 0:
        status, message = (
            "unchanged",
            "no rank lowered the held-out residual loss; the refined predictor equals the input",
        )
    else:
        status = "improved"
        if nonlinear.get("ran") and not nonlinear.get("reason"):
            message = (
                f"rank {rank}: the refined predictor's own residual loss {total_before:.3g} -> "
                f"{total_after:.3g} after {nonlinear['iterations']} Levenberg-Marquardt steps on the exact "
                f"residual in the subspace (LSR's linearized step alone: {nonlinear['lsr_step_residual_loss']:.3g})"
            )
        else:
            message = (
                f"rank {rank}: linearized residual loss {total_before:.3g} -> {lin_total:.3g}; "
                f"the refined predictor's own residual loss {total_before:.3g} -> {total_after:.3g}"
            )
        if "reference" in errors:
            ref = errors["reference"]
            ratio = (ref["before"]["rel_l2"] or 0.0) / max(ref["after"]["rel_l2"] or 0.0, 1e-300)
            message += f"; error vs the reference {ratio:.3g}x lower"
    if unknowns:
        message += f"; {unknowns_message(unknowns)}"
    warnings = list(run.plan.warnings)
    if rank > 0 and total_after > total_before:
        warnings.append(
            f"the refined predictor's own residual loss ({total_after:.3g}) is above the input's "
            f"({total_before:.3g}): the equation is nonlinear and the correction is large where the "
            "solution is steep; the collocation points may not resolve a front (add points there, "
            "e.g. a block with `region:`), and judge the result by a reference solution"
        )
    return status, message, warnings


def refine_pde(
    ckpt: LoadedCheckpoint,
    problem: PdeProblem,
    cfg: Config,
    progress: ProgressSink | None = None,
    comm: Comm = SINGLE,
    meter: MemoryMeter | None = None,
) -> RefineResult:
    """One-shot LSR of ``ckpt`` on the physics residual of ``problem``.

    Distributed (``comm``): ``problem`` holds this rank's share of the points
    (:meth:`~.problem.PdeProblem.shard`); losses and errors are over every rank's points."""
    if ckpt.delta is not None:
        raise CheckpointError(
            f"{ckpt.path}: refining a refined checkpoint on a PDE residual is not supported; "
            "refine the original network, or use `lsr iterate`, which writes a plain network"
        )
    sink = progress or NoProgress()
    dtype, device, gen = start_run(cfg.dtype, cfg.device, cfg.seed)
    timings: dict[str, float] = {}
    with no_tf32():
        t0 = time.perf_counter()
        if meter is None:
            warm_up_autodiff(device)
            meter = MemoryMeter(device)
        module, space, ops = prepare_pde_run(ckpt, problem, cfg, dtype, device, gen, comm)
        named = dict(module.named_parameters())
        timings["baseline"] = time.perf_counter() - t0
        stage_peaks = {"baseline": meter.peak_above_start()}
        run = _run_step(module, problem, space, ops, cfg, meter, gen, sink, comm)
        problem, ops, sub, step = run.problem, run.ops, run.sub, run.step
        stage_peaks["sketch_project_solve"] = meter.peak_above_start()
        timings.update(sub.timings)
        t1 = time.perf_counter()
        dz = step.dz
        first = space.names[0]
        delta = space.unflatten_vector(dz) if dz is not None else {first: torch.zeros_like(named[first])}
        timings["nonlinear"] = float(step.info.get("time", 0.0))
        net_params = {k: named[k].detach() + v for k, v in delta.items()}
        f_net = torch.cat([op.forward(net_params).reshape(-1) for op in ops.blocks])
        residuals = _residuals(problem, ops, step, f_net, comm)
        errors = {}
        components = None  # systems: the reference errors per component (system_report)
        if problem.reference is not None:
            errors["reference"], components = reference_errors(
                module, space, dz, net_params, problem, cfg.lsr.tangent_chunk, comm
            )
        network, net_delta, unknown_steps = split_delta(module, delta)  # pde.unknowns: not in the checkpoint's δ
        unknowns = (
            unknowns_report(problem.unknowns, module.values(), unknown_steps, space)
            if isinstance(module, WithUnknowns)
            else None
        )
        timings["evaluate"] = time.perf_counter() - t1
        stage_peaks["evaluate"] = meter.peak_above_start()

    loss = {
        "before": global_mean_square(ops.f0, comm),
        "after": global_mean_square(step.f_after, comm),
        "after_linearized": global_mean_square(step.f_lin, comm),
        "weights": problem.weights or {"mode": "config", "weights": {b.name: b.weight for b in problem.blocks}},
    }
    status, message, warnings = _outcome(run, loss, errors, unknowns)
    peak, kind = peak_memory_bytes(device)
    return RefineResult(
        status=status,
        message=message,
        model=LinearizedModel(network, net_delta),
        delta=net_delta,
        rank=sub.rank,
        selection_metric=sub.regularization["chosen_by"],
        regularization=sub.regularization,
        rank_sweep=sub.sweep,
        errors=errors,
        timings=timings,
        singular_values=sub.singular_values,
        num_parameters=sum(p.numel() for p in named.values()),
        num_linearized_parameters=space.num,
        num_residuals=comm.sum_int(ops.G.shape[0]),
        device=str(device),
        dtype=cfg.dtype,
        peak_memory_bytes=peak,
        peak_memory_kind=kind,
        warnings=warnings,
        rounds=sub.rounds,
        stop_reason=sub.stop_reason,
        residual_blocks=residuals,
        residual_loss=loss,
        jacobian=ops.jacobian,
        nonlinear=step.info,
        validation=validation_report(run.validation, module, space, dz, comm),
        memory=run.plan.memory_report(meter, stage_peaks),
        compile=run.plan.compile,
        unknowns=unknowns,
        components=components,
        time_budget=sub.time_budget,
    )


__all__ = [
    "ExactStep",
    "ResidualOperators",
    "block_losses",
    "build_operators",
    "check_blocks",
    "check_points_fit",
    "choose_basis",
    "equation_is_linear",
    "exact_step",
    "lsr_step",
    "prepare_pde_run",
    "refine_pde",
    "true_residual",
]
