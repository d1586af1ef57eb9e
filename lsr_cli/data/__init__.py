"""HDF5 data: the only module that opens HDF5 files.

Layout (group and dataset names configurable through ``config.data``)::

    /train/inputs    [N, ...]  one input array, or a group of arrays for a multi-input model
    /train/targets   [N, ...]
    /val/...         optional, same layout (rank / regularization selection)
    /test/...        optional, same layout (reported only)

A group ``inputs`` holding several datasets is passed to the model positionally, in the order
given by the group's ``order`` attribute (a list of dataset names) when present, else sorted by
name. All arrays of a split share the leading sample dimension ``N``, except a dataset with
the attribute ``shared = True``: it has no sample dimension and is passed whole with every
batch of samples (the Cartesian-product DeepONet layout: ``branch [N, m]`` per sample, ``trunk
[P, d]`` shared, targets ``[N, P]``, model ``(branch [B, m], trunk [P, d]) → [B, P]``).

Files without split groups (benchmark collections such as PDEBench: ``tensor [N, T, X]``,
``x-coordinate [X]``, ``t-coordinate [T]``): ``config.data.inputs`` / ``targets`` name datasets
by absolute path with an optional selection on the non-sample dimensions (``/tensor[:, 0]``,
``/x-coordinate[:, None]``), and ``config.data.split`` divides the samples into train / val /
test by seeded fractions or by row ranges (:func:`split_rows`).
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import torch
from torch import Tensor

from lsr_cli.config import DataConfig
from lsr_cli.errors import DataError

from .arrays import (
    ArrayLike,
    LazyArray,
    Selection,
    Split,
    _dataset,
    _input_bytes,
    _listing,
    _open,
    _read_array,
    _read_input,
    _sample_count,
    _to_tensor,
)
from .flat import SPLITS, _is_flat, _read_flat, split_rows


def _read_split(
    file: Path,
    f: h5py.File,
    role: str,
    group: str,
    cfg: DataConfig,
    dtype: torch.dtype,
    lazy_above: int | None,
    shard: tuple[int, int] | None = None,
) -> Split:
    grp = f[group]
    if not isinstance(grp, h5py.Group):
        raise DataError(
            f"{file}:/{group}: expected a group holding '{cfg.inputs}' and '{cfg.targets}', found a dataset"
        )
    for key in (cfg.inputs, cfg.targets):
        if key not in grp:
            raise DataError(
                f"{file}:/{group}/{key}: not found (config.data.{'inputs' if key == cfg.inputs else 'targets'}); "
                f"/{group} holds: {_listing(grp)}"
            )
    inp = grp[cfg.inputs]
    rows: tuple[int, int] | None = None
    fraction = 1.0
    total = _sample_count(file, grp, cfg)
    if shard is not None:
        rank, world = shard
        if total < world:
            raise DataError(
                f"{file}:/{group}: the split has {total} samples, fewer than the {world} processes; "
                "run on fewer processes"
            )
        base, extra = divmod(total, world)
        start = rank * base + min(rank, extra)
        rows = (start, start + base + (1 if rank < extra else 0))
        fraction = (rows[1] - rows[0]) / total
    if isinstance(inp, h5py.Group):
        if "order" in inp.attrs:
            order = [o.decode() if isinstance(o, bytes) else str(o) for o in np.atleast_1d(inp.attrs["order"])]
            missing = [o for o in order if o not in inp]
            if missing:
                raise DataError(
                    f"{file}:{inp.name}: attribute 'order' names {missing}, which are not in the group ({_listing(inp)})"
                )
        else:
            order = sorted(k for k, v in inp.items() if isinstance(v, h5py.Dataset))
        if not order:
            raise DataError(f"{file}:{inp.name}: the inputs group holds no datasets")
        shared = tuple(bool(np.all(inp[name].attrs.get("shared", False))) for name in order)
        nbytes = sum(
            _input_bytes(inp[name], dtype, 1.0 if sh else fraction)
            for name, sh in zip(order, shared, strict=True)
            if isinstance(inp[name], h5py.Dataset)
        )
        lazy = lazy_above is not None and nbytes > lazy_above
        inputs = tuple(
            _read_input(file, inp[name], dtype, lazy and not sh, None if sh else rows)
            for name, sh in zip(order, shared, strict=True)
        )
        names = [f"{inp.name}/{name}" for name in order]
        if all(shared):
            raise DataError(
                f"{file}:{inp.name}: every input dataset is marked shared; at least one needs a sample dimension"
            )
    else:
        lazy = lazy_above is not None and _input_bytes(inp, dtype, fraction) > lazy_above
        inputs = (_read_input(file, inp, dtype, lazy, rows),)
        names = [inp.name]
        shared = (False,)
    tgt = grp[cfg.targets]
    if isinstance(tgt, h5py.Group):
        raise DataError(f"{file}:{tgt.name}: expected a dataset of targets, found a group")
    targets = _read_array(file, tgt, dtype, rows)
    if not targets.is_floating_point():
        targets = targets.to(dtype)
    n = targets.shape[0]
    for name, is_shared in zip(names, shared, strict=True):
        count = f[name].shape[0] if f[name].ndim else 0
        if not is_shared and count != total:
            raise DataError(
                f"{file}:{name}: has {count} samples but {tgt.name} has {total}; "
                "all arrays of a split need the same leading dimension (or mark an array without one "
                "with the attribute shared=True)"
            )
    if n == 0:
        raise DataError(f"{file}:{tgt.name}: the split has no samples")
    source = f"{file}:{tgt.name}"
    if rows is None:
        return Split(role, group, inputs, targets, names, shared, source=source)
    return Split(role, group, inputs, targets, names, shared, first_row=rows[0], num_total=total, source=source)


def read_data(
    path: str | Path,
    cfg: DataConfig,
    dtype: torch.dtype,
    lazy_above: int | None = None,
    shard: tuple[int, int] | None = None,
) -> dict[str, Split]:
    """Read the configured splits (``train`` required, ``val`` and ``test`` when present).

    ``shard = (rank, world)``: read only this rank's contiguous share of every split's samples
    (sizes differ by at most one; shared inputs whole); ``Split.first_row`` and
    ``Split.num_total`` say where the share lies.

    Floating arrays are converted to ``dtype``; integer arrays stay ``int64``. A split whose
    inputs would take more than ``lazy_above`` bytes keeps them in the file
    (:class:`LazyArray`, read in row chunks); targets are always read (they are the size of
    the residual vector).
    """
    out: dict[str, Split] = {}
    with _open(path) as (file, f):
        if _is_flat(cfg):
            return _read_flat(file, f, cfg, dtype, lazy_above, shard)
        for role in SPLITS:
            group = getattr(cfg, role)
            if group is None:
                continue
            group = group.strip("/")
            if group not in f:
                if role == "train":
                    raise DataError(
                        f"{file}:/{group}: training split not found (config.data.train); the file holds: {_listing(f)}"
                    )
                continue
            out[role] = _read_split(file, f, role, group, cfg, dtype, lazy_above, shard)
    return out


def read_datasets(path: str | Path, names: list[str], dtype: torch.dtype, optional: bool = False) -> dict[str, Tensor]:
    """Read the named datasets (absolute HDF5 paths such as ``/collocation/interior``).

    Missing datasets raise :class:`DataError` listing what the parent group holds, or are
    skipped when ``optional``.
    """
    out: dict[str, Tensor] = {}
    with _open(path) as (file, f):
        for name in names:
            obj = _dataset(file, f, name, optional)
            if obj is None:
                continue
            arr = _read_array(file, obj, dtype)
            out[name] = arr if arr.is_floating_point() else arr.to(dtype)
    return out


def read_row(path: str | Path, name: str, row: int, dtype: torch.dtype) -> Tensor:
    """Row ``row`` of the dataset ``name`` (``[N, ...]`` → ``[...]``), e.g. one instance's values."""
    with _open(path) as (file, f):
        obj = _dataset(file, f, name)
        assert obj is not None
        where = f"{file}:{obj.name}"
        if obj.ndim == 0 or not (0 <= row < obj.shape[0]):
            raise DataError(f"{where}: has no row {row} (shape {tuple(obj.shape)})")
        if obj.dtype.kind not in "fiub":
            raise DataError(f"{where}: expected a numeric array, found dtype {obj.dtype}")
        arr = np.asarray(obj[row])
    return _to_tensor(where, arr, dtype, f" in row {row}").to(dtype)


__all__ = [
    "SPLITS",
    "ArrayLike",
    "LazyArray",
    "Selection",
    "Split",
    "read_data",
    "read_datasets",
    "read_row",
    "split_rows",
]
