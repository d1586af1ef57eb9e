"""The ``pde:`` section of a config: equation, domain, residual blocks and their points.

A problem is a list of residual blocks, each with its points and weight::

    pde:
      equation: poisson            # built-in (see lsr_cli.pde.equations) or "file.py:function"
      variables: [x, y]            # input columns in order; "t" is time
      domain: {x: [0, 1], y: [0, 1]}
      constants: {nu: 0.0031831}   # named numbers usable in formulas
      coefficients: {source: "2*pi**2*sin(pi*x)*sin(pi*y)"}   # number, formula or {dataset: /path}
      blocks:
        - {name: interior, kind: pde, points: {sample: sobol, count: 2000}}
        - {name: walls, kind: dirichlet, value: "0", weight: 100, points: {sample: boundary, count: 400}}

Systems (``pde.outputs: [u, v, p]``, equations returning several residuals, ``component:`` of a
block) and unknown constants (``pde.unknowns``): :mod:`.components`, :mod:`.unknowns`,
``docs/pde_systems.md``.

Block kinds: ``pde`` (the equation), ``dirichlet`` (``u − g``), ``neumann`` (``∂u/∂n − g``, outward
normal of the box face), ``periodic`` (``u(x_lo) − u(x_hi)`` along ``variable``), ``initial``
(``u(x, t0) − g``), ``data`` (``u − values`` at observed points). Points come from the data
file (``{dataset: /collocation/NAME}``) or are generated in the box (``sample: uniform | sobol |
lhs | grid``; boundary kinds sample their faces, ``initial`` the ``t = t_min`` face). Block rows
are scaled by ``√(w_b · N_total / N_b)``, so the loss is a weighted mean of squares.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lsr_cli.config import KeyDoc
from lsr_cli.data import read_datasets, read_row
from lsr_cli.distributed import shard_range
from lsr_cli.errors import ConfigError, DataError
from lsr_cli.linearization import ModelFn
from lsr_cli.usercode import import_callable

from .components import check_spatial_dims, component_quantity, expand_blocks, parse_outputs, probe_equations
from .equations import EQUATIONS, Equation
from .expressions import BUILTIN_CONSTANTS, FUNCTIONS, Expression, compile_expression
from .fields import TIME, Fields, TabulatedModel
from .unknowns import Unknown, parse_unknowns

KINDS = ("pde", "dirichlet", "neumann", "periodic", "initial", "data")
SAMPLERS = ("uniform", "sobol", "lhs", "grid")
NONLINEAR_ITERATIONS = 30
"""``pde.nonlinear_iterations: auto``: Levenberg–Marquardt steps of the exact-residual stage."""
_FORMULA = "number, formula, `{dataset: /path}` or `{instance: NAME}` (`lsr instances`)"
PDE_KEYS = {
    "equation": KeyDoc(
        "string",
        "required",
        f"built-in ({', '.join(f'`{name}`' for name in EQUATIONS)}; residuals and coefficients: README, "
        '"Physics-informed networks") or `path/file.py:function` (runs that code)',
    ),
    "variables": KeyDoc("list[string]", "required", "the model's input columns, in order; `t` is time"),
    "outputs": KeyDoc(
        "list[string]",
        "a system's outputs, else `[u]`",
        'names of the model\'s output columns, in order (`[u, v, p]`); residuals read `F["v"]`, '
        '`F.d("v", "x")`; the model must return as many values per point (docs/pde_systems.md)',
    ),
    "unknowns": KeyDoc(
        "mapping",
        "{}",
        "unknown constants refined with the network: `{nu: 0.05}` (initial guess), `{nu: {initial: 0.05, "
        "true: 0.01}}` (error reported) or `{nu: {parameter: NAME}}` (a scalar parameter of the checkpoint); "
        "an unknown named like a coefficient is that coefficient, formulas may use them; "
        "freeze with `lsr.parameters.exclude: [unknowns.*]`",
    ),
    "domain": KeyDoc(
        "mapping",
        "null",
        "the box, `[low, high]` per variable: `{x: [0, 1], y: [0, 1]}`; needed for generated points and for "
        "`neumann` and `periodic` blocks",
    ),
    "constants": KeyDoc("mapping", "{}", "names usable in formulas (numbers)"),
    "coefficients": KeyDoc(
        "mapping",
        "{}",
        f"the equation's coefficients by name, each a {_FORMULA}; unset ones take the equation's defaults",
    ),
    "blocks": KeyDoc(
        "list[mapping]",
        "required",
        "the residual blocks (keys: `pde.blocks[]`); each block's rows are scaled by `√(w_b · N / N_b)`, so "
        "the loss is `Σ_b w_b · mean_b(r²)`",
    ),
    "basis": KeyDoc(
        "string",
        "auto",
        "`auto`: `residual` for a small dense G on a linear equation, else `output`; `output`: sketch J on a "
        "subset of points; `residual`: sketch G",
    ),
    "basis_points": KeyDoc(
        "integer | string", "auto", "points of that subset (`auto`: max rank + oversampling + 1000)"
    ),
    "reference": KeyDoc(
        "boolean | string",
        "true",
        "compare with `/reference/inputs` and `/reference/values` when present; `required` makes it an error if absent",
    ),
    "nonlinear_iterations": KeyDoc(
        "integer | string",
        "auto",
        f"nonlinear equations: Levenberg–Marquardt steps on the predictor's exact residual in LSR's subspace "
        f"(`auto`: {NONLINEAR_ITERATIONS}; 0: off; at most 3× the time of LSR's step, 2 min minimum)",
    ),
    "validation": KeyDoc(
        "string",
        "auto",
        "fresh points never fitted (per block: its `validation:` points, the same sampling drawn again, the "
        "domain's faces, or points between the block's points). `auto`: rank and λ chosen as with `none`, the "
        "exact-residual stage keeps the iterate best at the validation points, and a step that raises the exact "
        "residual there is re-chosen on them (or the input is kept); `choose`: rank and λ chosen on the "
        "validation points; `none`: held-out rows of the fit points (`lsr.holdout`) or GCV",
    ),
    "weights": KeyDoc(
        "string",
        "config",
        "`config`: the blocks' `weight`s as written; `auto`: balanced at the checkpoint so that every block adds "
        "the same to the trace of the Gauss–Newton matrix (`w_b · mean‖∂r_b/∂θ‖²` equal, the first `pde` block "
        "keeping its weight; a block's `weight` multiplies its balanced one); reported in "
        "`residual_loss.weights`",
    ),
    "adaptive": KeyDoc(
        "string or mapping",
        "auto",
        "residual-based adaptive collocation: while the refined predictor's exact residual at the validation "
        "points is over 10× the one at the fit points, add as many points per `pde` block as it has where the "
        "residual is largest (RAD sampling from a dense seeded candidate set) and solve again; a round is kept "
        "only when it lowers the validation loss by 10 %. `auto`: at most 3 rounds, 600 s; "
        "`{rounds: N, time_limit: SECONDS}`; `none`: off. Needs validation points",
    ),
}
"""The keys of ``pde:`` and their documentation (``docs/configuration.md``)."""
BLOCK_KEYS = {
    "name": KeyDoc("string", "kind + index (`pde0`)", "the block's name in reports and plots; names must differ"),
    "kind": KeyDoc(
        "string",
        "pde",
        "`pde` (the equation), `dirichlet` (`u − g`, `value`), `neumann` (`∂u/∂n − g`, outward normal of the "
        "box face), `periodic` (`u(x_min) − u(x_max)` along `variable`), `initial` (`u(x, t_min) − g`), "
        "`data` (`u − values`)",
    ),
    "points": KeyDoc("mapping", "required", "where the block's points come from (keys: `pde.blocks[].points`)"),
    "weight": KeyDoc(
        "number | mapping",
        "1.0",
        "`w_b`, the block's weight in the loss `Σ_b w_b · mean_b(r²)`; per equation or component of a "
        "system: `{continuity: 10}` (others 1)",
    ),
    "component": KeyDoc(
        "string | list[string]",
        "the only output",
        "non-`pde` blocks: the output(s) constrained (required with several outputs; `periodic`: all); a list "
        "makes one block per component (`NAME.u`), `value`/`values` then a mapping per component or one for all; "
        "`dirichlet`/`initial`/`data`: or a formula over outputs, their derivatives `u_x`, variables and outward "
        'normals `n_x` (`"u*n_x + v*n_y"`)',
    ),
    "equations": KeyDoc(
        "list[string]",
        "all",
        "`pde` blocks of a system: the equations enforced, one block each (`NAME.continuity`)",
    ),
    "column": KeyDoc("integer", "0", "`data` blocks: the column of `values` `[N, C]` observed"),
    "value": KeyDoc(
        "number | string | mapping", "0", f"`g` of `dirichlet`, `neumann` and `initial` blocks: a {_FORMULA}"
    ),
    "faces": KeyDoc(
        "string | list[string]",
        "all",
        "boundary kinds: the faces sampled — `all` spatial faces, or a list such as `[x_min, y_max]`",
    ),
    "variable": KeyDoc("string", "null", "`periodic` blocks: the variable along which `u(x_min) = u(x_max)`"),
    "values": KeyDoc("string", "null", "`data` blocks: the dataset of observed values (`/path/to/dataset`)"),
    "validation": KeyDoc(
        "mapping",
        "null",
        "the block's validation points, in the form of `points` (`{dataset: /validation/NAME}` or "
        "`{sample: sobol, count: N}`); default: chosen by `pde.validation: auto`",
    ),
}
"""The keys of one entry of ``pde.blocks``."""
POINT_KEYS = {
    "dataset": KeyDoc("string", "null", "points `[N_b, d]` from the data file, e.g. `/collocation/NAME`"),
    "sample": KeyDoc(
        "string",
        "null",
        "or points generated in the box: `uniform` | `sobol` | `lhs` | `grid` (`grid` rounds up to "
        "`ceil(N^(1/d))` points per axis); boundary kinds sample the faces, `initial` the `t = t_min` face; "
        "seeded by `seed`",
    ),
    "count": KeyDoc("integer", "null", "how many points to generate (required with `sample`)"),
    "region": KeyDoc(
        "mapping",
        "null",
        "interior blocks: draw in a sub-box, e.g. `{x: [-0.1, 0.1]}` (denser points near a front)",
    ),
}
"""The keys of ``pde.blocks[].points``."""
_PDE_KEYS = tuple(PDE_KEYS)
_BLOCK_KEYS = tuple(BLOCK_KEYS)
_POINT_KEYS = tuple(POINT_KEYS)


def _unknown(path: str, key: str, valid: tuple[str, ...]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"config.{path}.{key}: unknown key{hint}")


def _mapping(path: str, raw: Any, valid: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"config.{path}: expected a mapping, got {type(raw).__name__}")
    for key in raw:
        if key not in valid:
            raise _unknown(path, str(key), valid)
    return raw


@dataclass
class Box:
    """Axis-aligned domain ``[lo_i, hi_i]`` per variable (time included)."""

    variables: list[str]
    lo: Tensor
    hi: Tensor

    def _unit(self, count: int, dims: int, method: str, gen: torch.Generator) -> Tensor:
        if method == "sobol":
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
            return torch.quasirandom.SobolEngine(dims, scramble=True, seed=seed).draw(count, dtype=torch.float64)
        if method == "lhs":
            cells = torch.stack([torch.randperm(count, generator=gen) for _ in range(dims)], dim=1).double()
            return (cells + torch.rand(count, dims, generator=gen, dtype=torch.float64)) / count
        if method == "grid":
            per = max(2, math.ceil(count ** (1.0 / dims)))
            axes = [(torch.arange(per, dtype=torch.float64) + 0.5) / per for _ in range(dims)]
            return torch.cartesian_prod(*axes).reshape(-1, dims)
        return torch.rand(count, dims, generator=gen, dtype=torch.float64)

    def interior(self, count: int, method: str, gen: torch.Generator) -> Tensor:
        return self.lo + (self.hi - self.lo) * self._unit(count, len(self.variables), method, gen)

    def on_face(self, count: int, index: int, side: int, method: str, gen: torch.Generator) -> Tensor:
        """Points on the face ``variables[index] = lo`` (``side`` 0) or ``hi`` (1), drawn in the
        face's own ``d − 1`` dimensions (so a grid stays a grid and counts are kept)."""
        d = len(self.variables)
        unit = torch.zeros(0, d, dtype=torch.float64)
        if d > 1:
            inner = self._unit(count, d - 1, method, gen)
            unit = torch.cat(
                [inner[:, :index], torch.zeros(inner.shape[0], 1, dtype=torch.float64), inner[:, index:]], 1
            )
        else:
            unit = torch.zeros(count, 1, dtype=torch.float64)
        pts = self.lo + (self.hi - self.lo) * unit
        pts[:, index] = self.hi[index] if side else self.lo[index]
        return pts

    def faces(self, names: list[str]) -> list[tuple[int, int]]:
        """``(variable index, side)`` of spatial faces named ``x_min`` / ``x_max`` (``all``: every one)."""
        spatial = [i for i, v in enumerate(self.variables) if v != TIME]
        every = [(i, s) for i in spatial for s in (0, 1)]
        if names == ["all"]:
            return every
        out = []
        for name in names:
            var, _, side = name.rpartition("_")
            if var not in self.variables or var == TIME or side not in ("min", "max"):
                valid = [f"{self.variables[i]}_{'min' if s == 0 else 'max'}" for i, s in every]
                raise ConfigError(f"config.pde.blocks: unknown face {name!r}; faces are {valid} or 'all'")
            out.append((self.variables.index(var), 0 if side == "min" else 1))
        return out

    def on_faces(
        self, count: int, faces: list[tuple[int, int]], method: str, gen: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """Points on the faces (split by face measure) and their outward normals ``[N, d]``."""
        extent = self.hi - self.lo
        measures = torch.tensor([float(torch.prod(torch.cat([extent[:i], extent[i + 1 :]]))) for i, _ in faces])
        counts = torch.floor(count * measures / measures.sum()).long()
        counts[: int(count - counts.sum())] += 1
        pts, normals = [], []
        for (i, side), c in zip(faces, counts.tolist(), strict=True):
            if c == 0:
                continue
            p = self.on_face(c, i, side, method, gen)
            nrm = torch.zeros_like(p)
            nrm[:, i] = 1.0 if side else -1.0
            pts.append(p)
            normals.append(nrm)
        return torch.cat(pts), torch.cat(normals)

    def normals_of(self, points: Tensor, where: str) -> Tensor:
        """Outward normals of points lying on spatial faces (error if a point is on none)."""
        tol = 1e-9 * float((self.hi - self.lo).abs().max())
        normals = torch.zeros_like(points)
        found = torch.zeros(points.shape[0], dtype=torch.bool)
        for i, v in enumerate(self.variables):
            if v == TIME:
                continue
            for side, bound in ((-1.0, self.lo[i]), (1.0, self.hi[i])):
                hit = ((points[:, i] - bound).abs() <= tol) & ~found
                normals[hit, i] = side
                found |= hit
        if not bool(found.all()):
            raise DataError(f"{where}: {int((~found).sum())} neumann point(s) lie on no face of the domain")
        return normals


@dataclass
class Block:
    """One residual block: ``inputs`` (``points`` first) and ``residual(model, rows)``."""

    name: str
    kind: str
    weight: float
    points: Tensor
    inputs: tuple[Tensor, ...]
    spec: dict[str, Any]
    scale: float = 1.0
    residual_fn: Callable[[ModelFn, tuple[Tensor, ...]], Tensor] | None = None
    first_point: int = 0  # distributed: this rank holds points [first_point, first_point + len(points))
    total_points: int | None = None  # distributed: the block's point count over every rank

    @property
    def num_global(self) -> int:
        """Points of the whole block (over every rank)."""
        return self.total_points if self.total_points is not None else int(self.points.shape[0])

    @property
    def generated(self) -> bool:
        return "sample" in self.spec.get("points", {})

    def residual(self, model: ModelFn, rows: tuple[Tensor, ...]) -> Tensor:
        """The scaled residual ``[N]`` of ``rows`` (``[N, ...]`` each); ``N = 0`` (a rank's
        empty share of a block smaller than the process count) gives an empty ``[0]``."""
        assert self.residual_fn is not None
        if rows[0].shape[0] == 0:
            return rows[0].new_zeros(0)
        return self.scale * self.residual_fn(model, rows)


@dataclass
class PdeProblem:
    equation: Equation
    equation_name: str
    variables: list[str]
    box: Box | None
    blocks: list[Block]
    reference: tuple[Tensor, Tensor] | None
    basis: str
    basis_points: int | str
    raw: dict[str, Any] = field(default_factory=dict)
    nonlinear_iterations: int = NONLINEAR_ITERATIONS
    data_path: Path | None = None  # where datasets were read (validation points read there too)
    base_dir: Path | None = None  # the config's folder (user residual files)
    instance: tuple[str, int] | None = None  # lsr instances: the HDF5 group and row of {instance: NAME} values
    outputs: list[str] = field(default_factory=lambda: ["u"])  # the network's output columns (pde.outputs)
    unknowns: list[Unknown] = field(default_factory=list)  # pde.unknowns: columns after the outputs
    weights: dict[str, Any] | None = None  # pde.weights: auto: how the block weights were balanced (weights.py)

    @property
    def num_rows(self) -> int:
        return sum(b.points.shape[0] for b in self.blocks)

    def all_points(self) -> Tensor:
        return torch.cat([b.points for b in self.blocks])

    def shard(self, rank: int, world: int) -> PdeProblem:
        """Keep only rank ``rank``'s contiguous share of every block's points (and of the
        reference points), sizes differing by at most one; the row scales stay global. A block
        with fewer points than processes sits on the first ranks, the others holding none of it
        (a rank may hold no point at all: its residual, Jacobian and sums are empty)."""
        if world == 1:
            return self
        for b in self.blocks:
            n = int(b.points.shape[0])
            s, e = shard_range(n, rank, world)
            b.points = b.points[s:e]
            b.inputs = tuple(x[s:e] for x in b.inputs)
            b.first_point, b.total_points = s, n
        if self.reference is not None:
            n = int(self.reference[0].shape[0])
            if n < world:  # the reference errors evaluate the network on every rank's share
                raise DataError(f"/reference: {n} points, fewer than the {world} processes; run on fewer processes")
            s, e = shard_range(n, rank, world)
            self.reference = (self.reference[0][s:e], self.reference[1][s:e])
        return self

    def to(self, device: torch.device, dtype: torch.dtype) -> PdeProblem:
        for b in self.blocks:
            b.points = b.points.to(device=device, dtype=dtype)
            b.inputs = tuple(x.to(device=device, dtype=dtype) for x in b.inputs)
        if self.reference is not None:
            self.reference = tuple(t.to(device=device, dtype=dtype) for t in self.reference)  # type: ignore[assignment]
        return self


def _user_equation(spec: str, base_dir: Path | None) -> Equation:
    fn = import_callable(spec, "config.pde.equation", base_dir)
    return Equation(spec, fn, {}, summary=f"user residual {spec}")


def _equation(raw: Any, base_dir: Path | None) -> Equation:
    if not isinstance(raw, str) or not raw:
        raise ConfigError(
            f"config.pde.equation: expected a built-in name ({', '.join(EQUATIONS)}) or 'file.py:function', got {raw!r}"
        )
    if ":" in raw:
        return _user_equation(raw, base_dir)
    if raw not in EQUATIONS:
        close = difflib.get_close_matches(raw, list(EQUATIONS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"config.pde.equation: unknown equation {raw!r}{hint}; built-in: {', '.join(EQUATIONS)}")
    return EQUATIONS[raw]


class _Builder:
    """Turns validated config pieces into tensors (points, coefficient arrays)."""

    def __init__(
        self, raw: dict[str, Any], data_path: Path | None, gen: torch.Generator, instance: tuple[str, int] | None = None
    ) -> None:
        self.raw = raw
        self.data_path = data_path
        self.gen = gen
        self.instance = instance  # (HDF5 group, row) for {instance: NAME} values (lsr instances)
        variables = raw.get("variables")
        if variables is None:
            raise ConfigError("config.pde.variables: required, e.g. [x, y] or [x, t]")
        if not isinstance(variables, list) or not variables or not all(isinstance(v, str) for v in variables):
            raise ConfigError(f"config.pde.variables: expected a list of names, got {variables!r}")
        if len(set(variables)) != len(variables):
            raise ConfigError(f"config.pde.variables: names repeat in {variables}")
        reserved = [v for v in variables if v in FUNCTIONS or v in BUILTIN_CONSTANTS or not v.isidentifier()]
        if reserved:
            raise ConfigError(
                f"config.pde.variables: {reserved} cannot be variable names (formula functions, "
                "the constants pi and e, or not identifiers)"
            )
        self.variables: list[str] = variables
        consts = raw.get("constants") or {}
        if not isinstance(consts, dict) or not all(isinstance(v, (int, float)) for v in consts.values()):
            raise ConfigError(f"config.pde.constants: expected a mapping of names to numbers, got {consts!r}")
        self.constants = {str(k): float(v) for k, v in consts.items()}
        self.box = self._box(raw.get("domain"))
        self.outputs: list[str] = ["u"]
        self.unknowns: list[Unknown] = []
        self.point_cache: dict[tuple[Any, ...], tuple[Tensor, Tensor | None]] = {}

    def configure(self, eq: Equation) -> None:
        """``pde.outputs`` and ``pde.unknowns``, checked against the names already taken."""
        reserved = dict.fromkeys(FUNCTIONS, "a formula function") | dict.fromkeys(BUILTIN_CONSTANTS, "a constant")
        reserved |= dict.fromkeys(self.constants, "a constant (pde.constants)")
        reserved |= dict.fromkeys(self.variables, "a variable")
        self.outputs = parse_outputs(self.raw.get("outputs"), eq, reserved)
        reserved |= dict.fromkeys(self.outputs, "an output")
        self.unknowns = parse_unknowns(self.raw.get("unknowns"), reserved)

    @property
    def columns(self) -> list[str]:
        """The columns a residual reads: the outputs, then the unknowns."""
        return self.outputs + [u.name for u in self.unknowns]

    def unknown_formula(self, where: str, spec: Any) -> Expression | None:
        """A coefficient formula that uses unknowns (evaluated with them in the residual), else ``None``."""
        if not self.unknowns or not isinstance(spec, (str, int, float)) or isinstance(spec, bool):
            return None
        names = [u.name for u in self.unknowns]
        expr = compile_expression(spec, self.variables + names, where, self.constants)
        return expr if expr.symbols & set(names) else None

    def _box(self, domain: Any) -> Box | None:
        if domain is None:
            return None
        if not isinstance(domain, dict):
            raise ConfigError(f"config.pde.domain: expected a mapping like {{x: [0, 1]}}, got {domain!r}")
        for key in domain:
            if key not in self.variables:
                raise _unknown("pde.domain", str(key), tuple(self.variables))
        lo, hi = [], []
        for v in self.variables:
            b = domain.get(v)
            if not (
                isinstance(b, list) and len(b) == 2 and all(isinstance(t, (int, float)) for t in b) and b[0] < b[1]
            ):
                raise ConfigError(f"config.pde.domain.{v}: expected [low, high] with low < high, got {b!r}")
            lo.append(float(b[0]))
            hi.append(float(b[1]))
        return Box(self.variables, torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64))

    def formula(self, where: str, spec: Any, points: Tensor) -> Tensor:
        """A number, formula, ``{dataset: /path}`` or ``{instance: NAME}`` (row ``i`` of
        ``<instances.group>/NAME`` for instance ``i``, ``lsr instances``) at ``points`` → ``[N]``."""
        if isinstance(spec, dict):
            _mapping(where.removeprefix("config."), spec, ("dataset", "instance"))
            if "instance" in spec:
                return self.instance_values(where, spec["instance"], points)
            arr = self.dataset(where, spec.get("dataset"))
            if arr.shape[0] != points.shape[0]:
                raise DataError(
                    f"{where}: dataset {spec['dataset']} has {arr.shape[0]} rows, the block has "
                    f"{points.shape[0]} points"
                )
            return arr.reshape(points.shape[0], -1)[:, 0]
        expr = compile_expression(spec, self.variables, where, self.constants)
        env = {v: points[:, i] for i, v in enumerate(self.variables)}
        return expr(env).expand(points.shape[0]).to(torch.float64)

    def instance_values(self, where: str, name: Any, points: Tensor) -> Tensor:
        if self.instance is None:
            raise ConfigError(f"{where}: {{instance: {name}}} values exist only in `lsr instances` runs")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}.instance: expected a dataset name in the instances group, got {name!r}")
        assert self.data_path is not None
        group, row = self.instance
        key = f"{group.rstrip('/')}/{name}"
        arr = read_row(self.data_path, key, row, torch.float64).reshape(-1)
        if arr.shape[0] != points.shape[0]:
            raise DataError(
                f"{self.data_path}:{key}: instance {row} has {arr.shape[0]} values, the block has {points.shape[0]} points"
            )
        return arr

    def dataset(self, where: str, name: Any) -> Tensor:
        if not isinstance(name, str):
            raise ConfigError(f"{where}.dataset: expected an HDF5 dataset path, got {name!r}")
        if self.data_path is None:
            raise ConfigError(f"{where}: dataset {name} needs a data file (--data or data.path)")
        return read_datasets(self.data_path, [name], torch.float64)[name]

    def points(
        self, where: str, spec: Any, kind: str, faces: list[str], variable: str | None
    ) -> tuple[Tensor, Tensor | None]:
        """The block's points and, for face kinds, their outward normals."""
        spec = _mapping(where, spec, _POINT_KEYS)
        d = len(self.variables)
        if "dataset" in spec:
            pts = self.dataset(f"config.{where}", spec["dataset"])
            if pts.ndim != 2 or pts.shape[1] != d:
                raise DataError(
                    f"{self.data_path}:{spec['dataset']}: expected points [N, {d}] for variables "
                    f"{self.variables}, found shape {tuple(pts.shape)}"
                )
            normals = (
                self.box.normals_of(pts, f"{self.data_path}:{spec['dataset']}")
                if (kind == "neumann" and self.box is not None)
                else None
            )
            if kind == "neumann" and self.box is None:
                raise ConfigError(f"config.{where}: neumann blocks need pde.domain to know the normals")
            return pts, normals
        method = spec.get("sample")
        count = spec.get("count")
        if method not in (*SAMPLERS, "boundary"):
            raise ConfigError(
                f"config.{where}: give 'dataset' or 'sample' (one of {', '.join(SAMPLERS)}), got {spec!r}"
            )
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ConfigError(f"config.{where}.count: expected a positive integer, got {count!r}")
        if self.box is None:
            raise ConfigError(f"config.{where}: generated points need pde.domain")
        method = "uniform" if method == "boundary" else method
        if kind in ("dirichlet", "neumann"):
            pts, normals = self.box.on_faces(count, self.box.faces(faces), method, self.gen)
            return pts, normals
        if kind == "initial":
            if TIME not in self.variables:
                raise ConfigError(f"config.{where}: an initial block needs the time variable 't' in pde.variables")
            return self.box.on_face(count, self.variables.index(TIME), 0, method, self.gen), None
        if kind == "periodic":
            assert variable is not None
            return self.box.on_face(count, self.variables.index(variable), 0, method, self.gen), None
        region = spec.get("region")
        if region is not None:
            return self._sub_box(f"config.{where}.region", region).interior(count, method, self.gen), None
        return self.box.interior(count, method, self.gen), None

    def _sub_box(self, where: str, region: Any) -> Box:
        """A sub-box of the domain for interior points (e.g. denser points near a front)."""
        assert self.box is not None
        if not isinstance(region, dict):
            raise ConfigError(f"{where}: expected a mapping like {{x: [-0.1, 0.1]}}, got {region!r}")
        lo, hi = self.box.lo.clone(), self.box.hi.clone()
        for key, bounds in region.items():
            if key not in self.variables:
                raise _unknown(where.removeprefix("config."), str(key), tuple(self.variables))
            i = self.variables.index(key)
            ok = (
                isinstance(bounds, list)
                and len(bounds) == 2
                and all(isinstance(t, (int, float)) for t in bounds)
                and float(self.box.lo[i]) <= bounds[0] < bounds[1] <= float(self.box.hi[i])
            )
            if not ok:
                raise ConfigError(
                    f"{where}.{key}: expected [low, high] inside the domain "
                    f"[{float(self.box.lo[i])}, {float(self.box.hi[i])}], got {bounds!r}"
                )
            lo[i], hi[i] = float(bounds[0]), float(bounds[1])
        return Box(self.variables, lo, hi)


def _field_model(model: ModelFn, variables: list[str], x: Tensor, columns: list[str] | None = None) -> Fields:
    if isinstance(model, TabulatedModel):
        return model.fields(x, variables, columns)
    return Fields(model, x, variables, columns)


def _quantity(where: str, comp: Any, b: _Builder, pts: Tensor, normals: Tensor | None, inputs: list[Tensor]) -> Any:
    """The block's constrained quantity (:func:`.components.component_quantity`); its points'
    outward normals are appended to ``inputs`` when the formula uses them."""
    found: list[Tensor] = []

    def normals_of() -> Tensor:
        if not found:
            if normals is not None:
                found.append(normals)
            elif b.box is None:
                raise ConfigError(f"config.{where}.component: the normals n_... need pde.domain")
            else:
                found.append(b.box.normals_of(pts, f"config.{where}.points"))
        return found[0]

    quantity, needs_normals = component_quantity(where, comp, b.outputs, b.variables, b.constants, normals_of)
    if needs_normals:
        inputs.append(normals_of())
    return quantity


def _make_block(
    i: int, raw: Any, eq: Equation, b: _Builder, coeff_specs: dict[str, Any], origin: int | None = None
) -> Block:
    where = f"pde.blocks[{i if origin is None else origin}]"
    spec = _mapping(where, raw, _BLOCK_KEYS)
    kind = spec.get("kind", "pde")
    if kind not in KINDS:
        close = difflib.get_close_matches(str(kind), KINDS, n=1)
        raise ConfigError(
            f"config.{where}.kind: unknown block kind {kind!r}"
            + (f"; did you mean '{close[0]}'?" if close else f"; kinds: {', '.join(KINDS)}")
        )
    name = spec.get("name", f"{kind}{i}")
    weight = spec.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
        raise ConfigError(f"config.{where}.weight: expected a positive number, got {weight!r}")
    faces = spec.get("faces", ["all"])
    faces = [faces] if isinstance(faces, str) else faces
    if not isinstance(faces, list) or not all(isinstance(f, str) for f in faces):
        raise ConfigError(
            f"config.{where}.faces: expected 'all' or a list of face names like [x_min, y_max], got {faces!r}"
        )
    variable = spec.get("variable")
    if kind == "periodic" and variable not in b.variables:
        raise ConfigError(
            f"config.{where}.variable: periodic blocks name a variable of {b.variables}, got {variable!r}"
        )
    if "points" not in spec:
        raise ConfigError(
            f"config.{where}.points: required ({{dataset: /collocation/{name}}} or {{sample: sobol, count: N}})"
        )
    # the blocks made from one (NAME.EQUATION, NAME.COMPONENT) share its points
    shared = (kind, repr(spec["points"]), repr(faces), variable, str(name).rsplit(".", 1)[0])
    if shared not in b.point_cache:
        b.point_cache[shared] = b.points(f"{where}.points", spec["points"], kind, faces, variable)
    pts, normals = b.point_cache[shared]
    variables = b.variables
    columns = b.columns
    comp = spec.get("component")  # one name after expand_blocks; None: the first output
    col = comp if isinstance(comp, str) else b.outputs[0]
    inputs: list[Tensor] = [pts]
    fn: Callable[[ModelFn, tuple[Tensor, ...]], Tensor]
    if kind == "pde":
        names = list(eq.coefficients) + [k for k in coeff_specs if k not in eq.coefficients]
        unknown_names = [u.name for u in b.unknowns]
        lazy: dict[str, Expression] = {}
        static: list[str] = []
        for cname in names:
            if cname in unknown_names and cname not in coeff_specs:
                continue  # the unknown is the coefficient (read from the model's column)
            cspec = coeff_specs.get(cname, eq.coefficients.get(cname, 0.0))
            if cname in eq.vector_coefficients:
                nspace = len([v for v in variables if v != TIME])
                vec = cspec if isinstance(cspec, list) else [cspec] * nspace  # a scalar: same on every axis
                if len(vec) != nspace:
                    raise ConfigError(
                        f"config.pde.coefficients.{cname}: expected {nspace} components "
                        f"(one per spatial variable), got {len(vec)}"
                    )
                inputs.append(
                    torch.stack(
                        [b.formula(f"config.pde.coefficients.{cname}[{j}]", c, pts) for j, c in enumerate(vec)], dim=1
                    )
                )
                static.append(cname)
                continue
            expr = b.unknown_formula(f"config.pde.coefficients.{cname}", cspec)
            if expr is not None:
                lazy[cname] = expr
            else:
                inputs.append(b.formula(f"config.pde.coefficients.{cname}", cspec, pts))
                static.append(cname)
        chosen = spec.get("equations")
        part = chosen[0] if isinstance(chosen, list) and len(chosen) == 1 else None

        def fn(model: ModelFn, rows: tuple[Tensor, ...], names: list[str] = static) -> Tensor:
            F = _field_model(model, variables, rows[0], columns)
            c = dict(zip(names, rows[1:], strict=True))
            if unknown_names:
                values = {u: F[u] for u in unknown_names}
                c.update(values)
                env = {v: rows[0][:, j] for j, v in enumerate(variables)} | values
                c.update({k: e(env) for k, e in lazy.items()})
            r = eq.residual(F, c)
            if isinstance(r, Tensor):
                return r
            if part is None:
                if len(r) != 1:
                    raise ValueError(f"the residual returned {len(r)} equations for one block")
                return next(iter(r.values()))
            return r[part]
    elif kind == "data":
        values = spec.get("values")
        vals = b.dataset(f"config.{where}.values", values)
        if vals.shape[0] != pts.shape[0]:
            raise DataError(f"{b.data_path}:{values}: {vals.shape[0]} values for {pts.shape[0]} points")
        column = spec.get("column", 0)
        table = vals.reshape(pts.shape[0], -1)
        if isinstance(column, bool) or not isinstance(column, int) or not 0 <= column < table.shape[1]:
            raise ConfigError(
                f"config.{where}.column: expected a column of {values} (0 to {table.shape[1] - 1}), got {column!r}"
            )
        inputs.append(table[:, column])
        quantity = _quantity(where, comp, b, pts, normals, inputs)

        def fn(model: ModelFn, rows: tuple[Tensor, ...]) -> Tensor:
            F = _field_model(model, variables, rows[0], columns)
            return quantity(F, rows[2] if len(rows) > 2 else None) - rows[1]
    elif kind == "periodic":
        if b.box is None:
            raise ConfigError(f"config.{where}: periodic blocks need pde.domain")
        i_var = variables.index(str(variable))
        partner = pts.clone()
        partner[:, i_var] = b.box.hi[i_var]
        inputs.append(partner)

        def fn(model: ModelFn, rows: tuple[Tensor, ...]) -> Tensor:
            return (
                _field_model(model, variables, rows[0], columns)[col]
                - _field_model(model, variables, rows[1], columns)[col]
            )
    else:  # dirichlet, neumann, initial
        g = b.formula(f"config.{where}.value", spec.get("value", 0.0), pts)
        inputs.append(g)
        if kind == "neumann":
            assert normals is not None
            inputs.append(normals)

            def fn(model: ModelFn, rows: tuple[Tensor, ...]) -> Tensor:
                F = _field_model(model, variables, rows[0], columns)
                return (F.gradient(col) * rows[2]).sum(-1) - rows[1]
        else:
            quantity = _quantity(where, comp, b, pts, normals, inputs)

            def fn(model: ModelFn, rows: tuple[Tensor, ...]) -> Tensor:
                F = _field_model(model, variables, rows[0], columns)
                return quantity(F, rows[2] if len(rows) > 2 else None) - rows[1]

    return Block(str(name), kind, float(weight), pts, tuple(inputs), spec, residual_fn=fn)


def parse_problem(
    raw: Any,
    data_path: Path | None,
    gen: torch.Generator,
    base_dir: Path | None = None,
    instance: tuple[str, int] | None = None,
    builder: _Builder | None = None,
) -> PdeProblem:
    """Validate the ``pde:`` section and build every block's points and coefficients
    (``instance``: the HDF5 group and row that ``{instance: NAME}`` values read)."""
    raw = _mapping("pde", raw, _PDE_KEYS)
    eq = _equation(raw.get("equation"), base_dir)
    b = builder or _Builder(raw, data_path, gen, instance)
    if eq.needs_time and TIME not in b.variables:
        raise ConfigError(f"config.pde.variables: equation {eq.name!r} needs the time variable 't', got {b.variables}")
    check_spatial_dims(eq, b.variables)
    b.configure(eq)
    coeffs = raw.get("coefficients") or {}
    if not isinstance(coeffs, dict):
        raise ConfigError(f"config.pde.coefficients: expected a mapping, got {coeffs!r}")
    if eq.name in EQUATIONS:
        for key in coeffs:
            if key not in eq.coefficients:
                raise _unknown("pde.coefficients", str(key), tuple(eq.coefficients))
    for u in b.unknowns:
        if u.name in coeffs:
            raise ConfigError(
                f"config.pde.unknowns.{u.name}: pde.coefficients sets {u.name} too; remove it there (an unknown "
                "named like a coefficient is that coefficient)"
            )
    blocks_raw = raw.get("blocks")
    if not isinstance(blocks_raw, list) or not blocks_raw:
        raise ConfigError("config.pde.blocks: expected a non-empty list of residual blocks")
    for i, r in enumerate(blocks_raw):
        _mapping(f"pde.blocks[{i}]", r, _BLOCK_KEYS)
    coefficient_names = list(eq.coefficients) + [k for k in coeffs if k not in eq.coefficients]
    equations = probe_equations(eq, b.variables, b.outputs, [u.name for u in b.unknowns], coefficient_names)
    blocks_raw, origin = expand_blocks(blocks_raw, equations, b.outputs)
    if blocks_raw is not raw["blocks"]:
        raw = {**raw, "blocks": blocks_raw}  # the problem keeps one equation or component per block
    blocks = [_make_block(i, r, eq, b, coeffs, origin[i]) for i, r in enumerate(blocks_raw)]
    names = [blk.name for blk in blocks]
    if len(set(names)) != len(names):
        raise ConfigError(f"config.pde.blocks: block names repeat: {names}")
    set_scales(blocks)
    basis = raw.get("basis", "auto")
    if basis not in ("auto", "output", "residual"):
        raise ConfigError(f"config.pde.basis: expected 'auto', 'output' or 'residual', got {basis!r}")
    if raw.get("weights", "config") not in ("config", "auto"):
        raise ConfigError(f"config.pde.weights: expected 'config' or 'auto', got {raw['weights']!r}")
    if raw.get("validation", "auto") not in ("auto", "choose", "none"):
        raise ConfigError(f"config.pde.validation: expected 'auto', 'choose' or 'none', got {raw['validation']!r}")
    for i, r in enumerate(blocks_raw):
        own = r.get("validation")
        if own is not None:
            own = _mapping(f"pde.blocks[{origin[i]}].validation", own, _POINT_KEYS)
            if not ("dataset" in own or "sample" in own) or (blocks[i].kind == "data"):
                raise ConfigError(
                    f"config.pde.blocks[{origin[i]}].validation: expected points like {{dataset: /validation/NAME}} or "
                    f"{{sample: sobol, count: N}} (not for data blocks), got {own!r}"
                )
    basis_points = raw.get("basis_points", "auto")
    if basis_points != "auto" and (
        isinstance(basis_points, bool) or not isinstance(basis_points, int) or basis_points < 1
    ):
        raise ConfigError(f"config.pde.basis_points: expected 'auto' or a positive integer, got {basis_points!r}")
    want = raw.get("reference", True)
    if want not in (True, False, "required"):
        raise ConfigError(f"config.pde.reference: expected true, false or 'required', got {want!r}")
    if want == "required" and data_path is None:
        raise ConfigError(
            "config.pde.reference: 'required' needs a data file with /reference/inputs and /reference/values"
        )
    reference = None
    if data_path is not None and want:
        ref = read_datasets(data_path, ["/reference/inputs", "/reference/values"], torch.float64, optional=True)
        if len(ref) == 2:
            x_ref, u_ref = ref["/reference/inputs"], ref["/reference/values"]
            if x_ref.ndim != 2 or x_ref.shape[1] != len(b.variables) or u_ref.shape[0] != x_ref.shape[0]:
                raise DataError(
                    f"{data_path}:/reference: inputs {tuple(x_ref.shape)} and values "
                    f"{tuple(u_ref.shape)} do not fit {len(b.variables)} variables"
                )
            reference = (x_ref, u_ref.reshape(x_ref.shape[0], -1)[:, : len(b.outputs)])
        elif want == "required":
            raise DataError(
                f"{data_path}: pde.reference is 'required' but /reference/inputs and /reference/values "
                "are not both there"
            )
    nonlinear = raw.get("nonlinear_iterations", "auto")
    if nonlinear == "auto":
        nonlinear = NONLINEAR_ITERATIONS
    if isinstance(nonlinear, bool) or not isinstance(nonlinear, int) or nonlinear < 0:
        raise ConfigError(
            f"config.pde.nonlinear_iterations: expected 'auto' or a non-negative integer, got {nonlinear!r}"
        )
    return PdeProblem(
        eq,
        raw["equation"],
        b.variables,
        b.box,
        blocks,
        reference,
        basis,
        basis_points,
        raw,
        nonlinear,
        data_path,
        base_dir,
        instance,
        b.outputs,
        b.unknowns,
    )


def set_scales(blocks: list[Block]) -> None:
    """Row scale ``√(w_b · N_total / N_b)``: the loss becomes a weighted mean of squares."""
    total = sum(blk.num_global for blk in blocks)
    for blk in blocks:
        blk.scale = math.sqrt(blk.weight * total / blk.num_global)


def resample(
    problem: PdeProblem,
    gen: torch.Generator,
    data_path: Path | None,
    base_dir: Path | None = None,
    rank: int = 0,
    world: int = 1,
) -> None:
    """Draw new points for the generated blocks (blocks read from the data file stay).

    Distributed (``world > 1``): every rank draws the same global points (same generator
    state) and keeps its share (:meth:`PdeProblem.shard`)."""
    fresh = parse_problem(problem.raw, data_path, gen, base_dir)
    fresh.shard(rank, world)
    device, dtype = problem.blocks[0].points.device, problem.blocks[0].points.dtype
    for i, blk in enumerate(problem.blocks):
        if blk.generated:
            new = fresh.blocks[i]
            blk.points = new.points.to(device=device, dtype=dtype)
            blk.inputs = tuple(x.to(device=device, dtype=dtype) for x in new.inputs)
            blk.residual_fn = new.residual_fn
            blk.first_point, blk.total_points = new.first_point, new.total_points
    set_scales(problem.blocks)
