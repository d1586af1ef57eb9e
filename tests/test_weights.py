"""``pde.weights: auto``: block weights balanced by the residual Jacobian at the checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from lsr_cli.errors import ConfigError
from lsr_cli.linearization import JacobianOperator, ParameterSpace
from lsr_cli.pde import weights as W
from lsr_cli.pde.problem import parse_problem

from .test_cli import assert_clean_failure, run
from .test_cli_pde import PROBLEM, _pinn, pinn, write_config  # noqa: F401  (fixtures)


def _setup(pinn_files):
    problem = parse_problem(PROBLEM, pinn_files["data"], torch.Generator().manual_seed(0))
    problem.to(torch.device("cpu"), torch.float64)
    module = torch.jit.load(str(pinn_files["torchscript"])).double()
    space = ParameterSpace(dict(module.named_parameters()))
    return module, problem, space


def _exact_norms(module, problem, space):
    """``mean_i ‖∂r_i/∂θ‖²`` from the whole Jacobian of each block (``G_b I``)."""
    eye = torch.eye(space.num, dtype=torch.float64)
    out = {}
    for b in problem.blocks:
        G = JacobianOperator(module, space, b.inputs, 64, 64, residual=b.residual).matmat(eye) / b.scale
        out[b.name] = float((G**2).sum()) / b.num_global
    return out


def test_gradient_norms_estimate_the_mean_squared_row_norm(pinn, monkeypatch):  # noqa: F811
    module, problem, space = _setup(pinn)
    small = problem.blocks[0]
    small.points, small.inputs = small.points[:40], tuple(x[:40] for x in small.inputs)
    exact = _exact_norms(module, problem, space)
    monkeypatch.setattr(W, "PROBES", 3000)
    est = W.gradient_norms(module, problem, space, seed=0, tangent_chunk=64)
    for name in exact:
        assert est[name] == pytest.approx(exact[name], rel=0.08)
    assert exact["interior"] > 10 * exact["walls"]  # −Δu rows are far larger than u rows


def test_balanced_weights_equalize_the_blocks(pinn):  # noqa: F811
    module, problem, space = _setup(pinn)
    norms = W.gradient_norms(module, problem, space, seed=0, tangent_chunk=64)
    info = W.balance_weights(module, problem, space, seed=0, tangent_chunk=64)
    w = {b.name: b.weight for b in problem.blocks}
    assert info["reference_block"] == "interior" and w["interior"] == 1.0  # the first pde block keeps its weight
    # the configured wall weight (10) multiplies the balanced one
    assert w["walls"] * norms["walls"] == pytest.approx(10 * w["interior"] * norms["interior"], rel=1e-12)
    total = sum(b.num_global for b in problem.blocks)
    for b in problem.blocks:  # the row scales follow the new weights
        assert b.scale == pytest.approx((b.weight * total / b.num_global) ** 0.5)
    assert info["weights"] == w


def test_bad_weights_mode_is_a_one_line_config_error(pinn):  # noqa: F811
    with pytest.raises(ConfigError, match="config.pde.weights: expected 'config' or 'auto', got 'ntk'"):
        parse_problem({**PROBLEM, "weights": "ntk"}, pinn["data"], torch.Generator().manual_seed(0))
    cfg = write_config(pinn["dir"] / "bad_weights.yaml", {}, {**PROBLEM, "weights": "ntk"})
    out = pinn["dir"] / "never_weights.pt"
    result = run("refine", pinn["torchscript"], "--config", cfg, "--out", out)
    assert_clean_failure(result, 2, "config.pde.weights: expected", [out])


def test_refine_reports_the_weights_it_used(pinn):  # noqa: F811
    raw = {**PROBLEM, "weights": "auto", "adaptive": "none"}
    cfg = write_config(pinn["dir"] / "auto_weights.yaml", {}, raw)
    result = run("refine", pinn["torchscript"], "--config", cfg, "--out", pinn["dir"] / "aw.pt", "--json")
    assert result.exit_code == 0, result.output
    rep = json.loads(result.stdout)
    info = rep["residual_loss"]["weights"]
    assert info["mode"] == "auto" and info["weights"]["interior"] == 1.0
    assert info["weights"]["walls"] > 10  # the wall rows are small: balanced weight far above the configured 10
    assert rep["residual_blocks"]["walls"]["weight"] == info["weights"]["walls"]
    plain = write_config(pinn["dir"] / "config_weights.yaml", {}, {**PROBLEM, "adaptive": "none"})
    result = run("refine", pinn["torchscript"], "--config", plain, "--out", pinn["dir"] / "cw.pt", "--json")
    assert result.exit_code == 0, result.output
    rep = json.loads(result.stdout)
    assert rep["residual_loss"]["weights"] == {"mode": "config", "weights": {"interior": 1.0, "walls": 10.0}}
