"""The dense Jacobian path: materialized per-sample Jacobians equal the matrix-free products,
refinement gives the same result on either path, and batch-mixing models stay matrix-free."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lsr_cli.linearization import JacobianOperator, ParameterSpace, materialize
from lsr_cli.models import MLP
from tests.test_cli import assert_ok, refine_args, refine_json, run

PRODUCT_RTOL = 1e-12


class BatchMixing(nn.Module):
    """Subtracts the batch mean: a sample's output depends on the other samples."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        return h - h.mean(0, keepdim=True)


def _space(net: nn.Module) -> ParameterSpace:
    return ParameterSpace({k: v.detach() for k, v in net.named_parameters()})


@pytest.mark.parametrize("script", [False, True])
def test_materialized_jacobian_equals_jvps(script):
    torch.manual_seed(0)
    net: nn.Module = MLP(2, 3, hidden=[6, 5]).double()
    if script:
        net = torch.jit.script(net)
    x = torch.rand(23, 2, dtype=torch.float64)
    op = JacobianOperator(net, _space(net), (x,), row_chunk=5, tangent_chunk=4)
    dense, why = materialize(op, 2**30, torch.Generator().manual_seed(0))
    assert dense is not None, why
    n, m = op.shape
    gen = torch.Generator().manual_seed(1)
    V = torch.randn(m, 7, generator=gen, dtype=torch.float64)
    U = torch.randn(n, 7, generator=gen, dtype=torch.float64)
    ref_f, ref_b = op.matmat(V), op.rmatmat(U)
    torch.testing.assert_close(dense.matmat(V), ref_f, rtol=0, atol=PRODUCT_RTOL * float(ref_f.abs().max()))
    torch.testing.assert_close(dense.rmatmat(U), ref_b, rtol=0, atol=PRODUCT_RTOL * float(ref_b.abs().max()))
    blocks = torch.cat([b for _, b in dense.iter_matmat(V)])
    torch.testing.assert_close(blocks, ref_f, rtol=0, atol=PRODUCT_RTOL * float(ref_f.abs().max()))


def test_batch_mixing_model_stays_matrix_free():
    torch.manual_seed(0)
    net = BatchMixing().double()
    x = torch.rand(30, 2, dtype=torch.float64)
    op = JacobianOperator(net, _space(net), (x,), row_chunk=8)
    dense, why = materialize(op, 2**30, torch.Generator().manual_seed(0))
    assert dense is None
    assert "not pointwise" in why


def test_too_large_for_the_share_stays_matrix_free():
    net = MLP(2, 1, hidden=[8]).double()
    op = JacobianOperator(net, _space(net), (torch.rand(50, 2, dtype=torch.float64),))
    dense, why = materialize(op, 1000, torch.Generator().manual_seed(0))
    assert dense is None and "exceeds" in why


@pytest.mark.parametrize("kind", ["state_dict", "torchscript"])
def test_refine_dense_equals_matrix_free(regression_files, kind):
    files = regression_files
    reports = {}
    for path in ("dense", "matrix_free"):
        # no validation split: the rank is chosen on held-out rows, so the dense path runs the
        # adaptive sketch too (with a val split it runs the exact spectral path, tested below)
        text = (
            f"model:\n  factory: mlp\n  kwargs: {{hidden: [16, 16]}}\ndata: {{val: null}}\nlsr:\n  jacobian: {path}\n"
        )
        reports[path] = refine_json(files, path, text, kind, rank="40,80,160")
    dense, free = reports["dense"], reports["matrix_free"]
    assert dense["jacobian"]["path"] == "dense" and free["jacobian"]["path"] == "matrix_free"
    assert dense["rank"] == free["rank"]
    assert "path" not in dense["rounds"][0]
    for split in ("train", "test"):
        assert dense["splits"][split]["after"]["rel_l2"] == pytest.approx(
            free["splits"][split]["after"]["rel_l2"], rel=1e-6
        )


def test_auto_path_reports_its_choice(regression_files):
    files = regression_files
    out, rep = files["dir"] / "a.pt", files["dir"] / "a.json"
    result = run(*refine_args(files["state_dict"], files, out, rep, "--json", rank="20"))
    assert_ok(result)
    few = json.loads(result.stdout)["jacobian"]
    assert few["path"] == "matrix_free" and "sketch columns" in few["reason"]
    result = run(*refine_args(files["state_dict"], files, out, rep, "--json", "--force", rank="200"))
    assert_ok(result)
    many = json.loads(result.stdout)["jacobian"]
    # 210 columns: the choice rests on timing both paths on a few samples, so either may win here
    assert (many["path"] == "dense" and "fits" in many["reason"]) or (
        many["path"] == "matrix_free" and "estimated cheaper" in many["reason"]
    ), many


def test_cost_model():
    from lsr_cli.dense import estimated_costs

    # 100 columns at 0.1 s each over all rows, three passes: 30 s matrix-free; dense: 5 s to
    # materialize plus 3 GEMMs of 2·1000·500·100 flops at 1e9 flop/s = 0.3 s
    free, dense = estimated_costs(0.1, 5.0, 1000, 500, 100, 1e9)
    assert free == pytest.approx(30.0) and dense == pytest.approx(5.3)
    free, dense = estimated_costs(1e-4, 5.0, 1000, 500, 100, 1e9)
    assert free < dense


def test_float32_floor_warning():
    from lsr_cli.refine import float32_floor_warning

    errs = {"val": {"after": {"rel_l2": 3e-6}}, "train": {"after": {"rel_l2": 0.1}}}
    msg = float32_floor_warning("float32", errs)  # type: ignore[arg-type]
    assert msg is not None and "val 3.00e-06" in msg and "float64" in msg and "train" not in msg
    assert float32_floor_warning("float64", errs) is None  # type: ignore[arg-type]
    assert float32_floor_warning("float32", {"val": {"after": {"rel_l2": 1e-3}}}) is None


def test_materialized_jacobian_with_complex_parameters():
    from lsr_cli.operators import fno2d
    from lsr_cli.runtime import cast_module

    torch.manual_seed(0)
    fno = fno2d(in_channels=1, out_channels=1, width=3, modes1=2, modes2=2, layers=1)
    net = cast_module(fno, torch.float64, torch.device("cpu"))
    assert any(p.is_complex() for p in net.parameters())
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    op = JacobianOperator(net, _space(net), (x,), row_chunk=4, tangent_chunk=8)
    dense, why = materialize(op, 2**30, torch.Generator().manual_seed(0))
    assert dense is not None, why
    n, m = op.shape
    V = torch.randn(m, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = op.matmat(V)
    torch.testing.assert_close(dense.matmat(V), ref, rtol=0, atol=PRODUCT_RTOL * float(ref.abs().max()))


def test_dense_path_with_a_val_split_runs_the_exact_spectral_path(regression_files):
    """With ``J`` held and a validation split, the sketch of ``J`` runs to exhaustion and every
    rank is scored on the val split: as accurate as the adaptive matrix-free path, and the
    report says so."""
    files = regression_files
    reports = {}
    for name, path, exact in (
        ("dense", "dense", "true"),
        ("matrix_free", "matrix_free", "true"),
        ("off", "dense", "false"),
    ):
        text = f"model:\n  factory: mlp\n  kwargs: {{hidden: [16, 16]}}\nlsr:\n  jacobian: {path}\n  exact: {exact}\n"
        reports[name] = refine_json(files, name, text, rank="auto")
    dense, free = reports["dense"], reports["matrix_free"]
    # lsr.exact: false keeps the adaptive rounds on the held Jacobian
    assert reports["off"]["jacobian"]["path"] == "dense" and "path" not in reports["off"]["rounds"][0]
    assert dense["rounds"][0]["path"] == "spectral" and len(dense["rounds"]) == 1
    assert dense["regularization"]["chosen_by"] == "val_loss" and "exhausted" in dense["adaptive_stop"]
    assert "path" not in free["rounds"][0]
    # every rank up to the numerical rank was scored: the chosen one is at least as good on val
    # as the adaptive path's few candidates (up to the basis: exact SVD against a sketch)
    assert dense["splits"]["val"]["after"]["rel_l2"] <= 1.5 * free["splits"]["val"]["after"]["rel_l2"]
    assert dense["splits"]["test"]["after"]["rel_l2"] < 1e-2 * dense["splits"]["test"]["before"]["rel_l2"]
