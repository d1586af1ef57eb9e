"""Validation points for physics-informed refinement: never fitted, seeded, and what they guard."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lsr_cli.errors import ConfigError
from lsr_cli.pde.problem import parse_problem
from lsr_cli.pde.validation import between, validation_problem

from .test_cli import assert_clean_failure, run
from .test_cli_pde import PROBLEM, _pinn, pinn, write_config  # noqa: F401  (fixtures)


def _problem(data, raw=None):
    return parse_problem(raw or PROBLEM, data, torch.Generator().manual_seed(0))


def test_between_points_lie_between_the_points_and_are_new():
    gen = torch.Generator().manual_seed(0)
    pts = torch.rand(500, 2, generator=gen, dtype=torch.float64)
    new, _ = between(pts, 300, torch.Generator().manual_seed(1))
    assert new.shape == (300, 2)
    assert float(torch.cdist(new, pts).min()) > 0  # none is a fit point
    assert bool(((new >= pts.min(0).values) & (new <= pts.max(0).values)).all())
    spacing = float(torch.cdist(pts, pts).fill_diagonal_(math.inf).min(1).values.mean())
    assert float(torch.cdist(new, pts).min(1).values.max()) < 4 * spacing  # between neighbours, not anywhere


def test_validation_points_are_seeded_and_disjoint_from_the_fit_points(pinn):  # noqa: F811
    problem = _problem(pinn["data"])
    val_a, info = validation_problem(problem, seed=0)
    val_b, _ = validation_problem(problem, seed=0)
    val_c, _ = validation_problem(problem, seed=1)
    assert val_a is not None and val_b is not None and val_c is not None
    assert [b.name for b in val_a.blocks] == ["interior", "walls"]
    assert info["blocks"]["interior"]["source"].startswith("between the block's points")
    assert info["blocks"]["walls"]["source"] == "sampled again"
    for a, b, c, fit in zip(val_a.blocks, val_b.blocks, val_c.blocks, problem.blocks, strict=True):
        assert torch.equal(a.points, b.points)  # same seed, same points
        assert not torch.equal(a.points, c.points)
        assert a.points.shape[0] == fit.points.shape[0]  # sized from the fit set
        assert float(torch.cdist(a.points, fit.points).min()) > 1e-9  # never a fit point
        assert a.scale == pytest.approx(fit.scale)  # weighted as in the loss (same counts here)
    walls = val_a.blocks[1].points
    on_face = (walls.abs() < 1e-12) | ((walls - 1).abs() < 1e-12)
    assert bool(on_face.any(1).all())  # boundary points stay on the boundary


def test_between_interpolates_values_known_at_the_points():
    gen = torch.Generator().manual_seed(0)
    pts = torch.rand(400, 2, generator=gen, dtype=torch.float64)
    g = 2 * pts[:, 0] - 3 * pts[:, 1] + 1  # linear: interpolation along a segment is exact
    new, vals = between(pts, 100, torch.Generator().manual_seed(2), values=g)
    assert vals is not None
    torch.testing.assert_close(vals, 2 * new[:, 0] - 3 * new[:, 1] + 1, rtol=0, atol=1e-12)


def test_data_valued_blocks(pinn):  # noqa: F811
    """Boundary values read from the file: interpolated between the points; pde coefficients read
    from the file (known only at their points): no validation points for that block."""
    walls = {**PROBLEM["blocks"][1], "value": {"dataset": "/collocation/interior"}}
    walls["points"] = {"dataset": "/collocation/interior"}
    problem = _problem(pinn["data"], {**PROBLEM, "blocks": [PROBLEM["blocks"][0], walls]})
    val, info = validation_problem(problem, seed=0)
    assert val is not None and [b.name for b in val.blocks] == ["interior", "walls"]
    assert info["blocks"]["walls"]["source"].startswith("between the block's points, values interpolated")
    raw = {**PROBLEM, "coefficients": {"source": {"dataset": "/collocation/interior"}}}
    problem = _problem(pinn["data"], raw)
    val, info = validation_problem(problem, seed=0)
    assert val is not None and [b.name for b in val.blocks] == ["walls"]
    assert info["blocks"]["interior"] == {"points": 0, "source": "none: its values come from the data file"}


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"validation": "maybe"}, "config.pde.validation: expected 'auto', 'choose' or 'none', got 'maybe'"),
        (
            {"blocks": [{**PROBLEM["blocks"][0], "validation": {"count": 5}}]},
            "config.pde.blocks[0].validation: expected points like",
        ),
        (
            {"blocks": [{**PROBLEM["blocks"][0], "validation": {"sample": "sobol", "cnt": 5}}]},
            "config.pde.blocks[0].validation.cnt: unknown key",
        ),
    ],
)
def test_bad_validation_entries_are_one_line_config_errors(pinn, change, needle):  # noqa: F811
    with pytest.raises(ConfigError, match=None) as exc:
        _problem(pinn["data"], {**PROBLEM, **change})
    assert needle in str(exc.value)
    cfg = write_config(pinn["dir"] / "bad.yaml", {}, {**PROBLEM, **change})
    out = pinn["dir"] / "never.pt"
    result = run("refine", pinn["torchscript"], "--config", cfg, "--out", out)
    assert_clean_failure(result, 2, needle, [out])


def test_refine_reports_its_validation_points_and_the_guard(pinn):  # noqa: F811
    out = pinn["dir"] / "r.pt"
    result = run("refine", pinn["torchscript"], "--config", pinn["config"], "--out", out, "--json")
    assert result.exit_code == 0, result.output
    rep = json.loads(result.stdout)
    val = rep["validation"]
    assert val["blocks"]["interior"]["points"] == 300 and val["blocks"]["walls"]["points"] == 80
    assert val["loss_after"] < val["loss_before"]
    assert val["guard"]["outcome"].startswith("kept")
    assert rep["splits"]["reference"]["after"]["rel_l2"] < rep["splits"]["reference"]["before"]["rel_l2"]


def test_choose_on_validation_points(pinn):  # noqa: F811
    cfg = write_config(pinn["dir"] / "choose.yaml", {}, {**PROBLEM, "validation": "choose"})
    result = run("refine", pinn["torchscript"], "--config", cfg, "--out", pinn["dir"] / "c.pt", "--json")
    assert result.exit_code == 0, result.output
    rep = json.loads(result.stdout)
    assert rep["selection_metric"] == "val_loss"
    assert "guard" not in rep["validation"]
