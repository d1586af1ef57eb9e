"""Per-instance physics-informed fine-tuning of an operator network (``lsr instances``).

A physics-informed operator network (e.g. a PI-DeepONet) maps an input function ``s_i`` to a
solution ``u_i = G(s_i)``. For each of the ``N`` instances stored in the HDF5 file, the
network with that instance's inputs held fixed, ``x ↦ q(θ, s_i, x)``, is a PINN for that
instance's equation; one-shot LSR on its physics residual alone (no solution labels) gives a
refined predictor ``q(θ0, s_i, x) + J_i(x) δ_i`` for that instance (the paper's
PI-DeepONet experiments, METHOD.md §4).

Config (``instances:`` next to ``pde:``; ``{instance: NAME}`` in ``pde.coefficients`` or a
block's ``value`` reads row ``i`` of ``<group>/NAME``)::

    instances:
      group: /instances       # HDF5 group holding the per-instance arrays, [N, ...] each
      inputs: [branch]        # per-instance model inputs, passed before the coordinates
      layout: paired          # paired: net(branch_i repeated [P, m], x [P, d]) -> [P, 1]
                              # cartesian: net(branch_i [1, m], x [P, d]) -> [1, P]
      reference: reference    # optional: [N, Q] (or [N, Q, C]) exact values at /reference/inputs
      predict_at: /reference/inputs   # where predictions are written (default: that, if present)
      count: all              # or the first K instances
      save_delta: false       # also write every instance's δ (flat, [N, m])

Outputs: an HDF5 file with ``/predictions/before`` and ``/predictions/after`` (``[N, Q]``;
``[N, Q, C]`` for a network with ``C = len(pde.outputs)`` outputs, whose instance reference is
``[N, Q, C_ref]`` compared with the first ``C_ref`` outputs), ``/instances/{rank,
rel_l2_before, rel_l2_after, residual_before, residual_after, seconds, done}`` (``[N]``), for
``pde.unknowns`` each instance's own refined constants ``/unknowns/NAME/{before, after}``
(``[N]``), and optionally ``/delta`` (``[N, m]``, parameter names in its attributes); and a JSON
report with mean ± std over instances. Instances are independent; each finished one
is written to ``OUT.partial`` at once, so an interrupted run started again with the same
command and config skips the finished instances (``--force`` starts over).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import Tensor, nn

from lsr_cli.checkpoint import LoadedCheckpoint
from lsr_cli.config import Config, KeyDoc
from lsr_cli.data import read_datasets, read_row
from lsr_cli.errors import ConfigError, DataError, OutputError
from lsr_cli.prepare import predict
from lsr_cli.result import RefineResult
from lsr_cli.runtime import NoProgress, ProgressSink, cast_module, peak_memory_bytes, resolve_device

from .instances_summary import read_results, summarize, summary_message
from .problem import parse_problem
from .refine_pde import refine_pde

INSTANCE_KEY_DOCS = {
    "group": KeyDoc("string", "/instances", "HDF5 group of the per-instance arrays `[N, ...]`"),
    "inputs": KeyDoc(
        "list[string]", "required", "per-instance model inputs (datasets in `group`), passed before the coordinates"
    ),
    "layout": KeyDoc(
        "string",
        "paired",
        "`paired`: `net(branch_i repeated [P, m], x [P, d]) -> [P, 1]`; "
        "`cartesian`: `net(branch_i [1, m], x [P, d]) -> [1, P]`",
    ),
    "reference": KeyDoc("string", "null", "optional dataset `[N, Q]` in `group`: exact values at `/reference/inputs`"),
    "predict_at": KeyDoc("string", "null", "where predictions are written (default: `/reference/inputs`, if present)"),
    "count": KeyDoc("integer | string", "all", "`all`, or the first K instances (`--count K`)"),
    "save_delta": KeyDoc("boolean", "false", "also write each instance's δ (`[N, m]`, flat)"),
}
"""The keys of ``instances:`` and their documentation (``docs/configuration.md``)."""
INSTANCE_KEYS = tuple(INSTANCE_KEY_DOCS)
LAYOUTS = ("paired", "cartesian")


@dataclass
class InstancesSpec:
    group: str
    inputs: list[str]
    layout: str
    reference: str | None
    predict_at: str | None
    count: int | None
    save_delta: bool


class InstanceModel(nn.Module):
    """``x ↦ net(*fixed, x)``: an operator network with one instance's inputs held fixed.

    ``fixed``: one row per per-instance input (``[m]`` for a branch input). ``paired`` repeats
    each row for every point; ``cartesian`` passes it as a batch of one. The output is
    ``[P, k]`` for ``P`` points. The parameters are those of ``net`` (names ``net.…``).
    """

    def __init__(self, net: nn.Module, fixed: tuple[Tensor, ...], layout: str) -> None:
        super().__init__()
        self.net = net
        self.layout = layout
        self.num_fixed = len(fixed)
        for j, t in enumerate(fixed):
            self.register_buffer(f"fixed{j}", t)

    def forward(self, x: Tensor) -> Tensor:
        fixed = [getattr(self, f"fixed{j}") for j in range(self.num_fixed)]
        if self.layout == "paired":
            args = [f.expand(x.shape[0], *f.shape) for f in fixed]
        else:
            args = [f.unsqueeze(0) for f in fixed]
        out = self.net(*args, x)
        return out.reshape(x.shape[0], -1)


def parse_instances(raw: dict[str, Any] | None, data_path: Path | None) -> tuple[InstancesSpec, int]:
    """Validate ``config.instances`` against the data file; returns the spec and ``N``."""
    if raw is None:
        raise ConfigError("lsr instances needs an `instances:` section in the config (group, inputs, layout)")
    unknown = [k for k in raw if k not in INSTANCE_KEYS]
    if unknown:
        raise ConfigError(f"config.instances.{unknown[0]}: unknown key; expected one of {', '.join(INSTANCE_KEYS)}")
    if data_path is None:
        raise ConfigError("lsr instances needs a data file (--data or data.path) holding the instances")
    group = raw.get("group", "/instances")
    if not isinstance(group, str) or not group:
        raise ConfigError(f"config.instances.group: expected an HDF5 group path, got {group!r}")
    inputs = raw.get("inputs")
    if not isinstance(inputs, list) or not inputs or not all(isinstance(v, str) and v for v in inputs):
        raise ConfigError(f"config.instances.inputs: expected a list of dataset names in {group}, got {inputs!r}")
    layout = raw.get("layout", "paired")
    if layout not in LAYOUTS:
        raise ConfigError(f"config.instances.layout: expected one of {', '.join(LAYOUTS)}, got {layout!r}")
    reference = raw.get("reference")
    if reference is not None and (not isinstance(reference, str) or not reference):
        raise ConfigError(f"config.instances.reference: expected a dataset name in {group}, got {reference!r}")
    predict_at = raw.get("predict_at")
    if predict_at is not None and (not isinstance(predict_at, str) or not predict_at):
        raise ConfigError(f"config.instances.predict_at: expected an HDF5 dataset path, got {predict_at!r}")
    count = raw.get("count", "all")
    if count != "all" and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ConfigError(f"config.instances.count: expected 'all' or a positive integer, got {count!r}")
    save_delta = raw.get("save_delta", False)
    if not isinstance(save_delta, bool):
        raise ConfigError(f"config.instances.save_delta: expected true or false, got {save_delta!r}")
    spec = InstancesSpec(
        group.rstrip("/") or "/",
        list(inputs),
        layout,
        reference,
        predict_at,
        None if count == "all" else count,
        save_delta,
    )
    sizes: dict[str, int] = {}
    with h5py.File(data_path, "r") as f:
        g = f.get(spec.group)
        if not isinstance(g, h5py.Group):
            raise DataError(f"{data_path}:{spec.group}: expected the instances group (config.instances.group)")
        for name in spec.inputs + ([spec.reference] if spec.reference else []):
            ds = g.get(name)
            if not isinstance(ds, h5py.Dataset) or ds.ndim == 0:
                holds = ", ".join(g.keys()) or "nothing"
                raise DataError(
                    f"{data_path}:{spec.group}/{name}: expected a dataset [N, ...]; the group holds: {holds}"
                )
            sizes[name] = int(ds.shape[0])
    if len(set(sizes.values())) != 1:
        raise DataError(f"{data_path}:{spec.group}: the per-instance arrays disagree on N: {sizes}")
    n = next(iter(sizes.values()))
    return spec, min(n, spec.count) if spec.count is not None else n


def fingerprint(cfg: Config, checkpoint: Path, data_path: Path) -> str:
    """What must match for a partial run to be resumed: config, checkpoint and data files."""
    parts: dict[str, Any] = {"config": cfg.to_dict()}
    for name, p in (("checkpoint", checkpoint), ("data", data_path)):
        st = p.stat()
        parts[name] = [str(p.resolve()), st.st_size, st.st_mtime_ns]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class InstancesResult:
    status: str
    message: str
    summary: dict[str, Any]
    per_instance: list[dict[str, Any]]
    num_resumed: int
    timings: dict[str, float]
    peak_memory_bytes: int
    peak_memory_kind: str
    device: str
    num_parameters: int
    num_linearized_parameters: int
    warnings: list[str]


def _create_partial(
    path: Path, n: int, q: int, m: int | None, print_: str, names: list[str], outputs: int, unknowns: list[str]
) -> None:
    """The partial file: predictions ``[n, q]`` (``[n, q, outputs]`` for several outputs), the
    per-instance table, and each unknown's values (``unknowns/NAME/{before, after}``)."""
    shape = (n, q) if outputs == 1 else (n, q, outputs)
    with h5py.File(path, "w") as f:
        f.attrs["lsr_format"] = "lsr-instances/1"
        f.attrs["fingerprint"] = print_
        f.attrs["num_instances"] = n
        p = f.create_group("predictions")
        p.create_dataset("before", shape=shape, dtype="f8", fillvalue=np.nan)
        p.create_dataset("after", shape=shape, dtype="f8", fillvalue=np.nan)
        for name in unknowns:
            for when in ("before", "after"):
                f.create_dataset(f"unknowns/{name}/{when}", shape=(n,), dtype="f8", fillvalue=np.nan)
        g = f.create_group("instances")
        for key in ("rel_l2_before", "rel_l2_after", "residual_before", "residual_after", "seconds"):
            g.create_dataset(key, shape=(n,), dtype="f8", fillvalue=np.nan)
        g.create_dataset("rank", shape=(n,), dtype="i8", fillvalue=-1)
        g.create_dataset("done", shape=(n,), dtype="bool", fillvalue=False)
        if m is not None:
            d = f.create_dataset("delta", shape=(n, m), dtype="f8", fillvalue=np.nan)
            d.attrs["parameters"] = json.dumps(names)


def _open_partial(path: Path, print_: str, n: int, force: bool) -> int:
    """Number of finished instances in an earlier partial run (0 when starting afresh)."""
    if not path.exists():
        return -1
    if force:
        path.unlink()
        return -1
    try:
        with h5py.File(path, "r") as f:
            same = f.attrs.get("fingerprint") == print_ and int(f.attrs.get("num_instances", -1)) == n
            done = int(np.count_nonzero(f["instances/done"][()])) if same else 0
    except (OSError, KeyError) as exc:
        raise OutputError(
            f"{path}: an interrupted run's file is unreadable ({exc}); pass --force to start over"
        ) from None
    if not same:
        raise OutputError(
            f"{path}: an interrupted run with a different config, checkpoint or data left this file; "
            "pass --force to start over"
        )
    return done


def _instance_reference(data_path: Path, spec: InstancesSpec, i: int, ref_x: Tensor, outputs: list[str]) -> Tensor:
    """Instance ``i``'s reference values ``[Q, C_ref]`` (a row ``[Q]`` or ``[Q, C_ref]``, compared
    with the first ``C_ref`` of the network's ``outputs``)."""
    assert spec.reference is not None
    values = read_row(data_path, f"{spec.group}/{spec.reference}", i, torch.float64)
    values = values.reshape(values.shape[0], -1) if values.ndim > 1 else values.reshape(-1, 1)
    if values.shape[0] != ref_x.shape[0] or values.shape[1] > len(outputs):
        raise DataError(
            f"{data_path}:{spec.group}/{spec.reference}: instance {i} has values {tuple(values.shape)} for "
            f"{ref_x.shape[0]} points in /reference/inputs and {len(outputs)} outputs {outputs}; "
            "expected [points] or [points, components]"
        )
    return values


@dataclass
class _Run:
    """What every instance of :func:`run_instances` shares."""

    ckpt: LoadedCheckpoint
    cfg: Config
    spec: InstancesSpec
    data_path: Path
    base_dir: Path | None
    x_pred: Tensor  # [Q, d] where the predictions are written
    ref_x: Tensor | None  # [P, d] /reference/inputs
    outputs: list[str]  # pde.outputs: the network's columns
    names: list[str]  # the network's floating parameters
    dtype: torch.dtype
    device: torch.device


def run_instances(
    ckpt: LoadedCheckpoint,
    cfg: Config,
    spec: InstancesSpec,
    num: int,
    data_path: Path,
    partial: Path,
    print_: str,
    base_dir: Path | None,
    force: bool = False,
    progress: ProgressSink | None = None,
    on_instance: Callable[[int, dict[str, Any]], None] | None = None,
) -> InstancesResult:
    """Refine every instance (skipping those finished in ``partial``); returns the summary.

    ``partial`` (an HDF5 file, see module doc) is complete when this returns; the caller moves
    it to the final output."""
    sink = progress or NoProgress()
    device = resolve_device(cfg.device)
    t_start = time.perf_counter()
    net = ckpt.module
    x_pred, ref_x = _read_points(data_path, spec)
    first = parse_problem(cfg.pde, data_path, torch.Generator().manual_seed(cfg.seed), base_dir, (spec.group, 0))
    if x_pred is None:
        x_pred = first.blocks[0].points
    q, num_outputs = int(x_pred.shape[0]), len(first.outputs)  # pde.outputs: the network's columns
    unknown_names = [u.name for u in first.unknowns]
    if spec.reference is not None and ref_x is not None:  # its shape checked before anything is written
        _instance_reference(data_path, spec, 0, ref_x, first.outputs)
    names = [n for n, p in net.named_parameters() if p.is_floating_point() or p.is_complex()]
    done_before = _open_partial(partial, print_, num, force)
    if done_before < 0:
        _create_partial(partial, num, q, None, print_, names, num_outputs, unknown_names)
        done_before = 0
    with h5py.File(partial, "r") as f:
        done = f["instances/done"][()].astype(bool)
    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    cast_module(net, dtype, device)
    run = _Run(ckpt, cfg, spec, data_path, base_dir, x_pred, ref_x, first.outputs, names, dtype, device)
    advance = sink.begin(f"instances ({num}, {done_before} done before)", num)
    advance(int(done.sum()))
    num_lin = 0
    warnings: list[str] = []
    for i in range(num):
        if done[i]:
            continue
        res, row, before, after = _refine_instance(run, i)
        num_lin = res.num_linearized_parameters
        _write_instance(run, partial, num, i, res, row, before, after)
        if on_instance is not None:
            on_instance(i, row)
        advance(1)
    sink.end()

    per_instance, unknown_values = read_results(partial, num, unknown_names)
    summary = summarize(num, per_instance, unknown_values)
    peak, kind = peak_memory_bytes(device)
    return InstancesResult(
        status="done",
        message=summary_message(num, summary),
        summary=summary,
        per_instance=per_instance,
        num_resumed=done_before,
        timings={"total": time.perf_counter() - t_start},
        peak_memory_bytes=peak,
        peak_memory_kind=kind,
        device=str(device),
        num_parameters=sum(p.numel() for p in net.parameters()),
        num_linearized_parameters=num_lin,
        warnings=warnings,
    )


def _read_points(data_path: Path, spec: InstancesSpec) -> tuple[Tensor | None, Tensor | None]:
    """The prediction points ``[Q, d]`` (``instances.predict_at``, else ``/reference/inputs``; None:
    the first block's points) and ``/reference/inputs`` ``[P, d]`` (None when absent)."""
    x_pred = None
    where_pred = spec.predict_at or "/reference/inputs"
    found = read_datasets(data_path, [where_pred], torch.float64, optional=spec.predict_at is None)
    if where_pred in found:
        x_pred = found[where_pred]
        if x_pred.ndim == 1:
            x_pred = x_pred[:, None]
    ref_x = read_datasets(data_path, ["/reference/inputs"], torch.float64, optional=True).get("/reference/inputs")
    if spec.reference is not None and ref_x is None:
        raise DataError(f"{data_path}:/reference/inputs: needed for config.instances.reference ({spec.reference})")
    return x_pred, ref_x


def _refine_instance(run: _Run, i: int) -> tuple[RefineResult, dict[str, Any], Tensor, Tensor]:
    """Refine instance ``i``: (the refinement's result, its table row, the predictions ``[Q, C]``
    before and after)."""
    t0 = time.perf_counter()
    cfg, spec = run.cfg, run.spec
    problem = parse_problem(
        cfg.pde, run.data_path, torch.Generator().manual_seed(cfg.seed), run.base_dir, (spec.group, i)
    )
    if spec.reference is not None and run.ref_x is not None:
        problem.reference = (run.ref_x, _instance_reference(run.data_path, spec, i, run.ref_x, run.outputs))
    else:
        problem.reference = None
    fixed = tuple(read_row(run.data_path, f"{spec.group}/{name}", i, run.dtype).to(run.device) for name in spec.inputs)
    module = InstanceModel(run.ckpt.module, fixed, spec.layout)
    inst = LoadedCheckpoint(run.ckpt.path, "instance", module)
    res = refine_pde(inst, problem, cfg)
    q, num_outputs = int(run.x_pred.shape[0]), len(run.outputs)
    xp = run.x_pred.to(device=run.device, dtype=run.dtype)
    before = predict(module, (xp,), 4096).reshape(q, num_outputs)  # [Q, C]
    after = predict(res.model, (xp,), 4096).reshape(q, num_outputs)
    ref = res.errors.get("reference", {})
    row = {
        "index": i,
        "rank": res.rank,
        "rel_l2_before": ref.get("before", {}).get("rel_l2"),
        "rel_l2_after": ref.get("after", {}).get("rel_l2"),
        "residual_before": (res.residual_loss or {}).get("before"),
        "residual_after": (res.residual_loss or {}).get("after"),
        "seconds": time.perf_counter() - t0,
    }
    return res, row, before, after


def _write_instance(
    run: _Run, partial: Path, num: int, i: int, res: RefineResult, row: dict[str, Any], before: Tensor, after: Tensor
) -> None:
    """Instance ``i``'s predictions, constants, table row (and step) into ``partial``, marked done."""
    net, names, num_outputs = run.ckpt.module, run.names, len(run.outputs)
    with h5py.File(partial, "a") as f:
        for when, pred in (("before", before), ("after", after)):
            values_np = pred.detach().cpu().double().numpy()
            f[f"predictions/{when}"][i] = values_np[:, 0] if num_outputs == 1 else values_np
        for name, entry in (res.unknowns or {}).items():  # pde.unknowns: this instance's own constants
            f[f"unknowns/{name}/before"][i] = entry["before"]
            f[f"unknowns/{name}/after"][i] = entry["after"]
        g = f["instances"]
        for key in ("rel_l2_before", "rel_l2_after", "residual_before", "residual_after", "seconds"):
            g[key][i] = np.nan if row[key] is None else row[key]
        g["rank"][i] = res.rank
        if run.spec.save_delta:
            flat = torch.cat(
                [
                    (torch.view_as_real(d) if d.is_complex() else d).reshape(-1).double().cpu()
                    if (d := res.delta.get(f"net.{n}")) is not None
                    else torch.zeros(int(dict(net.named_parameters())[n].numel()), dtype=torch.float64)
                    for n in names
                ]
            ).numpy()
            if "delta" not in f:
                ds = f.create_dataset("delta", shape=(num, flat.size), dtype="f8", fillvalue=np.nan)
                ds.attrs["parameters"] = json.dumps(names)
            f["delta"][i] = flat
        g["done"][i] = True
        f.flush()


__all__ = ["InstanceModel", "InstancesResult", "InstancesSpec", "fingerprint", "parse_instances", "run_instances"]
