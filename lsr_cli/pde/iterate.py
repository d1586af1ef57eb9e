"""Iterative LSR (I-LSR, ``lsr iterate``): push the LSR gain back into the network's weights.

Each outer iteration (METHOD.md §3):

1. one-shot LSR of the physics residual at the current weights θ → step ``δ``;
2. target ``u* = q(θ, x) + J(x) δ`` at every collocation point (detached);
3. align the network to it with L-BFGS (strong Wolfe line search, float64), minimizing

   ``Σ_pde ‖s_b (r_b(θ) + (q(θ, x) − u*) / Δτ)‖² + Σ_other ‖s_b r_b(θ)‖²``  (mean over rows)

   — an implicit pseudo-time step anchored at the LSR predictor: a small ``Δτ`` makes it a
   well-conditioned supervised fit, a larger one keeps more of the physics.

The best network (lowest weighted residual loss) is kept; the loop stops at the iteration
cap, when the loss is below ``iterate.tolerance``, after ``iterate.patience`` iterations
without improvement, or on a non-finite value (the best network so far is kept). Nothing
here prints; the CLI writes the network and the per-iteration report.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lsr_cli.checkpoint import LoadedCheckpoint
from lsr_cli.config import Config
from lsr_cli.distributed import SINGLE, Comm, global_mean_square, global_norm, merge_accumulators
from lsr_cli.errors import CheckpointError
from lsr_cli.linearization import JacobianOperator, ParameterSpace
from lsr_cli.metrics import describe_change, format_error, global_error_metrics
from lsr_cli.refine import predict, select_parameters
from lsr_cli.runtime import NoProgress, ProgressSink, no_tf32, peak_memory_bytes, start_run
from lsr_cli.sketch import RangeSketch
from lsr_cli.solve import QRAccumulator

from .problem import PdeProblem, resample
from .refine_pde import block_losses, build_operators, exact_step, lsr_step, prepare_pde_run


@dataclass
class IterateResult:
    """The best network, the per-iteration history and the errors before/after."""

    status: str
    message: str
    module: nn.Module  # best network (refinement dtype)
    best_iteration: int
    history: list[dict[str, Any]]
    errors: dict[str, dict[str, dict[str, float | None]]]
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


def _alignment_sums(module: nn.Module, problem: PdeProblem, targets: list[Tensor], dtau: float) -> tuple[Tensor, int]:
    """Sum of squares of the alignment residual over this process's rows, and their count."""
    total = torch.zeros((), dtype=targets[0].dtype, device=targets[0].device)
    rows = 0
    for block, u_star in zip(problem.blocks, targets, strict=True):
        r = block.residual(module, block.inputs)
        if block.kind == "pde":
            u = module(block.points).reshape(-1)
            r = r + block.scale * (u - u_star) / dtau
        total = total + (r * r).sum()
        rows += r.shape[0]
    return total, rows


def _alignment_loss(
    module: nn.Module, problem: PdeProblem, targets: list[Tensor], dtau: float, comm: Comm = SINGLE
) -> Tensor:
    """The alignment loss (mean over the rows of every rank). Distributed: this rank's sum of
    squares over the global row count, so that its gradient summed over ranks is the loss's."""
    total, rows = _alignment_sums(module, problem, targets, dtau)
    if comm.world == 1:
        return total / rows
    return total / comm.sum_int(rows)


def _global_loss(local: Tensor, comm: Comm) -> Tensor:
    """The sum over ranks of each rank's share of the loss (``local`` itself on one process)."""
    if comm.world == 1:
        return local
    return comm.allreduce_sum(local.detach().reshape(1))[0]


def _allreduce_grads(params: Sequence[Tensor], comm: Comm) -> None:
    """Replace every ``.grad`` by its sum over ranks (one all-reduce of the flat gradient)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = comm.allreduce_sum(torch.cat([g.reshape(-1) for g in grads]))
    start = 0
    for p in params:
        n = p.numel()
        p.grad = flat[start : start + n].view_as(p).clone()
        start += n


def align(
    module: nn.Module, problem: PdeProblem, targets: list[Tensor], cfg: Config, comm: Comm = SINGLE
) -> tuple[int, float]:
    """L-BFGS (strong Wolfe) on the pseudo-time alignment loss; returns (evaluations, final loss).

    Distributed: the closure returns the global loss and sets every ``.grad`` to the global
    gradient (all-reduced), so L-BFGS, deterministic given its closure, takes the same steps
    on every rank."""
    params = [p for p in module.parameters() if p.is_floating_point()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=cfg.iterate.lbfgs_iterations,
        history_size=cfg.iterate.history_size,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-14,
        tolerance_change=1e-16,
    )
    evaluations = 0

    def closure() -> Tensor:
        nonlocal evaluations
        evaluations += 1
        opt.zero_grad()
        loss = _alignment_loss(module, problem, targets, cfg.iterate.dtau, comm)
        loss.backward()
        if comm.world == 1:
            return loss
        _allreduce_grads(params, comm)
        return _global_loss(loss, comm)

    with torch.enable_grad():
        opt.step(closure)
        final = _global_loss(_alignment_loss(module, problem, targets, cfg.iterate.dtau, comm), comm)
    return evaluations, float(final.detach())


def _sum_squares(r: Tensor, comm: Comm) -> float:
    """``‖r‖²`` over the rows of every rank (``float(r @ r)`` on one process)."""
    if comm.world == 1:
        return float(r @ r)
    return comm.sum_float(float(torch.sum(r.to(torch.float64) ** 2)))


def gauss_newton_fit(
    module: nn.Module, points: Tensor, target: Tensor, cfg: Config, gen: torch.Generator, comm: Comm = SINGLE
) -> int:
    """Levenberg–Marquardt on ``‖q(θ, x) − u*‖²`` in sketched parameter subspaces; returns the
    number of accepted steps.

    Each step sketches the output Jacobian at the current weights (``iterate.gauss_newton_rank``
    orthonormal parameter directions ``W``), solves the damped problem
    ``min_z ‖q + J W z − u*‖² + μ s_max² ‖z‖²`` by SVD in float64, and accepts ``θ + W z`` only
    if the nonlinear misfit falls (else μ grows ×4; after a success it shrinks ÷3). Unlike the
    linearized step of LSR, every accepted step is a real network, so this pulls the network
    towards the LSR predictor far faster than first-order methods on the same ill-conditioned fit.

    Distributed (``points``/``target``: this rank's rows): the sketch is global
    (:class:`~lsr_cli.sketch.RangeSketch` with ``comm``), the SVD is that of the ``R`` factor
    of ``[J W | q − u*]`` merged over ranks (:func:`~lsr_cli.distributed.merge_accumulators`),
    the misfits are all-reduced, and the step ``z`` is broadcast from rank 0.
    """
    it = cfg.iterate
    mu = 1e-3
    accepted = 0
    previous = math.inf
    for _ in range(it.gauss_newton_steps):
        named = {n: p.detach().clone() for n, p in module.named_parameters()}
        space = ParameterSpace(named)
        op = JacobianOperator(module, space, (points,), 1024, cfg.lsr.tangent_chunk)
        sketch = RangeSketch(op, gen, points.dtype, points.device, comm=comm)
        sketch.extend(it.gauss_newton_rank + cfg.lsr.oversampling)
        k = min(it.gauss_newton_rank, sketch.usable_rank())
        if k == 0:
            break
        P, S = sketch.basis(k)
        W = P * S  # orthonormal directions in parameter space
        A = op.matmat(W).to(torch.float64)
        res = (op.forward() - target).to(torch.float64)
        if comm.world == 1:
            U, s, Vh = torch.linalg.svd(A, full_matrices=False)
            c = U.T @ res
        else:  # A = Q R over every rank's rows: the SVD of R, and Qᵀ res from the augmented triangle
            acc = QRAccumulator(A.shape[1], A.device)
            acc.add(A, res)
            R, q, _ = merge_accumulators(acc, comm).parts()
            U, s, Vh = torch.linalg.svd(R, full_matrices=False)
            c = U.T @ q
        base = _sum_squares(res, comm)
        step_taken = False
        while mu <= 1e6:
            z = -(Vh.T @ (s / (s * s + mu * s[0] ** 2) * c))
            if comm.world > 1:
                z = comm.broadcast(z)
            step = space.unflatten_vector(W @ z.to(W.dtype))
            trial = {n: named[n] + step[n] for n in named}
            new = op.forward(trial) - target
            if _sum_squares(new, comm) < base:
                with torch.no_grad():
                    for n, p in module.named_parameters():
                        p.copy_(trial[n])
                mu = max(mu / 3, 1e-12)
                step_taken = True
                break
            mu *= 4
        if not step_taken:
            break
        accepted += 1
        if base > (1.0 - 1e-3) * previous:  # stalled
            break
        previous = base
    return accepted


def _reference_errors(
    module: nn.Module, problem: PdeProblem, dz_u: Tensor | None = None, comm: Comm = SINGLE
) -> dict[str, float | None] | None:
    if problem.reference is None:
        return None
    x_ref, u_ref = problem.reference
    u = predict(module, (x_ref,), 4096).reshape(u_ref.shape)
    if dz_u is not None:
        u = u + dz_u.reshape(u_ref.shape)
    return global_error_metrics(u, u_ref, comm)


def _distance(u: Tensor, target: Tensor, comm: Comm = SINGLE) -> float:
    """``‖u − u*‖ / ‖u*‖`` over the rows of every rank."""
    if comm.world == 1:
        return float(torch.linalg.norm(u - target) / torch.linalg.norm(target).clamp_min(1e-300))
    return global_norm(u - target, comm) / max(global_norm(target, comm), 1e-300)


def _broadcast_parameters(module: nn.Module, comm: Comm) -> None:
    """Rank 0's weights on every rank (they are equal already: the steps are; this keeps
    round-off differences of the collectives from ever drifting the replicas apart)."""
    if comm.world == 1:
        return
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(comm.broadcast(p.detach()))


def _select(
    module: nn.Module,
    problem: PdeProblem,
    candidates: list[tuple[int, dict[str, Tensor], float, dict[str, float]]],
    targets: list[Tensor],
    select: str,
    comm: Comm = SINGLE,
) -> tuple[int, dict[str, Tensor], float, dict[str, float], dict[int, float]]:
    """The kept network: closest to the last LSR predictor (``distance``, reference-free and far
    more accurate than any network), or lowest weighted residual loss (``residual``)."""
    distances: dict[int, float] = {}
    if targets:
        target = torch.cat(targets)
        for k, state, _, _ in candidates:
            module.load_state_dict(state)
            distances[k] = _distance(
                torch.cat([predict(module, (b.points,), 4096).reshape(-1) for b in problem.blocks]), target, comm
            )
    if select == "distance" and distances:
        k, state, loss, blocks = min(candidates, key=lambda c: distances[c[0]])
    else:
        k, state, loss, blocks = min(candidates, key=lambda c: c[2])
    return k, state, loss, blocks, distances


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
    if ckpt.delta is not None:
        raise CheckpointError(
            f"{ckpt.path}: `lsr iterate` starts from a plain network, not from a refined "
            "(linearized) checkpoint; pass the network that was refined"
        )
    sink = progress or NoProgress()
    dtype, device, gen = start_run(cfg.dtype, cfg.device, cfg.seed)
    it_cfg = cfg.iterate
    timings = {"lsr": 0.0, "align": 0.0, "evaluate": 0.0}
    history: list[dict[str, Any]] = []
    warnings: list[str] = []
    with no_tf32():
        module, space, ops = prepare_pde_run(ckpt, problem, cfg, dtype, device, gen, comm)
        start_blocks = block_losses(ops.f0, problem, comm)
        start_loss = global_mean_square(ops.f0, comm)
        start_ref = _reference_errors(module, problem, comm=comm)
        # candidates: (iteration, weights, residual loss, per-block losses); the start is one of them
        candidates = [(start_iteration - 1, copy.deepcopy(module.state_dict()), start_loss, start_blocks)]
        best_estimate = math.inf
        stale = 0
        targets: list[Tensor] = []
        stop_reason = f"reached iterate.iterations = {it_cfg.iterations}"
        advance = sink.begin("I-LSR iterations", it_cfg.iterations)
        for k in range(start_iteration, start_iteration + it_cfg.iterations):
            t0 = time.perf_counter()
            if it_cfg.resample and k > start_iteration:
                resample(problem, gen, data_path, base_dir, comm.rank, comm.world)
            if k > start_iteration:  # the first iteration uses the operators built at the start
                space = select_parameters(module, cfg, gen)
                ops = build_operators(module, problem, space, cfg, comm=comm)
            sub = lsr_step(module, problem, space, ops, cfg, gen, NoProgress(), comm)
            # nonlinear equations: the predictor's exact residual, minimized in LSR's subspace
            step = exact_step(module, problem, space, ops, sub, cfg, comm)
            sub.dz, nonlinear = step.dz, step.info
            # the LSR predictor's residual: its own (exact) one when the stage ran, else f0 + G dz
            lin_loss_total = global_mean_square(step.f_after if nonlinear.get("ran") else step.f_lin, comm)
            targets = []
            u_now = []
            for block in problem.blocks:
                u = predict(module, (block.points,), 4096).reshape(-1)
                u_now.append(u)
                if sub.dz is not None:
                    u = u + JacobianOperator(module, space, (block.points,), 1024, cfg.lsr.tangent_chunk).matvec(sub.dz)
                targets.append(u.detach())
            # distance of the incoming network to the LSR predictor: an error estimate that needs no
            # reference (the predictor's residual is orders of magnitude below the network's)
            estimate = _distance(torch.cat(u_now), torch.cat(targets), comm)
            lin_ref = None
            if problem.reference is not None and sub.dz is not None:
                jr = JacobianOperator(module, space, (problem.reference[0],), 4096, cfg.lsr.tangent_chunk).matvec(
                    sub.dz
                )
                lin_ref = _reference_errors(module, problem, jr, comm)
            elif problem.reference is not None:
                lin_ref = _reference_errors(module, problem, comm=comm)
            t1 = time.perf_counter()
            timings["lsr"] += t1 - t0
            points = torch.cat([b.points for b in problem.blocks])
            target = torch.cat(targets)
            gn_steps = gauss_newton_fit(module, points, target, cfg, gen, comm) if it_cfg.gauss_newton_steps > 0 else 0
            before_lbfgs = copy.deepcopy(module.state_dict())
            fit_before = _distance(predict(module, (points,), 4096).reshape(-1), target, comm)
            evaluations, align_loss = align(module, problem, targets, cfg, comm)
            # the L-BFGS pass minimizes the pseudo-time loss, which also weighs the network's own
            # PDE residual: keep it only if it brought the network closer to the LSR predictor
            lbfgs_kept = _distance(predict(module, (points,), 4096).reshape(-1), target, comm) <= fit_before
            if not lbfgs_kept:
                module.load_state_dict(before_lbfgs)
            _broadcast_parameters(module, comm)
            t2 = time.perf_counter()
            timings["align"] += t2 - t1
            with torch.no_grad():
                f_net = torch.cat([b.residual(module, b.inputs).reshape(-1) for b in problem.blocks])
            net_loss = global_mean_square(f_net, comm)
            net_blocks = block_losses(f_net, problem, comm)
            u_all = torch.cat([predict(module, (b.points,), 4096).reshape(-1) for b in problem.blocks])
            u_star_all = torch.cat(targets)
            fit = _distance(u_all, u_star_all, comm)
            net_ref = _reference_errors(module, problem, comm=comm)
            timings["evaluate"] += time.perf_counter() - t2
            entry = {
                "iteration": k,
                "rank": sub.rank,
                "residual_loss": {"linearized": lin_loss_total, "network": net_loss},
                "blocks": {name: {"network": net_blocks[name]} for name in net_blocks},
                "reference_rel_l2": {
                    "linearized": lin_ref["rel_l2"] if lin_ref else None,
                    "network": net_ref["rel_l2"] if net_ref else None,
                },
                "network_error_estimate": estimate,
                "nonlinear": {
                    k2: nonlinear[k2]
                    for k2 in ("ran", "reason", "iterations", "monitor_start", "monitor_best", "time")
                    if k2 in nonlinear
                },
                "alignment": {
                    "relative_fit": fit,
                    "loss": align_loss,
                    "gauss_newton_steps": gn_steps,
                    "lbfgs_evaluations": evaluations,
                    "lbfgs_kept": lbfgs_kept,
                },
                "seconds": {"lsr": t1 - t0, "align": t2 - t1, "total": time.perf_counter() - t0},
            }
            history.append(entry)
            if on_iteration is not None:
                on_iteration(entry)
            advance(1)
            if not math.isfinite(net_loss):
                stop_reason = f"non-finite residual at iteration {k}; kept the best network so far"
                warnings.append(stop_reason)
                break
            candidates.append((k, copy.deepcopy(module.state_dict()), net_loss, net_blocks))
            if estimate < best_estimate:
                best_estimate, stale = estimate, 0
            else:
                stale += 1
            if fit <= it_cfg.tolerance:
                stop_reason = f"the network fits the LSR predictor to {fit:.3e} (iterate.tolerance)"
                break
            if stale >= it_cfg.patience:
                stop_reason = f"the network's distance to the LSR predictor did not fall for {stale} iterations"
                break
        sink.end()
        best_it, best_state, best_loss, best_blocks, distances = _select(
            module, problem, candidates, targets, it_cfg.select, comm
        )
        module.load_state_dict(best_state)
        final_ref = _reference_errors(module, problem, comm=comm)

    errors = {}
    if start_ref is not None and final_ref is not None:
        errors["reference"] = {"before": start_ref, "after": final_ref}
    residual_blocks = {n: {"before": start_blocks[n], "after": best_blocks[n]} for n in start_blocks}
    criterion = "distance to the last LSR predictor" if it_cfg.select == "distance" else "weighted residual loss"
    if best_it < start_iteration:
        status, message = "unchanged", f"no iteration improved the {criterion}; the network is unchanged"
    else:
        # in the order a user judges the run: the reference error, the criterion, the residual loss
        status = "improved"
        parts = []
        if "reference" in errors:
            b, a = start_ref["rel_l2"], final_ref["rel_l2"]  # type: ignore[index]
            parts.append(
                f"the network's reference rel L2 error {format_error(b)} -> {format_error(a)} ({describe_change(b, a)})"
            )
        chosen = f"kept iteration {best_it}, chosen by its {criterion}"
        if distances:
            chosen += f" ({distances[best_it]:.3g} vs {distances[start_iteration - 1]:.3g} at the start)"
        parts.append(chosen)
        change = describe_change(start_loss, best_loss)
        if best_loss > start_loss and it_cfg.select == "distance":
            change += (
                "; the kept network is chosen by its distance to the LSR predictor, not by its residual loss, "
                "which can rise while the error falls"
            )
        parts.append(f"weighted residual loss {format_error(start_loss)} -> {format_error(best_loss)} ({change})")
        message = "; ".join(parts)
    peak, kind = peak_memory_bytes(device)
    return IterateResult(
        status,
        message,
        module,
        best_it,
        history,
        errors,
        residual_blocks,
        {"before": start_loss, "after": best_loss},
        timings,
        sum(p.numel() for p in module.parameters()),
        comm.sum_int(problem.num_rows),
        str(device),
        cfg.dtype,
        peak,
        kind,
        stop_reason,
        warnings,
        {"criterion": criterion, "distances": {str(k): v for k, v in distances.items()}},
    )
