"""HDF5 data: the only module that opens HDF5 files.

Layout (group and dataset names configurable through ``config.data``)::

    /train/inputs    [N, ...]  one input array, or a group of arrays for a multi-input model
    /train/targets   [N, ...]
    /val/...         optional, same layout (rank / regularization selection)
    /test/...        optional, same layout (reported only)

A group ``inputs`` holding several datasets is passed to the model positionally, in the order
given by the group's ``order`` attribute (a list of dataset names) when present, else sorted by
name. All arrays of a split share the leading sample dimension ``N``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import Tensor

from .config import DataConfig
from .errors import DataError

SPLITS = ("train", "val", "test")


@dataclass
class Split:
    """One split: ``inputs`` (tensors ``[N, ...]``, model order) and ``targets`` ``[N, ...]``."""

    name: str
    group: str
    inputs: tuple[Tensor, ...]
    targets: Tensor
    input_names: list[str]

    @property
    def num_samples(self) -> int:
        return int(self.targets.shape[0])


def _listing(group: h5py.Group) -> str:
    names = []
    for key, obj in group.items():
        names.append(f"{key}/" if isinstance(obj, h5py.Group) else f"{key} {tuple(obj.shape)}")
    return ", ".join(names) if names else "nothing"


def _read_array(file: Path, ds: h5py.Dataset, dtype: torch.dtype) -> Tensor:
    where = f"{file}:{ds.name}"
    if ds.dtype.kind not in "fiub":
        raise DataError(f"{where}: expected a numeric array, found dtype {ds.dtype}")
    if ds.ndim == 0:
        raise DataError(f"{where}: expected an array with a leading sample dimension, found a scalar")
    arr = np.asarray(ds[()])
    if arr.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        if bad:
            raise DataError(f"{where}: contains {bad} NaN or Inf value(s)")
        return torch.from_numpy(np.ascontiguousarray(arr)).to(dtype)
    if arr.dtype.kind == "b":
        return torch.from_numpy(arr.astype(np.float64)).to(dtype)
    return torch.from_numpy(np.ascontiguousarray(arr.astype(np.int64)))


def _read_split(file: Path, f: h5py.File, role: str, group: str, cfg: DataConfig, dtype: torch.dtype) -> Split:
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
        inputs = tuple(_read_array(file, inp[name], dtype) for name in order)
        names = [f"{inp.name}/{name}" for name in order]
    else:
        inputs = (_read_array(file, inp, dtype),)
        names = [inp.name]
    tgt = grp[cfg.targets]
    if isinstance(tgt, h5py.Group):
        raise DataError(f"{file}:{tgt.name}: expected a dataset of targets, found a group")
    targets = _read_array(file, tgt, dtype)
    if not targets.is_floating_point():
        targets = targets.to(dtype)
    n = targets.shape[0]
    for name, x in zip(names, inputs, strict=True):
        if x.shape[0] != n:
            raise DataError(
                f"{file}:{name}: has {x.shape[0]} samples but {tgt.name} has {n}; "
                "all arrays of a split need the same leading dimension"
            )
    if n == 0:
        raise DataError(f"{file}:{tgt.name}: the split has no samples")
    return Split(role, group, inputs, targets, names)


@contextmanager
def _open(path: str | Path) -> Iterator[tuple[Path, h5py.File]]:
    """Open an HDF5 file for reading; missing, non-HDF5 or unreadable files are a :class:`DataError`."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{file}: data file not found")
    try:
        if not h5py.is_hdf5(str(file)):
            raise DataError(f"{file}: not an HDF5 file")
        with h5py.File(file, "r") as f:
            yield file, f
    except DataError:
        raise
    except OSError as exc:
        raise DataError(f"{file}: cannot read HDF5 file: {exc}") from None


def read_data(path: str | Path, cfg: DataConfig, dtype: torch.dtype) -> dict[str, Split]:
    """Read the configured splits (``train`` required, ``val`` and ``test`` when present).

    Floating arrays are converted to ``dtype``; integer arrays stay ``int64``.
    """
    out: dict[str, Split] = {}
    with _open(path) as (file, f):
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
            out[role] = _read_split(file, f, role, group, cfg, dtype)
    return out


def read_datasets(path: str | Path, names: list[str], dtype: torch.dtype, optional: bool = False) -> dict[str, Tensor]:
    """Read the named datasets (absolute HDF5 paths such as ``/collocation/interior``).

    Missing datasets raise :class:`DataError` listing what the parent group holds, or are
    skipped when ``optional``.
    """
    out: dict[str, Tensor] = {}
    with _open(path) as (file, f):
        for name in names:
            key = "/" + name.strip("/")
            obj = f.get(key)
            if not isinstance(obj, h5py.Dataset):
                if optional and obj is None:
                    continue
                parent = f.get(key.rsplit("/", 1)[0] or "/")
                holds = _listing(parent) if isinstance(parent, h5py.Group) else "nothing"
                found = "a group" if isinstance(obj, h5py.Group) else "nothing"
                where = parent.name if isinstance(parent, h5py.Group) else "/"
                raise DataError(f"{file}:{key}: expected a dataset, found {found}; {where} holds: {holds}")
            arr = _read_array(file, obj, dtype)
            out[name] = arr if arr.is_floating_point() else arr.to(dtype)
    return out
