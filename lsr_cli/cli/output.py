"""What the commands show and write besides their main output: the results table, the report's data
fields, plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from rich.markup import escape
from rich.table import Table

from lsr_cli.data import LazyArray
from lsr_cli.errors import OutputError
from lsr_cli.pde import PdeProblem
from lsr_cli.report import output_console


def print_results(
    table: Table, summary: str, out_path: Path, report_path: Path, html: Path | None, note: str | None = None
) -> None:
    """The table (and a note on it), the closing line and the files written, on stdout (see
    :func:`output_console`)."""
    console = output_console()
    console.print(table)
    if note is not None:
        console.print(escape(note), highlight=False)
    console.print(escape(f"{summary}\nwrote {out_path} and {report_path}"), highlight=False)
    if html is not None:
        console.print(escape(f"plots: {html}"), highlight=False)


def time_budget_line(report: dict[str, Any]) -> str | None:
    """One line on the report's ``time_budget`` when ``lsr.time_limit`` was set, else ``None``: every
    key with a value to show (numbers, text, lists of numbers), in its order; seconds (keys ending
    in ``_s``) in minutes from a minute on. Unset values and nested records (per-round details,
    measured costs) stay in the report."""
    budget = report.get("time_budget")
    if not isinstance(budget, dict) or budget.get("limit_s") is None:  # no lsr.time_limit: the report only
        return None
    parts = []
    for key, value in budget.items():
        if (
            value is None
            or isinstance(value, dict)
            or (isinstance(value, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in value))
        ):
            continue
        label = (key[:-2] if key.endswith("_s") else key).replace("_", " ")
        if key.endswith("_s") and isinstance(value, (int, float)):
            text = f"{value / 60:.1f} min" if value >= 60 else f"{value:.1f} s"
        elif isinstance(value, float):
            text = f"{value:.3g}"
        elif isinstance(value, (list, tuple)):
            text = ", ".join(str(v) for v in value) or "none"
        else:
            text = str(value)
        parts.append(f"{label} {text}")
        if key == "estimate_total_s" and isinstance(budget.get("revised"), dict):  # the range ran out
            rev = budget["revised"]
            parts.append(
                f"revised after the sketch {rev['estimate_total_s'] / 60:.1f} min (the range held "
                f"{rev['usable_rank']} directions, rank {rev['planned_rank']} planned)"
            )
    return "time budget: " + ", ".join(parts)


def problem_info(problem: PdeProblem) -> dict[str, Any]:
    """The report's ``data`` fields of a PDE problem: equation, variables, blocks, reference points."""
    return {
        "equation": problem.equation_name,
        "variables": problem.variables,
        "blocks": {
            b.name: {
                "kind": b.kind,
                "num_points": int(b.points.shape[0]),
                "weight": b.weight,
                "points": b.spec.get("points"),
            }
            for b in problem.blocks
        },
        "reference_points": int(problem.reference[0].shape[0]) if problem.reference is not None else 0,
    }


def split_info(data: dict[str, Any]) -> dict[str, Any]:
    """The report's ``data.splits``: per split its group, samples, inputs and whether it was streamed."""
    return {
        name: {
            "group": s.group,
            "num_samples": s.num_global,
            "inputs": s.input_names,
            **(
                {"shared_inputs": [n for n, sh in zip(s.input_names, s.shared, strict=True) if sh]}
                if any(s.shared)
                else {}
            ),
            "streamed": any(isinstance(x, LazyArray) for x in s.inputs),
            **({"selection": s.selection} if s.selection else {}),
        }
        for name, s in data.items()
    }


def write_plot_page(plots: Path, payload: dict[str, Any], fields: list[Any] | None = None) -> Path:
    """PNGs and ``index.html`` for a report into ``plots``; returns the HTML path."""
    from lsr_cli.plots import write_html, write_plots

    images = write_plots(payload, plots, fields)
    html = plots / "index.html"
    write_html(payload, html, images)
    return html


def check_plots(plots: Path | None, inputs: list[Path]) -> None:
    """Before any work: matplotlib is importable and the folder can be made."""
    if plots is None:
        return
    from lsr_cli.plots import require_matplotlib

    require_matplotlib()
    if plots.exists() and not plots.is_dir():
        raise OutputError(f"{plots}: --plots needs a folder, found a file")
    for src in inputs:
        if plots.resolve() == src.resolve():
            raise OutputError(f"{plots}: --plots would overwrite the input {src}")


def reference_fields(model: Any, problem: PdeProblem) -> list[Any]:
    """Pointwise errors vs ``/reference`` for 1-D/2-D problems (error-field plots)."""
    import numpy as np

    from lsr_cli.plots import FieldData

    if problem.reference is None or problem.reference[0].shape[1] not in (1, 2):
        return []
    x, u = problem.reference
    with torch.no_grad():
        x = x.to(model.dtype)
        before = model.base(x).reshape(-1)
        after = model(x).reshape(-1)
    y = u.to(model.dtype).reshape(-1)
    return [
        FieldData(
            "reference",
            x.double().cpu().numpy(),
            np.abs((before - y).double().cpu().numpy()),
            np.abs((after - y).double().cpu().numpy()),
        )
    ]


def error_fields(model: Any, splits: dict[str, Any], names: tuple[str, ...] = ("test", "val", "train")) -> list[Any]:
    """Pointwise errors before/after for the first split (test, else val, else train) with one
    1-D or 2-D input: the data for the error-field plots."""
    import numpy as np

    from lsr_cli.plots import FieldData

    for name in names:
        s = splits.get(name)
        if s is None or len(s.inputs) != 1 or not isinstance(s.inputs[0], torch.Tensor):
            continue
        x = s.inputs[0]
        if x.ndim != 2 or x.shape[1] not in (1, 2) or not x.is_floating_point():
            continue
        with torch.no_grad():
            dtype = model.dtype
            before = model.base(x.to(dtype)).reshape(x.shape[0], -1)
            after = model(x).reshape(x.shape[0], -1)
        y = s.targets.to(dtype).reshape(x.shape[0], -1)
        e_before = torch.linalg.norm(before - y, dim=1).double().cpu().numpy()
        e_after = torch.linalg.norm(after - y, dim=1).double().cpu().numpy()
        return [FieldData(name, np.asarray(x.double().cpu().numpy()), e_before, e_after)]
    return []
