"""Validated ``pde:`` pieces made tensors: the box domain, generated and read points, formulas and
coefficient arrays (:class:`_Builder`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lsr_cli.data import read_datasets, read_row
from lsr_cli.errors import ConfigError, DataError

from .components import parse_outputs
from .equations import Equation
from .expressions import BUILTIN_CONSTANTS, FUNCTIONS, Expression, compile_expression
from .fields import TIME
from .schema import _POINT_KEYS, SAMPLERS, _mapping, _unknown
from .unknowns import Unknown, parse_unknowns


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
