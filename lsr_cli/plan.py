"""The run planner: every decision a run makes, in one place, each with its reason.

Which Jacobian path (dense ``J`` or matrix-free JVPs), which solve path (the exact spectral
path or the adaptive sketch), the chunk sizes, ``torch.compile``, the memory plan and, for
PDEs, the basis. :func:`plan_supervised` plans ``lsr refine`` on data; PDE runs plan with
:func:`choose_residual_jacobian`, :func:`choose_basis`, :func:`pde_solve_path` and
:func:`plan_pde_memory`. The report's ``jacobian`` and ``memory`` fields come from
:class:`RunPlan`. Nothing here prints; decisions taken by timing are made on rank 0 and
broadcast (:func:`~.dense.on_root`), so that every rank count takes the same path.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .budget import MemoryPlan, plan_memory
from .config import Config, LsrConfig
from .dense import choose_dense, dense_too_large, matrix_free_is_cheaper, on_root
from .distributed import SINGLE, Comm, global_norm
from .linearization import (
    CompiledJvp,
    DenseOperator,
    JacobianOperator,
    ParameterSpace,
    params_in_torchscript,
    tune_row_chunk,
)
from .linearized import LinearizedModel
from .runtime import MemoryMeter, ProgressSink, resolve_memory_budget
from .spectral import SPECTRAL_BLOCK, SPECTRAL_MAX_ENTRIES, SPECTRAL_MAX_WORK
from .timeplan import release_rank

if TYPE_CHECKING:  # the PDE types, for annotations only: plan.py does not depend on pde/
    from .pde.problem import PdeProblem
    from .pde.residual import ResidualOperators

from .sizes import (
    DENSE_MIN_COLUMNS as DENSE_MIN_COLUMNS,
)
from .sizes import (
    PDE_ROW_CHUNK as PDE_ROW_CHUNK,
)
from .sizes import (
    ROW_BUDGET as ROW_BUDGET,
)
from .sizes import (
    SKETCH_ROWS_MIN as SKETCH_ROWS_MIN,
)
from .sizes import (
    budget_source as budget_source,
)
from .sizes import (
    chunk_rows as chunk_rows,
)
from .sizes import (
    largest_rank as largest_rank,
)
from .sizes import (
    planned_columns as planned_columns,
)
from .sizes import (
    sketch_samples as sketch_samples,
)


@dataclass
class RunPlan:
    """The decisions of one run and why: the Jacobian path (``jacobian``: ``path``, ``reason``;
    PDEs add ``basis`` and ``basis_reason``), the solve path (``path``: ``spectral`` or
    ``adaptive``, ``reason``), the settings the memory plan allows (``lsr``: the rank cap), the
    memory plan, the chunk sizes and ``torch.compile``."""

    jacobian: dict[str, str]
    path: dict[str, str]
    lsr: LsrConfig
    memory: MemoryPlan
    row_chunk: int
    vjp_row_chunk: int
    compiled: CompiledJvp | None = None
    compile: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def spectral(self) -> bool:
        return self.path["path"] == "spectral"

    def compile_report(self) -> dict[str, Any] | None:
        """The report's ``compile`` field after the run (whether the compiled JVPs ran)."""
        if self.compiled is None:
            return self.compile
        return dict(self.compiled.status)

    def memory_report(self, meter: MemoryMeter, stages: dict[str, int], **extra: Any) -> dict[str, Any]:
        """The report's ``memory`` field: the budget and its source, the measured peaks, ``extra``
        (supervised: streaming and chunk sizes) and the plan."""
        return {
            "budget_bytes": self.memory.budget,
            "budget_source": budget_source(self.lsr),
            "peak_above_start_bytes": meter.peak_above_start(),
            "peak_above_start_by_stage": stages,
            "peak_kind": meter.kind,
            **extra,
            "plan": self.memory.report(),
        }


# --- supervised runs --------------------------------------------------------------------------


@dataclass
class SupervisedOperators:
    """The Jacobian operators of a supervised run, which the planner may replace by dense ones
    and whose chunks it sets: one per split (``ops``), the sketched one (``basis``: the training
    split's, or its rows ``sketch_rows`` when the sketch uses a subset), each split's samples
    here (for progress), whether any input is streamed from the file, and the run's dtype."""

    ops: dict[str, Any]
    basis: Any
    sketch_rows: Tensor | None
    num_samples: dict[str, int]
    streamed: bool
    dtype: torch.dtype
    num_sketch: int = 0  # samples the basis is sketched on (every rank's)

    def matrix_free(self) -> list[JacobianOperator]:
        return [op for op in [*self.ops.values(), self.basis] if isinstance(op, JacobianOperator)]


def plan_supervised(
    run: SupervisedOperators,
    lsr: LsrConfig,
    budget: int,
    meter: MemoryMeter,
    selection_kind: str,
    out_numel: int,
    row_chunk: int,
    sink: ProgressSink,
    comm: Comm = SINGLE,
) -> RunPlan:
    """Plan ``lsr refine`` on data, in this order: the Jacobian path (materializing ``J`` when
    it is chosen), the row chunk (``row_chunk`` samples, timed on the matrix-free path),
    ``torch.compile``, the solve path and the memory plan, whose chunk sizes and rank cap are
    applied to ``run``. Reverse mode sums over a chunk's rows, so its chunk stays the default:
    the same everywhere (streamed or not, any machine load) keeps results identical to round-off."""
    n, m = comm.sum_int(run.ops["train"].shape[0]), run.ops["train"].shape[1]
    warnings: list[str] = []
    timings: dict[str, float] = {}
    jacobian = _choose_jacobian(run, lsr, budget, n, out_numel, sink, comm, warnings, timings)
    train = run.ops["train"]  # the dense operator when J was materialized
    vjp_chunk = row_chunk
    if jacobian["path"] == "matrix_free" and lsr.row_chunk == "auto" and not run.streamed:
        row_chunk = _tune_row_chunk(run, lsr, budget, n, m, out_numel, comm, timings)
    compiled, compile_info = _plan_compile(run, lsr, jacobian["path"])
    spectral, why = spectral_path(jacobian["path"], run.basis is train, selection_kind, lsr, (n, m))
    limit = min(n, m, comm.sum_int(run.basis.shape[0]))
    widest = min(limit, lsr.max_rank + SPECTRAL_BLOCK if spectral else largest_rank(lsr) + lsr.oversampling)
    release = release_rank(comm.world)
    memory = plan_memory(
        budget,
        meter,
        train if isinstance(train, JacobianOperator) else run.basis,
        run.basis.shape[0],
        m,
        widest,
        min(widest, planned_columns(lsr)),
        largest_rank(lsr),
        out_numel,
        row_chunk,
        lsr.tangent_chunk,
        lsr.rank == "auto",
        comm,
        torch.empty(0, dtype=run.dtype).element_size(),
        # fixed ranks take one round, whose sketch is released before its SVD above
        # release_rank (subspace._grow_sketch); rank: auto keeps every round's full SVD
        release + lsr.oversampling if release is not None and lsr.rank != "auto" and not spectral else None,
    )
    if memory.max_columns < widest:
        lsr = dataclasses.replace(lsr, max_rank=max(1, memory.max_columns - lsr.oversampling))
        if spectral:
            spectral, why = False, "the memory budget caps the sketch, which then cannot exhaust J"
    for op in run.matrix_free():
        op.row_chunk = op.vjp_row_chunk = min(op.row_chunk, memory.row_chunk)
        op.tangent_chunk = memory.tangent_chunk
    warnings.extend(f"lsr.max_memory: {note}" for note in memory.adapted)
    return RunPlan(
        jacobian=jacobian,
        path={"path": "spectral" if spectral else "adaptive", "reason": why},
        lsr=lsr,
        memory=memory,
        row_chunk=memory.row_chunk,
        vjp_row_chunk=min(vjp_chunk, memory.row_chunk),
        compiled=compiled,
        compile=compile_info,
        warnings=warnings,
        timings=timings,
    )


def _choose_jacobian(
    run: SupervisedOperators,
    lsr: LsrConfig,
    budget: int,
    n: int,
    out_numel: int,
    sink: ProgressSink,
    comm: Comm,
    warnings: list[str],
    timings: dict[str, float],
) -> dict[str, str]:
    """``lsr.jacobian`` resolved, and why; the dense operators replace ``run``'s when chosen."""
    info = {"path": "matrix_free", "reason": "lsr.jacobian: matrix_free"}
    if lsr.jacobian == "matrix_free":
        return info
    t0 = time.perf_counter()
    names = ["train"] + (["val"] if "val" in run.ops else [])
    chosen = {nm: run.ops[nm] for nm in names}
    if run.streamed:
        info["reason"] = "the data are streamed from the file (larger than the memory budget)"
    elif lsr.jacobian == "auto" and planned_columns(lsr) < DENSE_MIN_COLUMNS:
        info["reason"] = (
            f"only {planned_columns(lsr)} sketch columns planned: JVPs are cheaper than materializing J "
            f"(dense pays off from about {DENSE_MIN_COLUMNS}, benchmarks/throughput.py)"
        )
    elif lsr.jacobian == "auto" and (big := dense_too_large(chosen, budget // 2, comm)):
        info["reason"] = big  # no cost probe: the dense path cannot run
    elif lsr.jacobian == "auto" and (
        slow := on_root(comm, matrix_free_is_cheaper, run.ops["train"], planned_columns(lsr), n, max_bytes=budget // 8)
    ):
        info["reason"] = slow
    else:
        advance = sink.begin("materialize J", sum(run.num_samples[nm] for nm in names))
        dense, why = choose_dense(chosen, budget // 2, advance, comm)
        sink.end()
        info = {"path": "dense" if dense else "matrix_free", "reason": why}
        if dense:
            run.ops.update(dense)
            if run.sketch_rows is not None:
                idx = run.sketch_rows
                rows = (idx[:, None] * out_numel + torch.arange(out_numel)).reshape(-1).to(dense["train"].J.device)
                run.basis = DenseOperator(dense["train"].op, dense["train"].J[rows])
            else:
                run.basis = run.ops["train"]
        elif lsr.jacobian == "dense":
            warnings.append(f"lsr.jacobian: dense was asked for but {why}; the matrix-free path ran")
    timings["materialize"] = time.perf_counter() - t0
    return info


def _tune_row_chunk(
    run: SupervisedOperators,
    lsr: LsrConfig,
    budget: int,
    n: int,
    m: int,
    out_numel: int,
    comm: Comm,
    timings: dict[str, float],
) -> int:
    """Time a few chunk sizes: a cheap model with many outputs per sample (a Cartesian DeepONet)
    runs ~9x faster in chunks of hundreds of samples than in the default. A chunk's block of
    ``J P`` (rows × rank) and its copies stay within 1/16 of the budget; timed on rank 0 and
    broadcast, so the chunk never depends on the number of ranks (it does not enter the forward
    products' values either, see :func:`~.linearization.tune_row_chunk`)."""
    t0 = time.perf_counter()
    train = run.ops["train"]
    cols = min(n, m, largest_rank(lsr)) + lsr.oversampling
    max_rows = max(train.row_chunk * out_numel, budget // (16 * 8 * cols))
    row_chunk = on_root(comm, tune_row_chunk, train, max_rows=max_rows)
    for op in run.matrix_free():
        op.row_chunk = row_chunk
    timings["tune_chunks"] = time.perf_counter() - t0
    return int(row_chunk)


def _plan_compile(
    run: SupervisedOperators, lsr: LsrConfig, path: str
) -> tuple[CompiledJvp | None, dict[str, Any] | None]:
    """``lsr.compile``: the compiled JVPs on the matrix-free operators (after tuning: the compiled
    graph has the final, static chunk shapes), or why not."""
    if lsr.compile is None:
        return None, None
    info: dict[str, Any] = {"backend": lsr.compile, "used": False}
    if path != "matrix_free":
        info["reason"] = "the dense path ran: its products are matrix products, nothing to compile"
        return None, info
    train = run.ops["train"]
    if params_in_torchscript(train.module):
        info["reason"] = (
            "a TorchScript model: torch.compile applies to plain modules (a state-dict checkpoint with model.factory)"
        )
        return None, info
    compiled = CompiledJvp(lsr.compile)
    for op in run.matrix_free():
        op.use_compiled(compiled, like=train)
    return compiled, info


def spectral_path(
    path: str, basis_is_train: bool, selection_kind: str, lsr: LsrConfig, shape: tuple[int, int]
) -> tuple[bool, str]:
    """Whether the supervised run tries the exact spectral path (:mod:`.spectral`), and why:
    ``lsr.exact``, ``J`` is held (the dense path), the basis is ``J`` itself (no
    ``lsr.sketch_rows`` subset), the rank is chosen on a validation split or by the training
    loss (held-out rows of ``J`` would have to leave the basis too), and the sketch to exhaustion
    of the global ``J`` (``shape``: every rank's rows) is bounded by
    :data:`~.spectral.SPECTRAL_MAX_WORK`. Every input is the same on every rank and for any
    number of ranks."""
    n, m = shape
    k_max = min(n, m, lsr.max_rank + SPECTRAL_BLOCK)
    if not lsr.exact:
        return False, "lsr.exact: false"
    if path != "dense":
        return False, "J is applied matrix-free"
    if not basis_is_train:
        return False, "the basis is sketched on a subset of the rows (lsr.sketch_rows)"
    if selection_kind not in ("val_loss", "train_loss"):
        return False, "the rank is chosen on held-out rows, which would have to leave the basis too"
    if n * m * k_max > SPECTRAL_MAX_WORK:
        return False, f"sketching J ({n} x {m}) to exhaustion exceeds {SPECTRAL_MAX_WORK:.0e} multiply-adds"
    return True, f"J ({n} x {m}) is held dense and small enough to sketch to exhaustion"


# --- PDE runs ---------------------------------------------------------------------------------


def choose_residual_jacobian(
    ops: dict[str, JacobianOperator], lsr: LsrConfig, comm: Comm = SINGLE
) -> tuple[dict[str, DenseOperator] | None, dict[str, str]]:
    """The residual operators ``G`` materialized (``lsr.jacobian``: auto when ``G`` fits half of
    the memory budget, or dense) so that products are BLAS-3, or ``None`` for matrix-free; and
    why. Distributed: the size is the whole ``G``'s, so every rank count takes the same path."""
    info = {"path": "matrix_free", "reason": "lsr.jacobian: matrix_free"}
    if lsr.jacobian == "auto" and planned_columns(lsr) < DENSE_MIN_COLUMNS:
        info["reason"] = f"only {planned_columns(lsr)} sketch columns planned: JVPs are cheaper than materializing G"
        return None, info
    if lsr.jacobian == "matrix_free":
        return None, info
    budget = resolve_memory_budget(lsr.max_memory, next(iter(ops.values())).device)
    dense, why = choose_dense(ops, budget // 2, None, comm)
    return dense, {"path": "dense" if dense else "matrix_free", "reason": why}


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


def pde_solve_path(lsr: LsrConfig, basis: str, jacobian_path: str, shape: tuple[int, int]) -> tuple[bool, str]:
    """Whether the PDE step tries the exact spectral path on ``G`` (``shape``: every rank's rows),
    and why: ``lsr.exact``, the residual basis, ``G`` held dense (its products are matrix
    products) and at most :data:`~.spectral.SPECTRAL_MAX_ENTRIES` entries."""
    n, m = shape
    if not lsr.exact:
        return False, "lsr.exact: false"
    if basis != "residual":
        return False, "the output basis is sketched on a subset of the points"
    if jacobian_path != "dense":
        return False, "G is applied matrix-free"
    if n * m > SPECTRAL_MAX_ENTRIES:
        return False, f"G ({n} x {m}) has more than {SPECTRAL_MAX_ENTRIES} entries"
    return True, f"G ({n} x {m}) is held dense and small, on the residual basis"


def plan_pde_memory(
    problem: PdeProblem, ops: ResidualOperators, cfg: Config, meter: MemoryMeter, comm: Comm = SINGLE
) -> tuple[Config, RunPlan]:
    """The memory plan of the PDE step (:func:`~lsr_cli.budget.plan_memory`): the basis sketch
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
    memory = plan_memory(
        resolve_memory_budget(lsr.max_memory, ops.f0.device),
        meter,
        probe,
        basis_rows,
        m,
        widest,
        min(widest, planned_columns(lsr)),
        r_max,
        1,
        4 * PDE_ROW_CHUNK,
        lsr.tangent_chunk,
        lsr.rank == "auto",
        comm,
        ops.f0.element_size(),
    )
    changes: dict[str, Any] = {"tangent_chunk": memory.tangent_chunk}
    if memory.max_columns < widest:
        changes["max_rank"] = max(1, memory.max_columns - lsr.oversampling)
        changes["exact"] = False  # a sketch capped to fit the budget cannot exhaust
    for op in ops.blocks:
        if isinstance(op, JacobianOperator):
            op.row_chunk = op.vjp_row_chunk = min(op.row_chunk, memory.row_chunk)
            op.tangent_chunk = memory.tangent_chunk
    run_lsr = dataclasses.replace(lsr, **changes)
    plan = RunPlan(
        jacobian=ops.jacobian,
        path={"path": "per step", "reason": "chosen with the basis in each step (pde_solve_path)"},
        lsr=run_lsr,
        memory=memory,
        row_chunk=memory.row_chunk,
        vjp_row_chunk=memory.row_chunk,
        compile=(
            {"backend": lsr.compile, "used": False, "reason": "not applied to physics residuals yet: they run eagerly"}
            if lsr.compile is not None
            else None
        ),
        warnings=[f"lsr.max_memory: {note}" for note in memory.adapted],
    )
    return dataclasses.replace(cfg, lsr=run_lsr), plan


__all__ = [
    "DENSE_MIN_COLUMNS",
    "ROW_BUDGET",
    "RunPlan",
    "SupervisedOperators",
    "basis_point_count",
    "budget_source",
    "choose_basis",
    "choose_residual_jacobian",
    "chunk_rows",
    "equation_is_linear",
    "largest_rank",
    "pde_solve_path",
    "plan_pde_memory",
    "plan_supervised",
    "planned_columns",
    "sketch_samples",
    "spectral_path",
]
