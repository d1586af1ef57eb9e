"""`lsr iterate`: the network fit, the kept network and its safety, supervised data — tiny nets."""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
import yaml

import lsr_cli.pde.iterate as iterate_module
import lsr_cli.pde.iterate_parts as iterate_parts
from lsr_cli import Config
from lsr_cli.checkpoint import LoadedCheckpoint
from lsr_cli.cli.iterate import _iteration_line as iterate_cli_line
from lsr_cli.config import parse_config
from lsr_cli.data import read_data
from lsr_cli.distributed import SINGLE
from lsr_cli.errors import ConfigError
from lsr_cli.iterate_supervised import iterate_supervised
from lsr_cli.models import MLP
from lsr_cli.pde.iterate import gauss_newton_fit, iterate
from lsr_cli.pde.problem import parse_problem
from lsr_cli.pde.residual import true_residual
from lsr_cli.pde.validation import validation_problem

from .test_cli import assert_clean_failure, run

FIT_GAIN = 100.0  # a reachable target (another set of weights of the same net) must be fitted far better
ITERATE_GAIN = 10.0  # two iterations on a tiny, briefly trained regression network: at least one decade
PDE_GAIN = 5.0  # two iterations on a 2-16-1 PINN with 8 fit steps each (measured: 9.9x)


def _teacher_problem(hidden: list[int], rows: int) -> tuple[MLP, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    net = MLP(2, 1, hidden=hidden).double().eval()
    teacher = copy.deepcopy(net)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1), dtype=p.dtype))
    x = torch.rand(rows, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        target = teacher(x).reshape(-1)
    return net, x, target


@pytest.mark.parametrize("rank", [200, 40])  # the whole space (exact SVD) and a sketched subspace
def test_gauss_newton_fit_reaches_a_reachable_target(rank):
    net, x, target = _teacher_problem([10, 10], 300)  # 151 parameters
    with torch.no_grad():
        before = torch.linalg.norm(net(x).reshape(-1) - target)
    cfg = Config()
    cfg.iterate.gauss_newton_steps = 20
    cfg.iterate.gauss_newton_rank = rank
    steps = gauss_newton_fit(net, x, target, cfg, torch.Generator().manual_seed(3))
    with torch.no_grad():
        after = torch.linalg.norm(net(x).reshape(-1) - target)
    assert steps >= 1
    assert after < before / FIT_GAIN


def test_gauss_newton_fit_never_increases_the_misfit():
    torch.manual_seed(0)
    net = MLP(1, 1, hidden=[6]).double().eval()
    x = torch.linspace(-1, 1, 50, dtype=torch.float64)[:, None]
    target = torch.sign(x).reshape(-1)  # not representable: only decreases are accepted
    with torch.no_grad():
        before = torch.linalg.norm(net(x).reshape(-1) - target)
    cfg = Config()
    cfg.iterate.gauss_newton_steps = 5
    cfg.iterate.gauss_newton_rank = 10
    gauss_newton_fit(net, x, target, cfg, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.linalg.norm(net(x).reshape(-1) - target) <= before


# -- the PDE loop: a tiny Poisson PINN on generated points ----------------------------------------

PDE: dict[str, Any] = {
    "equation": "poisson",
    "variables": ["x", "y"],
    "domain": {"x": [0, 1], "y": [0, 1]},
    "coefficients": {"source": "2*pi**2*sin(pi*x)*sin(pi*y)"},
    "blocks": [
        {"name": "interior", "kind": "pde", "points": {"sample": "sobol", "count": 120}},
        {"name": "walls", "kind": "dirichlet", "value": 0, "weight": 4, "points": {"sample": "sobol", "count": 40}},
    ],
}


def _pinn() -> MLP:
    """A 2-16-1 tanh network after a few Adam steps on the Poisson problem (float64)."""
    torch.manual_seed(0)
    net = MLP(2, 1, hidden=[16]).double()
    problem = parse_problem(PDE, None, torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(100):
        opt.zero_grad()
        f = torch.cat([b.residual(net, b.inputs).reshape(-1) for b in problem.blocks])
        (f * f).mean().backward()
        opt.step()
    return net.eval()


def _run_pde(net: MLP, **iterate_keys: Any) -> tuple[Any, Config]:
    cfg = Config()
    cfg.device = "cpu"
    cfg.lsr.rank = [8, 16, 24]
    cfg.iterate.iterations = 2
    cfg.iterate.gauss_newton_steps = 8
    cfg.iterate.gauss_newton_rank = 40
    for k, v in iterate_keys.items():
        setattr(cfg.iterate, k, v)
    problem = parse_problem(PDE, None, torch.Generator().manual_seed(cfg.seed))
    ckpt = LoadedCheckpoint(Path("pinn.pt"), "state_dict", copy.deepcopy(net))
    return iterate(ckpt, problem, cfg), cfg


def _validation_loss(module: torch.nn.Module, cfg: Config) -> float:
    problem = parse_problem(PDE, None, torch.Generator().manual_seed(cfg.seed))
    val, _ = validation_problem(problem, cfg.seed)
    assert val is not None
    val.to(torch.device("cpu"), torch.float64)
    return float(true_residual(module, val).square().mean())


def test_iterate_keeps_what_lowers_the_validation_residual_and_is_deterministic():
    net = _pinn()
    result, cfg = _run_pde(net)
    again, _ = _run_pde(net)
    start = _validation_loss(net, cfg)
    kept = _validation_loss(result.module, cfg)
    assert result.status == "improved"
    assert kept < start / PDE_GAIN
    assert kept == pytest.approx(result.selection["kept"], rel=1e-9)  # chosen on the validation points
    assert result.selection["start"] == pytest.approx(start, rel=1e-9)
    assert "validation points" in result.selection["criterion"]
    best = start
    for e in result.history:  # an iteration is kept exactly when it lowered the best value so far
        assert e["criterion"]["kept"] == (e["criterion"]["value"] < best)
        if e["criterion"]["kept"]:
            best = e["criterion"]["value"]
    for (name, a), (_, b) in zip(result.module.state_dict().items(), again.module.state_dict().items(), strict=True):
        assert torch.equal(a, b), name  # the same seed gives the same network


def test_a_diverging_step_is_rejected_and_never_kept(monkeypatch):
    def diverge(module: torch.nn.Module, *args: Any, **kwargs: Any) -> int:
        with torch.no_grad():
            for p in module.parameters():
                p.mul_(1e3)
        return 1

    monkeypatch.setattr(iterate_module, "gauss_newton_fit", diverge)
    net = _pinn()
    result, _ = _run_pde(net, patience=2, physics=False)
    assert result.status == "unchanged"
    assert result.best_iteration == -1
    assert [e["criterion"]["kept"] for e in result.history] == [False, False]
    assert "did not fall for 2 iterations" in result.stop_reason
    for (name, a), (_, b) in zip(result.module.state_dict().items(), net.state_dict().items(), strict=True):
        assert torch.equal(a, b), name  # the start is what is written


def test_iterate_select_accepts_validation_and_names_the_choices():
    assert Config().iterate.select == "validation"
    assert parse_config({"iterate": {"select": "residual"}}).iterate.select == "residual"
    with pytest.raises(ConfigError, match=r"config.iterate.select: expected validation, distance or residual"):
        parse_config({"iterate": {"select": "best"}})


def test_iterate_stops_at_its_time_limit_and_writes_the_best_so_far():
    net = _pinn()
    result, _ = _run_pde(net, iterations=5, time_limit=1e-9)  # no budget: the fit stops before its first step
    assert len(result.history) == 1
    assert result.history[0]["alignment"]["gauss_newton_steps"] == 0
    assert result.stop_reason.startswith("iterate.time_limit (1e-09 s): the time left is below")
    assert result.status == "unchanged"
    for (name, a), (_, b) in zip(result.module.state_dict().items(), net.state_dict().items(), strict=True):
        assert torch.equal(a, b), name  # nothing was kept: the start is what is written


def test_a_step_that_raises_the_validation_residual_is_chosen_again_on_the_validation_points(monkeypatch):
    calls: list[bool] = []

    def first_raises(module: torch.nn.Module, space: Any, dz: Any, val: Any, comm: Any = None) -> float:
        calls.append(dz is not None)
        return math.inf if len(calls) == 1 else 0.0  # the held-out rows' choice raises it, the second lowers it

    monkeypatch.setattr(iterate_parts, "predictor_validation_loss", first_raises)
    result, _ = _run_pde(_pinn(), iterations=1)
    guard = result.history[0]["guard"]
    assert len(calls) == 2 and guard["loss_after_first_choice"] == math.inf
    assert guard["outcome"].endswith("chosen on the validation points")
    assert result.history[0]["rank"] > 0


def test_iterate_stops_when_no_lsr_step_lowers_the_validation_residual(monkeypatch):
    monkeypatch.setattr(iterate_parts, "predictor_validation_loss", lambda *args, **kwargs: math.inf)
    net = _pinn()
    result, _ = _run_pde(net, iterations=3, physics=False)
    assert len(result.history) == 1 and result.history[0]["rank"] == 0
    assert result.history[0]["guard"]["outcome"] == "no step lowered the validation loss"
    assert result.stop_reason.startswith("no LSR step lowered the residual at the validation points")
    assert result.status == "unchanged"
    for (name, a), (_, b) in zip(result.module.state_dict().items(), net.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_a_weak_lsr_iteration_is_followed_by_a_physics_pass_kept_on_the_validation_points(monkeypatch):
    # no LSR step lowers the validation residual: the physics pass (LM on the network's own
    # residual) takes over and is kept only where it lowers the validation residual
    monkeypatch.setattr(iterate_parts, "predictor_validation_loss", lambda *args, **kwargs: math.inf)
    net = _pinn()
    result, cfg = _run_pde(net, iterations=3)
    steps = [e["step"] for e in result.history]
    assert steps[0] == "lsr" and result.history[0]["rank"] == 0
    assert steps[1] == "physics"
    start = _validation_loss(net, cfg)
    p = result.history[1]["physics"]
    assert p["monitor_start"] == pytest.approx(start, rel=1e-9)
    assert p["steps"] >= 1 and 0 <= p["kept_step"] <= p["steps"]
    # the pass leaves the weights of its lowest validation residual, which its trace records
    assert p["monitor_best"] == min([start] + [t["monitor"] for t in p["trace"]])
    assert result.history[1]["criterion"]["value"] == pytest.approx(p["monitor_best"], rel=1e-9)
    assert result.history[1]["criterion"]["kept"] == (p["monitor_best"] < start)
    assert result.status == "improved" and _validation_loss(result.module, cfg) < start
    assert "physics pass" in iterate_cli_line(result.history[1])


def test_physics_pass_stops_after_its_patience_and_restores_the_best_step(monkeypatch):
    import lsr_cli.pde.iterate_physics as physics

    net = _pinn()
    cfg = Config()
    cfg.iterate.gauss_newton_steps = 30
    cfg.iterate.gauss_newton_rank = 40
    problem = parse_problem(PDE, None, torch.Generator().manual_seed(cfg.seed))
    val, _ = validation_problem(problem, cfg.seed)
    assert val is not None
    values = iter([1.0, 0.5, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6])  # best after step 1
    monkeypatch.setattr(physics, "global_mean_square", lambda *args, **kwargs: next(values))
    states: list[dict[str, torch.Tensor]] = []
    monkeypatch.setattr(
        physics, "true_residual", lambda module, *a, **k: states.append(copy.deepcopy(module.state_dict())) or None
    )
    info = physics.physics_pass(net, problem, val, cfg, torch.Generator().manual_seed(0))
    assert info["steps"] == 1 + physics.PATIENCE and info["kept_step"] == 1 and info["monitor_best"] == 0.5
    for name, value in net.state_dict().items():  # the weights after step 1, not after the last step
        assert torch.equal(value, states[1][name]), name


def test_physics_pass_fresh_points_are_seeded_new_every_pass_and_disjoint_from_the_fit_points():
    cfg = Config()
    cfg.device = "cpu"
    problem = parse_problem(PDE, None, torch.Generator().manual_seed(cfg.seed))
    val, _ = validation_problem(problem, cfg.seed)
    first, again, second = (iterate_parts.fresh_points(problem, cfg, SINGLE, k)[0] for k in (1, 1, 2))
    assert first is not None and again is not None and second is not None and val is not None
    for a, b, c, fit, v in zip(first.blocks, again.blocks, second.blocks, problem.blocks, val.blocks, strict=True):
        assert torch.equal(a.points, b.points)  # seeded: the same pass draws the same points
        assert a.points.shape[0] == fit.points.shape[0]  # as many as the block's fit points
        for other in (c.points, fit.points, v.points):  # new in every pass, never a fit or validation point
            assert torch.cdist(a.points.double(), other.double()).min() > 0


def test_physics_pass_draws_its_points_where_the_network_residual_is_largest():
    from .test_adaptive import HOT, HotSpot

    cfg = Config()
    spec = {**PDE, "coefficients": {"source": "0"}}  # the residual is −Δu: it peaks at HOT
    problem = parse_problem(spec, None, torch.Generator().manual_seed(cfg.seed))
    val, _ = validation_problem(problem, cfg.seed)
    uniform, none = iterate_parts.fresh_points(problem, cfg, SINGLE, 1)  # no module: uniform points only
    assert none == {} and uniform is not None and val is not None
    fresh, drawn = iterate_parts.fresh_points(problem, cfg, SINGLE, 1, HotSpot())
    again, _ = iterate_parts.fresh_points(problem, cfg, SINGLE, 1, HotSpot())
    assert fresh is not None and again is not None
    n = problem.blocks[0].num_global
    assert drawn == {"interior": n}  # pde blocks only; the walls get their uniform points
    assert [b.name for b in fresh.blocks] == [b.name for b in uniform.blocks]  # in place, as many
    new = fresh.blocks[0]
    assert new.points.shape[0] == n and new.weight == uniform.blocks[0].weight
    assert torch.equal(new.points, again.blocks[0].points)  # seeded
    for other in (problem.blocks[0].points, val.blocks[0].points):  # never a fit or validation point
        assert torch.cdist(new.points.double(), other.double()).min() > 0
    near = lambda p: float(((p - HOT).norm(dim=1) < 0.15).double().mean())  # noqa: E731
    assert near(new.points) > 1.5 * near(uniform.blocks[0].points)  # half the sampling mass follows |r|
    mag = lambda b: float(b.residual(HotSpot(), b.inputs).abs().mean())  # noqa: E731
    assert mag(new) > 1.5 * mag(uniform.blocks[0])
    for b, u in zip(fresh.blocks[1:], uniform.blocks[1:], strict=True):  # the faces keep their drawn points
        assert torch.equal(b.points, u.points) and b.weight == u.weight
    cfg.iterate.physics_points = "uniform"
    plain, none = iterate_parts.fresh_points(problem, cfg, SINGLE, 1, HotSpot())
    assert none == {} and plain is not None
    assert all(torch.equal(p.points, u.points) for p, u in zip(plain.blocks, uniform.blocks, strict=True))


def test_iterate_physics_points_is_adaptive_or_uniform():
    assert Config().iterate.physics_points == "adaptive"
    assert parse_config({"iterate": {"physics_points": "uniform"}}).iterate.physics_points == "uniform"
    with pytest.raises(ConfigError) as exc:
        parse_config({"iterate": {"physics_points": "rad"}})
    assert str(exc.value).startswith("config.iterate.physics_points: expected adaptive or uniform")
    assert "\n" not in str(exc.value)


def test_iterate_physics_is_a_boolean_key():
    assert Config().iterate.physics is True
    assert parse_config({"iterate": {"physics": False}}).iterate.physics is False
    with pytest.raises(ConfigError, match=r"iterate.physics"):
        parse_config({"iterate": {"physics": "yes"}})


def test_iterate_time_limit_parses_durations_and_names_a_bad_value():
    assert Config().iterate.time_limit == 540.0
    assert parse_config({"iterate": {"time_limit": "2min"}}).iterate.time_limit == 120.0
    assert parse_config({"iterate": {"time_limit": None}}).iterate.time_limit is None
    with pytest.raises(ConfigError, match=r"config.iterate.time_limit: expected seconds or a duration"):
        parse_config({"iterate": {"time_limit": "soon"}})


# -- supervised data (no `pde:` section) ----------------------------------------------------------


def _regression_files(root: Path) -> dict[str, Path]:
    """A smooth 2-D target, train/val/test splits, and a 2-10-10-1 network briefly trained by Adam."""
    rng = np.random.default_rng(0)

    def target(x: np.ndarray) -> np.ndarray:
        return (np.sin(2 * x[:, :1]) * np.cos(x[:, 1:2]) + 0.5 * x[:, :1] * x[:, 1:2]).astype(np.float64)

    splits = {name: rng.uniform(-1, 1, size=(n, 2)) for name, n in (("train", 300), ("val", 100), ("test", 200))}
    with h5py.File(root / "reg.h5", "w") as f:
        for name, x in splits.items():
            f.create_dataset(f"{name}/inputs", data=x)
            f.create_dataset(f"{name}/targets", data=target(x))
    torch.manual_seed(0)
    net = MLP(2, 1, hidden=[10, 10])
    x = torch.tensor(splits["train"], dtype=torch.float32)
    y = torch.tensor(target(splits["train"]), dtype=torch.float32)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        ((net(x) - y) ** 2).mean().backward()
        opt.step()
    torch.save(net.state_dict(), root / "reg_sd.pt")
    cfg = {
        "model": {"factory": "mlp", "kwargs": {"in_features": 2, "out_features": 1, "hidden": [10, 10]}},
        "data": {"path": "reg.h5"},
        "lsr": {"rank": [16, 48, 96]},
        "iterate": {"iterations": 2, "gauss_newton_steps": 8, "gauss_newton_rank": 60},
        "device": "cpu",
    }
    (root / "reg.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return {"data": root / "reg.h5", "checkpoint": root / "reg_sd.pt", "config": root / "reg.yaml"}


def test_iterate_supervised_improves_on_the_val_split_and_is_deterministic(tmp_path):
    files = _regression_files(tmp_path)
    cfg = parse_config(yaml.safe_load(files["config"].read_text()))
    splits = read_data(files["data"], cfg.data, torch.float64)
    net = MLP(2, 1, hidden=[10, 10])
    net.load_state_dict(torch.load(files["checkpoint"], weights_only=True))
    results = [
        iterate_supervised(LoadedCheckpoint(files["checkpoint"], "state_dict", copy.deepcopy(net)), splits, cfg)
        for _ in range(2)
    ]
    result = results[0]
    assert result.status == "improved"
    test = result.errors["test"]
    assert test["after"]["rel_l2"] < test["before"]["rel_l2"] / ITERATE_GAIN
    assert result.selection["kept"] < result.selection["start"]
    assert "val split" in result.selection["criterion"]
    for (name, a), (_, b) in zip(
        result.module.state_dict().items(), results[1].module.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_cli_iterate_on_supervised_data_writes_a_plain_network(tmp_path):
    files = _regression_files(tmp_path)
    out, report = tmp_path / "it.pt", tmp_path / "it.json"
    result = run("iterate", files["checkpoint"], "--config", files["config"], "--out", out, "--report", report)
    assert result.exit_code == 0, result.output
    net = MLP(2, 1, hidden=[10, 10])
    net.load_state_dict(torch.load(out, weights_only=True))  # the input's format: a state dict of the same net
    assert next(net.parameters()).dtype == torch.float32
    import json

    rep = json.loads(report.read_text())
    assert rep["splits"]["test"]["after"]["rel_l2"] < rep["splits"]["test"]["before"]["rel_l2"]
    with h5py.File(files["data"]) as f:
        x, y = torch.tensor(f["test/inputs"][()]), torch.tensor(f["test/targets"][()])
    with torch.no_grad():
        err = float(torch.linalg.norm(net(x.float()).double() - y) / torch.linalg.norm(y))
    assert math.isclose(err, rep["splits"]["test"]["after"]["rel_l2"], rel_tol=1e-3)  # float32 cast


def test_cli_iterate_without_pde_or_data_is_a_one_line_error(tmp_path):
    files = _regression_files(tmp_path)
    plain = tmp_path / "plain.yaml"
    plain.write_text("device: cpu\n")
    result = run("iterate", files["checkpoint"], "--config", plain)
    assert_clean_failure(result, ConfigError.exit_code, ["pde:", "data.path"], [])


# -- systems (several outputs) and unknown constants ----------------------------------------------

SYSTEM_GAIN = 50.0
"""Two iterations on the briefly trained 2-10-10-2 network of the first-order system
u_x − v_y = 0, u_y + v_x = 0 (solution e^z): at least this gain in the reference error of each
output and in the unknown constant's error (measured: 338×, u 300×, v 377×; k 0.1 → 1.5e-5)."""

SYSTEM_ITERATE = {"iterations": 2, "gauss_newton_steps": 8, "gauss_newton_rank": 200}


def _system_files(root: Path, unknown: bool) -> dict[str, Path]:
    """The fixtures of tests/test_systems_distributed.py with a short `iterate:` section."""
    from .test_systems_distributed import _make_files

    files = _make_files(root, unknown)
    raw = yaml.safe_load(files["config"].read_text(encoding="utf-8"))
    raw["iterate"] = dict(SYSTEM_ITERATE)
    raw["lsr"] = {"rank": [16, 32, 64]}
    files["config"].write_text(yaml.safe_dump(raw), encoding="utf-8")
    return files


def _run_system(files: dict[str, Path]) -> Any:
    from lsr_cli.checkpoint import load_checkpoint

    cfg = parse_config(yaml.safe_load(files["config"].read_text(encoding="utf-8")))
    assert cfg.pde is not None
    problem = parse_problem(cfg.pde, files["data"], torch.Generator().manual_seed(cfg.seed), files["dir"])
    return iterate(load_checkpoint(files["checkpoint"], cfg.model, files["dir"]), problem, cfg)


def test_iterate_fits_every_output_of_a_system_and_is_deterministic(tmp_path):
    files = _system_files(tmp_path, unknown=False)
    result = _run_system(files)
    again = _run_system(files)
    assert result.status == "improved"
    ref = result.errors["reference"]
    assert ref["after"]["rel_l2"] < ref["before"]["rel_l2"] / SYSTEM_GAIN
    comps = result.errors["components"]
    assert set(comps) == {"u", "v"}
    for name in ("u", "v"):  # both outputs are fitted, not the first alone
        assert comps[name]["after"]["rel_l2"] < comps[name]["before"]["rel_l2"] / SYSTEM_GAIN
    assert not result.unknowns
    for (name, a), (_, b) in zip(result.module.state_dict().items(), again.module.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_cli_iterate_refines_an_unknown_constant_and_records_it(tmp_path):
    import json

    from lsr_cli.cli import ITERATE_METADATA

    files = _system_files(tmp_path, unknown=True)  # k: guess 0.9, true 1
    out, report = tmp_path / "it.pt", tmp_path / "it.json"
    result = run("iterate", files["checkpoint"], "--config", files["config"], "--out", out, "--report", report)
    assert result.exit_code == 0, result.output
    rep = json.loads(report.read_text())
    k = rep["unknowns"]["k"]
    assert k["before"] == 0.9 and k["true"] == 1.0 and k["linearized"]
    assert k["abs_error_after"] < k["abs_error_before"] / SYSTEM_GAIN  # moved toward the true value
    kept = [e for e in rep["iterations"] if e["criterion"]["kept"]]
    assert kept and kept[-1]["unknowns"]["k"] == k["after"]  # the kept iteration's value is the one reported
    assert "k 0.9 -> " in rep["message"]
    extra = {ITERATE_METADATA: ""}
    net = torch.jit.load(str(out), _extra_files=extra)  # the network alone: two outputs
    assert json.loads(extra[ITERATE_METADATA])["unknowns"] == {"k": k["after"]}
    assert net(torch.zeros(3, 2, dtype=torch.float64)).shape == (3, 2)
    # --resume cannot restore an unknown that lives only in the config
    again = run(
        "iterate", files["checkpoint"], "--config", files["config"], "--out", out, "--report", report, "--resume"
    )
    assert_clean_failure(again, ConfigError.exit_code, ["config.pde.unknowns.k", "--resume"], [])


def test_iterate_lbfgs_pass_with_several_outputs_is_a_config_error(tmp_path):
    files = _system_files(tmp_path, unknown=False)
    raw = yaml.safe_load(files["config"].read_text(encoding="utf-8"))
    raw["iterate"]["lbfgs_iterations"] = 5
    files["config"].write_text(yaml.safe_dump(raw), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"config.iterate.lbfgs_iterations: the pseudo-time L-BFGS pass needs one"):
        _run_system(files)


def test_the_lbfgs_pass_stops_at_its_time_limit(monkeypatch):
    import types

    iterate_fit = sys.modules["lsr_cli.pde.iterate_fit"]
    net = _pinn()
    cfg = Config()
    cfg.iterate.lbfgs_iterations = 50
    problem = parse_problem(PDE, None, torch.Generator().manual_seed(cfg.seed))
    with torch.no_grad():  # targets a little off the network: L-BFGS has work to do
        targets = [net(x).reshape(-1) + 0.01 for x in iterate_parts.fit_points(problem)]
    clock = iter(range(1000))  # one "second" per look at the clock: t0 = 0, then 1, 2, …
    monkeypatch.setattr(iterate_fit, "time", types.SimpleNamespace(perf_counter=lambda: float(next(clock))))
    start = copy.deepcopy(net.state_dict())
    evaluations, loss, stopped = iterate_fit.align(net, problem, targets, cfg, SINGLE, time_limit=3.5)
    assert stopped and evaluations == 3 and math.isfinite(loss)  # the 4th evaluation is past the limit
    assert any(not torch.equal(v, start[k]) for k, v in net.state_dict().items())  # it did step
    free = _pinn()
    evaluations, _, stopped = iterate_fit.align(free, problem, targets, cfg, SINGLE)  # no limit
    assert not stopped and evaluations > 3


def test_an_lbfgs_pass_without_time_for_one_evaluation_is_not_kept():
    fit_network = sys.modules["lsr_cli.pde.iterate"]._fit_network
    net = _pinn()
    cfg = Config()
    cfg.iterate.lbfgs_iterations = 50
    cfg.iterate.gauss_newton_steps = 0
    problem = parse_problem(PDE, None, torch.Generator().manual_seed(cfg.seed))
    with torch.no_grad():
        targets = [net(x).reshape(-1) + 0.01 for x in iterate_parts.fit_points(problem)]
    start = copy.deepcopy(net.state_dict())
    gen = torch.Generator().manual_seed(0)
    alignment = fit_network(net, net, problem, targets, cfg, gen, SINGLE, [], 0.0)
    assert alignment["lbfgs_evaluations"] == 0 and alignment["lbfgs_stopped_at_time_limit"]
    assert alignment["lbfgs_kept"] is False
    assert all(torch.equal(v, start[k]) for k, v in net.state_dict().items())
    alignment = fit_network(net, net, problem, targets, cfg, gen, SINGLE, [], math.inf)
    assert alignment["lbfgs_evaluations"] > 0 and alignment["lbfgs_kept"] is True
