"""The network and its data made ready for a run, shared by every command and by ``pde/``: the
module in the run's dtype on its device, the linearized parameters, forward passes in row
chunks, and the checks that inputs, outputs and targets fit.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from .checkpoint import LoadedCheckpoint
from .config import Config
from .data import Split
from .distributed import SINGLE, Comm
from .errors import CheckpointError, ConfigError, NumericalError
from .linearization import ParameterSpace, make_functional, num_rows, take_rows
from .runtime import cast_module, cast_tensor


def prepare_module(ckpt: LoadedCheckpoint, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The base network in the refinement dtype on the device, eval mode (floating buffers cast too)."""
    try:
        module = cast_module(ckpt.module, dtype, device)
    except Exception as exc:  # exotic modules
        raise CheckpointError(f"{ckpt.path}: cannot move the model to {device}/{dtype}: {exc}") from None
    module.eval()
    return module


def predict(
    module: nn.Module,
    inputs: tuple[Tensor, ...],
    row_chunk: int,
    params: dict[str, Tensor] | None = None,
    shared: tuple[bool, ...] = (),
) -> Tensor:
    """Model output ``[N, ...]`` in row chunks without autograd (optionally with replaced parameters).

    Inputs flagged in ``shared`` have no sample dimension and are passed whole."""
    call = make_functional(module) if params is not None else None
    outs = []
    n = num_rows(inputs, shared)
    with torch.no_grad():
        for s in range(0, n, row_chunk):
            rows = take_rows(inputs, s, s + row_chunk, shared)
            out = call(params, rows) if call is not None and params is not None else module(*rows)
            outs.append(out.detach())
        if not outs:  # no rows here (a distributed rank's empty share): the output's shape, zero rows
            flags = tuple(shared) + (False,) * (len(inputs) - len(shared))
            zero = tuple(x if f else x.new_zeros((1, *x.shape[1:])) for x, f in zip(inputs, flags, strict=True))
            out = call(params, zero) if call is not None and params is not None else module(*zero)
            return out.detach()[:0]
    return torch.cat(outs)


def check_fit(module: nn.Module, split: Split, where: str, num_rows: int = 4) -> Split:
    """One forward pass on a few rows: the inputs must fit the model and the output the targets.

    Returns the split with targets reshaped to the output shape when only the layout differs
    (e.g. targets ``[N]`` for outputs ``[N, 1]``).
    """
    rows = take_rows(split.inputs, 0, num_rows, split.shared)
    batch = min(num_rows, split.num_samples)
    try:
        with torch.no_grad():
            out = module(*rows)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        shapes = ", ".join(
            f"{n} {tuple(x.shape) if sh else tuple(x.shape[1:])}{' (shared)' if sh else ''}"
            for n, x, sh in zip(
                split.input_names, split.inputs, split.shared or (False,) * len(split.inputs), strict=True
            )
        )
        raise CheckpointError(
            f"{where}: the model does not accept the inputs ({shapes} per sample, "
            f"{len(split.inputs)} positional input(s)): {first[:200]}"
        ) from None
    if not isinstance(out, Tensor):
        raise CheckpointError(f"{where}: the model returned {type(out).__name__}; lsr needs a single tensor output")
    if out.dim() == 0 or out.shape[0] != batch:
        raise CheckpointError(
            f"{where}: the model output's leading dimension {tuple(out.shape)[:1]} is not the batch size {batch}"
        )
    t_shape = tuple(split.targets.shape[1:])
    o_shape = tuple(out.shape[1:])
    if t_shape != o_shape:
        if math.prod(t_shape) != math.prod(o_shape):
            raise CheckpointError(f"{where}: targets have shape {t_shape} per sample but the model outputs {o_shape}")
        split = dataclasses.replace(split, targets=split.targets.reshape(split.targets.shape[0], *o_shape))
    return split


def select_parameters(module: nn.Module, cfg: Config, gen: torch.Generator) -> ParameterSpace:
    """The linearized parameters of ``module`` chosen by ``config.lsr.parameters`` (error if none)."""
    named = {n: p.detach() for n, p in module.named_parameters()}
    par = cfg.lsr.parameters
    space = ParameterSpace(named, include=par.include, exclude=par.exclude, fraction=par.fraction, generator=gen)
    if space.num == 0:
        raise ConfigError(
            f"config.lsr.parameters: no floating-point parameter is selected; parameter names are {list(named)[:8]}"
        )
    return space


def shared_flags(split: Split) -> tuple[bool, ...]:
    """Per input of ``split``: whether it is shared (no sample dimension)."""
    return split.shared or (False,) * len(split.inputs)


def moved(split: Split, device: torch.device, dtype: torch.dtype) -> Split:
    """The split on ``device``, floating arrays in ``dtype`` (integer inputs keep their dtype)."""
    inputs = tuple(cast_tensor(x, dtype, device) for x in split.inputs)
    return dataclasses.replace(split, inputs=inputs, targets=split.targets.to(device=device, dtype=dtype))


def finite_or_raise(t: Tensor, what: str, comm: Comm = SINGLE) -> None:
    """Raise a :class:`~.errors.NumericalError` naming ``what`` when ``t`` has non-finite values (distributed:
    on every rank, or on none)."""
    bad = int((~torch.isfinite(t)).sum())
    if comm.world > 1:
        bad = comm.sum_int(bad)  # every rank raises, or none
    if bad:
        raise NumericalError(f"{what}: {bad} non-finite value(s)")
