"""A residual block and its residual function, one per block kind (``pde``, ``data``, ``periodic``,
``dirichlet``, ``neumann``, ``initial``), made from a validated block spec."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lsr_cli.errors import ConfigError, DataError
from lsr_cli.linearization import ModelFn

from .builder import _Builder
from .components import component_quantity
from .equations import Equation
from .expressions import Expression
from .fields import TIME, Fields, TabulatedModel
from .schema import (
    _BLOCK_KEYS,
    KINDS,
    _mapping,
)


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
    inputs: list[Tensor] = [pts]
    if kind == "pde":
        fn = _pde_residual(spec, eq, b, coeff_specs, pts, inputs)
    elif kind == "data":
        fn = _data_residual(where, spec, b, pts, normals, inputs)
    elif kind == "periodic":
        fn = _periodic_residual(where, spec, b, str(variable), pts, inputs)
    else:  # dirichlet, neumann, initial
        fn = _boundary_residual(where, spec, kind, b, pts, normals, inputs)
    return Block(str(name), kind, float(weight), pts, tuple(inputs), spec, residual_fn=fn)


Residual = Callable[[ModelFn, tuple[Tensor, ...]], Tensor]
"""A block's residual function: ``(model, rows) -> [N]``, ``rows`` the block's inputs (points first)."""


def _pde_residual(
    spec: dict[str, Any], eq: Equation, b: _Builder, coeff_specs: dict[str, Any], pts: Tensor, inputs: list[Tensor]
) -> Residual:
    """The equation's residual at ``pts``; its coefficients are appended to ``inputs`` (arrays)
    or evaluated per call (formulas of unknown constants)."""
    variables, columns = b.variables, b.columns
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

    return fn


def _data_residual(
    where: str, spec: dict[str, Any], b: _Builder, pts: Tensor, normals: Tensor | None, inputs: list[Tensor]
) -> Residual:
    """The observed quantity minus its ``values`` (a column of a dataset) at ``pts``."""
    variables, columns = b.variables, b.columns
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
    quantity = _quantity(where, spec.get("component"), b, pts, normals, inputs)

    def fn(model: ModelFn, rows: tuple[Tensor, ...]) -> Tensor:
        F = _field_model(model, variables, rows[0], columns)
        return quantity(F, rows[2] if len(rows) > 2 else None) - rows[1]

    return fn


def _periodic_residual(
    where: str, spec: dict[str, Any], b: _Builder, variable: str, pts: Tensor, inputs: list[Tensor]
) -> Residual:
    """``u(x_lo) − u(x_hi)`` along ``variable``: the partner points on the upper face are appended to ``inputs``."""
    if b.box is None:
        raise ConfigError(f"config.{where}: periodic blocks need pde.domain")
    comp = spec.get("component")  # one name after expand_blocks; None: the first output
    variables, columns = b.variables, b.columns
    col = comp if isinstance(comp, str) else b.outputs[0]
    i_var = variables.index(variable)
    partner = pts.clone()
    partner[:, i_var] = b.box.hi[i_var]
    inputs.append(partner)

    def fn(model: ModelFn, rows: tuple[Tensor, ...]) -> Tensor:
        return (
            _field_model(model, variables, rows[0], columns)[col]
            - _field_model(model, variables, rows[1], columns)[col]
        )

    return fn


def _boundary_residual(
    where: str,
    spec: dict[str, Any],
    kind: str,
    b: _Builder,
    pts: Tensor,
    normals: Tensor | None,
    inputs: list[Tensor],
) -> Residual:
    """``dirichlet`` and ``initial``: the constrained quantity minus ``value``; ``neumann``: the
    outward normal derivative minus ``value``."""
    variables, columns = b.variables, b.columns
    comp = spec.get("component")  # one name after expand_blocks; None: the first output
    col = comp if isinstance(comp, str) else b.outputs[0]
    inputs.append(b.formula(f"config.{where}.value", spec.get("value", 0.0), pts))
    if kind == "neumann":
        assert normals is not None
        inputs.append(normals)

        def neumann(model: ModelFn, rows: tuple[Tensor, ...]) -> Tensor:
            F = _field_model(model, variables, rows[0], columns)
            return (F.gradient(col) * rows[2]).sum(-1) - rows[1]

        return neumann
    quantity = _quantity(where, comp, b, pts, normals, inputs)

    def fn(model: ModelFn, rows: tuple[Tensor, ...]) -> Tensor:
        F = _field_model(model, variables, rows[0], columns)
        return quantity(F, rows[2] if len(rows) > 2 else None) - rows[1]

    return fn
