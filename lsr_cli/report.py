"""Reports: the JSON document of a run, progress, the results table and the closing line.

The only module that imports Rich. Progress and tables go to the given consoles; the JSON
report is a plain dict (schema in the README). On a terminal, progress is a set of Rich bars
and tables fit its width; elsewhere (a pipe, a log file) progress is one plain line per
finished stage and tables are as wide as their contents, so no digit is cut.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import h5py
import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from . import __version__
from .metrics import describe_change
from .result import RefineResult

SPLIT_ORDER = ("train", "val", "test")

LOG_WIDTH = 1000
"""Columns of stdout when it is not a terminal: wider than any table, so no cell is cut."""


def output_console() -> Console:
    """A console on stdout: the terminal's width on a terminal; :data:`LOG_WIDTH` elsewhere,
    where Rich would otherwise lay tables out for 80 columns and cut cells (``2.96e+0…``)."""
    console = Console()
    return console if console.is_terminal else Console(width=LOG_WIDTH)


def versions() -> dict[str, str]:
    return {
        "lsr": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "h5py": h5py.__version__,
        "numpy": np.__version__,
    }


def clean_json(obj: Any) -> Any:
    """JSON-safe copy: non-finite floats become null, tuples lists, paths strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def refine_report(
    result: RefineResult,
    *,
    input_info: dict[str, Any],
    output_info: dict[str, Any],
    data_info: dict[str, Any],
    config: dict[str, Any],
    timings: dict[str, float],
    seed: int,
) -> dict[str, Any]:
    """The JSON report of ``lsr refine``."""
    return clean_json(
        {
            "command": "refine",
            "status": result.status,
            "message": result.message,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "input": input_info,
            "output": output_info,
            "data": data_info,
            "splits": {s: result.errors[s] for s in (*SPLIT_ORDER, "reference") if s in result.errors},
            **(
                {"residual_blocks": result.residual_blocks, "residual_loss": result.residual_loss}
                if result.residual_blocks is not None
                else {}
            ),
            "rank": result.rank,
            "selection_metric": result.selection_metric,
            "rank_sweep": [e.to_dict() for e in result.rank_sweep],
            "rounds": result.rounds,
            "adaptive_stop": result.stop_reason,
            "regularization": result.regularization,
            "singular_values": result.singular_values,
            "timings": timings,
            "peak_memory_bytes": result.peak_memory_bytes,
            "peak_memory_kind": result.peak_memory_kind,
            **({"memory": result.memory} if result.memory is not None else {}),
            **({"jacobian": result.jacobian} if result.jacobian is not None else {}),
            **({"compile": result.compile} if result.compile is not None else {}),
            **({"products": result.products} if result.products is not None else {}),
            **({"loss": result.loss} if result.loss is not None else {}),
            **({"time_budget": result.time_budget} if result.time_budget is not None else {}),
            **({"nonlinear": result.nonlinear} if result.nonlinear is not None else {}),
            **({"validation": result.validation} if result.validation is not None else {}),
            **({"unknowns": result.unknowns} if result.unknowns is not None else {}),
            **({"components": result.components} if result.components is not None else {}),
            "device": result.device,
            "dtype": result.dtype,
            "seed": seed,
            "num_parameters": result.num_parameters,
            "num_linearized_parameters": result.num_linearized_parameters,
            "num_residuals": result.num_residuals,
            "config": config,
            "versions": versions(),
            "warnings": result.warnings,
        }
    )


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.2e}"


NETWORK_NOTE = (
    "the plain network at θ0+δ is not the refined model: the refined predictor is q(θ0,x)+J(x)δ; "
    "use `lsr iterate` for a plain network"
)
"""Printed under the ``--verbose`` table of ``lsr refine``, whose last column is that network."""


def refine_table(report: dict[str, Any], verbose: bool = False) -> Table:
    """Per split: relative L2 error before and after, and the gain; ``verbose`` adds the largest
    error after and the plain network at θ0 + δ (the report's ``network_after``, see
    :data:`NETWORK_NOTE`)."""
    table = Table(title=f"lsr refine — rank {report['rank']} ({report['dtype']}, {report['device']})")
    columns = ["split", "rel L2 before", "rel L2 after", "gain"]
    if verbose:
        columns += ["max|err| after", "net θ0+δ"]
    for col in columns:
        table.add_column(col, justify="left" if col == "split" else "right", no_wrap=True)
    for split, errs in report["splits"].items():
        b, a = errs["before"]["rel_l2"], errs["after"]["rel_l2"]
        cells = [split, _fmt(b), _fmt(a), f"{b / a:.3g}×" if a and b else "—"]
        if verbose:
            cells += [_fmt(errs["after"]["max_abs"]), _fmt(errs["network_after"]["rel_l2"])]
        table.add_row(*cells)
    return table


def _criterion(report: dict[str, Any]) -> str:
    """What ``lsr refine`` chose its rank on, in words."""
    pde = "residual_loss" in report
    fraction = (report.get("regularization") or {}).get("holdout_fraction")
    held = f"{fraction:.0%} of the" if isinstance(fraction, float) else "some"
    return {
        "val_loss": "the validation split",
        "holdout_loss": (
            f"the residual loss at {held} collocation points (held out)" if pde else f"{held} training samples held out"
        ),
        "train_loss": "the residual loss (no points held out)" if pde else "the training loss (no validation data)",
        "gcv": "generalized cross-validation on the " + ("residual" if pde else "training split"),
    }.get(report["selection_metric"], str(report["selection_metric"]))


def _error_change(name: str, errs: dict[str, Any]) -> str:
    b, a = errs["before"]["rel_l2"], errs["after"]["rel_l2"]
    return f"{name} rel L2 error {_fmt(b)} -> {_fmt(a)} ({describe_change(b, a)})"


def refine_summary(report: dict[str, Any]) -> str:
    """The closing line of ``lsr refine``, in the order a user judges the run: the error on data
    the rank was not chosen on (test split or PDE reference) first, then the rank and what it
    was chosen on, then (PDE) the residual loss."""
    splits = report["splits"]
    judged = next((s for s in ("test", "reference") if s in splits), None)
    residual = report.get("residual_loss")
    parts = []
    if judged is not None:
        parts.append(_error_change(judged, splits[judged]))
    elif residual is None:
        chosen_on = "val" if "val" in splits else "train"
        parts.append(_error_change(chosen_on, splits[chosen_on]) + " (no test split)")
    if report["status"] == "improved":
        parts.append(f"rank {report['rank']}, chosen on {_criterion(report)}")
    else:
        parts.append(f"no rank did better than the input on {_criterion(report)}: the refined predictor equals it")
    if residual is not None:
        loss = (
            f"weighted residual loss {_fmt(residual['before'])} -> {_fmt(residual['after'])} "
            f"({describe_change(residual['before'], residual['after'])})"
        )
        nonlinear = report.get("nonlinear") or {}
        if nonlinear.get("ran") and not nonlinear.get("reason"):
            loss += (
                f" after {nonlinear['iterations']} Levenberg-Marquardt steps on the exact residual in the "
                f"subspace (LSR's linearized step alone: {_fmt(nonlinear['lsr_step_residual_loss'])})"
            )
        if judged is None:
            parts.insert(0, loss + " (no reference solution to compare with)")
        else:
            parts.append(loss)
    return "; ".join(parts)


def errors_table(title: str, errors: dict[str, dict[str, float | None]]) -> Table:
    table = Table(title=title)
    for col in ("split", "rel L2", "RMSE", "max |err|", "mean per-sample rel L2"):
        table.add_column(col, justify="right" if col != "split" else "left")
    for split in SPLIT_ORDER:
        if split in errors:
            e = errors[split]
            table.add_row(split, _fmt(e["rel_l2"]), _fmt(e["rmse"]), _fmt(e["max_abs"]), _fmt(e["rel_l2_mean"]))
    return table


@dataclass
class _Stage:
    description: str
    total: int
    start: float
    done: int = 0


class LineProgress:
    """A :class:`~lsr_cli.runtime.ProgressSink` for logs: nothing while a stage runs, one
    flushed line on ``stream`` when it ends (``[lsr] sketch J (k=256): done in 3.2 s``); a
    stage that stopped before its planned work says how far it got (``stopped at 3 of 20``)."""

    def __init__(self, stream: IO[str], enabled: bool = True) -> None:
        self.enabled = enabled
        self._stream = stream
        self._stages: list[_Stage] = []

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def begin(self, description: str, total: int) -> Callable[[int], None]:
        stage = _Stage(description, total, time.perf_counter())
        self._stages.append(stage)

        def advance(amount: int) -> None:
            stage.done += amount

        return advance

    def note(self, text: str) -> None:
        """One line that is not a stage (the time plan's estimate)."""
        if self.enabled:
            self._stream.write(f"[lsr] {text}\n")
            self._stream.flush()

    def end(self) -> None:
        if not self._stages:
            return
        stage = self._stages.pop()
        if not self.enabled:
            return
        line = f"[lsr] {stage.description}: done in {time.perf_counter() - stage.start:.1f} s"
        if 0 < stage.done < stage.total:
            line += f" (stopped at {stage.done} of {stage.total})"
        self._stream.write(line + "\n")
        self._stream.flush()


def progress_sink(console: Console, enabled: bool = True) -> RichProgress | LineProgress:
    """The progress sink for ``console`` (a context manager): Rich bars on a terminal, one line
    per finished stage elsewhere (bars cannot redraw in a log, so Rich would print them only
    at the end of the run)."""
    if console.is_terminal:
        return RichProgress(console, enabled)
    return LineProgress(console.file, enabled)


class RichProgress:
    """A :class:`~lsr_cli.runtime.ProgressSink` drawing Rich progress bars on ``console``."""

    def __init__(self, console: Console, enabled: bool = True) -> None:
        self.enabled = enabled
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            TextColumn("left"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
            disable=not enabled,
        )
        self._task: Any = None

    def __enter__(self) -> RichProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def begin(self, description: str, total: int) -> Callable[[int], None]:
        task = self._progress.add_task(description, total=max(total, 1))
        self._task = task
        return lambda amount: self._progress.advance(task, amount)

    def note(self, text: str) -> None:
        """One line above the bars (the time plan's estimate)."""
        if self.enabled:
            self._progress.console.print(text)

    def end(self) -> None:
        if self._task is not None:
            task = self._progress.tasks[-1]
            self._progress.update(self._task, completed=task.total)
            self._task = None


def iterate_table(report: dict[str, Any]) -> Table:
    """One row per outer iteration: LSR and network residual/reference errors, fit, time."""
    table = Table(title=f"lsr iterate — best iteration {report['best_iteration']}")
    for col in ("it", "rank", "resid LSR", "resid net", "ref LSR", "ref net", "fit", "s"):
        table.add_column(col, justify="right", no_wrap=True)
    for e in report["iterations"]:
        ref = e["reference_rel_l2"]
        table.add_row(
            str(e["iteration"]),
            "physics" if e.get("step") == "physics" else str(e["rank"]),
            _fmt(e["residual_loss"]["linearized"]),
            _fmt(e["residual_loss"]["network"]),
            _fmt(ref["linearized"]),
            _fmt(ref["network"]),
            _fmt(e["alignment"]["relative_fit"]),
            f"{e['seconds']['total']:.1f}",
        )
    return table


def instances_table(report: dict[str, Any]) -> Table:
    """Mean ± std over instances of the errors (when references exist), residuals and ranks."""
    s = report["summary"]
    table = Table(title=f"lsr instances — {s['num_instances']} instances ({report['num_resumed']} resumed)")
    for col in ("", "mean", "std", "median", "min", "max"):
        table.add_column(col, justify="right", no_wrap=True)
    rows = [
        ("rel L2 before", "rel_l2_before"),
        ("rel L2 after", "rel_l2_after"),
        ("residual before", "residual_before"),
        ("residual after", "residual_after"),
        ("rank", "rank"),
        ("seconds", "seconds_per_instance"),
    ]
    for label, key in rows:
        if key in s:
            st = s[key]
            table.add_row(label, *(_fmt(st[k]) for k in ("mean", "std", "median", "min", "max")))
    return table


def instances_report(result: Any, **info: Any) -> dict[str, Any]:
    """The JSON report of ``lsr instances`` (``info``: input, output, data, config, timings, seed)."""
    return clean_json(
        {
            "command": "instances",
            "status": result.status,
            "message": result.message,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **info,
            "summary": result.summary,
            "num_resumed": result.num_resumed,
            "per_instance": result.per_instance,
            "peak_memory_bytes": result.peak_memory_bytes,
            "peak_memory_kind": result.peak_memory_kind,
            "device": result.device,
            "num_parameters": result.num_parameters,
            "num_linearized_parameters": result.num_linearized_parameters,
            "versions": versions(),
            "warnings": result.warnings,
        }
    )
