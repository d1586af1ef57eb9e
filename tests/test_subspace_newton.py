"""The exact-residual stage of one-shot LSR on nonlinear PDEs (``lsr_cli.pde.subspace_newton``):
tabulated quantities reproduce the predictor's residual and its Jacobian exactly, and the stage
lowers the predictor's exact residual and error on a nonlinear equation while leaving linear
ones to plain LSR."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from lsr_cli.checkpoint import LoadedCheckpoint
from lsr_cli.config import Config
from lsr_cli.errors import ConfigError
from lsr_cli.linearization import ParameterSpace
from lsr_cli.linearized import LinearizedModel
from lsr_cli.models import MLP
from lsr_cli.pde import parse_problem, refine_pde
from lsr_cli.pde.residual import true_residual
from lsr_cli.pde.subspace_newton import MONITOR_MIN_GAIN, PATIENCE, levenberg_marquardt, tabulate
from tests.test_pde import poisson_1d_problem

F64 = torch.float64
EXACT_ATOL = 1e-10
"""Tabulated residual / Jacobian against the predictor's own (float64 round-off)."""

NU = 0.1
SPEED, AMPLITUDE = 0.3, 0.8


def moving_front(X: torch.Tensor) -> torch.Tensor:
    """An exact viscous Burgers solution: u = c − A tanh(A (x − c t) / (2ν))."""
    return SPEED - AMPLITUDE * torch.tanh(AMPLITUDE * (X[:, 0] - SPEED * X[:, 1]) / (2 * NU))


def burgers_raw(equation: str = "burgers") -> dict[str, Any]:
    front = f"{SPEED} - {AMPLITUDE}*tanh({AMPLITUDE}*(x - {SPEED}*t)/(2*{NU}))"
    coefficients = {"nu": NU} if equation == "burgers" else {"epsilon": 0.05, "gamma": 1.0}
    return {
        "equation": equation,
        "variables": ["x", "t"],
        "domain": {"x": [-1, 1], "t": [0, 1]},
        "coefficients": coefficients,
        "blocks": [
            {"name": "interior", "points": {"sample": "sobol", "count": 160}},
            {
                "name": "initial",
                "kind": "initial",
                "value": front,
                "weight": 10,
                "points": {"sample": "sobol", "count": 24},
            },
            {
                "name": "left",
                "kind": "dirichlet",
                "value": front,
                "faces": ["x_min"],
                "points": {"sample": "sobol", "count": 12},
            },
            {"name": "slope", "kind": "neumann", "faces": ["x_max"], "points": {"sample": "sobol", "count": 12}},
            {"name": "wrap", "kind": "periodic", "variable": "x", "points": {"sample": "sobol", "count": 12}},
        ],
    }


def tiny_net(seed: int = 0) -> torch.nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return MLP(2, 1, hidden=[8, 8]).double().eval()


@pytest.mark.parametrize("dense", [False, True], ids=["jvp", "dense"])
@pytest.mark.parametrize("equation", ["burgers", "allen_cahn"])
def test_tables_reproduce_the_predictor_residual_and_its_jacobian(equation, dense):
    problem = parse_problem(burgers_raw(equation), None, torch.Generator().manual_seed(0))
    problem.to(torch.device("cpu"), F64)
    net = tiny_net()
    space = ParameterSpace(dict(net.named_parameters()))
    gen = torch.Generator().manual_seed(1)
    P = torch.linalg.qr(torch.randn(space.num, 6, generator=gen, dtype=F64))[0]
    z = 0.3 * torch.randn(6, generator=gen, dtype=F64)
    tables = tabulate(net, problem, space, P, tangent_chunk=4, dense=dense)

    tabulated = torch.cat([t.at(z) for t in tables])
    exact = true_residual(LinearizedModel(net, space.unflatten_vector(P @ z)), problem)
    assert torch.allclose(tabulated, exact, rtol=0, atol=EXACT_ATOL)

    for t in tables:
        jac = t.jacobian(z)
        reference = torch.func.jacfwd(t.at)(z)
        assert torch.allclose(jac, reference, rtol=0, atol=EXACT_ATOL), t.block.name
    assert any(t.base.shape[1] > 1 for t in tables)  # the interior needs derivatives, not only values


def rough_pinn(problem, steps: int = 150) -> torch.nn.Module:
    net = tiny_net(seed=2)
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss = sum(torch.sum(b.residual(net, b.inputs) ** 2) for b in problem.blocks) / problem.num_rows
        loss.backward()
        opt.step()
    return net.eval()


def front_problem(nonlinear_iterations: Any = "auto"):
    raw = burgers_raw()
    raw["blocks"] = raw["blocks"][:3] + [
        {
            "name": "right",
            "kind": "dirichlet",
            "value": raw["blocks"][2]["value"],
            "faces": ["x_max"],
            "points": {"sample": "sobol", "count": 12},
        },
    ]
    raw["blocks"][0]["points"]["count"] = 400
    raw["nonlinear_iterations"] = nonlinear_iterations
    problem = parse_problem(raw, None, torch.Generator().manual_seed(0))
    x, t = torch.meshgrid(torch.linspace(-1, 1, 41, dtype=F64), torch.linspace(0, 1, 21, dtype=F64), indexing="ij")
    X = torch.stack([x.reshape(-1), t.reshape(-1)], dim=1)
    problem.reference = (X, moving_front(X)[:, None])
    return problem


def refined(net: torch.nn.Module, problem, tmp_path, ranks: list[int]):
    """``refine_pde`` of ``net`` (saved as a state dict) with fixed candidate ranks on the CPU."""
    path = tmp_path / "pinn.pt"
    torch.save(net.state_dict(), path)
    cfg = Config()
    cfg.device = "cpu"
    cfg.lsr.rank = ranks
    return refine_pde(LoadedCheckpoint(path, "state_dict", net), problem, cfg)


def test_stage_lowers_the_exact_residual_and_error_of_a_nonlinear_problem(tmp_path):
    problem = front_problem()
    net = rough_pinn(problem)
    with_stage = refined(net, problem, tmp_path, [16, 32, 64])
    plain = refined(net, front_problem(0), tmp_path, [16, 32, 64])

    info = with_stage.nonlinear
    assert info is not None and info["ran"], info
    assert info["exact_minus_linearized_norm"] > 0
    assert info["monitor_best"] < info["monitor_start"]
    assert plain.nonlinear is not None and not plain.nonlinear["ran"]
    assert with_stage.residual_loss["after"] < plain.residual_loss["after"]
    err = with_stage.errors["reference"]
    assert err["after"]["rel_l2"] < plain.errors["reference"]["after"]["rel_l2"] < err["before"]["rel_l2"]


class _ScriptedTables:
    """A one-unknown problem for :func:`levenberg_marquardt`: the fit row ``e^(−z)`` (each
    Gauss–Newton step adds about 1 to ``z``) and a held-out row whose square after ``k``
    steps is ``monitor[k]``."""

    def __init__(self, monitor: list[float]) -> None:
        self.monitor = monitor

    def at(self, z: torch.Tensor) -> torch.Tensor:
        k = min(round(float(z[0])), len(self.monitor) - 1)
        return torch.stack([torch.exp(-z[0]), torch.tensor(math.sqrt(self.monitor[k]), dtype=F64)])

    def jacobian(self, z: torch.Tensor) -> torch.Tensor:
        return torch.stack([-torch.exp(-z), torch.zeros(1, dtype=F64)])


def test_stage_keeps_no_iterate_that_only_creeps_below_the_last_kept():
    """After its fall the held-out residual creeps down 2 % per step, less than
    MONITOR_MIN_GAIN over PATIENCE steps: those steps do not count as new lowest ones, the stage
    stops after PATIENCE of them and keeps step 2; monitored on the fit rows alone, every fall
    counts."""
    rate = 0.98  # 2 % per step, as measured on a shock
    assert rate**PATIENCE > 1 - MONITOR_MIN_GAIN
    creep = [1e-4 * rate**j for j in range(1, 12)]
    tables: Any = [_ScriptedTables([1.0, 1e-2, 1e-4, *creep])]
    z0, rows = torch.zeros(1, dtype=F64), (torch.tensor([0]), torch.tensor([1]))
    result = levenberg_marquardt(tables, z0, 0.0, *rows, 12)
    assert round(float(result.z[0])) == 2
    assert result.iterations == 2 + PATIENCE and result.kept_iteration == 2 and "no new lowest" in result.stop_reason
    monitored = [h["monitor"] for h in result.history]
    assert monitored == pytest.approx(tables[0].monitor[: 3 + PATIENCE], rel=1e-9)
    fit_only = levenberg_marquardt(tables, z0, 0.0, rows[0], None, 12)
    assert round(float(fit_only.z[0])) == 12


def test_stage_counts_every_fall_while_above_the_input_residual():
    """Above the input network's own held-out residual (z = 0) the slow first steps count: the
    stage does not stop there and reaches the large fall after them."""
    slow = [0.98**j for j in range(1, 8)]  # 7 steps, each 2 % down, all above the input's 1e-3
    creep = [1e-4 * 0.98**j for j in range(1, 12)]
    tables: Any = [_ScriptedTables([1e-3, 1.0, *slow, 1e-4, *creep])]
    result = levenberg_marquardt(tables, torch.ones(1, dtype=F64), 0.0, torch.tensor([0]), torch.tensor([1]), 30)
    assert round(float(result.z[0])) == 9 and result.kept_iteration == 8
    assert result.iterations == 8 + PATIENCE


def test_linear_equation_skips_the_stage(tmp_path):
    problem = poisson_1d_problem()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = MLP(1, 1, hidden=[8]).double().eval()
    result = refined(net, problem, tmp_path, [8])
    assert result.nonlinear is not None and not result.nonlinear["ran"]
    assert "linear" in result.nonlinear["reason"]
    assert math.isclose(result.residual_loss["after"], result.residual_loss["after_linearized"], rel_tol=1e-6)


@pytest.mark.parametrize("value", [-1, 2.5, "many", True])
def test_bad_iteration_count_is_a_config_error(value):
    raw = burgers_raw()
    raw["nonlinear_iterations"] = value
    with pytest.raises(ConfigError, match="config.pde.nonlinear_iterations"):
        parse_problem(raw, None, torch.Generator().manual_seed(0))


def test_iterate_bounds_the_stage_by_a_share_of_its_time_limit(tmp_path):
    """Under ``iterate.time_limit`` the LSR step's exact-residual stage gets at most
    ``EXACT_STAGE_SHARE`` of the time left (its own cap, at least two minutes, is larger here)."""
    from lsr_cli.pde.exact_stage import STAGE_MIN_SECONDS
    from lsr_cli.pde.iterate import EXACT_STAGE_SHARE, iterate

    problem = front_problem()
    net = rough_pinn(problem)
    torch.save(net.state_dict(), tmp_path / "pinn.pt")
    limit = 60.0
    cfg = Config()
    cfg.device = "cpu"
    cfg.lsr.rank = [16, 32]
    cfg.iterate.iterations = 1
    cfg.iterate.physics = False
    cfg.iterate.time_limit = limit
    result = iterate(LoadedCheckpoint(tmp_path / "pinn.pt", "state_dict", net), problem, cfg)
    stage = result.history[0]["nonlinear"]
    assert stage["ran"], stage
    assert 0.0 < stage["time_limit"] <= EXACT_STAGE_SHARE * limit < STAGE_MIN_SECONDS
