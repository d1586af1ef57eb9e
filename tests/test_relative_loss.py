"""``lsr.loss: relative``: each sample's rows weighted by ``c / ‖y_i‖``, against a dense weighted least squares."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from lsr_cli import Config, load_checkpoint, read_data, refine
from lsr_cli.config import parse_config
from lsr_cli.errors import ConfigError, DataError

from .test_engine import RandomFeatures

LSTSQ_TOL = 1e-10


def vector_features() -> RandomFeatures:
    """Linear in its parameters: ``q(x) = tanh(x F) W + b``, three outputs per sample (21 parameters)."""
    return RandomFeatures(num_features=6, out_features=3)


def _data(path: Path, zero_sample: int | None = None) -> Path:
    """Targets whose sizes span three decades (amplitude 0.01 … 10 per sample), as operator data do."""
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        for split, n in (("train", 60), ("test", 20)):
            x = rng.uniform(-1, 1, size=(n, 2))
            amp = 10.0 ** rng.uniform(-2, 1, size=(n, 1))
            y = amp * np.c_[np.sin(3 * x[:, :1]), np.cos(2 * x[:, 1:]), x[:, :1] * x[:, 1:] + 0.5]
            if split == "train" and zero_sample is not None:
                y[zero_sample] = 0.0
            g = f.create_group(split)
            g.create_dataset("inputs", data=x)
            g.create_dataset("targets", data=y)
    return path


def _refine(tmp_path: Path, loss: str, jacobian: str = "auto", scripted: bool = True):
    data = _data(tmp_path / "d.h5")
    model = vector_features().double()
    path = tmp_path / "m.pt"
    torch.jit.script(model).save(str(path))
    cfg = Config()
    cfg.device = "cpu"
    cfg.data.path = str(data)
    cfg.lsr.loss = loss
    cfg.lsr.jacobian = jacobian
    cfg.lsr.rank = 21  # every parameter: W (6 × 3) and b (3)
    cfg.lsr.oversampling = 0
    cfg.lsr.tikhonov = 0.0
    cfg.lsr.holdout = 0.0  # fit and select on all training rows: the plain least-squares optimum
    splits = read_data(data, cfg.data, torch.float64)
    result = refine(load_checkpoint(path), splits, cfg)
    x, y = splits["train"].inputs[0], splits["train"].targets
    return result, model, x, y


def _weighted_lstsq(model: RandomFeatures, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    feats = torch.cat([torch.tanh(x @ model.freq), torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    coef = torch.linalg.lstsq(feats * weights[:, None], y * weights[:, None]).solution
    return feats @ coef


@pytest.mark.parametrize("jacobian", ["dense", "matrix_free"])
def test_relative_loss_is_the_weighted_least_squares_optimum(tmp_path, jacobian):
    result, model, x, y = _refine(tmp_path, "relative", jacobian)
    assert result.rank == 21
    assert result.jacobian["path"] == jacobian
    norms = torch.linalg.norm(y, dim=1)
    ref = _weighted_lstsq(model, x, y, 1.0 / norms)
    with torch.no_grad():
        pred = result.model(x)
    torch.testing.assert_close(pred, ref, rtol=0, atol=LSTSQ_TOL)
    # and it is not the mean-squared-error optimum: on these data the weighting changes the fit
    plain = _weighted_lstsq(model, x, y, torch.ones_like(norms))
    assert float((pred - plain).abs().max()) > 1e-3
    # the report's errors are those of the predictor, unweighted
    rel = torch.linalg.norm(pred - y, dim=1) / norms
    assert result.errors["train"]["after"]["rel_l2_mean"] == pytest.approx(float(rel.mean()), rel=1e-9)
    assert result.loss is not None and result.loss["kind"] == "relative"
    scale = float(torch.sqrt(torch.mean(norms**2)))
    assert result.loss["scale"] == pytest.approx(scale, rel=1e-12)
    assert result.loss["train_weight_max"] == pytest.approx(scale / float(norms.min()), rel=1e-12)


def test_relative_loss_lowers_the_mean_relative_error_and_mse_stays_default(tmp_path):
    relative, *_ = _refine(tmp_path, "relative")
    plain, *_ = _refine(tmp_path, "mse")
    assert plain.loss is None
    # each is best at its own loss on the fitted rows
    assert relative.errors["train"]["after"]["rel_l2_mean"] < plain.errors["train"]["after"]["rel_l2_mean"]
    assert plain.errors["train"]["after"]["rmse"] < relative.errors["train"]["after"]["rmse"]


def test_an_all_zero_target_is_a_one_line_error(tmp_path):
    data = _data(tmp_path / "d.h5", zero_sample=7)
    path = tmp_path / "m.pt"
    torch.jit.script(vector_features().double()).save(str(path))
    cfg = Config()
    cfg.device = "cpu"
    cfg.data.path = str(data)
    cfg.lsr.loss = "relative"
    splits = read_data(data, cfg.data, torch.float64)
    with pytest.raises(DataError, match=r"d\.h5:/train/targets: sample 7 is all zero.*lsr\.loss: mse") as err:
        refine(load_checkpoint(path), splits, cfg)
    assert "\n" not in str(err.value)


def test_loss_config_values():
    assert parse_config({}).lsr.loss == "mse"
    assert parse_config({"lsr": {"loss": "relative"}}).lsr.loss == "relative"
    with pytest.raises(ConfigError, match="config.lsr.loss: expected mse or relative, got 'l1'"):
        parse_config({"lsr": {"loss": "l1"}})
    with pytest.raises(ConfigError, match="applies to data-driven runs"):
        parse_config({"lsr": {"loss": "relative"}, "pde": {"equation": "poisson", "variables": ["x"], "blocks": []}})


def test_iterate_keeps_iterations_by_the_relative_loss(tmp_path):
    from lsr_cli.checkpoint import LoadedCheckpoint
    from lsr_cli.iterate_supervised import iterate_supervised
    from lsr_cli.models import MLP

    data = _data(tmp_path / "d.h5")
    torch.manual_seed(0)
    net = MLP(2, 3, hidden=[8, 8]).double()
    cfg = parse_config(
        {
            "data": {"path": str(data)},
            "lsr": {"rank": [8, 32], "loss": "relative"},
            "iterate": {"iterations": 2, "gauss_newton_steps": 4, "gauss_newton_rank": 40},
            "device": "cpu",
        }
    )
    splits = read_data(data, cfg.data, torch.float64)
    result = iterate_supervised(LoadedCheckpoint(tmp_path / "m.pt", "state_dict", net), splits, cfg)
    assert "relative (lsr.loss)" in result.selection["criterion"]
    # the start criterion is the weighted mean square c² Σ ‖e_i‖² / ‖y_i‖² / (N · outputs) on the training split
    x, y = splits["train"].inputs[0], splits["train"].targets
    torch.manual_seed(0)  # the same initial network again
    start = MLP(2, 3, hidden=[8, 8]).double()
    with torch.no_grad():
        e = start(x) - y
    norms = torch.linalg.norm(y, dim=1)
    expected = float(torch.mean(norms**2) * torch.mean(e.square().sum(1) / norms**2) / 3)
    assert result.selection["start"] == pytest.approx(expected, rel=1e-10)


def test_a_wide_spread_of_target_norms_is_warned_about(tmp_path):
    result, *_ = _refine(tmp_path, "relative")
    spread = result.loss["train_weight_max"] / result.loss["train_weight_min"]
    assert 10 < spread < 1e4  # three decades of amplitude, none near zero
    assert not any("norms span" in w for w in result.warnings)
    # scalar targets that cross zero: one sample weighs 1e6 times the rest
    data = tmp_path / "s.h5"
    x = np.linspace(-1, 1, 41)[:, None] * np.ones((1, 2))
    with h5py.File(data, "w") as f:
        f.create_dataset("train/inputs", data=x)
        f.create_dataset("train/targets", data=np.sin(3 * x[:, :1]) + 1e-6)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    torch.jit.script(net).save(str(tmp_path / "s.pt"))
    cfg = Config()
    cfg.device = "cpu"
    cfg.lsr.loss = "relative"
    cfg.lsr.rank = 4
    scalar = refine(load_checkpoint(tmp_path / "s.pt"), read_data(data, cfg.data, torch.float64), cfg)
    assert any("norms span" in w and "lsr.loss: mse may suit better" in w for w in scalar.warnings)
