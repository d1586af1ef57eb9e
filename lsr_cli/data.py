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


class LazyArray:
    """A numeric HDF5 dataset read in row slices on demand (data larger than the memory budget).

    Looks like a tensor to the row-chunked code: ``shape``, ``dtype``, ``x[s:e]`` / ``x[index]``
    (sorted row indices) return tensors in ``dtype`` on ``device``. Keeps its file open.
    """

    def __init__(
        self,
        file: Path,
        name: str,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        rows: tuple[int, int] | None = None,
    ) -> None:
        self.file = file
        self.name = name
        self._h5 = h5py.File(file, "r")
        ds = self._h5[name]
        self.offset, stop = rows if rows is not None else (0, int(ds.shape[0]))  # rows [offset, stop) only
        self.shape = torch.Size((stop - self.offset, *ds.shape[1:]))
        self.kind = ds.dtype.kind
        self.dtype = dtype if self.kind in "fb" else torch.int64
        self.device = torch.device(device)

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def is_complex(self) -> bool:
        return False

    def dim(self) -> int:
        return len(self.shape)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> LazyArray:
        out = LazyArray.__new__(LazyArray)
        out.__dict__.update(self.__dict__)
        if dtype is not None and self.kind in "fb":
            out.dtype = dtype
        if device is not None:
            out.device = torch.device(device)
        return out

    def __getitem__(self, index: slice | Tensor) -> Tensor:
        ds = self._h5[self.name]
        if isinstance(index, Tensor):
            arr = ds[np.asarray(index.cpu(), dtype=np.int64) + self.offset]  # h5py: increasing indices
        elif self.offset or self.shape[0] != ds.shape[0]:
            start, stop, step = index.indices(self.shape[0])
            arr = ds[start + self.offset : stop + self.offset : step]
        else:
            arr = ds[index]
        t = _to_tensor(f"{self.file}:{self.name}", np.asarray(arr), self.dtype, f" in rows {index}")
        return t.to(device=self.device, dtype=self.dtype)


ArrayLike = Tensor | LazyArray


@dataclass
class Split:
    """One split: ``inputs`` (tensors ``[N, ...]``, model order) and ``targets`` ``[N, ...]``."""

    name: str
    group: str
    inputs: tuple[Tensor, ...]  # or LazyArray (streamed) when the split exceeds the memory budget
    targets: Tensor
    input_names: list[str]
    shared: tuple[bool, ...] = ()
    first_row: int = 0  # distributed: this rank's samples are [first_row, first_row + num_samples)
    num_total: int | None = None  # distributed: the split's sample count over every rank

    @property
    def num_samples(self) -> int:
        """Samples held here (this rank's share when distributed)."""
        return int(self.targets.shape[0])

    @property
    def num_global(self) -> int:
        """Samples of the whole split (over every rank)."""
        return self.num_total if self.num_total is not None else self.num_samples


def _listing(group: h5py.Group) -> str:
    names = []
    for key, obj in group.items():
        names.append(f"{key}/" if isinstance(obj, h5py.Group) else f"{key} {tuple(obj.shape)}")
    return ", ".join(names) if names else "nothing"


def _to_tensor(where: str, arr: np.ndarray, dtype: torch.dtype, part: str = "") -> Tensor:
    """Numeric array read from ``where`` → tensor: floating (NaN/Inf refused, naming ``part``)
    and boolean in ``dtype``, integers as ``int64``."""
    if arr.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        if bad:
            raise DataError(f"{where}: contains {bad} NaN or Inf value(s){part}")
        return torch.from_numpy(np.ascontiguousarray(arr)).to(dtype)
    if arr.dtype.kind == "b":
        return torch.from_numpy(arr.astype(np.float64)).to(dtype)
    return torch.from_numpy(np.ascontiguousarray(arr.astype(np.int64)))


def _read_array(file: Path, ds: h5py.Dataset, dtype: torch.dtype, rows: tuple[int, int] | None = None) -> Tensor:
    where = f"{file}:{ds.name}"
    if ds.dtype.kind not in "fiub":
        raise DataError(f"{where}: expected a numeric array, found dtype {ds.dtype}")
    if ds.ndim == 0:
        raise DataError(f"{where}: expected an array with a leading sample dimension, found a scalar")
    return _to_tensor(where, np.asarray(ds[()] if rows is None else ds[rows[0] : rows[1]]), dtype)


def _input_bytes(ds: h5py.Dataset, dtype: torch.dtype, fraction: float = 1.0) -> int:
    size = torch.empty(0, dtype=dtype if ds.dtype.kind in "fb" else torch.int64).element_size()
    return int(np.prod(ds.shape) * fraction) * size


def _read_input(
    file: Path, ds: h5py.Dataset, dtype: torch.dtype, lazy: bool, rows: tuple[int, int] | None = None
) -> Tensor:
    if not lazy:
        return _read_array(file, ds, dtype, rows)
    if ds.dtype.kind not in "fiub":
        raise DataError(f"{file}:{ds.name}: expected a numeric array, found dtype {ds.dtype}")
    if ds.ndim == 0:
        raise DataError(f"{file}:{ds.name}: expected an array with a leading sample dimension, found a scalar")
    return LazyArray(file, ds.name, dtype, rows=rows)  # type: ignore[return-value]


def _sample_count(file: Path, grp: h5py.Group, cfg: DataConfig) -> int:
    """The split's sample count: the targets' leading dimension (checked against the inputs later)."""
    tgt = grp[cfg.targets]
    if isinstance(tgt, h5py.Group):
        raise DataError(f"{file}:{tgt.name}: expected a dataset of targets, found a group")
    if tgt.ndim == 0:
        raise DataError(f"{file}:{tgt.name}: expected an array with a leading sample dimension, found a scalar")
    return int(tgt.shape[0])


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
    if rows is None:
        return Split(role, group, inputs, targets, names, shared)
    return Split(role, group, inputs, targets, names, shared, first_row=rows[0], num_total=total)


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


def _dataset(file: Path, f: h5py.File, name: str, optional: bool = False) -> h5py.Dataset | None:
    """The dataset at the absolute path ``name``; ``None`` when missing and ``optional``, else a
    :class:`DataError` listing what the parent group holds."""
    key = "/" + name.strip("/")
    obj = f.get(key)
    if isinstance(obj, h5py.Dataset):
        return obj
    if optional and obj is None:
        return None
    parent = f.get(key.rsplit("/", 1)[0] or "/")
    holds = _listing(parent) if isinstance(parent, h5py.Group) else "nothing"
    found = "a group" if isinstance(obj, h5py.Group) else "nothing"
    where = parent.name if isinstance(parent, h5py.Group) else "/"
    raise DataError(f"{file}:{key}: expected a dataset, found {found}; {where} holds: {holds}")


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
