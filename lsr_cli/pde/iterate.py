"""Iterative LSR (I-LSR, ``lsr iterate``): push the LSR gain back into the network's weights.

Each outer iteration (METHOD.md §3, with the fit measured best in issue 22):

1. one-shot LSR of the physics residual at the current weights θ → step ``δ``;
2. target ``u* = q(θ, x) + J(x) δ`` at every collocation point (detached): the refined
   predictor, orders of magnitude more accurate than the network;
3. fit the network to it by Levenberg–Marquardt with geodesic acceleration in the top
   ``iterate.gauss_newton_rank`` right singular directions of the output Jacobian, re-linearized
   every step (:func:`gauss_newton_fit`); optionally (``iterate.lbfgs_iterations``) L-BFGS on
   the pseudo-time loss ``Σ_pde ‖s_b (r_b(θ) + (q(θ, x) − u*) / Δτ)‖² + Σ_other ‖s_b r_b(θ)‖²``.

   Measured (docs/benchmarks/plain_network.md): on a 2-32-1 Poisson PINN the fit reaches the
   predictor to ~1e-5 in one iteration and the network's error falls 3 000× in six, where plain
   Gauss–Newton steps on the physics residual itself (dense, with a line search) stall at the
   Adam start and L-BFGS crawls.
4. the iteration is kept only if the network's exact residual at fresh validation points
   (:mod:`.validation`, as one-shot PDE refinement draws them; ``iterate.select``) falls; a
   rejected or non-finite iteration is undone, so the written network is the best seen and
   never worse than the input.

Systems and inverse problems: the fit targets are every output column of the predictor at
every block's points (the row groups of a system's block share them: fitted once); unknown
constants (``pde.unknowns``, the extra columns of :class:`~.unknowns.WithUnknowns`) take
their LSR step ``ν ← ν + δν`` directly — parameters, not outputs, so not fitted — and are kept
or undone with the network.

The loop stops at the iteration cap, when the fit is below ``iterate.tolerance``, or after
``iterate.patience`` rejected iterations. Nothing here prints; the CLI writes the network and
the per-iteration report.

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

from lsr_cli.checkpoint import LoadedCheckpoint, require_plain_network
from lsr_cli.config import Config
from lsr_cli.distributed import SINGLE, Comm, global_mean_square, global_norm, merge_accumulators
from lsr_cli.errors import ConfigError
from lsr_cli.linearization import JacobianOperator, ParameterSpace, materialize
from lsr_cli.metrics import describe_change, format_error, global_error_metrics
from lsr_cli.refine import predict
from lsr_cli.runtime import NoProgress, ProgressSink, no_tf32, peak_memory_bytes, resolve_memory_budget, start_run
from lsr_cli.sketch import RangeSketch
from lsr_cli.solve import QRAccumulator

from .problem import PdeProblem, resample
from .refine_pde import block_losses, build_operators, exact_step, lsr_step, prepare_pde_run, true_residual
from .system_report import unknowns_message
from .unknowns import WithUnknowns, select_space, unknowns_report
from .validation import validation_problem


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


GEODESIC_H = 0.1
"""Relative finite-difference step of the geodesic acceleration (Transtrum & Sethna)."""

GEODESIC_RATIO = 0.75
"""The acceleration is used only when ``‖a‖ ≤ GEODESIC_RATIO · ‖v‖`` (else the step is too curved)."""

DAMPING_GRID = 0.5
"""Damping exponents ``μ = s_max² · 10^−j`` are searched in steps of this size in ``j``."""


def _damping_candidates(j: float | None) -> list[float]:
    """The damping exponents tried first: a coarse scan on the first step, then around the last
    accepted one (less damping first)."""
    if j is None:
        return [float(x) for x in range(0, 17)]
    return [j + DAMPING_GRID, j, j - DAMPING_GRID]


@dataclass
class _Linearization:
    """One Levenberg–Marquardt linearization: ``A = J W`` (this rank's rows ``[n, k]``) with
    orthogonal columns of norms ``s`` (``W`` ``[m, k]`` orthonormal parameter directions), the
    residual ``res`` ``[n]`` at the weights ``named``, and ``g = Aᵀ res`` summed over ranks."""

    op: Any
    space: ParameterSpace
    named: dict[str, Tensor]
    W: Tensor
    A: Tensor
    s: Tensor
    g: Tensor
    res: Tensor
    target: Tensor

    def _misfit(self, z: Tensor, scale: float = 1.0) -> tuple[Tensor, dict[str, Tensor]]:
        step = self.space.unflatten_vector(scale * (self.W @ z.to(self.W.dtype)))
        new = {k: self.named[k] + step[k] for k in self.named}
        return (self.op.forward(new) - self.target).to(torch.float64), new

    def trial(self, j: float, comm: Comm) -> tuple[float, dict[str, Tensor]]:
        """The misfit ``‖q − y‖²`` after the damped step ``μ = s_max² · 10^−j`` with its geodesic
        acceleration, and the weights there. ``z = −Aᵀ res / (s² + μ)`` is the LM step in the
        ``W`` coordinates (``AᵀA = diag(s²)``); every sum over rows is over every rank."""
        denom = self.s * self.s + float(self.s[0]) ** 2 * 10.0 ** (-j)
        z = -self.g / denom
        # the second directional derivative of the residual along the step, by one difference
        r_h, _ = self._misfit(z, GEODESIC_H)
        rvv = (2.0 / GEODESIC_H) * ((r_h - self.res) / GEODESIC_H - self.A @ z)
        a = -comm.allreduce_sum(self.A.T @ rvv) / denom
        if bool(torch.isfinite(a).all()) and float(a.norm()) <= GEODESIC_RATIO * float(z.norm()):
            z = z + 0.5 * a
        new_res, new = self._misfit(z)
        value = _sum_squares(new_res, comm)
        return (value if math.isfinite(value) else math.inf), new


def gauss_newton_fit(
    module: nn.Module,
    points: Tensor | tuple[Tensor, ...],
    target: Tensor,
    cfg: Config,
    gen: torch.Generator,
    comm: Comm = SINGLE,
    time_limit: float = math.inf,
    shared: Sequence[bool] = (),
    frozen: Sequence[str] = (),
) -> int:
    """Levenberg–Marquardt with geodesic acceleration on ``‖q(θ, x) − y‖²`` in a parameter
    subspace, re-linearized every step; returns the number of accepted steps.

    ``points``: the inputs (a tensor ``[N, d]`` or a tuple of input tensors with a common leading
    dimension, ``shared`` flags those passed whole); ``target``: ``vec y`` ``[N · out]``.

    Each step: the output Jacobian ``J`` at the current weights, held dense when it fits a quarter
    of the memory budget; the subspace is the whole parameter space when
    ``iterate.gauss_newton_rank`` reaches ``min(n, m)`` and ``J`` is dense (exact SVD), else the
    top ``iterate.gauss_newton_rank`` right singular directions of a randomized sketch; ``W`` is
    rotated so that the columns of ``A = J W`` are orthogonal with norms ``s``. The damped step is
    ``v(μ) = W z``, ``z = −Aᵀ(q − y) / (s² + μ)``; its geodesic acceleration ``a`` (Transtrum &
    Sethna: the same solve applied to the second directional derivative of the residual along
    ``v``, by one finite difference) adds ``a / 2`` when ``‖a‖ ≤ 0.75 ‖z‖``, which lets the steps
    follow the curved valleys where plain Levenberg–Marquardt crawls.
    The damping is searched on a grid ``μ = s_max² · 10^−j`` (coarse on the first step, then
    around the last accepted ``j``), the candidate with the lowest misfit is taken, and a step
    is accepted only if the misfit falls; the loop stops at ``iterate.gauss_newton_steps``,
    ``time_limit`` seconds, or when no damping lowers the misfit.

    Distributed (``points``/``target``: this rank's rows): the sketch is global
    (:class:`~lsr_cli.sketch.RangeSketch` with ``comm``), the SVD is that of the ``R`` factor
    of ``J W`` merged over ranks, and every sum over rows (``Aᵀ r``, misfits) is all-reduced, so
    every rank takes the same steps.

    ``frozen``: parameter names left out of the fit (unknown constants beside the network).
    """
    it = cfg.iterate
    inputs = points if isinstance(points, tuple) else (points,)
    t0 = time.perf_counter()
    j: float | None = None
    accepted = 0
    for _ in range(it.gauss_newton_steps):
        if time.perf_counter() - t0 > time_limit:
            break
        named = {
            n: p.detach().clone() for n, p in module.named_parameters() if p.is_floating_point() and n not in frozen
        }
        space = ParameterSpace(named)
        op: Any = JacobianOperator(module, space, inputs, 1024, cfg.lsr.tangent_chunk, shared=shared)
        n, m = comm.sum_int(op.shape[0]), op.shape[1]
        res = (op.forward() - target).to(torch.float64)
        dense = None
        if comm.world == 1:
            budget = resolve_memory_budget(cfg.lsr.max_memory, res.device)
            dense, _ = materialize(op, budget // 4, torch.Generator().manual_seed(0))
        k = min(it.gauss_newton_rank, n, m)
        if dense is not None and k >= min(n, m):
            U, s, Vh = torch.linalg.svd(dense.J.to(torch.float64), full_matrices=False)
            W, A = Vh.T.to(res.dtype), U * s
        else:
            sketch = RangeSketch(dense if dense is not None else op, gen, res.dtype, res.device, comm=comm)
            sketch.extend(k + cfg.lsr.oversampling)
            k = min(k, sketch.usable_rank())
            if k == 0:
                break
            P, S = sketch.basis(k)
            W = P * S  # orthonormal directions in parameter space
            A = (dense if dense is not None else op).matmat(W).to(torch.float64)
            if comm.world == 1:
                _, s, Vh = torch.linalg.svd(A, full_matrices=False)
            else:  # A = Q R over every rank's rows: the SVD of R
                acc = QRAccumulator(A.shape[1], A.device)
                acc.add(A, res)
                R, _, _ = merge_accumulators(acc, comm).parts()
                _, s, Vh = torch.linalg.svd(R, full_matrices=False)
            W, A = W @ Vh.T.to(W.dtype), A @ Vh.T  # columns of A = J W orthogonal, norms s
        base = _sum_squares(res, comm)
        lm = _Linearization(op, space, named, W, A, s, comm.allreduce_sum(A.T @ res), res, target)
        best: tuple[float, float, dict[str, Tensor]] | None = None
        for jj in _damping_candidates(j):
            value, new = lm.trial(jj, comm)
            if value < base and (best is None or value < best[0]):
                best = (value, jj, new)
        jj = min(_damping_candidates(j))
        while best is None and jj > -2.0:  # more damping until the misfit falls
            jj -= 2 * DAMPING_GRID
            value, new = lm.trial(jj, comm)
            if value < base:
                best = (value, jj, new)
        if best is None:
            break
        with torch.no_grad():
            for name, p in module.named_parameters():
                if name in best[2]:
                    p.copy_(best[2][name])
        j = best[1]
        accepted += 1
        if best[0] <= 1e-30 * max(n, 1):
            break
    return accepted


def _reference_errors(
    module: nn.Module, problem: PdeProblem, dz_u: Tensor | None = None, comm: Comm = SINGLE
) -> dict[str, float | None] | None:
    """Errors of the first ``C_ref`` output columns against ``/reference/values`` ``[N, C_ref]``
    (``dz_u``: the predictor's step there, ``[N · columns]``)."""
    errors = _component_errors(module, problem, dz_u, comm)
    return None if errors is None else errors[0]


def _component_errors(
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


def _fit_points(problem: PdeProblem) -> list[Tensor]:
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


def _unknown_steps(module: nn.Module, space: Any, dz: Tensor | None) -> dict[str, float]:
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


def _apply_unknown_steps(module: nn.Module, steps: dict[str, float]) -> None:
    """``ν ← ν + δν`` for every unknown: they are parameters, set directly, never fitted."""
    if not isinstance(module, WithUnknowns):
        return
    with torch.no_grad():
        for name, path in zip(module.names, module.paths, strict=True):
            module._parameter(path).add_(steps.get(name, 0.0))


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


def _validation_set(problem: PdeProblem, cfg: Config, comm: Comm) -> tuple[PdeProblem | None, dict[str, Any]]:
    """Fresh validation points (:mod:`.validation`, as one-shot PDE refinement draws them), this
    rank's share on the problem's device; ``None`` when no block allows them."""
    if problem.instance is not None:
        return None, {"source": "lsr instances: none"}
    val, info = validation_problem(problem, cfg.seed)
    if val is None:
        return None, info
    val.shard(comm.rank, comm.world)
    x = problem.blocks[0].points
    val.to(x.device, x.dtype)
    return val, info


def _criterion(
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
    sink = progress or NoProgress()
    dtype, device, gen = start_run(cfg.dtype, cfg.device, cfg.seed)
    it_cfg = cfg.iterate
    timings = {"lsr": 0.0, "align": 0.0, "evaluate": 0.0}
    history: list[dict[str, Any]] = []
    warnings: list[str] = []
    if it_cfg.lbfgs_iterations > 0 and (len(problem.outputs) > 1 or problem.unknowns):
        raise ConfigError(
            "config.iterate.lbfgs_iterations: the pseudo-time L-BFGS pass needs one output and no "
            f"pde.unknowns (this problem has outputs {problem.outputs}); set it to 0"
        )
    with no_tf32():
        module, space, ops = prepare_pde_run(ckpt, problem, cfg, dtype, device, gen, comm)
        # pde.unknowns: the wrapper's extra columns are the constants; the fit sees the network alone
        network = module.net if isinstance(module, WithUnknowns) else module
        frozen = [path.removeprefix("net.") for path in getattr(module, "paths", [])]
        num_out = len(problem.outputs)
        values_start = module.values() if isinstance(module, WithUnknowns) else {}
        val, val_info = _validation_set(problem, cfg, comm) if it_cfg.select == "validation" else (None, {})
        start_blocks = block_losses(ops.f0, problem, comm)
        start_loss = global_mean_square(ops.f0, comm)
        start_errors = _component_errors(module, problem, comm=comm)
        start_ref = start_errors[0] if start_errors else None
        # the kept network: (iteration, weights, residual loss, per-block losses, criterion); the start is one
        best_state = copy.deepcopy(module.state_dict())
        start_crit = _criterion(it_cfg.select, val, module, start_loss, math.inf, comm)
        best: tuple[int, float, dict[str, float], float] = (start_iteration - 1, start_loss, start_blocks, start_crit)
        stale = 0
        stop_reason = f"reached iterate.iterations = {it_cfg.iterations}"
        advance = sink.begin("I-LSR iterations", it_cfg.iterations)
        for k in range(start_iteration, start_iteration + it_cfg.iterations):
            t0 = time.perf_counter()
            if it_cfg.resample and k > start_iteration:
                resample(problem, gen, data_path, base_dir, comm.rank, comm.world)
            if k > start_iteration:  # the first iteration uses the operators built at the start
                space = select_space(module, cfg, gen)
                ops = build_operators(module, problem, space, cfg, comm=comm)
            sub = lsr_step(module, problem, space, ops, cfg, gen, NoProgress(), comm)
            # nonlinear equations: the predictor's exact residual, minimized in LSR's subspace
            step = exact_step(module, problem, space, ops, sub, cfg, comm)
            sub.dz, nonlinear = step.dz, step.info
            # the LSR predictor's residual: its own (exact) one when the stage ran, else f0 + G dz
            lin_loss_total = global_mean_square(step.f_after if nonlinear.get("ran") else step.f_lin, comm)
            # the fit targets: every output column of the predictor at every block's points (once)
            targets = []
            u_now = []
            for pts in _fit_points(problem):
                u = predict(module, (pts,), 4096).reshape(pts.shape[0], -1)
                u_now.append(u[:, :num_out].reshape(-1))
                if sub.dz is not None:
                    jv = JacobianOperator(module, space, (pts,), 1024, cfg.lsr.tangent_chunk).matvec(sub.dz)
                    u = u + jv.reshape(pts.shape[0], -1)
                targets.append(u[:, :num_out].reshape(-1).detach())
            # the unknown constants take their LSR step directly (parameters, not outputs: not fitted)
            unknown_steps = _unknown_steps(module, space, sub.dz)
            _apply_unknown_steps(module, unknown_steps)
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
            points = torch.cat(_fit_points(problem))
            target = torch.cat(targets)
            gn_steps = (
                gauss_newton_fit(network, points, target, cfg, gen, comm, frozen=frozen)
                if it_cfg.gauss_newton_steps > 0
                else 0
            )
            evaluations, align_loss, lbfgs_kept = 0, math.nan, False
            if it_cfg.lbfgs_iterations > 0:
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
            u_all = predict(network, (points,), 4096).reshape(-1)
            fit = _distance(u_all, target, comm)
            values_now = module.values() if isinstance(module, WithUnknowns) else {}
            crit = _criterion(it_cfg.select, val, module, net_loss, fit, comm) if math.isfinite(net_loss) else math.inf
            # monotone: kept only if the criterion fell (for `distance`: below the incoming network's)
            reference_value = estimate if it_cfg.select == "distance" else best[3]
            kept = math.isfinite(net_loss) and math.isfinite(crit) and crit < reference_value
            net_ref = _reference_errors(module, problem, comm=comm) if math.isfinite(net_loss) else None
            if kept:
                best_state = copy.deepcopy(module.state_dict())
                best, stale = (k, net_loss, net_blocks, crit), 0
            else:  # rejected: the next iteration starts from the kept network
                module.load_state_dict(best_state)
                stale += 1
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
                "criterion": {"name": it_cfg.select, "value": crit, "kept": kept},
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
            if values_now:  # pde.unknowns: this iteration's values (kept or not)
                entry["unknowns"] = values_now
            history.append(entry)
            if on_iteration is not None:
                on_iteration(entry)
            advance(1)
            if not math.isfinite(net_loss):
                warnings.append(f"non-finite residual at iteration {k}: the step was rejected")
            if kept and fit <= it_cfg.tolerance:
                stop_reason = f"the network fits the LSR predictor to {fit:.3e} (iterate.tolerance)"
                break
            if stale >= it_cfg.patience:
                stop_reason = f"the {_CRITERIA[it_cfg.select]} did not fall for {stale} iterations"
                break
        sink.end()
        module.load_state_dict(best_state)
        final_errors = _component_errors(module, problem, comm=comm)
        final_ref = final_errors[0] if final_errors else None

    best_it, best_loss, best_blocks, best_crit = best
    errors: dict[str, dict[str, Any]] = {}
    if start_ref is not None and final_ref is not None:
        errors["reference"] = {"before": start_ref, "after": final_ref}
    if start_errors and final_errors and start_errors[1]:
        errors["components"] = {
            name: {"before": start_errors[1][name], "after": final_errors[1][name]} for name in start_errors[1]
        }
    residual_blocks = {n: {"before": start_blocks[n], "after": best_blocks[n]} for n in start_blocks}
    unknowns: dict[str, dict[str, Any]] = {}
    if isinstance(module, WithUnknowns):
        values_end = module.values()
        steps = {name: values_end[name] - values_start[name] for name in values_start}
        unknowns = unknowns_report(problem.unknowns, values_start, steps, space)
        for name, entry in unknowns.items():
            entry["after"] = values_end[name]  # exactly the kept value (before + step rounds)
    criterion = _CRITERIA[it_cfg.select]
    if it_cfg.select == "validation" and val is None:
        criterion = _CRITERIA["residual"] + " (no validation points: " + str(val_info.get("source", "none")) + ")"
    if best_it < start_iteration:
        status, message = "unchanged", f"no iteration lowered the {criterion}; the network is unchanged"
        if "reference" in errors:
            b0 = start_ref["rel_l2"]  # type: ignore[index]
            message = (
                f"the network's reference rel L2 error {format_error(b0)} -> {format_error(b0)} (unchanged); " + message
            )
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
        if it_cfg.select != "distance":
            chosen += f" ({best_crit:.3g} vs {start_crit:.3g} at the start)"
        parts.append(chosen)
        change = describe_change(start_loss, best_loss)
        if best_loss > start_loss:
            change += f"; the kept network is chosen by its {criterion}, not by its residual loss at the fit points"
        parts.append(f"weighted residual loss {format_error(start_loss)} -> {format_error(best_loss)} ({change})")
        message = "; ".join(parts)
    if unknowns:
        message += f"; {unknowns_message(unknowns)}"
    peak, kind = peak_memory_bytes(device)
    return IterateResult(
        status,
        message,
        network,
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
        {"criterion": criterion, "start": start_crit, "kept": best_crit, "validation": val_info},
        unknowns,
    )


_CRITERIA = {
    "validation": "network's residual loss at the validation points",
    "residual": "network's weighted residual loss",
    "distance": "network's distance to the LSR predictor",
}
