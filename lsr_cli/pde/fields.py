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

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

TIME = "t"

Key = tuple[int, ...]
"""A cached quantity of :class:`Fields`: ``()`` the values, ``(i,)`` ``∂u/∂x_i``, ``(i, j)`` ``∂²u/∂x_i∂x_j`` (i ≤ j)."""

_RECORDERS: list[list[Fields]] = []


@contextmanager
def recording() -> Iterator[list[Fields]]:
    """Collect every :class:`Fields` made inside the block, in order of creation."""
    seen: list[Fields] = []
    _RECORDERS.append(seen)
    try:
        yield seen
    finally:
        _RECORDERS.pop()


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
        if _RECORDERS:
            _RECORDERS[-1].append(self)

    def used(self) -> list[Key]:
        """The quantities computed so far (what a residual asked for), in a fixed order."""
        keys: list[Key] = [()] if self._u is not None else []
        return keys + [(i,) for i in sorted(self._d1)] + sorted(self._d2)

    def value(self, key: Key) -> Tensor:
        """The quantity ``key`` (computed if needed)."""
        if len(key) == 0:
            return self.u
        if len(key) == 1:
            return self._first(key[0])
        return self._second(key[0], key[1])

    def preset(self, key: Key, value: Tensor) -> None:
        """Give quantity ``key`` a value instead of computing it (see :class:`TabulatedModel`)."""
        if len(key) == 0:
            self._u = value
        elif len(key) == 1:
            self._d1[key[0]] = value
        else:
            self._d2[(key[0], key[1])] = value

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


class TabulatedModel:
    """Stands in for the network in a residual: the ``k``-th :class:`Fields` a residual makes
    from it gets its quantities (``layout[k]``) from columns of ``table`` ``[N, C]``, in order.

    It lets a residual be evaluated on values that are not a network's, e.g. those of the
    linearized predictor ``u0 + Σ_j z_j φ_j`` tabulated as ``base + V z``, and differentiated with
    respect to them. Asking for a quantity that is not in the table is an error."""

    def __init__(self, layout: list[list[Key]], table: Tensor) -> None:
        self.layout = layout
        self.table = table
        self._made = 0

    def __call__(self, x: Tensor) -> Tensor:
        raise RuntimeError("the residual asked for a quantity of u that was not tabulated")

    def fields(self, x: Tensor, variables: Sequence[str]) -> Fields:
        k = self._made % len(self.layout)
        start = sum(len(keys) for keys in self.layout[:k])
        self._made += 1
        F = Fields(self, x, variables)
        for c, key in enumerate(self.layout[k]):
            F.preset(key, self.table[:, start + c])
        return F
