"""PDE systems and inverse problems: vector-valued fields, built-in systems on exact or
manufactured solutions, unknown constants linearized with the network, config errors."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
import yaml
from torch import Tensor, nn

from lsr_cli.checkpoint import LoadedCheckpoint
from lsr_cli.config import Config
from lsr_cli.errors import ConfigError
from lsr_cli.linearization import JacobianOperator
from lsr_cli.models import MLP
from lsr_cli.pde import EQUATIONS, Fields, parse_problem, refine_pde
from lsr_cli.pde.systems import SYSTEMS
from lsr_cli.pde.unknowns import WithUnknowns, attach_unknowns, select_space

from .test_cli import assert_clean_failure, listing, run

F64 = torch.float64
NUM_POINTS = 64
DERIVATIVE_ATOL = 1e-12
RESIDUAL_ATOL = 1e-10
WRONG_RESIDUAL_MIN = 1e-3
FD_RTOL = 1e-6  # central differences with h = 1e-5 · scale: truncation ~h², round-off ~eps/h


def points(lo: list[float], hi: list[float], n: int = NUM_POINTS, seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    lo_t, hi_t = torch.tensor(lo, dtype=F64), torch.tensor(hi, dtype=F64)
    return lo_t + (hi_t - lo_t) * torch.rand(n, len(lo), generator=gen, dtype=F64)


def gen0() -> torch.Generator:
    return torch.Generator().manual_seed(0)


# --------------------------------------------------------------------------------------------
# 1. Fields of a vector-valued network against hand-derived derivatives
# --------------------------------------------------------------------------------------------


def two_fields(X: Tensor) -> Tensor:
    """``u = sin(x) e^{2y}``, ``v = x³ y² + cos(y)``: ``[N, 2]`` for columns ``[x, y]``."""
    x, y = X[:, 0], X[:, 1]
    return torch.stack([torch.sin(x) * torch.exp(2 * y), x**3 * y**2 + torch.cos(y)], dim=1)


def test_fields_give_each_component_and_its_derivatives():
    X = points([-1.0, -1.0], [1.0, 1.0])
    x, y = X[:, 0], X[:, 1]
    F = Fields(two_fields, X, ["x", "y"], ["u", "v"])
    close = {"rtol": 0.0, "atol": DERIVATIVE_ATOL}
    s, c, e = torch.sin(x), torch.cos(x), torch.exp(2 * y)
    torch.testing.assert_close(F["u"], s * e, **close)
    torch.testing.assert_close(F.u, s * e, **close)  # the first output
    torch.testing.assert_close(F["v"], x**3 * y**2 + torch.cos(y), **close)
    torch.testing.assert_close(F.d("u", "x"), c * e, **close)
    torch.testing.assert_close(F.d("x"), c * e, **close)  # one name less: the first output
    torch.testing.assert_close(F.d("v", "y"), 2 * x**3 * y - torch.sin(y), **close)
    torch.testing.assert_close(F.d2("v", "y", "y"), 2 * x**3 - torch.cos(y), **close)
    torch.testing.assert_close(F.d2("v", "x", "y"), 6 * x**2 * y, **close)
    torch.testing.assert_close(F.d2("v", "y", "x"), 6 * x**2 * y, **close)
    torch.testing.assert_close(F.d3("v", "x", "x", "y"), 12 * x * y, **close)
    torch.testing.assert_close(F.d3("u", "y", "y", "y"), 8 * s * e, **close)
    torch.testing.assert_close(F.d3("x", "x", "x"), -c * e, **close)
    torch.testing.assert_close(F.laplacian("u"), -s * e + 4 * s * e, **close)
    torch.testing.assert_close(F.laplacian("v"), 6 * x * y**2 + 2 * x**3 - torch.cos(y), **close)
    torch.testing.assert_close(F.gradient("v"), torch.stack([3 * x**2 * y**2, 2 * x**3 * y - torch.sin(y)], 1))
    assert F.d("v", "x") is F.d("v", "x")  # computed once
    # one JVP per direction serves every component
    assert set(F._full) == {(), (0,), (1,), (0, 0), (0, 1), (1, 1), (0, 0, 1), (1, 1, 1), (0, 0, 0)}
    with pytest.raises(KeyError, match=r"unknown output 'w'; the outputs are \['u', 'v'\]"):
        F["w"]
    with pytest.raises(KeyError, match="unknown variable 'z'"):
        F.d("u", "z")


# --------------------------------------------------------------------------------------------
# 2. Every built-in system: exact or manufactured solutions give a round-off residual
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SystemCase:
    id: str
    equation: str
    variables: tuple[str, ...]
    outputs: tuple[str, ...]
    lo: tuple[float, ...]
    hi: tuple[float, ...]
    solution: Callable[[Tensor], Tensor]  # [N, d] -> [N, C]
    coefficients: Callable[[Tensor], dict[str, Tensor]]


RE = 20.0
LAM = RE / 2 - math.sqrt(RE**2 / 4 + 4 * math.pi**2)


def kovasznay(X: Tensor) -> Tensor:
    x, y = X[:, 0], X[:, 1]
    e = torch.exp(LAM * x)
    u = 1 - e * torch.cos(2 * math.pi * y)
    v = LAM / (2 * math.pi) * e * torch.sin(2 * math.pi * y)
    p = 0.5 * (1 - torch.exp(2 * LAM * x))
    return torch.stack([u, v, p], dim=1)


NU_TG = 0.1


def taylor_green(X: Tensor) -> Tensor:
    x, y, t = X[:, 0], X[:, 1], X[:, 2]
    e = torch.exp(-2 * NU_TG * t)
    return torch.stack(
        [
            -torch.cos(x) * torch.sin(y) * e,
            torch.sin(x) * torch.cos(y) * e,
            -0.25 * (torch.cos(2 * x) + torch.cos(2 * y)) * e**2,
        ],
        dim=1,
    )


def nls_soliton(X: Tensor) -> Tensor:
    """``h = sech(x) e^{i t / 2}`` solves ``i h_t + ½ h_xx + |h|² h = 0``."""
    x, t = X[:, 0], X[:, 1]
    sech = 1 / torch.cosh(x)
    return torch.stack([sech * torch.cos(t / 2), sech * torch.sin(t / 2)], dim=1)


GS = {"Du": 0.1, "Dv": 0.05, "feed": 0.04, "kill": 0.06}


def gray_scott_solution(X: Tensor) -> Tensor:
    x, y, t = X[:, 0], X[:, 1], X[:, 2]
    s, E = torch.sin(x) * torch.sin(y), torch.exp(-t)
    return torch.stack([1 - 0.5 * E * s, 0.25 * E * s], dim=1)


def gray_scott_sources(X: Tensor) -> dict[str, Tensor]:
    """The manufactured sources, derived by hand: ``Δs = −2s`` for ``s = sin x sin y``."""
    x, y, t = X[:, 0], X[:, 1], X[:, 2]
    s, E = torch.sin(x) * torch.sin(y), torch.exp(-t)
    u, v = 1 - 0.5 * E * s, 0.25 * E * s
    u_t, v_t, lap_u, lap_v = 0.5 * E * s, -0.25 * E * s, E * s, -0.5 * E * s
    f, k = GS["feed"], GS["kill"]
    return {
        **{name: torch.full_like(x, value) for name, value in GS.items()},
        "source_u": u_t - GS["Du"] * lap_u + u * v**2 - f * (1 - u),
        "source_v": v_t - GS["Dv"] * lap_v - u * v**2 + (f + k) * v,
    }


LORENZ = {"sigma": 10.0, "rho": 28.0, "beta": 8.0 / 3.0}


def lorenz_solution(X: Tensor) -> Tensor:
    t = X[:, 0]
    return torch.stack([torch.sin(t), torch.cos(2 * t), 1 + t**2], dim=1)


def lorenz_sources(X: Tensor) -> dict[str, Tensor]:
    t = X[:, 0]
    x, y, z = torch.sin(t), torch.cos(2 * t), 1 + t**2
    s, r, b = LORENZ["sigma"], LORENZ["rho"], LORENZ["beta"]
    return {
        **{name: torch.full_like(t, value) for name, value in LORENZ.items()},
        "source_x": torch.cos(t) - s * (y - x),
        "source_y": -2 * torch.sin(2 * t) - x * (r - z) + y,
        "source_z": 2 * t - x * y + b * z,
    }


LV = {"alpha": 0.7, "beta": 0.0, "gamma": 0.4, "delta": 0.0}
LV_COUPLED = {"alpha": 0.7, "beta": 0.5, "gamma": 0.4, "delta": 0.2}


def full(X: Tensor, values: dict[str, float]) -> dict[str, Tensor]:
    return {k: torch.full_like(X[:, 0], v) for k, v in values.items()}


KDV_C = 1.5


def kdv_soliton(X: Tensor) -> Tensor:
    x, t = X[:, 0], X[:, 1]
    return KDV_C / 2 / torch.cosh(math.sqrt(KDV_C) / 2 * (x - KDV_C * t)) ** 2


def diffusion_field(X: Tensor) -> Tensor:
    x, y = X[:, 0], X[:, 1]
    return torch.stack([torch.sin(math.pi * x) * torch.sin(math.pi * y), 1 + 0.5 * x * y], dim=1)


def diffusion_source(X: Tensor) -> dict[str, Tensor]:
    """``f = −(a Δu + a_x u_x + a_y u_y)`` by hand, ``Δu = −2π² u``."""
    x, y, pi = X[:, 0], X[:, 1], math.pi
    u, a = torch.sin(pi * x) * torch.sin(pi * y), 1 + 0.5 * x * y
    u_x, u_y = pi * torch.cos(pi * x) * torch.sin(pi * y), pi * torch.sin(pi * x) * torch.cos(pi * y)
    return {"source": -(a * (-2 * pi**2 * u) + 0.5 * y * u_x + 0.5 * x * u_y)}


SYSTEM_CASES = [
    SystemCase(
        "kovasznay",
        "navier_stokes",
        ("x", "y"),
        ("u", "v", "p"),
        (-0.5, -0.5),
        (1.0, 1.5),
        kovasznay,
        lambda X: full(X, {"nu": 1 / RE, "force_x": 0.0, "force_y": 0.0}),
    ),
    SystemCase(
        "taylor_green",
        "navier_stokes_unsteady",
        ("x", "y", "t"),
        ("u", "v", "p"),
        (0.0, 0.0, 0.0),
        (2 * math.pi, 2 * math.pi, 1.0),
        taylor_green,
        lambda X: full(X, {"nu": NU_TG, "force_x": 0.0, "force_y": 0.0}),
    ),
    SystemCase(
        "nls_soliton",
        "schrodinger",
        ("x", "t"),
        ("u", "v"),
        (-5.0, 0.0),
        (5.0, 2.0),
        nls_soliton,
        lambda X: full(X, {"alpha": 0.5, "beta": 1.0}),
    ),
    SystemCase(
        "gray_scott_manufactured",
        "gray_scott",
        ("x", "y", "t"),
        ("u", "v"),
        (0.0, 0.0, 0.0),
        (3.0, 3.0, 1.0),
        gray_scott_solution,
        gray_scott_sources,
    ),
    SystemCase(
        "lorenz_manufactured",
        "lorenz",
        ("t",),
        ("x", "y", "z"),
        (0.0,),
        (2.0,),
        lorenz_solution,
        lorenz_sources,
    ),
    SystemCase(
        "lotka_volterra_decoupled",
        "lotka_volterra",
        ("t",),
        ("x", "y"),
        (0.0,),
        (3.0,),
        lambda X: torch.stack([torch.exp(LV["alpha"] * X[:, 0]), 2 * torch.exp(-LV["gamma"] * X[:, 0])], 1),
        lambda X: full(X, LV),
    ),
    SystemCase(
        "lotka_volterra_equilibrium",
        "lotka_volterra",
        ("t",),
        ("x", "y"),
        (0.0,),
        (3.0,),
        lambda X: torch.stack(
            [
                torch.full_like(X[:, 0], LV_COUPLED["gamma"] / LV_COUPLED["delta"]),
                torch.full_like(X[:, 0], LV_COUPLED["alpha"] / LV_COUPLED["beta"]),
            ],
            1,
        ),
        lambda X: full(X, LV_COUPLED),
    ),
    SystemCase(
        "kdv_soliton",
        "kdv",
        ("x", "t"),
        ("u",),
        (-6.0, 0.0),
        (6.0, 1.0),
        kdv_soliton,
        lambda X: full(X, {"a": 6.0, "b": 1.0, "source": 0.0}),
    ),
    SystemCase(
        "variable_diffusion_manufactured",
        "variable_diffusion",
        ("x", "y"),
        ("u", "a"),
        (0.0, 0.0),
        (1.0, 1.0),
        diffusion_field,
        diffusion_source,
    ),
]


def test_every_system_has_a_case():
    assert {c.equation for c in SYSTEM_CASES} == set(SYSTEMS)
    assert set(SYSTEMS) <= set(EQUATIONS)


@pytest.mark.parametrize("case", SYSTEM_CASES, ids=[c.id for c in SYSTEM_CASES])
def test_system_residual_vanishes_on_its_solution(case):
    eq = EQUATIONS[case.equation]
    X = points(list(case.lo), list(case.hi))
    c = case.coefficients(X)
    assert set(c) == set(eq.coefficients)  # the residual reads exactly the documented coefficients
    assert set(eq.outputs) <= set(case.outputs)
    r = eq.residual(Fields(case.solution, X, case.variables, case.outputs), c)
    parts = r if isinstance(r, dict) else {"": r}
    assert tuple(parts) == (eq.equations or ("",))
    for name, res in parts.items():
        assert res.shape == (NUM_POINTS,) and res.dtype == F64, name
        assert float(res.abs().max()) < RESIDUAL_ATOL, (name, float(res.abs().max()))

    def wrong(Z: Tensor) -> Tensor:
        out = case.solution(Z)
        bump = 0.1 * torch.exp(Z.sum(dim=1))
        return out + (bump[:, None] if out.ndim == 2 else bump)

    r_wrong = eq.residual(Fields(wrong, X, case.variables, case.outputs), c)
    wrong_parts = r_wrong if isinstance(r_wrong, dict) else {"": r_wrong}
    assert max(float(v.abs().max()) for v in wrong_parts.values()) > WRONG_RESIDUAL_MIN


# --------------------------------------------------------------------------------------------
# 3. Config: outputs, components, equations as blocks, errors
# --------------------------------------------------------------------------------------------

NS: dict[str, Any] = {
    "equation": "navier_stokes",
    "variables": ["x", "y"],
    "domain": {"x": [-0.5, 1.0], "y": [-0.5, 1.5]},
    "coefficients": {"nu": 0.05},
    "blocks": [
        {"name": "interior", "points": {"sample": "sobol", "count": 40}, "weight": {"continuity": 4}},
        {
            "name": "walls",
            "kind": "dirichlet",
            "component": ["u", "v"],
            "value": {"u": "1 - exp(x)", "v": 0},
            "points": {"sample": "uniform", "count": 32},
        },
    ],
}


def test_a_system_block_becomes_one_block_per_equation_and_component():
    p = parse_problem(NS, None, gen0())
    assert p.outputs == ["u", "v", "p"]  # the system's outputs by default
    names = [b.name for b in p.blocks]
    assert names == ["interior.momentum_x", "interior.momentum_y", "interior.continuity", "walls.u", "walls.v"]
    assert [b.weight for b in p.blocks] == [1.0, 1.0, 4.0, 1.0, 1.0]
    assert torch.equal(p.blocks[0].points, p.blocks[2].points)  # one block's equations share its points
    assert torch.equal(p.blocks[3].points, p.blocks[4].points)
    torch.testing.assert_close(p.blocks[3].inputs[1], 1 - torch.exp(p.blocks[3].points[:, 0]))
    assert float(p.blocks[4].inputs[1].abs().max()) == 0.0
    again = parse_problem(p.raw, None, gen0())  # the kept mapping gives the same blocks
    assert [b.name for b in again.blocks] == names
    # each block's residual: the exact Kovasznay flow (nu = 1/20) is a round-off residual
    p20 = parse_problem({**NS, "coefficients": {"nu": 1 / RE}}, None, gen0())
    for b in p20.blocks[:3]:
        assert float(b.residual(kovasznay, b.inputs).abs().max()) < RESIDUAL_ATOL, b.name


def test_one_output_problems_are_unchanged():
    raw = {
        "equation": "poisson",
        "variables": ["x"],
        "domain": {"x": [0, 1]},
        "blocks": [
            {"points": {"sample": "grid", "count": 8}},
            {"kind": "dirichlet", "points": {"sample": "grid", "count": 2}},
        ],
    }
    p = parse_problem(raw, None, gen0())
    assert p.raw["blocks"] is raw["blocks"] and [b.name for b in p.blocks] == ["pde0", "dirichlet1"]
    assert p.outputs == ["u"] and p.unknowns == []


def test_data_block_columns_and_periodic_components(tmp_path):
    path = tmp_path / "obs.h5"
    pts = points([0.0, 0.0], [1.0, 1.0], 10).numpy()
    with h5py.File(path, "w") as f:
        f["obs/points"] = pts
        f["obs/uv"] = np.stack([pts[:, 0], 2 * pts[:, 1]], 1)
    raw = {
        **NS,
        "blocks": [
            {
                "name": "obs",
                "kind": "data",
                "component": ["u", "v"],
                "values": "/obs/uv",
                "points": {"dataset": "/obs/points"},
            },
            {"name": "wrap", "kind": "periodic", "variable": "x", "points": {"sample": "uniform", "count": 6}},
        ],
    }
    p = parse_problem(raw, path, gen0())
    assert [b.name for b in p.blocks] == ["obs.u", "obs.v", "wrap.u", "wrap.v", "wrap.p"]
    torch.testing.assert_close(p.blocks[1].inputs[1], 2 * torch.tensor(pts[:, 1]))
    r = p.blocks[1].residual_fn(kovasznay, p.blocks[1].inputs)  # v − observed v (unscaled)
    torch.testing.assert_close(r, kovasznay(p.blocks[1].points)[:, 1] - 2 * p.blocks[1].points[:, 1])


def user_residual_file(tmp_path: Path, body: str) -> str:
    (tmp_path / "res.py").write_text(f"def residual(F, c):\n    {body}\n", encoding="utf-8")
    return f"{tmp_path / 'res.py'}:residual"


def test_a_user_residual_may_return_several_equations(tmp_path):
    spec = user_residual_file(tmp_path, 'return {"a": F.d("u", "x") - F["v"], "b": F.d("v", "x") + F["u"]}')
    raw = {
        "equation": spec,
        "variables": ["x"],
        "outputs": ["u", "v"],
        "domain": {"x": [0, 3]},
        "blocks": [{"name": "ode", "points": {"sample": "grid", "count": 16}, "weight": {"b": 2}}],
    }
    p = parse_problem(raw, None, gen0())
    assert [(b.name, b.weight) for b in p.blocks] == [("ode.a", 1.0), ("ode.b", 2.0)]

    def circle(X: Tensor) -> Tensor:
        return torch.stack([torch.sin(X[:, 0]), torch.cos(X[:, 0])], 1)

    for b in p.blocks:
        assert float(b.residual(circle, b.inputs).abs().max()) < RESIDUAL_ATOL
    only_b = {**raw, "blocks": [{**raw["blocks"][0], "equations": ["b"], "weight": 3}]}
    (blk,) = parse_problem(only_b, None, gen0()).blocks
    assert (blk.name, blk.weight) == ("ode", 3.0)  # one equation kept: the block keeps its name
    torch.testing.assert_close(
        blk.residual_fn(circle, blk.inputs), torch.zeros(16, dtype=F64), atol=RESIDUAL_ATOL, rtol=0
    )


BAD_CONFIGS = [
    (
        {"outputs": ["u", "v", "q"]},
        r"config\.pde\.outputs: equation 'navier_stokes' reads the outputs .*\['p'\] missing",
    ),
    (
        {"blocks": [{"kind": "dirichlet", "component": "w", "points": {"sample": "uniform", "count": 4}}]},
        r"config\.pde\.blocks\[0\]\.component: unknown component 'w'; the outputs are \['u', 'v', 'p'\]",
    ),
    (
        {"blocks": [{"kind": "dirichlet", "points": {"sample": "uniform", "count": 4}}]},
        r"config\.pde\.blocks\[0\]\.component: required when the network has several outputs",
    ),
    ({"unknowns": {"x": 1.0}}, r"config\.pde\.unknowns\.x: the unknown has the name of a variable; rename it"),
    ({"unknowns": {"p": 1.0}}, r"config\.pde\.unknowns\.p: the unknown has the name of an output"),
    ({"unknowns": {"nu": 1.0}}, r"config\.pde\.unknowns\.nu: pde\.coefficients sets nu too"),
    ({"unknowns": {"k": {"initial": 1.0, "parameter": "a"}}}, r"config\.pde\.unknowns\.k: give either `initial`"),
    ({"unknowns": {"k": "big"}}, r"config\.pde\.unknowns\.k: expected a finite number"),
    ({"outputs": ["u", "v", "p", "x"]}, r"config\.pde\.outputs: 'x' has the name of a variable"),
    (
        {"variables": ["x", "y", "z"], "domain": None},
        r"config\.pde\.variables: equation 'navier_stokes' needs 2 spatial",
    ),
    (
        {"blocks": [{"points": {"sample": "uniform", "count": 4}, "equations": ["energy"]}]},
        r"config\.pde\.blocks\[0\]\.equations: expected a list of the residual's equations",
    ),
    (
        {"blocks": [{"points": {"sample": "uniform", "count": 4}, "component": "u"}]},
        r"config\.pde\.blocks\[0\]\.component: not for pde blocks",
    ),
    (
        {"blocks": [{"points": {"sample": "uniform", "count": 4}, "weight": {"energy": 2}}]},
        r"config\.pde\.blocks\[0\]\.weight\.energy: not one of this block's parts",
    ),
]


@pytest.mark.parametrize(
    "changes,message", BAD_CONFIGS, ids=[m.split(":")[0] + str(i) for i, (_, m) in enumerate(BAD_CONFIGS)]
)
def test_config_errors_are_one_line(changes, message):
    raw = {**NS, **changes}
    with pytest.raises(ConfigError, match=message) as info:
        parse_problem(raw, None, gen0())
    assert "\n" not in str(info.value)


def test_a_user_residual_reading_a_renamed_output_is_a_config_error(tmp_path):
    spec = user_residual_file(tmp_path, 'return F.d("w", "x") - F["u"]')
    raw = {"equation": spec, "variables": ["x"], "outputs": ["u", "v"], "blocks": [{"points": {"dataset": "/x"}}]}
    with pytest.raises(
        ConfigError, match=r"config\.pde\.equation: the residual .* failed .*unknown output 'w'"
    ) as info:
        parse_problem(raw, None, gen0())
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------
# 4. Unknown constants: columns of the residual Jacobian, selection, refinement
# --------------------------------------------------------------------------------------------

BURGERS_INVERSE: dict[str, Any] = {
    "equation": "burgers",
    "variables": ["x", "t"],
    "domain": {"x": [-1, 1], "t": [0, 1]},
    "unknowns": {"lognu": -3.0},
    "coefficients": {"nu": "exp(lognu)", "source": "0.3*x"},
    "blocks": [{"name": "interior", "points": {"sample": "sobol", "count": 24}}],
}


def tiny_net(inputs: int = 2, outputs: int = 1, seed: int = 0) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return MLP(inputs, outputs, hidden=[6]).double().eval()


@pytest.mark.parametrize("scripted", [False, True], ids=["plain", "torchscript"])
def test_jacobian_columns_of_unknowns_match_finite_differences(scripted):
    problem = parse_problem(BURGERS_INVERSE, None, gen0())
    net = tiny_net()
    net = torch.jit.script(net) if scripted else net
    model = attach_unknowns(net, problem.unknowns, F64, torch.device("cpu"))
    assert isinstance(model, WithUnknowns)
    space = select_space(model, Config(), gen0())
    assert space.names[-1] == "unknowns.lognu"
    blk = problem.blocks[0]
    op = JacobianOperator(model, space, blk.inputs, 8, 4, residual=blk.residual)
    e = torch.zeros(space.num, dtype=F64)
    e[-1] = 1.0
    column = op.matvec(e)
    with torch.no_grad():
        lognu = dict(model.named_parameters())["unknowns.lognu"]
        h = 1e-5
        lognu += h
        plus = blk.residual(model, blk.inputs).clone()
        lognu -= 2 * h
        minus = blk.residual(model, blk.inputs).clone()
        lognu += h
    fd = (plus - minus) / (2 * h)
    assert float(column.abs().max()) > 1e-3  # the unknown moves the residual
    torch.testing.assert_close(column, fd, rtol=FD_RTOL, atol=FD_RTOL * float(fd.abs().max()))
    # the same column, exactly: ∂r/∂lognu = −ν u_xx · scale
    F = Fields(net, blk.points, ["x", "t"])
    exact = -math.exp(-3.0) * F.d2("x", "x") * blk.scale
    torch.testing.assert_close(column, exact.detach(), rtol=1e-10, atol=1e-12)


class Decay(nn.Module):
    """``u(t) = a · exp(−1.3 t)``, its rate ``k`` kept as a parameter beside the network."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(1.0, dtype=F64))
        self.k = nn.Parameter(torch.tensor(0.9, dtype=F64))

    def forward(self, x: Tensor) -> Tensor:
        return (self.a * torch.exp(-1.3 * x[:, 0]))[:, None]


def decay_problem(tmp_path: Path, unknowns: dict[str, Any]) -> dict[str, Any]:
    spec = user_residual_file(tmp_path, 'return F.d("t") + c["k"] * F.u')
    return {
        "equation": spec,
        "variables": ["t"],
        "domain": {"t": [0, 2]},
        "unknowns": unknowns,
        "blocks": [
            {"name": "ode", "points": {"sample": "grid", "count": 40}},
            {"name": "start", "kind": "initial", "value": 1, "points": {"sample": "grid", "count": 1}},
        ],
    }


def test_parameter_patterns_freeze_unknowns_and_checkpoint_parameters_serve_as_unknowns(tmp_path):
    raw = decay_problem(tmp_path, {"k": {"parameter": "k", "true": 1.3}})
    problem = parse_problem(raw, None, gen0())
    model = attach_unknowns(Decay(), problem.unknowns, F64, torch.device("cpu"))
    assert isinstance(model, WithUnknowns) and model.values() == {"k": 0.9}
    out = model(torch.zeros(3, 1, dtype=F64))
    assert out.shape == (3, 2) and torch.equal(out[:, 1], torch.full((3,), 0.9, dtype=F64))
    cfg = Config()
    cfg.lsr.parameters.exclude = ["k"]
    assert select_space(model, cfg, gen0()).names == ["net.a"]
    own = attach_unknowns(
        tiny_net(1), parse_problem(decay_problem(tmp_path, {"k": 0.5}), None, gen0()).unknowns, F64, torch.device("cpu")
    )
    cfg.lsr.parameters.exclude = ["unknowns.*"]
    assert "unknowns.k" not in select_space(own, cfg, gen0()).names
    cfg.lsr.parameters.exclude = []
    cfg.lsr.parameters.include = ["unknowns.*"]
    assert select_space(own, cfg, gen0()).names == ["unknowns.k"]
    cfg.lsr.parameters.include = []
    cfg.lsr.parameters.fraction = 0.5  # a random half of the network's entries; an unknown is never dropped
    half = select_space(own, cfg, gen0())
    assert half.names[-1] == "unknowns.k" and half.num < half.num_total
    bad = decay_problem(tmp_path, {"k": {"parameter": "missing"}})
    with pytest.raises(ConfigError, match=r"config\.pde\.unknowns\.k\.parameter: the checkpoint has no scalar"):
        attach_unknowns(Decay(), parse_problem(bad, None, gen0()).unknowns, F64, torch.device("cpu"))


def test_refine_recovers_an_unknown_the_residual_is_linear_in(tmp_path):
    """``u' + k u = 0`` with ``u`` exact for ``k = 1.3``: one Gauss–Newton step in ``(a, k)``
    gives ``k = 1.3`` to round-off from a guess of 0.5 (the residual is bilinear in ``a, k``)."""
    raw = decay_problem(tmp_path, {"k": {"initial": 0.5, "true": 1.3}})
    problem = parse_problem(raw, None, gen0())
    net = Decay()
    path = tmp_path / "decay.pt"
    torch.save(net.state_dict(), path)
    cfg = Config()
    cfg.device = "cpu"
    cfg.lsr.rank = 2
    cfg.lsr.parameters.exclude = ["k"]  # the network's own k is not the unknown here
    result = refine_pde(LoadedCheckpoint(path, "state_dict", net), problem, cfg)
    k = result.unknowns["k"]
    assert k["before"] == 0.5 and k["true"] == 1.3 and k["linearized"]
    assert k["rel_error_after"] < 1e-8 < k["rel_error_before"]
    assert "k 0.5 -> 1.3" in result.message
    assert set(result.delta) == {"a"}  # the refined checkpoint's δ is the network's
    assert result.model(torch.zeros(2, 1)).shape == (2, 1)


# --------------------------------------------------------------------------------------------
# 5. Through the CLI: unknowns recorded, output count checked, nothing written on errors
# --------------------------------------------------------------------------------------------


def write_decay_files(tmp_path: Path, pde: dict[str, Any]) -> Path:
    net = torch.jit.script(Decay())
    net.save(str(tmp_path / "decay_ts.pt"))
    cfg = {"model": {"checkpoint": "decay_ts.pt"}, "pde": pde, "lsr": {"rank": 2, "parameters": {"exclude": ["k"]}}}
    path = tmp_path / "inverse.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def test_cli_reports_and_records_unknowns(tmp_path):
    config = write_decay_files(tmp_path, decay_problem(tmp_path, {"k": {"initial": 0.5, "true": 1.3}}))
    out, report = tmp_path / "r.pt", tmp_path / "r.json"
    result = run("refine", tmp_path / "decay_ts.pt", "--config", config, "--out", out, "--report", report)
    assert result.exit_code == 0, result.output
    rep = json.loads(report.read_text())
    assert rep["unknowns"]["k"]["rel_error_after"] < 1e-8
    refined = torch.jit.load(str(out))
    meta = json.loads(refined.lsr_metadata)
    assert abs(meta["unknowns"]["k"] - 1.3) < 1e-8
    assert refined(torch.zeros(2, 1, dtype=F64)).shape == (2, 1)  # the network's outputs only


def test_cli_output_count_mismatch_writes_nothing(tmp_path):
    pde = decay_problem(tmp_path, {"k": 0.5})
    pde["outputs"] = ["u", "w"]
    pde["blocks"][1]["component"] = "u"
    config = write_decay_files(tmp_path, pde)
    before = listing(tmp_path)
    out, report = tmp_path / "r.pt", tmp_path / "r.json"
    result = run("refine", tmp_path / "decay_ts.pt", "--config", config, "--out", out, "--report", report)
    assert_clean_failure(result, 2, ["config.pde.outputs: names 2 outputs ['u', 'w']"], [out, report], tmp_path, before)


def test_cli_unknown_shadowing_a_variable_writes_nothing(tmp_path):
    config = write_decay_files(tmp_path, decay_problem(tmp_path, {"t": 0.5}))
    before = listing(tmp_path)
    out, report = tmp_path / "r.pt", tmp_path / "r.json"
    result = run("refine", tmp_path / "decay_ts.pt", "--config", config, "--out", out, "--report", report)
    assert_clean_failure(
        result, 2, ["config.pde.unknowns.t: the unknown has the name of a variable"], [out, report], tmp_path, before
    )


def test_refine_a_system_lowers_every_components_error(tmp_path):
    """``u' = v, v' = −u`` with ``u(0) = 0, v(0) = 1`` (exact ``sin, cos``): a briefly trained
    1-10-10-2 network, refined; the reference error of each component falls."""
    spec = user_residual_file(tmp_path, 'return {"a": F.d("u", "t") - F["v"], "b": F.d("v", "t") + F["u"]}')
    raw = {
        "equation": spec,
        "variables": ["t"],
        "outputs": ["u", "v"],
        "domain": {"t": [0, 3]},
        "blocks": [
            {"name": "ode", "points": {"sample": "grid", "count": 60}},
            {
                "name": "start",
                "kind": "initial",
                "component": ["u", "v"],
                "value": {"u": 0, "v": 1},
                "weight": 10,
                "points": {"sample": "grid", "count": 1},
            },
        ],
    }
    path = tmp_path / "osc.h5"
    ref_t = np.linspace(0, 3, 31)[:, None]
    with h5py.File(path, "w") as f:
        f["reference/inputs"] = ref_t
        f["reference/values"] = np.concatenate([np.sin(ref_t), np.cos(ref_t)], 1)
    problem = parse_problem(raw, path, gen0())
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = MLP(1, 2, hidden=[10, 10]).double()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        loss = sum(torch.sum(b.residual(net, b.inputs) ** 2) for b in problem.blocks) / problem.num_rows
        loss.backward()
        opt.step()
    net.eval()
    torch.save(net.state_dict(), tmp_path / "osc.pt")
    cfg = Config()
    cfg.device = "cpu"
    cfg.lsr.rank = [8, 16, 32]
    result = refine_pde(LoadedCheckpoint(tmp_path / "osc.pt", "state_dict", net), problem, cfg)
    assert set(result.residual_blocks) == {"ode.a", "ode.b", "start.u", "start.v"}
    assert result.components is not None and set(result.components) == {"u", "v"}
    for name, errs in result.components.items():
        assert errs["after"]["rel_l2"] < errs["before"]["rel_l2"] / 10, name
    assert result.unknowns is None


ROOT = Path(__file__).resolve().parents[1]
SAMPLES = {
    "kovasznay": ["interior.momentum_x", "interior.momentum_y", "interior.continuity", "walls.u", "walls.v", "outflow"],
    "lorenz_inverse": [
        "ode.x",
        "ode.y",
        "ode.z",
        "start.x",
        "start.y",
        "start.z",
        "observed.x",
        "observed.y",
        "observed.z",
    ],
    "burgers_inverse": ["interior", "initial", "boundary", "observations"],
    "heat_inverse": ["interior", "ends.u", "ends.a", "observations"],
}


@pytest.mark.parametrize("name", list(SAMPLES))
def test_sample_configs_read_with_their_data(name):
    """The shipped system and inverse samples: blocks as documented, boundary values exact."""
    from lsr_cli.config import load_config

    path = ROOT / "configs" / f"{name}.yaml"
    cfg = load_config(path)
    data = (path.parent / str(cfg.data.path)).resolve()
    problem = parse_problem(cfg.pde, data, gen0(), path.parent)
    assert [b.name for b in problem.blocks] == SAMPLES[name]
    assert problem.reference is not None and problem.reference[1].shape[1] == len(problem.outputs)
    if name == "kovasznay":  # the walls' values are the exact flow's
        for b in problem.blocks[3:]:
            column = problem.outputs.index(b.spec["component"])
            torch.testing.assert_close(b.inputs[1], kovasznay(b.points)[:, column], rtol=0, atol=1e-12)


def test_a_block_may_constrain_a_formula_over_components():
    raw = {
        **NS,
        "blocks": [
            {
                "name": "flux",
                "kind": "dirichlet",
                "component": "u*n_x + v*n_y",
                "points": {"sample": "uniform", "count": 40},
            },
            {"name": "div", "kind": "dirichlet", "component": "u_x + v_y", "points": {"sample": "uniform", "count": 8}},
        ],
    }
    p = parse_problem(raw, None, gen0())
    flux, div = p.blocks
    normals = flux.inputs[2]
    assert normals.shape == (40, 2) and torch.equal(normals.abs().sum(1), torch.ones(40, dtype=F64))
    q = kovasznay(flux.points)
    torch.testing.assert_close(flux.residual_fn(kovasznay, flux.inputs), (q[:, :2] * normals).sum(1))
    assert float(div.residual_fn(kovasznay, div.inputs).abs().max()) < RESIDUAL_ATOL  # ∇·u = 0
    assert len(div.inputs) == 2  # no normals needed


@pytest.mark.parametrize(
    "block,message",
    [
        ({"kind": "dirichlet", "component": "u*n_q"}, r"unknown symbol 'n_q'"),
        ({"kind": "dirichlet", "component": ["u", "u + v"]}, r"is one block's whole component"),
        ({"kind": "neumann", "component": "u + v"}, r"is one block's whole component, in dirichlet, initial, data"),
    ],
)
def test_formula_component_errors(block, message):
    raw = {**NS, "blocks": [{**block, "points": {"sample": "uniform", "count": 4}}]}
    with pytest.raises(ConfigError, match=message):
        parse_problem(raw, None, gen0())
