"""Matrix-free Jacobian products of a network with respect to (a subset of) its parameters.

``J`` is the ``n × m`` Jacobian of the flattened network output ``vec q(θ, X)`` (``n`` rows =
samples × output entries) with respect to the ``m`` linearized parameter entries, at ``θ0``.
It is never formed: :meth:`JacobianOperator.matmat` applies it to ``k`` tangents by batched
forward-mode JVPs and :meth:`JacobianOperator.rmatmat` applies ``Jᵀ`` by batched VJPs, both
chunked over sample rows and tangent columns.

Plain modules go through ``torch.func.functional_call``. TorchScript modules are refused by
that API, so their parameter attributes are swapped for the transformed tensors during the
call (``torch.func`` transforms work at the dispatcher level, below the TorchScript
interpreter) and restored afterwards.

Products in lower precision (``lsr.product_dtype: float32``): the operator is given a copy of the
module in that precision (:func:`low_precision_copy`); the sketch and projection products run
on it, with inputs and tangents cast down and every result block cast back to the operator's
dtype, where the QR and the reduced problem accumulate. ``precise=True`` (the final evaluation,
the dense path's check) always uses the module itself.
"""

from __future__ import annotations

import copy
import fnmatch
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .linear_ops import PATH_CHECK_RTOL as PATH_CHECK_RTOL
from .linear_ops import DenseOperator as DenseOperator
from .linear_ops import StackedOperator as StackedOperator
from .linear_ops import materialize as materialize
from .runtime import cast_module, cast_tensor

Inputs = tuple[Tensor, ...]
ProgressFn = Callable[[int], None]
ModelFn = Callable[..., Tensor]
ResidualFn = Callable[[ModelFn, Inputs], Tensor]
"""``residual(model, rows) -> [rows, ...]``: a residual built from the network ``model(*xs)``
(the network with the parameters being differentiated) and row slices of the operator's inputs."""


def is_torchscript(module: nn.Module) -> bool:
    """Whether ``module`` is a TorchScript module (scripted or traced)."""
    return isinstance(module, torch.jit.ScriptModule)


def _set_attr(module: nn.Module, name: str, value: Tensor) -> None:
    *path, leaf = name.split(".")
    for part in path:
        module = getattr(module, part)
    setattr(module, leaf, value)


def params_in_torchscript(module: nn.Module) -> bool:
    """Whether every parameter of ``module`` belongs to a TorchScript (sub)module, so that its
    parameters are swapped by attribute assignment (``functional_call`` refuses them)."""
    if is_torchscript(module):
        return True
    scripted = [name + "." for name, m in module.named_modules() if name and is_torchscript(m)]
    names = [n for n, _ in module.named_parameters()]
    return bool(scripted) and bool(names) and all(any(n.startswith(p) for p in scripted) for n in names)


def make_functional(module: nn.Module) -> Callable[[dict[str, Tensor], Inputs], Tensor]:
    """Return ``f(params, inputs) -> output`` evaluating ``module`` with replaced parameters.

    ``params`` maps parameter names (as in ``named_parameters``) to tensors; names not given
    keep their current values. Works under ``torch.func`` transforms for plain and
    TorchScript modules alike, and for plain wrappers whose parameters all live in TorchScript
    submodules (e.g. an operator network with some inputs held fixed).
    """
    if not params_in_torchscript(module):

        def call_plain(params: dict[str, Tensor], inputs: Inputs) -> Tensor:
            return torch.func.functional_call(module, params, inputs, strict=False)

        return call_plain

    originals = dict(module.named_parameters())

    def call_script(params: dict[str, Tensor], inputs: Inputs) -> Tensor:
        try:
            for name, value in params.items():
                _set_attr(module, name, value)
            return module(*inputs)
        finally:
            for name in params:
                _set_attr(module, name, originals[name])

    return call_script


def take_rows(inputs: Inputs, s: int, e: int, shared: Sequence[bool] = ()) -> Inputs:
    """Rows ``s:e`` of each input; inputs flagged in ``shared`` (no sample dimension, e.g. a
    DeepONet trunk grid ``[P, d]`` used by every sample) are passed whole."""
    return tuple(x if (i < len(shared) and shared[i]) else x[s:e] for i, x in enumerate(inputs))


def num_rows(inputs: Inputs, shared: Sequence[bool] = ()) -> int:
    """The sample count ``N``: the leading dimension of the first input not flagged shared."""
    for i, x in enumerate(inputs):
        if not (i < len(shared) and shared[i]):
            return int(x.shape[0])
    raise ValueError("every input is shared: no sample dimension")


def is_trainable_dtype(t: Tensor) -> bool:
    """Real floating or complex: the parameters lsr can linearize."""
    return t.is_floating_point() or t.is_complex()


def real_numel(t: Tensor) -> int:
    """Number of real scalars in ``t`` (a complex entry counts as two: real and imaginary part)."""
    return t.numel() * (2 if t.is_complex() else 1)


@dataclass(frozen=True)
class _Entry:
    name: str
    shape: torch.Size
    index: Tensor | None  # flat indices of linearized real entries, None = all
    size: int  # number of linearized real entries
    is_complex: bool = False  # linearized as [real, imag] pairs (torch.view_as_real order)


class ParameterSpace:
    """The ``m`` linearized parameter entries and the maps between flat vectors and tensors.

    Selection: parameters whose name matches one of ``include`` (fnmatch patterns; default
    all) and none of ``exclude``; then, if ``fraction < 1``, a random subset of their scalar
    entries drawn with ``generator``. Integer and boolean parameters are never linearized.
    A complex parameter (e.g. an FNO's spectral weights) is linearized as two real parameters,
    its real and imaginary parts: its block of the flat vector is ``view_as_real(p).flatten()``
    (entries interleaved re, im), so ``J`` stays a real matrix.
    """

    def __init__(
        self,
        params: dict[str, Tensor],
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        fraction: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> None:
        entries: list[_Entry] = []
        for name, p in params.items():
            if not is_trainable_dtype(p):
                continue
            if include and not any(fnmatch.fnmatchcase(name, pat) for pat in include):
                continue
            if any(fnmatch.fnmatchcase(name, pat) for pat in exclude):
                continue
            numel = real_numel(p)
            cplx = p.is_complex()
            if fraction < 1.0:
                keep = torch.rand(numel, generator=generator) < fraction
                index = torch.nonzero(keep).flatten()
                if index.numel() == 0:
                    continue
                entries.append(_Entry(name, p.shape, index.to(p.device), int(index.numel()), cplx))
            else:
                entries.append(_Entry(name, p.shape, None, numel, cplx))
        self.entries = entries
        self.num_total = sum(real_numel(p) for p in params.values() if is_trainable_dtype(p))
        self.num = sum(e.size for e in entries)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def unflatten(self, V: Tensor) -> dict[str, Tensor]:
        """``V``: ``[m, k]`` (real) → ``{name: [k, *shape]}`` (frozen entries zero; complex
        parameters get complex tangents)."""
        k = V.shape[1]
        out: dict[str, Tensor] = {}
        offset = 0
        for e in self.entries:
            block = V[offset : offset + e.size].T  # [k, size]
            offset += e.size
            if e.index is not None:
                full = V.new_zeros(k, int(torch.Size(e.shape).numel()) * (2 if e.is_complex else 1))
                full[:, e.index] = block
                block = full
            if e.is_complex:
                out[e.name] = torch.view_as_complex(block.reshape(k, *e.shape, 2).contiguous())
            else:
                out[e.name] = block.reshape(k, *e.shape)
        return out

    def flatten(self, tensors: dict[str, Tensor]) -> Tensor:
        """``{name: [k, *shape]}`` → ``[m, k]`` (only linearized entries)."""
        blocks = []
        for e in self.entries:
            t = tensors[e.name]
            if e.is_complex:
                t = torch.view_as_real(t.resolve_conj())
            t = t.reshape(t.shape[0], -1)
            if e.index is not None:
                t = t[:, e.index]
            blocks.append(t.T)
        return torch.cat(blocks, dim=0)

    def unflatten_vector(self, v: Tensor) -> dict[str, Tensor]:
        """``v``: ``[m]`` → ``{name: tensor of the parameter's shape}``."""
        return {n: t[0].clone() for n, t in self.unflatten(v[:, None]).items()}  # own storage


class CompiledJvp:
    """``vmap(jvp)`` of one row chunk through ``torch.compile`` (``lsr.compile``), shared by the
    operators of one module, parameter space and residual so that it compiles once.

    Shapes are kept static (the caller pads the last row and tangent chunks), so the graph is
    compiled on the first call only. If compiling or running the compiled graph fails, the
    failure is recorded in :attr:`status` and every later call runs eagerly (same results)."""

    def __init__(self, backend: str | Callable[..., Any]) -> None:
        self.backend = backend if isinstance(backend, str) else getattr(backend, "__name__", "custom")
        self.status: dict[str, object] = {"backend": self.backend, "used": True}
        self._fn: Callable[..., Tensor] | None = torch.compile(_jvp_block, backend=backend, dynamic=False)

    def __call__(
        self,
        apply: Callable[[dict[str, Tensor], Inputs], Tensor],
        primals: dict[str, Tensor],
        tan: dict[str, Tensor],
        rows: Inputs,
    ) -> Tensor:
        if self._fn is not None:
            first = "first_call_seconds" not in self.status
            t0 = time.perf_counter()
            try:
                out = self._fn(apply, primals, tan, rows)
                if first:
                    self.status["first_call_seconds"] = time.perf_counter() - t0
                return out
            except Exception as exc:  # no C++ compiler, an op the backend lacks, ...
                root = getattr(exc, "inner_exception", None) or exc.__cause__ or exc
                text = [ln for ln in str(root).strip().splitlines() if ln.strip()]
                self.status = {
                    "backend": self.backend,
                    "used": False,
                    "reason": f"torch.compile failed, ran eagerly: {type(root).__name__}: {(text[0] if text else '')[:200]}",
                }
                self._fn = None
        return _jvp_block(apply, primals, tan, rows)


def _jvp_block(
    apply: Callable[[dict[str, Tensor], Inputs], Tensor],
    primals: dict[str, Tensor],
    tan: dict[str, Tensor],
    rows: Inputs,
) -> Tensor:
    """``J_rows t`` for a batch of tangents ``tan`` (leading dimension): ``[k, rows, *out]``."""

    def f(p: dict[str, Tensor]) -> Tensor:
        return apply(p, rows)

    def one(t: dict[str, Tensor]) -> Tensor:
        return torch.func.jvp(f, (primals,), (t,))[1]

    return torch.func.vmap(one)(tan)


def low_precision_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``module`` (plain or TorchScript) whose floating parameters and buffers are
    ``dtype`` and complex ones its complex counterpart (``float32`` → ``complex64``), for
    Jacobian products in lower precision (``JacobianOperator(products=...)``)."""
    device = next((t.device for t in module.parameters()), torch.device("cpu"))
    with warnings.catch_warnings():  # copying and casting a TorchScript module read .grad of its parameters
        warnings.simplefilter("ignore")
        return cast_module(copy.deepcopy(module), dtype, device)


def _pad_rows(rows: Inputs, count: int, shared: Sequence[bool]) -> Inputs:
    """``rows`` with their last sample repeated ``count`` more times (shared inputs unchanged)."""
    if count <= 0:
        return rows
    return tuple(
        x if (i < len(shared) and shared[i]) else torch.cat([x, x[-1:].expand(count, *x.shape[1:])])
        for i, x in enumerate(rows)
    )


def _zero_row(inputs: Inputs, shared: Sequence[bool]) -> Inputs:
    """One sample of zeros shaped like a sample of ``inputs`` (shared inputs whole)."""
    return tuple(x if (i < len(shared) and shared[i]) else x.new_zeros(1, *x.shape[1:]) for i, x in enumerate(inputs))


class JacobianOperator:
    """``J``: ``n × m`` Jacobian of ``vec q(θ, X)`` at ``θ0`` w.r.t. a :class:`ParameterSpace`.

    ``inputs``: tensors with a common leading sample dimension ``N``, except those flagged in
    ``shared`` (passed whole with every row chunk); rows are ordered sample-major
    (``n = N · prod(output.shape[1:])``). ``row_chunk`` samples and
    ``tangent_chunk`` columns are processed at a time. With ``residual``, the rows are those
    of ``residual(model, rows_of_inputs)`` instead of the network output (a physics residual:
    the Jacobian is then ``G``). ``probe``: one row of inputs used to learn the output shape
    when ``inputs`` have no rows (a rank's empty share of a row subset); without one (or an empty
    one: a rank that holds no point at all), a row of zeros shaped like a row of ``inputs``.
    ``products``: a lower-precision copy of ``module`` (:func:`low_precision_copy`) on which
    :meth:`matmat` and :meth:`rmatmat` run unless called with ``precise=True``; results come back
    in the operator's dtype.
    """

    def __init__(
        self,
        module: nn.Module,
        space: ParameterSpace,
        inputs: Inputs,
        row_chunk: int = 2048,
        tangent_chunk: int = 32,
        residual: ResidualFn | None = None,
        shared: Sequence[bool] = (),
        probe: Inputs | None = None,
        products: nn.Module | None = None,
    ) -> None:
        self.module = module
        self.products = products
        self.residual = residual
        self.space = space
        self.inputs = inputs
        self.shared = tuple(shared)
        self.num_samples = num_rows(inputs, self.shared)
        self.row_chunk = max(1, int(row_chunk))
        self.vjp_row_chunk = self.row_chunk  # reverse-mode chunk: not tuned (see tune_row_chunk)
        self.tangent_chunk = max(1, int(tangent_chunk))
        self.compiled: CompiledJvp | None = None  # lsr.compile: see use_compiled
        self._compiled_apply: Callable[[dict[str, Tensor], Inputs], Tensor] = self._apply
        self._call = make_functional(module)
        named = dict(module.named_parameters())
        self._primals = {n: named[n].detach() for n in space.names}
        # parameters outside the space enter as detached constants: no autograd graph on them
        self._frozen = {n: p.detach() for n, p in named.items() if n not in self._primals}
        self.product_dtype: torch.dtype | None = None
        if products is not None:
            low = dict(products.named_parameters())
            self._low_call = make_functional(products)
            self._low_primals = {n: low[n].detach() for n in space.names}
            self._low_frozen = {n: p.detach() for n, p in low.items() if n not in self._low_primals}
            first_low = next(iter(self._low_primals.values()), None)
            if first_low is not None:
                self.product_dtype = first_low.real.dtype if first_low.is_complex() else first_low.dtype
        first = take_rows(inputs, 0, 1, self.shared)
        if self.num_samples == 0:  # only the shape of a row's output is learnt here
            usable = probe is not None and num_rows(probe, self.shared) > 0
            first = probe if usable and probe is not None else _zero_row(inputs, self.shared)
        out = self._forward_chunk(first)
        self.output_shape = tuple(out.shape[1:])
        self.out_numel = int(out[0].numel())
        self.dtype = out.dtype
        self.device = out.device

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_samples * self.out_numel, self.space.num)

    def use_compiled(self, compiled: CompiledJvp, like: JacobianOperator | None = None) -> None:
        """Run the JVPs through ``compiled``; with ``like`` (an operator of the same module,
        parameter space and residual) its function is traced, so the graph compiled for one
        serves both (the row chunk must match too: shapes are static)."""
        self.compiled = compiled
        self._compiled_apply = self._apply
        if (
            like is not None
            and like.module is self.module
            and like.space is self.space
            and like.residual is self.residual
        ):
            self._compiled_apply = like._apply

    def _chunks(self, size: int | None = None) -> list[tuple[int, int]]:
        n = self.num_samples
        size = size or self.row_chunk
        return [(s, min(s + size, n)) for s in range(0, n, size)]

    def _rows(self, s: int, e: int) -> Inputs:
        return take_rows(self.inputs, s, e, self.shared)

    def head(self, samples: int, row_chunk: int, tangent_chunk: int) -> JacobianOperator:
        """The operator of the first ``samples`` samples (probes and chunk tuning time it)."""
        return JacobianOperator(
            self.module,
            self.space,
            self._rows(0, samples),
            row_chunk,
            tangent_chunk,
            self.residual,
            self.shared,
            products=self.products,
        )

    def _evaluate(
        self,
        call: Callable[[dict[str, Tensor], Inputs], Tensor],
        frozen: dict[str, Tensor],
        params: dict[str, Tensor],
        rows: Inputs,
    ) -> Tensor:
        """The network ``call`` (or the residual built on it) with ``params`` over ``frozen``."""
        full = {**frozen, **params}
        if self.residual is None:
            return call(full, rows)
        return self.residual(lambda *xs: call(full, xs), rows)

    def _apply(self, params: dict[str, Tensor], rows: Inputs) -> Tensor:
        return self._evaluate(self._call, self._frozen, params, rows)

    def _apply_low(self, params: dict[str, Tensor], rows: Inputs) -> Tensor:
        return self._evaluate(self._low_call, self._low_frozen, params, rows)

    def _precision(
        self, precise: bool
    ) -> tuple[Callable[[dict[str, Tensor], Inputs], Tensor], dict[str, Tensor], Callable[[Tensor], Tensor]]:
        """``(apply, primals, cast)`` of the products: the module's own, or (``products`` given
        and not ``precise``) the lower-precision copy's, with ``cast`` bringing inputs and
        tangents down to it."""
        low = self.product_dtype
        if low is None or precise:
            return self._apply, self._primals, lambda t: t
        return self._apply_low, self._low_primals, lambda t: cast_tensor(t, low)

    def _forward_chunk(self, inputs: Inputs, params: dict[str, Tensor] | None = None) -> Tensor:
        with torch.no_grad():
            return self._apply(params or {}, inputs).detach()

    def forward(self, params: dict[str, Tensor] | None = None) -> Tensor:
        """``vec q(θ, X)``: ``[n]``, at ``θ0`` or with the given parameter values."""
        outs = [self._forward_chunk(self._rows(s, e), params).reshape(-1) for s, e in self._chunks()]
        return torch.cat(outs) if outs else torch.zeros(0, dtype=self.dtype, device=self.device)

    def iter_matmat(
        self, V: Tensor, progress: ProgressFn | None = None, precise: bool = False
    ) -> Iterator[tuple[int, Tensor]]:
        """``J V`` by row blocks: yields ``(first_row, block [rows, k])`` in row order.

        Only one row chunk of inputs and of ``J V`` exists at a time (the streaming path)."""
        k = V.shape[1]
        apply, primals, cast = self._precision(precise)
        tangents = [
            (
                c0,
                min(c0 + self.tangent_chunk, k),
                self.space.unflatten(cast(V[:, c0 : min(c0 + self.tangent_chunk, k)])),
            )
            for c0 in range(0, k, self.tangent_chunk)
        ]
        N = self.num_samples
        # a few columns: padding would waste more; compiled graphs are traced in the operator's dtype
        compiled = self.compiled if k >= self.tangent_chunk and (precise or self.product_dtype is None) else None
        for s, e in self._chunks():
            rows = tuple(cast(x) for x in self._rows(s, e))
            if compiled is not None:  # static shapes: one compiled graph for every chunk
                rows = _pad_rows(rows, self.row_chunk - (e - s), self.shared)
            block = V.new_empty((e - s) * self.out_numel, k)
            for c0, c1, tan in tangents:
                with torch.no_grad():
                    if compiled is None:
                        jv = _jvp_block(apply, primals, tan, rows)  # [kc, rows, *out]
                    else:
                        pad = self.tangent_chunk - (c1 - c0)  # static shapes and strides: no recompiles
                        tan = {n: torch.cat([t, t.new_zeros(pad, *t.shape[1:])]) for n, t in tan.items()}
                        jv = compiled(self._compiled_apply, primals, tan, rows)[: c1 - c0, : e - s]
                block[:, c0:c1] = jv.reshape(c1 - c0, -1).T
            if progress is not None:
                progress(round(k * e / N) - round(k * s / N))
            yield s * self.out_numel, block

    def matmat(self, V: Tensor, progress: ProgressFn | None = None, precise: bool = False) -> Tensor:
        """``J V``: ``V`` ``[m, k]`` → ``[n, k]`` by batched forward-mode JVPs."""
        n, _ = self.shape
        out = V.new_empty(n, V.shape[1])
        for start, block in self.iter_matmat(V, progress, precise):
            out[start : start + block.shape[0]] = block
        return out

    def matvec(self, v: Tensor, precise: bool = False) -> Tensor:
        """``J v``: ``[m]`` → ``[n]``."""
        return self.matmat(v[:, None], precise=precise)[:, 0]

    def rmatmat(self, U: Tensor, progress: ProgressFn | None = None, precise: bool = False) -> Tensor:
        """``Jᵀ U``: ``U`` ``[n, k]`` → ``[m, k]`` by batched reverse-mode VJPs."""
        m = self.space.num
        k = U.shape[1]
        out = U.new_zeros(m, k)
        apply, primals, cast = self._precision(precise)
        N = self.num_samples
        for s, e in self._chunks(self.vjp_row_chunk):
            rows = tuple(cast(x) for x in self._rows(s, e))

            def f(p: dict[str, Tensor], rows: Inputs = rows) -> Tensor:
                return apply(p, rows)

            with torch.enable_grad():
                _, vjp_fn = torch.func.vjp(f, primals)  # type: ignore[misc]  # one forward per row chunk
            for c0 in range(0, k, self.tangent_chunk):
                c1 = min(c0 + self.tangent_chunk, k)
                cot = cast(U[s * self.out_numel : e * self.out_numel, c0:c1].T)
                cot = cot.reshape(c1 - c0, e - s, *self.output_shape)
                (grads,) = torch.func.vmap(vjp_fn)(cot)
                out[:, c0:c1] += self.space.flatten(grads)
            del vjp_fn
            if progress is not None:
                progress(round(k * e / N) - round(k * s / N))
        return out

    def jacobian_rows(self, s: int, e: int) -> Tensor:
        """Rows of ``J`` for samples ``s:e``, materialized: ``[(e − s) · out, m]``.

        One reverse-mode Jacobian per sample, vmapped over the samples: valid when a sample's
        rows depend on that sample alone (pointwise residuals; :func:`materialize` checks it)."""
        rows = self._rows(s, e)
        shared = [i < len(self.shared) and self.shared[i] for i in range(len(rows))]
        # jacrev takes real inputs only: complex parameters enter as their real views [..., 2]
        cplx = {n for n, p in self._primals.items() if p.is_complex()}
        primals = {n: torch.view_as_real(p) if n in cplx else p for n, p in self._primals.items()}

        def single(p: dict[str, Tensor], *row: Tensor) -> Tensor:
            p = {n: torch.view_as_complex(t) if n in cplx else t for n, t in p.items()}
            batch = tuple(x if sh else x.unsqueeze(0) for x, sh in zip(row, shared, strict=True))
            return self._apply(p, batch).reshape(-1)

        in_dims = (None, *[None if sh else 0 for sh in shared])
        jac = torch.func.vmap(torch.func.jacrev(single), in_dims=in_dims)(primals, *rows)
        k = (e - s) * self.out_numel
        blocks = {}
        for n, t in jac.items():
            t = t.reshape(k, *t.shape[2:])
            # d out / d (re, im) pairs, in the order of view_as_real: back to the flat real layout
            blocks[n] = torch.view_as_complex(t.contiguous()) if n in cplx else t
        flat = self.space.flatten(blocks)  # [m, k]
        return flat.T.detach()


def tune_row_chunk(op: JacobianOperator, max_rows: int = 1 << 20, max_seconds: float = 0.5, factor: int = 4) -> int:
    """Samples per chunk for forward-mode products (``matmat``), chosen by timing one tangent
    block on growing chunks of ``op``'s first samples.

    Starting from ``op.row_chunk``, the chunk grows by ``factor`` while the chunk holds at most
    ``max_rows`` scalar rows, one timed call takes under ``max_seconds`` and the time per
    sample does not rise; the largest chunk whose time per sample is within 15 % of the best is
    kept (fewer, larger calls when they cost the same). Cheap models with many outputs per
    sample (a Cartesian DeepONet: a few samples per default chunk) gain most: their products
    are dominated by per-call overhead. Every row of ``J V`` is computed from its own sample, so
    the chunk does not enter the result (reverse-mode products sum over the rows of a chunk,
    which is why their chunk is not chosen by timing).
    """
    n = op.num_samples
    size = max(1, min(op.row_chunk, n))
    cols = op.tangent_chunk
    gen = torch.Generator().manual_seed(0)  # timing only; keeps the run's random stream untouched
    V = torch.randn(op.shape[1], cols, generator=gen, dtype=op.dtype).to(op.device)
    timings: list[tuple[int, float]] = []
    while True:
        sub = op.head(size, size, cols)
        if not timings:
            sub.matmat(V)  # warm-up
        t0 = time.perf_counter()
        sub.matmat(V)
        seconds = time.perf_counter() - t0
        timings.append((size, seconds / size))
        nxt = size * factor
        slower = seconds / size > 1.15 * min(t for _, t in timings)
        if slower or seconds > max_seconds or size >= n or nxt * op.out_numel > max_rows:
            break
        size = min(nxt, n)
    best = min(t for _, t in timings)
    return max(sz for sz, t in timings if t <= 1.15 * best)
