"""Operator networks: DeepONet, MultiONet and a small 2-D Fourier neural operator (FNO).

Both are plain ``nn.Module``s that ``torch.jit.script`` compiles, so that a trained model can
be shipped as a TorchScript checkpoint or as a state dict plus one of the factories below
(config: ``model.factory: "lsr_cli.operators:deeponet"``, ``"lsr_cli.operators:multionet"`` or
``"lsr_cli.operators:fno2d"``).

Calling conventions
-------------------
``DeepONet(branch, trunk)``, with ``u(s)(y) = Σ_k b_k(s) · t_k(y) + bias``:

- ``layout="cartesian"``: ``branch`` ``[B, m]`` (input functions at ``m`` sensors), ``trunk``
  ``[P, d]`` (query points, shared by all functions) → ``[B, P]``.
- ``layout="paired"``: ``branch`` ``[N, m]``, ``trunk`` ``[N, d]`` (row ``i`` pairs function
  ``i`` with point ``i``) → ``[N, 1]``.

The two layouts share parameters and buffers: a state dict saved from one loads into the other.
``MultiONet(branch, trunk)`` takes the same inputs and layouts (see :class:`MultiONet`).

``FNO2d(x)``: ``x`` ``[N, in_channels, H, W]`` → ``[N, out_channels, H, W]``. With
``coordinates=True`` the model appends the cell-centre coordinates ``((i + ½)/H, (j + ½)/W)``
as two extra channels itself. The spectral weights are complex parameters (``torch.cfloat`` or
``torch.cdouble``); ``.double()`` / ``.to(torch.float64)`` turn them into ``torch.cdouble``
(plain ``nn.Module`` conversions would keep them ``cfloat``, or drop their imaginary part).

Inputs are standardized inside the models by buffers (``input_shift`` / ``input_scale``), and
the FNO's outputs are de-standardized by ``output_shift`` / ``output_scale``, so that the
scaling travels with the checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .models import ACTIVATIONS, MLP

LAYOUTS = ("cartesian", "paired")
MULTIONET_ACTIVATIONS = (*ACTIVATIONS, "tanh_sin")


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if int(value) < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")


class DeepONet(nn.Module):
    """Unstacked DeepONet: branch MLP ``m → width×depth → p``, trunk MLP ``d → width×depth → p``.

    ``branch_features`` (m): sensors per input function; ``trunk_features`` (d): coordinates per
    query point; ``width``/``depth``: hidden width and number of hidden layers of both MLPs;
    ``basis`` (p): number of basis functions. Both MLPs z-score their inputs by their buffers
    ``branch.input_shift``/``branch.input_scale`` ``[m]`` and ``trunk.input_shift``/
    ``trunk.input_scale`` ``[d]``. ``bias`` ``[1]`` is a parameter when ``out_bias`` else a zero
    buffer. See the module docstring for the two layouts.
    """

    def __init__(
        self,
        branch_features: int,
        trunk_features: int,
        width: int = 64,
        depth: int = 3,
        basis: int = 64,
        activation: str = "tanh",
        layout: str = "cartesian",
        out_bias: bool = True,
    ) -> None:
        super().__init__()
        _check_positive(
            branch_features=branch_features, trunk_features=trunk_features, width=width, depth=depth, basis=basis
        )
        _check_activation(activation)
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
        hidden = [int(width)] * int(depth)
        self.branch = MLP(int(branch_features), int(basis), hidden, activation)
        self.trunk = MLP(int(trunk_features), int(basis), hidden, activation)
        self.layout: str = layout
        if out_bias:
            self.bias = nn.Parameter(torch.zeros(1))
        else:
            self.register_buffer("bias", torch.zeros(1))

    def forward(self, branch: Tensor, trunk: Tensor) -> Tensor:
        """``[B, m], [P, d] → [B, P]`` (cartesian) or ``[N, m], [N, d] → [N, 1]`` (paired)."""
        b = self.branch(branch)
        t = self.trunk(trunk)
        if self.layout == "paired":
            return (b * t).sum(dim=1, keepdim=True) + self.bias
        return torch.einsum("bk,pk->bp", b, t) + self.bias


class SpectralConv2d(nn.Module):
    """Fourier layer ``[N, C_in, H, W] → [N, C_out, H, W]``: multiply the lowest Fourier modes.

    Keeps the modes ``kx ∈ [0, modes1) ∪ [H − modes1, H)`` (non-negative and negative ``kx``) and
    ``ky ∈ [0, modes2)`` of ``rfft2(x)``, multiplies each by a complex ``C_in × C_out`` matrix
    (``weight_pos`` and ``weight_neg``, ``[C_in, C_out, modes1, modes2]``, complex), zeroes the
    rest and transforms back with ``irfft2``. Needs ``H ≥ 2·modes1`` and ``W // 2 + 1 ≥ modes2``.
    Written without in-place writes, so that forward-mode AD and ``torch.func`` work through it.
    """

    def __init__(self, in_channels: int, out_channels: int, modes1: int, modes2: int) -> None:
        super().__init__()
        _check_positive(in_channels=in_channels, out_channels=out_channels, modes1=modes1, modes2=modes2)
        self.out_channels = int(out_channels)
        self.modes1 = int(modes1)
        self.modes2 = int(modes2)
        scale = 1.0 / (in_channels * out_channels)
        shape = (int(in_channels), int(out_channels), self.modes1, self.modes2)
        self.weight_pos = nn.Parameter(scale * torch.rand(shape, dtype=torch.cfloat))
        self.weight_neg = nn.Parameter(scale * torch.rand(shape, dtype=torch.cfloat))

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> SpectralConv2d:  # type: ignore[override]
        """Apply ``fn`` to the real and imaginary parts of complex tensors separately.

        ``nn.Module.double()`` skips complex tensors and ``.to(torch.float64)`` casts them to
        real (dropping the imaginary part); converting the parts keeps complex parameters
        complex with the matching precision (``float64`` → ``cdouble``).
        """

        def convert(t: Tensor) -> Tensor:
            if not t.is_complex():
                return fn(t)
            re, im = fn(t.real), fn(t.imag)
            if re.is_complex():  # fn casts to a complex dtype itself
                return re + 1j * im
            return torch.complex(re, im)

        return super()._apply(convert, recurse)

    def forward(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        m1, m2 = self.modes1, self.modes2
        if h < 2 * m1 or w // 2 + 1 < m2:
            raise RuntimeError(
                f"SpectralConv2d: grid {h}x{w} too small for modes ({m1}, {m2}); "
                f"needs H >= 2*modes1 and W//2 + 1 >= modes2"
            )
        x_ft = torch.fft.rfft2(x)  # [N, C_in, H, W//2 + 1]
        w_pos = self.weight_pos.to(x_ft.dtype)
        w_neg = self.weight_neg.to(x_ft.dtype)
        top = torch.einsum("nixy,ioxy->noxy", x_ft[:, :, :m1, :m2], w_pos)
        bottom = torch.einsum("nixy,ioxy->noxy", x_ft[:, :, h - m1 :, :m2], w_neg)
        middle = torch.zeros(n, self.out_channels, h - 2 * m1, m2, dtype=x_ft.dtype, device=x.device)
        right = torch.zeros(n, self.out_channels, h, w // 2 + 1 - m2, dtype=x_ft.dtype, device=x.device)
        out_ft = torch.cat([torch.cat([top, middle, bottom], dim=2), right], dim=3)
        return torch.fft.irfft2(out_ft, s=[h, w])


class FourierBlock(nn.Module):
    """``act(SpectralConv2d(x) + Conv1x1(x))``, ``[N, width, H, W] → [N, width, H, W]``."""

    def __init__(self, width: int, modes1: int, modes2: int, activation: str, last: bool) -> None:
        super().__init__()
        self.spectral = SpectralConv2d(width, width, modes1, modes2)
        self.pointwise = nn.Conv2d(width, width, kernel_size=1)
        self.act = ACTIVATIONS[activation]() if not last else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.spectral(x) + self.pointwise(x))


class FNO2d(nn.Module):
    """Fourier neural operator for fields on a regular grid, ``[N, C_in, H, W] → [N, C_out, H, W]``.

    lift (1×1 conv, ``C_in (+2 coordinates) → width``) → ``layers`` Fourier blocks (no activation
    after the last) → projection (1×1 conv ``width → projection``, activation, 1×1 conv
    ``projection → C_out``). ``padding`` zero-pads the right and bottom of the lifted field by
    that many cells before the Fourier blocks and crops afterwards (for non-periodic problems).
    Buffers: ``input_shift``/``input_scale`` ``[C_in]`` standardize the input channels,
    ``output_shift``/``output_scale`` ``[C_out]`` de-standardize the outputs.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        width: int = 12,
        modes1: int = 5,
        modes2: int = 5,
        layers: int = 3,
        activation: str = "gelu",
        projection: int = 32,
        coordinates: bool = True,
        padding: int = 0,
    ) -> None:
        super().__init__()
        _check_positive(
            in_channels=in_channels,
            out_channels=out_channels,
            width=width,
            modes1=modes1,
            modes2=modes2,
            layers=layers,
            projection=projection,
        )
        _check_activation(activation)
        if int(padding) < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        self.coordinates: bool = bool(coordinates)
        self.padding: int = int(padding)
        lifted = int(in_channels) + (2 if self.coordinates else 0)
        self.lift = nn.Conv2d(lifted, int(width), kernel_size=1)
        self.blocks = nn.ModuleList(
            [
                FourierBlock(int(width), int(modes1), int(modes2), activation, i == layers - 1)
                for i in range(int(layers))
            ]
        )
        self.proj1 = nn.Conv2d(int(width), int(projection), kernel_size=1)
        self.proj_act = ACTIVATIONS[activation]()
        self.proj2 = nn.Conv2d(int(projection), int(out_channels), kernel_size=1)
        self.register_buffer("input_shift", torch.zeros(int(in_channels)))
        self.register_buffer("input_scale", torch.ones(int(in_channels)))
        self.register_buffer("output_shift", torch.zeros(int(out_channels)))
        self.register_buffer("output_scale", torch.ones(int(out_channels)))

    def forward(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        x = (x - self.input_shift.view(1, -1, 1, 1)) / self.input_scale.view(1, -1, 1, 1)  # type: ignore[operator]
        if self.coordinates:
            gx = (torch.arange(h, dtype=x.dtype, device=x.device) + 0.5) / h
            gy = (torch.arange(w, dtype=x.dtype, device=x.device) + 0.5) / w
            cx = gx.view(1, 1, h, 1).expand(n, 1, h, w)
            cy = gy.view(1, 1, 1, w).expand(n, 1, h, w)
            x = torch.cat([x, cx, cy], dim=1)
        x = self.lift(x)
        if self.padding > 0:
            x = F.pad(x, [0, self.padding, 0, self.padding])
        for block in self.blocks:
            x = block(x)
        if self.padding > 0:
            x = x[:, :, :h, :w]
        x = self.proj2(self.proj_act(self.proj1(x)))
        return x * self.output_scale.view(1, -1, 1, 1) + self.output_shift.view(1, -1, 1, 1)  # type: ignore[operator]


class TanhSin(nn.Module):
    """``tanh(sin(π (x + 1))) + x``: the ``Tanh_Sin`` activation of Zang's MultiONet examples."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(torch.sin(math.pi * (x + 1.0))) + x


class MultiONetTower(nn.Module):
    """One side (branch or trunk) of a :class:`MultiONet`: ``in_features → width`` (input layer),
    then ``depth`` layers ``width → width``, every layer followed by the activation.

    ``x`` ``[N, in_features]`` is z-scored by the buffers ``input_shift``/``input_scale``
    ``[in_features]``; returns the ``depth`` hidden outputs after the input layer, each ``[N, width]``.
    """

    def __init__(self, in_features: int, width: int, depth: int, activation: str) -> None:
        super().__init__()
        self.input_layer = nn.Linear(int(in_features), int(width))
        self.hidden = nn.ModuleList([nn.Linear(int(width), int(width)) for _ in range(int(depth))])
        self.act = TanhSin() if activation == "tanh_sin" else ACTIVATIONS[activation]()
        self.register_buffer("input_shift", torch.zeros(int(in_features)))
        self.register_buffer("input_scale", torch.ones(int(in_features)))

    def forward(self, x: Tensor) -> list[Tensor]:
        h = self.act(self.input_layer((x - self.input_shift) / self.input_scale))  # type: ignore[operator]
        outs: list[Tensor] = []
        for layer in self.hidden:
            h = self.act(layer(h))
            outs.append(h)
        return outs


class MultiONet(nn.Module):
    """MultiONet (Zang & Koutsourelakis): a DeepONet whose output averages the branch–trunk inner
    products of several hidden layers instead of taking one at the last layer.

    Branch and trunk are :class:`MultiONetTower`\\ s with the same ``width`` and ``depth``; with
    ``b_l``, ``t_l`` their outputs after hidden layer ``l`` (``l = 1..depth``, the input layer not
    counted) and ``S`` the last ``sum_layers`` layers (all by default),

        u(s)(y) = (1/|S|) Σ_{l ∈ S} w_l ⟨b_l(s), t_l(y)⟩ + bias,

    ``w`` = ``layer_weights`` ``[|S|]`` (learnable, initialized to 1), ``bias`` ``[1]`` (a parameter
    when ``out_bias`` else a zero buffer). Inputs are z-scored by ``branch.input_shift``/
    ``branch.input_scale`` ``[m]`` and ``trunk.input_shift``/``trunk.input_scale`` ``[d]``. Layouts
    as :class:`DeepONet`: ``"cartesian"`` ``[B, m], [P, d] → [B, P]``; ``"paired"``
    ``[N, m], [N, d] → [N, 1]``. ``activation``: a name of :data:`lsr_cli.models.ACTIVATIONS` or
    ``"tanh_sin"`` (:class:`TanhSin`).

    Source: the authors' code, github.com/yaohua32/Deep-Neural-Operators-for-PDEs,
    ``Networks/MultiONets.py`` (``MultiONetCartesianProd``; DGenNO paper, arXiv 2502.06250). The
    version that produced their Burgers example (commit 2a0b161, ``hidden_list=[128]*3``, 115 846
    parameters) sums every hidden layer after the input layer, ``(1/L) Σ_l (w_l ⟨b_l, t_l⟩ + β_l)``
    with ``w_l = 1``, ``β_l = 0`` at start; here the ``L`` biases are one ``bias`` (same function,
    without ``L − 1`` redundant parameters). Their later version (commit c32cec3) sums only the last
    ``sum_layers`` layers, starts ``w_l`` at 0 and has one bias; ``sum_layers`` covers that choice.
    ``width=128, depth=3`` has 115 844 parameters, as many as ``DeepONet(width=128, depth=3,
    basis=128)`` (115 841).
    """

    def __init__(
        self,
        branch_features: int,
        trunk_features: int,
        width: int = 128,
        depth: int = 3,
        sum_layers: int | None = None,
        activation: str = "tanh",
        layout: str = "cartesian",
        out_bias: bool = True,
    ) -> None:
        super().__init__()
        _check_positive(branch_features=branch_features, trunk_features=trunk_features, width=width, depth=depth)
        summed = int(depth) if sum_layers is None else int(sum_layers)
        if not 1 <= summed <= int(depth):
            raise ValueError(f"sum_layers must be between 1 and depth ({depth}), got {sum_layers}")
        if activation not in MULTIONET_ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(MULTIONET_ACTIVATIONS)}, got {activation!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
        self.branch = MultiONetTower(int(branch_features), int(width), int(depth), activation)
        self.trunk = MultiONetTower(int(trunk_features), int(width), int(depth), activation)
        self.layout: str = layout
        self.first: int = int(depth) - summed
        self.num_summed: int = summed
        self.layer_weights = nn.Parameter(torch.ones(summed))
        if out_bias:
            self.bias = nn.Parameter(torch.zeros(1))
        else:
            self.register_buffer("bias", torch.zeros(1))

    def _inner(self, b: Tensor, t: Tensor) -> Tensor:
        if self.layout == "paired":
            return (b * t).sum(dim=1, keepdim=True)
        return torch.einsum("bk,pk->bp", b, t)

    def forward(self, branch: Tensor, trunk: Tensor) -> Tensor:
        """``[B, m], [P, d] → [B, P]`` (cartesian) or ``[N, m], [N, d] → [N, 1]`` (paired)."""
        bs = self.branch(branch)
        ts = self.trunk(trunk)
        out = self.layer_weights[0] * self._inner(bs[self.first], ts[self.first])
        for k in range(1, self.num_summed):
            out = out + self.layer_weights[k] * self._inner(bs[self.first + k], ts[self.first + k])
        return out / self.num_summed + self.bias


def deeponet(**kwargs: Any) -> DeepONet:
    """Factory of :class:`DeepONet` (config: ``factory: "lsr_cli.operators:deeponet"``)."""
    return DeepONet(**kwargs)


def multionet(**kwargs: Any) -> MultiONet:
    """Factory of :class:`MultiONet` (config: ``factory: "lsr_cli.operators:multionet"``)."""
    return MultiONet(**kwargs)


def fno2d(**kwargs: Any) -> FNO2d:
    """Factory of :class:`FNO2d` (config: ``factory: "lsr_cli.operators:fno2d"``)."""
    return FNO2d(**kwargs)
