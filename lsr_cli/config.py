"""Typed configuration: YAML (``yaml.safe_load``) → validated dataclasses.

Unknown keys are rejected with the closest valid key; every message names the key path
(``config.lsr.rank``), what was expected and what was found. Command-line flags override
values through :func:`apply_overrides` and are validated the same way.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from .errors import ConfigError

DTYPES = ("float64", "float32")
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


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


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
    }.get(type(value), type(value).__name__)


def _fail(path: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(f"config.{path}: expected {expected}, got {_type_name(value)} ({value!r})")


def _int(path: str, value: Any, lo: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(path, "an integer", value)
    if lo is not None and value < lo:
        raise ConfigError(f"config.{path}: must be at least {lo}, got {value}")
    return value


def _float(path: str, value: Any, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(path, "a number", value)
    value = float(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ConfigError(f"config.{path}: must be between {lo} and {hi}, got {value}")
    return value


def _str(path: str, value: Any, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise _fail(path, "a string" + (" or null" if optional else ""), value)
    return value


def _str_list(path: str, value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(path, "a list of strings", value)
    return list(value)


def parse_rank(path: str, value: Any) -> int | list[int] | str:
    """``"auto"``, a positive integer, or a list of positive integers (a sweep)."""
    if isinstance(value, str):
        text = value.strip()
        if text == "auto":
            return "auto"
        parts = [p.strip() for p in text.split(",") if p.strip()]
        try:
            nums = [int(p) for p in parts]
        except ValueError:
            raise ConfigError(
                f"config.{path}: expected 'auto', an integer or a comma-separated list of integers, got {value!r}"
            ) from None
        value = nums[0] if len(nums) == 1 else nums
    if isinstance(value, list):
        if not value:
            raise ConfigError(f"config.{path}: the rank list is empty")
        ranks = [_int(f"{path}[{i}]", v) for i, v in enumerate(value)]
        for r in ranks:
            if r < 1:
                raise ConfigError(f"config.{path}: ranks must be at least 1, got {r}")
        return sorted(set(ranks))
    r = _int(path, value)
    if r < 1:
        raise ConfigError(f"config.{path}: must be at least 1 (or 'auto'), got {r}")
    return r


def _check_keys(path: str, raw: dict[str, Any], cls: type) -> None:
    valid = [f.name for f in fields(cls)]
    for key in raw:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
            where = f"config.{path}.{key}" if path else f"config.{key}"
            raise ConfigError(f"{where}: unknown key{hint}")


def _section(path: str, raw: Any, cls: type) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _fail(path, "a mapping", raw)
    _check_keys(path, raw, cls)
    return raw


def parse_config(raw: Any) -> Config:
    """Validate a mapping (from YAML) into a :class:`Config`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {_type_name(raw)}")
    _check_keys("", raw, Config)
    cfg = Config()

    m = _section("model", raw.get("model"), ModelConfig)
    if "factory" in m:
        cfg.model.factory = _str("model.factory", m["factory"], optional=True)
    if "checkpoint" in m:
        cfg.model.checkpoint = _str("model.checkpoint", m["checkpoint"], optional=True)
    for name in ("key", "prefix"):
        if name in m:
            setattr(cfg.model, name, _str(f"model.{name}", m[name], optional=True) or None)
    if "trust_checkpoint" in m:
        if not isinstance(m["trust_checkpoint"], bool):
            raise _fail("model.trust_checkpoint", "true or false", m["trust_checkpoint"])
        cfg.model.trust_checkpoint = m["trust_checkpoint"]
    if "kwargs" in m:
        if m["kwargs"] is not None and not isinstance(m["kwargs"], dict):
            raise _fail("model.kwargs", "a mapping", m["kwargs"])
        cfg.model.kwargs = dict(m["kwargs"] or {})

    d = _section("data", raw.get("data"), DataConfig)
    for key in ("path", "val", "test"):
        if key in d:
            setattr(cfg.data, key, _str(f"data.{key}", d[key], optional=True))
    for key in ("train", "targets"):
        if key in d:
            setattr(cfg.data, key, _str(f"data.{key}", d[key]))
    if "inputs" in d:
        v = d["inputs"]
        if isinstance(v, list):
            if not v or not all(isinstance(x, str) for x in v):
                raise _fail("data.inputs", "a dataset name or a non-empty list of dataset paths", v)
            cfg.data.inputs = list(v)
        else:
            cfg.data.inputs = str(_str("data.inputs", v))
    if "shared" in d:
        cfg.data.shared = _str_list("data.shared", d["shared"])
        listed = cfg.data.inputs if isinstance(cfg.data.inputs, list) else [cfg.data.inputs]
        for name in cfg.data.shared:
            if name not in listed:
                raise ConfigError(f"config.data.shared: {name!r} is not one of config.data.inputs {listed}")
    if d.get("split") is not None:
        cfg.data.split = parse_split("data.split", d["split"])

    s = _section("lsr", raw.get("lsr"), LsrConfig)
    lsr = cfg.lsr
    if "rank" in s:
        lsr.rank = parse_rank("lsr.rank", s["rank"])
    for key in ("start_rank", "max_rank", "tangent_chunk", "patience"):
        if key in s:
            setattr(lsr, key, _int(f"lsr.{key}", s[key], lo=1))
    for key in ("oversampling", "power_iterations"):
        if key in s:
            setattr(lsr, key, _int(f"lsr.{key}", s[key], lo=0))
    if "growth" in s:
        lsr.growth = _float("lsr.growth", s["growth"], lo=1.1, hi=16.0)
    if "holdout" in s:
        lsr.holdout = _float("lsr.holdout", s["holdout"], lo=0.0, hi=0.5)
    if "rise_tolerance" in s:
        lsr.rise_tolerance = _float("lsr.rise_tolerance", s["rise_tolerance"], lo=0.0, hi=10.0)
    if "truncation_rcond" in s:
        v = s["truncation_rcond"]
        lsr.truncation_rcond = "auto" if v == "auto" else _float("lsr.truncation_rcond", v, 0.0, 1.0)
    if "tikhonov" in s:
        v = s["tikhonov"]
        if v == "auto":
            lsr.tikhonov = "auto"
        elif isinstance(v, list):
            lsr.tikhonov = [_float(f"lsr.tikhonov[{i}]", x, 0.0, 1e6) for i, x in enumerate(v)]
        else:
            lsr.tikhonov = _float("lsr.tikhonov", v, 0.0, 1e6)
    if "row_chunk" in s:
        v = s["row_chunk"]
        lsr.row_chunk = "auto" if v == "auto" else _int("lsr.row_chunk", v, lo=1)
    if "max_memory" in s:
        lsr.max_memory = parse_memory("lsr.max_memory", s["max_memory"])
    if "time_limit" in s:
        lsr.time_limit = parse_duration("lsr.time_limit", s["time_limit"])
    if "jacobian" in s:
        if s["jacobian"] not in ("auto", "dense", "matrix_free"):
            raise ConfigError(f"config.lsr.jacobian: expected auto, dense or matrix_free, got {s['jacobian']!r}")
        lsr.jacobian = s["jacobian"]
    if "compile" in s:
        lsr.compile = parse_compile("lsr.compile", s["compile"])
    if "exact" in s:
        if not isinstance(s["exact"], bool):
            raise _fail("lsr.exact", "true or false", s["exact"])
        lsr.exact = s["exact"]
    if "sketch_rows" in s:
        v = s["sketch_rows"]
        lsr.sketch_rows = "auto" if v == "auto" else _int("lsr.sketch_rows", v, lo=1)
    p = _section("lsr.parameters", s.get("parameters"), ParametersConfig)
    if "include" in p:
        lsr.parameters.include = _str_list("lsr.parameters.include", p["include"])
    if "exclude" in p:
        lsr.parameters.exclude = _str_list("lsr.parameters.exclude", p["exclude"])
    if "fraction" in p:
        frac = _float("lsr.parameters.fraction", p["fraction"], 0.0, 1.0)
        if frac <= 0.0:
            raise ConfigError(f"config.lsr.parameters.fraction: must be in (0, 1], got {frac}")
        lsr.parameters.fraction = frac

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
    if "tolerance" in it:
        cfg.iterate.tolerance = _float("iterate.tolerance", it["tolerance"], lo=0.0, hi=1e6)
    for key in ("resample",):
        if key in it:
            if not isinstance(it[key], bool):
                raise _fail(f"iterate.{key}", "true or false", it[key])
            setattr(cfg.iterate, key, it[key])
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
    if raw.get("pde") is not None:
        if not isinstance(raw["pde"], dict):
            raise _fail("pde", "a mapping", raw["pde"])
        cfg.pde = dict(raw["pde"])
    if raw.get("instances") is not None:
        if not isinstance(raw["instances"], dict):
            raise _fail("instances", "a mapping", raw["instances"])
        cfg.instances = dict(raw["instances"])

    o = _section("output", raw.get("output"), OutputConfig)
    for key in ("checkpoint", "report"):
        if key in o:
            setattr(cfg.output, key, _str(f"output.{key}", o[key], optional=True))
    if o.get("format") is not None:
        cfg.output.format = parse_output_format("output.format", o["format"])

    if "dtype" in raw:
        cfg.dtype = parse_dtype("dtype", raw["dtype"])
    if "device" in raw:
        cfg.device = parse_device("device", raw["device"])
    if "seed" in raw:
        cfg.seed = _int("seed", raw["seed"], lo=0)
    return cfg


OUTPUT_FORMATS = ("torchscript", "export", "state-dict", "safetensors")
SPLIT_NAMES = ("train", "val", "test")


def parse_split(path: str, value: Any) -> dict[str, Any]:
    """``{train: 0.8, val: 0.1, test: 0.1, seed: 0}`` (fractions summing to at most 1) or
    ``{train: [0, 800], val: [800, 900]}`` (row ranges ``[start, stop)``, not overlapping)."""
    if not isinstance(value, dict):
        raise _fail(path, "a mapping such as {train: 0.8, val: 0.1, test: 0.1}", value)
    for name in value:
        if name not in (*SPLIT_NAMES, "seed"):
            raise ConfigError(f"config.{path}.{name}: unknown key; valid keys: train, val, test, seed")
    if "train" not in value:
        raise ConfigError(f"config.{path}: needs a 'train' entry")
    out: dict[str, Any] = {"seed": _int(f"{path}.seed", value.get("seed", 0), lo=0)}
    parts = {k: v for k, v in value.items() if k in SPLIT_NAMES and v is not None}
    if all(isinstance(v, list) for v in parts.values()):
        spans = []
        for name, v in parts.items():
            if len(v) != 2:
                raise _fail(f"{path}.{name}", "a row range [start, stop]", v)
            start, stop = _int(f"{path}.{name}[0]", v[0], lo=0), _int(f"{path}.{name}[1]", v[1], lo=0)
            if stop <= start:
                raise ConfigError(f"config.{path}.{name}: the range [{start}, {stop}] holds no row")
            spans.append((start, stop, name))
            out[name] = [start, stop]
        spans.sort()
        for (_, stop_a, a), (start_b, _, b) in zip(spans, spans[1:], strict=False):
            if start_b < stop_a:
                raise ConfigError(f"config.{path}: the ranges of {a} and {b} overlap")
        return out
    for name, v in parts.items():
        frac = _float(f"{path}.{name}", v, 0.0, 1.0)
        if frac <= 0.0:
            raise ConfigError(f"config.{path}.{name}: must be in (0, 1], got {frac}")
        out[name] = frac
    total = sum(out[n] for n in SPLIT_NAMES if n in out)
    if total > 1.0 + 1e-9:
        raise ConfigError(f"config.{path}: the fractions add up to {total:g}, more than 1")
    return out


def parse_output_format(path: str, value: Any) -> str:
    """``torchscript``, ``export``, ``state-dict`` (``state_dict`` accepted) or ``safetensors``."""
    if value == "state_dict":
        value = "state-dict"
    if value not in OUTPUT_FORMATS:
        raise ConfigError(f"config.{path}: expected one of {', '.join(OUTPUT_FORMATS)}, got {value!r}")
    return str(value)


def parse_dtype(path: str, value: Any) -> str:
    if value not in DTYPES:
        raise ConfigError(f"config.{path}: expected one of {', '.join(DTYPES)}, got {value!r}")
    return str(value)


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*$")


def parse_compile(where: str, v: Any) -> str | None:
    """``false`` (off), ``true`` (``inductor``) or a backend name (inductor, aot_eager)."""
    backends = ("inductor", "aot_eager")
    if v is False or v is None:
        return None
    if v is True:
        return "inductor"
    if isinstance(v, str) and v in backends:
        return v
    raise ConfigError(f"config.{where}: expected true, false or one of {', '.join(backends)}, got {v!r}")


def parse_memory(path: str, value: Any) -> int | str:
    """``"auto"``, a byte count, or a size such as ``"512MB"``, ``"2GiB"``, ``"1.5GB"``."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if isinstance(value, bool):
        raise ConfigError(f"config.{path}: expected 'auto' or a size such as 2GB, got {value!r}")
    if isinstance(value, int | float):
        num, unit = float(value), ""
    else:
        m = _SIZE_PATTERN.match(str(value).lower())
        if m is None or m.group(2) not in _SIZE_UNITS:
            raise ConfigError(
                f"config.{path}: expected 'auto' or a size such as 512MB, 2GiB or a byte count, got {value!r}"
            )
        num, unit = float(m.group(1)), m.group(2)
    size = int(num * _SIZE_UNITS[unit])
    if size < 2**20:
        raise ConfigError(f"config.{path}: must be at least 1 MiB, got {value!r} ({size} bytes)")
    return size


_DURATION_UNITS = {"": 1.0, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "hr": 3600.0}
_DURATION_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-z]*)\s*$")


def parse_duration(path: str, value: Any) -> float | None:
    """``null``, seconds, or ``"90s"``, ``"10min"``, ``"1.5h"`` → seconds (at least 1)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"config.{path}: expected seconds or a duration such as 10min, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        m = _DURATION_PATTERN.match(str(value).lower())
        if m is None or m.group(2) not in _DURATION_UNITS:
            raise ConfigError(
                f"config.{path}: expected seconds or a duration such as 90s, 10min or 1.5h, got {value!r}"
            )
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    if not math.isfinite(seconds) or seconds < 1.0:
        raise ConfigError(f"config.{path}: must be at least 1 second, got {value!r}")
    return seconds


def parse_device(path: str, value: Any) -> str:
    if not isinstance(value, str) or not DEVICE_PATTERN.match(value):
        raise ConfigError(f"config.{path}: expected auto, cpu, cuda or cuda:N, got {value!r}")
    return value


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
