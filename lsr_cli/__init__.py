"""lsr — Linearized Subspace Refinement of trained neural networks.

Public API (everything a Python user needs; the CLI in :mod:`lsr_cli.cli` is a thin shell):

- :func:`refine` — one-shot LSR of a loaded checkpoint on HDF5 splits → :class:`RefineResult`
- :func:`evaluate` — errors of any checkpoint per split
- :func:`load_checkpoint` / :func:`load_refined` — read checkpoints (refined ones as ``nn.Module``)
- :func:`read_data` — the HDF5 reader; :func:`load_config` / :class:`Config` — typed config
- :class:`LinearizedModel` — ``q(θ0, x) + J(x) δ`` as a module
- engine parts: :class:`ParameterSpace`, :class:`JacobianOperator`, :class:`RangeSketch`,
  :class:`ReducedProblem`
- errors: :class:`LsrError` and its subclasses, each with an ``exit_code``
"""

from __future__ import annotations

__version__ = "0.1.0"

from .checkpoint import LoadedCheckpoint, load_checkpoint
from .config import Config, load_config, parse_config
from .data import Split, read_data
from .errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DeviceError,
    LsrError,
    NumericalError,
    OutputError,
)
from .linearization import JacobianOperator, ParameterSpace, make_functional
from .linearized import LinearizedModel, load_refined
from .models import MLP
from .refine import RefineResult, evaluate, refine
from .sketch import RangeSketch
from .solve import ReducedProblem

__all__ = [
    "MLP",
    "CheckpointError",
    "Config",
    "ConfigError",
    "DataError",
    "DeviceError",
    "JacobianOperator",
    "LinearizedModel",
    "LoadedCheckpoint",
    "LsrError",
    "NumericalError",
    "OutputError",
    "ParameterSpace",
    "RangeSketch",
    "ReducedProblem",
    "RefineResult",
    "Split",
    "__version__",
    "evaluate",
    "load_checkpoint",
    "load_config",
    "load_refined",
    "make_functional",
    "parse_config",
    "read_data",
    "refine",
]
