"""The refined predictor as a Python module, and :func:`load_refined`.

``LinearizedModel(base, δ)(x) = q(θ0, x) + J(x) δ`` with one forward-mode JVP
(``torch.func.jvp``): exact, any batch size, works under ``torch.no_grad()`` and stays
differentiable with respect to the inputs when gradients are on.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from .config import ModelConfig
from .linearization import make_functional
from .runtime import cast_module, cast_tensor


def real_dtype(tensors: list[Tensor]) -> torch.dtype:
    """The real floating dtype of the first floating or complex tensor (``complex128`` → ``float64``)."""
    for t in tensors:
        if t.is_complex():
            return t.real.dtype
        if t.is_floating_point():
            return t.dtype
    return torch.float64


class LinearizedModel(nn.Module):
    """``q(θ0, x) + J(x) δ``; ``base`` holds ``θ0``, ``delta`` maps parameter names to ``δ``.

    Floating inputs are cast to ``dtype`` (that of ``δ``) and the output is in that dtype.
    """

    def __init__(self, base: nn.Module, delta: dict[str, Tensor]) -> None:
        super().__init__()
        self.base = base
        self.delta_names = list(delta)
        self.deltas = nn.ParameterList(
            [nn.Parameter(delta[n].detach().clone(), requires_grad=False) for n in self.delta_names]
        )
        self.dtype = real_dtype([d for d in self.deltas])
        self._call = make_functional(base)

    def network_at(self, scale: float = 1.0) -> dict[str, Tensor]:
        """Parameters ``θ0 + scale · δ`` (for the plain network at the refined weights)."""
        named = dict(self.base.named_parameters())
        return {
            n: named[n].detach() + scale * cast_tensor(d, real_dtype([named[n]]))
            for n, d in zip(self.delta_names, self.deltas, strict=True)
        }

    def forward(self, *inputs: Tensor) -> Tensor:
        inputs = tuple(x.to(self.dtype) if x.is_floating_point() else x for x in inputs)
        named = dict(self.base.named_parameters())
        primals = {n: named[n].detach() for n in self.delta_names}
        tangents = {n: d.detach() for n, d in zip(self.delta_names, self.deltas, strict=True)}
        out, jv = torch.func.jvp(lambda p: self._call(p, inputs), (primals,), (tangents,))  # type: ignore[misc]
        return out + jv


def load_refined(
    path: str | Path, factory: str | None = None, kwargs: dict | None = None, device: str | torch.device = "cpu"
) -> LinearizedModel:
    """Load a checkpoint written by ``lsr refine`` as an ``nn.Module`` computing the refined predictor.

    Works for both refined formats. For the state-dict format the network is rebuilt by the
    factory recorded in the file (or ``factory``/``kwargs`` given here, e.g. when the module
    that defined it moved). Runs in the refinement dtype (float64 by default).
    """
    from .checkpoint import load_checkpoint

    spec = ModelConfig(factory=factory, kwargs=dict(kwargs or {})) if factory else None
    ckpt = load_checkpoint(path, spec)
    if ckpt.delta is None:
        from .errors import CheckpointError

        raise CheckpointError(
            f"{path}: not a refined checkpoint (format {ckpt.format}); use torch.load / torch.jit.load"
        )
    dtype = real_dtype(list(ckpt.delta.values()))
    base = cast_module(ckpt.module, dtype, torch.device(device))
    delta = {k: v.to(device) for k, v in ckpt.delta.items()}
    return LinearizedModel(base, delta).eval()
