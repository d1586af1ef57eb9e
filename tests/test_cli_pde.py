"""`lsr refine` with a `pde:` config and `lsr iterate`, end to end through the CLI."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
import yaml

from lsr_cli.errors import CheckpointError, ConfigError, DataError
from lsr_cli.models import MLP
from lsr_cli.pde.fields import Fields

from .test_cli import assert_clean_failure, listing, run

SOURCE = "2*pi**2*sin(pi*x)*sin(pi*y)"
PROBLEM: dict[str, Any] = {
    "equation": "poisson",
    "variables": ["x", "y"],
    "domain": {"x": [0, 1], "y": [0, 1]},
    "coefficients": {"source": SOURCE},
    "blocks": [
        {"name": "interior", "kind": "pde", "points": {"dataset": "/collocation/interior"}},
        {"name": "walls", "kind": "dirichlet", "value": 0, "weight": 10, "points": {"sample": "sobol", "count": 80}},
    ],
}
RTOL = 1e-6


def exact(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(math.pi * x[:, :1]) * torch.sin(math.pi * x[:, 1:2])


@pytest.fixture(scope="session")
def _pinn(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A briefly Adam-trained PINN 2-12-12-1 for -Δu = 2π² sin(πx) sin(πy), and its data file."""
    root = tmp_path_factory.mktemp("pinn")
    rng = np.random.default_rng(0)
    interior = rng.uniform(0, 1, size=(300, 2))
    g = np.linspace(0, 1, 21)
    ref = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    with h5py.File(root / "pinn.h5", "w") as f:
        f.create_dataset("collocation/interior", data=interior)
        f.create_dataset("reference/inputs", data=ref)
        f.create_dataset("reference/values", data=exact(torch.tensor(ref)).numpy())
    torch.manual_seed(0)
    model = MLP(2, 1, hidden=[12, 12])
    x = torch.tensor(interior, dtype=torch.float32)
    xb = torch.rand(80, 2)
    xb[:40, 0] = torch.round(xb[:40, 0])
    xb[40:, 1] = torch.round(xb[40:, 1])
    f_src = (2 * math.pi**2 * exact(x.double())).float().reshape(-1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        res = -Fields(model, x, ["x", "y"]).laplacian() - f_src
        loss = torch.mean(res**2) + 10 * torch.mean(model(xb) ** 2)
        loss.backward()
        opt.step()
    torch.jit.script(model.eval()).save(str(root / "pinn_ts.pt"))
    torch.save(model.state_dict(), root / "pinn_sd.pt")
    return {"data": root / "pinn.h5", "torchscript": root / "pinn_ts.pt", "state_dict": root / "pinn_sd.pt"}


@pytest.fixture
def pinn(tmp_path: Path, _pinn: dict[str, Path]) -> dict[str, Path]:
    out = {k: tmp_path / v.name for k, v in _pinn.items()}
    for k, v in _pinn.items():
        shutil.copyfile(v, out[k])
    out["dir"] = tmp_path
    out["config"] = write_config(tmp_path / "pde.yaml", {})
    return out


def write_config(path: Path, changes: dict[str, Any], pde: dict[str, Any] | None = None) -> Path:
    cfg = {
        "model": {"factory": "mlp", "kwargs": {"hidden": [12, 12]}, "checkpoint": "pinn_ts.pt"},
        "data": {"path": "pinn.h5"},
        "pde": pde if pde is not None else PROBLEM,
        "lsr": {"rank": [16, 48, 96]},
        "iterate": {"iterations": 2, "lbfgs_iterations": 40},
        "device": "cpu",
        **changes,
    }
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def reference_error(pred: torch.Tensor, data: Path) -> float:
    with h5py.File(data) as f:
        y = torch.tensor(f["reference/values"][()])
    return float(torch.linalg.norm(pred.double().reshape(y.shape) - y) / torch.linalg.norm(y))


def reference_inputs(data: Path) -> torch.Tensor:
    with h5py.File(data) as f:
        return torch.tensor(f["reference/inputs"][()])


@pytest.mark.parametrize("kind", ["torchscript", "state_dict"])
def test_refine_on_physics_residual(pinn, kind):
    out, report = pinn["dir"] / "r.pt", pinn["dir"] / "r.json"
    result = run("refine", pinn[kind], "--config", pinn["config"], "--out", out, "--report", report)
    assert result.exit_code == 0, result.output
    rep = json.loads(report.read_text())
    ref = rep["splits"]["reference"]
    assert ref["after"]["rel_l2"] < ref["before"]["rel_l2"] / 10
    assert set(rep["residual_blocks"]) == {"interior", "walls"}
    assert rep["residual_loss"]["after"] < rep["residual_loss"]["before"]
    assert rep["data"]["blocks"]["walls"]["num_points"] == 80
    assert rep["rank_sweep"][0]["rank"] == 0
    if kind == "torchscript":
        refined = torch.jit.load(str(out))
        with torch.no_grad():
            pred = refined(reference_inputs(pinn["data"]))
    else:
        from lsr_cli import load_refined

        pred = load_refined(out)(reference_inputs(pinn["data"])).detach()
    assert reference_error(pred, pinn["data"]) == pytest.approx(ref["after"]["rel_l2"], rel=RTOL)


@pytest.mark.parametrize("kind", ["torchscript", "state_dict"])
def test_iterate_writes_a_plain_network_and_resumes(pinn, kind):
    out, report = pinn["dir"] / "it.pt", pinn["dir"] / "it.json"
    result = run("iterate", pinn[kind], "--config", pinn["config"], "--out", out, "--report", report)
    assert result.exit_code == 0, result.output
    rep = json.loads(report.read_text())
    assert [e["iteration"] for e in rep["iterations"]] == [0, 1]
    for key in ("rank", "residual_loss", "blocks", "reference_rel_l2", "alignment", "seconds"):
        assert key in rep["iterations"][0]
    ref = rep["splits"]["reference"]
    assert ref["after"]["rel_l2"] <= ref["before"]["rel_l2"]
    x = reference_inputs(pinn["data"])
    if kind == "torchscript":
        net = torch.jit.load(str(out))
        assert not hasattr(net, "lsr_format")  # a plain network, not a linearized predictor
    else:
        net = MLP(2, 1, hidden=[12, 12])
        net.load_state_dict(torch.load(out, weights_only=True))  # the user's own class loads it
    assert next(net.parameters()).dtype == torch.float32  # saved in the input's dtype
    with torch.no_grad():
        pred = net(x.float())
    assert reference_error(pred, pinn["data"]) == pytest.approx(ref["after"]["rel_l2"], rel=1e-3)  # float32 cast

    again = run(
        "iterate",
        pinn[kind],
        "--config",
        pinn["config"],
        "--out",
        out,
        "--report",
        report,
        "--resume",
        "--iterations",
        "1",
    )
    assert again.exit_code == 0, again.output
    rep2 = json.loads(report.read_text())
    assert [e["iteration"] for e in rep2["iterations"]] == [0, 1, 2]
    assert rep2["input"]["resumed_from"] == str(out)


def test_iterate_uses_model_checkpoint_from_config(pinn):
    result = run("iterate", "--config", pinn["config"], "--iterations", "1", "--json", "--out", pinn["dir"] / "o.pt")
    assert result.exit_code == 0, result.output
    rep = json.loads(result.stdout)
    assert rep["command"] == "iterate" and rep["input"]["checkpoint"].endswith("pinn_ts.pt")


def _bad_pde(**changes: Any) -> dict[str, Any]:
    pde = json.loads(json.dumps(PROBLEM))
    pde.update(changes)
    return pde


USER_OK = "def residual(F, c):\n    return -F.laplacian() - c['source']\n"
USER_IMPORT_FAILS = "raise RuntimeError('broken on purpose')\n"
USER_WRONG_SHAPE = "import torch\ndef residual(F, c):\n    return torch.zeros(2, 2)\n"


@pytest.mark.parametrize(
    "pde, files, code, needles",
    [
        (_bad_pde(equation="poison"), {}, ConfigError.exit_code, ["config.pde.equation", "did you mean 'poisson'"]),
        (_bad_pde(coefficients={"source": "sin(pi*q)"}), {}, ConfigError.exit_code, ["source", "'q'"]),
        (
            _bad_pde(variables=["x", "y", "z"], domain={"x": [0, 1], "y": [0, 1], "z": [0, 1]}),
            {},
            DataError.exit_code,
            ["/collocation/interior", "[N, 3]"],
        ),
        (
            _bad_pde(blocks=[{"name": "a", "kind": "wall", "points": {"sample": "sobol", "count": 4}}]),
            {},
            ConfigError.exit_code,
            ["config.pde.blocks[0].kind", "'wall'"],
        ),
        (
            _bad_pde(equation="user.py:residual"),
            {"user.py": USER_IMPORT_FAILS},
            ConfigError.exit_code,
            ["user.py", "RuntimeError", "broken on purpose"],
        ),
        (
            _bad_pde(equation="user.py:residual"),
            {"user.py": USER_WRONG_SHAPE},
            ConfigError.exit_code,
            ["block 'interior'", "one value per point"],
        ),
        (_bad_pde(equation="user.py:missing"), {"user.py": USER_OK}, ConfigError.exit_code, ["no callable 'missing'"]),
        (_bad_pde(reference="required"), {"drop_reference": ""}, DataError.exit_code, ["reference", "required"]),
    ],
)
def test_pde_bad_input_fails_cleanly(pinn, pde, files, code, needles):
    data = pinn["data"]
    for name, text in files.items():
        if name == "drop_reference":
            with h5py.File(data, "a") as f:
                del f["reference"]
        else:
            (pinn["dir"] / name).write_text(text, encoding="utf-8")
    cfg = write_config(pinn["dir"] / "bad.yaml", {}, pde)
    out, report = pinn["dir"] / "bad.pt", pinn["dir"] / "bad.json"
    before = listing(pinn["dir"])
    for command in ("refine", "iterate"):
        result = run(command, pinn["torchscript"], "--config", cfg, "--out", out, "--report", report)
        assert_clean_failure(result, code, needles, [out, report], pinn["dir"], before)


def test_points_that_do_not_fit_the_model(pinn):
    pde = _bad_pde(
        variables=["x", "y", "z"],
        domain={"x": [0, 1], "y": [0, 1], "z": [0, 1]},
        blocks=[{"name": "i", "kind": "pde", "points": {"sample": "sobol", "count": 16}}],
        coefficients={"source": 0},
    )
    cfg = write_config(pinn["dir"] / "dim.yaml", {"data": {"path": None}}, pde)
    result = run("refine", pinn["torchscript"], "--config", cfg, "--out", pinn["dir"] / "d.pt")
    assert_clean_failure(result, CheckpointError.exit_code, ["points of dimension 3"], [pinn["dir"] / "d.pt"])


def test_iterate_needs_pde_and_checkpoint(pinn):
    plain = pinn["dir"] / "plain.yaml"
    plain.write_text("device: cpu\n")
    result = run("iterate", pinn["torchscript"], "--config", plain)
    assert_clean_failure(result, ConfigError.exit_code, ["pde:"], [])
    no_ckpt = write_config(pinn["dir"] / "noc.yaml", {"model": {"factory": "mlp"}})
    result = run("iterate", "--config", no_ckpt)
    assert_clean_failure(result, ConfigError.exit_code, ["no checkpoint"], [])
    result = run("iterate", pinn["torchscript"], "--config", pinn["config"], "--resume", "--out", pinn["dir"] / "x.pt")
    assert_clean_failure(result, 6, ["--resume"], [pinn["dir"] / "x.pt"])


@pytest.mark.parametrize("kind", ["torchscript", "state_dict"])
def test_pde_refine_dense_equals_matrix_free(pinn, kind):
    reports = {}
    for path in ("dense", "matrix_free"):
        # the same basis on both paths (auto would take the exact residual basis on the dense one)
        cfg = write_config(
            pinn["dir"] / f"{path}.yaml",
            {"lsr": {"rank": [16, 48, 96], "jacobian": path}},
            pde={**PROBLEM, "basis": "output"},
        )
        out, report = pinn["dir"] / f"{path}.pt", pinn["dir"] / f"{path}.json"
        result = run("refine", pinn[kind], "--config", cfg, "--out", out, "--report", report)
        assert result.exit_code == 0, result.output
        reports[path] = json.loads(report.read_text())
    dense, free = reports["dense"], reports["matrix_free"]
    assert dense["jacobian"]["path"] == "dense" and free["jacobian"]["path"] == "matrix_free"
    assert dense["rank"] == free["rank"]
    for key in ("before", "after", "after_linearized"):
        assert dense["residual_loss"][key] == pytest.approx(free["residual_loss"][key], rel=1e-6)
    assert dense["splits"]["reference"]["after"]["rel_l2"] == pytest.approx(
        free["splits"]["reference"]["after"]["rel_l2"], rel=1e-6
    )
    # Poisson is linear: the refined predictor's own residual is the linearized one
    assert dense["residual_loss"]["after"] == pytest.approx(dense["residual_loss"]["after_linearized"], rel=1e-6)
