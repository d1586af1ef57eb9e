"""Systems in the ``pde:`` config: named outputs, the equations of a residual, and blocks that
constrain several components or enforce several equations.

- ``pde.outputs: [u, v, p]`` names the network's output columns (default: a built-in system's
  outputs, else ``[u]``); unknown constants (:mod:`.unknowns`) are columns after them.
- A ``pde`` block of a system becomes one group of rows per equation (``BLOCK.EQUATION``), a
  boundary, initial or data block naming several components (``component: [u, v]``) one per
  component (``BLOCK.COMPONENT``), each with its own weight (``weight: {continuity: 10}``).
  The expansion is written back into the ``pde:`` mapping the problem keeps (one equation or
  component per block), so that re-reading it (validation points, resampling) gives the same
  blocks.
- A ``dirichlet``, ``initial`` or ``data`` block may constrain a formula over the components
  instead of one (``component: "u*n_x + v*n_y"``): its symbols are the outputs, their first
  derivatives ``u_x`` (output ``_`` variable), the variables and, on the domain's faces, the
  outward normal ``n_x`` (``n_`` variable).
- A user residual is probed once, on a smooth stand-in for the network at three points, to learn
  whether it returns one tensor or a mapping of equations and to turn a wrong output name into a
  one-line config error before any file is read.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from lsr_cli.errors import ConfigError

from .equations import EQUATIONS, Equation
from .expressions import compile_expression
from .fields import DEFAULT_OUTPUT, TIME, Fields

_DATA_KEYS = ("dataset", "instance")
FORMULA_KINDS = ("dirichlet", "initial", "data")
"""Blocks whose ``component`` may be a formula over components (e.g. a normal flux ``u*n_x + v*n_y``)."""


def parse_outputs(raw: Any, eq: Equation, reserved: dict[str, str]) -> list[str]:
    """``pde.outputs`` checked against the equation's outputs and names already taken."""
    if raw is None:
        return list(eq.outputs) if eq.outputs else [DEFAULT_OUTPUT]
    if not isinstance(raw, list) or not raw or not all(isinstance(o, str) for o in raw):
        raise ConfigError(f"config.pde.outputs: expected a list of names like [u, v, p], got {raw!r}")
    if len(set(raw)) != len(raw):
        raise ConfigError(f"config.pde.outputs: names repeat in {raw}")
    for name in raw:
        if not name.isidentifier():
            raise ConfigError(f"config.pde.outputs: {name!r} is not a valid name (letters, digits, _)")
        if name in reserved:
            raise ConfigError(f"config.pde.outputs: {name!r} has the name of {reserved[name]}; rename it")
    missing = [o for o in eq.outputs if o not in raw]
    if missing:
        raise ConfigError(
            f"config.pde.outputs: equation {eq.name!r} reads the outputs {list(eq.outputs)}; "
            f"{missing} missing from {raw} (name the network's columns so)"
        )
    return list(raw)


def _stub(num_columns: int) -> Any:
    """A smooth stand-in for the network: ``[N, d] → [N, num_columns]``, nonzero values."""

    def model(x: Tensor) -> Tensor:
        k = torch.arange(1, x.shape[1] + 1, dtype=x.dtype)
        cols = [0.6 + 0.25 * torch.sin((x * (k + j)).sum(1) + j) for j in range(num_columns)]
        return torch.stack(cols, dim=1)

    return model


def probe_equations(
    eq: Equation, variables: list[str], outputs: list[str], unknowns: list[str], coefficients: list[str]
) -> tuple[str, ...]:
    """The equation names of ``eq``'s residual (``()``: it returns one tensor); for a user
    residual found by evaluating it once on a stand-in network."""
    if eq.name in EQUATIONS:
        return eq.equations
    x = 0.1 * torch.arange(1, 4, dtype=torch.float64)[:, None] + 0.05 * torch.arange(len(variables))
    columns = outputs + unknowns
    F = Fields(_stub(len(columns)), x, variables, columns)
    c = {name: torch.full((3,), 0.5, dtype=torch.float64) for name in coefficients}
    c.update({name: F[name] for name in unknowns})
    try:
        r = eq.residual(F, c)
    except Exception as exc:  # user code: a renamed output, a missing coefficient, ...
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"config.pde.equation: the residual {eq.name} failed on a stand-in network with outputs {outputs}"
            f"{f' and unknowns {unknowns}' if unknowns else ''}: {type(exc).__name__}: {text[:200]}"
        ) from None
    if isinstance(r, Tensor):
        return ()
    if (
        not isinstance(r, Mapping)
        or not r
        or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in r.items())
    ):
        raise ConfigError(
            f"config.pde.equation: the residual {eq.name} must return a tensor [N] or a mapping "
            f"{{name: tensor [N]}}, got {type(r).__name__}"
        )
    return tuple(r)


def _weights(where: str, weight: Any, parts: list[str]) -> dict[str, Any]:
    if not isinstance(weight, dict):
        return dict.fromkeys(parts, weight)
    for key in weight:
        if key not in parts:
            raise ConfigError(f"config.{where}.weight.{key}: not one of this block's parts {parts}")
    return {p: weight.get(p, 1.0) for p in parts}


def _components(where: str, spec: dict[str, Any], outputs: list[str]) -> list[str] | None:
    """The components a non-``pde`` block constrains (``None``: the single output, unnamed)."""
    comp = spec.get("component")
    kind = spec.get("kind", "pde")
    if comp is None:
        if len(outputs) == 1:
            return None
        if kind == "periodic":
            return list(outputs)
        raise ConfigError(
            f"config.{where}.component: required when the network has several outputs {outputs}: "
            "name one (`component: u`) or a list (`component: [u, v]`)"
        )
    comps = [comp] if isinstance(comp, str) else comp
    if not isinstance(comps, list) or not comps or not all(isinstance(c, str) for c in comps):
        raise ConfigError(f"config.{where}.component: expected an output name or a list of them, got {comp!r}")
    for c in comps:
        if c in outputs:
            continue
        if c.strip().isidentifier():
            raise ConfigError(f"config.{where}.component: unknown component {c!r}; the outputs are {outputs}")
        if len(comps) > 1 or kind not in FORMULA_KINDS:
            raise ConfigError(
                f"config.{where}.component: a formula ({c!r}) is one block's whole component, in "
                f"{', '.join(FORMULA_KINDS)} blocks"
            )
    if len(set(comps)) != len(comps):
        raise ConfigError(f"config.{where}.component: components repeat in {comps}")
    return comps


def _per_component(where: str, value: Any, comps: list[str]) -> dict[str, Any]:
    """A block's ``value`` per component: a mapping keyed by component names, or one for all."""
    if isinstance(value, dict) and not any(k in value for k in _DATA_KEYS):
        for key in value:
            if key not in comps:
                raise ConfigError(f"config.{where}.{key}: not one of the block's components {comps}")
        missing = [c for c in comps if c not in value]
        if missing:
            raise ConfigError(f"config.{where}: no value for component(s) {missing}")
        return dict(value)
    return dict.fromkeys(comps, value)


def expand_blocks(blocks: list[Any], equations: tuple[str, ...], outputs: list[str]) -> tuple[list[Any], list[int]]:
    """Every block of several equations or components split into one block per equation or
    component; returns the blocks and, for each, the index of the block it came from. Blocks of
    a single-output scalar problem are returned as they are (the same objects)."""
    out: list[Any] = []
    origin: list[int] = []
    expanded = False
    for i, spec in enumerate(blocks):
        if not isinstance(spec, dict):
            out.append(spec)
            origin.append(i)
            continue
        where = f"pde.blocks[{i}]"
        kind = spec.get("kind", "pde")
        name = spec.get("name", f"{kind}{i}")
        weight = spec.get("weight", 1.0)
        if kind == "pde":
            if "component" in spec:
                raise ConfigError(
                    f"config.{where}.component: not for pde blocks (they enforce equations; `equations:` picks some)"
                )
            chosen = spec.get("equations")
            if not equations:
                if chosen is not None:
                    raise ConfigError(
                        f"config.{where}.equations: the residual returns one equation, not a mapping of several"
                    )
                parts = [dict(spec)]
            else:
                chosen = list(equations) if chosen is None else chosen
                if not isinstance(chosen, list) or not chosen or not all(e in equations for e in chosen):
                    raise ConfigError(
                        f"config.{where}.equations: expected a list of the residual's equations {list(equations)}, "
                        f"got {spec.get('equations')!r}"
                    )
                weights = _weights(where, weight, chosen)
                parts = [
                    {
                        **spec,
                        "name": name if len(chosen) == 1 else f"{name}.{e}",
                        "equations": [e],
                        "weight": weights[e],
                    }
                    for e in chosen
                ]
        else:
            if "equations" in spec:
                raise ConfigError(f"config.{where}.equations: only for pde blocks (this is a {kind} block)")
            comps = _components(where, spec, outputs)
            if comps is None:
                parts = [dict(spec)]
            else:
                weights = _weights(where, weight, comps)
                parts = []
                values = _per_component(f"{where}.value", spec["value"], comps) if "value" in spec else None
                data = spec.get("values")
                data_map = _per_component(f"{where}.values", data, comps) if isinstance(data, dict) else None
                for j, c in enumerate(comps):
                    part = {**spec, "name": name if len(comps) == 1 else f"{name}.{c}", "component": c}
                    part["weight"] = weights[c]
                    if values is not None:
                        part["value"] = values[c]
                    if data_map is not None:
                        part["values"] = data_map[c]
                    elif kind == "data" and len(comps) > 1:
                        part["column"] = j  # one dataset [N, len(comps)]: column j is component j
                    parts.append(part)
        expanded = expanded or len(parts) > 1 or parts[0] != spec
        out.extend(copy.deepcopy(p) for p in parts)
        origin.extend([i] * len(parts))
    if not expanded:
        return blocks, list(range(len(blocks)))
    for i, spec in zip(origin, out, strict=True):  # names fixed: re-reading gives the same ones
        if isinstance(spec, dict) and "name" not in spec:
            spec["name"] = f"{spec.get('kind', 'pde')}{i}"
    return out, origin


Quantity = Callable[[Fields, Tensor | None], Tensor]
"""What a block constrains, from the fields at its points (and their outward normals): ``[N]``."""


def component_quantity(
    where: str,
    component: str | None,
    outputs: list[str],
    variables: list[str],
    constants: dict[str, float],
    normals_of: Callable[[], Tensor],
) -> tuple[Quantity, bool]:
    """The quantity a ``dirichlet``, ``initial`` or ``data`` block constrains — an output's values,
    or a formula over the outputs, their first derivatives ``u_x``, the variables and the outward
    normals ``n_x`` — and whether it needs the normals (``normals_of()`` gives them)."""
    if component is None or component in outputs:
        name = component or outputs[0]
        return (lambda F, n: F[name]), False
    derivs = {f"{o}_{v}": (o, v) for o in outputs for v in variables}
    normal = {f"n_{v}": j for j, v in enumerate(variables) if v != TIME}
    expr = compile_expression(
        component, [*outputs, *variables, *derivs, *normal], f"config.{where}.component", constants
    )
    needs_normals = bool(expr.symbols & normal.keys())
    if needs_normals:
        normals_of()  # fail now (no domain, points on no face) rather than at the first residual

    def quantity(F: Fields, n: Tensor | None) -> Tensor:
        env: dict[str, Tensor] = {}
        for sym in expr.symbols:
            if sym in outputs:
                env[sym] = F[sym]
            elif sym in derivs:
                env[sym] = F.d(*derivs[sym])
            elif sym in normal:
                assert n is not None
                env[sym] = n[:, normal[sym]]
            else:
                env[sym] = F.var(sym)
        return expr(env)

    return quantity, needs_normals


def check_spatial_dims(eq: Equation, variables: list[str]) -> None:
    """Systems written in a fixed dimension: the number of spatial variables must match."""
    if eq.spatial_dims is None:
        return
    spatial = [v for v in variables if v != TIME]
    if len(spatial) != eq.spatial_dims:
        what = f"{eq.spatial_dims} spatial variable(s)" if eq.spatial_dims else "no spatial variable (an ODE: [t])"
        raise ConfigError(f"config.pde.variables: equation {eq.name!r} needs {what} besides 't', got {variables}")


__all__ = [
    "FORMULA_KINDS",
    "Quantity",
    "check_spatial_dims",
    "component_quantity",
    "expand_blocks",
    "parse_outputs",
    "probe_equations",
]
