"""Iterative LSR (I-LSR, ``lsr iterate``): push the LSR gain back into the network's weights.

Each outer iteration (METHOD.md §3, with the fit measured best in issue 22):

1. one-shot LSR of the physics residual at the current weights θ → step ``δ``, guarded as
   ``lsr refine`` guards it (``pde.validation``: a rank the held-out rows chose is kept only if
   the predictor's residual at fresh validation points falls, else it is chosen there; no step
   that lowers it ends the loop);
2. target ``u* = q(θ, x) + J(x) δ`` at every collocation point (detached): the refined
   predictor, orders of magnitude more accurate than the network;
3. fit the network to it by Levenberg–Marquardt with geodesic acceleration in the top
   ``iterate.gauss_newton_rank`` right singular directions of the output Jacobian, re-linearized
   every step (:func:`~.iterate_fit.gauss_newton_fit`); optionally (``iterate.lbfgs_iterations``)
   L-BFGS on the pseudo-time loss ``Σ_pde ‖s_b (r_b(θ) + (q(θ, x) − u*) / Δτ)‖² + Σ_other ‖s_b r_b(θ)‖²``.

   Measured (docs/benchmarks/plain_network.md): on a 2-32-1 Poisson PINN the fit reaches the
   predictor to ~1e-5 in one iteration and the network's error falls 3 000× in six, where plain
   Gauss–Newton steps on the physics residual itself (dense, with a line search) stall at the
   Adam start and L-BFGS crawls.
4. the iteration is kept only if the network's exact residual at fresh validation points
   (:mod:`.validation`, as one-shot PDE refinement draws them; ``iterate.select``) falls; a
   rejected or non-finite iteration is undone, so the written network is the best seen and
   never worse than the input.

5. an iteration that lowers the criterion less than 2× (or is rejected) is followed by a physics
   pass (:mod:`.iterate_physics`, ``iterate.physics``): Levenberg–Marquardt on the network's own
   residual at the fit points and fresh points, kept by the same rule; passes go on while they
   are kept. Far from the solution of a nonlinear equation the LSR predictor is a poor guide
   (a Burgers PINN at 1.5e-1: 1.01× per iteration); the physics pass is not.

Systems and inverse problems: the fit targets are every output column of the predictor at
every block's points (the row groups of a system's block share them: fitted once); unknown
constants (``pde.unknowns``, the extra columns of :class:`~.unknowns.WithUnknowns`) take
their LSR step ``ν ← ν + δν`` directly — parameters, not outputs, so not fitted — and are kept
or undone with the network.

The loop stops at the iteration cap, when the fit is below ``iterate.tolerance``, after
``iterate.patience`` rejected iterations, or at the wall-time budget ``iterate.time_limit``: every
fit stops at it, and no iteration starts when the time left is below its LSR step and evaluation
and a quarter of its fit (each as long as the longest so far).
Nothing here prints; the CLI writes the network and the per-iteration report.

The parts: :mod:`.iterate_step` (the guarded LSR step and the fit targets), :mod:`.iterate_fit`
(the fit), :mod:`.iterate_parts` (reference errors, unknown constants, validation set, criterion).

Distributed (``comm`` with several ranks, ``problem`` sharded by
:meth:`~.problem.PdeProblem.shard`): each rank holds its share of every block's points and
a replica of the network. Everything that sums over points is all-reduced — the LSR step
(:func:`~.refine_pde.lsr_step`), the L-BFGS loss and gradient, the Levenberg–Marquardt
sketch, reduced QR triangles and misfits, every distance, loss and reference error — so
every rank takes the same decisions and the same steps, and the replicas stay identical.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lsr_cli.checkpoint import LoadedCheckpoint, require_plain_network
from lsr_cli.config import Config
from lsr_cli.distributed import SINGLE, Comm, global_mean_square
from lsr_cli.errors import ConfigError
from lsr_cli.linearization import ParameterSpace
from lsr_cli.metrics import describe_change, format_error
from lsr_cli.prepare import predict
from lsr_cli.runtime import NoProgress, ProgressSink, no_tf32, peak_memory_bytes, start_run

from .iterate_fit import align, gauss_newton_fit, out_of_time
from .iterate_parts import (
    CRITERIA,
    broadcast_parameters,
    component_errors,
    criterion_value,
    distance,
    fit_points,
    fresh_points,
    reference_errors,
    validation_set,
)
from .iterate_physics import physics_pass
from .iterate_step import Targets, lsr_targets
from .problem import PdeProblem, resample
from .refine_pde import (
    block_losses,
    build_operators,
    prepare_pde_run,
)
from .residual import ResidualOperators
from .system_report import unknowns_message
from .unknowns import WithUnknowns, select_space, unknowns_report

__all__ = ["IterateResult", "align", "gauss_newton_fit", "iterate"]


@dataclass
class IterateResult:
    """The best network, the per-iteration history and the errors before/after."""

    status: str
    message: str
    module: nn.Module  # best network (refinement dtype)
    best_iteration: int
    history: list[dict[str, Any]]
    errors: dict[str, dict[str, Any]]
    residual_blocks: dict[str, dict[str, float]]
    residual_loss: dict[str, float]
    timings: dict[str, float]
    num_parameters: int
    num_residuals: int
    device: str
    dtype: str
    peak_memory_bytes: int
    peak_memory_kind: str
    stop_reason: str
    warnings: list[str] = field(default_factory=list)
    selection: dict[str, Any] = field(default_factory=dict)
    unknowns: dict[str, dict[str, Any]] = field(default_factory=dict)  # pde.unknowns: before/after per constant


def _fit_network(
    module: nn.Module,
    network: nn.Module,
    problem: PdeProblem,
    targets: list[Tensor],
    cfg: Config,
    gen: torch.Generator,
    comm: Comm,
    frozen: list[str],
    time_limit: float,
) -> dict[str, Any]:
    """Fit the network to the predictor (Levenberg–Marquardt, then the optional L-BFGS pass, kept
    only if it brought the network closer); returns the report's ``alignment`` entry."""
    it_cfg = cfg.iterate
    t0 = time.perf_counter()
    points, target = torch.cat(fit_points(problem)), torch.cat(targets)
    gn_steps = (
        gauss_newton_fit(network, points, target, cfg, gen, comm, time_limit=time_limit, frozen=frozen)
        if it_cfg.gauss_newton_steps > 0
        else 0
    )
    evaluations, align_loss, lbfgs_kept, lbfgs_stopped = 0, math.nan, False, False
    if it_cfg.lbfgs_iterations > 0:
        before_lbfgs = copy.deepcopy(module.state_dict())
        fit_before = distance(predict(module, (points,), 4096).reshape(-1), target, comm)
        left = time_limit - (time.perf_counter() - t0)
        evaluations, align_loss, lbfgs_stopped = align(module, problem, targets, cfg, comm, left)
        # the L-BFGS pass minimizes the pseudo-time loss, which also weighs the network's own
        # PDE residual: keep it only if it brought the network closer to the LSR predictor
        # (a pass that the time left did not allow one evaluation changed nothing: not "kept")
        closer = distance(predict(module, (points,), 4096).reshape(-1), target, comm) <= fit_before
        lbfgs_kept = evaluations > 0 and closer
        if not lbfgs_kept:
            module.load_state_dict(before_lbfgs)
    broadcast_parameters(module, comm)
    fit = distance(predict(network, (points,), 4096).reshape(-1), target, comm)
    return {
        "relative_fit": fit,
        "loss": align_loss,
        "gauss_newton_steps": gn_steps,
        "lbfgs_evaluations": evaluations,
        "lbfgs_kept": lbfgs_kept,
        "lbfgs_stopped_at_time_limit": lbfgs_stopped,
    }


@dataclass
class _Kept:
    """The kept network: its iteration, weights, residual loss, per-block losses and criterion
    (the start is one, at iteration ``start − 1``)."""

    iteration: int
    state: dict[str, Any]
    loss: float
    blocks: dict[str, float]
    criterion: float


MIN_FIT_FRACTION = 0.25
"""An iteration starts only if the time left holds its LSR step, its evaluation and this fraction
of its fit (each as long as the longest so far): the fit stops at the limit, and its first steps
gain the most (measured on the Helmholtz PINN: 0.0 → 1.3 of 4.3 decades of the network's error
in the first 5 of 40 steps)."""


@dataclass
class _Budget:
    """``iterate.time_limit`` (seconds from the start of :func:`iterate`; ``inf``: none) and the
    longest LSR step, fit and evaluation so far, by which the next iteration is predicted."""

    limit: float
    t0: float = field(default_factory=time.perf_counter)
    longest: dict[str, float] = field(default_factory=lambda: {"lsr": 0.0, "fit": 0.0, "evaluation": 0.0})

    def record(self, lsr: float, fit: float, evaluation: float) -> None:
        for key, value in (("lsr", lsr), ("fit", fit), ("evaluation", evaluation)):
            self.longest[key] = max(self.longest[key], value)

    def needed(self) -> float:
        """The seconds the next iteration needs at least (0 before the first)."""
        return self.longest["lsr"] + self.longest["evaluation"] + MIN_FIT_FRACTION * self.longest["fit"]

    def next_would_overrun(self, comm: Comm) -> bool:
        """Whether the time left is below :meth:`needed` (on any rank: every rank stops alike)."""
        if math.isinf(self.limit) or self.needed() == 0.0:
            return False
        return out_of_time(time.perf_counter() - self.t0 + self.needed(), self.limit, comm)

    def stage_deadline(self) -> float:
        """When the LSR step's exact-residual stage must stop: after :data:`EXACT_STAGE_SHARE` of the
        time left, so that the fit keeps the rest (``inf`` without a limit)."""
        if math.isinf(self.limit):
            return math.inf
        now = time.perf_counter()
        return now + EXACT_STAGE_SHARE * max(0.0, self.limit - (now - self.t0))

    def fit_limit(self) -> float:
        """Seconds the fit may take: what is left, less the longest evaluation so far."""
        if math.isinf(self.limit):
            return math.inf
        return max(0.0, self.limit - (time.perf_counter() - self.t0) - self.longest["evaluation"])


EXACT_STAGE_SHARE = 0.4
"""The LSR step's exact-residual stage (``lsr refine``'s, at most a few times LSR's own time) takes
at most this share of the time left under ``iterate.time_limit``: the fit needs the rest."""

PHYSICS_TRIGGER = 2.0
"""An LSR iteration that lowers the kept criterion less than this factor (or is rejected) is
followed by a physics pass (``iterate.physics``); physics passes go on while they are kept."""


def _keep_or_restore(
    k: int,
    module: nn.Module,
    net: tuple[float, dict[str, float], float, dict[str, Any] | None],
    threshold: float,
    best: _Kept,
) -> tuple[_Kept, bool]:
    """Iteration ``k``'s network (evaluated as ``net``) is kept when its loss and criterion are
    finite and the criterion is below ``threshold``; otherwise the weights go back to ``best``'s,
    where the next iteration starts. The kept network after it, and whether it was this one."""
    net_loss, net_blocks, crit, _ = net
    if math.isfinite(net_loss) and math.isfinite(crit) and crit < threshold:
        return _Kept(k, copy.deepcopy(module.state_dict()), net_loss, net_blocks, crit), True
    module.load_state_dict(best.state)
    return best, False


def _physics_iteration(
    k: int,
    module: nn.Module,
    problem: PdeProblem,
    val: PdeProblem | None,
    cfg: Config,
    gen: torch.Generator,
    comm: Comm,
    budget: _Budget,
    t0: float,
    best: _Kept,
) -> tuple[dict[str, Any], _Kept, bool]:
    """Iteration ``k`` as a physics pass (:mod:`.iterate_physics`) from the kept network ``best``:
    its report entry, the kept network after it and whether the pass was kept (else the weights
    are restored to ``best``'s)."""
    fresh, added = fresh_points(problem, cfg, comm, k, module)
    info = physics_pass(module, problem, val, cfg, gen, comm, budget.fit_limit(), fresh)
    info["points_added"] = added
    t1 = time.perf_counter()
    net = _evaluate(module, problem, val, cfg, comm, math.nan)
    t2 = time.perf_counter()
    budget.record(0.0, t1 - t0, t2 - t1)
    net_loss, net_blocks, crit, net_ref = net
    best, kept = _keep_or_restore(k, module, net, best.criterion, best)
    entry: dict[str, Any] = {
        "iteration": k,
        "step": "physics",
        "rank": None,
        "residual_loss": {"linearized": None, "network": net_loss},
        "blocks": {name: {"network": net_blocks[name]} for name in net_blocks},
        "reference_rel_l2": {"linearized": None, "network": net_ref["rel_l2"] if net_ref else None},
        "network_error_estimate": None,
        "criterion": {"name": cfg.iterate.select, "value": crit, "kept": kept},
        "physics": info,
        "alignment": {"relative_fit": None, "gauss_newton_steps": info["steps"]},
        "seconds": {"lsr": 0.0, "align": t1 - t0, "total": t2 - t0},
    }
    if isinstance(module, WithUnknowns):  # pde.unknowns: the values after the pass (as kept)
        entry["unknowns"] = module.values()
    return entry, best, kept


def _lsr_iteration(
    k: int,
    module: nn.Module,
    network: nn.Module,
    problem: PdeProblem,
    space: ParameterSpace,
    ops: ResidualOperators,
    val: PdeProblem | None,
    cfg: Config,
    gen: torch.Generator,
    comm: Comm,
    frozen: list[str],
    budget: _Budget,
    t0: float,
    best: _Kept,
) -> tuple[dict[str, Any], _Kept, bool, bool, dict[str, float]]:
    """Iteration ``k`` as an LSR step: the predictor's targets, the network fitted to them and
    judged. Its report entry, the kept network after it, whether it was kept (else the weights
    are restored to ``best``'s), whether LSR kept the input (no step) and its stages' seconds."""
    t = lsr_targets(module, problem, space, ops, cfg, gen, comm, budget.stage_deadline())
    t1 = time.perf_counter()
    alignment = _fit_network(module, network, problem, t.targets, cfg, gen, comm, frozen, budget.fit_limit())
    t2 = time.perf_counter()
    net = _evaluate(module, problem, val, cfg, comm, alignment["relative_fit"])
    # monotone: kept only if the criterion fell (for `distance`: below the incoming network's)
    threshold = t.estimate if cfg.iterate.select == "distance" else best.criterion
    best, kept = _keep_or_restore(k, module, net, threshold, best)
    t3 = time.perf_counter()
    budget.record(t1 - t0, t2 - t1, t3 - t2)
    entry = _entry(k, t, net, kept, alignment, {"lsr": t1 - t0, "align": t2 - t1, "total": t3 - t0}, cfg)
    if isinstance(module, WithUnknowns):  # pde.unknowns: this iteration's values (kept or not)
        entry["unknowns"] = module.values()
    return entry, best, kept, t.sub.dz is None, {"lsr": t1 - t0, "align": t2 - t1, "evaluate": t3 - t2}


def _stop_reason_for_budget(budget: _Budget) -> str:
    return (
        f"iterate.time_limit ({budget.limit:g} s): the time left is below what the next iteration needs at least "
        f"({budget.needed():.0f} s: the longest LSR step and evaluation, {MIN_FIT_FRACTION:g} of the longest fit)"
    )


def _evaluate(
    module: nn.Module,
    problem: PdeProblem,
    val: PdeProblem | None,
    cfg: Config,
    comm: Comm,
    fit: float,
) -> tuple[float, dict[str, float], float, dict[str, Any] | None]:
    """The fitted network's weighted residual loss at the fit points, per block, the criterion
    that keeps it (``inf`` when the residual is not finite) and its reference errors."""
    with torch.no_grad():
        f_net = torch.cat([b.residual(module, b.inputs).reshape(-1) for b in problem.blocks])
    net_loss = global_mean_square(f_net, comm)
    net_blocks = block_losses(f_net, problem, comm)
    if not math.isfinite(net_loss):
        return net_loss, net_blocks, math.inf, None
    crit = criterion_value(cfg.iterate.select, val, module, net_loss, fit, comm)
    return net_loss, net_blocks, crit, reference_errors(module, problem, comm=comm)


def _entry(
    k: int,
    t: Targets,
    net: tuple[float, dict[str, float], float, dict[str, Any] | None],
    kept: bool,
    alignment: dict[str, Any],
    seconds: dict[str, float],
    cfg: Config,
) -> dict[str, Any]:
    """The report's record of iteration ``k``."""
    net_loss, net_blocks, crit, net_ref = net
    return {
        "iteration": k,
        "step": "lsr",
        "rank": t.sub.rank,
        "residual_loss": {"linearized": t.lin_loss, "network": net_loss},
        "blocks": {name: {"network": net_blocks[name]} for name in net_blocks},
        "reference_rel_l2": {
            "linearized": t.lin_ref["rel_l2"] if t.lin_ref else None,
            "network": net_ref["rel_l2"] if net_ref else None,
        },
        "network_error_estimate": t.estimate,
        "criterion": {"name": cfg.iterate.select, "value": crit, "kept": kept},
        "nonlinear": {
            key: t.nonlinear[key]
            for key in ("ran", "reason", "iterations", "monitor_start", "monitor_best", "time", "time_limit")
            if key in t.nonlinear
        },
        "guard": t.guard,
        "alignment": alignment,
        "seconds": seconds,
    }


def iterate(
    ckpt: LoadedCheckpoint,
    problem: PdeProblem,
    cfg: Config,
    progress: ProgressSink | None = None,
    data_path: Path | None = None,
    base_dir: Path | None = None,
    start_iteration: int = 0,
    on_iteration: Callable[[dict[str, Any]], None] | None = None,
    comm: Comm = SINGLE,
) -> IterateResult:
    """Run I-LSR from ``ckpt`` (a plain network); see the module docstring.

    Distributed (``comm``): ``problem`` holds this rank's share of the points; every rank
    returns the same network and history."""
    require_plain_network(ckpt)
    budget = _Budget(cfg.iterate.time_limit if cfg.iterate.time_limit is not None else math.inf)
    sink = progress or NoProgress()
    dtype, device, gen = start_run(cfg.dtype, cfg.device, cfg.seed)
    it_cfg = cfg.iterate
    timings = {"lsr": 0.0, "align": 0.0, "evaluate": 0.0, "physics": 0.0}
    history: list[dict[str, Any]] = []
    warnings: list[str] = []
    _check_lbfgs(problem, cfg)
    with no_tf32():
        module, space, ops = prepare_pde_run(ckpt, problem, cfg, dtype, device, gen, comm)
        # pde.unknowns: the wrapper's extra columns are the constants; the fit sees the network alone
        network = module.net if isinstance(module, WithUnknowns) else module
        frozen = [path.removeprefix("net.") for path in getattr(module, "paths", [])]
        values_start = module.values() if isinstance(module, WithUnknowns) else {}
        val, val_info = validation_set(problem, cfg, comm) if it_cfg.select == "validation" else (None, {})
        start_loss = global_mean_square(ops.f0, comm)
        start_errors = component_errors(module, problem, comm=comm)
        start_blocks = block_losses(ops.f0, problem, comm)
        start_crit = criterion_value(it_cfg.select, val, module, start_loss, math.inf, comm)
        best = _Kept(start_iteration - 1, copy.deepcopy(module.state_dict()), start_loss, start_blocks, start_crit)
        stale, direct = 0, False
        stop_reason = f"reached iterate.iterations = {it_cfg.iterations}"
        advance = sink.begin("I-LSR iterations", it_cfg.iterations)

        def record(entry: dict[str, Any]) -> None:
            history.append(entry)
            if on_iteration is not None:
                on_iteration(entry)
            advance(1)

        for k in range(start_iteration, start_iteration + it_cfg.iterations):
            if budget.next_would_overrun(comm):
                stop_reason = _stop_reason_for_budget(budget)
                break
            t0 = time.perf_counter()
            if it_cfg.resample and k > start_iteration:
                resample(problem, gen, data_path, base_dir, comm.rank, comm.world)
            if direct:  # the last LSR iteration gained too little: a physics pass instead
                entry, best, kept = _physics_iteration(k, module, problem, val, cfg, gen, comm, budget, t0, best)
                stale, direct = (0, True) if kept else (stale + 1, False)  # not kept: an LSR step next
                timings["physics"] += entry["seconds"]["total"]
                record(entry)
                if stale >= it_cfg.patience:
                    stop_reason = f"the {CRITERIA[it_cfg.select]} did not fall for {stale} iterations"
                    break
                continue
            before = best.criterion
            if k > start_iteration:  # the first iteration uses the operators built at the start
                space = select_space(module, cfg, gen)
                ops = build_operators(module, problem, space, cfg, comm=comm)
            entry, best, kept, no_step, seconds = _lsr_iteration(
                k, module, network, problem, space, ops, val, cfg, gen, comm, frozen, budget, t0, best
            )
            stale = 0 if kept else stale + 1
            timings.update({key: timings[key] + value for key, value in seconds.items()})
            record(entry)
            if not math.isfinite(entry["residual_loss"]["network"]):
                warnings.append(f"non-finite residual at iteration {k}: the step was rejected")
            # a weak LSR iteration (the criterion fell less than PHYSICS_TRIGGER×): a physics pass next
            direct = it_cfg.physics and (not kept or before < PHYSICS_TRIGGER * entry["criterion"]["value"])
            if no_step and not it_cfg.resample and not direct:
                stop_reason = "no LSR step lowered the residual at the validation points (the pde.validation guard)"
                break
            fit = entry["alignment"]["relative_fit"]
            if kept and fit <= it_cfg.tolerance:
                stop_reason = f"the network fits the LSR predictor to {fit:.3e} (iterate.tolerance)"
                break
            if stale >= it_cfg.patience:
                stop_reason = f"the {CRITERIA[it_cfg.select]} did not fall for {stale} iterations"
                break
        sink.end()
        module.load_state_dict(best.state)
        final_errors = component_errors(module, problem, comm=comm)

    unknowns = _unknowns_after(module, problem, values_start, space)
    criterion = CRITERIA[it_cfg.select]
    if it_cfg.select == "validation" and val is None:
        criterion = CRITERIA["residual"] + " (no validation points: " + str(val_info.get("source", "none")) + ")"
    errors = _errors(start_errors, final_errors)
    status, message = _summary(errors, best, start_iteration, start_loss, start_crit, criterion, it_cfg.select)
    if unknowns:
        message += f"; {unknowns_message(unknowns)}"
    peak, kind = peak_memory_bytes(device)
    return IterateResult(
        status,
        message,
        network,
        best.iteration,
        history,
        errors,
        {n: {"before": b, "after": best.blocks[n]} for n, b in start_blocks.items()},
        {"before": start_loss, "after": best.loss},
        timings,
        sum(p.numel() for p in module.parameters()),
        comm.sum_int(problem.num_rows),
        str(device),
        cfg.dtype,
        peak,
        kind,
        stop_reason,
        warnings,
        {"criterion": criterion, "start": start_crit, "kept": best.criterion, "validation": val_info},
        unknowns,
    )


def _check_lbfgs(problem: PdeProblem, cfg: Config) -> None:
    """The pseudo-time L-BFGS pass fits one output column and no unknown constants."""
    if cfg.iterate.lbfgs_iterations > 0 and (len(problem.outputs) > 1 or problem.unknowns):
        raise ConfigError(
            "config.iterate.lbfgs_iterations: the pseudo-time L-BFGS pass needs one output and no "
            f"pde.unknowns (this problem has outputs {problem.outputs}); set it to 0"
        )


def _unknowns_after(
    module: nn.Module, problem: PdeProblem, values_start: dict[str, float], space: ParameterSpace
) -> dict[str, dict[str, Any]]:
    """``pde.unknowns``: each constant's value before, its kept step and value after (empty without)."""
    if not isinstance(module, WithUnknowns):
        return {}
    values_end = module.values()
    steps = {name: values_end[name] - values_start[name] for name in values_start}
    unknowns = unknowns_report(problem.unknowns, values_start, steps, space)
    for name, entry in unknowns.items():
        entry["after"] = values_end[name]  # exactly the kept value (before + step rounds)
    return unknowns


def _errors(
    start: tuple[dict[str, Any], dict[str, Any]] | None, final: tuple[dict[str, Any], dict[str, Any]] | None
) -> dict[str, dict[str, Any]]:
    """The reference errors before/after, over every compared column and per component."""
    errors: dict[str, dict[str, Any]] = {}
    if start is not None and final is not None:
        errors["reference"] = {"before": start[0], "after": final[0]}
        if start[1]:
            errors["components"] = {name: {"before": start[1][name], "after": final[1][name]} for name in start[1]}
    return errors


def _summary(
    errors: dict[str, dict[str, Any]],
    best: _Kept,
    start_iteration: int,
    start_loss: float,
    start_crit: float,
    criterion: str,
    select: str,
) -> tuple[str, str]:
    """The status and the one-paragraph message, in the order a user judges the run: the
    reference error, the criterion, the residual loss."""
    ref = errors.get("reference")
    if best.iteration < start_iteration:
        message = f"no iteration lowered the {criterion}; the network is unchanged"
        if ref is not None:
            b0 = ref["before"]["rel_l2"]
            message = (
                f"the network's reference rel L2 error {format_error(b0)} -> {format_error(b0)} (unchanged); " + message
            )
        return "unchanged", message
    parts = []
    if ref is not None:
        b, a = ref["before"]["rel_l2"], ref["after"]["rel_l2"]
        parts.append(
            f"the network's reference rel L2 error {format_error(b)} -> {format_error(a)} ({describe_change(b, a)})"
        )
    chosen = f"kept iteration {best.iteration}, chosen by its {criterion}"
    if select != "distance":
        chosen += f" ({best.criterion:.3g} vs {start_crit:.3g} at the start)"
    parts.append(chosen)
    change = describe_change(start_loss, best.loss)
    if best.loss > start_loss:
        change += f"; the kept network is chosen by its {criterion}, not by its residual loss at the fit points"
    parts.append(f"weighted residual loss {format_error(start_loss)} -> {format_error(best.loss)} ({change})")
    return "improved", "; ".join(parts)
