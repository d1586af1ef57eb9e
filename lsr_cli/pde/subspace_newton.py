"""Gauss–Newton on the exact residual of the refined predictor, inside the LSR subspace.

One-shot LSR solves the *linearized* residual ``f0 + G P z``. For a nonlinear equation (Burgers'
``u u_x``, Allen–Cahn's ``u³``) that is the residual of the linearized *equation*; the refined
predictor ``u_z = q(θ0, ·) + J P z`` has its own, exact residual ``R(u_z)``, which differs by
the equation's nonlinear terms in ``w = J P z`` (``w w_x`` for Burgers) and can be far larger
when ``w`` is steep (a shock). This stage keeps the predictor's form — still ``q(θ0) + J δ``
with ``δ = P z`` — and minimizes the exact ``‖R(u_z)‖² + λ²‖z‖²`` over ``z`` by
Levenberg–Marquardt, starting from LSR's ``z``:

* every quantity of ``u`` the residual uses (values, first and second input derivatives; found
  by running the residual once and recording what it asked for) is tabulated at the points for
  ``u0`` (``base``, ``[N, C]``) and for the ``r`` basis functions ``φ_j = J p_j``
  (``V``, ``[N, C, r]``, one pass of ``r`` JVPs, as for ``G P``); ``u_z``'s quantities are then
  ``base + V z`` exactly, since ``u_z`` is affine in ``z``;
* the residual is evaluated on those tables (:class:`~.fields.TabulatedModel`) and its Jacobian
  with respect to ``z`` is ``Σ_c diag(∂R/∂T_c) V_c``, with ``∂R/∂T_c`` by one forward-mode JVP per
  table column (the residual is pointwise in the points, which is checked);
* each step solves the damped least-squares problem by QR in float64; a step is kept only when
  it lowers the fit rows' objective; the iterate with the lowest exact residual on the
  held-out rows (LSR's split, or validation points) is returned, so the result is never worse
  there than LSR's own — where that residual is below the input's, only a fall of
  :data:`MONITOR_MIN_GAIN` makes a new lowest, so that iterates that merely creep down are not
  kept.

The stage runs when the equation is nonlinear (the predictor's exact residual differs from the
linearized one) and its tables fit half of the memory budget; the report says what it did.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lsr_cli.distributed import SINGLE, Comm, merge_accumulators
from lsr_cli.linearization import JacobianOperator, ParameterSpace
from lsr_cli.runtime import NoProgress, ProgressSink
from lsr_cli.solve import QRAccumulator

from .fields import Key, TabulatedModel, recording
from .problem import Block, PdeProblem

ROW_CHUNK = 256
PATIENCE = 6
"""Iterations without a new lowest held-out exact residual before the stage stops."""

MONITOR_MIN_GAIN = 0.25
"""Once the held-out (or validation) exact residual is below the input network's own there, a
new lowest counts only when it is at least this much below the last one kept (Keras'
``min_delta``, relative): the stage goes on while the monitored residual falls by a quarter
within :data:`PATIENCE` iterations and keeps the last iterate that did. Above the input's (the
first damped steps on the Burgers sample), any fall counts.

Measured on a Burgers-shock PINN after L-BFGS (``benchmarks/unseen_pinns.py``): the validation
residual fell 10^4× in 5–7 iterations, then crept down by 1–12 % per iteration for 20 more while
the reference error rose (1.7e-3 → 6.5e-3); with every fall counted, which creeping iterate was
kept decided a 3× to 20× gain across random draws (6.7× to 23× with this rule). A half (0.5) cut
the creep of a Burgers PINN far from its solution that lowered the error (1.32e-1 against the
input's 1.50e-1)."""


@dataclass
class BlockTables:
    block: Block
    layout: list[list[Key]]
    base: Tensor  # [N, C] quantities of u0
    V: Tensor  # [N, C, r] the same quantities of the basis functions J p_j

    def residual(self, table: Tensor) -> Tensor:
        """The block's scaled residual ``[N]`` for quantities ``table`` ``[N, C]`` (``[0]`` for a
        rank's empty share of a block)."""
        assert self.block.residual_fn is not None
        if table.shape[0] == 0:
            return table.new_zeros(0)
        out = self.block.residual_fn(TabulatedModel(self.layout, table), self.block.inputs)
        return self.block.scale * out.reshape(-1)

    def at(self, z: Tensor) -> Tensor:
        return self.residual(self.base + self.V @ z)

    def jacobian(self, z: Tensor) -> Tensor:
        """``∂R/∂z`` ``[N, r]`` at ``z`` (pointwise: one JVP per table column)."""
        table = self.base + self.V @ z
        J = torch.zeros(self.V.shape[0], self.V.shape[2], dtype=z.dtype, device=z.device)
        if table.shape[0] == 0:
            return J
        for c in range(table.shape[1]):
            e = torch.zeros_like(table)
            e[:, c] = 1.0
            g = torch.func.jvp(self.residual, (table,), (e,))[1]
            J += g[:, None] * self.V[:, c, :]
        return J


def _layout(block: Block, module: nn.Module) -> list[list[Key]]:
    """What the block's residual asks of each field, from a few of its points (a row of zeros
    shaped like them on a rank that holds none of the block: the same questions are asked)."""
    rows = tuple(x[:3] if x.shape[0] else x.new_zeros(1, *x.shape[1:]) for x in block.inputs)
    assert block.residual_fn is not None
    with torch.no_grad(), recording() as seen:
        block.residual_fn(module, rows)
    return [F.used() for F in seen]


def _capture(block: Block, layout: list[list[Key]]) -> Any:
    """A residual-shaped function returning the tabulated quantities ``[rows, C]`` instead."""

    def fn(model: Any, rows: tuple[Tensor, ...]) -> Tensor:
        assert block.residual_fn is not None
        with recording() as seen:
            block.residual_fn(model, rows)
        if len(seen) != len(layout):
            raise RuntimeError("the residual built a different number of fields on different rows")
        return torch.stack([F.value(k) for F, keys in zip(seen, layout, strict=True) for k in keys], dim=1)

    return fn


def layouts(problem: PdeProblem, module: nn.Module) -> list[list[list[Key]]]:
    """Per block, the quantities its residual asks of each field it builds (one evaluation on
    a few points)."""
    return [_layout(b, module) for b in problem.blocks]


def table_bytes(problem: PdeProblem, layout: list[list[list[Key]]], rank: int, itemsize: int = 8) -> int:
    """Memory of the tables and Jacobians for ``rank`` basis functions."""
    total = 0
    for b, fields in zip(problem.blocks, layout, strict=True):
        cols = sum(len(k) for k in fields)
        total += b.points.shape[0] * (cols + 2) * rank * itemsize
    return total


def tabulate(
    module: nn.Module,
    problem: PdeProblem,
    space: ParameterSpace,
    P: Tensor,
    tangent_chunk: int,
    dense: bool = False,
    layout: list[list[list[Key]]] | None = None,
) -> list[BlockTables]:
    """The tables of every block (``layout``: from :func:`layouts`, computed when not given). ``dense``: per-point Jacobians of the quantities,
    materialized a few MiB at a time and multiplied by ``P`` (BLAS-3, the faster path for
    hundreds of basis functions); otherwise ``r`` batched JVPs."""
    out = []
    r = P.shape[1]
    for b, fields in zip(problem.blocks, layout or layouts(problem, module), strict=True):
        op = JacobianOperator(module, space, b.inputs, ROW_CHUNK, tangent_chunk, residual=_capture(b, fields))
        n, cols = b.points.shape[0], sum(len(k) for k in fields)
        base = op.forward().reshape(n, cols)
        if dense:
            V = P.new_empty(n, cols, r)
            step = max(1, (32 * 2**20) // max(1, cols * space.num * 8))
            for s in range(0, n, step):
                e = min(n, s + step)
                V[s:e] = (op.jacobian_rows(s, e) @ P).reshape(e - s, cols, r)
        else:
            V = op.matmat(P).reshape(n, cols, r)
        out.append(BlockTables(b, fields, base, V))
    return out


@dataclass
class NewtonResult:
    z: Tensor
    iterations: int
    history: list[dict[str, float]] = field(default_factory=list)
    stop_reason: str = ""
    kept_iteration: int = 0


def _objective(f: Tensor, z: Tensor, lam: float, comm: Comm = SINGLE) -> float:
    return comm.sum_float(float(f.square().sum())) + lam**2 * float(z.square().sum())


def _reduced_triangle(A: Tensor, b: Tensor, lam: float, z: Tensor, comm: Comm) -> tuple[Tensor, Tensor]:
    """``(R, Qᵀ rhs)`` of the QR of ``[A; λ I]`` with right-hand side ``[b; −λ z]``: the fit rows
    (distributed: every rank's, their triangles merged identically on every rank) folded into
    one ``(r+1) × (r+1)`` triangle, the damping rows added to it."""
    r = z.shape[0]
    acc = QRAccumulator(r, A.device)
    acc.add(A, b)
    R, c, _ = merge_accumulators(acc, comm).parts()
    if lam > 0:
        eye = torch.eye(r, dtype=R.dtype, device=R.device)
        Q2, R = torch.linalg.qr(torch.cat([R, lam * eye]))
        c = Q2.T @ torch.cat([c, -lam * z.to(R.dtype)])
    return R, c


def levenberg_marquardt(
    tables: list[BlockTables],
    z0: Tensor,
    lam: float,
    fit_rows: Tensor | None,
    hold_rows: Tensor | None,
    max_iterations: int,
    time_limit: float = float("inf"),
    progress: ProgressSink | None = None,
    comm: Comm = SINGLE,
) -> NewtonResult:
    """Minimize ``‖R_fit(u_z)‖² + λ²‖z‖²`` from ``z0``; return the iterate with the lowest
    held-out exact residual (fit rows when there is no hold-out; LSR's own step included), a new
    lowest below the input's (``z = 0``) being at least :data:`MONITOR_MIN_GAIN` lower.

    Distributed (``comm``): ``tables`` and the row sets hold this rank's points; every sum over
    rows is all-reduced and the fit rows' QR triangles are merged, so every rank takes the same
    steps, and the time limit is rank 0's clock."""
    t0 = time.perf_counter()

    def residual(z: Tensor) -> Tensor:
        return torch.cat([t.at(z) for t in tables])

    def jac(z: Tensor) -> Tensor:
        return torch.cat([t.jacobian(z) for t in tables])

    def part(v: Tensor, rows: Tensor | None) -> Tensor:
        return v if rows is None else v[rows]

    def monitor(f: Tensor) -> float:
        g = part(f, hold_rows if hold_rows is not None else fit_rows)
        return comm.sum_float(float(g.square().sum())) / max(comm.sum_int(g.numel()), 1)

    def out_of_time() -> bool:
        late = time.perf_counter() - t0 > time_limit
        return late if comm.world == 1 else bool(comm.allgather_object(late)[0])

    z = z0.clone()
    f = residual(z)
    phi = _objective(part(f, fit_rows), z, lam, comm)
    best_metric, best_z, best_it = monitor(f), z.clone(), 0
    # held out: once below the input's own (z = 0: q0 + J P z is the input), only falls of
    # MONITOR_MIN_GAIN count; above it, or monitored on the fit alone, any fall counts
    held_out = hold_rows is not None
    input_loss = monitor(residual(torch.zeros_like(z))) if held_out else -math.inf

    def new_lowest(metric: float) -> bool:
        gain = MONITOR_MIN_GAIN if best_metric < input_loss else 0.0
        return metric < (1.0 - gain) * best_metric

    history = [{"iteration": 0, "fit_objective": phi, "monitor": best_metric, "damping": 0.0}]
    eye = torch.eye(z.shape[0], dtype=torch.float64, device=z.device)  # the triangles are float64
    mu: float | None = None
    stop, it = f"iteration cap {max_iterations}", 0
    bad = 0
    sink = progress or NoProgress()
    advance = sink.begin(f"exact residual in the subspace (r={z0.shape[0]})", max_iterations)
    while it < max_iterations:
        if out_of_time():
            stop = f"time limit {time_limit:.0f} s"
            break
        # QR of [A; λ I]: the damping μ is then added cheaply to the small triangle
        R, qb = _reduced_triangle(part(jac(z), fit_rows), -part(f, fit_rows), lam, z, comm)
        if mu is None:
            mu = 1e-6 * float(torch.linalg.matrix_norm(R, 2)) ** 2
        accepted = False
        for _ in range(12):
            Rm = torch.cat([R, (mu**0.5) * eye])
            step = torch.linalg.lstsq(Rm, torch.cat([qb, torch.zeros_like(qb)])).solution
            z_new = z + step.to(z.dtype)
            f_new = residual(z_new)
            phi_new = _objective(part(f_new, fit_rows), z_new, lam, comm)
            if comm.all_ok(bool(torch.isfinite(f_new).all())) and phi_new < phi:
                accepted = True
                break
            mu *= 8.0
        if not accepted:
            stop = "no damped step lowers the fit residual"
            break
        it += 1
        advance(1)
        gain = (phi - phi_new) / max(phi, 1e-300)
        z, f, phi = z_new, f_new, phi_new
        mu = max(mu / 4.0, 1e-30)
        metric = monitor(f)
        history.append({"iteration": it, "fit_objective": phi, "monitor": metric, "damping": mu})
        if new_lowest(metric):
            best_metric, best_z, best_it, bad = metric, z.clone(), it, 0
        else:
            bad += 1
        if gain < 1e-6:
            stop = "the fit residual stopped decreasing"
            break
        if bad >= PATIENCE:
            stop = (
                f"no new lowest held-out exact residual for {PATIENCE} iterations (below the input's, "
                f"a new lowest is {MONITOR_MIN_GAIN:.0%} below the last kept)"
            )
            break
    sink.end()
    return NewtonResult(best_z, it, history, stop, best_it)


__all__ = ["BlockTables", "NewtonResult", "layouts", "levenberg_marquardt", "table_bytes", "tabulate"]
