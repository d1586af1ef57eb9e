"""Built-in equations: a registry of residuals ``r(F, c)`` on :class:`~.fields.Fields`.

Each equation names its coefficients (with defaults) and whether it needs the time variable
``t``. Coefficients arrive as tensors ``[N]`` (formulas or numbers from the YAML, or arrays from
the HDF5 file, evaluated at the points); a vector coefficient (``velocity``) is ``[N, d_space]``.
Sign convention: the residual is the equation written as ``… = 0``; ``source`` is the
right-hand side ``f``.

| name | equation |
|---|---|
| ``poisson`` | ``−Δu = f`` (any dimension) |
| ``helmholtz`` | ``Δu + k² u = f`` |
| ``heat`` (alias ``diffusion``) | ``u_t − κ Δu = f`` |
| ``advection`` | ``u_t + c · ∇u = f`` |
| ``transport`` | ``c · ∇u = f`` (steady; in 1-D with ``c = 1``: ``u' = f``, the antiderivative) |
| ``burgers`` | ``u_t + u Σ_i ∂u/∂x_i − ν Δu = f`` (the usual form in 1-D) |
| ``allen_cahn`` | ``u_t − ε Δu − γ (u − u³) = f`` |
| ``diffusion_reaction`` | ``u_t − D Δu − k u² = f`` |

Systems (several outputs, several equations; :mod:`.systems`): ``navier_stokes``,
``navier_stokes_unsteady``, ``schrodinger``, ``gray_scott``, ``lorenz``, ``lotka_volterra``,
and ``kdv`` (one output, a third derivative).

A user-defined residual (``equation: "file.py:function"``) has the same signature:
``function(F: Fields, c: dict[str, Tensor]) -> Tensor [N]``, or a mapping ``{name: Tensor [N]}``
for a system of equations (each is a group of rows of its own: ``BLOCK.name`` in the report).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from torch import Tensor

from .fields import Fields

Residual = Callable[[Fields, dict[str, Tensor]], Tensor | Mapping[str, Tensor]]


@dataclass(frozen=True)
class Equation:
    """A residual and what it needs: coefficients (with defaults), the time variable, the output
    names it reads (``outputs``; empty: the first output, whatever its name), the names of the
    equations of a system (``equations``; empty: one residual tensor) and, for systems written in
    a fixed dimension, the number of spatial variables (``spatial_dims``)."""

    name: str
    residual: Residual
    coefficients: dict[str, float | str | list[float]] = field(default_factory=dict)
    needs_time: bool = False
    vector_coefficients: tuple[str, ...] = ()
    summary: str = ""
    outputs: tuple[str, ...] = ()
    equations: tuple[str, ...] = ()
    spatial_dims: int | None = None


def _poisson(F: Fields, c: dict[str, Tensor]) -> Tensor:
    return -F.laplacian() - c["source"]


def _helmholtz(F: Fields, c: dict[str, Tensor]) -> Tensor:
    return F.laplacian() + c["k"] ** 2 * F.u - c["source"]


def _heat(F: Fields, c: dict[str, Tensor]) -> Tensor:
    return F.d("t") - c["kappa"] * F.laplacian() - c["source"]


def _advection(F: Fields, c: dict[str, Tensor]) -> Tensor:
    return F.d("t") + (c["velocity"] * F.spatial_gradient()).sum(-1) - c["source"]


def _transport(F: Fields, c: dict[str, Tensor]) -> Tensor:
    return (c["velocity"] * F.spatial_gradient()).sum(-1) - c["source"]


def _burgers(F: Fields, c: dict[str, Tensor]) -> Tensor:
    return F.d("t") + F.u * F.spatial_gradient().sum(-1) - c["nu"] * F.laplacian() - c["source"]


def _allen_cahn(F: Fields, c: dict[str, Tensor]) -> Tensor:
    u = F.u
    return F.d("t") - c["epsilon"] * F.laplacian() - c["gamma"] * (u - u**3) - c["source"]


def _diffusion_reaction(F: Fields, c: dict[str, Tensor]) -> Tensor:
    return F.d("t") - c["D"] * F.laplacian() - c["k"] * F.u**2 - c["source"]


_SCALAR: dict[str, Equation] = {
    e.name: e
    for e in (
        Equation("poisson", _poisson, {"source": 0.0}, summary="-Δu = f"),
        Equation("helmholtz", _helmholtz, {"k": 1.0, "source": 0.0}, summary="Δu + k² u = f"),
        Equation("heat", _heat, {"kappa": 1.0, "source": 0.0}, True, summary="u_t - κ Δu = f"),
        Equation("diffusion", _heat, {"kappa": 1.0, "source": 0.0}, True, summary="u_t - κ Δu = f"),
        Equation(
            "advection", _advection, {"velocity": 1.0, "source": 0.0}, True, ("velocity",), summary="u_t + c·∇u = f"
        ),
        Equation("transport", _transport, {"velocity": 1.0, "source": 0.0}, False, ("velocity",), summary="c·∇u = f"),
        Equation("burgers", _burgers, {"nu": 0.01, "source": 0.0}, True, summary="u_t + u Σ∂u/∂x_i - ν Δu = f"),
        Equation(
            "allen_cahn",
            _allen_cahn,
            {"epsilon": 1e-4, "gamma": 5.0, "source": 0.0},
            True,
            summary="u_t - ε Δu - γ (u - u³) = f",
        ),
        Equation(
            "diffusion_reaction",
            _diffusion_reaction,
            {"D": 0.01, "k": 0.01, "source": 0.0},
            True,
            summary="u_t - D Δu - k u² = f",
        ),
    )
}


def _registry() -> dict[str, Equation]:
    from .systems import SYSTEMS  # systems use Equation: imported once this module is complete

    return {**_SCALAR, **SYSTEMS}


EQUATIONS: dict[str, Equation] = _registry()
"""Every built-in equation by name: scalar equations, then systems."""
