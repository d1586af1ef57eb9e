"""The fit of ``lsr iterate``: the network onto the LSR predictor.

:func:`gauss_newton_fit` — Levenberg–Marquardt with geodesic acceleration in a sketched parameter
subspace on ``‖q(θ, x) − u*‖²`` (the default fit, measured best in issue 22); :func:`align` —
L-BFGS on the pseudo-time loss of METHOD.md §3 (``iterate.lbfgs_iterations``). Both are
distributed-aware: every sum over rows is all-reduced, so every rank takes the same steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lsr_cli.config import Config
from lsr_cli.distributed import SINGLE, Comm, merge_accumulators
from lsr_cli.linearization import JacobianOperator, ParameterSpace, materialize
from lsr_cli.runtime import resolve_memory_budget
from lsr_cli.sketch import RangeSketch
from lsr_cli.solve import QRAccumulator

from .problem import PdeProblem


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


class _OutOfTime(Exception):
    """Raised in the L-BFGS closure past its time limit (``torch.optim.LBFGS`` has no callback)."""


def align(
    module: nn.Module,
    problem: PdeProblem,
    targets: list[Tensor],
    cfg: Config,
    comm: Comm = SINGLE,
    time_limit: float = math.inf,
) -> tuple[int, float, bool]:
    """L-BFGS (strong Wolfe) on the pseudo-time alignment loss; returns (evaluations, final loss,
    whether it stopped at ``time_limit`` seconds). Stopped there, the weights are those of the
    last evaluation (a line search's trial point): the caller keeps them only if they are better.

    Distributed: the closure returns the global loss and sets every ``.grad`` to the global
    gradient (all-reduced), so L-BFGS, deterministic given its closure, takes the same steps
    on every rank, and the time limit is decided on every rank alike."""
    t0 = time.perf_counter()
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
        if out_of_time(time.perf_counter() - t0, time_limit, comm):
            raise _OutOfTime
        evaluations += 1
        opt.zero_grad()
        loss = _alignment_loss(module, problem, targets, cfg.iterate.dtau, comm)
        loss.backward()
        if comm.world == 1:
            return loss
        _allreduce_grads(params, comm)
        return _global_loss(loss, comm)

    stopped = False
    with torch.enable_grad():
        try:
            opt.step(closure)
        except _OutOfTime:
            stopped = True
        final = _global_loss(_alignment_loss(module, problem, targets, cfg.iterate.dtau, comm), comm)
    return evaluations, float(final.detach()), stopped


def out_of_time(elapsed: float, limit: float, comm: Comm = SINGLE) -> bool:
    """Whether ``elapsed > limit`` on any rank: the ranks' clocks differ, their decisions must not."""
    late = elapsed > limit
    return comm.sum_int(int(late)) > 0 if comm.world > 1 else late


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
    on_step: Callable[[int, float, dict[str, float]], bool | None] | None = None,
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
    ``time_limit`` seconds (decided on every rank alike), or when no damping lowers the misfit.
    ``on_step(accepted, misfit, seconds)``: called after every accepted step, with the seconds of
    its stages (``jacobian``, ``subspace``, ``trials``) and its damping exponent ``j``.

    Distributed (``points``/``target``: this rank's rows): the sketch is global
    (:class:`~lsr_cli.sketch.RangeSketch` with ``comm``), the SVD is that of the ``R`` factor
    of ``J W`` merged over ranks, and every sum over rows (``Aᵀ r``, misfits) is all-reduced, so
    every rank takes the same steps.

    ``frozen``: parameter names left out of the fit (unknown constants beside the network).
    """
    inputs = points if isinstance(points, tuple) else (points,)

    def output_operator(space: ParameterSpace) -> tuple[Any, Any]:
        op = JacobianOperator(module, space, inputs, 1024, cfg.lsr.tangent_chunk, shared=shared)
        dense = None
        if comm.world == 1:
            budget = resolve_memory_budget(cfg.lsr.max_memory, target.device)
            dense, _ = materialize(op, budget // 4, torch.Generator().manual_seed(0))
        return op, dense

    return levenberg_marquardt(module, output_operator, target, cfg, gen, comm, time_limit, frozen, on_step)


def levenberg_marquardt(
    module: nn.Module,
    make_operator: Callable[[ParameterSpace], tuple[Any, Any]],
    target: Tensor | None,
    cfg: Config,
    gen: torch.Generator,
    comm: Comm = SINGLE,
    time_limit: float = math.inf,
    frozen: Sequence[str] = (),
    on_step: Callable[[int, float, dict[str, float]], bool | None] | None = None,
) -> int:
    """The loop of :func:`gauss_newton_fit` on ``‖F(θ) − y‖²`` for any residual: ``make_operator(space)``
    gives the operator at the current weights (``forward(params)`` for ``F``, its Jacobian's
    products) and its dense form or ``None``; ``target`` ``y`` (``None``: zero, a physics residual).
    ``on_step`` may return ``True`` to stop."""
    it = cfg.iterate
    t0 = time.perf_counter()
    j: float | None = None
    accepted = 0
    for _ in range(it.gauss_newton_steps):
        if out_of_time(time.perf_counter() - t0, time_limit, comm):
            break
        tj = time.perf_counter()
        named = {
            n: p.detach().clone() for n, p in module.named_parameters() if p.is_floating_point() and n not in frozen
        }
        space = ParameterSpace(named)
        op, dense = make_operator(space)
        n, m = comm.sum_int(op.shape[0]), op.shape[1]
        value = op.forward()
        if target is None:
            target = torch.zeros_like(value)
        res = (value - target).to(torch.float64)
        tk = time.perf_counter()
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
        ts = time.perf_counter()
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
        if on_step is not None:
            now = time.perf_counter()
            if on_step(accepted, best[0], {"jacobian": tk - tj, "subspace": ts - tk, "trials": now - ts, "j": j}):
                break
        if best[0] <= 1e-30 * max(n, 1):
            break
    return accepted
