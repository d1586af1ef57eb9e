"""Systems (several outputs) and unknown constants on several processes, and in ``lsr instances``.

``lsr refine --nproc 2`` (a real ``torchrun --standalone`` job of two Gloo workers) must give the
single-process result: the same refined predictions and unknowns to round-off, the same path.
The problems are tiny first-order systems on the unit square, ``u_x − k v_y = 0``,
``u_y + k v_x = 0`` (the Cauchy–Riemann equations for ``k = 1``, solved by ``u + i v = e^z``),
with ``k`` a known constant or an unknown one recovered from observations of ``u``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
import yaml
from torch import Tensor

from lsr_cli.models import MLP
from lsr_cli.pde import parse_problem

from .test_cli import assert_clean_failure, listing, run
from .test_distributed import PATH_FIELDS, _field, _lsr, _predict_refined

F64 = torch.float64

SYSTEM_RTOL = 1e-8
"""Relative difference of the refined predictions and unknowns, two processes against one
(float64). Only the order of sums differs (merged QR triangles, all-reduced norms), but the
default paths choose ranks by GCV or held-out rows near the numerical rank of an
ill-conditioned Jacobian, where the single-process result itself moves by 1e-10 to 2e-9 with
the BLAS thread count (docs/distributed.md); the same tolerance as ``DEFAULT_PATH_RTOL``."""

RESIDUAL = 'return {"a": F.d("u", "x") - c["k"] * F.d("v", "y"), "b": F.d("u", "y") + c["k"] * F.d("v", "x")}'


POLE = (-0.12, 0.5)
"""``u + i v = 1 / (z − z0)`` with ``z0`` just left of the square: steep near ``x = 0``, so that
few collocation points leave the validation loss far above the fit loss (adaptive rounds run)."""
POLE_VALUES = {
    "u": f"(x - ({POLE[0]}))/((x - ({POLE[0]}))**2 + (y - {POLE[1]})**2)",
    "v": f"-(y - {POLE[1]})/((x - ({POLE[0]}))**2 + (y - {POLE[1]})**2)",
}


def _exact(X: np.ndarray, pole: bool = False) -> np.ndarray:
    """``u + i v = e^{x + i y}`` (or ``1 / (z − z0)``): ``[N, 2]``."""
    if pole:
        dx, dy = X[:, 0] - POLE[0], X[:, 1] - POLE[1]
        return np.stack([dx, -dy], axis=1) / (dx**2 + dy**2)[:, None]
    return np.stack([np.exp(X[:, 0]) * np.cos(X[:, 1]), np.exp(X[:, 0]) * np.sin(X[:, 1])], axis=1)


def _problem(unknown: bool, adaptive: str, weights: str, pole: bool = False) -> dict[str, Any]:
    """The system on ``[0, 1]²`` with ``u, v`` given on the walls; ``k`` known (1) or unknown
    (guess 0.9, true 1, with 40 noise-free observations of ``u``)."""
    blocks: list[dict[str, Any]] = [
        {"name": "interior", "points": {"sample": "sobol", "count": 80 if pole else 160}},
        {
            "name": "walls",
            "kind": "dirichlet",
            "component": ["u", "v"],
            "value": POLE_VALUES if pole else {"u": "exp(x)*cos(y)", "v": "exp(x)*sin(y)"},
            "weight": 10,
            "points": {"sample": "sobol", "count": 60},
        },
    ]
    raw: dict[str, Any] = {
        "equation": "res.py:residual",
        "variables": ["x", "y"],
        "outputs": ["u", "v"],
        "domain": {"x": [0, 1], "y": [0, 1]},
        "adaptive": adaptive,
        "weights": weights,
        "blocks": blocks,
    }
    if unknown:
        raw["unknowns"] = {"k": {"initial": 0.9, "true": 1.0}}
        blocks.append(
            {
                "name": "observed",
                "kind": "data",
                "component": "u",
                "values": "/observations/values",
                "points": {"dataset": "/observations/inputs"},
            }
        )
    else:
        raw["coefficients"] = {"k": 1.0}
    return raw


def _make_files(
    root: Path, unknown: bool, adaptive: str = "auto", weights: str = "config", pole: bool = False
) -> dict[str, Path]:
    """A briefly Adam-trained 2-10-10-2 network (TorchScript, trained with ``k = 1``), its data
    file and config."""
    (root / "res.py").write_text(f"def residual(F, c):\n    {RESIDUAL}\n", encoding="utf-8")
    g = np.linspace(0, 1, 11)
    x_ref = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    x_obs = np.random.default_rng(1).uniform(0.1, 0.9, size=(40, 2))
    with h5py.File(root / "cr.h5", "w") as f:
        f["reference/inputs"] = x_ref
        f["reference/values"] = _exact(x_ref, pole)
        f["observations/inputs"] = x_obs
        f["observations/values"] = _exact(x_obs, pole)[:, :1]
    raw = _problem(unknown, adaptive, weights, pole)
    train = {k: v for k, v in raw.items() if k != "unknowns"} | {"coefficients": {"k": 1.0}}
    problem = parse_problem(train, root / "cr.h5", torch.Generator().manual_seed(0), root)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = MLP(2, 2, hidden=[10, 10]).double()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        loss = sum(torch.sum(b.residual(net, b.inputs) ** 2) for b in problem.blocks) / problem.num_rows
        loss.backward()  # type: ignore[union-attr]
        opt.step()
    torch.jit.script(net.eval()).save(str(root / "cr_ts.pt"))
    cfg = {"model": {"checkpoint": "cr_ts.pt"}, "data": {"path": "cr.h5"}, "pde": raw, "device": "cpu", "seed": 0}
    (root / "cr.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return {"checkpoint": root / "cr_ts.pt", "config": root / "cr.yaml", "data": root / "cr.h5", "dir": root}


def _compare(files: dict[str, Path], tmp_path: Path) -> tuple[dict[str, Any], dict[str, Any], float]:
    """Refine on one process and on two; both reports and the predictions' relative difference."""
    args = ["refine", files["checkpoint"], "--config", files["config"], "-q"]
    single = run(*args, "--out", tmp_path / "n1.pt")
    assert single.exit_code == 0, single.output
    proc = _lsr(*args, "--out", tmp_path / "n2.pt", "--nproc", 2)
    assert proc.returncode == 0, proc.stderr
    rep1 = json.loads((tmp_path / "n1.report.json").read_text())
    rep2 = json.loads((tmp_path / "n2.report.json").read_text())
    for name in PATH_FIELDS:
        assert _field(rep2, name) == _field(rep1, name), name
    assert [r.get("path") for r in rep2["rounds"]] == [r.get("path") for r in rep1["rounds"]]
    assert rep2["num_residuals"] == rep1["num_residuals"]
    assert set(rep2["residual_blocks"]) == set(rep1["residual_blocks"])
    assert rep2["distributed"]["world_size"] == 2
    guard = [(r["validation"].get("guard") or {}).get("outcome") for r in (rep1, rep2)]
    assert guard[0] == guard[1], guard
    assert sum(r["rows"] for r in rep2["distributed"]["ranks"]) == rep1["num_residuals"]  # every row on one rank
    x = torch.rand(200, 2, generator=torch.Generator().manual_seed(5), dtype=F64)
    p1, p2 = _predict_refined(tmp_path / "n1.pt", x), _predict_refined(tmp_path / "n2.pt", x)
    assert p1.shape == (200, 2)
    return rep1, rep2, float((p2 - p1).norm() / p1.norm())


@pytest.mark.slow
def test_system_on_two_processes_matches_one(tmp_path):
    """Two outputs, four row groups, ``pde.weights: auto``, no adaptive collocation."""
    files = _make_files(tmp_path, unknown=False, adaptive="none", weights="auto")
    rep1, rep2, diff = _compare(files, tmp_path)
    assert set(rep1["residual_blocks"]) == {"interior.a", "interior.b", "walls.u", "walls.v"}
    assert diff < SYSTEM_RTOL, diff
    assert rep1["residual_loss"]["weights"]["mode"] == "auto"
    for name, w in rep1["residual_loss"]["weights"]["weights"].items():
        assert rep2["residual_loss"]["weights"]["weights"][name] == pytest.approx(w, rel=SYSTEM_RTOL)
    for name, errs in rep1["components"].items():
        after = rep2["components"][name]["after"]["rel_l2"]  # moves by at most the predictions' difference
        assert after == pytest.approx(errs["after"]["rel_l2"], rel=0, abs=SYSTEM_RTOL), name
        assert errs["after"]["rel_l2"] < errs["before"]["rel_l2"], name


@pytest.mark.slow
def test_unknown_constant_on_two_processes_matches_one(tmp_path):
    """``k`` from observations of ``u`` (guess 0.9, true 1); adaptive collocation as by default."""
    files = _make_files(tmp_path, unknown=True)
    rep1, rep2, diff = _compare(files, tmp_path)
    assert diff < SYSTEM_RTOL, diff
    w1, w2 = rep1["unknowns"]["k"], rep2["unknowns"]["k"]
    assert w1["linearized"] and w2["linearized"]
    assert w1["rel_error_after"] < w1["rel_error_before"]
    assert abs(w2["after"] - w1["after"]) <= SYSTEM_RTOL * abs(w1["after"]), (w1["after"], w2["after"])
    assert (rep1["validation"].get("adaptive") is None) == (rep2["validation"].get("adaptive") is None)
    meta = [json.loads(torch.jit.load(str(tmp_path / f"n{k}.pt")).lsr_metadata)["unknowns"] for k in (1, 2)]
    assert math.isclose(meta[0]["k"], meta[1]["k"], rel_tol=SYSTEM_RTOL)


@pytest.mark.slow
def test_adaptive_collocation_on_two_processes_matches_one(tmp_path):
    """A steep solution and few points: an adaptive round adds points to the row groups of a
    system on both runs alike (the new points sharded over the ranks)."""
    files = _make_files(tmp_path, unknown=False, pole=True)
    rep1, rep2, diff = _compare(files, tmp_path)
    a1, a2 = rep1["validation"]["adaptive"], rep2["validation"]["adaptive"]
    assert len(a1["rounds"]) >= 2  # at least one round of added points ran
    assert [r["points_added"] for r in a2["rounds"]] == [r["points_added"] for r in a1["rounds"]]
    assert [r.get("rank") for r in a2["rounds"]] == [r.get("rank") for r in a1["rounds"]]
    assert (a2["kept_round"], a2["stop_reason"]) == (a1["kept_round"], a1["stop_reason"])
    assert diff < SYSTEM_RTOL, diff


LV_START = {"x": 1.0, "y": 0.5}


def _make_ode_files(root: Path, ode_points: int = 40) -> dict[str, Path]:
    """Lotka–Volterra (``x' = x − x y``, ``y' = x y − y``) on ``t ∈ [0, 1]`` with
    ``x(0) = 1``, ``y(0) = 0.5``: the initial condition is one point per component (the blocks
    ``start.x`` and ``start.y``, fewer points than processes). A 1-10-10-2 network briefly
    Adam-trained on the problem (TorchScript), and its config."""
    raw: dict[str, Any] = {
        "equation": "lotka_volterra",
        "variables": ["t"],
        "outputs": ["x", "y"],
        "domain": {"t": [0, 1]},
        "adaptive": "none",
        "blocks": [
            {"name": "ode", "points": {"sample": "sobol", "count": ode_points}},
            {
                "name": "start",
                "kind": "initial",
                "component": ["x", "y"],
                "value": LV_START,
                "weight": 10,
                "points": {"sample": "grid", "count": 1},
            },
        ],
    }
    problem = parse_problem(raw, None, torch.Generator().manual_seed(0), root)
    counts = {b.name: b.points.shape[0] for b in problem.blocks}
    assert counts == {"ode.x": ode_points, "ode.y": ode_points, "start.x": 1, "start.y": 1}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = MLP(1, 2, hidden=[10, 10]).double()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(100):
        opt.zero_grad()
        loss = sum(torch.sum(b.residual(net, b.inputs) ** 2) for b in problem.blocks) / problem.num_rows
        loss.backward()  # type: ignore[union-attr]
        opt.step()
    torch.jit.script(net.eval()).save(str(root / "lv_ts.pt"))
    cfg = {"model": {"checkpoint": "lv_ts.pt"}, "pde": raw, "device": "cpu", "seed": 0}
    (root / "lv.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return {"checkpoint": root / "lv_ts.pt", "config": root / "lv.yaml", "dir": root}


@pytest.mark.slow
@pytest.mark.parametrize(("ode_points", "rows"), [(40, [42, 40]), (1, [4, 0])], ids=["shared", "rank_without_points"])
def test_one_point_initial_condition_on_two_processes_matches_one(tmp_path, ode_points, rows):
    """A block with fewer points than processes (one initial point per component) sits on the
    first rank, the other ranks holding an empty share of it: the result is one process's. With
    one point per equation too, rank 1 holds no point at all."""
    files = _make_ode_files(tmp_path, ode_points)
    args = ["refine", files["checkpoint"], "--config", files["config"], "-q"]
    single = run(*args, "--out", tmp_path / "n1.pt")
    assert single.exit_code == 0, single.output
    proc = _lsr(*args, "--out", tmp_path / "n2.pt", "--nproc", 2)
    assert proc.returncode == 0, proc.stderr
    rep1 = json.loads((tmp_path / "n1.report.json").read_text())
    rep2 = json.loads((tmp_path / "n2.report.json").read_text())
    for name in PATH_FIELDS:
        assert _field(rep2, name) == _field(rep1, name), name
    assert rep2["distributed"]["world_size"] == 2
    assert [r["rows"] for r in rep2["distributed"]["ranks"]] == rows  # start.x, start.y on rank 0
    assert rep2["num_residuals"] == rep1["num_residuals"] == sum(rows)
    for name in ("start.x", "start.y", "ode.x", "ode.y"):
        for when in ("before", "after"):
            b1, b2 = rep1["residual_blocks"][name][when], rep2["residual_blocks"][name][when]
            assert b2 == pytest.approx(b1, rel=SYSTEM_RTOL, abs=1e-14), (name, when)
    x = torch.linspace(0, 1, 101, dtype=F64)[:, None]
    p1, p2 = _predict_refined(tmp_path / "n1.pt", x), _predict_refined(tmp_path / "n2.pt", x)
    assert p1.shape == (101, 2)
    diff = float((p2 - p1).norm() / p1.norm())
    assert diff < SYSTEM_RTOL, diff
    start = _predict_refined(tmp_path / "n2.pt", torch.zeros(1, 1, dtype=F64))[0]
    x0 = torch.tensor([LV_START["x"], LV_START["y"]], dtype=F64)
    before = float((net_at_zero(files["checkpoint"]) - x0).norm())
    assert float((start - x0).norm()) < before  # the refinement fitted the one-point blocks too


def net_at_zero(checkpoint: Path) -> Tensor:
    """The trained network's ``(x, y)`` at ``t = 0``."""
    with torch.no_grad():
        return torch.jit.load(str(checkpoint))(torch.zeros(1, 1, dtype=F64))[0]


def test_blocks_with_fewer_points_than_processes_are_sharded_to_the_first_ranks(tmp_path):
    """One-point blocks (an initial condition per component) on two processes: rank 0 holds the
    point, rank 1 an empty share (its global position kept for the row maps)."""
    (tmp_path / "res.py").write_text(f"def residual(F, c):\n    {RESIDUAL}\n", encoding="utf-8")
    raw = _problem(unknown=False, adaptive="none", weights="config")
    raw["blocks"][1]["points"] = {"sample": "sobol", "count": 1}
    shares = []
    for rank in (0, 1):
        problem = parse_problem(raw, None, torch.Generator().manual_seed(0), tmp_path).shard(rank, 2)
        shares.append({b.name: (b.points.shape[0], b.first_point, b.num_global) for b in problem.blocks})
        walls = next(b for b in problem.blocks if b.name == "walls.u")
        assert walls.residual(lambda x: x[:, :2], walls.inputs).shape == (shares[-1]["walls.u"][0],)
    assert shares[0]["walls.u"] == shares[0]["walls.v"] == (1, 0, 1)
    assert shares[1]["walls.u"] == shares[1]["walls.v"] == (0, 1, 1)
    assert shares[0]["interior.a"] == (80, 0, 160) and shares[1]["interior.a"] == (80, 80, 160)


# --------------------------------------------------------------------------------------------
# lsr instances with several outputs and per-instance unknowns
# --------------------------------------------------------------------------------------------

PI_MODEL = '''
import torch
from torch import Tensor, nn


class TwoOutputDeepONet(nn.Module):
    """branch [B, m], trunk [B, 1] -> [B, 2]: one DeepONet per output column."""

    def __init__(self, sensors: int = 12, width: int = 16, basis: int = 8):
        super().__init__()
        self.basis = basis
        self.branch = nn.Sequential(nn.Linear(sensors, width), nn.Tanh(), nn.Linear(width, 2 * basis))
        self.trunk = nn.Sequential(nn.Linear(1, width), nn.Tanh(), nn.Linear(width, basis), nn.Tanh())

    def forward(self, s: Tensor, x: Tensor) -> Tensor:
        b = self.branch(s).reshape(s.shape[0], 2, self.basis)
        return (b * self.trunk(x)[:, None, :]).sum(-1)


def make():
    return TwoOutputDeepONet()
'''
N_INSTANCES = 4
K_TRUE = 2.0


def _write_instances(root: Path, unknown: bool) -> dict[str, Path]:
    """``u' = s_i``, ``v' = k s_i`` with ``u(0) = v(0) = 0`` per instance (``s_i`` a cosine
    series); ``k = 2`` known, or unknown (guess 1.5) with ``v`` observed at 10 points."""
    (root / "pimodel.py").write_text(PI_MODEL, encoding="utf-8")
    (root / "res.py").write_text(
        'def residual(F, c):\n    return {"a": F.d("u", "x") - c["src"], "b": F.d("v", "x") - c["k"] * c["src"]}\n',
        encoding="utf-8",
    )
    rng = np.random.default_rng(0)
    a, k = rng.normal(size=(N_INSTANCES, 3)), np.arange(1, 4) * np.pi
    xc, xr, xo = np.linspace(0, 1, 40)[:, None], np.linspace(0, 1, 50)[:, None], np.linspace(0.1, 0.9, 10)[:, None]

    def s(x: np.ndarray) -> np.ndarray:
        return a @ np.cos(k[:, None] * x.reshape(1, -1))

    def u(x: np.ndarray) -> np.ndarray:
        return a @ (np.sin(k[:, None] * x.reshape(1, -1)) / k[:, None])

    with h5py.File(root / "two.h5", "w") as f:
        f["collocation/interior"] = xc
        f["collocation/origin"] = np.zeros((1, 1))
        f["collocation/observed"] = xo
        f["instances/branch"] = s(np.linspace(0, 1, 12))
        f["instances/source"] = s(xc)
        f["instances/observed_v"] = K_TRUE * u(xo)
        f["instances/reference"] = np.stack([u(xr), K_TRUE * u(xr)], axis=-1)  # [N, Q, 2]
        f["reference/inputs"] = xr
    torch.manual_seed(0)
    import importlib.util

    spec = importlib.util.spec_from_file_location("pimodel_two", root / "pimodel.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.save(mod.make().state_dict(), root / "net.pt")
    blocks: list[dict[str, Any]] = [
        {"name": "interior", "points": {"dataset": "/collocation/interior"}},
        {
            "name": "origin",
            "kind": "dirichlet",
            "component": ["u", "v"],
            "value": 0,
            "weight": 10,
            "points": {"dataset": "/collocation/origin"},
        },
    ]
    pde: dict[str, Any] = {
        "equation": "res.py:residual",
        "variables": ["x"],
        "outputs": ["u", "v"],
        "domain": {"x": [0, 1]},
        "coefficients": {"src": {"instance": "source"}},
        "blocks": blocks,
    }
    if unknown:
        pde["unknowns"] = {"k": {"initial": 1.5, "true": K_TRUE}}
        blocks.append(
            {
                "name": "observed",
                "kind": "dirichlet",
                "component": "v",
                "value": {"instance": "observed_v"},
                "points": {"dataset": "/collocation/observed"},
            }
        )
    else:
        pde["coefficients"]["k"] = K_TRUE
    cfg = {
        "model": {"checkpoint": "net.pt", "factory": "pimodel.py:make"},
        "data": {"path": "two.h5"},
        "pde": pde,
        "instances": {"group": "/instances", "inputs": ["branch"], "reference": "reference"},
        "lsr": {"rank": [8, 16, 32]},
        "device": "cpu",
    }
    (root / "two.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return {"config": root / "two.yaml", "data": root / "two.h5", "dir": root}


@pytest.mark.parametrize("unknown", [False, True], ids=["system", "system_with_unknown"])
def test_instances_with_several_outputs(tmp_path, unknown):
    files = _write_instances(tmp_path, unknown)
    out = tmp_path / "preds.h5"
    result = run("instances", "--config", files["config"], "--out", out, "--json")
    assert result.exit_code == 0, result.output
    rep = json.loads(result.stdout)
    s = rep["summary"]
    assert s["num_instances"] == N_INSTANCES
    assert s["rel_l2_after"]["mean"] < 0.1 * s["rel_l2_before"]["mean"], s
    with h5py.File(out) as f, h5py.File(files["data"]) as d:
        after, exact = f["predictions/after"][()], d["instances/reference"][()]
        assert after.shape == exact.shape == (N_INSTANCES, 50, 2)
        # the stored predictions (both components) reproduce the reported per-instance errors
        errs = np.linalg.norm((after - exact).reshape(N_INSTANCES, -1), axis=1)
        errs /= np.linalg.norm(exact.reshape(N_INSTANCES, -1), axis=1)
        np.testing.assert_allclose(errs, f["instances/rel_l2_after"][()], rtol=1e-6, atol=1e-9)
        if unknown:
            k_after = f["unknowns/k/after"][()]
            assert np.all(f["unknowns/k/before"][()] == 1.5)
            assert np.all(np.abs(k_after - K_TRUE) < 0.1 * abs(1.5 - K_TRUE)), k_after
            assert [r["unknowns"]["k"] for r in rep["per_instance"]] == pytest.approx(k_after.tolist(), rel=1e-12)
            assert s["unknowns"]["k"]["after"]["mean"] == pytest.approx(float(k_after.mean()), rel=1e-12)
            assert "constants (mean over instances): k 1.5 -> " in rep["message"]
        else:
            assert "unknowns" not in f and "unknowns" not in s


def test_instances_reference_with_more_components_than_outputs_is_refused(tmp_path):
    files = _write_instances(tmp_path, unknown=False)
    with h5py.File(files["data"], "a") as f:
        ref = f["instances/reference"][()]
        del f["instances/reference"]
        f["instances/reference"] = np.concatenate([ref, ref[..., :1]], axis=-1)  # [N, Q, 3] for 2 outputs
    before = listing(tmp_path)
    out = tmp_path / "preds.h5"
    result = run("instances", "--config", files["config"], "--out", out)
    message = "/instances/reference: instance 0 has values (50, 3) for 50 points in /reference/inputs and 2 outputs"
    assert_clean_failure(result, 3, [message], [out], tmp_path, before)
