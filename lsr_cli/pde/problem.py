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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lsr_cli.data import read_datasets
from lsr_cli.distributed import shard_range
from lsr_cli.errors import ConfigError, DataError
from lsr_cli.usercode import import_callable

from .blocks import Block, _make_block
from .builder import Box, _Builder
from .components import check_spatial_dims, expand_blocks, probe_equations
from .equations import EQUATIONS, Equation
from .fields import TIME
from .schema import (
    _BLOCK_KEYS,
    _PDE_KEYS,
    _POINT_KEYS,
    BLOCK_KEYS,
    KINDS,
    NONLINEAR_ITERATIONS,
    PDE_KEYS,
    POINT_KEYS,
    SAMPLERS,
    _mapping,
    _unknown,
)
from .unknowns import Unknown


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


__all__ = [  # with the names of the modules it is made of (schema, builder, blocks), used from here
    "BLOCK_KEYS",
    "KINDS",
    "PDE_KEYS",
    "POINT_KEYS",
    "SAMPLERS",
    "Block",
    "Box",
    "PdeProblem",
    "_Builder",
    "parse_problem",
    "resample",
    "set_scales",
]
