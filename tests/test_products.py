"""``lsr.product_dtype: float32``: the matrix-free sketch and projection products run on a float32
copy of the network (complex weights as complex64) and come back in float64; ``precise=True``
and the final evaluation use the network itself; bad combinations are one-line config errors."""

from __future__ import annotations

import pytest
import torch

from lsr_cli.linearization import JacobianOperator, ParameterSpace, low_precision_copy
from lsr_cli.models import MLP
from lsr_cli.operators import fno2d
from tests.test_cli import assert_clean_failure, listing, refine_args, refine_json, run

# float32 products of small tanh nets: round-off of a few float32 ulps of the largest entry
FLOAT32_ATOL = 1e-5


def _pair(net: torch.nn.Module, x: torch.Tensor) -> tuple[JacobianOperator, JacobianOperator]:
    space = ParameterSpace({k: v.detach() for k, v in net.named_parameters()})
    exact = JacobianOperator(net, space, (x,), row_chunk=5, tangent_chunk=4)
    low = JacobianOperator(
        net, space, (x,), row_chunk=5, tangent_chunk=4, products=low_precision_copy(net, torch.float32)
    )
    return exact, low


def _close_not_equal(low: torch.Tensor, ref: torch.Tensor) -> None:
    assert low.dtype == ref.dtype == torch.float64
    scale = float(ref.abs().max())
    err = float((low - ref).abs().max())
    assert 0.0 < err <= FLOAT32_ATOL * scale, err / scale  # float32 round-off: the low path ran


def test_float32_products_agree_with_float64_to_float32_round_off():
    torch.manual_seed(0)
    net = MLP(2, 3, hidden=[16, 16]).double()
    x = torch.rand(23, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    exact, low = _pair(net, x)
    assert low.product_dtype == torch.float32 and exact.product_dtype is None
    gen = torch.Generator().manual_seed(4)
    V = torch.randn(exact.shape[1], 7, generator=gen, dtype=torch.float64)
    U = torch.randn(exact.shape[0], 6, generator=gen, dtype=torch.float64)
    _close_not_equal(low.matmat(V), exact.matmat(V))
    _close_not_equal(low.rmatmat(U), exact.rmatmat(U))
    # precise: the network itself, bit for bit
    assert torch.equal(low.matmat(V, precise=True), exact.matmat(V))
    assert torch.equal(low.rmatmat(U, precise=True), exact.rmatmat(U))
    assert torch.equal(low.matvec(V[:, 0], precise=True), exact.matvec(V[:, 0]))
    # the copy is separate: the network keeps its float64 weights
    assert all(p.dtype == torch.float64 for p in net.parameters())


def test_complex_weights_stay_complex_in_the_float32_copy():
    torch.manual_seed(1)
    net = fno2d(in_channels=1, out_channels=1, width=3, modes1=2, modes2=2, layers=1).double()
    low_net = low_precision_copy(net, torch.float32)
    for (name, p), (_, q) in zip(net.named_parameters(), low_net.named_parameters(), strict=True):
        if p.is_complex():
            assert q.dtype == torch.complex64, name
            torch.testing.assert_close(q.imag.double(), p.imag, rtol=1e-6, atol=1e-7)  # not dropped
        else:
            assert q.dtype == torch.float32, name
    x = torch.rand(6, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    exact, low = _pair(net, x)
    V = torch.randn(exact.shape[1], 5, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    _close_not_equal(low.matmat(V), exact.matmat(V))


MATRIX_FREE = "model:\n  factory: mlp\n  kwargs: {hidden: [16, 16]}\nlsr: {jacobian: matrix_free%s}\n"


def test_refine_with_float32_products_reports_them_and_matches_float64(regression_files):
    files = regression_files
    ref = refine_json(files, "f64", MATRIX_FREE % "", rank="40,80")
    low = refine_json(files, "f32", MATRIX_FREE % ", product_dtype: float32", rank="40,80")
    dense = refine_json(files, "f32dense", MATRIX_FREE.replace("matrix_free", "dense") % ", product_dtype: float32")
    assert "products" not in ref
    assert low["products"] == {"dtype": "float32", "requested": "float32", "used": True}
    assert dense["products"]["used"] is False and "dense path" in dense["products"]["reason"]
    assert low["rank"] == ref["rank"]
    for split in ("train", "val", "test"):
        before, after = ref["splits"][split]["after"]["rel_l2"], low["splits"][split]["after"]["rel_l2"]
        assert after == pytest.approx(before, rel=1e-4)
        assert low["splits"][split]["before"]["rel_l2"] == ref["splits"][split]["before"]["rel_l2"]


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ("lsr: {product_dtype: float16}", "config.lsr.product_dtype: expected auto, float32 or float64, got 'float16'"),
        ("lsr: {product_dtype: float32, compile: aot_eager}", "cannot be combined with lsr.compile"),
        ("dtype: float32\nlsr: {product_dtype: float64}", "config.lsr.product_dtype: float64 needs dtype: float64"),
    ],
)
def test_bad_product_dtype_is_a_one_line_config_error(regression_files, extra, needle):
    files = regression_files
    cfg = files["dir"] / "bad_products.yaml"
    cfg.write_text("model:\n  factory: mlp\n  kwargs: {hidden: [16, 16]}\n" + extra + "\n")
    out, rep = files["dir"] / "bad_products.pt", files["dir"] / "bad_products.json"
    before = listing(files["dir"])
    result = run(*refine_args(files["state_dict"], files, out, rep, config=cfg))
    assert_clean_failure(result, 2, needle, absent=[out, rep], directory=files["dir"], before=before)
