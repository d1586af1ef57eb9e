"""The network's solution field and its exact input derivatives at a batch of points.

:class:`Fields` wraps ``u(x)`` (the network, one scalar output per point) at points ``x``
``[N, d]`` and computes, on demand and once, the values ``u`` ``[N]``, the gradient ``[N, d]``
and the Hessian ``[N, d, d]`` by ``torch.func`` (``vmap`` of ``jacrev`` / ``jacfwd(jacrev)``
of the per-point function) — exact automatic differentiation, never finite differences, and
composable with the outer ``torch.func`` transforms that differentiate with respect to θ.
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
        self._grad: Tensor | None = None
        self._hess: Tensor | None = None

    def _point(self, xp: Tensor) -> Tensor:
        return self._model(xp[None]).reshape(-1)[0]

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
            out = self._model(self.x)
            self._u = out.reshape(out.shape[0], -1)[:, 0] if out.ndim > 1 else out
        return self._u

    def var(self, name: str) -> Tensor:
        """Coordinate column ``[N]`` of variable ``name``."""
        return self.x[:, self._index(name)]

    def gradient(self) -> Tensor:
        """``∂u/∂x_i`` for all variables: ``[N, d]``."""
        if self._grad is None:
            self._grad = torch.func.vmap(torch.func.jacrev(self._point))(self.x)
        return self._grad

    def hessian(self) -> Tensor:
        """``∂²u/∂x_i∂x_j``: ``[N, d, d]``."""
        if self._hess is None:
            self._hess = torch.func.vmap(torch.func.jacfwd(torch.func.jacrev(self._point)))(self.x)
        return self._hess

    def d(self, name: str) -> Tensor:
        """First derivative ``∂u/∂name``: ``[N]``."""
        return self.gradient()[:, self._index(name)]

    def d2(self, a: str, b: str) -> Tensor:
        """Second derivative ``∂²u/∂a∂b``: ``[N]``."""
        return self.hessian()[:, self._index(a), self._index(b)]

    def laplacian(self) -> Tensor:
        """``Σ_i ∂²u/∂x_i²`` over the spatial variables: ``[N]``."""
        idx = [self._index(v) for v in self.spatial]
        h = self.hessian()
        return sum((h[:, i, i] for i in idx), torch.zeros_like(self.x[:, 0]))

    def spatial_gradient(self) -> Tensor:
        """``∇_x u`` over the spatial variables: ``[N, d_space]``."""
        idx = [self._index(v) for v in self.spatial]
        return self.gradient()[:, idx]
