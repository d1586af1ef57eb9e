"""The network's solution fields and their exact input derivatives at a batch of points.

:class:`Fields` wraps the network ``q(x)`` at points ``x`` ``[N, d]``. The network's output
columns are named by ``outputs`` (``pde.outputs``; one output named ``u`` by default), and a
component and its derivatives are addressed by name: ``F["v"]``, ``F.d("u", "x")``,
``F.d2("v", "y", "y")``, ``F.d3("u", "x", "x", "x")``, ``F.laplacian("u")``. With one name
less, the first output is meant (``F.u``, ``F.d("x")``, ``F.d2("x", "y")``, ``F.laplacian()``),
so single-output residuals read as before. Unknown constants (``pde.unknowns``) are further
columns, constant in ``x``, read the same way (``F["nu"]``).

Derivatives are forward-mode ``torch.func.jvp`` of the *batched* network along the coordinate
directions (nested for higher orders): exact automatic differentiation, never finite
differences. One JVP gives a derivative of every component at once, and each is computed once
(``F.d("u", "x")`` and ``F.d("v", "x")`` share it). They compose with the outer ``torch.func``
transforms that differentiate with respect to θ. This assumes the network treats rows
independently (true for pointwise networks in eval mode). The variable ``t`` is time and
excluded from spatial operators.

User residual functions receive a :class:`Fields` (see :mod:`lsr_cli.pde.equations`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

TIME = "t"
DEFAULT_OUTPUT = "u"

Key = tuple[int, ...]
"""A quantity of :class:`Fields`: ``(c,)`` the values of column ``c``, ``(c, i)`` ``∂q_c/∂x_i``,
``(c, i, j)`` ``∂²q_c/∂x_i∂x_j`` (``i ≤ j``), ``(c, i, j, k)`` third derivatives (sorted)."""

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
    """The components of ``q`` and their derivatives at ``x`` (``[N, d]``, columns named by
    ``variables``); ``outputs`` names the network's output columns in order (default ``["u"]``)."""

    def __init__(
        self,
        model: Callable[[Tensor], Tensor],
        x: Tensor,
        variables: Sequence[str],
        outputs: Sequence[str] | None = None,
    ) -> None:
        if x.ndim != 2 or x.shape[1] != len(variables):
            raise ValueError(
                f"points must be [N, {len(variables)}] for variables {list(variables)}, got {tuple(x.shape)}"
            )
        self.x = x
        self.variables = list(variables)
        self.outputs = list(outputs) if outputs else [DEFAULT_OUTPUT]
        self._model = model
        self._full: dict[tuple[int, ...], Tensor] = {}  # derivative indices -> [N, C], every column
        self._quantities: dict[Key, Tensor] = {}
        if _RECORDERS:
            _RECORDERS[-1].append(self)

    # -- the quantities and their cache (used by subspace_newton's tables) ---------------------

    def used(self) -> list[Key]:
        """The quantities computed so far (what a residual asked for), in a fixed order."""
        return sorted(self._quantities, key=lambda k: (len(k), k))

    def value(self, key: Key) -> Tensor:
        """The quantity ``key`` ``[N]`` (computed if needed)."""
        c, derivs = key[0], tuple(sorted(key[1:]))
        canonical = (c, *derivs)
        if canonical not in self._quantities:
            full = self._derivative(derivs)
            if c >= full.shape[1]:
                raise IndexError(f"the network has {full.shape[1]} output column(s); column {c} was asked for")
            self._quantities[canonical] = full[:, c]
        return self._quantities[canonical]

    def preset(self, key: Key, value: Tensor) -> None:
        """Give quantity ``key`` a value instead of computing it (see :class:`TabulatedModel`)."""
        canonical = (key[0], *sorted(key[1:]))
        self._quantities[canonical] = value

    def _values(self, x: Tensor) -> Tensor:
        out = self._model(x)
        return out.reshape(out.shape[0], -1) if out.ndim != 1 else out[:, None]

    def _direction(self, i: int) -> Tensor:
        e = torch.zeros_like(self.x)
        e[:, i] = 1.0
        return e

    def _derivative(self, derivs: tuple[int, ...]) -> Tensor:
        """``∂^k q / ∂x_{i1}…∂x_{ik}`` for every column: ``[N, C]`` (nested JVPs)."""
        if derivs not in self._full:
            fn: Callable[[Tensor], Tensor] = self._values
            for i in derivs:
                fn = _along(fn, self._direction(i))
            self._full[derivs] = fn(self.x)
        return self._full[derivs]

    # -- names --------------------------------------------------------------------------------

    def _index(self, name: str) -> int:
        try:
            return self.variables.index(name)
        except ValueError:
            raise KeyError(f"unknown variable {name!r}; the variables are {self.variables}") from None

    def _column(self, name: str) -> int:
        try:
            return self.outputs.index(name)
        except ValueError:
            raise KeyError(f"unknown output {name!r}; the outputs are {self.outputs} (pde.outputs)") from None

    def _split(self, names: tuple[str, ...], order: int) -> tuple[int, list[int]]:
        """``(column, variable indices)`` of ``[component,] var, ...`` (component optional)."""
        if len(names) == order:
            return 0, [self._index(v) for v in names]
        if len(names) == order + 1:
            return self._column(names[0]), [self._index(v) for v in names[1:]]
        raise TypeError(f"expected [component,] and {order} variable name(s), got {list(names)}")

    def _component(self, component: str | None) -> int:
        return 0 if component is None else self._column(component)

    @property
    def spatial(self) -> list[str]:
        return [v for v in self.variables if v != TIME]

    # -- what residuals use ---------------------------------------------------------------------

    def __getitem__(self, component: str) -> Tensor:
        """Values ``[N]`` of output ``component``."""
        return self.value((self._column(component),))

    @property
    def u(self) -> Tensor:
        """Values ``[N]`` of the first output."""
        return self.value((0,))

    def var(self, name: str) -> Tensor:
        """Coordinate column ``[N]`` of variable ``name``."""
        return self.x[:, self._index(name)]

    def d(self, *names: str) -> Tensor:
        """First derivative: ``d("x")`` is ``∂u/∂x`` of the first output, ``d("v", "x")`` ``∂v/∂x``: ``[N]``."""
        c, idx = self._split(names, 1)
        return self.value((c, *idx))

    def d2(self, *names: str) -> Tensor:
        """Second derivative: ``d2("x", "y")`` (first output) or ``d2("v", "y", "y")``: ``[N]``."""
        c, idx = self._split(names, 2)
        return self.value((c, *idx))

    def d3(self, *names: str) -> Tensor:
        """Third derivative: ``d3("x", "x", "x")`` (first output) or ``d3("u", "x", "x", "t")``: ``[N]``."""
        c, idx = self._split(names, 3)
        return self.value((c, *idx))

    def gradient(self, component: str | None = None) -> Tensor:
        """``∂q_c/∂x_i`` for all variables: ``[N, d]``."""
        c = self._component(component)
        return torch.stack([self.value((c, i)) for i in range(len(self.variables))], dim=1)

    def hessian(self, component: str | None = None) -> Tensor:
        """``∂²q_c/∂x_i∂x_j``: ``[N, d, d]``."""
        c, d = self._component(component), len(self.variables)
        rows = [torch.stack([self.value((c, i, j)) for j in range(d)], dim=1) for i in range(d)]
        return torch.stack(rows, dim=1)

    def laplacian(self, component: str | None = None) -> Tensor:
        """``Σ_i ∂²q_c/∂x_i²`` over the spatial variables: ``[N]``."""
        c = self._component(component)
        total = torch.zeros_like(self.x[:, 0])
        for v in self.spatial:
            i = self._index(v)
            total = total + self.value((c, i, i))
        return total

    def spatial_gradient(self, component: str | None = None) -> Tensor:
        """``∇_x q_c`` over the spatial variables: ``[N, d_space]``."""
        c = self._component(component)
        return torch.stack([self.value((c, self._index(v))) for v in self.spatial], dim=1)


def _along(fn: Callable[[Tensor], Tensor], e: Tensor) -> Callable[[Tensor], Tensor]:
    """The directional derivative of ``fn`` along ``e``, as a function of ``x``."""

    def derivative(x: Tensor) -> Tensor:
        return torch.func.jvp(fn, (x,), (e,))[1]

    return derivative


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

    def fields(self, x: Tensor, variables: Sequence[str], outputs: Sequence[str] | None = None) -> Fields:
        k = self._made % len(self.layout)
        start = sum(len(keys) for keys in self.layout[:k])
        self._made += 1
        F = Fields(self, x, variables, outputs)
        for c, key in enumerate(self.layout[k]):
            F.preset(key, self.table[:, start + c])
        return F
