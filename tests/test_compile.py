"""``lsr.compile``: JVPs through ``torch.compile`` equal the eager ones (ragged chunks padded),
a failing backend falls back to eager with the reason recorded, and the report says what ran.

The ``aot_eager`` backend traces and runs the same graph machinery as ``inductor`` without
generating C++ code, so these tests need no compiler and stay fast."""

from __future__ import annotations

import pytest
import torch

from lsr_cli.config import parse_compile
from lsr_cli.errors import ConfigError
from lsr_cli.linearization import CompiledJvp, JacobianOperator, ParameterSpace
from lsr_cli.models import MLP
from tests.test_cli import refine_json

PRODUCT_RTOL = 1e-12


def _operator(rows: int, chunk: int) -> tuple[JacobianOperator, torch.Tensor]:
    torch.manual_seed(0)
    net = MLP(2, 3, hidden=[6, 5]).double()
    x = torch.rand(rows, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(rows))
    space = ParameterSpace({k: v.detach() for k, v in net.named_parameters()})
    return JacobianOperator(net, space, (x,), row_chunk=chunk, tangent_chunk=4), x


def test_compiled_jvps_equal_eager_on_ragged_chunks():
    op, _ = _operator(23, 5)  # last row chunk 3 of 5, last tangent chunk 3 of 4
    V = torch.randn(op.shape[1], 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = op.matmat(V)
    compiled = CompiledJvp("aot_eager")
    op.use_compiled(compiled)
    out = op.matmat(V)
    assert compiled.status["used"] is True and float(compiled.status["first_call_seconds"]) > 0
    torch.testing.assert_close(out, ref, rtol=0, atol=PRODUCT_RTOL * float(ref.abs().max()))
    # an operator on other rows of the same module and space reuses the traced function
    other = JacobianOperator(op.module, op.space, (torch.rand(11, 2, dtype=torch.float64),), 5, 4)
    ref_other = other.matmat(V)
    other.use_compiled(compiled, like=op)
    torch.testing.assert_close(other.matmat(V), ref_other, rtol=0, atol=PRODUCT_RTOL * float(ref_other.abs().max()))


def test_failing_backend_falls_back_to_eager_and_says_why():
    def broken(gm, example_inputs):
        raise RuntimeError("no C++ compiler on this machine")

    op, _ = _operator(9, 4)
    V = torch.randn(op.shape[1], 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = op.matmat(V)
    compiled = CompiledJvp(broken)
    op.use_compiled(compiled)
    torch.testing.assert_close(op.matmat(V), ref, rtol=0, atol=PRODUCT_RTOL * float(ref.abs().max()))
    assert compiled.status["used"] is False and "no C++ compiler" in str(compiled.status["reason"])


def test_parse_compile():
    assert parse_compile("lsr.compile", True) == "inductor"
    assert parse_compile("lsr.compile", False) is None
    assert parse_compile("lsr.compile", "aot_eager") == "aot_eager"
    with pytest.raises(
        ConfigError, match=r"config\.lsr\.compile: expected true, false or one of inductor, aot_eager, got 'fast'"
    ):
        parse_compile("lsr.compile", "fast")


def test_refine_report_says_whether_compile_ran(regression_files):
    files = regression_files
    reports = {}
    for name, kind, lsr in (
        ("eager", "state_dict", "{jacobian: matrix_free}"),
        ("compiled", "state_dict", "{jacobian: matrix_free, compile: aot_eager}"),
        ("script", "torchscript", "{jacobian: matrix_free, compile: aot_eager}"),
        ("dense", "state_dict", "{jacobian: dense, compile: true}"),
    ):
        text = f"model:\n  factory: mlp\n  kwargs: {{hidden: [16, 16]}}\nlsr: {lsr}\n"
        reports[name] = refine_json(files, name, text, kind, rank="40,80")
    assert "compile" not in reports["eager"]
    assert reports["compiled"]["compile"]["used"] is True and reports["compiled"]["compile"]["backend"] == "aot_eager"
    assert reports["compiled"]["rank"] == reports["eager"]["rank"]
    for split in ("train", "val", "test"):
        assert reports["compiled"]["splits"][split]["after"]["rel_l2"] == pytest.approx(
            reports["eager"]["splits"][split]["after"]["rel_l2"], rel=1e-8
        )
    assert reports["script"]["compile"]["used"] is False and "TorchScript" in reports["script"]["compile"]["reason"]
    assert reports["dense"]["compile"]["used"] is False and "dense path" in reports["dense"]["compile"]["reason"]
