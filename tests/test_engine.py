"""The mathematics of the engine, in float64 on tiny problems, against dense references."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from lsr_cli import (
    Config,
    JacobianOperator,
    LinearizedModel,
    ParameterSpace,
    RangeSketch,
    ReducedProblem,
    load_checkpoint,
    read_data,
    refine,
)
from lsr_cli.config import ModelConfig
from lsr_cli.models import MLP
from lsr_cli.scripted import build_refined_script, unpack_refined_script

from .conftest import make_regression_h5, train_briefly

ROUNDOFF = 1e-12  # float64 products of O(1) quantities on tiny nets
LSTSQ_TOL = 1e-10  # issue's bound for LSR at full rank vs dense lstsq
SKETCH_TOL = 1e-10  # exact-rank operator: sketch with k > rank is exact up to round-off


def dense_jacobian(model: nn.Module, x: torch.Tensor, space: ParameterSpace) -> torch.Tensor:
    params = {n: p.detach() for n, p in model.named_parameters()}
    jac = torch.func.jacrev(lambda p: torch.func.functional_call(model, p, (x,)).reshape(-1))(params)
    n = jac[space.names[0]].shape[0]
    return space.flatten({k: jac[k].reshape(n, *params[k].shape) for k in space.names}).T


@pytest.fixture
def tiny() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return MLP(2, 3, hidden=[5, 4]).double(), torch.randn(7, 2, dtype=torch.float64)


@pytest.mark.parametrize("scripted", [False, True])
@pytest.mark.parametrize("fraction,include", [(1.0, ()), (0.5, ()), (1.0, ("net.2.*",))])
def test_jvp_vjp_match_dense_jacobian(tiny, scripted, fraction, include):
    model, x = tiny
    module = torch.jit.script(model) if scripted else model
    space = ParameterSpace(
        dict(module.named_parameters()), include=include, fraction=fraction, generator=torch.Generator().manual_seed(3)
    )
    op = JacobianOperator(module, space, (x,), row_chunk=3, tangent_chunk=2)
    J = dense_jacobian(model, x, space)
    assert op.shape == tuple(J.shape)
    gen = torch.Generator().manual_seed(1)
    V = torch.randn(space.num, 5, generator=gen, dtype=torch.float64)
    U = torch.randn(op.shape[0], 4, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(op.matmat(V), J @ V, rtol=0, atol=ROUNDOFF)
    torch.testing.assert_close(op.rmatmat(U), J.T @ U, rtol=0, atol=ROUNDOFF)
    # adjoint identity <J v, u> = <v, J^T u>
    lhs = torch.sum(op.matmat(V[:, :1]) * U[:, :1])
    rhs = torch.sum(V[:, :1] * op.rmatmat(U[:, :1]))
    assert abs(float(lhs - rhs)) < ROUNDOFF * max(1.0, abs(float(lhs)))


def test_tuned_row_chunk_is_valid_and_leaves_products_unchanged(tiny):
    from lsr_cli.linearization import tune_row_chunk

    model, _ = tiny
    x = torch.randn(300, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    space = ParameterSpace(dict(model.named_parameters()))
    op = JacobianOperator(model, space, (x,), row_chunk=2, tangent_chunk=4)
    J = dense_jacobian(model, x, space)
    gen = torch.Generator().manual_seed(1)
    V = torch.randn(space.num, 5, generator=gen, dtype=torch.float64)
    U = torch.randn(op.shape[0], 3, generator=gen, dtype=torch.float64)
    before = op.matmat(V)
    chunk = tune_row_chunk(op, max_seconds=0.05)
    assert chunk in (2, 8, 32, 128, 300)  # grows from the default by factors of 4, up to all samples
    op.row_chunk = chunk
    torch.testing.assert_close(op.matmat(V), J @ V, rtol=0, atol=ROUNDOFF)
    torch.testing.assert_close(op.matmat(V), before, rtol=0, atol=ROUNDOFF)
    # separate chunks for the two directions: still the operator and its adjoint
    op.row_chunk, op.vjp_row_chunk = 7, 64
    torch.testing.assert_close(op.matmat(V), J @ V, rtol=0, atol=ROUNDOFF)
    torch.testing.assert_close(op.rmatmat(U), J.T @ U, rtol=0, atol=ROUNDOFF)


def test_parameter_space_roundtrip_and_selection(tiny):
    model, _ = tiny
    params = dict(model.named_parameters())
    space = ParameterSpace(params, exclude=("*.bias",), fraction=0.5, generator=torch.Generator().manual_seed(0))
    assert all(not n.endswith("bias") for n in space.names)
    assert 0 < space.num < sum(params[n].numel() for n in space.names)
    v = torch.arange(space.num, dtype=torch.float64)[:, None] + 1
    assert torch.equal(space.flatten(space.unflatten(v)), v)
    again = ParameterSpace(params, exclude=("*.bias",), fraction=0.5, generator=torch.Generator().manual_seed(0))
    assert again.num == space.num  # seeded: same subset


class DenseOperator:
    def __init__(self, M: torch.Tensor) -> None:
        self.M = M

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.M.shape)

    def matmat(self, V, progress=None):
        return self.M @ V

    def rmatmat(self, U, progress=None):
        return self.M.T @ U


@pytest.mark.parametrize("power_iterations", [0, 1])
def test_range_finder_recovers_exact_rank_spectrum(power_iterations):
    gen = torch.Generator().manual_seed(0)
    n, m, r = 60, 45, 8
    U, _ = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=torch.float64))
    s = torch.logspace(2, -3, r, dtype=torch.float64)
    M = U @ torch.diag(s) @ V.T
    sketch = RangeSketch(
        DenseOperator(M), torch.Generator().manual_seed(1), torch.float64, torch.device("cpu"), power_iterations
    )
    sketch.extend(5)
    sketch.extend(r + 5 - 5)  # grown in two blocks: the block orthogonalization must hold
    assert sketch.num_columns == r + 5
    torch.testing.assert_close(sketch.Q.T @ sketch.Q, torch.eye(r + 5, dtype=torch.float64), rtol=0, atol=1e-12)
    S = sketch.singular_values()
    torch.testing.assert_close(S[:r], s, rtol=SKETCH_TOL, atol=0)
    assert sketch.usable_rank() == r
    P, _ = sketch.basis(r)
    # J P has orthonormal columns for an exact sketch (the scaling of METHOD.md step 4)
    torch.testing.assert_close((M @ P).T @ (M @ P), torch.eye(r, dtype=torch.float64), rtol=0, atol=1e-9)


def test_reduced_solve_identities():
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    f0 = torch.randn(40, generator=gen, dtype=torch.float64)
    problem = ReducedProblem(A, f0)
    sol = problem.solve(6)
    ref = torch.linalg.lstsq(A, -f0[:, None]).solution[:, 0]
    torch.testing.assert_close(sol.z, ref, rtol=0, atol=ROUNDOFF)
    res = problem.residual(sol)
    assert float(torch.abs(A.T @ res).max()) < ROUNDOFF * 10  # residual ⟂ range(A)
    # prefix rank: same as lstsq on the leading columns
    sol3 = problem.solve(3)
    ref3 = torch.linalg.lstsq(A[:, :3], -f0[:, None]).solution[:, 0]
    torch.testing.assert_close(sol3.z, ref3, rtol=0, atol=ROUNDOFF)
    # Tikhonov: (AᵀA + λ² I) z = −Aᵀ f0
    lam_rel = 0.3
    solt = problem.solve(6, lam_rel)
    lam = solt.tikhonov
    assert math.isclose(lam, lam_rel * float(torch.linalg.svdvals(A)[0]), rel_tol=1e-12)
    zt = torch.linalg.solve(A.T @ A + lam**2 * torch.eye(6, dtype=torch.float64), -A.T @ f0)
    torch.testing.assert_close(solt.z, zt, rtol=0, atol=ROUNDOFF)


def test_truncation_drops_dependent_columns():
    gen = torch.Generator().manual_seed(0)
    B = torch.randn(30, 3, generator=gen, dtype=torch.float64)
    A = torch.cat([B, B[:, :1] * 2.0], dim=1)  # exactly rank 3
    f0 = torch.randn(30, generator=gen, dtype=torch.float64)
    sol = ReducedProblem(A, f0).solve(4)
    assert sol.num_truncated == 1
    assert torch.isfinite(sol.z).all()
    ref = torch.linalg.lstsq(B, -f0[:, None]).solution[:, 0]
    torch.testing.assert_close(A @ sol.z, B @ ref, rtol=0, atol=1e-10)


class RandomFeatures(nn.Module):
    """A model linear in its parameters: q(x) = Φ(x) w + b with fixed random features Φ."""

    def __init__(self, num_features: int = 12, out_features: int = 1) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(5)
        self.register_buffer("freq", torch.randn(2, num_features, generator=gen))
        self.head = nn.Linear(num_features, out_features)

    def forward(self, x):
        return self.head(torch.tanh(x @ self.freq))


def _refine_linear(tmp_path: Path, scripted: bool):
    data = make_regression_h5(tmp_path / "d.h5", n_train=80, n_val=0, n_test=20)
    model = RandomFeatures().double()
    splits = read_data(data, Config().data, torch.float64)
    x, y = splits["train"].inputs[0], splits["train"].targets
    path = tmp_path / "m.pt"
    if scripted:
        torch.jit.script(model).save(str(path))
        ckpt = load_checkpoint(path)
    else:
        torch.save(model.state_dict(), path)
        ckpt = load_checkpoint(path, ModelConfig(factory="tests.test_engine:RandomFeatures"))
    cfg = Config()
    cfg.device = "cpu"
    cfg.lsr.rank = 13  # all parameters: full rank
    cfg.lsr.oversampling = 0
    cfg.lsr.tikhonov = 0.0  # plain least squares; the rank is still checked on held-out rows
    result = refine(ckpt, splits, cfg)
    feats = torch.cat([torch.tanh(x @ model.freq), torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    w = torch.linalg.lstsq(feats, y).solution
    return result, feats @ w, x


@pytest.mark.parametrize("scripted", [False, True])
def test_linear_model_full_rank_equals_lstsq(tmp_path, scripted):
    result, ref_pred, x = _refine_linear(tmp_path, scripted)
    assert result.rank == 13
    assert result.selection_metric == "holdout_loss"  # no val split: 10 % of train held out, then refit on all
    with torch.no_grad():
        pred = result.model(x)
    torch.testing.assert_close(pred, ref_pred, rtol=0, atol=LSTSQ_TOL)
    # for a linear model the network at θ0 + δ is the same predictor
    assert math.isclose(
        result.errors["train"]["network_after"]["rel_l2"], result.errors["train"]["after"]["rel_l2"], rel_tol=1e-8
    )


def test_refined_script_matches_linearized_model_and_reloads(tmp_path):
    torch.manual_seed(0)
    model = MLP(2, 2, hidden=[6]).double()
    scripted = torch.jit.script(model)
    gen = torch.Generator().manual_seed(2)
    delta = {n: torch.randn(p.shape, generator=gen, dtype=torch.float64) for n, p in model.named_parameters()}
    wrapper = build_refined_script(scripted, delta, 1, {"rank": 3})
    path = tmp_path / "refined.pt"
    wrapper.save(str(path))
    x = torch.randn(9, 2, dtype=torch.float64)
    ref = LinearizedModel(model, delta)
    with torch.no_grad():
        expected = ref(x)
        torch.testing.assert_close(wrapper(x), expected, rtol=0, atol=ROUNDOFF)
    assert torch.is_grad_enabled()  # grad mode restored after a no_grad call
    # differentiable w.r.t. inputs, same derivative as the Python module
    xr = x.clone().requires_grad_(True)
    g1 = torch.autograd.grad(wrapper(xr).sum(), xr)[0]
    xr2 = x.clone().requires_grad_(True)
    g2 = torch.autograd.grad(ref(xr2).sum(), xr2)[0]
    torch.testing.assert_close(g1, g2, rtol=0, atol=1e-10)
    base, d2, meta = unpack_refined_script(torch.jit.load(str(path)))
    assert meta == {"rank": 3} and set(d2) == set(delta)
    np.save(tmp_path / "x.npy", x.numpy())
    code = (
        "import sys, numpy as np, torch\n"
        f"m = torch.jit.load({str(path)!r})\n"
        f"x = torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r}))\n"
        "with torch.no_grad():\n"
        f"    np.save({str(tmp_path / 'y.npy')!r}, m(x).numpy())\n"
        "assert 'lsr_cli' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "y.npy")), expected, rtol=0, atol=ROUNDOFF)


class TwoInput(nn.Module):
    """DeepONet-like: branch(u) · trunk(y), inputs passed positionally (branch, trunk)."""

    def __init__(self) -> None:
        super().__init__()
        self.branch = nn.Sequential(nn.Linear(4, 12), nn.Tanh(), nn.Linear(12, 8))
        self.trunk = nn.Sequential(nn.Linear(1, 12), nn.Tanh(), nn.Linear(12, 8))

    def forward(self, u, y):
        return (self.branch(u) * self.trunk(y)).sum(-1, keepdim=True)


def test_multi_input_group_order_and_refinement(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "op.h5"
    with h5py.File(path, "w") as f:
        for split, n in (("train", 400), ("val", 100)):
            coef = rng.normal(size=(n, 4))
            y = rng.uniform(0, 1, size=(n, 1))
            g = f.create_group(split)
            inp = g.create_group("inputs")
            inp.create_dataset("trunk", data=y)  # alphabetical order would be wrong: 'order' decides
            inp.create_dataset("branch", data=coef)
            inp.attrs["order"] = ["branch", "trunk"]
            g.create_dataset("targets", data=(coef[:, :1] * np.sin(np.pi * y) + coef[:, 1:2] * y**2))
    torch.manual_seed(0)
    model = TwoInput()
    splits = read_data(path, Config().data, torch.float64)
    assert [t.shape[1] for t in splits["train"].inputs] == [4, 1]
    x = tuple(t.float() for t in splits["train"].inputs)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        opt.zero_grad()
        loss = torch.mean((model(*x) - splits["train"].targets.float()) ** 2)
        loss.backward()
        opt.step()
    ts = tmp_path / "op.pt"
    torch.jit.script(model.eval()).save(str(ts))
    cfg = Config()
    cfg.device = "cpu"
    cfg.lsr.rank = [32, 128, 256]
    result = refine(load_checkpoint(ts), splits, cfg)
    e = result.errors["val"]
    assert e["after"]["rel_l2"] < e["before"]["rel_l2"] / 5
    wrapper = build_refined_script(result.model.base, result.delta, 2, {})
    with torch.no_grad():
        torch.testing.assert_close(
            wrapper(*splits["val"].inputs), result.model(*splits["val"].inputs), rtol=0, atol=1e-10
        )


def test_refine_improves_and_never_worsens_selection_metric(regression_files):
    cfg = Config()
    cfg.device = "cpu"
    cfg.lsr.rank = "auto"
    cfg.lsr.start_rank = 16
    splits = read_data(regression_files["data"], cfg.data, torch.float64)
    result = refine(load_checkpoint(regression_files["torchscript"]), splits, cfg)
    e = result.errors
    assert result.status == "improved"
    assert e["test"]["after"]["rel_l2"] < e["test"]["before"]["rel_l2"] / 5
    assert e["val"]["after"]["mse"] <= e["val"]["before"]["mse"]
    ranks = [s.rank for s in result.rank_sweep]
    assert ranks[0] == 0 and result.rank in ranks


def test_pure_noise_targets_keep_rank_zero(tmp_path):
    """Validation targets unrelated to training targets: no rank may beat rank 0 on val."""
    rng = np.random.default_rng(1)
    path = tmp_path / "noise.h5"
    with h5py.File(path, "w") as f:
        for split, n in (("train", 120), ("val", 120)):
            g = f.create_group(split)
            g.create_dataset("inputs", data=rng.uniform(-1, 1, size=(n, 2)))
            g.create_dataset("targets", data=np.zeros((n, 1)) if split == "val" else rng.normal(size=(n, 1)))
    model = MLP(2, 1, hidden=[8])
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # predicts 0: exact on val, so any change can only hurt val
    sd = tmp_path / "z.pt"
    torch.save(model.state_dict(), sd)
    cfg = Config()
    cfg.device = "cpu"
    cfg.lsr.rank = [4, 8, 16]
    result = refine(
        load_checkpoint(sd, ModelConfig(factory="mlp", kwargs={"hidden": [8]})),
        read_data(path, cfg.data, torch.float64),
        cfg,
    )
    assert result.rank == 0 and result.status == "unchanged"
    assert result.errors["val"]["after"]["mse"] == result.errors["val"]["before"]["mse"] == 0.0


def test_float32_path_runs_and_improves(regression_files):
    cfg = Config()
    cfg.device = "cpu"
    cfg.dtype = "float32"
    cfg.lsr.rank = 32
    splits = read_data(regression_files["data"], cfg.data, torch.float32)
    result = refine(load_checkpoint(regression_files["torchscript"]), splits, cfg)
    assert result.dtype == "float32"
    assert result.errors["val"]["after"]["rel_l2"] < result.errors["val"]["before"]["rel_l2"]


def test_refine_again_extends_delta(regression_files, tmp_path):
    cfg = Config()
    cfg.device = "cpu"
    cfg.lsr.rank = 8
    splits = read_data(regression_files["data"], cfg.data, torch.float64)
    first = refine(load_checkpoint(regression_files["torchscript"]), splits, cfg)
    wrapper = build_refined_script(first.model.base, first.delta, 1, {})
    path = tmp_path / "r1.pt"
    wrapper.save(str(path))
    ckpt = load_checkpoint(path)
    assert ckpt.format == "refined_torchscript"
    second = refine(ckpt, splits, cfg)
    # the starting error of the second run is the first run's refined error
    assert math.isclose(
        second.errors["test"]["before"]["rel_l2"], first.errors["test"]["after"]["rel_l2"], rel_tol=1e-9
    )
    assert second.errors["val"]["after"]["mse"] <= second.errors["val"]["before"]["mse"]


def test_untrained_model_cannot_crash_train_briefly_helper(tmp_path):
    # guards the fixture itself: a briefly trained model is far from exact, so refinement has work to do
    data = make_regression_h5(tmp_path / "d.h5")
    model = train_briefly(MLP(2, 1, hidden=[8]), data, steps=20)
    with h5py.File(data) as f:
        x = torch.tensor(f["test/inputs"][()], dtype=torch.float32)
        y = torch.tensor(f["test/targets"][()], dtype=torch.float32)
    with torch.no_grad():
        assert float(torch.linalg.norm(model(x) - y) / torch.linalg.norm(y)) > 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(regression_files):
    results = {}
    for device in ("cpu", "cuda"):
        cfg = Config()
        cfg.device = device
        cfg.lsr.rank = 64
        splits = read_data(regression_files["data"], cfg.data, torch.float64)
        results[device] = refine(load_checkpoint(regression_files["torchscript"]), splits, cfg)
    cpu, gpu = results["cpu"].errors["test"]["after"]["rel_l2"], results["cuda"].errors["test"]["after"]["rel_l2"]
    assert results["cuda"].device.startswith("cuda")
    assert math.isclose(cpu, gpu, rel_tol=1e-6)


def test_sketch_stops_when_a_block_adds_nothing_above_round_off():
    """Low rank plus noise just below the usable level in every direction but above it in
    Frobenius norm: the sketch stops a block after the rank, not at the full dimension."""
    gen = torch.Generator().manual_seed(0)
    n = m = 200
    U, _ = torch.linalg.qr(torch.randn(n, 20, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(m, 20, generator=gen, dtype=torch.float64))
    M = (U * torch.logspace(0, -6, 20, dtype=torch.float64)) @ V.T
    M = M + 1e-15 * torch.randn(n, m, generator=gen, dtype=torch.float64)  # σ_max ≈ 3e-14 < rtol = 4.4e-14
    sketch = RangeSketch(DenseOperator(M), torch.Generator().manual_seed(1), torch.float64, torch.device("cpu"), 0, 16)
    sketch.extend(200)
    assert sketch.exhausted and sketch.num_columns <= 64  # the Frobenius test alone: 160
    assert sketch.usable_rank() == 20


@pytest.mark.parametrize("shape", [(50, 30, 7), (50, 30, 1), (9, 700, 600), (40, 20, 2)])
def test_mm_is_the_matrix_product(shape):
    from lsr_cli.blas import mm

    n, k, b = shape
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(n, k, generator=gen, dtype=torch.float64)
    B = torch.randn(k, b, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(mm(A, B), A @ B, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mm(A.T.contiguous().T, B[:, : max(1, b - 1)]), A @ B[:, : max(1, b - 1)])


def test_casting_a_copied_torchscript_module_does_not_warn():
    """``lsr iterate`` deep-copies the network each iteration; a copied TorchScript module holds
    non-leaf parameters, and casting it made torch warn on every iteration."""
    import copy
    import warnings

    from lsr_cli.runtime import cast_module

    copied = copy.deepcopy(torch.jit.script(MLP(2, 1, hidden=[4])))
    assert any(not p.is_leaf for p in copied.parameters())  # the torch behaviour guarded against
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = cast_module(copied, torch.float64, torch.device("cpu"))
    assert all(p.dtype == torch.float64 for p in out.parameters())
