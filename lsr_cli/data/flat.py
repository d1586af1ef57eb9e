"""Files without split groups (benchmark collections): arrays named by path with a selection on the
non-sample dimensions, rows split into train / val / test by seeded fractions or row ranges."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from lsr_cli.config import DataConfig
from lsr_cli.errors import DataError

from .arrays import (
    LazyArray,
    Selection,
    Split,
    _dataset,
    _to_tensor,
)

SPLITS = ("train", "val", "test")


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
            source=f"{file}:{cfg.targets}",
        )
    return out
