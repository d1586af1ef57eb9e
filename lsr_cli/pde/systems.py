"""Built-in systems: several output components, several equations (``{name: residual [N]}``).

Each system names the outputs it reads (``pde.outputs`` must contain them; extra outputs, e.g.
a coefficient field, are allowed) and its equations; each equation of a ``pde`` block becomes
a group of rows of its own (``BLOCK.EQUATION`` in the report). Sign convention as in
:mod:`.equations`: every residual is the equation written as ``… = 0``, forcing terms on the
right-hand side.

| name | outputs | equations |
|---|---|---|
| ``navier_stokes`` | u, v, p | ``momentum_x``: ``u u_x + v u_y + p_x − ν Δu − f_x``; ``momentum_y``; ``continuity``: ``u_x + v_y`` (steady, 2-D, density 1) |
| ``navier_stokes_unsteady`` | u, v, p | the same with ``u_t`` and ``v_t`` |
| ``schrodinger`` | u, v | ``i h_t + α Δh + β |h|² h = 0`` for ``h = u + i v``: ``real``, ``imag`` |
| ``gray_scott`` | u, v | ``u_t − D_u Δu + u v² − F (1 − u) − s_u``, ``v_t − D_v Δv − u v² + (F + k) v − s_v`` |
| ``lorenz`` | x, y, z | ``x' − σ (y − x)``, ``y' − x (ρ − z) + y``, ``z' − x y + β z`` (``variables: [t]``) |
| ``lotka_volterra`` | x, y | ``x' − α x + β x y``, ``y' − δ x y + γ y`` (``variables: [t]``) |
| ``kdv`` | (one) | ``u_t + a u u_x + b u_xxx − f`` (1-D; third derivative) |
| ``variable_diffusion`` | u, a | ``−∇·(a ∇u) − f``: the coefficient field ``a(x)`` is an output (inverse problems) |
"""

from __future__ import annotations

from torch import Tensor

from .equations import Equation
from .fields import TIME, Fields


def _xy(F: Fields) -> tuple[str, str]:
    x, y = F.spatial  # spatial_dims = 2 is checked when the config is read
    return x, y


def _ns_terms(F: Fields, c: dict[str, Tensor]) -> dict[str, Tensor]:
    x, y = _xy(F)
    u, v = F["u"], F["v"]
    nu = c["nu"]
    return {
        "momentum_x": u * F.d("u", x) + v * F.d("u", y) + F.d("p", x) - nu * F.laplacian("u") - c["force_x"],
        "momentum_y": u * F.d("v", x) + v * F.d("v", y) + F.d("p", y) - nu * F.laplacian("v") - c["force_y"],
        "continuity": F.d("u", x) + F.d("v", y),
    }


def _navier_stokes(F: Fields, c: dict[str, Tensor]) -> dict[str, Tensor]:
    return _ns_terms(F, c)


def _navier_stokes_unsteady(F: Fields, c: dict[str, Tensor]) -> dict[str, Tensor]:
    r = _ns_terms(F, c)
    r["momentum_x"] = F.d("u", TIME) + r["momentum_x"]
    r["momentum_y"] = F.d("v", TIME) + r["momentum_y"]
    return r


def _schrodinger(F: Fields, c: dict[str, Tensor]) -> dict[str, Tensor]:
    u, v = F["u"], F["v"]
    modulus = u**2 + v**2
    return {
        "real": -F.d("v", TIME) + c["alpha"] * F.laplacian("u") + c["beta"] * modulus * u,
        "imag": F.d("u", TIME) + c["alpha"] * F.laplacian("v") + c["beta"] * modulus * v,
    }


def _gray_scott(F: Fields, c: dict[str, Tensor]) -> dict[str, Tensor]:
    u, v = F["u"], F["v"]
    uvv = u * v**2
    return {
        "u": F.d("u", TIME) - c["Du"] * F.laplacian("u") + uvv - c["feed"] * (1 - u) - c["source_u"],
        "v": F.d("v", TIME) - c["Dv"] * F.laplacian("v") - uvv + (c["feed"] + c["kill"]) * v - c["source_v"],
    }


def _lorenz(F: Fields, c: dict[str, Tensor]) -> dict[str, Tensor]:
    x, y, z = F["x"], F["y"], F["z"]
    return {
        "x": F.d("x", TIME) - c["sigma"] * (y - x) - c["source_x"],
        "y": F.d("y", TIME) - x * (c["rho"] - z) + y - c["source_y"],
        "z": F.d("z", TIME) - x * y + c["beta"] * z - c["source_z"],
    }


def _lotka_volterra(F: Fields, c: dict[str, Tensor]) -> dict[str, Tensor]:
    x, y = F["x"], F["y"]
    return {
        "x": F.d("x", TIME) - c["alpha"] * x + c["beta"] * x * y,
        "y": F.d("y", TIME) - c["delta"] * x * y + c["gamma"] * y,
    }


def _kdv(F: Fields, c: dict[str, Tensor]) -> Tensor:
    (x,) = F.spatial
    return F.d(TIME) + c["a"] * F.u * F.d(x) + c["b"] * F.d3(x, x, x) - c["source"]


def _variable_diffusion(F: Fields, c: dict[str, Tensor]) -> Tensor:
    a = F["a"]
    flux = (F.spatial_gradient("a") * F.spatial_gradient("u")).sum(-1)
    return -(a * F.laplacian("u") + flux) - c["source"]


SYSTEMS: dict[str, Equation] = {
    e.name: e
    for e in (
        Equation(
            "navier_stokes",
            _navier_stokes,
            {"nu": 0.01, "force_x": 0.0, "force_y": 0.0},
            summary="u·∇u + ∇p - ν Δu = f, ∇·u = 0 (steady, 2-D)",
            outputs=("u", "v", "p"),
            equations=("momentum_x", "momentum_y", "continuity"),
            spatial_dims=2,
        ),
        Equation(
            "navier_stokes_unsteady",
            _navier_stokes_unsteady,
            {"nu": 0.01, "force_x": 0.0, "force_y": 0.0},
            True,
            summary="u_t + u·∇u + ∇p - ν Δu = f, ∇·u = 0 (2-D)",
            outputs=("u", "v", "p"),
            equations=("momentum_x", "momentum_y", "continuity"),
            spatial_dims=2,
        ),
        Equation(
            "schrodinger",
            _schrodinger,
            {"alpha": 0.5, "beta": 1.0},
            True,
            summary="i h_t + α Δh + β |h|² h = 0, h = u + i v",
            outputs=("u", "v"),
            equations=("real", "imag"),
        ),
        Equation(
            "gray_scott",
            _gray_scott,
            {"Du": 2e-5, "Dv": 1e-5, "feed": 0.04, "kill": 0.06, "source_u": 0.0, "source_v": 0.0},
            True,
            summary="u_t = D_u Δu - u v² + F (1 - u), v_t = D_v Δv + u v² - (F + k) v",
            outputs=("u", "v"),
            equations=("u", "v"),
        ),
        Equation(
            "lorenz",
            _lorenz,
            {"sigma": 10.0, "rho": 28.0, "beta": 8.0 / 3.0, "source_x": 0.0, "source_y": 0.0, "source_z": 0.0},
            True,
            summary="x' = σ (y - x), y' = x (ρ - z) - y, z' = x y - β z",
            outputs=("x", "y", "z"),
            equations=("x", "y", "z"),
            spatial_dims=0,
        ),
        Equation(
            "lotka_volterra",
            _lotka_volterra,
            {"alpha": 1.0, "beta": 1.0, "gamma": 1.0, "delta": 1.0},
            True,
            summary="x' = α x - β x y, y' = δ x y - γ y",
            outputs=("x", "y"),
            equations=("x", "y"),
            spatial_dims=0,
        ),
        Equation(
            "kdv",
            _kdv,
            {"a": 6.0, "b": 1.0, "source": 0.0},
            True,
            summary="u_t + a u u_x + b u_xxx = f (1-D)",
            spatial_dims=1,
        ),
        Equation(
            "variable_diffusion",
            _variable_diffusion,
            {"source": 0.0},
            summary="-∇·(a ∇u) = f, the field a(x) an output",
            outputs=("u", "a"),
        ),
    )
}
"""Built-in systems by name (merged into :data:`~.equations.EQUATIONS`)."""
