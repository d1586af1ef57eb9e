"""Unknown constants of an inverse problem (``pde.unknowns``), linearized with the network.

``pde.unknowns: {nu: 0.05}`` gives an initial guess; ``{nu: {parameter: log_nu_holder}}`` reads
the value of a scalar parameter of the checkpoint (libraries keep trainable PDE constants beside
the network); ``true:`` states the true value, for the report. An unknown is a scalar
``nn.Parameter``: :class:`WithUnknowns` wraps the network and appends one column per unknown to
its output (``[N, C] → [N, C + k]``, the unknown's value on every row), so every part of the
refinement that differentiates the network with respect to its parameters — the residual
Jacobian ``G``, the sketch, the exact-residual stage's tables — gets the unknowns' columns
without knowing about them, and a residual reads an unknown as it reads a component
(``F["nu"]``, or the coefficient ``c["nu"]``). The refined predictor's unknown column is
``ν0 + δν`` exactly (it is linear in its own parameter): that is the refined value.

Parameter patterns (``lsr.parameters.include`` / ``exclude``) see the network's parameters by
their own names and an unknown as ``unknowns.NAME`` (a network parameter read by
``parameter:`` keeps its name), so ``exclude: ["unknowns.*"]`` freezes them.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lsr_cli.config import Config
from lsr_cli.errors import ConfigError
from lsr_cli.linearization import ParameterSpace, is_torchscript, params_in_torchscript

PREFIX = "unknowns."
"""Parameter names of unknowns held by the wrapper: ``unknowns.NAME``."""
_NET = "net."
_KEYS = ("initial", "parameter", "true")


@dataclass(frozen=True)
class Unknown:
    """One unknown constant: its initial guess, or the checkpoint parameter holding it, and the
    true value when the config gives one."""

    name: str
    initial: float | None
    parameter: str | None = None
    true: float | None = None


def _number(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def parse_unknowns(raw: Any, reserved: dict[str, str]) -> list[Unknown]:
    """``pde.unknowns`` → unknowns; ``reserved`` maps names already taken (variables, outputs,
    constants, functions) to what they are."""
    if raw is None:
        return []
    if not isinstance(raw, dict):
        raise ConfigError(f"config.pde.unknowns: expected a mapping like {{nu: 0.05}}, got {raw!r}")
    out = []
    for name, spec in raw.items():
        where = f"config.pde.unknowns.{name}"
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigError(f"config.pde.unknowns: {name!r} is not a valid name (letters, digits, _)")
        if name in reserved:
            raise ConfigError(f"{where}: the unknown has the name of {reserved[name]}; rename it")
        if isinstance(spec, dict):
            spec = {("true" if key is True else key): v for key, v in spec.items()}  # YAML reads `true:` as True
            for key in spec:
                if key not in _KEYS:
                    raise ConfigError(f"{where}.{key}: unknown key; valid keys: {', '.join(_KEYS)}")
            parameter = spec.get("parameter")
            if ("initial" in spec) == (parameter is not None):
                raise ConfigError(
                    f"{where}: give either `initial` (a number) or `parameter` (a scalar parameter of the checkpoint)"
                )
            if parameter is not None and (not isinstance(parameter, str) or not parameter):
                raise ConfigError(f"{where}.parameter: expected a parameter name of the checkpoint, got {parameter!r}")
            initial = _number(f"{where}.initial", spec["initial"]) if "initial" in spec else None
            true = _number(f"{where}.true", spec["true"]) if "true" in spec else None
            out.append(Unknown(name, initial, parameter, true))
        else:
            out.append(Unknown(name, _number(where, spec)))
    return out


class _Holder(nn.Module):
    """The unknowns that the config introduces, as scalar parameters named after them."""

    def __init__(self, values: dict[str, Tensor]) -> None:
        super().__init__()
        for name, value in values.items():
            self.register_parameter(name, nn.Parameter(value))

    def forward(self, x: Tensor) -> Tensor:  # TorchScript needs a forward; never called
        return x


class WithUnknowns(nn.Module):
    """``x ↦ [q(x), ν_1, …, ν_k]``: the network's output columns and one column per unknown.

    ``net`` is the network; unknowns introduced by the config live in ``unknowns`` (a TorchScript
    module when the network is one, so that parameter swapping works the same on both), those read
    from the checkpoint stay in ``net`` (``paths``: where each unknown's parameter is)."""

    def __init__(self, net: nn.Module, holder: nn.Module, names: list[str], paths: list[str]) -> None:
        super().__init__()
        self.net = net
        self.unknowns = holder
        self.names = names
        self.paths = paths

    def _parameter(self, path: str) -> Tensor:
        obj: Any = self
        for part in path.split("."):
            obj = getattr(obj, part)
        return obj

    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x)
        out = out.reshape(out.shape[0], -1)
        cols = [self._parameter(p).to(out.dtype).reshape(()).expand(out.shape[0]) for p in self.paths]
        return torch.cat([out, torch.stack(cols, dim=1)], dim=1)

    def values(self) -> dict[str, float]:
        """The unknowns' current values."""
        return {n: float(self._parameter(p).detach()) for n, p in zip(self.names, self.paths, strict=True)}

    def display_name(self, name: str) -> str:
        """The name that parameter patterns see: the network's own, or ``unknowns.NAME``."""
        return name.removeprefix(_NET)


def attach_unknowns(module: nn.Module, unknowns: list[Unknown], dtype: torch.dtype, device: torch.device) -> nn.Module:
    """``module`` with its unknowns' columns appended (:class:`WithUnknowns`), or ``module`` itself
    when there are none."""
    if not unknowns:
        return module
    named = dict(module.named_parameters())
    own: dict[str, Tensor] = {}
    paths = []
    for u in unknowns:
        if u.parameter is None:
            assert u.initial is not None
            own[u.name] = torch.tensor(u.initial, dtype=dtype, device=device)
            paths.append(PREFIX + u.name)
            continue
        p = named.get(u.parameter)
        if p is None or p.numel() != 1 or not p.is_floating_point():
            scalars = [n for n, t in named.items() if t.numel() == 1 and t.is_floating_point()]
            raise ConfigError(
                f"config.pde.unknowns.{u.name}.parameter: the checkpoint has no scalar floating-point parameter "
                f"{u.parameter!r}; its scalar parameters: {scalars[:8] or 'none'}"
            )
        paths.append(_NET + u.parameter)
    holder: nn.Module = _Holder(own)
    if is_torchscript(module) or params_in_torchscript(module):
        holder = torch.jit.script(holder)  # all parameters swapped the TorchScript way (linearization)
    return WithUnknowns(module, holder, [u.name for u in unknowns], paths)


def select_space(module: nn.Module, cfg: Config, gen: torch.Generator) -> ParameterSpace:
    """The linearized parameters (``lsr.parameters``) of the network and of its unknowns.

    Patterns see the names of :meth:`WithUnknowns.display_name`; ``fraction`` draws among the
    network's parameters only (an unknown is never dropped at random)."""
    from lsr_cli.prepare import select_parameters

    if not isinstance(module, WithUnknowns):
        return select_parameters(module, cfg, gen)
    par = cfg.lsr.parameters
    named = {n: p.detach() for n, p in module.named_parameters()}

    def chosen(name: str) -> bool:
        shown = module.display_name(name)
        if par.include and not any(fnmatch.fnmatchcase(shown, pat) for pat in par.include):
            return False
        return not any(fnmatch.fnmatchcase(shown, pat) for pat in par.exclude)

    net = {n: p for n, p in named.items() if not n.startswith(PREFIX)}
    own = {n: p for n, p in named.items() if n.startswith(PREFIX)}
    keep_net = [_escape(n) for n in net if chosen(n)]
    keep_own = [_escape(n) for n in own if chosen(n)]
    space = ParameterSpace(net, include=keep_net or ["\0none"], fraction=par.fraction, generator=gen)
    extra = ParameterSpace(own, include=keep_own or ["\0none"])
    space.entries = space.entries + extra.entries
    space.num += extra.num
    space.num_total += extra.num_total
    if space.num == 0:
        shown = [module.display_name(n) for n in named][:8]
        raise ConfigError(
            f"config.lsr.parameters: no floating-point parameter is selected; parameter names are {shown}"
        )
    return space


def _escape(name: str) -> str:
    """``name`` as an fnmatch pattern matching only itself."""
    return "".join(f"[{ch}]" if ch in "*?[]" else ch for ch in name)


def split_delta(module: nn.Module, delta: dict[str, Tensor]) -> tuple[nn.Module, dict[str, Tensor], dict[str, float]]:
    """The network, its parameters' ``δ`` (by the network's own names) and each unknown's ``δ``."""
    if not isinstance(module, WithUnknowns):
        return module, delta, {}
    steps = dict.fromkeys(module.names, 0.0)
    by_path = dict(zip(module.paths, module.names, strict=True))
    net_delta = {}
    for name, d in delta.items():
        if name in by_path:
            steps[by_path[name]] = float(d.detach())
        if name.startswith(_NET):
            net_delta[name.removeprefix(_NET)] = d
    if not net_delta:  # the refined checkpoint needs one δ entry (zero)
        first, p = next(iter(module.net.named_parameters()))
        net_delta = {first: torch.zeros_like(p.detach())}
    return module.net, net_delta, steps


def unknowns_report(
    unknowns: list[Unknown], before: dict[str, float], steps: dict[str, float], space: ParameterSpace
) -> dict[str, dict[str, Any]]:
    """Per unknown: before, after (``before + δ``), whether it was linearized, and, with a true
    value, the absolute and relative errors before and after."""
    linearized = set(space.names)
    out: dict[str, dict[str, Any]] = {}
    for u in unknowns:
        b = before[u.name]
        a = b + steps.get(u.name, 0.0)
        path = PREFIX + u.name if u.parameter is None else _NET + u.parameter
        entry: dict[str, Any] = {
            "before": b,
            "after": a,
            "linearized": path in linearized,
            "source": "config (initial guess)" if u.parameter is None else f"checkpoint parameter {u.parameter}",
        }
        if u.true is not None:
            scale = abs(u.true) if u.true != 0 else 1.0
            entry.update(
                {
                    "true": u.true,
                    "abs_error_before": abs(b - u.true),
                    "abs_error_after": abs(a - u.true),
                    "rel_error_before": abs(b - u.true) / scale,
                    "rel_error_after": abs(a - u.true) / scale,
                }
            )
        out[u.name] = entry
    return out


__all__ = [
    "PREFIX",
    "Unknown",
    "WithUnknowns",
    "attach_unknowns",
    "parse_unknowns",
    "select_space",
    "split_delta",
    "unknowns_report",
]
