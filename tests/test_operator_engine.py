"""Engine support for operator networks: complex parameters, shared (Cartesian) inputs,
state dicts with non-tensor entries. Tiny float64 models written here, loaded through a
user factory file as a user's own model would be."""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

import h5py
import numpy as np
import pytest
import torch

from lsr_cli.linearization import JacobianOperator, ParameterSpace
from lsr_cli.linearized import load_refined
from lsr_cli.runtime import cast_module
from tests.test_cli import all_output, assert_clean_failure, assert_ok, rel_l2, run

ADJOINT_RTOL = 1e-12
FD_RTOL = 1e-7  # central differences in float64 with h = 1e-6: O(h²) truncation + O(eps/h) round-off

MODELS = textwrap.dedent(
    '''
    import torch
    from torch import Tensor, nn


    class Spectral1d(nn.Module):
        """[N, 1, L] -> [N, 1, L]: lift, one complex spectral layer plus a pointwise path, project."""

        def __init__(self, length: int = 16, width: int = 4, modes: int = 4):
            super().__init__()
            self.modes = modes
            self.length = length
            self.lift = nn.Conv1d(1, width, 1)
            self.spectral = nn.Parameter(0.3 * torch.randn(width, width, modes, dtype=torch.cfloat))
            self.pointwise = nn.Conv1d(width, width, 1)
            self.proj = nn.Conv1d(width, 1, 1)

        def forward(self, a: Tensor) -> Tensor:
            h = self.lift(a)
            hf = torch.fft.rfft(h, dim=-1)[:, :, : self.modes]
            mixed = torch.einsum("bim,iom->bom", hf, self.spectral)
            out_f = torch.zeros(h.shape[0], h.shape[1], self.length // 2 + 1, dtype=mixed.dtype, device=h.device)
            out_f[:, :, : self.modes] = mixed
            h = torch.tanh(torch.fft.irfft(out_f, n=self.length, dim=-1) + self.pointwise(h))
            return self.proj(h)


    class TinyDeepONet(nn.Module):
        """branch [B, m], trunk [P, 1] -> [B, P] (cartesian) or trunk [B, 1] -> [B, 1] (paired)."""

        def __init__(self, sensors: int = 8, basis: int = 6, cartesian: bool = True):
            super().__init__()
            self.cartesian = cartesian
            self.branch = nn.Sequential(nn.Linear(sensors, 12), nn.Tanh(), nn.Linear(12, basis))
            self.trunk = nn.Sequential(nn.Linear(1, 12), nn.Tanh(), nn.Linear(12, basis), nn.Tanh())
            self.bias = nn.Parameter(torch.zeros(1))

        def forward(self, u: Tensor, y: Tensor) -> Tensor:
            b = self.branch(u)
            t = self.trunk(y)
            if self.cartesian:
                return b @ t.T + self.bias
            return (b * t).sum(-1, keepdim=True) + self.bias


    def spectral(**kwargs):
        return Spectral1d(**kwargs)


    def deeponet(**kwargs):
        return TinyDeepONet(**kwargs)
    '''
)


def _models(tmp_path: Path) -> ModuleType:
    path = tmp_path / "opmodels.py"
    path.write_text(MODELS)
    spec = importlib.util.spec_from_file_location(f"opmodels_{abs(hash(str(path)))}", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _fit(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], y: torch.Tensor, steps: int = 300) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.mean((model(*inputs) - y) ** 2)
        loss.backward()
        opt.step()
    model.eval()


# --------------------------------------------------------------------------------------------
# complex parameters
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", [False, True])
def test_complex_parameters_are_linearized_as_real_pairs(tmp_path, script):
    mods = _models(tmp_path)
    torch.manual_seed(0)
    model = cast_module(mods.Spectral1d(), torch.float64, torch.device("cpu"))  # .double() keeps cfloat
    if script:
        model = torch.jit.script(model)
    x = torch.randn(5, 1, 16, dtype=torch.float64)
    named = {n: p.detach() for n, p in model.named_parameters()}
    space = ParameterSpace(named)
    assert space.num == sum(p.numel() * (2 if p.is_complex() else 1) for p in named.values())
    op = JacobianOperator(model, space, (x,), row_chunk=2, tangent_chunk=3)
    n, m = op.shape
    gen = torch.Generator().manual_seed(1)
    V = torch.randn(m, 4, dtype=torch.float64, generator=gen)
    U = torch.randn(n, 4, dtype=torch.float64, generator=gen)
    lhs, rhs = U.T @ op.matmat(V), op.rmatmat(U).T @ V
    assert torch.allclose(lhs, rhs, rtol=ADJOINT_RTOL, atol=ADJOINT_RTOL * float(lhs.abs().max()))

    # J v against central differences of θ0 + h·v, where v moves real and imaginary parts
    v = V[:, 0]
    step = space.unflatten_vector(v)
    assert step["spectral"].is_complex() and step["spectral"].imag.abs().max() > 0
    base = {k: p.detach().clone() for k, p in model.named_parameters()}
    h = 1e-6

    def out_at(scale: float) -> torch.Tensor:
        with torch.no_grad():
            for k, p in model.named_parameters():
                p.copy_(base[k] + scale * step[k])
            return model(x).reshape(-1).clone()

    fd = (out_at(h) - out_at(-h)) / (2 * h)
    out_at(0.0)
    jv = op.matvec(v)
    assert torch.allclose(jv, fd, rtol=0, atol=FD_RTOL * float(fd.abs().max()))
    # flatten inverts unflatten, complex blocks included
    back = space.flatten({k: t[None] for k, t in step.items()})[:, 0]
    assert torch.equal(back, v)


def _spectral_h5(path: Path, gen: np.random.Generator) -> Path:
    grid = np.linspace(0, 1, 16, endpoint=False)
    with h5py.File(path, "w") as f:
        for split, n in (("train", 60), ("val", 20), ("test", 20)):
            c = gen.normal(size=(n, 3))
            a = sum(c[:, i : i + 1] * np.sin(2 * np.pi * (i + 1) * grid) for i in range(3))
            u = np.cumsum(a, axis=1) / 16 + 0.3 * a**2
            g = f.create_group(split)
            g.create_dataset("inputs", data=a[:, None, :])
            g.create_dataset("targets", data=u[:, None, :])
    return path


@pytest.mark.parametrize("kind", ["torchscript", "state_dict"])
def test_refine_model_with_complex_weights_reloads_and_reproduces(tmp_path, kind):
    mods = _models(tmp_path)
    data = _spectral_h5(tmp_path / "spectral.h5", np.random.default_rng(0))
    with h5py.File(data) as f:
        a = torch.tensor(f["train/inputs"][()], dtype=torch.float32)
        u = torch.tensor(f["train/targets"][()], dtype=torch.float32)
        a_test = torch.tensor(f["test/inputs"][()], dtype=torch.float64)
        u_test = torch.tensor(f["test/targets"][()], dtype=torch.float64)
    torch.manual_seed(0)
    model = mods.Spectral1d()
    _fit(model, (a,), u)
    ckpt = tmp_path / f"{kind}.pt"
    if kind == "torchscript":
        torch.jit.script(model).save(str(ckpt))
    else:
        torch.save(model.state_dict(), ckpt)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model:\n  factory: {tmp_path / 'opmodels.py'}:spectral\nlsr:\n  rank: auto\n  start_rank: 64\n")
    out = tmp_path / "refined.pt"
    result = run("refine", ckpt, "--config", cfg, "--data", data, "--out", out, "--json", "--device", "cpu")
    assert_ok(result)
    report = json.loads(result.stdout)
    n_complex = 4 * 4 * 4
    n_real = sum(p.numel() for p in model.parameters() if not p.is_complex())
    assert report["num_parameters"] == n_real + 2 * n_complex
    test = report["splits"]["test"]
    assert test["after"]["rel_l2"] < 0.9 * test["before"]["rel_l2"], test

    if kind == "torchscript":
        refined = torch.jit.load(str(out))
        with torch.no_grad():
            pred = refined(a_test)
    else:
        with torch.no_grad():
            pred = load_refined(out)(a_test)
    assert rel_l2(pred, u_test) == pytest.approx(test["after"]["rel_l2"], rel=1e-6)
    # δ of the spectral weights is complex, with a non-zero imaginary part
    payload: Any = torch.jit.load(str(out)) if kind == "torchscript" else torch.load(out, weights_only=True)
    if kind == "state_dict":
        assert payload["delta"]["spectral"].is_complex()
        assert payload["delta"]["spectral"].imag.abs().max() > 0


# --------------------------------------------------------------------------------------------
# shared (Cartesian-product) inputs
# --------------------------------------------------------------------------------------------


def _operator_data(gen: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    sensors = np.linspace(0, 1, 8)
    points = np.linspace(0, 1, 10)[:, None]
    c = gen.normal(size=(n, 2))
    u = c[:, :1] * np.sin(np.pi * sensors) + c[:, 1:] * np.cos(np.pi * sensors)
    s = c[:, :1] * np.sin(np.pi * points.T) ** 2 + 0.5 * c[:, 1:] * points.T
    return u, points, s


def _write_operator_h5(path: Path, layout: str, seed: int = 0) -> Path:
    gen = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        for split, n in (("train", 40), ("val", 10), ("test", 10)):
            u, y, s = _operator_data(gen, n)
            g = f.create_group(split)
            inp = g.create_group("inputs")
            inp.attrs["order"] = ["u", "y"]
            if layout == "cartesian":
                inp.create_dataset("u", data=u)
                inp.create_dataset("y", data=y).attrs["shared"] = True
                g.create_dataset("targets", data=s)
            else:  # the same pairs, one row each, in the same (function, point) order
                P = y.shape[0]
                inp.create_dataset("u", data=np.repeat(u, P, axis=0))
                inp.create_dataset("y", data=np.tile(y, (n, 1)))
                g.create_dataset("targets", data=s.reshape(-1, 1))
    return path


def test_cartesian_layout_equals_paired_layout(tmp_path):
    mods = _models(tmp_path)
    torch.manual_seed(0)
    model = mods.TinyDeepONet(cartesian=True)
    gen = np.random.default_rng(0)
    u, y, s = _operator_data(gen, 40)
    _fit(model, (torch.tensor(u, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)), torch.tensor(s).float())
    torch.save(model.state_dict(), tmp_path / "don.pt")
    reports = {}
    for layout in ("cartesian", "paired"):
        data = _write_operator_h5(tmp_path / f"{layout}.h5", layout)
        cfg = tmp_path / f"{layout}.yaml"
        cfg.write_text(
            f"model:\n  factory: {tmp_path / 'opmodels.py'}:deeponet\n  kwargs: {{cartesian: {layout == 'cartesian'}}}\n"
            "lsr:\n  rank: [8, 16, 32]\n"
        )
        out = tmp_path / f"{layout}.refined.pt"
        result = run("refine", tmp_path / "don.pt", "--config", cfg, "--data", data, "--out", out, "--json")
        assert_ok(result)
        reports[layout] = json.loads(result.stdout)
    cart, pair = reports["cartesian"], reports["paired"]
    assert cart["num_residuals"] == pair["num_residuals"] == 400
    assert cart["rank"] == pair["rank"]
    for split in ("train", "val", "test"):
        for when in ("before", "after"):
            assert cart["splits"][split][when]["rel_l2"] == pytest.approx(
                pair["splits"][split][when]["rel_l2"], rel=1e-8
            )
    assert cart["splits"]["test"]["after"]["rel_l2"] < cart["splits"]["test"]["before"]["rel_l2"]
    # the refined Cartesian model reloads and takes the shared grid whole
    refined = load_refined(tmp_path / "cartesian.refined.pt")
    with h5py.File(tmp_path / "cartesian.h5") as f:
        ut = torch.tensor(f["test/inputs/u"][()])
        yt = torch.tensor(f["test/inputs/y"][()])
        st = torch.tensor(f["test/targets"][()])
    with torch.no_grad():
        assert rel_l2(refined(ut, yt), st) == pytest.approx(cart["splits"]["test"]["after"]["rel_l2"], rel=1e-8)


def test_all_inputs_shared_is_a_data_error(tmp_path):
    data = _write_operator_h5(tmp_path / "c.h5", "cartesian")
    with h5py.File(data, "a") as f:
        f["train/inputs/u"].attrs["shared"] = True
    mods = _models(tmp_path)
    torch.save(mods.TinyDeepONet().state_dict(), tmp_path / "don.pt")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model:\n  factory: {tmp_path / 'opmodels.py'}:deeponet\n")
    before = {p.name for p in tmp_path.iterdir()}
    result = run("refine", tmp_path / "don.pt", "--config", cfg, "--data", data, "--out", tmp_path / "o.pt")
    assert_clean_failure(result, 3, ["/train/inputs", "shared"], directory=tmp_path, before=before)


def test_state_dict_with_non_tensor_entries_is_refined_with_a_warning(tmp_path):
    mods = _models(tmp_path)
    torch.manual_seed(0)
    model = mods.TinyDeepONet()
    state: dict[str, Any] = dict(model.state_dict())
    state["epoch"] = 12
    state["note"] = "trained with Adam"
    torch.save(state, tmp_path / "don.pt")
    data = _write_operator_h5(tmp_path / "c.h5", "cartesian")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model:\n  factory: {tmp_path / 'opmodels.py'}:deeponet\nlsr:\n  rank: 8\n")
    result = run("refine", tmp_path / "don.pt", "--config", cfg, "--data", data, "--out", tmp_path / "o.pt")
    assert_ok(result)
    assert "skipped non-tensor entries" in all_output(result)
    assert "epoch" in all_output(result)


# --------------------------------------------------------------------------------------------
# data larger than the memory budget: streamed from the HDF5 file
# --------------------------------------------------------------------------------------------


def test_streamed_refinement_equals_in_memory(tmp_path):
    gen = np.random.default_rng(3)
    data = tmp_path / "big.h5"
    with h5py.File(data, "w") as f:
        for split, n in (("train", 24000), ("val", 3000)):
            x = gen.uniform(-1, 1, size=(n, 64))
            g = f.create_group(split)
            g.create_dataset("inputs", data=x)  # 12.3 MB of training inputs > 32 MB budget / 4
            g.create_dataset("targets", data=np.tanh(2 * x[:, :1]) * np.cos(x[:, 1:2]))
    torch.manual_seed(0)
    from lsr_cli.models import MLP

    torch.save(MLP(64, 1, hidden=[10, 10]).state_dict(), tmp_path / "m.pt")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {factory: mlp, kwargs: {in_features: 64, hidden: [10, 10]}}\nlsr: {rank: [20, 60]}\n")
    reports = {}
    for name, extra in (("memory", []), ("streamed", ["--max-memory", "32MB"])):
        out = tmp_path / f"{name}.pt"
        result = run("refine", tmp_path / "m.pt", "--config", cfg, "--data", data, "--out", out, "--json", *extra)
        assert_ok(result)
        reports[name] = json.loads(result.stdout)
    mem, streamed = reports["memory"], reports["streamed"]
    assert mem["memory"]["streamed_splits"] == []
    assert streamed["memory"]["streamed_splits"] == ["train"]  # val (1.5 MB) fits
    assert streamed["memory"]["budget_bytes"] == 32 * 10**6
    assert streamed["memory"]["peak_above_start_bytes"] <= 32 * 10**6
    assert streamed["data"]["splits"]["train"]["streamed"] is True
    assert streamed["rank"] == mem["rank"] == 60
    for split in ("train", "val"):
        a, b = mem["splits"][split]["after"]["rel_l2"], streamed["splits"][split]["after"]["rel_l2"]
        assert b == pytest.approx(a, rel=1e-9)
        assert a < 0.5 * mem["splits"][split]["before"]["rel_l2"]
    d_mem = torch.load(tmp_path / "memory.pt", weights_only=True)["delta"]
    d_str = torch.load(tmp_path / "streamed.pt", weights_only=True)["delta"]
    for k in d_mem:
        torch.testing.assert_close(d_str[k], d_mem[k], rtol=1e-8, atol=1e-10 * float(d_mem[k].abs().max()))


def test_max_memory_rejects_a_bad_size(tmp_path, regression_files):
    files = regression_files
    result = run(
        "refine", files["state_dict"], "--config", files["config"], "--data", files["data"], "--max-memory", "lots"
    )
    assert_clean_failure(result, 2, ["--max-memory", "lots"])
