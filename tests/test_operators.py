"""Operator networks (lsr_cli.operators): shapes, layouts, TorchScript, complex FNO weights."""

from __future__ import annotations

import io

import pytest
import torch
from torch.func import functional_call, jvp

from lsr_cli.operators import DeepONet, FNO2d, deeponet, fno2d

EXACT = 1e-12  # same float64 arithmetic in a different order (einsum vs. row sums, script vs. eager)
FD_RTOL = 1e-7  # central differences in float64 with step 1e-6: truncation ~1e-12, rounding ~1e-10


def _deeponet(layout: str = "cartesian", **kw) -> DeepONet:
    torch.manual_seed(0)
    return DeepONet(5, 2, width=8, depth=2, basis=6, layout=layout, **kw).double()


def _fno(**kw) -> FNO2d:
    torch.manual_seed(0)
    kw = {"width": 6, "modes1": 3, "modes2": 3, "layers": 2, "projection": 8, **kw}
    return FNO2d(2, 1, **kw).double()


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 5, generator=g, dtype=torch.float64), torch.rand(4, 2, generator=g, dtype=torch.float64)


def test_deeponet_shapes_both_layouts() -> None:
    b, t = _inputs()
    assert _deeponet("cartesian")(b, t).shape == (3, 4)
    assert _deeponet("paired")(b, t[:3]).shape == (3, 1)


def test_deeponet_paired_equals_cartesian() -> None:
    cart = _deeponet("cartesian")
    paired = _deeponet("paired")
    paired.load_state_dict(cart.state_dict())
    b, t = _inputs()
    grid = cart(b, t)  # [3, 4]
    rows = paired(b.repeat_interleave(4, dim=0), t.repeat(3, 1))  # pairs (i, j), i-major
    torch.testing.assert_close(rows.reshape(3, 4), grid, rtol=EXACT, atol=EXACT)


def test_deeponet_out_bias_false_has_no_bias_parameter() -> None:
    model = _deeponet(out_bias=False)
    assert "bias" not in dict(model.named_parameters())
    assert "bias" in model.state_dict()


@pytest.mark.parametrize("layout", ["cartesian", "paired"])
def test_deeponet_scripted_matches_eager(layout: str) -> None:
    model = _deeponet(layout)
    b, t = _inputs()
    t = t if layout == "cartesian" else t[:3]
    scripted = torch.jit.script(model)
    torch.testing.assert_close(scripted(b, t), model(b, t), rtol=EXACT, atol=EXACT)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    torch.testing.assert_close(torch.jit.load(buf)(b, t), model(b, t), rtol=EXACT, atol=EXACT)


def test_deeponet_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="layout must be one of"):
        DeepONet(5, 1, layout="grid")
    with pytest.raises(ValueError, match="activation must be one of"):
        DeepONet(5, 1, activation="swish")
    with pytest.raises(ValueError, match="basis must be a positive integer"):
        DeepONet(5, 1, basis=0)


def test_fno_shapes_real_output_and_complex_parameters() -> None:
    model = _fno()
    x = torch.randn(3, 2, 10, 8, dtype=torch.float64)
    y = model(x)
    assert y.shape == (3, 1, 10, 8)
    assert y.dtype == torch.float64
    complex_names = [n for n, p in model.named_parameters() if p.is_complex()]
    assert complex_names == [
        "blocks.0.spectral.weight_pos",
        "blocks.0.spectral.weight_neg",
        "blocks.1.spectral.weight_pos",
        "blocks.1.spectral.weight_neg",
    ]
    assert all(p.dtype == torch.cdouble for p in model.parameters() if p.is_complex())


def test_fno_to_float64_keeps_imaginary_parts() -> None:
    torch.manual_seed(0)
    model = FNO2d(1, 1, width=4, modes1=2, modes2=2, layers=1)
    before = model.blocks[0].spectral.weight_pos.detach().clone()
    model.to(torch.float64)
    after = model.blocks[0].spectral.weight_pos
    assert after.dtype == torch.cdouble
    torch.testing.assert_close(after.detach(), before.to(torch.cdouble), rtol=0, atol=0)


def test_fno_scripted_matches_eager_with_padding() -> None:
    model = _fno(padding=3, coordinates=True)
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    scripted = torch.jit.script(model)
    torch.testing.assert_close(scripted(x), model(x), rtol=EXACT, atol=EXACT)


def test_fno_jvp_matches_central_differences() -> None:
    model = _fno()
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    params = {k: v.detach() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(2)
    tangent = {}
    for k, v in params.items():
        tangent[k] = torch.randn(v.shape, generator=g, dtype=v.dtype)

    def f(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(model, p, (x,))

    _, dout = jvp(f, (params,), (tangent,))
    h = 1e-6
    fd = (
        f({k: v + h * tangent[k] for k, v in params.items()}) - f({k: v - h * tangent[k] for k, v in params.items()})
    ) / (2 * h)
    torch.testing.assert_close(dout, fd, rtol=FD_RTOL, atol=FD_RTOL * fd.abs().max().item())


def test_fno_rejects_too_many_modes() -> None:
    model = _fno()
    with pytest.raises(RuntimeError, match="too small for modes"):
        model(torch.randn(1, 2, 4, 4, dtype=torch.float64))


def test_state_dict_round_trip_through_factories() -> None:
    model = _deeponet()
    clone = deeponet(branch_features=5, trunk_features=2, width=8, depth=2, basis=6).double()
    clone.load_state_dict(model.state_dict())
    b, t = _inputs()
    torch.testing.assert_close(clone(b, t), model(b, t), rtol=0, atol=0)

    fno = _fno()
    buf = io.BytesIO()
    torch.save(fno.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fclone = fno2d(in_channels=2, out_channels=1, width=6, modes1=3, modes2=3, layers=2, projection=8).double()
    fclone.load_state_dict(state)
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(fclone(x), fno(x), rtol=0, atol=0)
