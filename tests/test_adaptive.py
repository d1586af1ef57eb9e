"""Residual-based adaptive collocation: points go where the residual is largest, never onto the
validation points, seeded; bad settings are one-line config errors; the report says what was added."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lsr_cli.errors import ConfigError
from lsr_cli.pde.adaptive import adaptive_settings, augment, candidates
from lsr_cli.pde.problem import parse_problem
from lsr_cli.pde.validation import validation_problem

from .test_cli import assert_clean_failure, run
from .test_cli_pde import PROBLEM, _pinn, pinn, write_config  # noqa: F401  (fixtures)

HOT = torch.tensor([0.7, 0.3], dtype=torch.float64)


class HotSpot(nn.Module):
    """``u = exp(-|x - HOT|² / 0.01)``: its Laplacian, hence the Poisson residual, peaks at ``HOT``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(-((x - HOT.to(x)) ** 2).sum(-1, keepdim=True) / 0.01)


def _problem(data):
    raw = {**PROBLEM, "coefficients": {"source": "0"}}
    return parse_problem(raw, data, torch.Generator().manual_seed(0))


def test_points_are_added_where_the_residual_is_largest(pinn):  # noqa: F811
    problem = _problem(pinn["data"])
    cand = candidates(problem, seed=0, round_index=0)
    assert cand is not None and [b.name for b in cand.blocks] == ["interior"]  # pde blocks only
    n_fit = problem.blocks[0].num_global
    assert cand.blocks[0].num_global == 4 * n_fit
    out, added = augment(problem, cand, HotSpot(), 0, torch.Generator().manual_seed(0))
    assert added == {"interior": n_fit}
    new = out.blocks[-1]
    assert new.name == "interior+added1" and new.kind == "pde"
    near = lambda p: float(((p - HOT).norm(dim=1) < 0.15).double().mean())  # noqa: E731
    # half of the sampling mass follows |r|, which lives near HOT: far more added points there
    # than among the candidates, and the candidates with the largest residual are all taken
    assert near(new.points) > 2.5 * near(cand.blocks[0].points)
    r = cand.blocks[0].residual(HotSpot(), cand.blocks[0].inputs).reshape(-1).abs()
    top = cand.blocks[0].points[r.topk(20).indices]
    assert int((torch.cdist(top, new.points).min(1).values < 1e-12).sum()) >= 18
    # the group keeps the block's weight, split by point counts; the loss stays a weighted mean
    first = out.blocks[0]
    assert first.weight + new.weight == pytest.approx(problem.blocks[0].weight)
    assert first.weight == pytest.approx(new.weight)
    assert [b.name for b in problem.blocks] == ["interior", "walls"]  # the input problem is unchanged


def test_candidates_are_seeded_and_never_validation_points(pinn):  # noqa: F811
    problem = _problem(pinn["data"])
    a, b = candidates(problem, 0, 0), candidates(problem, 0, 0)
    c = candidates(problem, 0, 1)
    val, _ = validation_problem(problem, seed=0)
    assert a is not None and b is not None and c is not None and val is not None
    assert torch.equal(a.blocks[0].points, b.blocks[0].points)
    assert not torch.equal(a.blocks[0].points, c.blocks[0].points)
    assert float(torch.cdist(a.blocks[0].points, val.blocks[0].points).min()) > 1e-9
    assert float(torch.cdist(a.blocks[0].points, problem.blocks[0].points).min()) > 1e-9


@pytest.mark.parametrize(
    "spec",
    ["sometimes", {"rounds": 0}, {"rounds": 2, "time": 5}, {"time_limit": -1}, {"rounds": True}],
)
def test_bad_adaptive_settings_are_one_line_config_errors(pinn, spec):  # noqa: F811
    with pytest.raises(ConfigError) as exc:
        adaptive_settings({"adaptive": spec})
    assert str(exc.value).startswith("config.pde.adaptive: expected") and "\n" not in str(exc.value)
    cfg = write_config(pinn["dir"] / "bad_adaptive.yaml", {}, {**PROBLEM, "adaptive": spec})
    out = pinn["dir"] / "never_adaptive.pt"
    result = run("refine", pinn["torchscript"], "--config", cfg, "--out", out)
    assert_clean_failure(result, 2, "config.pde.adaptive: expected", [out])


def test_refine_reports_the_adaptive_rounds(pinn):  # noqa: F811
    out = pinn["dir"] / "adaptive.pt"
    cfg = write_config(pinn["dir"] / "adaptive.yaml", {}, {**PROBLEM, "adaptive": {"rounds": 1}})
    result = run("refine", pinn["torchscript"], "--config", cfg, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    rep = json.loads(result.stdout)
    ad = rep["validation"]["adaptive"]
    first = ad["rounds"][0]
    assert first["round"] == 0 and first["points_added"] == {}
    assert first["validation_loss"] > 0 and first["fit_loss"] > 0
    if first["validation_loss"] > ad["trigger"] * first["fit_loss"]:  # a round ran: what it added
        assert ad["rounds"][1]["points_added"] == {"interior": 300}
        kept = ad["kept_round"]
        assert ad["points_added"] == ({"interior": 300} if kept == 1 else {})
        if kept == 1:
            assert "interior+added1" in rep["residual_blocks"]
    else:
        assert ad["stop_reason"].startswith("the validation loss is within")
    off = write_config(pinn["dir"] / "adaptive_off.yaml", {}, {**PROBLEM, "adaptive": "none"})
    result = run("refine", pinn["torchscript"], "--config", off, "--out", pinn["dir"] / "off.pt", "--json")
    assert result.exit_code == 0, result.output
    assert "adaptive" not in json.loads(result.stdout)["validation"]


def test_a_round_that_trades_one_block_for_another_is_not_kept():
    """The measured cases of ``round_refusal`` (``lsr_cli.pde.rounds``)."""
    from lsr_cli.pde.rounds import round_refusal

    before = {"interior": 1.574e-4, "initial": 7.14e-8, "boundary": 2.6e-9}
    # Burgers shock, round 2: the total fell 10x, the initial condition's part rose 3x
    burgers = {"interior": 1.558e-5, "initial": 2.14e-7, "boundary": 1.15e-9}
    why = round_refusal(2, 1.5749e-4, before, 1.58e-5, burgers)
    assert why.startswith("round 2 raised the validation loss of block(s) initial by more than 2x")
    # the same fall with the initial condition's part 1.9x higher is kept
    assert round_refusal(2, 1.5749e-4, before, 1.58e-5, {**burgers, "initial": 1.9 * 7.14e-8}) == ""
    # Helmholtz: the total fell 21x, the boundary's part rose 38x
    why = round_refusal(1, 21.0, {"interior": 20.9, "boundary": 0.1}, 1.0, {"interior": 0.9, "boundary": 3.8})
    assert "boundary by more than 2x" in why
    # a small fall allows a smaller rise: 1.44x down allows 1.2x, not 1.3x
    assert "by more than 1.2x (the square root" in round_refusal(
        1, 1.44, {"a": 1.0, "b": 0.44}, 1.0, {"a": 0.4, "b": 0.6}
    )
    # the Burgers sample: the total fell 43x, the boundary's part rose 3.7x to 0.4 % of the total:
    # a negligible block is held to the square root (6.6x) only
    sample = {"interior": 3.39e-6, "more": 7.36e-6, "initial": 7.47e-9, "boundary": 2.7e-10}
    after = {"interior": 1.45e-7, "more": 9.95e-8, "initial": 3.91e-9, "boundary": 1.01e-9}
    assert round_refusal(1, 1.08e-5, sample, 2.5e-7, after) == ""
    # the same 3.7x rise to 2 % of the total is refused
    big = {**sample, "boundary": 1.35e-9}
    assert "boundary by more than 2x (the most a block may rise)" in round_refusal(
        1, 1.08e-5, big, 2.5e-7, {**after, "boundary": 5e-9}
    )
    # Poisson sample: the total fell 31 000x, the boundary's part rose 1.4x at round-off
    assert (
        round_refusal(1, 3.1e-4, {"interior": 3.1e-4, "boundary": 1e-14}, 1e-8, {"interior": 1e-8, "boundary": 1.4e-14})
        == ""
    )
    # no 10 % gain: not kept, whatever the blocks
    assert round_refusal(3, 1.0, {"a": 1.0}, 0.95, {"a": 0.95}) == "round 3 did not lower the validation loss by 10%"
