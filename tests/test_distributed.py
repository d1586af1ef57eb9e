"""``lsr refine`` on several processes (torchrun, Gloo on CPU) gives the single-process result.

Each distributed run is a real ``torchrun --standalone`` job of 1, 2 or 3 worker processes
(3 where the rows do not divide evenly); the refined predictor must equal the single-process
one to round-off. Also the pieces: contiguous shards, TSQR against Householder QR, merged QR
triangles, and a failure on one rank that ends every rank with one error line and no output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lsr_cli.distributed import SINGLE, launch_command, local_rows, orthonormalize, shard_range
from lsr_cli.solve import QRAccumulator

from .conftest import make_regression_h5
from .test_cli import run
from .test_cli_pde import _pinn, pinn, write_config  # noqa: F401  (fixtures)
from .test_subspace_newton import burgers_raw, moving_front, rough_pinn

EQUAL_ATOL = 1e-10
"""Distributed vs single-process predictions (float64): only the order of the sums differs."""

RANKS = "8,16,32"


def _torchrun(nproc: int, *args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = launch_command(nproc, [str(a) for a in args])
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=240)


def _lsr(*args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "lsr_cli", *[str(a) for a in args]]
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=240)


def _delta(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=False)["delta"]


def _max_delta_diff(a: Path, b: Path) -> float:
    da, db = _delta(a), _delta(b)
    assert set(da) == set(db)
    return max(float((da[k] - db[k]).abs().max()) for k in da)


# --------------------------------------------------------------------------------------------
# pieces
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "world"), [(10, 3), (9, 3), (7, 2), (5, 5), (400, 3)])
def test_shards_are_contiguous_and_balanced(n, world):
    ranges = [shard_range(n, r, world) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    sizes = [e - s for s, e in ranges]
    assert max(sizes) - min(sizes) <= 1


def test_local_rows_keep_order_and_shift():
    rows = torch.tensor([9, 2, 5, 3, 7])
    assert local_rows(rows, 3, 8).tolist() == [2, 0, 4]


class _FakeComm:
    """A communicator over in-memory "ranks" (for the algebra, without processes)."""

    def __init__(self, parts: list[torch.Tensor], rank: int) -> None:
        self.parts, self.rank, self.world = parts, rank, len(parts)

    def allgather(self, t: torch.Tensor) -> list[torch.Tensor]:
        if t.dtype == torch.int64:
            return [torch.tensor([p.shape[0]]) for p in self.parts]
        return [torch.linalg.qr(p, mode="reduced").R for p in self.parts]


def test_tsqr_spans_the_range_of_the_stacked_blocks():
    gen = torch.Generator().manual_seed(0)
    Y = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    parts = [Y[s:e] for s, e in (shard_range(40, r, 3) for r in range(3))]
    Q = torch.cat([orthonormalize(p, _FakeComm(parts, r)) for r, p in enumerate(parts)])  # type: ignore[arg-type]
    assert torch.allclose(Q.T @ Q, torch.eye(6, dtype=torch.float64), atol=1e-13)
    assert torch.allclose(Q @ (Q.T @ Y), Y, atol=1e-12)
    assert torch.equal(orthonormalize(Y, SINGLE), torch.linalg.qr(Y, mode="reduced").Q)


def test_merged_triangles_give_the_qr_of_all_rows():
    gen = torch.Generator().manual_seed(1)
    A, f = torch.randn(30, 4, generator=gen, dtype=torch.float64), torch.randn(30, generator=gen, dtype=torch.float64)
    whole = QRAccumulator(4)
    whole.add(A, f)
    merged = QRAccumulator(4)
    for s, e in (shard_range(30, r, 3) for r in range(3)):
        part = QRAccumulator(4)
        part.add(A[s:e], f[s:e])
        merged = merged.merge(part)
    assert merged.n == 30
    assert torch.allclose(merged.R_aug.abs(), whole.R_aug.abs(), atol=1e-12)


# --------------------------------------------------------------------------------------------
# end to end: distributed = single process
# --------------------------------------------------------------------------------------------


@pytest.fixture
def regression_noval(regression_files):
    """The fixture's model with a file without a validation split (400 samples: 3 does not divide)."""
    path = make_regression_h5(regression_files["dir"] / "noval.h5", n_val=0)
    return {**regression_files, "noval": path}


@pytest.mark.slow
@pytest.mark.parametrize(("which", "nproc"), [("data", 2), ("data", 3), ("noval", 1), ("noval", 3)])
def test_regression_matches_single_process(regression_noval, which, nproc):
    files = regression_noval
    d = files["dir"]
    args = ["refine", files["state_dict"], "-c", files["config"], "-d", files[which], "--rank", RANKS, "-q"]
    single = run(*args, "--out", d / "single.pt")
    assert single.exit_code == 0, single.output
    if nproc == 1:  # through torchrun itself (one worker): the process-group path with world = 1
        proc = _torchrun(1, *args, "--out", d / "dist.pt")
    else:
        proc = _lsr(*args, "--out", d / "dist.pt", "--nproc", nproc)
    assert proc.returncode == 0, proc.stderr
    diff = _max_delta_diff(d / "single.pt", d / "dist.pt")
    assert diff < EQUAL_ATOL, diff
    if nproc == 1:
        assert diff == 0.0  # world = 1 runs the single-process arithmetic
    rep_single = json.loads((d / "single.report.json").read_text())
    rep = json.loads((d / "dist.report.json").read_text())
    assert rep["rank"] == rep_single["rank"]
    assert rep["selection_metric"] == rep_single["selection_metric"]
    assert rep["selection_metric"] == ("val_loss" if which == "data" else "holdout_loss")
    assert rep["num_residuals"] == rep_single["num_residuals"]
    for split, errs in rep_single["splits"].items():
        assert rep["splits"][split]["after"]["rel_l2"] == pytest.approx(errs["after"]["rel_l2"], rel=1e-8)
    dist = rep["distributed"]
    assert dist["world_size"] == nproc and dist["backend"] == "gloo"
    assert [r["rank"] for r in dist["ranks"]] == list(range(nproc))
    assert sum(r["rows"] for r in dist["ranks"]) == 400
    assert all(r["peak_memory_above_start_bytes"] is not None and r["wall_seconds"] > 0 for r in dist["ranks"])
    assert "distributed" not in rep_single


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 3])
def test_pinn_matches_single_process(pinn, nproc):  # noqa: F811
    d = pinn["dir"]
    cfg = write_config(d / "pde.yaml", {"lsr": {"rank": [16, 48, 96]}})
    args = ["refine", pinn["torchscript"], "--config", cfg, "-q"]
    single = run(*args, "--out", d / "single.pt")
    assert single.exit_code == 0, single.output
    proc = _lsr(*args, "--out", d / "dist.pt", "--nproc", nproc)
    assert proc.returncode == 0, proc.stderr
    x = torch.rand(200, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        a = torch.jit.load(str(d / "single.pt"))(x)
        b = torch.jit.load(str(d / "dist.pt"))(x)
    assert float((a - b).abs().max()) < EQUAL_ATOL
    rep_single = json.loads((d / "single.report.json").read_text())
    rep = json.loads((d / "dist.report.json").read_text())
    assert rep["rank"] == rep_single["rank"] and rep["selection_metric"] == "holdout_loss"
    assert rep["num_residuals"] == rep_single["num_residuals"] == 380
    ref, ref_single = rep["splits"]["reference"]["after"], rep_single["splits"]["reference"]["after"]
    assert ref["rel_l2"] == pytest.approx(ref_single["rel_l2"], rel=1e-8)
    for block, losses in rep_single["residual_blocks"].items():
        assert rep["residual_blocks"][block]["before"] == pytest.approx(losses["before"], rel=1e-10)
    assert rep["distributed"]["world_size"] == nproc


# --------------------------------------------------------------------------------------------
# the default configurations: the path that runs, and its result, do not depend on N
# --------------------------------------------------------------------------------------------

PATH_FIELDS = ("jacobian.path", "jacobian.basis", "selection_metric", "rank", "nonlinear.ran")

DEFAULT_PATH_RTOL = {"val": 1e-9, "holdout": 1e-8, "linear_pde": 1e-9, "nonlinear_pde": 1e-8}
"""Relative difference of the predictions (N ranks against one process, float64). Only the order
of sums differs, but the defaults choose ranks at or near the numerical rank of an
ill-conditioned Jacobian (cond 6e10 on the val case, 1.7e12 on the linear PDE), where the
single-process result itself moves with the BLAS thread count: measured between 1 and 2
threads, 1.8e-10 (val), 1.6e-9 (holdout), 8e-11 (linear PDE), 2.0e-9 (Burgers, after 13
Levenberg-Marquardt steps). The distributed results lie within that spread (measured
0.9-1.0e-10, 1.1-1.4e-9, 1.0-2.2e-10, 3.0e-9); the tolerances leave a few times it."""


def _field(rep: dict, dotted: str) -> object:
    for key in dotted.split("."):
        rep = rep.get(key) if isinstance(rep, dict) else None  # type: ignore[assignment]
    return rep


@pytest.fixture(scope="session")
def _burgers_pinn(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A rough Burgers PINN (moving tanh front) and a config naming only generated points."""
    from lsr_cli.pde.problem import parse_problem

    root = tmp_path_factory.mktemp("burgers_dist")
    raw = burgers_raw()
    raw["blocks"] = raw["blocks"][:3]
    raw["blocks"][0]["points"]["count"] = 300
    problem = parse_problem(raw, None, torch.Generator().manual_seed(0))
    problem.to(torch.device("cpu"), torch.float64)
    net = rough_pinn(problem, steps=200)
    torch.save(net.state_dict(), root / "net.pt")
    x, t = torch.meshgrid(
        torch.linspace(-1, 1, 41, dtype=torch.float64), torch.linspace(0, 1, 11, dtype=torch.float64), indexing="ij"
    )
    X = torch.stack([x.reshape(-1), t.reshape(-1)], dim=1)
    import h5py

    with h5py.File(root / "ref.h5", "w") as f:
        f.create_dataset("reference/inputs", data=X.numpy())
        f.create_dataset("reference/values", data=moving_front(X)[:, None].numpy())
    cfg = {
        "model": {"factory": "mlp", "kwargs": {"hidden": [8, 8]}},
        "data": {"path": "ref.h5"},
        "pde": raw,
        "device": "cpu",
    }
    import yaml

    (root / "burgers.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return {"state_dict": root / "net.pt", "config": root / "burgers.yaml", "data": root / "ref.h5", "dir": root}


def _predict_refined(path: Path, x: torch.Tensor) -> torch.Tensor:
    from lsr_cli import load_refined

    with torch.no_grad():
        return load_refined(path)(x).double()


def _default_case(case: str, regression_noval: dict, pinn: dict, burgers: dict) -> tuple[list[object], torch.Tensor]:  # noqa: F811
    """The ``lsr refine`` arguments (no --out) of a default-configuration case, and points to compare at."""
    if case in ("val", "holdout"):
        d = regression_noval
        data = d["data"] if case == "val" else d["noval"]
        cfg = d["dir"] / "default.yaml"
        cfg.write_text("device: cpu\nseed: 3\n")  # nothing else configured: every lsr default
        x = torch.rand(300, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 2 - 1
        return ["refine", d["torchscript"], "-c", cfg, "-d", data, "-q"], x
    if case == "linear_pde":
        cfg = write_config(pinn["dir"] / "default.yaml", {"lsr": {}})
        x = torch.rand(300, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        return ["refine", pinn["torchscript"], "--config", cfg, "-q"], x
    x = torch.rand(300, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x[:, 0] = 2 * x[:, 0] - 1
    return ["refine", burgers["state_dict"], "--config", burgers["config"], "-q"], x


@pytest.mark.slow
@pytest.mark.parametrize("case", ["val", "holdout", "linear_pde", "nonlinear_pde"])
def test_default_paths_match_single_process(case, regression_noval, pinn, _burgers_pinn, tmp_path):  # noqa: F811
    args, x = _default_case(case, regression_noval, pinn, _burgers_pinn)
    single = run(*args, "--out", tmp_path / "n1.pt")
    assert single.exit_code == 0, single.output
    rep1 = json.loads((tmp_path / "n1.report.json").read_text())
    expected = {
        "val": ("spectral", "val_loss"),
        "holdout": (None, "holdout_loss"),
        "linear_pde": ("spectral", "gcv"),
        "nonlinear_pde": (None, "holdout_loss"),
    }[case]
    assert (rep1["rounds"][0].get("path"), rep1["selection_metric"]) == expected  # the default path we mean to test
    if case == "nonlinear_pde":
        assert rep1["nonlinear"]["ran"] is True
    p1 = _predict_refined(tmp_path / "n1.pt", x)
    for nproc in (2, 3):
        out = tmp_path / f"n{nproc}.pt"
        proc = _lsr(*args, "--out", out, "--nproc", nproc)
        assert proc.returncode == 0, proc.stderr
        rep = json.loads(out.with_suffix(".report.json").read_text())
        for name in PATH_FIELDS:
            assert _field(rep, name) == _field(rep1, name), (nproc, name)
        assert [r.get("path") for r in rep["rounds"]] == [r.get("path") for r in rep1["rounds"]]
        diff = float((_predict_refined(out, x) - p1).norm() / p1.norm())
        assert diff < DEFAULT_PATH_RTOL[case], (nproc, diff)


ITERATE_RTOL = 1e-8
"""``lsr iterate`` on N processes vs one: relative difference of the written weights."""

ITERATE_SETTINGS = {
    "iterations": 2,
    "lbfgs_iterations": 10,
    "gauss_newton_steps": 3,
    "gauss_newton_rank": 40,
    "save_dtype": "float64",  # the network as refined (the input's float32 would hide the differences)
    "select": "distance",  # kept when the fit moves the network towards the predictor: weights to compare
}


def _max_relative_weight_diff(a: Path, b: Path) -> float:
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert set(sa) == set(sb)
    num = max(float((sa[k] - sb[k]).abs().max()) for k in sa)
    return num / max(float(v.abs().max()) for v in sa.values())


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 3])
def test_iterate_matches_single_process(pinn, nproc):  # noqa: F811
    d = pinn["dir"]
    cfg = write_config(d / "it.yaml", {"iterate": ITERATE_SETTINGS, "lsr": {}})  # lsr defaults: the spectral step
    args = ["iterate", pinn["state_dict"], "--config", cfg, "-q"]
    single = run(*args, "--out", d / "single.pt")
    assert single.exit_code == 0, single.output
    proc = _lsr(*args, "--out", d / "dist.pt", "--nproc", nproc)
    assert proc.returncode == 0, proc.stderr
    diff = _max_relative_weight_diff(d / "single.pt", d / "dist.pt")
    assert diff < ITERATE_RTOL, diff
    rep_single = json.loads((d / "single.report.json").read_text())
    rep = json.loads((d / "dist.report.json").read_text())
    assert rep["best_iteration"] == rep_single["best_iteration"] >= 0
    assert rep["num_residuals"] == rep_single["num_residuals"] == 380
    for e, e_single in zip(rep["iterations"], rep_single["iterations"], strict=True):
        assert e["rank"] == e_single["rank"]
        assert e["nonlinear"].get("ran") == e_single["nonlinear"].get("ran")
        assert e["alignment"]["gauss_newton_steps"] == e_single["alignment"]["gauss_newton_steps"]
        assert e["alignment"]["lbfgs_evaluations"] == e_single["alignment"]["lbfgs_evaluations"]
        assert e["alignment"]["lbfgs_kept"] == e_single["alignment"]["lbfgs_kept"]
        assert e["residual_loss"]["network"] == pytest.approx(e_single["residual_loss"]["network"], rel=1e-6)
    ref, ref_single = rep["splits"]["reference"]["after"], rep_single["splits"]["reference"]["after"]
    assert ref["rel_l2"] == pytest.approx(ref_single["rel_l2"], rel=1e-6)
    dist = rep["distributed"]
    assert dist["world_size"] == nproc and dist["backend"] == "gloo"
    assert sum(r["rows"] for r in dist["ranks"]) == 380
    assert "distributed" not in rep_single
    if nproc == 3:
        return
    # --resume on several processes continues from the written network and report
    proc = _lsr(*args, "--out", d / "dist.pt", "--iterations", 1, "--resume", "--nproc", 2)
    assert proc.returncode == 0, proc.stderr
    rep = json.loads((d / "dist.report.json").read_text())
    assert [e["iteration"] for e in rep["iterations"]] == [0, 1, 2]


# --------------------------------------------------------------------------------------------
# failures
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_failure_on_one_rank_ends_every_rank_and_writes_nothing(regression_files):
    d = regression_files["dir"]
    out = d / "out" / "r.pt"
    args = ["refine", regression_files["state_dict"], "-c", regression_files["config"], "-d"]
    args += [regression_files["data"], "--rank", "8", "--out", out]
    proc = _lsr(*args, "--nproc", 2, env={"LSR_INJECT_FAILURE": "1:sketch"})
    assert proc.returncode == 5, proc.stderr  # NumericalError's exit code, from the failing rank
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert errors == ["error: rank 1 of 2: injected failure at stage 'sketch' (LSR_INJECT_FAILURE=1:sketch)"], lines
    assert not any("Traceback" in ln for ln in lines), lines
    assert not out.exists() and not (d / "out").exists()


@pytest.mark.slow
def test_iterate_failure_on_one_rank_ends_every_rank_and_writes_nothing(pinn):  # noqa: F811
    d = pinn["dir"]
    out = d / "out" / "it.pt"
    args = ["iterate", pinn["state_dict"], "--config", pinn["config"], "--out", out, "--nproc", 2]
    proc = _lsr(*args, env={"LSR_INJECT_FAILURE": "1:sketch"})
    assert proc.returncode == 5, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert errors == ["error: rank 1 of 2: injected failure at stage 'sketch' (LSR_INJECT_FAILURE=1:sketch)"]
    assert "Traceback" not in proc.stderr
    assert not out.exists() and not (d / "out").exists()


def test_nproc_is_validated(regression_files):
    result = run("refine", regression_files["state_dict"], "-d", regression_files["data"], "--nproc", "0")
    assert result.exit_code == 2
    assert "--nproc: must be at least 1, got 0" in result.stderr


def test_instances_refuses_several_processes(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("device: cpu\n")
    result = run("instances", "--config", cfg)
    assert result.exit_code == 2
    assert "lsr instances does not run on several processes yet" in result.stderr


@pytest.mark.slow
def test_relative_loss_matches_single_process(regression_files):
    """``lsr.loss: relative`` on two processes: the weights' scale is summed over both ranks' samples."""
    files = regression_files
    d = files["dir"]
    cfg = d / "relative.yaml"
    cfg.write_text(files["config"].read_text().replace("lsr:\n", "lsr:\n  loss: relative\n"))
    args = ["refine", files["state_dict"], "-c", cfg, "-d", files["data"], "--rank", RANKS, "-q"]
    single = run(*args, "--out", d / "single.pt")
    assert single.exit_code == 0, single.output
    proc = _lsr(*args, "--out", d / "dist.pt", "--nproc", 2)
    assert proc.returncode == 0, proc.stderr
    assert _max_delta_diff(d / "single.pt", d / "dist.pt") < EQUAL_ATOL
    rep_single = json.loads((d / "single.report.json").read_text())
    rep = json.loads((d / "dist.report.json").read_text())
    assert rep_single["loss"]["kind"] == "relative"
    for key in ("scale", "train_weight_min", "train_weight_max"):
        assert rep["loss"][key] == pytest.approx(rep_single["loss"][key], rel=1e-12), key
    assert rep["rank"] == rep_single["rank"]
