"""The spectral path of one-shot LSR (small dense ``G``): exact TSVD against a dense SVD, its
generalized cross-validation, its fallback, and ``pde.basis: auto``."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from lsr_cli.checkpoint import LoadedCheckpoint
from lsr_cli.config import Config
from lsr_cli.models import MLP
from lsr_cli.pde import parse_problem, refine_pde
from lsr_cli.pde.residual import prepare_pde_run
from lsr_cli.plan import choose_basis, equation_is_linear
from lsr_cli.runtime import NoProgress, start_run
from lsr_cli.spectral import solve_spectral
from lsr_cli.subspace import Selection
from tests.test_engine import DenseOperator

F64 = torch.float64


def low_rank_problem(n: int = 90, m: int = 60, rank: int = 30, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``G = U diag(s) Vᵀ`` of exact rank ``rank`` with singular values 1 … 1e-6, and ``f0``."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=F64)).Q
    V = torch.linalg.qr(torch.randn(m, rank, generator=g, dtype=F64)).Q
    s = torch.logspace(0, -6, rank, dtype=F64)
    return (U * s) @ V.T, torch.randn(n, generator=g, dtype=F64)


def lsr_config(**changes: object) -> Config:
    cfg = Config()
    cfg.lsr.tikhonov = 0.0
    for k, v in changes.items():
        setattr(cfg.lsr, k, v)
    return cfg


def test_spectral_step_is_the_truncated_svd_solution_at_the_gcv_rank():
    G, f0 = low_rank_problem()
    n = G.shape[0]
    cfg = lsr_config()
    sub = solve_spectral(
        DenseOperator(G), f0, Selection("holdout_loss"), cfg.lsr, torch.Generator().manual_seed(0), NoProgress()
    )
    assert sub is not None and sub.regularization["chosen_by"] == "gcv"
    assert sub.rounds[0]["usable_rank"] == 30  # the exact rank, found by exhaustion

    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    b = U[:, :30].T @ f0
    r = torch.arange(1, 31, dtype=F64)
    res_sq = f0.square().sum() - torch.cumsum(b.square(), 0)
    gcv = res_sq / n / (1 - r / n) ** 2
    best = int(gcv.argmin()) + 1
    assert sub.rank == best
    dz = -(Vh[:best].T @ (b[:best] / S[:best]))
    assert sub.dz is not None
    assert torch.allclose(sub.dz, dz, rtol=1e-7, atol=1e-9 * float(dz.abs().max()))
    # the reported losses are those of the solutions
    entry = next(e for e in sub.sweep if e.rank == best)
    assert entry.train_loss == pytest.approx(float((G @ dz + f0).square().mean()), rel=1e-8)
    assert entry.val_loss == pytest.approx(float(gcv[best - 1]), rel=1e-8)


def test_spectral_train_loss_selection_takes_every_direction():
    G, f0 = low_rank_problem(seed=1)
    cfg = lsr_config()
    sub = solve_spectral(
        DenseOperator(G), f0, Selection("train_loss"), cfg.lsr, torch.Generator().manual_seed(0), NoProgress()
    )
    assert sub is not None and sub.rank == 30 and sub.regularization["chosen_by"] == "train_loss"
    x = torch.linalg.lstsq(G, -f0[:, None], rcond=1e-10, driver="gelsd").solution[:, 0]
    assert sub.dz is not None and torch.allclose(sub.dz, x, rtol=1e-6, atol=1e-9 * float(x.abs().max()))


def test_spectral_fixed_rank_and_fallback_when_the_range_is_not_exhausted():
    G, _ = low_rank_problem(seed=2)
    f0 = G @ torch.randn(G.shape[1], generator=torch.Generator().manual_seed(5), dtype=F64)  # in the range
    cfg = lsr_config(rank=[5, 12])
    sub = solve_spectral(
        DenseOperator(G), f0, Selection("holdout_loss"), cfg.lsr, torch.Generator().manual_seed(0), NoProgress()
    )
    assert sub is not None and sub.rank in (5, 12) and {e.rank for e in sub.sweep} == {0, 5, 12}
    # full rank 400 x 300, capped at rank 16: the sketch stops at 16 + 128 columns, not exhausted
    g = torch.Generator().manual_seed(3)
    G = torch.randn(400, 300, generator=g, dtype=F64)
    cfg = lsr_config(max_rank=16)
    assert solve_spectral(DenseOperator(G), G[:, 0], Selection("holdout_loss"), cfg.lsr, g, NoProgress()) is None


def poisson_1d(count: int = 48) -> dict:
    return {
        "equation": "poisson",
        "variables": ["x"],
        "domain": {"x": [0, 1]},
        "coefficients": {"source": "pi**2 * sin(pi * x)"},
        "blocks": [
            {"name": "interior", "points": {"sample": "sobol", "count": count}},
            {"name": "ends", "kind": "dirichlet", "weight": 10, "points": {"sample": "boundary", "count": 2}},
        ],
    }


def small_net(inputs: int = 1) -> torch.nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return MLP(inputs, 1, hidden=[8, 8]).double().eval()


def test_auto_basis_on_a_small_linear_pde_runs_the_spectral_path(tmp_path):
    net = small_net()
    path = tmp_path / "net.pt"
    torch.save(net.state_dict(), path)
    ckpt = LoadedCheckpoint(path, "state_dict", net)
    cfg = Config()
    cfg.device = "cpu"
    results = {}
    for basis in ("auto", "output"):
        raw = dict(poisson_1d(), basis=basis)
        problem = parse_problem(raw, None, torch.Generator().manual_seed(1))
        x = torch.linspace(0, 1, 101, dtype=F64)[:, None]
        problem.reference = (x, torch.sin(torch.pi * x))
        results[basis] = refine_pde(ckpt, problem, copy.deepcopy(cfg))
    auto = results["auto"]
    assert auto.jacobian["basis"] == "residual" and "linear" in auto.jacobian["basis_reason"]
    assert auto.rounds[0]["path"] == "spectral" and auto.selection_metric == "gcv"
    assert results["output"].jacobian["basis"] == "output" and "path" not in results["output"].rounds[0]
    ref = auto.errors["reference"]
    assert ref["after"]["rel_l2"] < 1e-2 * ref["before"]["rel_l2"]
    assert auto.residual_loss["after"] < 1e-4 * auto.residual_loss["before"]


def test_auto_basis_keeps_the_output_jacobian_on_a_nonlinear_equation():
    raw = {
        "equation": "burgers",
        "variables": ["x", "t"],
        "domain": {"x": [-1, 1], "t": [0, 1]},
        "coefficients": {"nu": 0.05},
        "blocks": [{"name": "interior", "points": {"sample": "sobol", "count": 64}}],
    }
    cfg = Config()
    cfg.device = "cpu"
    dtype, device, gen = start_run(cfg.dtype, cfg.device, cfg.seed)
    for equation, linear in (("burgers", False), ("heat", True)):
        r = dict(raw, equation=equation, coefficients={"nu": 0.05} if equation == "burgers" else {"kappa": 0.05})
        problem = parse_problem(r, None, torch.Generator().manual_seed(0))
        net = small_net(2)
        module, space, ops = prepare_pde_run(
            LoadedCheckpoint(Path("net.pt"), "module", net), problem, cfg, dtype, device, gen
        )
        assert ops.jacobian["path"] == "dense"
        assert equation_is_linear(module, problem, space, ops) is linear
        basis, why = choose_basis(module, problem, space, ops)
        assert basis == ("residual" if linear else "output"), why


def test_spectral_with_a_validation_operator_scores_every_rank_on_it():
    """A supervised run with a val split: every rank and λ scored on ``J_val``, as brute force."""
    G, f0 = low_rank_problem(n=90, m=60, rank=30, seed=4)
    g = torch.Generator().manual_seed(6)
    # validation rows: nearby rows of the same operator, noisy targets
    Gv = G[:40] + 1e-3 * torch.randn(40, G.shape[1], generator=g, dtype=F64) @ torch.linalg.pinv(G) @ G
    fv = f0[:40] + 0.05 * torch.randn(40, generator=g, dtype=F64)
    cfg = lsr_config(tikhonov=[0.0, 1e-2])
    sel = Selection("val_loss", op=DenseOperator(Gv), f0=fv)
    sub = solve_spectral(DenseOperator(G), f0, sel, cfg.lsr, torch.Generator().manual_seed(0), NoProgress())
    assert sub is not None and sub.regularization["chosen_by"] == "val_loss" and sub.rounds[0]["path"] == "spectral"

    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    b = U[:, :30].T @ f0
    losses = {}
    for r in range(1, 31):
        for lam in (0.0, 1e-2):
            dz = -(Vh[:r].T @ (b[:r] / S[:r])) / (1 + lam * lam)
            losses[(r, lam)] = float((fv + Gv @ dz).square().mean())
    best = min(losses, key=lambda key: losses[key])
    assert (sub.rank, sub.chosen.tikhonov) == best
    assert sub.chosen.val_loss == pytest.approx(losses[best], rel=1e-8)
    dz = -(Vh[: best[0]].T @ (b[: best[0]] / S[: best[0]])) / (1 + best[1] ** 2)
    assert sub.dz is not None and torch.allclose(sub.dz, dz, rtol=1e-7, atol=1e-9 * float(dz.abs().max()))
    assert sub.sweep[0].val_loss == pytest.approx(float(fv.square().mean()))


def test_spectral_fixed_rank_above_the_limit_is_a_config_error():
    from lsr_cli.errors import ConfigError

    G, f0 = low_rank_problem()
    with pytest.raises(ConfigError, match="between 1 and 60"):
        solve_spectral(
            DenseOperator(G), f0, Selection("train_loss"), lsr_config(rank=500).lsr, torch.Generator(), NoProgress()
        )
