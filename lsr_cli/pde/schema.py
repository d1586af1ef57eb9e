"""The keys of the ``pde:`` section (with the docs :mod:`lsr_cli.config_doc` renders), of a block and
of its ``points:``, and the check that a mapping holds only known keys."""

from __future__ import annotations

import difflib
from typing import Any

from lsr_cli.config import KeyDoc
from lsr_cli.errors import ConfigError

from .equations import EQUATIONS

KINDS = ("pde", "dirichlet", "neumann", "periodic", "initial", "data")
SAMPLERS = ("uniform", "sobol", "lhs", "grid")
NONLINEAR_ITERATIONS = 30
"""``pde.nonlinear_iterations: auto``: Levenberg–Marquardt steps of the exact-residual stage."""
_FORMULA = "number, formula, `{dataset: /path}` or `{instance: NAME}` (`lsr instances`)"
PDE_KEYS = {
    "equation": KeyDoc(
        "string",
        "required",
        f"built-in ({', '.join(f'`{name}`' for name in EQUATIONS)}; residuals and coefficients: README, "
        '"Physics-informed networks") or `path/file.py:function` (runs that code)',
    ),
    "variables": KeyDoc("list[string]", "required", "the model's input columns, in order; `t` is time"),
    "outputs": KeyDoc(
        "list[string]",
        "a system's outputs, else `[u]`",
        'names of the model\'s output columns, in order (`[u, v, p]`); residuals read `F["v"]`, '
        '`F.d("v", "x")`; the model must return as many values per point (docs/pde_systems.md)',
    ),
    "unknowns": KeyDoc(
        "mapping",
        "{}",
        "unknown constants refined with the network: `{nu: 0.05}` (initial guess), `{nu: {initial: 0.05, "
        "true: 0.01}}` (error reported) or `{nu: {parameter: NAME}}` (a scalar parameter of the checkpoint); "
        "an unknown named like a coefficient is that coefficient, formulas may use them; "
        "freeze with `lsr.parameters.exclude: [unknowns.*]`",
    ),
    "domain": KeyDoc(
        "mapping",
        "null",
        "the box, `[low, high]` per variable: `{x: [0, 1], y: [0, 1]}`; needed for generated points and for "
        "`neumann` and `periodic` blocks",
    ),
    "constants": KeyDoc("mapping", "{}", "names usable in formulas (numbers)"),
    "coefficients": KeyDoc(
        "mapping",
        "{}",
        f"the equation's coefficients by name, each a {_FORMULA}; unset ones take the equation's defaults",
    ),
    "blocks": KeyDoc(
        "list[mapping]",
        "required",
        "the residual blocks (keys: `pde.blocks[]`); each block's rows are scaled by `√(w_b · N / N_b)`, so "
        "the loss is `Σ_b w_b · mean_b(r²)`",
    ),
    "basis": KeyDoc(
        "string",
        "auto",
        "`auto`: `residual` for a small dense G on a linear equation, else `output`; `output`: sketch J on a "
        "subset of points; `residual`: sketch G",
    ),
    "basis_points": KeyDoc(
        "integer | string", "auto", "points of that subset (`auto`: max rank + oversampling + 1000)"
    ),
    "reference": KeyDoc(
        "boolean | string",
        "true",
        "compare with `/reference/inputs` and `/reference/values` when present; `required` makes it an error if absent",
    ),
    "nonlinear_iterations": KeyDoc(
        "integer | string",
        "auto",
        f"nonlinear equations: Levenberg–Marquardt steps on the predictor's exact residual in LSR's subspace "
        f"(`auto`: {NONLINEAR_ITERATIONS}; 0: off; at most 3× the time of LSR's step, 2 min minimum)",
    ),
    "validation": KeyDoc(
        "string",
        "auto",
        "fresh points never fitted (per block: its `validation:` points, the same sampling drawn again, the "
        "domain's faces, or points between the block's points). `auto`: rank and λ chosen as with `none`, the "
        "exact-residual stage keeps the iterate best at the validation points, and a step that raises the exact "
        "residual there is re-chosen on them (or the input is kept); `choose`: rank and λ chosen on the "
        "validation points; `none`: held-out rows of the fit points (`lsr.holdout`) or GCV",
    ),
    "weights": KeyDoc(
        "string",
        "config",
        "`config`: the blocks' `weight`s as written; `auto`: balanced at the checkpoint so that every block adds "
        "the same to the trace of the Gauss–Newton matrix (`w_b · mean‖∂r_b/∂θ‖²` equal, the first `pde` block "
        "keeping its weight; a block's `weight` multiplies its balanced one); reported in "
        "`residual_loss.weights`",
    ),
    "adaptive": KeyDoc(
        "string or mapping",
        "auto",
        "residual-based adaptive collocation: while the refined predictor's exact residual at the validation "
        "points is above the one at the fit points, add as many points per `pde` block as it has where the "
        "residual is largest (RAD sampling from a dense seeded candidate set) and solve again; a round is kept "
        "only when it lowers the validation loss by 10 %. `auto`: at most 3 rounds, 600 s; "
        "`{rounds: N, time_limit: SECONDS}`; `none`: off. Needs validation points",
    ),
}
"""The keys of ``pde:`` and their documentation (``docs/configuration.md``)."""
BLOCK_KEYS = {
    "name": KeyDoc("string", "kind + index (`pde0`)", "the block's name in reports and plots; names must differ"),
    "kind": KeyDoc(
        "string",
        "pde",
        "`pde` (the equation), `dirichlet` (`u − g`, `value`), `neumann` (`∂u/∂n − g`, outward normal of the "
        "box face), `periodic` (`u(x_min) − u(x_max)` along `variable`), `initial` (`u(x, t_min) − g`), "
        "`data` (`u − values`)",
    ),
    "points": KeyDoc("mapping", "required", "where the block's points come from (keys: `pde.blocks[].points`)"),
    "weight": KeyDoc(
        "number | mapping",
        "1.0",
        "`w_b`, the block's weight in the loss `Σ_b w_b · mean_b(r²)`; per equation or component of a "
        "system: `{continuity: 10}` (others 1)",
    ),
    "component": KeyDoc(
        "string | list[string]",
        "the only output",
        "non-`pde` blocks: the output(s) constrained (required with several outputs; `periodic`: all); a list "
        "makes one block per component (`NAME.u`), `value`/`values` then a mapping per component or one for all; "
        "`dirichlet`/`initial`/`data`: or a formula over outputs, their derivatives `u_x`, variables and outward "
        'normals `n_x` (`"u*n_x + v*n_y"`)',
    ),
    "equations": KeyDoc(
        "list[string]",
        "all",
        "`pde` blocks of a system: the equations enforced, one block each (`NAME.continuity`)",
    ),
    "column": KeyDoc("integer", "0", "`data` blocks: the column of `values` `[N, C]` observed"),
    "value": KeyDoc(
        "number | string | mapping", "0", f"`g` of `dirichlet`, `neumann` and `initial` blocks: a {_FORMULA}"
    ),
    "faces": KeyDoc(
        "string | list[string]",
        "all",
        "boundary kinds: the faces sampled — `all` spatial faces, or a list such as `[x_min, y_max]`",
    ),
    "variable": KeyDoc("string", "null", "`periodic` blocks: the variable along which `u(x_min) = u(x_max)`"),
    "values": KeyDoc("string", "null", "`data` blocks: the dataset of observed values (`/path/to/dataset`)"),
    "validation": KeyDoc(
        "mapping",
        "null",
        "the block's validation points, in the form of `points` (`{dataset: /validation/NAME}` or "
        "`{sample: sobol, count: N}`); default: chosen by `pde.validation: auto`",
    ),
}
"""The keys of one entry of ``pde.blocks``."""
POINT_KEYS = {
    "dataset": KeyDoc("string", "null", "points `[N_b, d]` from the data file, e.g. `/collocation/NAME`"),
    "sample": KeyDoc(
        "string",
        "null",
        "or points generated in the box: `uniform` | `sobol` | `lhs` | `grid` (`grid` rounds up to "
        "`ceil(N^(1/d))` points per axis); boundary kinds sample the faces, `initial` the `t = t_min` face; "
        "seeded by `seed`",
    ),
    "count": KeyDoc("integer", "null", "how many points to generate (required with `sample`)"),
    "region": KeyDoc(
        "mapping",
        "null",
        "interior blocks: draw in a sub-box, e.g. `{x: [-0.1, 0.1]}` (denser points near a front)",
    ),
}
"""The keys of ``pde.blocks[].points``."""
_PDE_KEYS = tuple(PDE_KEYS)
_BLOCK_KEYS = tuple(BLOCK_KEYS)
_POINT_KEYS = tuple(POINT_KEYS)


def _unknown(path: str, key: str, valid: tuple[str, ...]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"config.{path}.{key}: unknown key{hint}")


def _mapping(path: str, raw: Any, valid: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"config.{path}: expected a mapping, got {type(raw).__name__}")
    for key in raw:
        if key not in valid:
            raise _unknown(path, str(key), valid)
    return raw
