"""The LSR step of one ``lsr iterate`` iteration and the fit targets it gives: the step guarded as
``lsr refine`` guards it (``pde.validation``), the predictor ``q(θ, x) + J(x) δ`` at every fit point,
its residual loss and reference errors, and the incoming network's distance to it."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lsr_cli.config import Config
from lsr_cli.distributed import Comm, global_mean_square
from lsr_cli.linearization import JacobianOperator, ParameterSpace
from lsr_cli.refine import predict
from lsr_cli.runtime import NoProgress
from lsr_cli.subspace import Selection, SubspaceResult

from . import iterate_parts as parts
from .iterate_parts import apply_unknown_steps, distance, fit_points, reference_errors, unknown_steps
from .problem import PdeProblem
from .refine_pde import ExactStep, ResidualOperators, exact_step, lsr_step
from .step import make_validation


@dataclass
class Targets:
    """One iteration's LSR step and what the fit needs of it: the predictor at every fit point
    (``targets``, one ``[N_b · outputs]`` tensor per point set), the predictor's residual loss and
    reference errors, and the incoming network's distance to it (an error estimate)."""

    sub: SubspaceResult
    nonlinear: dict[str, Any]
    lin_loss: float
    targets: list[Tensor]
    estimate: float
    lin_ref: dict[str, Any] | None
    guard: dict[str, Any]  # the validation guard of the step (empty when it did not run)


def lsr_targets(
    module: nn.Module,
    problem: PdeProblem,
    space: ParameterSpace,
    ops: ResidualOperators,
    cfg: Config,
    gen: torch.Generator,
    comm: Comm,
    deadline: float = math.inf,
) -> Targets:
    """One-shot LSR at the current weights and the predictor ``q(θ, x) + J(x) δ`` at every fit
    point; the unknown constants (``pde.unknowns``) take their step here. ``deadline`` (a
    ``time.perf_counter()`` value) bounds the exact-residual stage."""
    num_out = len(problem.outputs)
    sub, step, guard = guarded_step(module, problem, space, ops, cfg, gen, comm, deadline)
    sub.dz, nonlinear = step.dz, step.info
    # the LSR predictor's residual: its own (exact) one when the stage ran, else f0 + G dz
    lin_loss = global_mean_square(step.f_after if nonlinear.get("ran") else step.f_lin, comm)
    # the fit targets: every output column of the predictor at every block's points (once)
    targets, u_now = [], []
    for pts in fit_points(problem):
        u = predict(module, (pts,), 4096).reshape(pts.shape[0], -1)
        u_now.append(u[:, :num_out].reshape(-1))
        if sub.dz is not None:
            jv = JacobianOperator(module, space, (pts,), 1024, cfg.lsr.tangent_chunk).matvec(sub.dz)
            u = u + jv.reshape(pts.shape[0], -1)
        targets.append(u[:, :num_out].reshape(-1).detach())
    # the unknown constants take their LSR step directly (parameters, not outputs: not fitted)
    apply_unknown_steps(module, unknown_steps(module, space, sub.dz))
    # distance of the incoming network to the LSR predictor: an error estimate that needs no
    # reference (the predictor's residual is orders of magnitude below the network's)
    estimate = distance(torch.cat(u_now), torch.cat(targets), comm)
    lin_ref = None
    if problem.reference is not None and sub.dz is not None:
        x_ref = problem.reference[0]
        jr = JacobianOperator(module, space, (x_ref,), 4096, cfg.lsr.tangent_chunk).matvec(sub.dz)
        lin_ref = reference_errors(module, problem, jr, comm)
    elif problem.reference is not None:
        lin_ref = reference_errors(module, problem, comm=comm)
    return Targets(sub, nonlinear, lin_loss, targets, estimate, lin_ref, guard)


def guarded_step(
    module: nn.Module,
    problem: PdeProblem,
    space: ParameterSpace,
    ops: ResidualOperators,
    cfg: Config,
    gen: torch.Generator,
    comm: Comm,
    deadline: float = math.inf,
) -> tuple[SubspaceResult, ExactStep, dict[str, Any]]:
    """The LSR step as ``lsr refine`` takes it (``pde.validation``): with ``auto``, the held-out
    rows' (or GCV's) choice is kept only if the predictor's exact residual at the validation
    points falls below the network's, else the rank is chosen on the validation points, else
    there is no step; ``choose``: chosen there at once; anything else: the held-out choice.

    Measured (docs/benchmarks/unseen_pinns.md, L-shape Poisson PINN): unguarded, the held-out
    rows chose rank 617, whose predictor fits the file's points to 7e-6 and has reference error
    1.33 (the network's: 2.8e-2); every fit to it was rejected."""
    mode = problem.raw.get("validation", "auto")
    validation = make_validation(module, problem, space, ops, cfg, comm) if mode in ("auto", "choose") else None
    val = validation.problem if validation is not None else None

    def one_shot(selection: Selection | None) -> tuple[SubspaceResult, ExactStep]:
        sub = lsr_step(module, problem, space, ops, cfg, gen, NoProgress(), comm, validation=selection)
        # nonlinear equations: the predictor's exact residual, minimized in LSR's subspace
        return sub, exact_step(module, problem, space, ops, sub, cfg, comm, deadline=deadline)

    chosen = validation.selection if validation is not None and val is not None and mode == "choose" else None
    sub, step = one_shot(chosen)
    if mode != "auto" or validation is None or val is None:
        return sub, step, {}
    before = float(validation.info["loss_before"])
    after = parts.predictor_validation_loss(module, space, step.dz, val, comm)
    guard: dict[str, Any] = {"loss_before": before, "loss_after_first_choice": after}
    if after < before:
        guard["outcome"] = "kept: the step lowered the validation loss"
        return sub, step, guard
    sub, step = one_shot(validation.selection)
    again = parts.predictor_validation_loss(module, space, step.dz, val, comm)
    guard["loss_after_validation_choice"] = again
    if again < before:
        guard["outcome"] = "the held-out-rows or GCV choice raised the validation loss; chosen on the validation points"
        return sub, step, guard
    guard["outcome"] = "no step lowered the validation loss"
    sub = dataclasses.replace(sub, rank=0, dz=None, basis=None, z=None)
    return sub, ExactStep(None, ops.f0, ops.f0, {"ran": False, "reason": "no step (validation guard)"}), guard
