"""Typed configuration: YAML (``yaml.safe_load``) → validated dataclasses.

Unknown keys are rejected with the closest valid key; every message names the key path
(``config.lsr.rank``), what was expected and what was found. Command-line flags override
values through :func:`apply_overrides` and are validated the same way.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from .config_sections import parse_data, parse_free_sections, parse_lsr, parse_model, parse_output, parse_top_level
from .config_values import DEVICE_PATTERN as DEVICE_PATTERN
from .config_values import DTYPES as DTYPES
from .config_values import OUTPUT_FORMATS as OUTPUT_FORMATS
from .config_values import SPLIT_NAMES as SPLIT_NAMES
from .config_values import check_keys as _check_keys
from .config_values import parse_compile as parse_compile
from .config_values import parse_device as parse_device
from .config_values import parse_dtype as parse_dtype
from .config_values import parse_duration as parse_duration
from .config_values import parse_float as _float
from .config_values import parse_int as _int
from .config_values import parse_memory as parse_memory
from .config_values import parse_output_format as parse_output_format
from .config_values import parse_rank as parse_rank
from .config_values import parse_section as _section
from .config_values import parse_split as parse_split
from .config_values import type_name as _type_name
from .config_values import wrong_type as _fail
from .errors import ConfigError


class KeyDoc(NamedTuple):
    """The documentation of a key of a section that is validated by hand (``pde:``, ``instances:``)."""

    type: str
    default: str
    help: str


def key(
    default: Any = MISSING,
    *,
    help: str,
    default_factory: Any = MISSING,
    shown: str | None = None,
    shown_type: str | None = None,
) -> Any:
    """A config field with its help text; ``docs/configuration.md`` is generated from these.

    ``shown`` / ``shown_type``: the default and the type as the docs write them, where the
    Python value and annotation alone would mislead (``compile: null`` is ``false`` in YAML)."""
    metadata = {"help": help}
    if shown is not None:
        metadata["shown"] = shown
    if shown_type is not None:
        metadata["shown_type"] = shown_type
    return field(default=default, default_factory=default_factory, metadata=metadata)


@dataclass
class ModelConfig:
    """How to rebuild the network of a state-dict checkpoint."""

    factory: str | None = key(
        None,
        help="state dicts only: built-in `mlp`, or `package.module:callable`, or `path/file.py:callable` "
        "(this runs that code)",
    )
    kwargs: dict[str, Any] = key(
        default_factory=dict,
        help="keyword arguments of the factory (`mlp`: `in_features`, `out_features`, `hidden`, `activation`; "
        "sizes are read off the state dict when omitted)",
    )
    checkpoint: str | None = key(
        None, help="the default CHECKPOINT of `lsr iterate` and `lsr instances` (relative to the config file)"
    )
    prefix: str | None = key(
        None,
        help="keep only the keys that start with this prefix and strip it (`model.` of a Lightning module, `encoder.` "
        "for a sub-module); a prefix shared by every key is stripped on its own when that makes the state dict fit",
    )
    trust_checkpoint: bool = key(
        False,
        help="unpickle the checkpoint without restriction (`--trust-checkpoint`): only for files you trust, since "
        "a pickle can run any code; the report warns. Without it torch.load runs with weights_only=True plus "
        "torch's functions and module classes and the classes of the factory's package (docs/formats.md)",
    )
    # last: the field's name shadows the function key() in the rest of the class body
    key: str | None = key(
        None,
        help="the entry of the file that holds the state dict (`state_dict`, `model_state_dict`, `a/b` for nested "
        "mappings); default: the file itself, else the first of state_dict, model_state_dict, model, net, network, "
        "module that holds tensors",
    )


@dataclass
class DataConfig:
    """Where the data lives in the HDF5 file."""

    path: str | None = key(None, help="HDF5 file (`--data`)")
    train: str = key("train", help="group name of the training split")
    val: str | None = key("val", help="group name of the validation split (`null` skips it)")
    test: str | None = key("test", help="group name of the test split (`null` skips it)")
    inputs: str | list[str] = key(
        "inputs",
        shown_type="string | list",
        help="name of the inputs (a dataset, or a group of several) inside each group; or, for a file without "
        "split groups, dataset paths anywhere in it: `/tensor[:, 0]` (a `[...]` suffix selects on the other "
        "dimensions: integers, `a:b`, `None`; the first entry `:` keeps the samples), a list for several inputs "
        "in the model's order",
    )
    targets: str = key(
        "targets",
        help="name of the targets dataset inside each group, or a dataset path anywhere (`/tensor[:, -1]`)",
    )
    shared: list[str] = key(
        default_factory=list,
        help="inputs (as written in `inputs`) without a sample dimension, passed whole with every batch: a grid "
        "from a coordinate dataset (`/x-coordinate[:, None]` → `[X, 1]`)",
    )
    split: dict[str, Any] | None = key(
        None,
        shown_type="mapping",
        help="split a file without split groups: fractions `{train: 0.8, val: 0.1, test: 0.1}` of the samples, "
        "shuffled by `seed` (default 0, independent of the run's `seed` so every command sees the same split), "
        "or row ranges `{train: [0, 800], val: [800, 900]}` (kept in order); the report records it. With dataset "
        "paths and no `split`, every sample is training data",
    )


@dataclass
class ParametersConfig:
    """Which parameters are linearized (fnmatch patterns on names, random fraction)."""

    include: list[str] = key(default_factory=list, help="fnmatch patterns of parameter names to linearize")
    exclude: list[str] = key(default_factory=list, help="fnmatch patterns of parameter names to freeze")
    fraction: float = key(1.0, help="random (seeded) fraction of the selected entries to linearize")


@dataclass
class LsrConfig:
    """The refinement itself."""

    rank: int | list[int] | str = key("auto", help="`auto` (adaptive), an integer, or a list (sweep) (`--rank`)")
    start_rank: int = key(256, help="first rank of `auto`")
    max_rank: int = key(4096, help="largest rank `auto` tries")
    growth: float = key(2.0, help="factor between `auto` rounds")
    patience: int = key(2, help="`auto` stops after this many rounds in which the selection loss rose")
    holdout: float = key(
        0.1,
        help="without a `val` split, this fraction of the training samples (seeded) selects rank and λ; the "
        "winner is then refitted on all training rows (0: select on the training loss)",
    )
    rise_tolerance: float = key(0.05, help='a round "rose" when its loss exceeds the best by this fraction')
    oversampling: int = key(10, help="extra sketch columns (k = rank + oversampling)")
    power_iterations: int = key(0, help="subspace iterations of the range finder")
    truncation_rcond: float | str = key(
        "auto",
        help="singular values of the reduced matrix below `rcond · s_max` are dropped; `auto` = `eps · max(n, rank)`",
    )
    tikhonov: float | list[float] | str = key(
        "auto",
        help="λ relative to `s_max` of the reduced matrix: a number, a list, or `auto` = {0, 1e-12, …, 1e-2} "
        "chosen on the selection rows (0 when selecting on the training loss)",
    )
    loss: str = key(
        "mse",
        help="the least-squares loss on data: `mse`, the mean square of every output's error; `relative`, "
        "each sample's squared error over its target's squared norm (`Σ_i ‖q_i − y_i‖² / ‖y_i‖²`, the "
        "per-sample relative L2 error that operator libraries train and report, squared), so that samples "
        "with small targets count as much as large ones. It sets the fit and the selection loss (rank, λ); "
        "the report's errors are the same either way. Data-driven runs only (physics residuals: "
        "`pde.blocks[].weight`); with `relative` a sample whose target is all zero is an error, and training "
        "targets whose norms span more than 10⁴× are warned about (the smallest dominate the fit)",
    )
    parameters: ParametersConfig = key(
        default_factory=ParametersConfig,
        help="Which parameters are linearized: fnmatch patterns on their names, a random fraction.",
    )
    row_chunk: int | str = key(
        "auto",
        help="samples per Jacobian-product chunk. `auto`: 16384 / (32 · outputs per sample); on the matrix-free "
        "path of `lsr refine` (one process, data in memory) the JVP chunk is then tuned by timing one tangent "
        "block on chunks 4×, 16×, … larger, keeping the largest within 15 % of the fastest whose block of "
        "`J P` (rows × rank) takes at most 1/16 of the memory budget (a Cartesian DeepONet: 8 → 128 samples, "
        "JVPs ~7× faster). Each row of `J V` comes from its own sample, so the JVP chunk does not change the "
        "result; VJPs sum over a chunk's rows and keep the default chunk, so a streamed run still gives the "
        "in-memory result to round-off",
    )
    tangent_chunk: int = key(32, help="tangents per batched JVP/VJP")
    max_memory: int | str = key(
        "auto",
        help="memory budget (`--max-memory`): a size such as `4GB`, `512MiB` or bytes; `auto` = half of the "
        "free host (or GPU) memory. A bound for `lsr refine` (see `--max-memory` in the README): too small a "
        "budget is exit code 2 with the minimum, before any heavy stage; a given budget also makes glibc "
        "return freed blocks at once (steadier resident memory)",
    )
    time_limit: float | None = key(
        None,
        shown="null",
        shown_type="number | string",
        help="wall-time budget of `lsr refine` (`--time-limit`): seconds or `90s`, `10min`, `1.5h`. Before the "
        "long stages the cost per column of the sketch and the projection is measured and the largest rank plan "
        "that fits is chosen; the report's `time_budget` gives the estimate, the measured time and what an "
        "unlimited run would have tried. Without a limit the estimate is still printed and reported",
    )
    sketch_rows: int | str = key(
        "auto",
        help="residual rows sketched for the basis: `auto` = all up to `max(8192, 16 k)` rows (k = largest rank "
        "+ oversampling), beyond that a seeded random subset of whole samples; the reduced problem always uses "
        "every row. Independent of the budget, so a streamed run gives the in-memory result",
    )
    jacobian: str = key(
        "auto",
        help="`auto`: hold the Jacobian dense (per-sample Jacobians, BLAS-3 products) when it fits half of the "
        "budget, each sample's rows depend on that sample only (checked against JVPs), at least 128 sketch "
        "columns are planned and — timing both paths on 32 samples — it is estimated faster; else matrix-free "
        "(cheap models with shared inputs, like a Cartesian DeepONet, stay matrix-free); `dense`; "
        "`matrix_free`. The report's `jacobian` says which ran and why",
    )
    compile: str | None = key(
        None,
        shown="false",
        shown_type="boolean | string",
        help="`true` (= `inductor`) or `aot_eager`: run the matrix-free path's JVPs (data-driven `lsr refine`; "
        "not yet physics residuals, the report says so) (sketch and projection) through `torch.compile`, "
        "chunks padded to static shapes so one graph is compiled; plain modules only (a state-dict checkpoint "
        "with `model.factory`; TorchScript models run eagerly, the report says so); if compiling fails (no C++ "
        "compiler, an unsupported op) the run continues eagerly with a warning. `--compile` on `lsr refine` "
        "sets it. The report's `compile` gives the backend, whether it ran and the first call's seconds "
        "(mostly compiling). Measured on this CPU (`benchmarks/compile.py`): 1.08× on the regression MLP "
        "(matrix-free), 1.02× on the DeepONet sample",
    )
    product_dtype: str = key(
        "auto",
        help="precision of the matrix-free Jacobian products of `lsr refine` on data (sketch and projection): "
        "`auto` = `dtype`; `float32`: the products run on a float32 copy of the network and every result "
        "comes back in float64, where the QR, the reduced problem and the final evaluation stay (`dtype: "
        "float64` only; not with `lsr.compile`; the dense path and physics residuals keep `dtype`). The "
        "report's `products` says what ran. For networks whose error stays far above float32 round-off "
        "(operators). Measured (benchmarks/README.md): the Darcy FNO sample at rank 256 2x faster, the "
        "paper-size DeepONet at rank 2 048 1.1x (products 2x, the float64 QR and SVD dominate), errors equal "
        "to 5 digits or more",
    )
    exact: bool = key(
        True,
        help='take the exact spectral path where it applies (README, "The exact path"; for PDEs, "How it '
        'works"): the held Jacobian sketched to exhaustion and every rank scored at once; `false`: always '
        "the adaptive rounds",
    )


@dataclass
class IterateConfig:
    """Iterative LSR (``lsr iterate``): outer loop, L-BFGS alignment, stopping."""

    iterations: int = key(10, help="outer iterations (`--iterations`)")
    lbfgs_iterations: int = key(
        0, help="L-BFGS (strong Wolfe, float64) iterations on the pseudo-time loss after each fit (0: none)"
    )
    dtau: float = key(1e-3, help="pseudo-time step: small → supervised fit to the LSR predictor")
    tolerance: float = key(0.0, help="stop when the network fits the LSR predictor to this relative distance")
    patience: int = key(3, help="stop after this many iterations in which the `select` criterion did not fall")
    resample: bool = key(False, help="draw new generated points every iteration")
    history_size: int = key(50, help="L-BFGS memory")
    save_dtype: str = key("original", help="dtype of the written network: `original` | `float64` | `float32`")
    select: str = key(
        "validation",
        help="keep an iteration only if it lowers the network's residual at fresh validation points (`validation`), "
        "at the fit points (`residual`), or its distance to the LSR predictor (`distance`)",
    )
    gauss_newton_steps: int = key(
        40, help="Levenberg–Marquardt steps (geodesic acceleration) of each fit to the LSR predictor"
    )
    gauss_newton_rank: int = key(600, help="parameter directions sketched for each of those steps")
    physics: bool = key(
        True,
        help="after an iteration that lowers the `select` criterion less than 2× (or is rejected), run a physics "
        "pass: Levenberg–Marquardt steps (`gauss_newton_steps`, `gauss_newton_rank`) on the network's own "
        "residual at the fit points, kept at the step with the lowest validation residual; passes go on while "
        "they are kept. The report's iterations say which ran (`step`: `lsr` or `physics`)",
    )
    physics_points: str = key(
        "adaptive",
        help="the physics pass's fresh points: `adaptive`: each `pde` block's drawn where the network's residual "
        "is large (RAD, p ∝ |r| / mean|r| + 1, from candidates 4× the block, as many as the block has; the "
        "report's `physics.points_added`), the faces' drawn as the validation points are; `uniform`: all drawn "
        "as the validation points are",
    )
    time_limit: float | None = key(
        540.0,
        shown="9min",
        shown_type="number | string | null",
        help="wall-time budget of the iterations: seconds or `90s`, `10min`, `1.5h` (`null`: none). The "
        "Levenberg–Marquardt fit and the L-BFGS pass (`lbfgs_iterations`; the report's "
        "`alignment.lbfgs_stopped_at_time_limit`) stop at it, the LSR step's exact-residual stage takes at most 40 % of "
        "the time left (`nonlinear.time_limit` per iteration), and no iteration starts when the time left is below its LSR step, "
        "its evaluation and a quarter of its fit (each as long as the longest so far); the best network is "
        "written and the report's `stop_reason` says so. 9 minutes keep a default run, loading and writing "
        "included, within 10",
    )


@dataclass
class OutputConfig:
    """Where the outputs go (command-line flags win)."""

    checkpoint: str | None = key(
        None,
        shown="next to the input",
        help="output path (`--out`; default `CHECKPOINT.refined.pt`, `.iterated.pt` or `.instances.h5` beside "
        "the input)",
    )
    report: str | None = key(
        None, shown="next to the output", help="JSON report path (`--report`; default `OUT.report.json`)"
    )
    format: str | None = key(
        None,
        shown="the input's",
        shown_type="string",
        help="refined checkpoint of `lsr refine` (`--format`): `torchscript`, `export` (a `.pt2` that "
        "`torch.export.load(path).module()` runs, dynamic batch), `state-dict` (θ0, δ and the model spec by "
        "`torch.save`; needs a state-dict input) or `safetensors` (the same as a safetensors file); default: "
        "the input's family (docs/formats.md)",
    )


@dataclass
class Config:
    """The whole config file."""

    model: ModelConfig = key(default_factory=ModelConfig, help="How to rebuild the network of a state-dict checkpoint.")
    data: DataConfig = key(
        default_factory=DataConfig, help='Where the data lives in the HDF5 file (README, "HDF5 layout").'
    )
    lsr: LsrConfig = key(
        default_factory=LsrConfig,
        help='The refinement itself (README, "How rank and regularization are chosen").',
    )
    output: OutputConfig = key(default_factory=OutputConfig, help="Output paths (`--out` and `--report` win).")
    pde: dict[str, Any] | None = key(
        None,
        help="a physics-informed problem: `lsr refine` fits its residual, `lsr iterate` needs it (keys: section `pde`)",
    )
    instances: dict[str, Any] | None = key(
        None, help="per-instance refinement by `lsr instances` (keys: section `instances`)"
    )
    iterate: IterateConfig = key(
        default_factory=IterateConfig,
        help="Iterative LSR (`lsr iterate`): outer loop, alignment of the network, stopping.",
    )
    dtype: str = key(
        "float64",
        help="refinement dtype (`--dtype float32` is the fast option; the reduced solve is float64 always)",
    )
    device: str = key("auto", help="`auto` (CUDA when present), `cpu`, `cuda`, `cuda:N` (`--device`)")
    seed: int = key(
        0, help="seeds every random draw (sketch, parameter subsets) through explicit generators (`--seed`)"
    )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "lsr": LsrConfig,
    "output": OutputConfig,
    "lsr.parameters": ParametersConfig,
    "iterate": IterateConfig,
}


def parse_config(raw: Any) -> Config:
    """Validate a mapping (from YAML) into a :class:`Config`, one section after another (the value
    validators are in :mod:`.config_values`, the sections but ``iterate:`` in :mod:`.config_sections`)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {_type_name(raw)}")
    _check_keys("", raw, Config)
    cfg = Config()
    parse_model(raw, cfg)
    parse_data(raw, cfg)
    parse_lsr(raw, cfg)
    _parse_iterate(raw, cfg)
    parse_free_sections(raw, cfg)
    parse_output(raw, cfg)
    parse_top_level(raw, cfg)
    check_product_dtype(cfg)
    if cfg.lsr.loss != "mse" and raw.get("pde") is not None:
        raise ConfigError(
            f"config.lsr.loss: {cfg.lsr.loss} applies to data-driven runs; a physics residual's blocks are "
            "weighted by pde.blocks[].weight (remove lsr.loss or the pde section)"
        )
    return cfg


def check_product_dtype(cfg: Config) -> None:
    """``lsr.product_dtype`` against ``dtype`` and ``lsr.compile`` (checked again after the
    command line's overrides)."""
    want = cfg.lsr.product_dtype
    if want in ("auto", cfg.dtype):
        return
    if cfg.dtype != "float64":
        raise ConfigError(
            f"config.lsr.product_dtype: {want} needs dtype: float64 (products above the run's precision), "
            f"got dtype: {cfg.dtype}"
        )
    if cfg.lsr.compile is not None:
        raise ConfigError(
            "config.lsr.product_dtype: float32 cannot be combined with lsr.compile (its graph is traced in "
            "dtype); remove one of the two"
        )


def _parse_iterate(raw: dict[str, Any], cfg: Config) -> None:
    """``iterate:`` into ``cfg.iterate``."""
    it = _section("iterate", raw.get("iterate"), IterateConfig)
    if "gauss_newton_steps" in it:
        cfg.iterate.gauss_newton_steps = _int("iterate.gauss_newton_steps", it["gauss_newton_steps"], lo=0)
    if "lbfgs_iterations" in it:
        cfg.iterate.lbfgs_iterations = _int("iterate.lbfgs_iterations", it["lbfgs_iterations"], lo=0)
    for key in ("iterations", "history_size", "gauss_newton_rank"):
        if key in it:
            setattr(cfg.iterate, key, _int(f"iterate.{key}", it[key], lo=1))
    if "patience" in it:
        cfg.iterate.patience = _int("iterate.patience", it["patience"], lo=1)
    if "dtau" in it:
        cfg.iterate.dtau = _float("iterate.dtau", it["dtau"], lo=0.0, hi=1e6)
        if cfg.iterate.dtau <= 0:
            raise ConfigError(f"config.iterate.dtau: must be positive, got {it['dtau']}")
    if "time_limit" in it:
        cfg.iterate.time_limit = parse_duration("iterate.time_limit", it["time_limit"])
    if "tolerance" in it:
        cfg.iterate.tolerance = _float("iterate.tolerance", it["tolerance"], lo=0.0, hi=1e6)
    for key in ("resample", "physics"):
        if key in it:
            if not isinstance(it[key], bool):
                raise _fail(f"iterate.{key}", "true or false", it[key])
            setattr(cfg.iterate, key, it[key])
    if "physics_points" in it:
        if it["physics_points"] not in ("adaptive", "uniform"):
            raise _fail("iterate.physics_points", "adaptive or uniform", it["physics_points"])
        cfg.iterate.physics_points = it["physics_points"]
    if "select" in it:
        if it["select"] not in ("validation", "distance", "residual"):
            raise ConfigError(f"config.iterate.select: expected validation, distance or residual, got {it['select']!r}")
        cfg.iterate.select = it["select"]
    if "save_dtype" in it:
        if it["save_dtype"] not in ("original", "float64", "float32"):
            raise ConfigError(
                f"config.iterate.save_dtype: expected original, float64 or float32, got {it['save_dtype']!r}"
            )
        cfg.iterate.save_dtype = it["save_dtype"]


def load_config(path: str | Path | None) -> Config:
    """Read and validate a YAML config file (``None``: all defaults)."""
    if path is None:
        return Config()
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read config file: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid syntax"
        raise ConfigError(f"{p}: not valid YAML{where}: {problem}") from None
    try:
        return parse_config(raw)
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None
