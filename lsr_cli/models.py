"""Built-in model factories, so that common state-dict checkpoints need no user code.

A factory is named in the config as ``model.factory``: a built-in name from
:data:`BUILTIN_FACTORIES` or ``"package.module:callable"`` / ``"path/to/file.py:callable"``
(user code, imported only because the user named it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "sigmoid": nn.Sigmoid,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
}


class MLP(nn.Module):
    """Fully connected network ``in_features → hidden… → out_features``.

    Inputs are standardized by the buffers ``input_shift`` and ``input_scale``
    (``(x - shift) / scale``, shape ``[in_features]``), so that z-scoring is part of the
    checkpoint. Input ``x``: ``[N, in_features]``; output: ``[N, out_features]``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: Sequence[int] = (64, 64, 64),
        activation: str = "tanh",
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        widths = [int(in_features), *[int(h) for h in hidden], int(out_features)]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            layers.append(nn.Linear(a, b))
            if i < len(widths) - 2:
                layers.append(ACTIVATIONS[activation]())
        self.net = nn.Sequential(*layers)
        self.register_buffer("input_shift", torch.zeros(int(in_features)))
        self.register_buffer("input_scale", torch.ones(int(in_features)))

    def forward(self, x: Tensor) -> Tensor:
        return self.net((x - self.input_shift) / self.input_scale)  # type: ignore[operator]


def mlp(
    in_features: int,
    out_features: int,
    hidden: Sequence[int] = (64, 64, 64),
    activation: str = "tanh",
) -> MLP:
    """Factory of :class:`MLP` (config: ``factory: mlp``)."""
    return MLP(in_features, out_features, hidden, activation)


BUILTIN_FACTORIES = {"mlp": mlp}
