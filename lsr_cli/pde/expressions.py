"""Safe formulas from YAML configs (source terms, boundary values), evaluated on torch tensors.

A formula is parsed once with ``ast.parse(text, mode="eval")`` (nothing is ever executed by
Python), checked against a small grammar and turned into a tree of closures that only call torch
ops, so an :class:`Expression` works on any device and inside ``torch.func`` transforms
(``vmap``, ``jvp``, ``grad``, ``hessian``).

Grammar::

    expr := number | name | expr (+ | - | * | / | **) expr | (+ | -) expr | ( expr )
          | function ( expr, ... )        positional arguments only

Numbers are ints or floats (``2``, ``0.5``, ``1e-3``). Names are the allowed variables, the
built-in constants ``pi`` and ``e``, and user constants (e.g. ``{"nu": 0.003}``), which may not
reuse the name of a variable, function or built-in constant. Functions (elementwise):
``sin cos tan asin acos atan sinh cosh tanh exp log log10 log2 sqrt abs sign floor ceil``
(one argument), ``atan2 min max pow`` (two), and ``step(x)``: 0 for ``x < 0``, 0.5 at 0 and 1
for ``x > 0`` (Heaviside; computed as ``(sign(x) + 1) / 2`` because ``torch.heaviside`` has no
derivative, so its derivative is 0). Anything else (``^``, comparisons, attributes, subscripts,
strings, keyword arguments, lambdas, comprehensions, ...) is a :class:`ConfigError`.

Constant sub-expressions (``8*pi``) are folded once at compile time in float64 and must be
finite.
"""

from __future__ import annotations

import ast
import difflib
import functools
import math
import operator
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lsr_cli.errors import ConfigError

MAX_LENGTH = 2000
MAX_DEPTH = 200  # nesting levels (a sum of n terms is n deep); keeps far below Python's recursion limit
_BLANKS = str.maketrans("\t\r\n", "   ")  # YAML block scalars may span lines
BUILTIN_CONSTANTS = {"pi": math.pi, "e": math.e}
_UNARY = "sin cos tan asin acos atan sinh cosh tanh exp log log10 log2 sqrt abs sign floor ceil"
FUNCTIONS: dict[str, tuple[Callable[..., Tensor], int]] = {
    **{name: (getattr(torch, name), 1) for name in _UNARY.split()},
    "step": (lambda x: (torch.sign(x) + 1) / 2, 1),
    **{"atan2": (torch.atan2, 2), "min": (torch.minimum, 2), "max": (torch.maximum, 2), "pow": (torch.pow, 2)},
}
_BINARY: dict[type[ast.AST], Callable[[Any, Any], Tensor]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
}
_OPERATOR_NAMES: dict[type[ast.AST], str] = {ast.Mod: "%", ast.FloorDiv: "//", ast.MatMult: "@", ast.LShift: "<<"}
_OPERATOR_NAMES.update({ast.RShift: ">>", ast.BitAnd: "&", ast.BitOr: "|", ast.Not: "not", ast.Invert: "~"})
_DISALLOWED: dict[type[ast.AST], str] = {
    **dict.fromkeys((ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp), "comprehensions are not allowed"),
    **dict.fromkeys((ast.Tuple, ast.List, ast.Set, ast.Dict), "tuples, lists, sets and dicts are not allowed"),
    ast.Attribute: "attribute access ('.') is not allowed",
    ast.Subscript: "subscripts ('[...]') are not allowed",
    ast.Lambda: "lambda expressions are not allowed",
    ast.Compare: "comparisons are not allowed (use step(a - b) for a > b)",
    ast.BoolOp: "boolean operators are not allowed",
    ast.IfExp: "conditional expressions are not allowed (use step(...))",
    ast.Starred: "starred arguments are not allowed",
    ast.JoinedStr: "strings are not allowed",
    ast.NamedExpr: "assignments (':=') are not allowed",
}


class _Scope(NamedTuple):
    values: dict[str, Tensor]
    dtype: torch.dtype
    device: torch.device


_Fn = Callable[[_Scope], Tensor]


class _Node(NamedTuple):
    fn: _Fn
    const: float | None  # the value when the sub-expression has no variables


def _leaf(value: float) -> _Node:
    return _Node(lambda s: torch.full((), value, dtype=s.dtype, device=s.device), value)


@dataclass(frozen=True)
class Expression:
    """A compiled formula; call it with ``{name: tensor or float}`` for every name in ``symbols``.

    The result has the broadcast shape of all tensors in ``env`` (also for a constant formula),
    the promoted floating dtype of those tensors (float64 when none is floating) and the device
    of the first one; with no tensors in ``env`` it is a 0-d float64 tensor on the CPU.
    """

    text: str
    symbols: frozenset[str]
    where: str
    _fn: _Fn = field(repr=False, compare=False)

    def __call__(self, env: Mapping[str, Tensor | float]) -> Tensor:
        missing = self.symbols - env.keys()
        if missing:
            raise ValueError(
                f"{self.where}: formula {self.text!r} needs {', '.join(sorted(missing))}; got {', '.join(env) or 'nothing'}"
            )
        tensors = [v for v in env.values() if isinstance(v, Tensor)]
        dtype, device, shape = torch.float64, torch.device("cpu"), torch.Size()
        if tensors:
            dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
            dtype = dtype if dtype.is_floating_point else torch.float64
            device, shape = tensors[0].device, torch.broadcast_shapes(*(t.shape for t in tensors))
        values = {}
        for name in self.symbols:
            v = env[name]
            values[name] = v.to(dtype) if isinstance(v, Tensor) else torch.tensor(float(v), dtype=dtype, device=device)
        out = self._fn(_Scope(values, dtype, device))
        return out if out.shape == shape else out.expand(shape).contiguous()


def compile_expression(
    text: str | int | float, allowed_symbols: Iterable[str], where: str, constants: Mapping[str, float] | None = None
) -> Expression:
    """Parse and check ``text`` once; ``where`` is the config key path named in error messages."""
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise ConfigError(f"{where}: expected a formula (string or number), got {type(text).__name__}")
    if isinstance(text, float) and not math.isfinite(text):
        raise ConfigError(f"{where}: the value must be finite, got {text}")
    source = (text if isinstance(text, str) else repr(text)).translate(_BLANKS).strip()
    shown = repr(source) if len(source) <= 200 else repr(source[:200]) + "..."
    if len(source) > MAX_LENGTH:
        raise ConfigError(f"{where}: formula {shown} is {len(source)} characters long, more than {MAX_LENGTH}")
    if not source:
        raise ConfigError(f"{where}: the formula is empty")
    variables = frozenset(allowed_symbols)
    clashes = variables & (FUNCTIONS.keys() | BUILTIN_CONSTANTS.keys())
    if clashes:
        raise ValueError(f"allowed_symbols may not reuse names of functions or constants: {sorted(clashes)}")
    user = dict(constants or {})
    reserved = dict.fromkeys(variables, "a variable") | dict.fromkeys(FUNCTIONS, "a function")
    reserved |= dict.fromkeys(BUILTIN_CONSTANTS, "a built-in constant")
    for name, value in user.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigError(f"{where}: constant name {name!r} is not a valid name (letters, digits, _)")
        if name in reserved:
            raise ConfigError(f"{where}: constant {name!r} has the name of {reserved[name]}; rename it")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) <= sys.float_info.max:
            raise ConfigError(f"{where}: constant {name!r} must be a finite number, got {value!r}")
    try:
        tree = ast.parse(source, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:  # ValueError: NUL bytes (3.10)
        column, msg = getattr(exc, "offset", None) or "?", getattr(exc, "msg", None) or type(exc).__name__
        raise ConfigError(f"{where}: formula {shown}, column {column}: invalid syntax ({msg})") from None
    compiler = _Compiler(where, shown, variables, {**BUILTIN_CONSTANTS, **{k: float(v) for k, v in user.items()}})
    node = compiler.compile(tree.body, 1)
    return Expression(source, frozenset(compiler.used), where, node.fn)


class _Compiler:
    def __init__(self, where: str, shown: str, variables: frozenset[str], constants: dict[str, float]) -> None:
        self.where, self.shown, self.variables, self.constants = where, shown, variables, constants
        self.used: set[str] = set()

    def fail(self, node: ast.AST, what: str) -> ConfigError:
        column = getattr(node, "col_offset", -1) + 1
        return ConfigError(f"{self.where}: formula {self.shown}, column {column}: {what}")

    def fold(self, node: ast.AST, fn: Callable[..., Any], args: list[float]) -> _Node:
        value = float(fn(*(torch.tensor(a, dtype=torch.float64) for a in args)))
        if not math.isfinite(value):
            raise self.fail(node, f"the constant part {ast.unparse(node)!r} evaluates to {value}")
        return _leaf(value)

    def compile(self, node: ast.AST, depth: int) -> _Node:
        if depth > MAX_DEPTH:
            raise self.fail(node, f"the formula is nested more than {MAX_DEPTH} levels deep")
        if isinstance(node, ast.Constant):
            return self.number(node)
        if isinstance(node, ast.Name):
            return self.name(node)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            arg = self.compile(node.operand, depth + 1)
            if isinstance(node.op, ast.UAdd):
                return arg
            return _leaf(-arg.const) if arg.const is not None else _Node(lambda s: torch.neg(arg.fn(s)), None)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            op = _BINARY[type(node.op)]
            left, right = self.compile(node.left, depth + 1), self.compile(node.right, depth + 1)
            if left.const is not None and right.const is not None:
                return self.fold(node, op, [left.const, right.const])
            lf, rf, lc, rc = left.fn, right.fn, left.const, right.const  # constants stay Python floats
            if rc is not None:
                return _Node(lambda s: op(lf(s), rc), None)
            if lc is not None:
                return _Node(lambda s: op(lc, rf(s)), None)
            return _Node(lambda s: op(lf(s), rf(s)), None)
        if isinstance(node, ast.Call):
            return self.call(node, depth)
        if isinstance(node, (ast.BinOp, ast.UnaryOp)) and isinstance(node.op, ast.BitXor):
            raise self.fail(node, "'^' is not a power operator: use ** for powers")
        if isinstance(node, (ast.BinOp, ast.UnaryOp)):
            symbol = _OPERATOR_NAMES.get(type(node.op), type(node.op).__name__)
            raise self.fail(node, f"operator {symbol!r} is not supported (use + - * / **)")
        raise self.fail(node, _DISALLOWED.get(type(node), f"{type(node).__name__} syntax is not allowed"))

    def number(self, node: ast.Constant) -> _Node:
        value = node.value
        if isinstance(value, (str, bytes)):
            raise self.fail(node, "strings are not allowed")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(node, f"{value!r} is not allowed (only real numbers are)")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise self.fail(node, "the number is too large for a float")
        return _leaf(number)

    def name(self, node: ast.Name) -> _Node:
        name = node.id
        if name in self.constants:
            return _leaf(self.constants[name])
        if name in self.variables:
            self.used.add(name)
            return _Node(lambda s: s.values[name], None)
        if name in FUNCTIONS:
            raise self.fail(node, f"{name!r} is a function: call it as {name}(...)")
        known = sorted(self.variables) + list(self.constants)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise self.fail(node, f"unknown symbol {name!r}{hint}; allowed symbols: {', '.join(known)}")

    def call(self, node: ast.Call, depth: int) -> _Node:
        if not isinstance(node.func, ast.Name):
            self.compile(node.func, depth + 1)  # attributes, subscripts, ... fail here with their own message
            raise self.fail(node, "only named functions like sin(x) can be called")
        name = node.func.id
        if name not in FUNCTIONS:
            if name in self.variables or name in self.constants:
                raise self.fail(node, f"{name!r} is not a function")
            close = difflib.get_close_matches(name, list(FUNCTIONS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise self.fail(node, f"unknown function {name!r}{hint}; functions: {', '.join(FUNCTIONS)}")
        if node.keywords:
            raise self.fail(node, f"keyword arguments are not allowed: write {name}(x), not {name}(x=...)")
        fn, arity = FUNCTIONS[name]
        if len(node.args) != arity:
            raise self.fail(node, f"{name}() takes {arity} argument{'s' * (arity > 1)}, got {len(node.args)}")
        args = [self.compile(arg, depth + 1) for arg in node.args]
        consts = [a.const for a in args]
        if all(c is not None for c in consts):
            return self.fold(node, fn, [c for c in consts if c is not None])
        fns = [a.fn for a in args]
        return _Node(lambda s: fn(*(f(s) for f in fns)), None)
