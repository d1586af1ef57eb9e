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
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lsr_cli.budget import MemoryPlan, plan_memory
from lsr_cli.checkpoint import LoadedCheckpoint
from lsr_cli.config import Config, LsrConfig
from lsr_cli.distributed import SINGLE, Comm, global_mean_square, global_norm
from lsr_cli.errors import CheckpointError, ConfigError, NumericalError
from lsr_cli.linearization import JacobianOperator, ParameterSpace, StackedOperator
from lsr_cli.linearized import LinearizedModel
from lsr_cli.refine import (
    DENSE_MIN_COLUMNS,
    RefineResult,
    _finite_or_raise,
    choose_dense,
    largest_rank,
    planned_columns,
    prepare_module,
)
from lsr_cli.runtime import (
    MemoryMeter,
    NoProgress,
    ProgressSink,
    no_tf32,
    peak_memory_bytes,
    resolve_memory_budget,
    start_run,
    warm_up_autodiff,
)
from lsr_cli.sketch import RangeSketch
from lsr_cli.spectral import SPECTRAL_BLOCK, SPECTRAL_MAX_ENTRIES, solve_exact_first
from lsr_cli.subspace import Selection, SubspaceResult, solve_subspace, stratified_holdout_rows

from .adaptive import MIN_GAIN, TRIGGER, AdaptiveSettings, adaptive_settings, augment, candidates
from .problem import PdeProblem, set_scales
from .subspace_newton import layouts, levenberg_marquardt, table_bytes, tabulate
from .system_report import reference_errors, unknowns_message
from .unknowns import WithUnknowns, attach_unknowns, select_space, split_delta, unknowns_report
from .validation import validation_problem
from .weights import balance_weights

ROW_CHUNK = 256
"""Collocation points per Jacobian-product chunk (second derivatives make each row costlier)."""


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
    info = {"path": "matrix_free", "reason": "lsr.jacobian: matrix_free"}
    if lsr.jacobian == "auto" and planned_columns(lsr) < DENSE_MIN_COLUMNS:
        info["reason"] = f"only {planned_columns(lsr)} sketch columns planned: JVPs are cheaper than materializing G"
    elif lsr.jacobian != "matrix_free":
        device = ops[0].device
        budget = resolve_memory_budget(lsr.max_memory, device)
        dense, why = choose_dense(
            {b.name: op for b, op in zip(problem.blocks, ops, strict=True)}, budget // 2, None, comm
        )
        info = {"path": "dense" if dense else "matrix_free", "reason": why}
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


def _global_to_local(problem: PdeProblem) -> Tensor:
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


def _local_selection(rows: Tensor, to_local: Tensor) -> Tensor:
    """The global rows ``rows`` held here, as local rows (order kept)."""
    mapped = to_local[rows]
    return mapped[mapped >= 0]


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
    to_local = _global_to_local(problem)
    if validation is not None:  # fresh points, never fitted (validation.py): every fit row is fitted
        selection = validation
    else:
        split = stratified_holdout_rows([b.num_global for b in problem.blocks], lsr.holdout, gen)
        if split is not None and comm.world > 1:
            split = (_local_selection(split[0], to_local), _local_selection(split[1], to_local))
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
            idx = _local_selection(idx, to_local)
        idx = idx.to(pts.device)
        basis_op = JacobianOperator(module, space, (pts[idx],), basis_chunk, lsr.tangent_chunk, probe=(pts[:1],))
        if ops.jacobian["path"] == "dense":
            budget = resolve_memory_budget(lsr.max_memory, basis_op.device)
            dense, _ = choose_dense({"basis": basis_op}, budget // 2, None, comm)
            if dense is not None:
                basis_op = dense["basis"]
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

    n, m = comm.sum_int(ops.G.shape[0]), ops.G.shape[1]
    if (
        lsr.exact
        and basis == "residual"
        and ops.jacobian["path"] == "dense"
        and n * m <= SPECTRAL_MAX_ENTRIES  # ops.G: the dense blocks, products are matrix products
    ):
        return solve_exact_first(ops.G, ops.f0, selection, lsr, gen, sink, label, adaptive, comm)
    return adaptive()


def basis_point_count(problem: PdeProblem, lsr: LsrConfig, total: int) -> int:
    """Points on which the output basis is sketched: ``pde.basis_points`` (``auto``: the largest
    rank + oversampling + 1000), at most the ``total`` points of every block."""
    count = problem.basis_points if problem.basis_points != "auto" else largest_rank(lsr) + lsr.oversampling + 1000
    return min(int(count), total)


LINEARITY_ROWS = 256
"""Rows per block on which ``auto`` checks that the equation is linear in ``u``."""


def equation_is_linear(
    module: nn.Module, problem: PdeProblem, space: ParameterSpace, ops: ResidualOperators, comm: Comm = SINGLE
) -> bool:
    """Whether the residual of ``q0 + J v`` equals its linearization ``f0 + G v`` (to 1e-8) for a
    random step ``v`` as large as ``f0``, on the first :data:`LINEARITY_ROWS` points of each block
    (``G`` held dense; a private generator, so the run's random stream is unchanged).
    Distributed: the same global points, on the ranks that hold them, and global sums."""
    gen = torch.Generator().manual_seed(1234)
    v = torch.randn(space.num, generator=gen, dtype=ops.f0.dtype).to(ops.f0.device)
    Gv = ops.G.matvec(v)
    v = v * (global_norm(ops.f0, comm) / max(global_norm(Gv, comm), 1e-300))
    model = LinearizedModel(module, space.unflatten_vector(v))
    start, gap, size = 0, 0.0, 0.0
    with torch.no_grad():
        for b, op in zip(problem.blocks, ops.blocks, strict=True):
            n = int(b.points.shape[0])
            k = max(0, min(n, LINEARITY_ROWS - b.first_point))  # this rank's rows among the block's first
            if k > 0:
                lin = ops.f0[start : start + k] + op.J[:k] @ v
                exact = b.residual(model, tuple(x[:k] for x in b.inputs)).reshape(-1)
                gap += float((exact - lin).square().sum())
                size += float(lin.square().sum())
            start += n
    gap, size = comm.sum_float(gap), comm.sum_float(size)
    return gap <= 1e-16 * max(size, 1e-300)


def choose_basis(
    module: nn.Module, problem: PdeProblem, space: ParameterSpace, ops: ResidualOperators, comm: Comm = SINGLE
) -> tuple[str, str]:
    """``pde.basis`` resolved, and why (the same for any number of ranks). ``auto`` is ``residual``
    when ``G`` is held dense, has at most :data:`~lsr_cli.spectral.SPECTRAL_MAX_ENTRIES` entries and the equation
    is linear in ``u`` (its exact singular basis is then affordable and keeps directions that the
    output Jacobian loses to round-off); else ``output`` (on a nonlinear equation such as Burgers
    the residual basis gives large linearized steps that the true residual does not follow)."""
    if problem.basis != "auto":
        return problem.basis, f"pde.basis: {problem.basis}"
    n, m = comm.sum_int(ops.G.shape[0]), ops.G.shape[1]
    if ops.jacobian["path"] != "dense":
        return (
            "output",
            "auto: G is applied matrix-free; the output Jacobian on a subset of points is cheaper to sketch",
        )
    if n * m > SPECTRAL_MAX_ENTRIES:
        return "output", f"auto: G ({n} x {m}) has more than {SPECTRAL_MAX_ENTRIES} entries"
    if not equation_is_linear(module, problem, space, ops, comm):
        return "output", "auto: the equation is nonlinear in u (the linearized residual differs from the exact one)"
    return "residual", f"auto: G ({n} x {m}) is held dense and small, and the equation is linear in u"


STAGE_MIN_SECONDS = 120.0
STAGE_TIME_FACTOR = 3.0


def stage_time_limit(sub: SubspaceResult) -> float:
    """Wall-time cap of the exact-residual stage: a few times what LSR's own step took (at
    least two minutes), so that on a large problem it cannot dominate the run."""
    lsr_seconds = sum(sub.timings.get(k, 0.0) for k in ("sketch", "project", "solve"))
    return max(STAGE_MIN_SECONDS, STAGE_TIME_FACTOR * lsr_seconds)


@dataclass
class ExactStep:
    """The step ``dz`` (``None``: the input is kept), the residuals of its predictor — the
    Gauss–Newton model's ``f0 + G dz`` (``f_lin``) and the predictor's own (``f_after``) — and
    what the exact-residual stage did (``info``, for the report)."""

    dz: Tensor | None
    f_lin: Tensor
    f_after: Tensor
    info: dict[str, Any]


def _step_residuals(
    module: nn.Module, problem: PdeProblem, space: ParameterSpace, ops: ResidualOperators, dz: Tensor
) -> tuple[Tensor, Tensor]:
    """``f0 + G dz`` and the residual of the refined predictor ``q0 + J dz`` itself (they differ
    by the equation's nonlinear terms, e.g. ``w·w_x`` for Burgers with ``w = J dz``)."""
    f_lin = ops.f0 + ops.G.matvec(dz)
    return f_lin, true_residual(LinearizedModel(module, space.unflatten_vector(dz)), problem)


def exact_step(
    module: nn.Module,
    problem: PdeProblem,
    space: ParameterSpace,
    ops: ResidualOperators,
    sub: SubspaceResult,
    cfg: Config,
    comm: Comm = SINGLE,
    sink: ProgressSink | None = None,
    validation: PdeProblem | None = None,
) -> ExactStep:
    """LSR's step ``sub.dz``, moved to minimize the refined predictor's *exact* residual in
    LSR's subspace (see :mod:`.subspace_newton`) when the equation is nonlinear."""
    if sub.dz is None:
        return ExactStep(None, ops.f0, ops.f0, {"ran": False, "reason": "LSR kept the input (rank 0)"})
    f_lin, f_after = _step_residuals(module, problem, space, ops, sub.dz)
    z, info = _exact_stage(module, problem, space, ops, sub, f_lin, f_after, cfg, comm, sink, validation)
    if z is None:
        return ExactStep(sub.dz, f_lin, f_after, info)
    assert sub.basis is not None
    dz = sub.basis @ z
    return ExactStep(dz, *_step_residuals(module, problem, space, ops, dz), info)


def _exact_stage(
    module: nn.Module,
    problem: PdeProblem,
    space: ParameterSpace,
    ops: ResidualOperators,
    sub: SubspaceResult,
    f_lin: Tensor,
    f_after: Tensor,
    cfg: Config,
    comm: Comm,
    sink: ProgressSink | None,
    validation: PdeProblem | None = None,
) -> tuple[Tensor | None, dict[str, Any]]:
    """The new reduced step ``z`` (``None``: keep LSR's) and what was done."""
    info: dict[str, Any] = {"ran": False}
    limit = problem.nonlinear_iterations
    gap = global_norm(f_after - f_lin, comm)
    info["exact_minus_linearized_norm"] = gap
    info["lsr_step_residual_loss"] = global_mean_square(f_after, comm)
    if limit == 0:
        info["reason"] = "pde.nonlinear_iterations: 0"
        return None, info
    if sub.basis is None or sub.z is None:
        info["reason"] = "LSR kept the input (rank 0)"
        return None, info
    if gap <= 1e-8 * max(global_norm(ops.f0, comm), 1e-300):
        info["reason"] = "the equation is linear here: the predictor's residual equals the linearized one"
        return None, info
    layout = layouts(problem, module)
    need = table_bytes(problem, layout, int(sub.z.shape[0]))
    if validation is not None:
        need += table_bytes(validation, layouts(validation, module), int(sub.z.shape[0]))
    need = comm.sum_int(need)  # all ranks: the same choice for any N
    budget = resolve_memory_budget(cfg.lsr.max_memory, ops.f0.device)
    info["table_bytes"] = need
    if need > budget // 2:
        info["reason"] = f"its tables need {need / 2**20:.0f} MiB, more than half of the memory budget"
        return None, info
    time_limit = stage_time_limit(sub)
    t0 = time.perf_counter()
    try:
        dense = ops.jacobian["path"] == "dense"
        tables = tabulate(module, problem, space, sub.basis, cfg.lsr.tangent_chunk, dense, layout)
        info["tables"] = "per-point Jacobians x P" if dense else "JVPs"
        check = torch.cat([t.at(sub.z) for t in tables])
        mismatch = global_norm(check - f_after, comm) / max(global_norm(f_after, comm), 1e-300)
        if mismatch > 1e-6:
            info["reason"] = f"the tabulated residual differs from the predictor's by {mismatch:.1e} (not pointwise?)"
            return None, info
        sel = sub.selection
        fit_rows = sel.fit_rows if sel is not None else None
        hold_rows = sel.hold_rows if sel is not None else None
        if validation is not None:  # monitored: the predictor's exact residual at the validation points
            n_fit = int(check.shape[0])
            val_tables = tabulate(module, validation, space, sub.basis, cfg.lsr.tangent_chunk, dense)
            n_val = sum(int(t.base.shape[0]) for t in val_tables)
            tables = tables + val_tables
            fit_rows = torch.arange(n_fit, device=check.device)
            hold_rows = torch.arange(n_fit, n_fit + n_val, device=check.device)
        result = levenberg_marquardt(
            tables,
            sub.z,
            sub.lambda_abs,
            fit_rows,
            hold_rows,
            limit,
            time_limit=time_limit,
            progress=sink,
            comm=comm,
        )
    except RuntimeError as exc:  # a user residual asking for something the tables lack, ...
        info["reason"] = f"skipped: {str(exc).splitlines()[0][:200]}"
        return None, info
    h = result.history
    info.update(
        {
            "ran": True,
            "iterations": result.iterations,
            "stop_reason": result.stop_reason,
            "lambda": sub.lambda_abs,
            "time_limit": time_limit,
            "monitor": (
                "validation points' exact residual"
                if validation is not None
                else "holdout exact residual"
                if sub.selection and sub.selection.hold_rows is not None
                else "fit"
            ),
            "monitor_start": h[0]["monitor"],
            "monitor_best": min(e["monitor"] for e in h),
            "history": h,
            "time": time.perf_counter() - t0,
        }
    )
    if bool(torch.equal(result.z, sub.z)):
        info["reason"] = "no iterate lowered the monitored exact residual; LSR's step kept"
        return None, info
    return result.z, info


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
        budget = resolve_memory_budget(cfg.lsr.max_memory, ops.f0.device)
        dense, _ = choose_dense(
            {b.name: op for b, op in zip(val.blocks, val_ops, strict=True)}, budget // 4, None, comm
        )
        if dense is not None:
            val_ops = [dense[b.name] for b in val.blocks]
    G_val = StackedOperator(val_ops)
    f_val = G_val.forward()
    _finite_or_raise(f_val, "the physics residual at the validation points", comm)
    info["loss_before"] = global_mean_square(f_val, comm)
    return Validation(val, Selection("val_loss", op=G_val, f0=f_val), info)


def plan_pde_memory(
    problem: PdeProblem, ops: ResidualOperators, cfg: Config, meter: MemoryMeter, comm: Comm = SINGLE
) -> tuple[Config, MemoryPlan]:
    """The memory plan of the LSR step (:func:`~lsr_cli.budget.plan_memory`): the basis sketch
    over the basis points (or every residual row for the residual basis), the projection of
    every residual row, the workspace of the residual's Jacobian products (second input
    derivatives: the costliest). Returns the config with the rank cap and tangent chunk the plan
    allows, and the plan; the residual operators take its row chunk."""
    lsr = cfg.lsr
    n_local, m = ops.G.shape
    n = comm.sum_int(n_local)
    r_max = largest_rank(lsr)
    if problem.basis == "residual":
        basis_rows = n_local
    else:
        basis_rows = -(-basis_point_count(problem, lsr, n) // comm.world)  # this rank's share, rounded up
    widest = min(n, m, max(r_max + lsr.oversampling, r_max + SPECTRAL_BLOCK if problem.basis != "output" else 0))
    probe = next((op for op in ops.blocks if isinstance(op, JacobianOperator)), None)
    plan = plan_memory(
        resolve_memory_budget(lsr.max_memory, ops.f0.device),
        meter,
        probe,
        basis_rows,
        m,
        widest,
        min(widest, planned_columns(lsr)),
        r_max,
        1,
        4 * ROW_CHUNK,
        lsr.tangent_chunk,
        lsr.rank == "auto",
        comm,
        ops.f0.element_size(),
    )
    changes: dict[str, Any] = {"tangent_chunk": plan.tangent_chunk}
    if plan.max_columns < widest:
        changes["max_rank"] = max(1, plan.max_columns - lsr.oversampling)
        changes["exact"] = False  # a sketch capped to fit the budget cannot exhaust
    for op in ops.blocks:
        if isinstance(op, JacobianOperator):
            op.row_chunk = op.vjp_row_chunk = min(op.row_chunk, plan.row_chunk)
            op.tangent_chunk = plan.tangent_chunk
    return dataclasses.replace(cfg, lsr=dataclasses.replace(lsr, **changes)), plan


def _predictor(module: nn.Module, space: ParameterSpace, dz: Tensor | None) -> nn.Module:
    """The refined predictor ``q(θ0, x) + J(x) dz`` (the network itself when ``dz`` is ``None``)."""
    return LinearizedModel(module, space.unflatten_vector(dz)) if dz is not None else module


def _validation_parts(
    module: nn.Module, space: ParameterSpace, dz: Tensor | None, val: PdeProblem, comm: Comm
) -> tuple[float, dict[str, float]]:
    """The refined predictor's exact weighted residual loss at the validation points, and each
    block's part ``w_b · mean_b(r²)`` of it (the parts sum to the loss), from one evaluation."""
    f = true_residual(_predictor(module, space, dz), val)
    weights = {b.name: b.weight for b in val.blocks}
    parts = {name: weights[name] * loss for name, loss in block_losses(f, val, comm).items()}
    return global_mean_square(f, comm), parts


def _validation_loss(module: nn.Module, space: ParameterSpace, dz: Tensor, val: PdeProblem, comm: Comm) -> float:
    """The refined predictor's exact weighted residual loss at the validation points."""
    return global_mean_square(true_residual(_predictor(module, space, dz), val), comm)


def _validation_report(
    validation: Validation, module: nn.Module, space: ParameterSpace, dz: Tensor | None, comm: Comm
) -> dict[str, Any]:
    """What the choices were made on, and the refined predictor's exact residual loss there."""
    info = dict(validation.info)
    if validation.problem is not None:
        info["loss_after"] = (
            _validation_loss(module, space, dz, validation.problem, comm) if dz is not None else info["loss_before"]
        )
    return info


def _choose_step(
    module: nn.Module,
    problem: PdeProblem,
    space: ParameterSpace,
    ops: ResidualOperators,
    cfg: Config,
    plan: MemoryPlan,
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
        sub = lsr_step(module, problem, space, ops, cfg, gen, sink, comm, plan.row_chunk, plan.fold_budget, selection)
        return sub, exact_step(module, problem, space, ops, sub, cfg, comm, sink, validation.problem)

    sub, step = one_shot(validation.selection if mode == "choose" else None)
    if mode != "auto" or validation.problem is None:
        return sub, step
    # the guard: a step that raises the exact residual at points never fitted is not kept, and
    # one the held-out rows or GCV refused is tried on the points never fitted
    before = float(validation.info["loss_before"])
    after = _validation_loss(module, space, step.dz, validation.problem, comm) if step.dz is not None else before
    guard: dict[str, Any] = {"loss_before": before, "loss_after_first_choice": after}
    validation.info["guard"] = guard
    if after < before:
        guard["outcome"] = "kept: the step lowered the validation loss"
        return sub, step
    step_first = step.dz
    sub, step = one_shot(validation.selection)
    again = _validation_loss(module, space, step.dz, validation.problem, comm) if step.dz is not None else before
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


def _adaptive_rounds(
    module: nn.Module,
    problem: PdeProblem,
    space: ParameterSpace,
    ops: ResidualOperators,
    cfg: Config,
    meter: MemoryMeter,
    gen: torch.Generator,
    sink: ProgressSink,
    comm: Comm,
    validation: Validation,
    settings: AdaptiveSettings,
    first: tuple[SubspaceResult, ExactStep, MemoryPlan],
) -> tuple[PdeProblem, ResidualOperators, SubspaceResult, ExactStep, MemoryPlan]:
    """Residual-based adaptive collocation (:mod:`.adaptive`): rounds of added points while the
    validation loss is well above the fit loss and falls; returns the best round's problem,
    operators and step. Recorded in ``validation.info["adaptive"]``."""
    assert validation.problem is not None
    sub, step, plan = first
    t0 = time.perf_counter()
    best_val, best_blocks = _validation_parts(module, space, step.dz, validation.problem, comm)
    if step.dz is None:
        best_val = float(validation.info["loss_before"])
    fit = global_mean_square(step.f_after, comm)
    log: list[dict[str, Any]] = [
        {"round": 0, "points_added": {}, "fit_loss": fit, "validation_loss": best_val, "validation_blocks": best_blocks}
    ]
    info: dict[str, Any] = {"trigger": TRIGGER, "rounds": log}
    validation.info["adaptive"] = info
    best = (problem, ops, sub, step, plan)
    kept = 0
    guards = {0: validation.info.get("guard")}
    for k in range(settings.rounds):
        if not best_val > TRIGGER * fit:
            info["stop_reason"] = f"the validation loss is within {TRIGGER:g}x the fit loss"
            break
        if time.perf_counter() - t0 > settings.time_limit:
            info["stop_reason"] = f"the time limit pde.adaptive.time_limit ({settings.time_limit:g} s)"
            break
        cand = candidates(problem, cfg.seed, k)
        if cand is None:
            info["stop_reason"] = "no pde block allows candidate points"
            break
        cand.to(ops.f0.device, ops.f0.dtype)
        cand_gen = torch.Generator().manual_seed(cfg.seed + k)
        new_problem, added = augment(best[0], cand, _predictor(module, space, best[3].dz), k, cand_gen, comm)
        if not added:
            info["stop_reason"] = "the residual at the candidates is zero or not finite"
            break
        sink.begin(f"adaptive collocation round {k + 1}: {sum(added.values())} points added", 1)(1)
        sink.end()
        new_ops = build_operators(module, new_problem, space, cfg, comm=comm)
        new_cfg, new_plan = plan_pde_memory(new_problem, new_ops, cfg, meter, comm)
        new_sub, new_step = _choose_step(
            module, new_problem, space, new_ops, new_cfg, new_plan, gen, sink, comm, validation
        )
        val, blocks = _validation_parts(module, space, new_step.dz, validation.problem, comm)
        if new_step.dz is None:
            val = math.inf
        fit = global_mean_square(new_step.f_after, comm)
        log.append(
            {
                "round": k + 1,
                "points_added": added,
                "rank": new_sub.rank,
                "fit_loss": fit,
                "validation_loss": val,
                "validation_blocks": blocks,
                "seconds": time.perf_counter() - t0,
            }
        )
        guards[k + 1] = validation.info.get("guard")
        if not val < (1.0 - MIN_GAIN) * best_val:
            info["stop_reason"] = f"round {k + 1} did not lower the validation loss by {MIN_GAIN:.0%}"
            break
        # a round that trades one block for another is not kept: a block may rise at most by the
        # square root of the factor by which the total fell (measured on a Helmholtz PINN: the
        # total fell 21x, the boundary's part rose 38x, the reference error rose 4x; on the
        # Poisson sample the total fell 31 000x, the boundary's part rose 1.4x at round-off, and
        # the error fell 8.6x)
        allowed = max(1.0 + MIN_GAIN, math.sqrt(best_val / val)) if val > 0 else math.inf
        rose = [name for name, loss in blocks.items() if loss > allowed * best_blocks.get(name, math.inf)]
        if rose:
            info["stop_reason"] = (
                f"round {k + 1} raised the validation loss of block(s) {', '.join(rose)} by more than "
                f"{allowed:.3g}x (the square root of the total's fall)"
            )
            break
        best_val, best_blocks, kept = val, blocks, k + 1
        best = (new_problem, new_ops, new_sub, new_step, new_plan)
        problem = new_problem
    else:
        info["stop_reason"] = f"pde.adaptive.rounds ({settings.rounds})"
    info["kept_round"] = kept
    if guards.get(kept) is not None:  # the guard of the kept round's choice
        validation.info["guard"] = guards[kept]
    totals: dict[str, int] = {}
    for b in best[0].blocks:
        if "adaptive_of" in b.spec:
            totals[b.spec["adaptive_of"]] = totals.get(b.spec["adaptive_of"], 0) + b.num_global
    info["points_added"] = totals
    info["seconds"] = time.perf_counter() - t0
    return best


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
        validation = make_validation(module, problem, space, ops, cfg, comm)
        settings = adaptive_settings(problem.raw)
        run_cfg, plan = plan_pde_memory(problem, ops, cfg, meter, comm)
        sub, step = _choose_step(module, problem, space, ops, run_cfg, plan, gen, sink, comm, validation)
        if settings is not None and validation.problem is not None:
            problem, ops, sub, step, plan = _adaptive_rounds(
                module, problem, space, ops, cfg, meter, gen, sink, comm, validation, settings, (sub, step, plan)
            )
        stage_peaks["sketch_project_solve"] = meter.peak_above_start()
        timings.update(sub.timings)
        t1 = time.perf_counter()
        dz, f_lin, f_after, nonlinear = step.dz, step.f_lin, step.f_after, step.info
        delta = (
            space.unflatten_vector(dz) if dz is not None else {space.names[0]: torch.zeros_like(named[space.names[0]])}
        )
        timings["nonlinear"] = float(nonlinear.get("time", 0.0))
        net_params = {k: named[k].detach() + v for k, v in delta.items()}
        f_net = torch.cat([op.forward(net_params).reshape(-1) for op in ops.blocks])
        before_b, after_b, lin_b, net_b = (block_losses(f, problem, comm) for f in (ops.f0, f_after, f_lin, f_net))
        residuals = {
            name: {
                "before": before_b[name],
                "after": after_b[name],
                "after_linearized": lin_b[name],
                "network_after": net_b[name],
            }
            for name in before_b
        }
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

    total_before = global_mean_square(ops.f0, comm)
    for b in problem.blocks:
        residuals[b.name]["weight"] = b.weight
    total_after = global_mean_square(f_after, comm)
    lin_total = global_mean_square(f_lin, comm)
    if sub.rank == 0:
        status, message = (
            "unchanged",
            "no rank lowered the held-out residual loss; the refined predictor equals the input",
        )
    else:
        status = "improved"
        if nonlinear.get("ran") and not nonlinear.get("reason"):
            message = (
                f"rank {sub.rank}: the refined predictor's own residual loss {total_before:.3g} -> "
                f"{total_after:.3g} after {nonlinear['iterations']} Levenberg-Marquardt steps on the exact "
                f"residual in the subspace (LSR's linearized step alone: {nonlinear['lsr_step_residual_loss']:.3g})"
            )
        else:
            message = (
                f"rank {sub.rank}: linearized residual loss {total_before:.3g} -> {lin_total:.3g}; "
                f"the refined predictor's own residual loss {total_before:.3g} -> {total_after:.3g}"
            )
        if "reference" in errors:
            ref = errors["reference"]
            ratio = (ref["before"]["rel_l2"] or 0.0) / max(ref["after"]["rel_l2"] or 0.0, 1e-300)
            message += f"; error vs the reference {ratio:.3g}x lower"
    if unknowns:
        message += f"; {unknowns_message(unknowns)}"
    warnings = [f"lsr.max_memory: {note}" for note in plan.adapted]
    if sub.rank > 0 and total_after > total_before:
        warnings.append(
            f"the refined predictor's own residual loss ({total_after:.3g}) is above the input's "
            f"({total_before:.3g}): the equation is nonlinear and the correction is large where the "
            "solution is steep; the collocation points may not resolve a front (add points there, "
            "e.g. a block with `region:`), and judge the result by a reference solution"
        )
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
        residual_loss={
            "before": total_before,
            "after": total_after,
            "after_linearized": lin_total,
            "weights": problem.weights or {"mode": "config", "weights": {b.name: b.weight for b in problem.blocks}},
        },
        jacobian=ops.jacobian,
        nonlinear=nonlinear,
        validation=_validation_report(validation, module, space, dz, comm),
        memory={
            "budget_bytes": plan.budget,
            "budget_source": "lsr.max_memory" if cfg.lsr.max_memory != "auto" else "auto: half of the free memory",
            "peak_above_start_bytes": meter.peak_above_start(),
            "peak_above_start_by_stage": stage_peaks,
            "peak_kind": meter.kind,
            "plan": plan.report(),
        },
        compile=(
            {
                "backend": cfg.lsr.compile,
                "used": False,
                "reason": "not applied to physics residuals yet: they run eagerly",
            }
            if cfg.lsr.compile is not None
            else None
        ),
        unknowns=unknowns,
        components=components,
    )


__all__ = [
    "ExactStep",
    "exact_step",
    "prepare_pde_run",
    "ResidualOperators",
    "block_losses",
    "build_operators",
    "check_blocks",
    "check_points_fit",
    "choose_basis",
    "lsr_step",
    "refine_pde",
]
