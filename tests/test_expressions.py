"""Formulas from configs: values against numpy, shapes, torch.func derivatives and every error."""

from __future__ import annotations

import ast
import math

import numpy as np
import pytest
import torch
from torch.func import grad, hessian, jvp, vmap

from lsr_cli.errors import ConfigError
from lsr_cli.pde.expressions import MAX_DEPTH, MAX_LENGTH, compile_expression

WHERE = "config.pde.source"
RTOL = ATOL = 1e-12  # float64 elementwise functions agree with numpy to a few ulp
POISSON_SOURCE = "-(8*pi*cos(4*pi*x**2) - 64*pi**2*x**2*sin(4*pi*x**2))*sin(pi*y) + pi**2*sin(4*pi*x**2)*sin(pi*y)"


def points(n: int = 17) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` in (0.1, 0.9) and ``y`` in (0.2, 1.5), both of shape [n] (inside every function's domain)."""
    g = torch.Generator().manual_seed(0)
    x = 0.1 + 0.8 * torch.rand(n, generator=g, dtype=torch.float64)
    y = 0.2 + 1.3 * torch.rand(n, generator=g, dtype=torch.float64)
    return x, y


def compile_xy(text, constants=None):
    return compile_expression(text, ["x", "y"], WHERE, constants)


REFERENCES = [
    ("x + y", lambda x, y: x + y),
    ("x - y", lambda x, y: x - y),
    ("x * y", lambda x, y: x * y),
    ("x / y", lambda x, y: x / y),
    ("x ** y", lambda x, y: x**y),
    ("-x**2", lambda x, y: -(x**2)),
    ("+x - -y", lambda x, y: x + y),
    ("2 - x", lambda x, y: 2 - x),
    ("2 / y", lambda x, y: 2 / y),
    ("2 ** x", lambda x, y: 2**x),
    ("x**-1 + 2*-y", lambda x, y: 1 / x - 2 * y),
    ("1e-3 * x + 2.5", lambda x, y: 1e-3 * x + 2.5),
    ("2 * (x + y) / 3", lambda x, y: 2 * (x + y) / 3),
    ("sin(x) + cos(y) + tan(x)", lambda x, y: np.sin(x) + np.cos(y) + np.tan(x)),
    ("asin(x) + acos(x) * atan(y)", lambda x, y: np.arcsin(x) + np.arccos(x) * np.arctan(y)),
    ("sinh(x) + cosh(y) - tanh(x)", lambda x, y: np.sinh(x) + np.cosh(y) - np.tanh(x)),
    ("exp(-x**2 / 2) / sqrt(2 * pi)", lambda x, y: np.exp(-(x**2) / 2) / np.sqrt(2 * np.pi)),
    ("log(y) + log10(y) + log2(y)", lambda x, y: np.log(y) + np.log10(y) + np.log2(y)),
    ("abs(x - 0.5) * sign(x - 0.5)", lambda x, y: np.abs(x - 0.5) * np.sign(x - 0.5)),
    ("floor(4 * x) + ceil(4 * y)", lambda x, y: np.floor(4 * x) + np.ceil(4 * y)),
    ("atan2(x, y - 1)", lambda x, y: np.arctan2(x, y - 1)),
    ("min(x, y) + max(x, 0.5)", lambda x, y: np.minimum(x, y) + np.maximum(x, 0.5)),
    ("pow(x, 3) + pow(2, y)", lambda x, y: x**3 + 2**y),
    ("step(x - 0.5)", lambda x, y: np.heaviside(x - 0.5, 0.5)),
    ("e**x * pi", lambda x, y: np.e**x * np.pi),
    ("sin(x)\n  * cos(y)", lambda x, y: np.sin(x) * np.cos(y)),  # a YAML block scalar spans lines
]


@pytest.mark.parametrize(("text", "reference"), REFERENCES, ids=[t for t, _ in REFERENCES])
def test_values_match_numpy(text, reference):
    x, y = points()
    out = compile_xy(text)({"x": x, "y": y})
    assert out.dtype == torch.float64 and out.shape == x.shape
    np.testing.assert_allclose(out.numpy(), reference(x.numpy(), y.numpy()), rtol=RTOL, atol=ATOL)


def test_poisson_source_matches_hand_written_torch():
    x, y = points(101)
    pi = math.pi
    expected = -(8 * pi * torch.cos(4 * pi * x**2) - 64 * pi**2 * x**2 * torch.sin(4 * pi * x**2)) * torch.sin(
        pi * y
    ) + pi**2 * torch.sin(4 * pi * x**2) * torch.sin(pi * y)
    source = compile_xy(POISSON_SOURCE)
    assert source.symbols == frozenset({"x", "y"})
    torch.testing.assert_close(source({"x": x, "y": y}), expected, rtol=RTOL, atol=ATOL)


def test_poisson_source_is_minus_laplacian_of_exact_solution():
    """``u = sin(4πx²) sin(πy)`` solves ``-Δu = f``; the Laplacian comes from torch.func.hessian."""
    u, f = compile_xy("sin(4*pi*x**2) * sin(pi*y)"), compile_xy(POISSON_SOURCE)
    x, y = points()

    def u_of(p):
        return u({"x": p[0], "y": p[1]})

    laplacian = vmap(lambda p: torch.trace(hessian(u_of)(p)))(torch.stack([x, y], dim=1))
    torch.testing.assert_close(-laplacian, f({"x": x, "y": y}), rtol=1e-10, atol=1e-10)  # ~1e3-sized terms cancel


def test_grad_and_jvp_match_analytic_derivative():
    expr = compile_expression("sin(x**2)", ["x"], WHERE)
    x, _ = points()
    expected = 2 * x * torch.cos(x**2)
    derivative = vmap(grad(lambda t: expr({"x": t})))(x)
    torch.testing.assert_close(derivative, expected, rtol=RTOL, atol=ATOL)
    value, tangent = jvp(lambda t: expr({"x": t}), (x,), (torch.ones_like(x),))
    torch.testing.assert_close(value, torch.sin(x**2), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(tangent, expected, rtol=RTOL, atol=ATOL)


def test_step_is_heaviside_with_half_at_zero_and_zero_derivative():
    expr = compile_expression("step(x)", ["x"], WHERE)
    x = torch.tensor([-2.0, 0.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(expr({"x": x}), torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    torch.testing.assert_close(vmap(grad(lambda t: expr({"x": t})))(x), torch.zeros_like(x))


def test_constant_formula_has_the_shape_dtype_of_env_and_zero_gradient():
    x, _ = points()
    zero = compile_expression("0", ["x"], WHERE)
    assert zero.symbols == frozenset()
    out = zero({"x": x})
    assert out.shape == x.shape and out.dtype == torch.float64 and out.is_contiguous()
    assert torch.count_nonzero(out) == 0
    two_pi = compile_expression("2*pi", ["x"], WHERE)({"x": x.float()})
    assert two_pi.dtype == torch.float32 and torch.allclose(two_pi, torch.full_like(x.float(), 2 * math.pi))
    torch.testing.assert_close(vmap(grad(lambda t: zero({"x": t})))(x), torch.zeros_like(x))
    torch.testing.assert_close(vmap(lambda t: zero({"x": t}))(x), torch.zeros_like(x))


def test_numbers_from_yaml_and_env_without_tensors_give_0d_float64():
    for value in (3, -0.25):
        out = compile_expression(value, ["x"], WHERE)({})
        assert out.shape == () and out.dtype == torch.float64 and out.item() == value
    assert compile_expression("x * 2", ["x"], WHERE)({"x": 1.5}).item() == 3.0


def test_broadcasting_and_python_floats_in_env():
    x, y = points(5)
    expr = compile_xy("x * y + 1")
    out = expr({"x": x[:, None], "y": y[None, :4]})
    torch.testing.assert_close(out, x[:, None] * y[None, :4] + 1)
    torch.testing.assert_close(expr({"x": x, "y": 2.0}), 2 * x + 1)
    assert compile_expression("x", ["x", "y"], WHERE)({"x": x[:, None], "y": y[:3]}).shape == (5, 3)


def test_user_constants_and_symbols():
    x, y = points()
    expr = compile_xy("nu * sin(k * pi * x) + y", {"nu": 0.01 / math.pi, "k": 4})
    assert expr.symbols == frozenset({"x", "y"})
    torch.testing.assert_close(expr({"x": x, "y": y}), 0.01 / math.pi * torch.sin(4 * math.pi * x) + y)


def test_long_sum_within_depth_limit_works_under_transforms():
    expr = compile_expression(" + ".join(f"{k}*x" for k in range(1, MAX_DEPTH - 50)), ["x"], WHERE)
    x, _ = points()
    total = sum(range(1, MAX_DEPTH - 50))
    torch.testing.assert_close(vmap(grad(lambda t: expr({"x": t})))(x), torch.full_like(x, float(total)))


def test_evaluation_does_not_parse_again(monkeypatch):
    expr = compile_xy(POISSON_SOURCE)
    monkeypatch.setattr(ast, "parse", lambda *a, **k: pytest.fail("ast.parse called at evaluation"))
    x, y = points()
    expr({"x": x, "y": y})


def test_missing_variable_in_env_is_a_caller_bug():
    with pytest.raises(ValueError, match=r"needs y; got x"):
        compile_xy("x + y")({"x": torch.zeros(3, dtype=torch.float64)})


def test_allowed_symbols_may_not_reuse_function_names():
    with pytest.raises(ValueError, match=r"allowed_symbols may not reuse.*'sin'"):
        compile_expression("x", ["x", "sin"], WHERE)


ERRORS = [
    ("sin(x", r"column 4: invalid syntax \('\(' was never closed\)"),
    ("x +* y", r"column \d+: invalid syntax"),
    ("x\x00", r"invalid syntax"),
    ("xx + 1", r"unknown symbol 'xx' \(did you mean 'x'\?\); allowed symbols: x, y, pi, e"),
    ("sinn(x)", r"column 1: unknown function 'sinn' \(did you mean 'sin'\?\); functions: sin, cos"),
    ("atan2(x)", r"atan2\(\) takes 2 arguments, got 1"),
    ("sin(x, y)", r"sin\(\) takes 1 argument, got 2"),
    ("x^2", r"column 1: '\^' is not a power operator: use \*\* for powers"),
    ("x % 2", r"operator '%' is not supported"),
    ("not x", r"operator 'not' is not supported"),
    ("x.__class__", r"attribute access \('\.'\) is not allowed"),
    ("().__class__", r"attribute access"),
    ("[1][0]", r"subscripts \('\[\.\.\.\]'\) are not allowed"),
    ("lambda: 1", r"lambda expressions are not allowed"),
    ("[t for t in x]", r"comprehensions are not allowed"),
    ("(x, y)", r"tuples, lists, sets and dicts are not allowed"),
    ("sin(x=1)", r"keyword arguments are not allowed: write sin\(x\), not sin\(x=\.\.\.\)"),
    ("sin(*x)", r"starred arguments are not allowed"),
    ('"a"', r"strings are not allowed"),
    ('f"{x}"', r"strings are not allowed"),
    ("True", r"True is not allowed \(only real numbers are\)"),
    ("1j", r"1j is not allowed"),
    ("x < 1", r"comparisons are not allowed \(use step\(a - b\) for a > b\)"),
    ("x and y", r"boolean operators are not allowed"),
    ("x if y else 1", r"conditional expressions are not allowed"),
    ("(z := x)", r"assignments \(':='\) are not allowed"),
    ("sin + x", r"'sin' is a function: call it as sin\(\.\.\.\)"),
    ("x(1)", r"'x' is not a function"),
    ("sin(x)(2)", r"only named functions like sin\(x\) can be called"),
    ("log(0) + x", r"the constant part 'log\(0\)' evaluates to -inf"),
    ("1 / (1 - 1) + x", r"the constant part '1 / \(1 - 1\)' evaluates to inf"),
    ("1" + "0" * 400, r"the number is too large for a float"),
    ("-" * (MAX_DEPTH + 5) + "x", rf"nested more than {MAX_DEPTH} levels deep"),
    ("", r"the formula is empty"),
    (" \n ", r"the formula is empty"),
    ("x+" * 1000 + "x", rf"is {MAX_LENGTH + 1} characters long, more than {MAX_LENGTH}"),
    (None, r"expected a formula \(string or number\), got NoneType"),
    (True, r"got bool"),
    ([1], r"got list"),
    (float("nan"), r"the value must be finite, got nan"),
]


@pytest.mark.parametrize(("text", "match"), ERRORS, ids=[repr(t)[:40] for t, _ in ERRORS])
def test_errors_name_where_formula_and_problem(text, match):
    with pytest.raises(ConfigError, match=match) as info:
        compile_xy(text)
    message = str(info.value)
    assert message.startswith(f"{WHERE}: ") and "\n" not in message
    if isinstance(text, str) and text.strip() and len(text) <= 200:
        assert repr(text.strip().replace("\n", " ")) in message


BAD_CONSTANTS = [
    ({"x": 1.0}, r"constant 'x' has the name of a variable; rename it"),
    ({"sin": 1.0}, r"constant 'sin' has the name of a function"),
    ({"pi": 3.0}, r"constant 'pi' has the name of a built-in constant"),
    ({"1a": 1.0}, r"constant name '1a' is not a valid name"),
    ({"k": "4"}, r"constant 'k' must be a finite number, got '4'"),
    ({"k": math.inf}, r"constant 'k' must be a finite number, got inf"),
    ({"k": True}, r"constant 'k' must be a finite number, got True"),
    ({"k": 10**400}, r"constant 'k' must be a finite number, got 1000"),
]


@pytest.mark.parametrize(("constants", "match"), BAD_CONSTANTS, ids=[str(c) for c, _ in BAD_CONSTANTS])
def test_bad_constants(constants, match):
    with pytest.raises(ConfigError, match=match):
        compile_xy("x", constants)


@pytest.mark.parametrize(
    "text",
    [
        "__import__('os').system('touch {marker}')",
        "open('{marker}', 'w')",
        "[c for c in ().__class__.__base__.__subclasses__()]",
        "(lambda: __import__('os').system('touch {marker}'))()",
        "x.__class__",
        "().__class__",
        "[1][0]",
        "lambda: 1",
        '"a"',
    ],
)
def test_malicious_formulas_are_rejected_without_running(text, tmp_path):
    marker = tmp_path / "executed"
    with pytest.raises(ConfigError, match=r"not allowed|unknown function|can be called"):
        compile_xy(text.format(marker=marker))
    assert not marker.exists()
