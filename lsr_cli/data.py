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

from .config import DataConfig
from .errors import DataError

SPLITS = ("train", "val", "test")


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


def split_rows(num_samples: int, split: dict[str, Any], where: str) -> dict[str, tuple[np.ndarray, dict[str, Any]]]:
    """Rows of each split named in ``split`` (see :func:`lsr_cli.config.parse_split`): sorted
    file rows and a description for the report. Fractions shuffle with ``split['seed']``
    (an explicit generator); ranges keep the file's order."""
    out: dict[str, tuple[np.ndarray, dict[str, Any]]] = {}
    names = [n for n in SPLITS if n in split]
    if all(isinstance(split[n], list) for n in names):
        for name in names:
            start, stop = split[name]
            if stop > num_samples:
                raise DataError(
                    f"{where}: config.data.split.{name} [{start}, {stop}] reaches beyond the {num_samples} samples"
                )
            out[name] = (np.arange(start, stop), {"rows": [start, stop], "of": num_samples})
        return out
    gen = torch.Generator().manual_seed(int(split["seed"]))
    order = torch.randperm(num_samples, generator=gen).numpy()
    start = 0
    for name in names:
        count = int(np.floor(split[name] * num_samples + 1e-9))
        if count == 0:
            raise DataError(
                f"{where}: config.data.split.{name}: {split[name]} of {num_samples} samples is no sample; "
                "use a larger fraction or drop the entry"
            )
        rows = np.sort(order[start : start + count])
        out[name] = (rows, {"fraction": split[name], "seed": int(split["seed"]), "of": num_samples})
        start += count
    return out


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


def _is_flat(cfg: DataConfig) -> bool:
    """Datasets named by path (a file without split groups) rather than inside split groups."""
    names = cfg.inputs if isinstance(cfg.inputs, list) else [cfg.inputs]
    return (
        cfg.split is not None
        or isinstance(cfg.inputs, list)
        or any(n.strip().startswith("/") for n in [*names, cfg.targets])
    )


def _numeric(file: Path, f: h5py.File, sel: Selection) -> h5py.Dataset:
    ds = _dataset(file, f, sel.name)
    assert ds is not None
    if ds.dtype.kind not in "fiub":
        raise DataError(f"{file}:{sel.name}: expected a numeric array, found dtype {ds.dtype}")
    return ds


def _rows_key(rows: np.ndarray) -> np.ndarray | slice:
    """A slice when the rows are contiguous (fast HDF5 read), else the sorted rows."""
    if len(rows) and int(rows[-1]) - int(rows[0]) + 1 == len(rows):
        return slice(int(rows[0]), int(rows[-1]) + 1)
    return rows


def _read_flat(
    file: Path,
    f: h5py.File,
    cfg: DataConfig,
    dtype: torch.dtype,
    lazy_above: int | None,
    shard: tuple[int, int] | None,
) -> dict[str, Split]:
    listed = cfg.inputs if isinstance(cfg.inputs, list) else [cfg.inputs]
    keys = [f"data.inputs[{i}]" if isinstance(cfg.inputs, list) else "data.inputs" for i in range(len(listed))]
    sels = [Selection.parse(text, key) for text, key in zip(listed, keys, strict=True)]
    shared = tuple(text in cfg.shared for text in listed)
    if all(shared):
        raise DataError("config.data.shared: every input is shared; at least one needs a sample dimension")
    tsel = Selection.parse(cfg.targets, "data.targets")
    tds = _numeric(file, f, tsel)
    if tds.ndim == 0 or not tsel.keeps_samples():
        raise DataError(
            f"{file}:{cfg.targets}: the targets need their leading sample dimension whole (write [:, ...]), "
            f"shape {tuple(tds.shape)}"
        )
    total = int(tds.shape[0])
    datasets = []
    for text, sel, sh in zip(listed, sels, shared, strict=True):
        ds = _numeric(file, f, sel)
        sel.shape(tuple(ds.shape))  # a selection that does not fit the dataset fails here
        if not sh and (ds.ndim == 0 or not sel.keeps_samples() or int(ds.shape[0]) != total):
            raise DataError(
                f"{file}:{text}: has shape {tuple(ds.shape)}, but the targets {cfg.targets} have {total} samples; "
                "inputs need the same leading dimension, kept whole ([:, ...]), or be listed in config.data.shared"
            )
        datasets.append(ds)
    if cfg.split is not None:
        plan = split_rows(total, cfg.split, str(file))
    else:
        plan = {"train": (np.arange(total), {"rows": [0, total], "of": total})}
    out: dict[str, Split] = {}
    for role, (all_rows, desc) in plan.items():
        rows, first = all_rows, 0
        if shard is not None:
            rank, world = shard
            if len(all_rows) < world:
                raise DataError(
                    f"{file}: the {role} split has {len(all_rows)} samples, fewer than the {world} processes; "
                    "run on fewer processes"
                )
            base, extra = divmod(len(all_rows), world)
            first = rank * base + min(rank, extra)
            rows = all_rows[first : first + base + (1 if rank < extra else 0)]
        key = _rows_key(rows)
        size = torch.empty(0, dtype=dtype).element_size()
        nbytes = sum(
            int(np.prod(sel.shape(tuple(ds.shape))[1:] or (1,))) * (1 if sh else len(rows)) * size
            for sel, ds, sh in zip(sels, datasets, shared, strict=True)
        )
        lazy = lazy_above is not None and nbytes > lazy_above
        inputs: list[Any] = []
        for text, sel, ds, sh in zip(listed, sels, datasets, shared, strict=True):
            if sh:
                inputs.append(_to_tensor(f"{file}:{text}", sel.read(ds), dtype))
            elif lazy:
                inputs.append(LazyArray(file, sel.name, dtype, index=np.asarray(rows), select=sel))
            else:
                inputs.append(_to_tensor(f"{file}:{text}", sel.read(ds, key), dtype))
        targets = _to_tensor(f"{file}:{cfg.targets}", tsel.read(tds, key), dtype)
        if not targets.is_floating_point():
            targets = targets.to(dtype)
        out[role] = Split(
            role,
            "/",
            tuple(inputs),
            targets,
            list(listed),
            shared,
            first_row=first,
            num_total=len(all_rows) if shard is not None else None,
            selection=desc,
        )
    return out


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
