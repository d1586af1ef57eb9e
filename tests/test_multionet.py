"""MultiONet (lsr_cli.operators): shapes, the layer-averaged inner product by hand, TorchScript,
torch.func, bad arguments, and a state-dict checkpoint refined through the CLI."""

from __future__ import annotations

import io
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, jvp, vmap

from lsr_cli.operators import MultiONet, multionet
from tests.test_cli import assert_ok, run

EXACT = 1e-12  # same float64 arithmetic in a different order (einsum vs. hand sums, script vs. eager)
SENSORS, POINTS = 5, 4


def _net(layout: str = "cartesian", **kw) -> MultiONet:
    torch.manual_seed(0)
    kw = {"width": 6, "depth": 3, **kw}
    model = MultiONet(SENSORS, 1, layout=layout, **kw).double()
    with torch.no_grad():  # non-trivial buffers and layer weights, so that the test sees them
        model.branch.input_shift.uniform_(-0.5, 0.5)
        model.branch.input_scale.uniform_(0.5, 2.0)
        model.trunk.input_shift.fill_(0.3)
        model.trunk.input_scale.fill_(0.7)
        model.layer_weights.copy_(torch.linspace(0.5, 1.5, model.num_summed, dtype=torch.float64))
        model.bias.fill_(0.25)
    return model


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(3, SENSORS, generator=g, dtype=torch.float64),
        torch.rand(POINTS, 1, generator=g, dtype=torch.float64),
    )


def _by_hand(model: MultiONet, branch: torch.Tensor, trunk: torch.Tensor) -> torch.Tensor:
    """``(1/|S|) Σ_{l∈S} w_l Σ_k b_l[i, k] t_l[j, k] + bias`` with explicit loops, ``[B, P]``."""

    def hidden(tower, x: torch.Tensor) -> list[torch.Tensor]:
        h = torch.tanh(F.linear((x - tower.input_shift) / tower.input_scale, *tower.input_layer.parameters()))
        outs = []
        for layer in tower.hidden:
            h = torch.tanh(F.linear(h, layer.weight, layer.bias))
            outs.append(h)
        return outs

    bs, ts = hidden(model.branch, branch), hidden(model.trunk, trunk)
    summed = list(range(len(bs)))[-model.num_summed :]
    out = torch.zeros(branch.shape[0], trunk.shape[0], dtype=torch.float64)
    for i in range(branch.shape[0]):
        for j in range(trunk.shape[0]):
            acc = sum(model.layer_weights[n] * torch.dot(bs[layer][i], ts[layer][j]) for n, layer in enumerate(summed))
            out[i, j] = acc / len(summed) + model.bias[0]
    return out


def test_shapes_both_layouts_and_parameter_count() -> None:
    b, t = _inputs()
    assert _net("cartesian")(b, t).shape == (3, POINTS)
    assert _net("paired")(b, t[:3]).shape == (3, 1)
    # the paper-sized net: as many parameters as DeepONet(width=128, depth=3, basis=128) (115 841)
    assert sum(p.numel() for p in multionet(branch_features=128, trunk_features=1).parameters()) == 115_844


@pytest.mark.parametrize("sum_layers", [None, 2, 1])
def test_layer_averaged_inner_product_by_hand(sum_layers: int | None) -> None:
    model = _net(sum_layers=sum_layers)
    b, t = _inputs()
    torch.testing.assert_close(model(b, t), _by_hand(model, b, t), rtol=EXACT, atol=EXACT)


def test_paired_equals_cartesian() -> None:
    cart, paired = _net("cartesian"), _net("paired")
    paired.load_state_dict(cart.state_dict())
    b, t = _inputs()
    rows = paired(b.repeat_interleave(POINTS, dim=0), t.repeat(3, 1))
    torch.testing.assert_close(rows.reshape(3, POINTS), cart(b, t), rtol=EXACT, atol=EXACT)


@pytest.mark.parametrize("activation", ["tanh", "tanh_sin"])
def test_torchscript_round_trip(activation: str) -> None:
    model = _net(activation=activation, sum_layers=2)
    b, t = _inputs()
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(model), buf)
    buf.seek(0)
    torch.testing.assert_close(torch.jit.load(buf)(b, t), model(b, t), rtol=EXACT, atol=EXACT)


def test_torch_func_jvp_matches_vmapped_rows() -> None:
    """``functional_call`` + ``jvp`` over the parameters, and ``vmap`` over functions, agree with eager."""
    model = _net()
    b, t = _inputs()
    params = {k: v.detach() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(2)
    tangent = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in params.items()}
    out, dout = jvp(lambda p: functional_call(model, p, (b, t)), (params,), (tangent,))
    torch.testing.assert_close(out, model(b, t), rtol=EXACT, atol=EXACT)
    h = 1e-6  # central difference in float64: truncation ~1e-12, rounding ~1e-10
    plus = functional_call(model, {k: params[k] + h * tangent[k] for k in params}, (b, t))
    minus = functional_call(model, {k: params[k] - h * tangent[k] for k in params}, (b, t))
    torch.testing.assert_close(dout, (plus - minus) / (2 * h), rtol=1e-7, atol=1e-9)
    rows = vmap(lambda bi: functional_call(model, params, (bi[None], t))[0])(b)
    torch.testing.assert_close(rows, model(b, t), rtol=EXACT, atol=EXACT)


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="layout must be one of"):
        MultiONet(5, 1, layout="grid")
    with pytest.raises(ValueError, match="activation must be one of"):
        MultiONet(5, 1, activation="swish")
    with pytest.raises(ValueError, match="depth must be a positive integer"):
        MultiONet(5, 1, depth=0)
    with pytest.raises(ValueError, match=r"sum_layers must be between 1 and depth \(3\), got 4"):
        MultiONet(5, 1, depth=3, sum_layers=4)


def test_out_bias_false_has_no_bias_parameter() -> None:
    model = MultiONet(5, 1, out_bias=False)
    assert "bias" not in dict(model.named_parameters())
    assert "bias" in model.state_dict()


def test_state_dict_checkpoint_refines_through_the_cli(tmp_path: Path) -> None:
    """A tiny MultiONet state dict + ``factory: lsr_cli.operators:multionet`` refines, and the
    training error falls."""
    sensors, points = 8, 8
    x = np.arange(points) / points
    rng = np.random.default_rng(0)
    data = tmp_path / "data.h5"
    with h5py.File(data, "w") as f:
        for split, n in (("train", 24), ("val", 8), ("test", 8)):
            u0 = rng.standard_normal((n, sensors))
            g = f.create_group(split)
            inp = g.create_group("inputs")
            inp.attrs["order"] = ["branch", "trunk"]
            inp.create_dataset("branch", data=u0)
            inp.create_dataset("trunk", data=x[:, None]).attrs["shared"] = True
            g.create_dataset("targets", data=np.tanh(np.roll(u0, 1, axis=1)) + 0.1 * u0**2)
    kwargs = {"branch_features": sensors, "trunk_features": 1, "width": 6, "depth": 2}
    torch.manual_seed(0)
    torch.save(multionet(**kwargs).state_dict(), tmp_path / "model_sd.pt")
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        'model:\n  factory: "lsr_cli.operators:multionet"\n'
        f"  kwargs: {json.dumps(kwargs)}\n"
        "lsr:\n  parameters: {fraction: 0.5}\ndtype: float64\nseed: 0\n"
    )
    out = tmp_path / "refined.pt"
    result = run(
        "refine", tmp_path / "model_sd.pt", "--config", cfg, "--data", data, "--rank", "16",
        "--device", "cpu", "--out", out, "--json",
    )  # fmt: skip
    assert_ok(result)
    payload = json.loads(result.stdout)
    train = payload["splits"]["train"]
    assert train["after"]["rel_l2"] < train["before"]["rel_l2"]
    assert out.exists()
