"""The result of one-shot LSR, shared by the supervised and the physics-informed refinement and
read by the report."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from .linearized import LinearizedModel
from .subspace import SweepEntry


@dataclass
class RefineResult:
    """Everything a one-shot refinement measured (:func:`~lsr_cli.refine.refine` on data,
    :func:`~lsr_cli.pde.refine_pde` on a physics residual); ``model`` computes the refined predictor."""

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
    loss: dict[str, Any] | None = None  # lsr.loss: relative: the weighting of the samples' rows
    products: dict[str, Any] | None = None  # lsr.product_dtype other than dtype: the products' dtype, used or why not
    nonlinear: dict[str, Any] | None = None  # PDE: the exact-residual stage in the subspace (subspace_newton)
    validation: dict[str, Any] | None = None  # PDE: the validation points the choices were made on
    unknowns: dict[str, dict[str, Any]] | None = None  # PDE: unknown constants before/after (pde.unknowns)
    components: dict[str, Any] | None = None  # PDE systems: the reference errors per output component
    time_budget: dict[str, Any] | None = None  # lsr.time_limit: the estimate, the measured time, the ranks tried


__all__ = ["RefineResult"]
