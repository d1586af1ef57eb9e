"""The refined predictor as a self-contained TorchScript module.

``forward(*inputs) = q(θ0, x) + J(x) δ``, evaluated exactly by the double-backward identity
``J δ = ∂/∂u ⟨Jᵀ u, δ⟩`` (two ``torch.autograd.grad`` calls, which TorchScript compiles), so
the saved file needs nothing but ``torch.jit.load``. Gradients are switched on inside
``forward`` with ``torch.set_grad_enabled`` (the one grad-mode call TorchScript compiles) and
restored before returning, so the module also works under ``torch.no_grad()``; with grad
mode on, the output stays differentiable with respect to the inputs.

TorchScript needs source code, and the parameter paths of the base module differ from model
to model, so the wrapper class is generated per model, written to a temporary file and
imported from there; only the compiled module is kept.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .linearization import is_trainable_dtype

SCRIPT_FORMAT = "lsr-refined-torchscript/1"

_TEMPLATE = """
from typing import List, Optional
import torch
from torch import Tensor, nn


def _linearized(out: Tensor, params: List[Tensor], deltas: List[Tensor], keep_graph: bool) -> Tensor:
    u = torch.zeros_like(out).requires_grad_(True)
    seed: List[Optional[Tensor]] = [u]
    grads = torch.autograd.grad([out], params, grad_outputs=seed, create_graph=True, allow_unused=True)
    gs: List[Tensor] = []
    ds: List[Optional[Tensor]] = []
    for i in range(len(grads)):
        g = grads[i]
        if g is not None and g.requires_grad:
            gs.append(g)
            ds.append(deltas[i])
    if len(gs) == 0:
        return out
    jd = torch.autograd.grad(gs, [u], grad_outputs=ds, create_graph=keep_graph, allow_unused=True)[0]
    if jd is None:
        return out
    return out + jd


class RefinedScript(nn.Module):
    lsr_format: str
    lsr_metadata: str

    def __init__(self, base: nn.Module, deltas: List[Tensor], lsr_format: str, lsr_metadata: str):
        super().__init__()
        self.base = base
        self.deltas = nn.ParameterList([nn.Parameter(d, requires_grad=False) for d in deltas])
        self.lsr_format = lsr_format
        self.lsr_metadata = lsr_metadata
        real = [d for d in deltas if d.is_floating_point()]
        ref = real[0] if len(real) else deltas[0].real
        self.register_buffer("input_dtype", torch.zeros(0, dtype=ref.dtype, device=ref.device))

    def _params(self) -> List[Tensor]:
        ps: List[Tensor] = []
{params}
        return ps

    def _cast(self, x: Tensor) -> Tensor:
        if x.is_floating_point():
            return x.to(self.input_dtype.dtype)
        return x

    def forward(self, {args}) -> Tensor:
        prev = torch.is_grad_enabled()
        torch.set_grad_enabled(True)
        params = self._params()
        deltas: List[Tensor] = [d for d in self.deltas]
        out = self.base({cast_args})
        res = _linearized(out, params, deltas, prev)
        torch.set_grad_enabled(prev)
        if not prev:
            res = res.detach()
        return res
"""


def _accessor(name: str) -> str:
    expr = "self.base"
    for part in name.split("."):
        expr = f'getattr({expr}, "{part}")'
    return expr


def build_refined_script(
    base: torch.jit.ScriptModule,
    delta: dict[str, Tensor],
    num_inputs: int,
    metadata: dict[str, Any],
) -> torch.jit.ScriptModule:
    """Compile ``q(θ0, ·) + J(·) δ`` around ``base``.

    ``delta`` maps parameter names of ``base`` to tensors of their shapes (missing names:
    zero); each is stored in its parameter's dtype (complex parameters get complex ``δ``).
    """
    names = [n for n, p in base.named_parameters() if is_trainable_dtype(p)]
    if not names:
        raise ValueError("the model has no floating-point parameters")
    named = dict(base.named_parameters())
    deltas = [
        delta[n].detach().to(device=named[n].device, dtype=named[n].dtype) if n in delta else torch.zeros_like(named[n])
        for n in names
    ]
    args = ", ".join(f"x{i}: Tensor" for i in range(num_inputs))
    cast_args = ", ".join(f"self._cast(x{i})" for i in range(num_inputs))
    # one statement per parameter; the assert narrows attributes TorchScript types as
    # Optional[Tensor] (e.g. the bias of Conv layers)
    params = "\n".join(
        f"        p{i} = {_accessor(n)}\n        assert p{i} is not None\n        ps.append(p{i})"
        for i, n in enumerate(names)
    )
    source = _TEMPLATE.format(params=params, args=args, cast_args=cast_args)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lsr_refined_wrapper.py"
        path.write_text(source, encoding="utf-8")
        mod_name = f"_lsr_refined_wrapper_{id(path)}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        try:
            spec.loader.exec_module(module)
            wrapper = module.RefinedScript(base, deltas, SCRIPT_FORMAT, json.dumps(metadata))
            with warnings.catch_warnings():  # torch 2.13 calls TorchScript deprecated; it still works
                warnings.filterwarnings("ignore", message=r".*is deprecated.*", category=DeprecationWarning)
                return torch.jit.script(wrapper)
        finally:
            sys.modules.pop(mod_name, None)


def is_refined_script(module: nn.Module) -> bool:
    return isinstance(module, torch.jit.ScriptModule) and getattr(module, "lsr_format", None) == SCRIPT_FORMAT


def unpack_refined_script(
    module: torch.jit.ScriptModule,
) -> tuple[torch.jit.ScriptModule, dict[str, Tensor], dict[str, Any]]:
    """``(base, δ by parameter name, metadata)`` of a module made by :func:`build_refined_script`."""
    base = module.base
    names = [n for n, p in base.named_parameters() if is_trainable_dtype(p)]
    stored = dict(module.deltas.named_parameters())
    deltas = [stored[str(i)].detach() for i in range(len(stored))]
    metadata = json.loads(module.lsr_metadata) if module.lsr_metadata else {}
    return base, dict(zip(names, deltas, strict=True)), metadata
