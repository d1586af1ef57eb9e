"""``torch.export`` programs (``.pt2``): read them safely, write the refined predictor as one.

The refined predictor ``q(θ0, x) + J(x) δ`` is exported with a dynamic batch dimension:

1. ``J(x) δ`` is written with the double-backward identity ``J δ = ∂/∂u ⟨Jᵀ u, δ⟩`` (two
   ``torch.autograd.grad`` calls, as the TorchScript wrapper in :mod:`lsr_cli.scripted`);
2. that function is traced by ``make_fx`` with symbolic shapes into a graph of plain aten ops
   (the backward formulas keep the batch size symbolic, where the forward-mode formulas of
   ``torch.func.jvp`` bake it in: measured with torch 2.13, a ``jvp`` program exports only
   with a fixed batch size, and ``torch.export`` refuses ``autograd.grad`` inside ``forward``);
3. the graph, ``θ0`` and ``δ`` (buffers) are exported with ``Dim.AUTO`` on the leading
   dimension of every input, and the program is tried at another batch size. Some derivative
   formulas fix the size (torch's double backward of ``Conv2d`` expands to concrete sizes:
   the FNO2d sample exports with a fixed batch); :class:`ExportedRefined` says which inputs
   stayed dynamic.

``torch.export.load`` can unpickle with ``weights_only=False`` (pickled weights, opaque
constants, the example inputs when they are not plain tensors); :func:`unsafe_pt2_entries`
finds those before anything is loaded, and :func:`load_pt2` refuses them unless the user
trusts the file.
"""

from __future__ import annotations

import importlib
import io
import json
import logging
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import CheckpointError
from .linearization import is_trainable_dtype, make_functional

EXPORT_FORMAT = "lsr-refined-export/1"
EXTRA_FILE = "lsr.json"
EXAMPLE_BATCH = 3  # rows of the example inputs (0 and 1 would be specialized by torch.export)


@contextmanager
def _quiet_torch_logs() -> Iterator[None]:
    """No log records below ERROR while tracing (torch.export logs its shape decisions, e.g.
    "dimension … 0/1 specialized", as warnings on stderr)."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


@contextmanager
def quiet_torch_deprecations() -> Iterator[None]:
    """Hide torch's "deprecated, switch to torch.compile / torch.export" warnings of the
    TorchScript API (``torch.jit.script``, ``save``, ``load``) for the calls inside only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is deprecated.*", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*is deprecated.*", category=FutureWarning)
        yield


def preload_jvp_decompositions() -> None:
    """Import torch's forward-mode decompositions now, quietly: torch compiles them with
    ``torch.jit.script`` on the first JVP, which warns that TorchScript is deprecated."""
    with quiet_torch_deprecations():
        importlib.import_module("torch._decomp.decompositions_for_jvp")


def is_pt2_archive(path: Path) -> bool:
    """Whether ``path`` is a ``torch.export.save`` archive (its ``archive_format`` says ``pt2``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        names = [n for n in zf.namelist() if n.endswith("archive_format")]
        return any(zf.read(n).strip() == b"pt2" for n in names[:1])


def _loads_as_weights(data: bytes) -> bool:
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception:
        return False
    return True


def unsafe_pt2_entries(path: Path) -> list[str]:
    """Entries of a ``.pt2`` archive that ``torch.export.load`` would unpickle unrestricted
    (pickled weights or constants, custom or opaque objects, example inputs or legacy weight
    files that ``weights_only=True`` refuses); empty when the archive holds plain data only."""
    found: list[str] = []
    with zipfile.ZipFile(path) as zf:
        for name in zf.namelist():
            short = name.split("/", 1)[-1]
            if short.endswith("_config.json") and "/data/" in f"/{short}":
                try:
                    config = json.loads(zf.read(name)).get("config", {})
                except (ValueError, AttributeError):
                    found.append(f"{short} (not valid JSON)")
                    continue
                for fqn, meta in config.items():
                    path_name = str(meta.get("path_name", ""))
                    if meta.get("use_pickle") or path_name.startswith(("custom_obj", "opaque_obj")):
                        found.append(f"{short}: {fqn} (a pickled object)")
            elif short.endswith(".pt") and (short.startswith("data/sample_inputs/") or "/weights/" in f"/{short}"):
                if not _loads_as_weights(zf.read(name)):
                    found.append(f"{short} (not plain tensors)")
            elif short.startswith("data/constants/") and short.endswith(".pt"):
                if not _loads_as_weights(zf.read(name)):
                    found.append(f"{short} (not plain tensors)")
    return found


@dataclass
class LoadedProgram:
    """A ``.pt2`` file: the runnable module, its example inputs, and lsr's metadata if refined."""

    module: nn.Module
    example_inputs: tuple[Tensor, ...] | None
    lsr: dict[str, Any] | None


def load_pt2(path: Path, trust: bool = False) -> LoadedProgram:
    """``torch.export.load(path).module()``, after checking that nothing is unpickled unrestricted
    (``trust``: skip that check, the caller warns)."""
    if not trust:
        unsafe = unsafe_pt2_entries(path)
        if unsafe:
            raise CheckpointError(
                f"{path}: refused: the torch.export archive holds pickled objects ({'; '.join(unsafe[:3])}); "
                "loading it could run code. If you trust the file, set model.trust_checkpoint: true or pass "
                "--trust-checkpoint"
            )
    extra = {EXTRA_FILE: ""}
    try:
        program = torch.export.load(str(path), extra_files=extra)
        module = program.module()
    except Exception as exc:  # a corrupt or incompatible archive
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise CheckpointError(f"{path}: not a loadable torch.export archive: {first[:200]}") from None
    for name in ("train", "eval"):  # torch.export replaces them by methods that raise; the mode is baked in
        vars(module).pop(name, None)
    info = json.loads(extra[EXTRA_FILE]) if extra.get(EXTRA_FILE) else None
    example = None
    if program.example_inputs is not None:
        args = program.example_inputs[0]
        if all(isinstance(a, Tensor) for a in args):
            example = tuple(args)
    return LoadedProgram(module, example, info if isinstance(info, dict) and info.get("lsr_format") else None)


def _example_batch(base: nn.Module, inputs: Sequence[Any], shared: Sequence[bool]) -> int:
    """A batch size for tracing that equals no other dimension of the inputs or parameters, so
    that symbolic tracing ("duck sizing") cannot tie the batch to a fixed size."""
    taken = {int(s) for t in [*base.parameters(), *base.buffers()] for s in t.shape}
    for i, x in enumerate(inputs):
        dims = list(x.shape) if (i < len(shared) and shared[i]) else list(x.shape)[1:]
        taken.update(int(s) for s in dims)
    batch = EXAMPLE_BATCH
    while batch in taken:
        batch += 1
    return batch


def example_rows(inputs: Sequence[Any], shared: Sequence[bool], dtype: torch.dtype, batch: int) -> tuple[Tensor, ...]:
    """Example inputs of ``batch`` rows: the first rows of each input (repeated when there are
    fewer), shared inputs whole; floating ones in ``dtype``, on the CPU."""
    out = []
    for i, x in enumerate(inputs):
        if i < len(shared) and shared[i]:
            t = x if isinstance(x, Tensor) else x[0 : x.shape[0]]
        else:
            n = int(x.shape[0])
            t = x[0 : min(n, batch)]
            if n < batch:
                t = torch.cat([t] * -(-batch // n))[:batch]
        t = t.detach().to("cpu")
        out.append(t.to(dtype) if t.is_floating_point() else t)
    return tuple(out)


def _traceable(base: nn.Module, example: tuple[Tensor, ...]) -> nn.Module:
    """``base``, or for TorchScript its conversion to an exported module: tracing through the
    TorchScript interpreter fixes every size, the converted graph keeps them symbolic."""
    if not isinstance(base, torch.jit.ScriptModule):
        return base
    try:
        from torch._export.converter import TS2EPConverter

        with quiet_torch_deprecations(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = TS2EPConverter(base, example).convert().module()
    except Exception:  # an unsupported TorchScript construct: trace the interpreter (fixed batch)
        return base
    tensors = {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}
    return module if all(n in tensors for n, _ in base.named_parameters()) else base


class _Refined(nn.Module):
    """Holds the traced graph, and ``θ0``, ``δ`` and the graph's constants as buffers;
    ``forward(x0, x1, …)``."""

    def __init__(self, graph: nn.Module, thetas: list[Tensor], deltas: list[Tensor], constants: list[Tensor]) -> None:
        super().__init__()
        self.graph = graph
        self.num_params = len(thetas)
        self.num_constants = len(constants)
        for i, (t, d) in enumerate(zip(thetas, deltas, strict=True)):
            self.register_buffer(f"theta0_{i}", t.detach().clone())
            self.register_buffer(f"delta_{i}", d.detach().clone())
        for i, c in enumerate(constants):
            self.register_buffer(f"constant_{i}", c)

    def forward(self, *inputs: Tensor) -> Tensor:
        thetas = [getattr(self, f"theta0_{i}") for i in range(self.num_params)]
        deltas = [getattr(self, f"delta_{i}") for i in range(self.num_params)]
        constants = [getattr(self, f"constant_{i}") for i in range(self.num_constants)]
        return self.graph(*inputs, *thetas, *deltas, *constants)


@dataclass
class ExportedRefined:
    """The refined program and which inputs kept a dynamic leading dimension."""

    program: Any  # torch.export.ExportedProgram
    dynamic: list[bool]
    example_shapes: list[list[int]]
    dtype: str


def _double_backward(base: nn.Module, names: list[str], num_inputs: int) -> Any:
    call = make_functional(base)

    def refined(*args: Tensor) -> Tensor:
        inputs = args[:num_inputs]
        thetas = args[num_inputs : num_inputs + len(names)]
        deltas = args[num_inputs + len(names) :]
        with torch.enable_grad():
            params = [t.detach().requires_grad_(True) for t in thetas]
            out = call(dict(zip(names, params, strict=True)), tuple(inputs))
            u = torch.zeros_like(out).requires_grad_(True)
            grads = torch.autograd.grad([out], params, grad_outputs=[u], create_graph=True, allow_unused=True)
            used = [(g, d) for g, d in zip(grads, deltas, strict=True) if g is not None and g.requires_grad]
            if not used:
                return out.detach()
            jd = torch.autograd.grad([g for g, _ in used], [u], grad_outputs=[d for _, d in used], allow_unused=True)[0]
        return out.detach() if jd is None else out.detach() + jd

    return refined


def _lift_constants(graph: Any) -> list[Tensor]:
    """Turn the tensors that tracing captured (buffers of the network, constants it creates)
    into trailing inputs of the traced graph and return them; the wrapper holds them as its
    own buffers (``torch.export`` saves a traced submodule's tensor attributes, but its loader
    cannot find them again)."""
    nodes = list(graph.graph.nodes)
    last = [n for n in nodes if n.op == "placeholder"][-1]
    constants: list[Tensor] = []
    for node in nodes:
        value = getattr(graph, str(node.target), None) if node.op == "get_attr" else None
        if not isinstance(value, Tensor):
            continue
        with graph.graph.inserting_after(last):
            placeholder = graph.graph.placeholder(f"lsr_constant_{len(constants)}")
        placeholder.meta = dict(node.meta)
        node.replace_all_uses_with(placeholder)
        graph.graph.erase_node(node)
        delattr(graph, str(node.target))
        constants.append(value.detach().clone())
        last = placeholder
    graph.recompile()
    return constants


def export_refined(
    base: nn.Module, delta: dict[str, Tensor], inputs: Sequence[Any], shared: Sequence[bool] = ()
) -> ExportedRefined:
    """Export ``q(θ0, ·) + J(·) δ`` of ``base`` (plain, TorchScript or an exported module).

    ``delta`` maps parameter names to tensors of their shapes (missing names: zero), stored in
    each parameter's dtype; ``inputs``: the data's inputs ``[N, ...]`` (shared ones without the
    sample dimension), a few rows of which are traced. The program takes its inputs in the
    refinement dtype (that of ``δ``).
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    named = dict(base.named_parameters())
    names = [n for n, p in named.items() if is_trainable_dtype(p)]
    if not names:
        raise CheckpointError("the model has no floating-point parameters to export a refined predictor of")
    thetas = [named[n].detach() for n in names]
    deltas = [
        delta[n].detach().to(device=named[n].device, dtype=named[n].dtype) if n in delta else torch.zeros_like(named[n])
        for n in names
    ]
    real = [d.real if d.is_complex() else d for d in deltas if d.is_floating_point() or d.is_complex()]
    dtype = real[0].dtype if real else torch.float64
    example = example_rows(inputs, shared, dtype, _example_batch(base, inputs, shared))
    try:
        with quiet_torch_deprecations(), _quiet_torch_logs():
            fn = _double_backward(_traceable(base, example), names, len(example))
            graph = make_fx(fn, tracing_mode="symbolic", _allow_non_fake_inputs=True)(*example, *thetas, *deltas)
            wrapper = _Refined(graph, thetas, deltas, _lift_constants(graph))
            auto = torch.export.Dim.AUTO
            program = torch.export.export(wrapper, example, dynamic_shapes=(tuple({0: auto} for _ in example),))
    except Exception as exc:  # an op that make_fx or torch.export cannot trace
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise CheckpointError(
            f"cannot write the refined predictor as torch.export: {type(exc).__name__}: {first[:200]}; "
            "use --format torchscript or state-dict"
        ) from None
    user = set(program.graph_signature.user_inputs)
    vals = [n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder" and n.name in user]
    dynamic = [bool(v is not None and v.dim() > 0 and isinstance(v.shape[0], torch.SymInt)) for v in vals]
    if not _runs_at_another_batch(program, example, shared):  # a guard inside fixes the batch after all
        dynamic = [d and i < len(shared) and shared[i] for i, d in enumerate(dynamic)]
    return ExportedRefined(program, dynamic, [list(x.shape) for x in example], str(dtype).replace("torch.", ""))


def _runs_at_another_batch(program: Any, example: tuple[Tensor, ...], shared: Sequence[bool]) -> bool:
    """Whether the program runs with one more sample than it was traced with."""
    bigger = tuple(x if (i < len(shared) and shared[i]) else torch.cat([x, x[:1]]) for i, x in enumerate(example))
    try:
        with torch.no_grad():
            program.module()(*bigger)
    except Exception:  # a shape guard of the program
        return False
    return True


def save_refined_export(path: Path, exported: ExportedRefined, names: list[str], metadata: dict[str, Any]) -> None:
    """``torch.export.save`` with lsr's metadata as the extra file ``lsr.json``; the caller makes
    it atomic."""
    info = {
        "lsr_format": EXPORT_FORMAT,
        "parameters": names,
        "dynamic_batch": exported.dynamic,
        "example_shapes": exported.example_shapes,
        "input_dtype": exported.dtype,
        "metadata": metadata,
    }
    buffer = io.BytesIO()  # torch.export.save logs a warning for a (temporary) name not ending in .pt2
    torch.export.save(exported.program, buffer, extra_files={EXTRA_FILE: json.dumps(info)})
    path.write_bytes(buffer.getvalue())
