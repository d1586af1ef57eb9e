"""PDE residuals: exact input derivatives, every built-in equation on an exact solution, the
``pde:`` config section (points, blocks, scales, coefficients, every error) and ``refine_pde``."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from torch import Tensor

from lsr_cli.checkpoint import LoadedCheckpoint
from lsr_cli.config import Config
from lsr_cli.errors import ConfigError, DataError
from lsr_cli.models import MLP
from lsr_cli.pde import EQUATIONS, Fields, parse_problem, refine_pde
from lsr_cli.pde.problem import Box, PdeProblem
from lsr_cli.pde.systems import SYSTEMS

PI = math.pi
F64 = torch.float64

DERIVATIVE_ATOL = 1e-12
"""Autodiff of closed forms in float64: values and derivatives are O(1-10), round-off a few ulp."""
RESIDUAL_ATOL = 1e-10
"""Residual of an exact solution. Every term of the test cases is at most O(10²) (the steepest:
Allen–Cahn's u'' ≈ 2b²·0.4 ≈ 200 with b² = 250, Burgers' u'' ≈ 80), so float64 round-off is
≲ 1e-13; 1e-10 leaves a wide margin and still catches any wrong sign or factor."""
WRONG_RESIDUAL_MIN = 1e-3
"""A perturbed solution (``+ 0.1·exp(Σ X)``) must leave a residual far above round-off."""
USER_RESIDUAL_ATOL = 1e-12
"""A user residual that re-implements a built-in one differs only by summation order."""
NUM_POINTS = 64


def uniform_points(lo: list[float], hi: list[float], n: int = NUM_POINTS, seed: int = 0) -> Tensor:
    """``n`` points uniform in the box ``[lo, hi]``: ``[n, d]`` float64."""
    gen = torch.Generator().manual_seed(seed)
    lo_t, hi_t = torch.tensor(lo, dtype=F64), torch.tensor(hi, dtype=F64)
    return lo_t + (hi_t - lo_t) * torch.rand(n, len(lo), generator=gen, dtype=F64)


def full(X: Tensor, value: float) -> Tensor:
    """A constant coefficient ``[N]``."""
    return torch.full((X.shape[0],), value, dtype=X.dtype)


# --------------------------------------------------------------------------------------------
# 1. Fields against hand-derived derivatives
# --------------------------------------------------------------------------------------------


def closed_form(X: Tensor) -> Tensor:
    """``u = sin(x)·cos(2y)·exp(−t/2) + x²y + y t²`` for columns ``[x, y, t]``."""
    x, y, t = X[:, 0], X[:, 1], X[:, 2]
    return torch.sin(x) * torch.cos(2 * y) * torch.exp(-t / 2) + x**2 * y + y * t**2


def closed_form_derivatives(X: Tensor) -> tuple[Tensor, Tensor]:
    """Gradient ``[N, 3]`` and Hessian ``[N, 3, 3]`` of :func:`closed_form`, derived by hand."""
    x, y, t = X[:, 0], X[:, 1], X[:, 2]
    sx, cx, s2y, c2y, e = torch.sin(x), torch.cos(x), torch.sin(2 * y), torch.cos(2 * y), torch.exp(-t / 2)
    grad = torch.stack(
        [cx * c2y * e + 2 * x * y, -2 * sx * s2y * e + x**2 + t**2, -0.5 * sx * c2y * e + 2 * y * t], dim=1
    )
    u_xx, u_yy, u_tt = -sx * c2y * e + 2 * y, -4 * sx * c2y * e, 0.25 * sx * c2y * e + 2 * y
    u_xy, u_xt, u_yt = -2 * cx * s2y * e + 2 * x, -0.5 * cx * c2y * e, sx * s2y * e + 2 * t
    hess = torch.stack(
        [torch.stack(row, dim=1) for row in ((u_xx, u_xy, u_xt), (u_xy, u_yy, u_yt), (u_xt, u_yt, u_tt))], dim=1
    )
    return grad, hess


@pytest.mark.parametrize("output", ["flat", "column"], ids=["model returns [N]", "model returns [N, 1]"])
def test_fields_match_hand_derived_derivatives(output):
    X = uniform_points([-1.0, -1.0, 0.0], [1.0, 1.0, 2.0])
    model = closed_form if output == "flat" else (lambda X: closed_form(X)[:, None])
    F = Fields(model, X, ["x", "y", "t"])
    grad, hess = closed_form_derivatives(X)
    close = {"rtol": 0.0, "atol": DERIVATIVE_ATOL}

    torch.testing.assert_close(F.u, closed_form(X), **close)
    torch.testing.assert_close(F.gradient(), grad, **close)
    torch.testing.assert_close(F.hessian(), hess, **close)
    torch.testing.assert_close(F.d("x"), grad[:, 0], **close)
    torch.testing.assert_close(F.d("t"), grad[:, 2], **close)
    torch.testing.assert_close(F.d2("x", "y"), hess[:, 0, 1], **close)
    torch.testing.assert_close(F.d2("y", "x"), hess[:, 0, 1], **close)
    torch.testing.assert_close(F.d2("t", "t"), hess[:, 2, 2], **close)
    # the Laplacian and spatial gradient leave out t: u_xx + u_yy = −5 sin(x) cos(2y) e^(−t/2) + 2y
    lap = -5 * torch.sin(X[:, 0]) * torch.cos(2 * X[:, 1]) * torch.exp(-X[:, 2] / 2) + 2 * X[:, 1]
    torch.testing.assert_close(F.laplacian(), lap, **close)
    torch.testing.assert_close(F.spatial_gradient(), grad[:, :2], **close)
    assert F.spatial == ["x", "y"]
    torch.testing.assert_close(F.var("y"), X[:, 1], rtol=0.0, atol=0.0)
    assert F.d2("x", "y") is F.d2("y", "x") and F.d("x") is F.d("x")  # each derivative computed once


def test_fields_time_first_and_shape_errors():
    X = uniform_points([0.0, -1.0, -1.0], [2.0, 1.0, 1.0])
    reordered = X[:, [1, 2, 0]]  # closed_form reads [x, y, t]; the Fields columns are [t, x, y]
    F = Fields(lambda Z: closed_form(Z[:, [1, 2, 0]]), X, ["t", "x", "y"])
    grad, hess = closed_form_derivatives(reordered)
    torch.testing.assert_close(F.spatial_gradient(), grad[:, :2], rtol=0.0, atol=DERIVATIVE_ATOL)
    torch.testing.assert_close(F.laplacian(), hess[:, 0, 0] + hess[:, 1, 1], rtol=0.0, atol=DERIVATIVE_ATOL)
    with pytest.raises(ValueError, match=r"points must be \[N, 2\]"):
        Fields(closed_form, X, ["x", "y"])
    with pytest.raises(KeyError, match="unknown variable 'z'"):
        F.d("z")


# --------------------------------------------------------------------------------------------
# 2. Every built-in equation: exact solutions give a residual of round-off size
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """An exact solution ``u(X)`` (``[N, d]`` → ``[N]``) of ``equation`` with its coefficients."""

    id: str
    equation: str
    variables: tuple[str, ...]
    lo: tuple[float, ...]
    hi: tuple[float, ...]
    u: Callable[[Tensor], Tensor]
    coefficients: Callable[[Tensor], dict[str, Tensor]]


KAPPA, NU, EPS, GAMMA = 0.1, 0.05, 0.01, 5.0
C1, C2 = 0.7, -1.3  # advection velocity
SHOCK_SPEED, SHOCK_AMPLITUDE = 0.3, 0.8
D_DIFF, K_REACT = 0.05, 0.3
KINK = math.sqrt(GAMMA / (2 * EPS))  # tanh(b x) solves −ε u'' = γ (u − u³) iff b² = γ / (2ε)


def _sin_prod(X: Tensor) -> Tensor:
    return torch.prod(torch.sin(PI * X), dim=1)


def _heat(X: Tensor) -> Tensor:  # [x, t]
    return torch.exp(-KAPPA * PI**2 * X[:, 1]) * torch.sin(PI * X[:, 0])


def _heat_2d(X: Tensor) -> Tensor:  # [x, y, t]
    return torch.exp(-2 * KAPPA * PI**2 * X[:, 2]) * torch.sin(PI * X[:, 0]) * torch.sin(PI * X[:, 1])


def _moving_shock(X: Tensor) -> Tensor:  # [x, t]: u = c − A tanh(A (x − c t) / (2ν))
    xi = X[:, 0] - SHOCK_SPEED * X[:, 1]
    return SHOCK_SPEED - SHOCK_AMPLITUDE * torch.tanh(SHOCK_AMPLITUDE * xi / (2 * NU))


def _reaction(X: Tensor) -> Tensor:  # [x, t]
    return torch.exp(-X[:, 1]) * torch.sin(PI * X[:, 0])


def _reaction_source(X: Tensor) -> Tensor:
    # u_t = −u, Δu = −π² u  ⇒  f = u_t − D Δu − k u² = −u + D π² u − k u²
    u = _reaction(X)
    return -u + D_DIFF * PI**2 * u - K_REACT * u**2


CASES = [
    Case("poisson-1d", "poisson", ("x",), (0.0,), (1.0,), _sin_prod, lambda X: {"source": PI**2 * _sin_prod(X)}),
    Case(
        "poisson-2d",
        "poisson",
        ("x", "y"),
        (0.0, 0.0),
        (1.0, 1.0),
        _sin_prod,
        lambda X: {"source": 2 * PI**2 * _sin_prod(X)},
    ),
    Case(
        "poisson-3d",
        "poisson",
        ("x", "y", "z"),
        (0.0,) * 3,
        (1.0,) * 3,
        _sin_prod,
        lambda X: {"source": 3 * PI**2 * _sin_prod(X)},
    ),
    Case(
        "helmholtz-manufactured",
        "helmholtz",
        ("x", "y"),
        (0.0, 0.0),
        (1.0, 1.0),
        _sin_prod,
        lambda X: {"k": full(X, 3.0), "source": (9.0 - 2 * PI**2) * _sin_prod(X)},
    ),
    Case(
        "helmholtz-homogeneous",  # Δu = −(3² + 4²) u = −k² u with k = 5
        "helmholtz",
        ("x", "y"),
        (-1.0, -1.0),
        (1.0, 1.0),
        lambda X: torch.sin(3 * X[:, 0]) * torch.cos(4 * X[:, 1]),
        lambda X: {"k": full(X, 5.0), "source": full(X, 0.0)},
    ),
    Case(
        "heat-1d",
        "heat",
        ("x", "t"),
        (0.0, 0.0),
        (1.0, 1.0),
        _heat,
        lambda X: {"kappa": full(X, KAPPA), "source": full(X, 0.0)},
    ),
    Case(
        "diffusion-alias",
        "diffusion",
        ("x", "t"),
        (0.0, 0.0),
        (1.0, 1.0),
        _heat,
        lambda X: {"kappa": full(X, KAPPA), "source": full(X, 0.0)},
    ),
    Case(
        "heat-2d",  # t must stay out of the Laplacian
        "heat",
        ("x", "y", "t"),
        (0.0, 0.0, 0.0),
        (1.0, 1.0, 1.0),
        _heat_2d,
        lambda X: {"kappa": full(X, KAPPA), "source": full(X, 0.0)},
    ),
    Case(
        "advection-1d",
        "advection",
        ("x", "t"),
        (-2.0, 0.0),
        (2.0, 1.0),
        lambda X: torch.sin(X[:, 0] - C1 * X[:, 1]),
        lambda X: {"velocity": full(X, C1)[:, None], "source": full(X, 0.0)},
    ),
    Case(
        "advection-2d-time-first",
        "advection",
        ("t", "x", "y"),
        (0.0, -2.0, -2.0),
        (1.0, 2.0, 2.0),
        lambda X: torch.sin(X[:, 1] + X[:, 2] - (C1 + C2) * X[:, 0]),
        lambda X: {"velocity": torch.stack([full(X, C1), full(X, C2)], dim=1), "source": full(X, 0.0)},
    ),
    Case(
        "transport-2d",  # c·∇u = f with u = sin(x)·exp(y), c = (C1, C2)
        "transport",
        ("x", "y"),
        (-1.0, -1.0),
        (1.0, 1.0),
        lambda X: torch.sin(X[:, 0]) * torch.exp(X[:, 1]),
        lambda X: {
            "velocity": torch.stack([full(X, C1), full(X, C2)], dim=1),
            "source": (C1 * torch.cos(X[:, 0]) + C2 * torch.sin(X[:, 0])) * torch.exp(X[:, 1]),
        },
    ),
    Case(
        "burgers-stationary-shock",  # u = −tanh(x / 2ν): u u_x = ν u_xx
        "burgers",
        ("x", "t"),
        (-1.0, 0.0),
        (1.0, 1.0),
        lambda X: -torch.tanh(X[:, 0] / (2 * NU)),
        lambda X: {"nu": full(X, NU), "source": full(X, 0.0)},
    ),
    Case(
        "burgers-moving-shock",
        "burgers",
        ("x", "t"),
        (-1.0, 0.0),
        (1.0, 1.0),
        _moving_shock,
        lambda X: {"nu": full(X, NU), "source": full(X, 0.0)},
    ),
    Case(
        "allen-cahn-kink",
        "allen_cahn",
        ("x", "t"),
        (-0.5, 0.0),
        (0.5, 1.0),
        lambda X: torch.tanh(KINK * X[:, 0]),
        lambda X: {"epsilon": full(X, EPS), "gamma": full(X, GAMMA), "source": full(X, 0.0)},
    ),
    Case(
        "diffusion-reaction-manufactured",
        "diffusion_reaction",
        ("x", "t"),
        (0.0, 0.0),
        (1.0, 1.0),
        _reaction,
        lambda X: {"D": full(X, D_DIFF), "k": full(X, K_REACT), "source": _reaction_source(X)},
    ),
]


def test_every_builtin_equation_has_a_case():
    # systems (several outputs or equations) have theirs in tests/test_systems.py
    assert {c.equation for c in CASES} == set(EQUATIONS) - set(SYSTEMS)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_exact_solution_has_zero_residual(case):
    eq = EQUATIONS[case.equation]
    X = uniform_points(list(case.lo), list(case.hi))
    c = case.coefficients(X)
    assert set(c) == set(eq.coefficients)  # the residual reads exactly the documented coefficients
    assert eq.needs_time == ("t" in case.variables)

    r = eq.residual(Fields(case.u, X, case.variables), c)
    assert r.shape == (NUM_POINTS,) and r.dtype == F64
    assert float(r.abs().max()) < RESIDUAL_ATOL

    def wrong(Z: Tensor) -> Tensor:
        return case.u(Z) + 0.1 * torch.exp(Z.sum(dim=1))

    r_wrong = eq.residual(Fields(wrong, X, case.variables), c)
    assert float(r_wrong.abs().max()) > WRONG_RESIDUAL_MIN


# --------------------------------------------------------------------------------------------
# 3. parse_problem: points, blocks, scales, coefficients, data files
# --------------------------------------------------------------------------------------------


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def poisson_config(**overrides: Any) -> dict[str, Any]:
    """2-D Poisson on [0, 1] × [−1, 2] with 128 Sobol interior and 40 boundary points."""
    raw: dict[str, Any] = {
        "equation": "poisson",
        "variables": ["x", "y"],
        "domain": {"x": [0, 1], "y": [-1, 2]},
        "constants": {"a": 2.5},
        "coefficients": {"source": "a * x + sin(pi * y)"},
        "blocks": [
            {"name": "interior", "kind": "pde", "points": {"sample": "sobol", "count": 128}},
            {
                "name": "walls",
                "kind": "dirichlet",
                "value": "x * y",
                "weight": 10,
                "points": {"sample": "boundary", "count": 40},
            },
        ],
    }
    raw.update(overrides)
    return raw


def test_poisson_blocks_counts_domain_faces_and_scales():
    problem = parse_problem(poisson_config(), None, gen())
    interior, walls = problem.blocks
    lo, hi = torch.tensor([0.0, -1.0], dtype=F64), torch.tensor([1.0, 2.0], dtype=F64)
    assert (interior.name, interior.kind, walls.name, walls.kind) == ("interior", "pde", "walls", "dirichlet")
    assert interior.points.shape == (128, 2) and walls.points.shape == (40, 2)
    assert problem.num_rows == 168 and problem.all_points().shape == (168, 2)
    assert bool(((interior.points > lo) & (interior.points < hi)).all())
    on_face = (walls.points == lo) | (walls.points == hi)  # exactly on a face, not approximately
    assert bool(on_face.any(dim=1).all())
    # points split by face measure: the x faces are 3 long, the y faces 1 → 15, 15, 5, 5
    assert [int(on_face[:, 0].sum()), int(on_face[:, 1].sum())] == [30, 10]
    assert int((walls.points[:, 0] == 0).sum()) == 15 and int((walls.points[:, 1] == 2).sum()) == 5
    assert interior.generated and walls.generated
    assert interior.scale == pytest.approx(math.sqrt(1.0 * 168 / 128), rel=1e-15)
    assert walls.scale == pytest.approx(math.sqrt(10.0 * 168 / 40), rel=1e-15)
    # formulas evaluate right: the source (with a user constant) and the boundary value
    x, y = interior.points[:, 0], interior.points[:, 1]
    torch.testing.assert_close(interior.inputs[1], 2.5 * x + torch.sin(PI * y), rtol=0.0, atol=DERIVATIVE_ATOL)
    torch.testing.assert_close(walls.inputs[1], walls.points[:, 0] * walls.points[:, 1], rtol=0.0, atol=0.0)
    # block residuals are scaled: dirichlet u − g, pde −Δu − f
    model = lambda X: X[:, 0] * X[:, 1] + X[:, 0] ** 2  # noqa: E731 (−Δu = −2)
    torch.testing.assert_close(
        walls.residual(model, walls.inputs), walls.scale * walls.points[:, 0] ** 2, rtol=0.0, atol=DERIVATIVE_ATOL
    )
    expected = interior.scale * (-2.0 - interior.inputs[1])
    torch.testing.assert_close(interior.residual(model, interior.inputs), expected, rtol=0.0, atol=DERIVATIVE_ATOL)


def test_pde_block_of_the_exact_solution_has_zero_residual():
    raw = poisson_config(coefficients={"source": "2*pi**2*sin(pi*x)*sin(pi*y)"})
    block = parse_problem(raw, None, gen()).blocks[0]
    assert float(block.residual(_sin_prod, block.inputs).abs().max()) < RESIDUAL_ATOL


@pytest.mark.parametrize("variables", [["x", "y"], ["x", "y", "t"]])
def test_box_faces_have_outward_unit_normals(variables):
    d = len(variables)
    lo, hi = torch.tensor([-1.0, 0.5, 0.0][:d], dtype=F64), torch.tensor([2.0, 1.0, 3.0][:d], dtype=F64)
    box = Box(variables, lo, hi)
    pts, normals = box.on_faces(200, box.faces(["all"]), "uniform", gen(3))
    assert pts.shape == normals.shape == (200, d)
    torch.testing.assert_close(torch.linalg.norm(normals, dim=1), torch.ones(200, dtype=F64), rtol=0.0, atol=0.0)
    assert bool(((normals != 0).sum(dim=1) == 1).all())
    if "t" in variables:
        assert bool((normals[:, 2] == 0).all())  # time has no faces
    axis, sign = normals.abs().argmax(dim=1), normals.sum(dim=1)
    rows = torch.arange(200)
    bound = torch.where(sign > 0, hi[axis], lo[axis])
    assert bool((pts[rows, axis] == bound).all())  # +e_i on the high face, −e_i on the low one
    assert bool((((pts - lo) >= 0) & ((hi - pts) >= 0)).all())
    torch.testing.assert_close(box.normals_of(pts, "test"), normals, rtol=0.0, atol=0.0)
    # a subset of faces
    sub, sub_normals = box.on_faces(10, box.faces(["x_max", "y_min"]), "sobol", gen(3))
    assert set(map(tuple, sub_normals[:, :2].tolist())) == {(1.0, 0.0), (0.0, -1.0)}


def heat_config(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "equation": "heat",
        "variables": ["x", "t"],
        "domain": {"x": [0, 1], "t": [0.5, 2]},
        "coefficients": {"kappa": 0.1},
        "blocks": blocks,
    }


def test_initial_block_lies_at_t_min():
    raw = heat_config(
        [{"name": "ic", "kind": "initial", "value": "sin(pi*x)", "points": {"sample": "lhs", "count": 30}}]
    )
    block = parse_problem(raw, None, gen()).blocks[0]
    assert block.points.shape == (30, 2)
    assert bool((block.points[:, 1] == 0.5).all())
    assert bool(((block.points[:, 0] > 0) & (block.points[:, 0] < 1)).all())
    torch.testing.assert_close(block.inputs[1], torch.sin(PI * block.points[:, 0]), rtol=0.0, atol=0.0)
    exact = lambda X: torch.exp(-KAPPA * PI**2 * (X[:, 1] - 0.5)) * torch.sin(PI * X[:, 0])  # noqa: E731
    assert float(block.residual(exact, block.inputs).abs().max()) < RESIDUAL_ATOL


def test_periodic_block_pairs_low_and_high_faces():
    raw = heat_config(
        [{"name": "wrap", "kind": "periodic", "variable": "x", "points": {"sample": "uniform", "count": 20}}]
    )
    block = parse_problem(raw, None, gen()).blocks[0]
    low, high = block.inputs
    assert bool((low[:, 0] == 0.0).all()) and bool((high[:, 0] == 1.0).all())
    torch.testing.assert_close(low[:, 1], high[:, 1], rtol=0.0, atol=0.0)
    periodic = lambda X: torch.cos(2 * PI * X[:, 0]) * X[:, 1]  # noqa: E731
    assert float(block.residual(periodic, block.inputs).abs().max()) < RESIDUAL_ATOL
    torch.testing.assert_close(
        block.residual(lambda X: X[:, 0] * X[:, 1], block.inputs), -block.scale * low[:, 1], rtol=0.0, atol=1e-15
    )


def test_neumann_residual_of_x_squared_vanishes():
    # u = x² on [0, 1]: outward derivative −u'(0) = 0 and u'(1) = 2, i.e. g = 2x on both faces
    raw = {
        "equation": "poisson",
        "variables": ["x"],
        "domain": {"x": [0, 1]},
        "blocks": [{"name": "flux", "kind": "neumann", "value": "2*x", "points": {"sample": "boundary", "count": 2}}],
    }
    block = parse_problem(raw, None, gen()).blocks[0]
    assert sorted(block.points[:, 0].tolist()) == [0.0, 1.0]
    torch.testing.assert_close(block.inputs[2][:, 0], torch.where(block.points[:, 0] == 0, -1.0, 1.0).to(F64))
    assert float(block.residual(lambda X: X[:, 0] ** 2, block.inputs).abs().max()) < RESIDUAL_ATOL
    # a wrong solution: u = x² + x has −u'(0) = −1 ≠ g(0) = 0
    assert float(block.residual(lambda X: X[:, 0] ** 2 + X[:, 0], block.inputs).abs().max()) > WRONG_RESIDUAL_MIN
    # sign-sensitive on both faces: u = x² + x has −u'(0) = −1 and u'(1) = 3, i.e. g = 4x − 1
    raw["blocks"][0]["value"] = "4*x - 1"
    block = parse_problem(raw, None, gen()).blocks[0]
    assert float(block.residual(lambda X: X[:, 0] ** 2 + X[:, 0], block.inputs).abs().max()) < RESIDUAL_ATOL


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    """Collocation points, observations and a reference in the documented HDF5 layout."""
    rng = np.random.default_rng(0)
    interior = rng.uniform([0.0, -1.0], [1.0, 2.0], size=(50, 2))
    walls = np.stack([np.r_[np.zeros(6), np.ones(6)], rng.uniform(-1, 2, 12)], axis=1)
    obs = rng.uniform([0.0, -1.0], [1.0, 2.0], size=(9, 2))
    path = tmp_path / "pde.h5"
    with h5py.File(path, "w") as f:
        f["/collocation/interior"] = interior
        f["/collocation/walls"] = walls
        f["/collocation/obs"] = obs
        f["/collocation/three_columns"] = rng.uniform(size=(7, 3))
        f["/collocation/off_face"] = np.array([[0.5, 0.5], [0.0, 0.3]])
        f["/observations/values"] = np.sin(obs[:, 0]) * obs[:, 1]
        f["/observations/too_few"] = np.zeros(4)
        f["/coefficients/source"] = interior[:, 0] ** 2
        f["/coefficients/short"] = np.zeros(10)
        f["/reference/inputs"] = obs
        f["/reference/values"] = (obs[:, 0] * 3)[:, None]
    return path


def dataset_config(**overrides: Any) -> dict[str, Any]:
    raw = poisson_config(
        coefficients={"source": {"dataset": "/coefficients/source"}},
        blocks=[
            {"name": "interior", "points": {"dataset": "/collocation/interior"}},
            {"name": "walls", "kind": "neumann", "value": 1, "points": {"dataset": "/collocation/walls"}},
            {
                "name": "obs",
                "kind": "data",
                "values": "/observations/values",
                "points": {"dataset": "/collocation/obs"},
            },
        ],
    )
    raw.update(overrides)
    return raw


def test_dataset_points_data_block_and_reference(data_file):
    problem = parse_problem(dataset_config(), data_file, gen())
    interior, walls, obs = problem.blocks
    with h5py.File(data_file, "r") as f:
        np.testing.assert_array_equal(interior.points.numpy(), f["/collocation/interior"][()])
        np.testing.assert_array_equal(walls.points.numpy(), f["/collocation/walls"][()])
        np.testing.assert_array_equal(obs.points.numpy(), f["/collocation/obs"][()])
        np.testing.assert_array_equal(interior.inputs[1].numpy(), f["/coefficients/source"][()])
        values = f["/observations/values"][()]
    assert not any(b.generated for b in problem.blocks)
    assert interior.points.dtype == F64
    # neumann normals found from the data: −e_x on x = 0, +e_x on x = 1
    torch.testing.assert_close(walls.inputs[2][:, 0], torch.tensor([-1.0] * 6 + [1.0] * 6, dtype=F64))
    # data block: u − values
    model = lambda X: torch.sin(X[:, 0]) * X[:, 1] + 1.0  # noqa: E731 (exact observations plus 1)
    torch.testing.assert_close(obs.residual_fn(model, obs.inputs), torch.ones(9, dtype=F64), rtol=0.0, atol=1e-15)
    np.testing.assert_array_equal(obs.inputs[1].numpy(), values)
    x_ref, u_ref = problem.reference
    assert x_ref.shape == (9, 2) and u_ref.shape == (9, 1)
    assert parse_problem(dataset_config(reference=False), data_file, gen()).reference is None


@pytest.mark.parametrize("sample", ["uniform", "sobol", "lhs"])
def test_seeded_generator_makes_points_reproducible(sample):
    raw = poisson_config()
    raw["blocks"][0]["points"]["sample"] = sample
    first, again, other = (parse_problem(copy.deepcopy(raw), None, gen(s)) for s in (7, 7, 8))
    for a, b, c in zip(first.blocks, again.blocks, other.blocks, strict=True):
        torch.testing.assert_close(a.points, b.points, rtol=0.0, atol=0.0)
        assert not torch.equal(a.points, c.points)


# --------------------------------------------------------------------------------------------
# 4. Every user-facing error of parse_problem names its key
# --------------------------------------------------------------------------------------------


def _block0(**changes: Any) -> dict[str, Any]:
    raw = poisson_config()
    raw["blocks"][0].update(changes)
    return raw


def _without(key: str) -> dict[str, Any]:
    raw = poisson_config()
    del raw[key]
    return raw


def _no_domain(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    return poisson_config(domain=None, blocks=blocks)


CONFIG_ERRORS: list[tuple[str, Any, str]] = [
    ("not-a-mapping", "poisson", r"config\.pde: expected a mapping, got str"),
    (
        "unknown-pde-key",
        poisson_config(variable=["x"]),
        r"config\.pde\.variable: unknown key; did you mean 'variables'",
    ),
    ("no-equation", _without("equation"), r"config\.pde\.equation: expected a built-in name"),
    ("unknown-equation", poisson_config(equation="poison"), r"unknown equation 'poison'; did you mean 'poisson'\?"),
    ("missing-variables", _without("variables"), r"config\.pde\.variables: required"),
    ("variables-not-a-list", poisson_config(variables="x"), r"config\.pde\.variables: expected a list of names"),
    ("variables-repeat", poisson_config(variables=["x", "x"]), r"config\.pde\.variables: names repeat"),
    ("bad-constants", poisson_config(constants={"a": "two"}), r"config\.pde\.constants: expected a mapping"),
    ("domain-not-a-mapping", poisson_config(domain=[0, 1]), r"config\.pde\.domain: expected a mapping"),
    (
        "domain-unknown-variable",
        poisson_config(domain={"x": [0, 1], "y": [0, 1], "z": [0, 1]}),
        r"config\.pde\.domain\.z: unknown key",
    ),
    (
        "domain-low-above-high",
        poisson_config(domain={"x": [1, 0], "y": [0, 1]}),
        r"config\.pde\.domain\.x: expected \[low, high\] with low < high, got \[1, 0\]",
    ),
    ("domain-missing-bound", poisson_config(domain={"x": [0, 1]}), r"config\.pde\.domain\.y: expected \[low, high\]"),
    (
        "time-without-t",
        poisson_config(equation="heat"),
        r"config\.pde\.variables: equation 'heat' needs the time variable 't'",
    ),
    ("coefficients-not-a-mapping", poisson_config(coefficients=[1]), r"config\.pde\.coefficients: expected a mapping"),
    (
        "unknown-coefficient",
        poisson_config(coefficients={"sorce": 1.0}),
        r"config\.pde\.coefficients\.sorce: unknown key; did you mean 'source'\?",
    ),
    (
        "formula-unknown-symbol",
        poisson_config(coefficients={"source": "sin(pi*z)"}),
        r"config\.pde\.coefficients\.source: formula 'sin\(pi\*z\)', column 8: unknown symbol 'z'",
    ),
    ("no-blocks", poisson_config(blocks=[]), r"config\.pde\.blocks: expected a non-empty list"),
    ("block-not-a-mapping", poisson_config(blocks=["interior"]), r"config\.pde\.blocks\[0\]: expected a mapping"),
    ("unknown-block-key", _block0(nmae="x"), r"config\.pde\.blocks\[0\]\.nmae: unknown key; did you mean 'name'\?"),
    (
        "unknown-block-kind",
        _block0(kind="dirichlett"),
        r"config\.pde\.blocks\[0\]\.kind: unknown block kind 'dirichlett'; did you mean 'dirichlet'\?",
    ),
    ("bad-weight", _block0(weight=0), r"config\.pde\.blocks\[0\]\.weight: expected a positive number, got 0"),
    (
        "periodic-bad-variable",
        _block0(kind="periodic", variable="z"),
        r"config\.pde\.blocks\[0\]\.variable: periodic blocks name a variable",
    ),
    ("missing-points", poisson_config(blocks=[{"name": "interior"}]), r"config\.pde\.blocks\[0\]\.points: required"),
    (
        "unknown-points-key",
        _block0(points={"sampel": "sobol"}),
        r"config\.pde\.blocks\[0\]\.points\.sampel: unknown key",
    ),
    ("no-sampler", _block0(points={"count": 3}), r"config\.pde\.blocks\[0\]\.points: give 'dataset' or 'sample'"),
    (
        "count-zero",
        _block0(points={"sample": "sobol", "count": 0}),
        r"config\.pde\.blocks\[0\]\.points\.count: expected a positive integer, got 0",
    ),
    (
        "count-float",
        _block0(points={"sample": "sobol", "count": 2.5}),
        r"config\.pde\.blocks\[0\]\.points\.count: expected a positive integer, got 2\.5",
    ),
    (
        "count-bool",
        _block0(points={"sample": "sobol", "count": True}),
        r"config\.pde\.blocks\[0\]\.points\.count: expected a positive integer, got True",
    ),
    (
        "generated-without-domain",
        _no_domain([{"points": {"sample": "sobol", "count": 4}}]),
        r"config\.pde\.blocks\[0\]\.points: generated points need pde\.domain",
    ),
    (
        "initial-without-t",
        _block0(kind="initial"),
        r"config\.pde\.blocks\[0\]\.points: an initial block needs the time variable 't'",
    ),
    ("unknown-face", _block0(kind="dirichlet", faces=["z_min"]), r"config\.pde\.blocks: unknown face 'z_min'"),
    ("face-bad-side", _block0(kind="dirichlet", faces="x_low"), r"unknown face 'x_low'; faces are \['x_min'"),
    (
        "value-unknown-symbol",
        _block0(kind="dirichlet", value="q + 1"),
        r"config\.pde\.blocks\[0\]\.value: formula 'q \+ 1', column 1: unknown symbol 'q'",
    ),
    (
        "velocity-components",
        {
            "equation": "advection",
            "variables": ["x", "y", "t"],
            "domain": {"x": [0, 1], "y": [0, 1], "t": [0, 1]},
            "coefficients": {"velocity": [1.0]},
            "blocks": [{"points": {"sample": "uniform", "count": 4}}],
        },
        r"config\.pde\.coefficients\.velocity: expected 2 components \(one per spatial variable\), got 1",
    ),
    (
        "velocity-component-formula",
        {
            "equation": "advection",
            "variables": ["x", "t"],
            "domain": {"x": [0, 1], "t": [0, 1]},
            "coefficients": {"velocity": ["1 + w"]},
            "blocks": [{"points": {"sample": "uniform", "count": 4}}],
        },
        r"config\.pde\.coefficients\.velocity\[0\]: formula '1 \+ w', column 5: unknown symbol 'w'",
    ),
    (
        "block-names-repeat",
        poisson_config(blocks=[{"name": "a", "points": {"sample": "sobol", "count": 4}}] * 2),
        r"config\.pde\.blocks: block names repeat: \['a', 'a'\]",
    ),
    (
        "bad-basis",
        poisson_config(basis="input"),
        r"config\.pde\.basis: expected 'auto', 'output' or 'residual', got 'input'",
    ),
    (
        "bad-basis-points",
        poisson_config(basis_points=0),
        r"config\.pde\.basis_points: expected 'auto' or a positive integer, got 0",
    ),
    (
        "reference-bad-value",
        poisson_config(reference="maybe"),
        r"config\.pde\.reference: expected true, false or 'required', got 'maybe'",
    ),
    (
        "reference-required-without-data-file",
        poisson_config(reference="required"),
        r"config\.pde\.reference: 'required' needs a data file",
    ),
    (
        "dataset-without-data-file",
        _block0(points={"dataset": "/collocation/interior"}),
        r"config\.pde\.blocks\[0\]\.points: dataset /collocation/interior needs a data file",
    ),
    (
        "dataset-not-a-path",
        _block0(points={"dataset": 5}),
        r"config\.pde\.blocks\[0\]\.points\.dataset: expected an HDF5 dataset path, got 5",
    ),
    (
        "coefficient-dataset-unknown-key",
        poisson_config(coefficients={"source": {"dataset": "/s", "scale": 2}}),
        r"config\.pde\.coefficients\.source\.scale: unknown key",
    ),
]


@pytest.mark.parametrize(("raw", "match"), [c[1:] for c in CONFIG_ERRORS], ids=[c[0] for c in CONFIG_ERRORS])
def test_config_errors_name_the_key(raw, match):
    with pytest.raises(ConfigError, match=match):
        parse_problem(copy.deepcopy(raw), None, gen())


DATA_ERRORS: list[tuple[str, dict[str, Any], type[Exception], str]] = [
    (
        "points-wrong-dimension",
        dataset_config(blocks=[{"points": {"dataset": "/collocation/three_columns"}}]),
        DataError,
        r"pde\.h5:/collocation/three_columns: expected points \[N, 2\] for variables \['x', 'y'\], found shape \(7, 3\)",
    ),
    (
        "neumann-points-off-face",
        dataset_config(blocks=[{"kind": "neumann", "points": {"dataset": "/collocation/off_face"}}]),
        DataError,
        r"pde\.h5:/collocation/off_face: 1 neumann point\(s\) lie on no face of the domain",
    ),
    (
        "neumann-dataset-without-domain",
        dataset_config(domain=None, blocks=[{"kind": "neumann", "points": {"dataset": "/collocation/walls"}}]),
        ConfigError,
        r"config\.pde\.blocks\[0\]\.points: neumann blocks need pde\.domain",
    ),
    (
        "periodic-without-domain",
        dataset_config(
            domain=None, blocks=[{"kind": "periodic", "variable": "x", "points": {"dataset": "/collocation/walls"}}]
        ),
        ConfigError,
        r"config\.pde\.blocks\[0\]: periodic blocks need pde\.domain",
    ),
    (
        "missing-dataset",
        dataset_config(blocks=[{"points": {"dataset": "/collocation/nothing"}}]),
        DataError,
        r"pde\.h5:/collocation/nothing: expected a dataset, found nothing",
    ),
    (
        "coefficient-rows",
        dataset_config(coefficients={"source": {"dataset": "/coefficients/short"}}),
        DataError,
        r"config\.pde\.coefficients\.source: dataset /coefficients/short has 10 rows, the block has 50 points",
    ),
    (
        "data-values-count",
        dataset_config(
            blocks=[{"kind": "data", "values": "/observations/too_few", "points": {"dataset": "/collocation/obs"}}]
        ),
        DataError,
        r"pde\.h5:/observations/too_few: 4 values for 9 points",
    ),
    (
        "data-values-missing",
        dataset_config(blocks=[{"kind": "data", "points": {"dataset": "/collocation/obs"}}]),
        ConfigError,
        r"config\.pde\.blocks\[0\]\.values\.dataset: expected an HDF5 dataset path, got None",
    ),
]


@pytest.mark.parametrize(("raw", "error", "match"), [c[1:] for c in DATA_ERRORS], ids=[c[0] for c in DATA_ERRORS])
def test_data_errors_name_the_dataset(data_file, raw, error, match):
    with pytest.raises(error, match=match):
        parse_problem(copy.deepcopy(raw), data_file, gen())


def test_reference_of_the_wrong_shape_or_missing_is_a_data_error(tmp_path, data_file):
    bad, none = tmp_path / "bad_ref.h5", tmp_path / "no_ref.h5"
    with h5py.File(data_file, "r") as src, h5py.File(bad, "w") as dst, h5py.File(none, "w") as dst_none:
        for name in ("/collocation/interior", "/coefficients/source"):
            dst[name] = dst_none[name] = src[name][()]
        dst["/reference/inputs"] = np.zeros((5, 3))
        dst["/reference/values"] = np.zeros(5)
    raw = dataset_config(blocks=[{"points": {"dataset": "/collocation/interior"}}])
    with pytest.raises(DataError, match=r"bad_ref\.h5:/reference: inputs \(5, 3\) and values \(5,\) do not fit 2"):
        parse_problem(copy.deepcopy(raw), bad, gen())
    assert parse_problem(copy.deepcopy(raw), none, gen()).reference is None  # optional by default
    with pytest.raises(DataError, match=r"no_ref\.h5: pde\.reference is 'required' but /reference/inputs"):
        parse_problem({**raw, "reference": "required"}, none, gen())


@pytest.mark.parametrize("faces", [5, ["x_min", 3]])
def test_faces_that_are_not_names_are_config_errors(faces):
    with pytest.raises(ConfigError, match="faces"):
        parse_problem(_block0(kind="dirichlet", faces=faces), None, gen())


def test_variable_named_like_a_builtin_constant_is_a_config_error():
    raw = poisson_config(variables=["x", "e"], domain={"x": [0, 1], "e": [0, 1]}, coefficients={})
    with pytest.raises(ConfigError, match=r"config\.pde\.variables"):
        parse_problem(raw, None, gen())


def test_grid_boundary_points_are_distinct_and_as_many_as_asked():
    raw = _block0(kind="dirichlet", points={"sample": "grid", "count": 40})
    pts = parse_problem(raw, None, gen()).blocks[0].points
    assert torch.unique(pts, dim=0).shape[0] == pts.shape[0] == 40


# --------------------------------------------------------------------------------------------
# 5. User-defined residuals
# --------------------------------------------------------------------------------------------

USER_POISSON = '''
def residual(F, c):
    """−u_xx − u_yy − f, the built-in poisson written by hand."""
    return -F.d2("x", "x") - F.d2("y", "y") - c["source"]
'''


def _tiny_network(seed: int = 0) -> torch.nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return MLP(2, 1, hidden=[8]).double()


@pytest.mark.parametrize("relative", [False, True], ids=["absolute path", "relative to the config"])
def test_user_residual_matches_builtin_poisson(tmp_path, relative):
    (tmp_path / "my_pde.py").write_text(USER_POISSON)
    spec = "my_pde.py:residual" if relative else f"{tmp_path / 'my_pde.py'}:residual"
    user = parse_problem(poisson_config(equation=spec), None, gen(), base_dir=tmp_path)
    builtin = parse_problem(poisson_config(), None, gen())
    assert user.equation_name == spec and user.equation.name == spec
    net = _tiny_network()
    for u_block, b_block in zip(user.blocks, builtin.blocks, strict=True):
        torch.testing.assert_close(u_block.points, b_block.points, rtol=0.0, atol=0.0)
        with torch.no_grad():
            r_user, r_builtin = u_block.residual(net, u_block.inputs), b_block.residual(net, b_block.inputs)
        assert float(r_builtin.abs().max()) > WRONG_RESIDUAL_MIN  # a network, not a solution: non-trivial
        torch.testing.assert_close(r_user, r_builtin, rtol=0.0, atol=USER_RESIDUAL_ATOL)


def test_user_residual_errors(tmp_path):
    (tmp_path / "boom.py").write_text("raise RuntimeError('boom at import')\n")
    (tmp_path / "other.py").write_text("def something_else(F, c):\n    return F.u\n\nresidual = 3\n")
    cases = [
        ("missing.py:residual", r"config\.pde\.equation: file missing\.py not found"),
        ("boom.py:residual", r"config\.pde\.equation: importing 'boom\.py' failed: RuntimeError: boom at import"),
        ("other.py:residual", r"config\.pde\.equation: 'other\.py' has no callable 'residual'"),
        ("other.py:nothing", r"config\.pde\.equation: 'other\.py' has no callable 'nothing'"),
        ("no_such_module_for_lsr_tests:residual", r"importing 'no_such_module_for_lsr_tests' failed"),
    ]
    for spec, match in cases:
        with pytest.raises(ConfigError, match=match):
            parse_problem(poisson_config(equation=spec), None, gen(), base_dir=tmp_path)


# --------------------------------------------------------------------------------------------
# 6. refine_pde end to end on a rough PINN
# --------------------------------------------------------------------------------------------

PINN_STEPS = 60
PINN_LR = 1e-2


def poisson_1d_problem() -> PdeProblem:
    raw = {
        "equation": "poisson",
        "variables": ["x"],
        "domain": {"x": [0, 1]},
        "coefficients": {"source": "pi**2 * sin(pi * x)"},
        "blocks": [
            {"name": "interior", "points": {"sample": "sobol", "count": 64}},
            {"name": "ends", "kind": "dirichlet", "weight": 10, "points": {"sample": "boundary", "count": 2}},
        ],
    }
    problem = parse_problem(raw, None, gen(1))
    x_ref = torch.linspace(0, 1, 101, dtype=F64)[:, None]
    problem.reference = (x_ref, torch.sin(PI * x_ref))
    return problem


def rough_pinn(problem: PdeProblem) -> torch.nn.Module:
    """A 1-12-12-1 tanh MLP after a few full-batch Adam steps on the physics loss (seeded init)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = MLP(1, 1, hidden=[12, 12]).double()
    opt = torch.optim.Adam(net.parameters(), lr=PINN_LR)
    for _ in range(PINN_STEPS):
        opt.zero_grad()
        loss = sum(torch.sum(b.residual(net, b.inputs) ** 2) for b in problem.blocks) / problem.num_rows
        loss.backward()
        opt.step()
    return net.eval()


def test_refine_pde_lowers_reference_error_and_holdout_residual(tmp_path):
    problem = poisson_1d_problem()
    net = rough_pinn(problem)
    path = tmp_path / "pinn.pt"
    torch.save(net.state_dict(), path)
    cfg = Config()
    cfg.device = "cpu"
    cfg.lsr.rank = [4, 8, 16]
    result = refine_pde(LoadedCheckpoint(path, "state_dict", net), problem, cfg)

    assert result.status == "improved" and result.rank in (4, 8, 16)
    assert result.selection_metric == "holdout_loss"
    sweep = result.rank_sweep
    assert sweep[0].rank == 0 and sweep[0].val_loss is not None
    chosen = [e for e in sweep if e.rank == result.rank and e.tikhonov == result.regularization["tikhonov"]]
    assert chosen and chosen[0].val_loss <= sweep[0].val_loss  # the held-out residual never gets worse
    assert min(e.val_loss for e in sweep) == chosen[0].val_loss
    assert result.residual_loss["after"] < result.residual_loss["before"]
    ref = result.errors["reference"]
    assert ref["after"]["rel_l2"] < ref["before"]["rel_l2"]
    assert set(result.residual_blocks) == {"interior", "ends"}


def test_region_draws_interior_points_in_a_sub_box():
    raw = {
        "equation": "poisson",
        "variables": ["x", "y"],
        "domain": {"x": [-1, 1], "y": [0, 2]},
        "blocks": [{"name": "front", "points": {"sample": "sobol", "count": 64, "region": {"x": [-0.1, 0.1]}}}],
    }
    pts = parse_problem(raw, None, torch.Generator().manual_seed(0)).blocks[0].points
    assert pts.shape == (64, 2)
    assert bool((pts[:, 0].abs() <= 0.1).all()) and bool((pts[:, 1] >= 0).all() and (pts[:, 1] <= 2).all())
    raw["blocks"][0]["points"]["region"] = {"x": [-2, 0]}
    with pytest.raises(ConfigError, match=r"region.x: expected \[low, high\] inside the domain"):
        parse_problem(raw, None, torch.Generator().manual_seed(0))
    raw["blocks"][0]["points"]["region"] = {"z": [0, 1]}
    with pytest.raises(ConfigError, match="unknown key"):
        parse_problem(raw, None, torch.Generator().manual_seed(0))
