"""The network's solution field and its exact input derivatives at a batch of points.

:class:`Fields` wraps ``u(x)`` (the network, one scalar output per point) at points ``x``
``[N, d]`` and computes, on demand and once, the values ``u`` ``[N]``, first derivatives and
second derivatives by forward-mode ``torch.func.jvp`` of the *batched* network along the
coordinate directions (nested twice for second derivatives): exact automatic differentiation,
never finite differences, a few batched passes instead of per-point Jacobians, and composable
with the outer ``torch.func`` transforms that differentiate with respect to θ. This assumes the
network treats rows independently (true for pointwise networks in eval mode).
Variables are addressed by name (``F.d("x")``, ``F.d2("x", "y")``, ``F.laplacian()``); the
variable ``t`` is time and excluded from spatial operators.

User residual functions receive a :class:`Fields` (see :mod:`lsr_cli.pde.equations`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

TIME = "t"


class Fields:
    """``u`` and its derivatives at ``x`` (``[N, d]``, columns named by ``variables``)."""

    def __init__(self, model: Callable[[Tensor], Tensor], x: Tensor, variables: Sequence[str]) -> None:
        if x.ndim != 2 or x.shape[1] != len(variables):
            raise ValueError(
                f"points must be [N, {len(variables)}] for variables {list(variables)}, got {tuple(x.shape)}"
            )
        self.x = x
        self.variables = list(variables)
        self._model = model
        self._u: Tensor | None = None
        self._d1: dict[int, Tensor] = {}
        self._d2: dict[tuple[int, int], Tensor] = {}

    def _values(self, x: Tensor) -> Tensor:
        out = self._model(x)
        return out.reshape(out.shape[0], -1)[:, 0] if out.ndim > 1 else out

    def _direction(self, i: int) -> Tensor:
        e = torch.zeros_like(self.x)
        e[:, i] = 1.0
        return e

    def _first(self, i: int) -> Tensor:
        if i not in self._d1:
            self._d1[i] = torch.func.jvp(self._values, (self.x,), (self._direction(i),))[1]
        return self._d1[i]

    def _second(self, i: int, j: int) -> Tensor:
        key = (min(i, j), max(i, j))
        if key not in self._d2:
            ei, ej = self._direction(key[0]), self._direction(key[1])

            def along_i(x: Tensor) -> Tensor:
                return torch.func.jvp(self._values, (x,), (ei,))[1]

            self._d2[key] = torch.func.jvp(along_i, (self.x,), (ej,))[1]
        return self._d2[key]

    def _index(self, name: str) -> int:
        try:
            return self.variables.index(name)
        except ValueError:
            raise KeyError(f"unknown variable {name!r}; the variables are {self.variables}") from None

    @property
    def spatial(self) -> list[str]:
        return [v for v in self.variables if v != TIME]

    @property
    def u(self) -> Tensor:
        """Values ``[N]``."""
        if self._u is None:
            self._u = self._values(self.x)
        return self._u

    def var(self, name: str) -> Tensor:
        """Coordinate column ``[N]`` of variable ``name``."""
        return self.x[:, self._index(name)]

    def gradient(self) -> Tensor:
        """``∂u/∂x_i`` for all variables: ``[N, d]``."""
        return torch.stack([self._first(i) for i in range(len(self.variables))], dim=1)

    def hessian(self) -> Tensor:
        """``∂²u/∂x_i∂x_j``: ``[N, d, d]``."""
        d = len(self.variables)
        rows = [torch.stack([self._second(i, j) for j in range(d)], dim=1) for i in range(d)]
        return torch.stack(rows, dim=1)

    def d(self, name: str) -> Tensor:
        """First derivative ``∂u/∂name``: ``[N]``."""
        return self._first(self._index(name))

    def d2(self, a: str, b: str) -> Tensor:
        """Second derivative ``∂²u/∂a∂b``: ``[N]``."""
        return self._second(self._index(a), self._index(b))

    def laplacian(self) -> Tensor:
        """``Σ_i ∂²u/∂x_i²`` over the spatial variables: ``[N]``."""
        total = torch.zeros_like(self.x[:, 0])
        for v in self.spatial:
            i = self._index(v)
            total = total + self._second(i, i)
        return total

    def spatial_gradient(self) -> Tensor:
        """``∇_x u`` over the spatial variables: ``[N, d_space]``."""
        return torch.stack([self._first(self._index(v)) for v in self.spatial], dim=1)
