"""The arrays of a split: a dataset named with a selection on its non-sample dimensions
(:class:`Selection`), tensors in memory or rows streamed from the file (:class:`LazyArray`), a
split (:class:`Split`), and reading one dataset or its rows."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import Tensor

from lsr_cli.config import DataConfig
from lsr_cli.errors import DataError

_SELECTION = re.compile(r"^\s*([^\[\]]+?)\s*(?:\[(.*)\])?\s*$")
_SLICE = re.compile(r"^\s*(-?\d+)?\s*:\s*(-?\d+)?\s*(?::\s*(-?\d+)?\s*)?$")


@dataclass(frozen=True)
class Selection:
    """A dataset path with an optional selection on its dimensions, ``/tensor[:, 0]``.

    ``parts``: one entry per index position: an ``int``, a ``slice`` or ``None`` (a new axis of
    length 1). Parsed from text by :meth:`parse` (no ``eval``).
    """

    name: str
    parts: tuple[int | slice | None, ...]
    text: str = ""

    @staticmethod
    def parse(text: str, key: str) -> Selection:
        m = _SELECTION.match(text)
        if m is None:
            raise DataError(f"config.{key}: expected a dataset path such as /tensor or /tensor[:, 0], got {text!r}")
        name, inner = m.group(1), m.group(2)
        parts: list[int | slice | None] = []
        for item in [] if inner is None else inner.split(","):
            item = item.strip()
            if item == "None":
                parts.append(None)
            elif re.fullmatch(r"-?\d+", item):
                parts.append(int(item))
            elif (sm := _SLICE.match(item)) is not None:
                a, b, c = (int(g) if g is not None else None for g in sm.groups())
                parts.append(slice(a, b, c))
            else:
                raise DataError(f"config.{key}: {text!r}: cannot read the index {item!r}; use integers, a:b, : or None")
        return Selection("/" + name.strip().strip("/"), tuple(parts), text)

    def keeps_samples(self) -> bool:
        """Whether the first dimension (the samples) is kept whole: no selection or ``[:, ...]``."""
        return not self.parts or self.parts[0] == slice(None)

    def _h5_key(self, rows: Any) -> tuple[Any, ...]:
        parts = [p for p in self.parts if p is not None]
        if rows is not None:
            parts = [rows, *parts[1:]] if parts else [rows]
        return tuple(parts)

    def _new_axes(self, arr: np.ndarray) -> np.ndarray:
        if None not in self.parts:
            return arr
        index: list[Any] = []
        for p in self.parts:
            if p is None:
                index.append(np.newaxis)
            elif isinstance(p, slice):
                index.append(slice(None))
        return arr[tuple(index)]

    def read(self, ds: h5py.Dataset, rows: np.ndarray | slice | None = None) -> np.ndarray:
        """The selected array; ``rows`` (sorted file rows or a slice) replaces the first index."""
        if rows is None and not self.parts:
            return np.asarray(ds[()])
        try:
            arr = np.asarray(ds[self._h5_key(rows)])
        except (IndexError, ValueError, TypeError) as exc:
            raise DataError(f"{ds.file.filename}:{self.text or self.name}: {exc} (shape {tuple(ds.shape)})") from None
        return self._new_axes(arr)

    def shape(self, full: tuple[int, ...]) -> tuple[int, ...]:
        """The shape that :meth:`read` gives for a dataset of shape ``full`` (no I/O)."""
        if not full:
            return ()
        view = np.lib.stride_tricks.as_strided(np.empty(1, np.uint8), shape=full, strides=(0,) * len(full))
        try:
            return tuple(view[self._numpy_key()].shape)
        except IndexError as exc:
            raise DataError(f"{self.text or self.name}: {exc} (shape {full})") from None

    def _numpy_key(self) -> tuple[Any, ...]:
        return tuple(np.newaxis if p is None else p for p in self.parts)


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
        index: np.ndarray | None = None,
        select: Selection | None = None,
    ) -> None:
        self.file = file
        self.name = name
        self._h5 = h5py.File(file, "r")
        ds = self._h5[name]
        self.offset, stop = rows if rows is not None else (0, int(ds.shape[0]))  # rows [offset, stop) only
        self.index = index  # the file rows of this array's rows (sorted), instead of [offset, stop)
        self.select = select
        count = len(index) if index is not None else stop - self.offset
        trailing = tuple(ds.shape[1:]) if select is None else select.shape(tuple(ds.shape))[1:]
        self.shape = torch.Size((count, *trailing))
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
        if self.index is not None or self.select is not None:
            local = np.arange(self.shape[0])[index.cpu().numpy() if isinstance(index, Tensor) else index]
            file_rows = self.index[local] if self.index is not None else local + self.offset
            select = self.select or Selection(self.name, ())
            arr = select.read(ds, file_rows)
            t = _to_tensor(f"{self.file}:{self.name}", arr, self.dtype, f" in rows {index}")
            return t.to(device=self.device, dtype=self.dtype)
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
    selection: dict | None = None  # how the rows were chosen by config.data.split (for the report)
    source: str = ""  # the file and the targets' dataset as read, for messages: "data.h5:/train/targets"

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
