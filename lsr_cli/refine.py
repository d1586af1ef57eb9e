"""One-shot LSR end to end, as a library call: :func:`refine` and :func:`evaluate`.

``refine`` linearizes the training residual ``f(θ) = vec(q(θ, X) − Y)`` at the checkpoint's
weights, sketches the Jacobian (:mod:`.sketch`), projects it on the scaled basis ``P``
(``A = J P`` by JVPs), solves the reduced problem in float64 for a sweep of ranks and
regularizations (:mod:`.solve`), and keeps the candidate with the lowest validation loss
(training loss without a validation split). Rank 0, the unchanged model, is always a
candidate. With ``rank: auto`` the rank grows geometrically, reusing the sketch, while the
selection loss keeps falling. Nothing here prints; progress goes to an optional sink.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .budget import plan_memory
from .checkpoint import LoadedCheckpoint
from .config import Config, LsrConfig
from .data import LazyArray, Split
from .distributed import SINGLE, Comm, local_rows
from .errors import CheckpointError, ConfigError, NumericalError
from .linearization import (
    CompiledJvp,
    DenseOperator,
    JacobianOperator,
    ParameterSpace,
    make_functional,
    materialize,
    num_rows,
    params_in_torchscript,
    real_numel,
    take_rows,
    tune_row_chunk,
)
from .linearized import LinearizedModel
from .metrics import error_metrics, global_error_metrics
from .runtime import (
    TORCH_DTYPES,
    MemoryMeter,
    NoProgress,
    ProgressSink,
    cast_module,
    cast_tensor,
    no_tf32,
    peak_memory_bytes,
    resolve_device,
    resolve_memory_budget,
    start_run,
    warm_up_autodiff,
)
from .sketch import RangeSketch
from .spectral import SPECTRAL_BLOCK, SPECTRAL_MAX_WORK, solve_exact_first
from .subspace import Selection, SubspaceResult, SweepEntry, fold_rows, holdout_rows, solve_subspace

__all__ = ["TORCH_DTYPES", "ProgressSink", "RefineResult", "evaluate", "refine", "resolve_device"]

ROW_BUDGET = 16384
"""Default row chunk: samples × outputs per chunk (512 scalar rows × 32 tangents measured fastest here)."""


@dataclass
class RefineResult:
    """Everything :func:`refine` measured; ``model`` computes the refined predictor."""

    status: str
    message: str
    model: LinearizedModel
    delta: dict[str, Tensor]
    rank: int
    selection_metric: str
    regularization: dict[str, Any]
    rank_sweep: list[SweepEntry]
    errors: dict[str, dict[str, dict[str, float | None]]]
    timings: dict[str, float]
    singular_values: list[float]
    num_parameters: int
    num_linearized_parameters: int
    num_residuals: int
    device: str
    dtype: str
    peak_memory_bytes: int
    peak_memory_kind: str
    warnings: list[str] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    stop_reason: str = ""
    residual_blocks: dict[str, dict[str, float]] | None = None  # PDE: mean square per block
    residual_loss: dict[str, Any] | None = None  # PDE: weighted total before/after, the block weights
    memory: dict[str, Any] | None = None  # budget, peak above start, what was streamed
    jacobian: dict[str, str] | None = None  # which Jacobian path ran (dense / matrix_free) and why
    compile: dict[str, Any] | None = None  # lsr.compile: backend, whether it ran, first-call seconds or why not
    nonlinear: dict[str, Any] | None = None  # PDE: the exact-residual stage in the subspace (subspace_newton)
    validation: dict[str, Any] | None = None  # PDE: the validation points the choices were made on
    unknowns: dict[str, dict[str, Any]] | None = None  # PDE: unknown constants before/after (pde.unknowns)
    components: dict[str, Any] | None = None  # PDE systems: the reference errors per output component


def _chunk_rows(out_numel: int, cfg_row_chunk: int | str) -> int:
    if cfg_row_chunk == "auto":
        return max(1, ROW_BUDGET // max(1, out_numel) // 32)
    return int(cfg_row_chunk)


def prepare_module(ckpt: LoadedCheckpoint, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The base network in the refinement dtype on the device, eval mode (floating buffers cast too)."""
    try:
        module = cast_module(ckpt.module, dtype, device)
    except Exception as exc:  # exotic modules
        raise CheckpointError(f"{ckpt.path}: cannot move the model to {device}/{dtype}: {exc}") from None
    module.eval()
    return module


def predict(
    module: nn.Module,
    inputs: tuple[Tensor, ...],
    row_chunk: int,
    params: dict[str, Tensor] | None = None,
    shared: tuple[bool, ...] = (),
) -> Tensor:
    """Model output ``[N, ...]`` in row chunks without autograd (optionally with replaced parameters).

    Inputs flagged in ``shared`` have no sample dimension and are passed whole."""
    call = make_functional(module) if params is not None else None
    outs = []
    n = num_rows(inputs, shared)
    with torch.no_grad():
        for s in range(0, n, row_chunk):
            rows = take_rows(inputs, s, s + row_chunk, shared)
            out = call(params, rows) if call is not None and params is not None else module(*rows)
            outs.append(out.detach())
        if not outs:  # no rows here (a distributed rank's empty share): the output's shape, zero rows
            flags = tuple(shared) + (False,) * (len(inputs) - len(shared))
            zero = tuple(x if f else x.new_zeros((1, *x.shape[1:])) for x, f in zip(inputs, flags, strict=True))
            out = call(params, zero) if call is not None and params is not None else module(*zero)
            return out.detach()[:0]
    return torch.cat(outs)


def check_fit(module: nn.Module, split: Split, where: str, num_rows: int = 4) -> Split:
    """One forward pass on a few rows: the inputs must fit the model and the output the targets.

    Returns the split with targets reshaped to the output shape when only the layout differs
    (e.g. targets ``[N]`` for outputs ``[N, 1]``).
    """
    rows = take_rows(split.inputs, 0, num_rows, split.shared)
    batch = min(num_rows, split.num_samples)
    try:
        with torch.no_grad():
            out = module(*rows)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        shapes = ", ".join(
            f"{n} {tuple(x.shape) if sh else tuple(x.shape[1:])}{' (shared)' if sh else ''}"
            for n, x, sh in zip(
                split.input_names, split.inputs, split.shared or (False,) * len(split.inputs), strict=True
            )
        )
        raise CheckpointError(
            f"{where}: the model does not accept the inputs ({shapes} per sample, "
            f"{len(split.inputs)} positional input(s)): {first[:200]}"
        ) from None
    if not isinstance(out, Tensor):
        raise CheckpointError(f"{where}: the model returned {type(out).__name__}; lsr needs a single tensor output")
    if out.dim() == 0 or out.shape[0] != batch:
        raise CheckpointError(
            f"{where}: the model output's leading dimension {tuple(out.shape)[:1]} is not the batch size {batch}"
        )
    t_shape = tuple(split.targets.shape[1:])
    o_shape = tuple(out.shape[1:])
    if t_shape != o_shape:
        if math.prod(t_shape) != math.prod(o_shape):
            raise CheckpointError(f"{where}: targets have shape {t_shape} per sample but the model outputs {o_shape}")
        split = dataclasses.replace(split, targets=split.targets.reshape(split.targets.shape[0], *o_shape))
    return split


def select_parameters(module: nn.Module, cfg: Config, gen: torch.Generator) -> ParameterSpace:
    """The linearized parameters of ``module`` chosen by ``config.lsr.parameters`` (error if none)."""
    named = {n: p.detach() for n, p in module.named_parameters()}
    par = cfg.lsr.parameters
    space = ParameterSpace(named, include=par.include, exclude=par.exclude, fraction=par.fraction, generator=gen)
    if space.num == 0:
        raise ConfigError(
            f"config.lsr.parameters: no floating-point parameter is selected; parameter names are {list(named)[:8]}"
        )
    return space


def _shared(split: Split) -> tuple[bool, ...]:
    return split.shared or (False,) * len(split.inputs)


def _moved(split: Split, device: torch.device, dtype: torch.dtype) -> Split:
    """The split on ``device``, floating arrays in ``dtype`` (integer inputs keep their dtype)."""
    inputs = tuple(cast_tensor(x, dtype, device) for x in split.inputs)
    return dataclasses.replace(split, inputs=inputs, targets=split.targets.to(device=device, dtype=dtype))


SKETCH_ROWS_MIN = 8192
"""``lsr.sketch_rows: auto`` sketches every residual row up to ``max(SKETCH_ROWS_MIN, 16 k)``."""


def largest_rank(lsr: LsrConfig) -> int:
    """The largest rank a run may reach: the largest fixed rank, or ``max_rank`` for ``auto``."""
    if lsr.rank == "auto":
        return int(lsr.max_rank)
    return max(int(r) for r in lsr.rank) if isinstance(lsr.rank, list) else int(lsr.rank)


def sketch_samples(lsr: LsrConfig, num_samples: int, out_numel: int) -> int:
    """How many samples the basis sketch uses (all, or a random subset for very large data).

    ``auto``: every sample while the residual rows are at most ``max(8192, 16 k)`` with ``k``
    the largest sketch size (largest rank + oversampling); beyond that a seeded random subset
    of that many rows (whole samples). The rule does not depend on the memory budget, so a
    streamed run gives the in-memory run's result.
    """
    if lsr.sketch_rows == "auto":
        rows = max(SKETCH_ROWS_MIN, 16 * (largest_rank(lsr) + lsr.oversampling))
    else:
        rows = int(lsr.sketch_rows)
    return min(num_samples, max(1, rows // max(1, out_numel)))


FLOAT32_FLOOR_FACTOR = 100.0
"""``--dtype float32`` results within this factor of float32's epsilon are floor-limited."""


def float32_floor_warning(dtype_name: str, errors: dict[str, dict[str, dict[str, float | None]]]) -> str | None:
    """A warning when a float32 run's refined error sits near float32 round-off (1.2e-7)."""
    if dtype_name != "float32":
        return None
    eps = torch.finfo(torch.float32).eps
    hit = [
        f"{name} {e['after']['rel_l2']:.2e}"
        for name, e in errors.items()
        if e["after"]["rel_l2"] is not None and e["after"]["rel_l2"] < FLOAT32_FLOOR_FACTOR * eps
    ]
    if not hit:
        return None
    return (
        f"--dtype float32: the refined relative errors ({', '.join(hit)}) are within {FLOAT32_FLOOR_FACTOR:g}x "
        f"of float32 round-off ({eps:.1e}); the float32 floor may limit them: rerun with --dtype float64"
    )


DENSE_MIN_COLUMNS = 128
"""Below this many sketch columns, ``lsr.jacobian: auto`` stays matrix-free (materializing J costs
about as much as 100 JVP columns; measured in benchmarks/throughput.py)."""


def planned_columns(lsr: LsrConfig) -> int:
    """Sketch columns the first round will use: the (largest) fixed rank, or ``start_rank``, plus oversampling."""
    if lsr.rank == "auto":
        return min(lsr.start_rank, lsr.max_rank) + lsr.oversampling
    top = max(lsr.rank) if isinstance(lsr.rank, list) else int(lsr.rank)
    return top + lsr.oversampling


DENSE_GEMM_FLOPS = 1e9
"""Floor of the float64 GEMM rate (flop/s) measured for the dense path's cost estimate."""


def estimated_costs(t_col: float, t_mat: float, n: int, m: int, k: int, gemm_rate: float) -> tuple[float, float]:
    """Seconds of (matrix-free, dense) for ``k`` sketch columns: ``3k`` Jacobian products over
    all rows at ``t_col`` each, against materializing ``J`` (``t_mat``) plus three GEMMs of
    ``2nmk`` flops at ``gemm_rate``."""
    return 3 * k * t_col, t_mat + 3 * 2 * n * m * k / gemm_rate


def _on_root(comm: Comm, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` (a decision by timing) on rank 0, its answer broadcast to every
    rank: the run takes the same path on every rank and for any number of ranks."""
    if comm.world == 1:
        return fn(*args, **kwargs)
    answer = fn(*args, **kwargs) if comm.is_root else None
    return comm.allgather_object(answer)[0]


def matrix_free_is_cheaper(
    op: JacobianOperator,
    lsr: LsrConfig,
    num_rows: int | None = None,
    probe_samples: int = 32,
    max_bytes: int | None = None,
) -> str | None:
    """Time both paths on a few samples and extrapolate; the reason when JVPs win, else ``None``.

    Matrix-free: about ``3 k`` Jacobian products over every row (sketch ``JΩ``, ``JᵀQ``,
    projection ``JP``). Dense: materializing the per-sample Jacobians plus the same products as
    GEMMs. Cheap models with shared inputs (a Cartesian DeepONet) favour JVPs; deep networks with
    many parameters favour the dense path. ``num_rows``: the rows of the whole run (distributed:
    every rank's; default ``op``'s), to which the timings on ``op``'s first samples are
    extrapolated; the caller runs it on one rank (:func:`_on_root`), timings differ between ranks.
    ``max_bytes``: what the probe's Jacobian rows and GEMM operands may take (fewer samples and
    rows under a tight memory budget).
    """
    n_rows = op.shape[0] if num_rows is None else int(num_rows)
    if max_bytes is not None:  # per-sample Jacobian rows (out · m) and GEMM rows (m) of 8 bytes
        per_sample = 8 * max(1, op.out_numel) * op.shape[1]
        probe_samples = max(1, min(probe_samples, max_bytes // (2 * per_sample)))
    n_samples = max(1, n_rows // max(1, op.out_numel))
    s = min(probe_samples, n_samples)
    sub = JacobianOperator(
        op.module,
        op.space,
        take_rows(op.inputs, 0, s, op.shared),
        op.row_chunk,
        op.tangent_chunk,
        op.residual,
        op.shared,
    )
    k = planned_columns(lsr)
    cols = min(k, op.tangent_chunk)
    V = torch.randn(sub.shape[1], cols, generator=torch.Generator().manual_seed(0), dtype=sub.dtype).to(sub.device)
    sub.matmat(V)  # warm-up
    t0 = time.perf_counter()
    sub.matmat(V)
    t_col = (time.perf_counter() - t0) / cols * (n_samples / s)
    t0 = time.perf_counter()
    try:
        sub.jacobian_rows(0, s)
    except Exception:  # not vmappable over samples: materialize() will say why
        return None
    t_mat = (time.perf_counter() - t0) * (n_samples / s)
    n, m = n_rows, op.shape[1]
    rows = min(n, 2048) if max_bytes is None else max(1, min(n, 2048, max_bytes // (2 * 8 * m)))
    gen = torch.Generator().manual_seed(0)  # timing only; keeps the global RNG untouched
    A = torch.randn(rows, m, dtype=sub.dtype, generator=gen).to(sub.device)
    B = torch.randn(m, 64, dtype=sub.dtype, generator=gen).to(sub.device)
    A @ B  # warm-up
    t0 = time.perf_counter()
    A @ B
    gemm_rate = max(2 * rows * m * 64 / max(time.perf_counter() - t0, 1e-9), DENSE_GEMM_FLOPS)
    del A, B
    free, dense = estimated_costs(t_col, t_mat, n, m, k, gemm_rate)
    if free < dense:
        return (
            f"JVPs are estimated cheaper for {k} sketch columns ({free:.1f} s against {dense:.1f} s to materialize "
            f"J and multiply; timed on {s} samples)"
        )
    return None


def dense_too_large(ops: dict[str, Any], max_bytes: int, comm: Comm = SINGLE) -> str | None:
    """Why the operators' dense Jacobian (every rank's rows, float64) cannot be held in
    ``max_bytes``, or ``None`` when it can."""
    n = comm.sum_int(sum(op.shape[0] for op in ops.values()))
    m = next(iter(ops.values())).shape[1]
    if n * m * 8 <= max_bytes:
        return None
    return f"the dense Jacobian ({n} x {m}, {n * m * 8 / 1e6:.0f} MB) exceeds half of the memory budget ({max_bytes / 1e6:.0f} MB)"


def choose_dense(
    ops: dict[str, JacobianOperator],
    max_bytes: int,
    progress: Callable[[int], None] | None = None,
    comm: Comm = SINGLE,
) -> tuple[dict[str, DenseOperator] | None, str]:
    """Materialize every operator when together they fit ``max_bytes`` and are pointwise
    (:func:`~.linearization.materialize`); else ``(None, why)``. The check vector comes from a
    fixed private generator, so the run's random stream is the same on either path.

    Distributed (``comm``): the size is that of the whole ``J`` (every rank's rows), so the
    choice is the one a single process makes, whatever the number of ranks; each rank holds
    its own rows, and the dense path is taken only when it succeeds on every rank."""
    too_large = dense_too_large(ops, max_bytes, comm)
    if too_large is not None:
        return None, too_large
    n = comm.sum_int(sum(op.shape[0] for op in ops.values()))
    m = next(iter(ops.values())).shape[1]
    total = n * m * 8
    out: dict[str, DenseOperator] = {}
    why = ""
    for name, op in ops.items():
        dense, why = materialize(op, max_bytes, torch.Generator().manual_seed(0), progress)
        if dense is None:
            break
        out[name] = dense
    here = len(out) == len(ops)
    if not comm.all_ok(here):  # every rank takes the same path
        return None, why if not here else "materializing the Jacobian failed on another rank"
    return out, (
        f"the dense Jacobian ({n} x {m}, {total / 1e6:.0f} MB) fits half of the memory budget "
        f"({max_bytes / 1e6:.0f} MB) and the residual is pointwise"
    )


def _finite_or_raise(t: Tensor, what: str, comm: Comm = SINGLE) -> None:
    bad = int((~torch.isfinite(t)).sum())
    if comm.world > 1:
        bad = comm.sum_int(bad)  # every rank raises, or none
    if bad:
        raise NumericalError(f"{what}: {bad} non-finite value(s)")


def spectral_applies(
    path: str, basis_is_train: bool, selection: Selection, lsr: LsrConfig, shape: tuple[int, int]
) -> bool:
    """Whether the supervised run tries the exact spectral path (:mod:`.spectral`): ``lsr.exact``, ``J`` is held
    (the dense path), the basis is ``J`` itself (no ``lsr.sketch_rows`` subset), the rank is
    chosen on a validation split or by the training loss (held-out rows of ``J`` would have to
    leave the basis too), and the sketch to exhaustion of the global ``J`` (``shape``: every
    rank's rows) is bounded by :data:`~.spectral.SPECTRAL_MAX_WORK`. Every input is the same on
    every rank and for any number of ranks."""
    n, m = shape
    k_max = min(n, m, lsr.max_rank + SPECTRAL_BLOCK)
    return (
        lsr.exact
        and path == "dense"
        and basis_is_train
        and selection.kind in ("val_loss", "train_loss")
        and n * m * k_max <= SPECTRAL_MAX_WORK
    )


def refine(
    ckpt: LoadedCheckpoint,
    splits: dict[str, Split],
    cfg: Config,
    progress: ProgressSink | None = None,
    meter: MemoryMeter | None = None,
    comm: Comm = SINGLE,
) -> RefineResult:
    """Run one-shot LSR on ``ckpt`` with the training split of ``splits`` (see module doc).

    ``meter`` measures the peak memory of the run (default: one started here, after a warm-up
    of the autodiff machinery); pass one started before reading the data to count it too.

    Distributed (``comm`` with several ranks): ``splits`` hold this rank's contiguous share of
    the samples (:func:`~.data.read_data` with ``shard``); the random draws (sketch subset,
    hold-out rows) are made over all samples as on one process and each rank keeps its part,
    so the result does not depend on the number of ranks; errors are global."""
    sink = progress or NoProgress()
    timings: dict[str, float] = {}
    warnings: list[str] = []
    dtype, device, gen = start_run(cfg.dtype, cfg.device, cfg.seed)
    if meter is None:
        warm_up_autodiff(device)
        meter = MemoryMeter(device)
    budget = resolve_memory_budget(cfg.lsr.max_memory, device)
    with no_tf32():
        t0 = time.perf_counter()
        module = prepare_module(ckpt, dtype, device)
        data = {
            name: check_fit(module, _moved(s, device, dtype), f"{ckpt.path} on split '{s.group}'")
            for name, s in splits.items()
        }

        named = dict(module.named_parameters())
        space = select_parameters(module, cfg, gen)
        prev_delta = {k: cast_tensor(v, dtype, device) for k, v in (ckpt.delta or {}).items()}
        before_model = LinearizedModel(module, prev_delta) if prev_delta else module

        train = data["train"]
        out_numel = math.prod(train.targets.shape[1:])
        row_chunk = _chunk_rows(out_numel, cfg.lsr.row_chunk)
        ops: dict[str, Any] = {
            name: JacobianOperator(module, space, s.inputs, row_chunk, cfg.lsr.tangent_chunk, shared=s.shared)
            for name, s in data.items()
        }
        # reverse mode sums over a chunk's rows, so its chunk stays the default: the same
        # everywhere (streamed or not, any machine load) keeps results identical to round-off
        vjp_chunk = row_chunk
        before = {
            name: predict(before_model, s.inputs, row_chunk, shared=s.shared).reshape(s.targets.shape)
            for name, s in data.items()
        }
        for name, pred in before.items():
            _finite_or_raise(pred, f"{ckpt.path}: model output on split '{data[name].group}'", comm)
        f0 = {name: (before[name] - s.targets).reshape(-1) for name, s in data.items()}
        timings["baseline"] = time.perf_counter() - t0
        stage_peaks = {"baseline": meter.peak_above_start()}

        n_local, m = ops["train"].shape
        n = comm.sum_int(n_local)
        lsr = cfg.lsr
        basis_op: Any = ops["train"]
        num_train = train.num_global
        num_sketch = sketch_samples(lsr, num_train, out_numel)
        if num_sketch < num_train:
            idx = torch.sort(torch.randperm(num_train, generator=gen)[:num_sketch]).values
            idx = local_rows(idx, train.first_row, train.first_row + train.num_samples)
            rows = tuple(x if sh else x[idx] for x, sh in zip(train.inputs, _shared(train), strict=True))
            basis_op = JacobianOperator(
                module,
                space,
                rows,
                row_chunk,
                lsr.tangent_chunk,
                shared=train.shared,
                probe=take_rows(train.inputs, 0, 1, train.shared),
            )
        jac_info = {"path": "matrix_free", "reason": "lsr.jacobian: matrix_free"}
        streamed_data = any(isinstance(x, LazyArray) for sp in data.values() for x in sp.inputs)
        if lsr.jacobian != "matrix_free":
            t_mat = time.perf_counter()
            names = ["train"] + (["val"] if "val" in data else [])
            if streamed_data:
                jac_info["reason"] = "the data are streamed from the file (larger than the memory budget)"
            elif lsr.jacobian == "auto" and planned_columns(lsr) < DENSE_MIN_COLUMNS:
                jac_info["reason"] = (
                    f"only {planned_columns(lsr)} sketch columns planned: JVPs are cheaper than materializing J "
                    f"(dense pays off from about {DENSE_MIN_COLUMNS}, benchmarks/throughput.py)"
                )
            elif lsr.jacobian == "auto" and (big := dense_too_large({nm: ops[nm] for nm in names}, budget // 2, comm)):
                jac_info["reason"] = big  # no cost probe: the dense path cannot run
            elif lsr.jacobian == "auto" and (
                slow := _on_root(comm, matrix_free_is_cheaper, ops["train"], lsr, n, max_bytes=budget // 8)
            ):
                jac_info["reason"] = slow
            else:
                advance = sink.begin("materialize J", sum(data[nm].num_samples for nm in names))
                dense, why = choose_dense({nm: ops[nm] for nm in names}, budget // 2, advance, comm)
                sink.end()
                jac_info = {"path": "dense" if dense else "matrix_free", "reason": why}
                if dense:
                    ops.update(dense)
                    if num_sketch < num_train:
                        rows_idx = (idx[:, None] * out_numel + torch.arange(out_numel)).reshape(-1).to(device)
                        basis_op = DenseOperator(dense["train"].op, dense["train"].J[rows_idx])
                    else:
                        basis_op = ops["train"]
                elif lsr.jacobian == "dense":
                    warnings.append(f"lsr.jacobian: dense was asked for but {why}; the matrix-free path ran")
            timings["materialize"] = time.perf_counter() - t_mat
        if jac_info["path"] == "matrix_free" and lsr.row_chunk == "auto" and not streamed_data:
            # time a few chunk sizes: a cheap model with many outputs per sample (a Cartesian
            # DeepONet) runs ~9x faster in chunks of hundreds of samples than in the default
            t_tune = time.perf_counter()
            # a chunk's block of J P (rows x rank) and its copies stay within 1/16 of the budget
            cols = min(n, m, largest_rank(lsr)) + lsr.oversampling
            max_rows = max(row_chunk * out_numel, budget // (16 * 8 * cols))
            # timed on rank 0 and broadcast: the chunk never depends on the number of ranks (it
            # does not enter the forward products' values either, see tune_row_chunk)
            row_chunk = _on_root(comm, tune_row_chunk, ops["train"], max_rows=max_rows)
            for op in [*ops.values(), basis_op]:
                if isinstance(op, JacobianOperator):
                    op.row_chunk = row_chunk
            timings["tune_chunks"] = time.perf_counter() - t_tune
        compiled = None
        compile_info: dict[str, Any] | None = None
        if lsr.compile is not None:
            compile_info = {"backend": lsr.compile, "used": False}
            if jac_info["path"] != "matrix_free":
                compile_info["reason"] = "the dense path ran: its products are matrix products, nothing to compile"
            elif params_in_torchscript(module):
                compile_info["reason"] = (
                    "a TorchScript model: torch.compile applies to plain modules (a state-dict checkpoint "
                    "with model.factory)"
                )
            else:  # after tuning: the compiled graph has the final, static chunk shapes
                compiled = CompiledJvp(lsr.compile)
                for op in [*ops.values(), basis_op]:
                    if isinstance(op, JacobianOperator):
                        op.use_compiled(compiled, like=ops["train"])
        has_val = "val" in data
        if has_val:
            selection = Selection("val_loss", op=ops["val"], f0=f0["val"])
        else:
            split_rows = holdout_rows(num_train, out_numel, lsr.holdout, gen)
            if split_rows is not None and comm.world > 1:  # this rank's rows of the global split
                lo, hi = train.first_row * out_numel, (train.first_row + train.num_samples) * out_numel
                split_rows = (local_rows(split_rows[0], lo, hi), local_rows(split_rows[1], lo, hi))
            selection = (
                Selection("holdout_loss", fit_rows=split_rows[0], hold_rows=split_rows[1], holdout_fraction=lsr.holdout)
                if split_rows is not None
                else Selection("train_loss")
            )

        # what the run holds from here on, the smallest plan, the chunks that fit (budget.py)
        spectral = spectral_applies(jac_info["path"], basis_op is ops["train"], selection, lsr, (n, m))
        limit = min(n, m, comm.sum_int(basis_op.shape[0]))
        widest = min(limit, lsr.max_rank + SPECTRAL_BLOCK if spectral else largest_rank(lsr) + lsr.oversampling)
        plan = plan_memory(
            budget,
            meter,
            ops["train"] if isinstance(ops["train"], JacobianOperator) else basis_op,
            basis_op.shape[0],
            m,
            widest,
            min(widest, planned_columns(lsr)),
            largest_rank(lsr),
            out_numel,
            row_chunk,
            lsr.tangent_chunk,
            lsr.rank == "auto",
            comm,
            torch.empty(0, dtype=dtype).element_size(),
        )
        if plan.max_columns < widest:
            lsr = dataclasses.replace(lsr, max_rank=max(1, plan.max_columns - lsr.oversampling))
        row_chunk = plan.row_chunk
        for op in [*ops.values(), basis_op]:
            if isinstance(op, JacobianOperator):
                op.row_chunk = op.vjp_row_chunk = min(op.row_chunk, row_chunk)
                op.tangent_chunk = plan.tangent_chunk
        vjp_chunk = min(vjp_chunk, row_chunk)
        warnings.extend(f"lsr.max_memory: {note}" for note in plan.adapted)

        def adaptive(sketch: RangeSketch | None = None) -> SubspaceResult:
            return solve_subspace(
                basis_op,
                ops["train"],
                f0["train"],
                selection,
                lsr,
                gen,
                dtype,
                device,
                sink,
                memory_budget=plan.fold_budget,
                comm=comm,
                sketch=sketch,
            )

        if spectral and plan.max_columns == widest:  # a sketch capped to fit the budget cannot exhaust
            # the held J sketched to exhaustion, every rank scored at once (spectral.py)
            sub = solve_exact_first(ops["train"], f0["train"], selection, lsr, gen, sink, "J", adaptive, comm)
        else:
            sub = adaptive()
        timings.update(sub.timings)
        if compiled is not None:
            compile_info = dict(compiled.status)
            if not compiled.status["used"]:
                warnings.append(f"lsr.compile: {compiled.status['reason']}")
        stage_peaks["sketch_project_solve"] = meter.peak_above_start()
        metric_name = selection.kind
        if sub.rank == 0 and sub.stop_reason.startswith("the Jacobian sketch has no direction"):
            warnings.append(sub.stop_reason)

        t4 = time.perf_counter()
        dz = sub.dz
        delta_new = space.unflatten_vector(dz) if dz is not None else {}
        delta = {k: v.clone() for k, v in prev_delta.items()}
        for k, v in delta_new.items():
            delta[k] = delta[k] + v if k in delta else v
        if not delta:
            delta = {n: torch.zeros_like(named[n]) for n in space.names[:1]}
        errors: dict[str, dict[str, dict[str, float | None]]] = {}
        advance = sink.begin("evaluate", len(data))
        for name, s in data.items():
            after = before[name]
            if dz is not None:
                after = before[name] + ops[name].matvec(dz).reshape(s.targets.shape)
            net_params = {k: named[k].detach() + v for k, v in delta.items()}
            net = predict(module, s.inputs, row_chunk, net_params, s.shared).reshape(s.targets.shape)
            errors[name] = {
                "before": global_error_metrics(before[name], s.targets, comm),
                "after": global_error_metrics(after, s.targets, comm),
                "network_after": global_error_metrics(net, s.targets, comm),
            }
            advance(1)
        sink.end()
        timings["evaluate"] = time.perf_counter() - t4
        floor_warning = float32_floor_warning(cfg.dtype, errors)
        if floor_warning:
            warnings.append(floor_warning)

    if sub.rank == 0:
        status = "unchanged"
        message = (
            f"no rank lowered the {metric_name} below the starting model's; the refined predictor equals the input"
        )
    else:
        split = "val" if has_val else "train"
        ratio = (errors[split]["before"]["rel_l2"] or 0.0) / max(errors[split]["after"]["rel_l2"] or 0.0, 1e-300)
        chosen_on = {
            "val_loss": "the validation split",
            "holdout_loss": f"{lsr.holdout:.0%} of the training samples held out",
            "train_loss": "the training loss (no validation data)",
        }[metric_name]
        status = "improved"
        message = f"rank {sub.rank} (chosen on {chosen_on}) lowered the {split} relative L2 error {ratio:.3g}x"
    peak, kind = peak_memory_bytes(device)
    streamed = [s.name for s in splits.values() if any(isinstance(x, LazyArray) for x in s.inputs)]
    memory = {
        "budget_bytes": budget,
        "budget_source": "lsr.max_memory" if lsr.max_memory != "auto" else "auto: half of the free memory",
        "peak_above_start_bytes": meter.peak_above_start(),
        "peak_above_start_by_stage": {**stage_peaks, "evaluate": meter.peak_above_start()},
        "peak_kind": meter.kind,
        "streamed_splits": streamed,
        "sketch_samples": num_sketch,
        "row_chunk_samples": row_chunk,
        "vjp_row_chunk_samples": vjp_chunk,
        "qr_fold_rows": fold_rows(sub.rank or 1, plan.fold_budget),
        "plan": plan.report(),
    }
    return RefineResult(
        status=status,
        message=message,
        model=LinearizedModel(module, delta),
        delta=delta,
        rank=sub.rank,
        selection_metric=metric_name,
        regularization=sub.regularization,
        rank_sweep=sub.sweep,
        errors=errors,
        timings=timings,
        singular_values=sub.singular_values,
        num_parameters=sum(real_numel(p) for p in named.values()),
        num_linearized_parameters=space.num,
        num_residuals=n,
        device=str(device),
        dtype=cfg.dtype,
        peak_memory_bytes=peak,
        peak_memory_kind=kind,
        warnings=warnings,
        rounds=sub.rounds,
        stop_reason=sub.stop_reason,
        memory=memory,
        jacobian=jac_info,
        compile=compile_info,
    )


def evaluate(
    ckpt: LoadedCheckpoint,
    splits: dict[str, Split],
    dtype_name: str = "float64",
    device_spec: str = "cpu",
    row_chunk: int = 4096,
) -> dict[str, dict[str, float | None]]:
    """Errors of any checkpoint (plain or refined) on each split."""
    dtype = TORCH_DTYPES[dtype_name]
    device = resolve_device(device_spec)
    with no_tf32():
        module = prepare_module(ckpt, dtype, device)
        model = (
            LinearizedModel(module, {k: cast_tensor(v, dtype, device) for k, v in ckpt.delta.items()})
            if ckpt.delta
            else module
        )
        out = {}
        for name, s in splits.items():
            s = _moved(s, device, dtype)
            s = check_fit(model, s, f"{ckpt.path} on split '{s.group}'")
            pred = predict(model, s.inputs, row_chunk, shared=s.shared).reshape(s.targets.shape)
            _finite_or_raise(pred, f"{ckpt.path}: model output on split '{s.group}'")
            out[name] = error_metrics(pred, s.targets)
    return out
