"""A self-contained HTML page of a report: a summary, tables and the PNG figures inlined."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lsr_cli.errors import OutputError

from .common import _get, _positive, report_kind

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
.status { font-weight: bold; } .message { background: #f4f6f8; padding: .6rem .8rem; border-radius: 4px; }
table { border-collapse: collapse; margin: .5rem 0; font-size: .9rem; }
th, td { border: 1px solid #ccc; padding: .25rem .6rem; text-align: right; }
th:first-child, td:first-child { text-align: left; } th { background: #eef1f4; }
figure { margin: 1.5rem 0; } figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { font-size: .9rem; color: #444; margin-top: .3rem; } .warn { color: #8a4b00; }
"""


def _num(v: Any, sci: bool) -> str:
    """A table cell: integers with separators, floats in scientific notation (``sci``) or 4 digits."""
    if v is None:
        return "—"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.3e}" if sci else f"{v:.4g}"


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]], sci: bool = True) -> str:
    if not rows:
        return ""
    esc = html.escape
    out = ["<table><tr>", *(f"<th>{esc(h)}</th>" for h in head), "</tr>"]
    for row in rows:
        out += ["<tr>", *(f"<td>{esc(_num(c, sci))}</td>" for c in row), "</tr>"]
    return "".join(out) + "</table>\n"


def _section(title: str, body: str) -> str:
    return f"<h2>{html.escape(title)}</h2>\n{body}" if body else ""


def _summary(report: dict[str, Any]) -> str:
    parts = []
    splits = report.get("splits") or {}
    rows = []
    for s, e in splits.items():
        b, a = _get(e, "before", "rel_l2"), _get(e, "after", "rel_l2")
        gain = f"{b / a:.3g}×" if _positive(b) and _positive(a) else None
        rows.append([s, b, a, _get(e, "network_after", "rel_l2"), gain])
    parts.append(_section("Errors (relative L2)", _table(["split", "before", "after", "network θ0 + δ", "gain"], rows)))
    blocks = report.get("residual_blocks") or {}
    rows = [[b, _get(v, "before"), _get(v, "after"), _get(v, "network_after")] for b, v in blocks.items()]
    parts.append(
        _section("Mean squared residual per block", _table(["block", "before", "after", "network θ0 + δ"], rows))
    )
    summary = report.get("summary") or {}
    rows = [
        [k, *(_get(v, s) for s in ("mean", "std", "median", "min", "max"))]
        for k, v in summary.items()
        if isinstance(v, dict)
    ]
    rows += [[k, v, None, None, None, None] for k, v in summary.items() if not isinstance(v, dict)]
    parts.append(_section("Over instances", _table(["", "mean", "std", "median", "min", "max"], rows)))
    peak = _positive(report.get("peak_memory_bytes"))
    run = [
        ("rank", report.get("rank")),
        ("selection metric", report.get("selection_metric")),
        ("λ (relative)", _get(report, "regularization", "tikhonov")),
        ("adaptive stop", report.get("adaptive_stop")),
        ("best iteration", report.get("best_iteration")),
        ("stop reason", report.get("stop_reason")),
        ("instances resumed", report.get("num_resumed")),
        ("device", report.get("device")),
        ("dtype", report.get("dtype")),
        ("seed", report.get("seed")),
        ("parameters", report.get("num_parameters")),
        ("linearized parameters", report.get("num_linearized_parameters")),
        ("residuals", report.get("num_residuals")),
        (
            "peak memory",
            f"{peak / 2**20:,.1f} MiB ({report.get('peak_memory_kind') or '?'})" if peak else None,
        ),
        ("input", _get(report, "input", "checkpoint")),
        ("output", _get(report, "output", "checkpoint")),
        ("created", report.get("created")),
    ]
    parts.append(
        _section("Run", _table(["", "value"], [[k, v] for k, v in run if v is not None and v != ""], sci=False))
    )
    timings = report.get("timings") or {}
    parts.append(_section("Timings (s)", _table(["stage", "seconds"], [[k, v] for k, v in timings.items()], sci=False)))
    versions = report.get("versions") or {}
    parts.append(_section("Versions", _table(["package", "version"], [[k, v] for k, v in versions.items()])))
    warnings = [w for w in report.get("warnings") or [] if w]
    if warnings:
        items = "".join(f"<li class='warn'>{html.escape(str(w))}</li>" for w in warnings)
        parts.append(_section("Warnings", f"<ul>{items}</ul>\n"))
    return "".join(parts)


def _caption(path: Path, report: dict[str, Any]) -> str:
    name = path.stem.split("_", 1)[1] if path.stem[:2].isdigit() and "_" in path.stem else path.stem
    rank = f" {report['rank']}" if isinstance(report.get("rank"), int) else ""
    metric = report.get("selection_metric") or "the selection metric"
    captions = {
        "errors": "Relative L2 error per split: the input model (before), the refined predictor (after) "
        "and, where reported, the plain network at θ0 + δ. Log scale.",
        "residual_blocks": "Mean squared PDE residual per block before and after. Log scale.",
        "rank_sweep": f"Mean squared residual of the linearized predictor (best λ per rank) and relative "
        f"residual ‖f0 + A z‖ / ‖f0‖ for each rank tried; dashed: the chosen rank{rank}, selected by {metric}.",
        "singular_values": f"Singular values of the Jacobian sketch; dashed: the chosen rank{rank}.",
        "iterations": "Weighted residual loss and error against the reference for the LSR predictor and the "
        "aligned network per outer iteration; dashed: the best iteration.",
        "nonlinear": "Nonlinear equation: the refined predictor q(θ0) + J P z, with z moved by "
        "Levenberg–Marquardt steps on its exact residual from LSR's step (step 0); dashed: the step kept "
        "(lowest held-out exact residual).",
        "instances_hist": "Distribution over instances before and after refinement (log bins).",
        "instances_scatter": "Each instance before vs after; points below the dashed line y = x improved.",
    }
    if name.startswith("field_"):
        return (
            f"Pointwise |prediction − target| on split {name[6:]!r} before and after refinement "
            "(same logarithmic scale for both)."
        )
    return captions.get(name, path.name)


def write_html(report: dict[str, Any], out: Path, images: list[Path]) -> None:
    """A self-contained HTML page (images embedded as base64 data URIs; no external assets, no JS needed):
    title with the command and status/message, a summary table (errors before/after per split, rank,
    selection metric, timings, peak memory, device/dtype, versions), and every image with a caption."""
    kind = report_kind(report)
    esc = html.escape
    figures = []
    for path in images:
        try:
            data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        except OSError as exc:
            raise OutputError(f"{path}: cannot read the plot for the HTML page ({exc})") from None
        cap = esc(_caption(Path(path), report))
        figures.append(
            f'<figure><img src="data:image/png;base64,{data}" alt="{cap}"><figcaption>{cap}</figcaption></figure>\n'
        )
    status = str(report.get("status") or "")
    page = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
        f"<title>lsr {esc(kind)}: {esc(status)}</title>\n<style>{_CSS}</style></head><body>\n"
        f"<h1>lsr {esc(kind)} — <span class='status'>{esc(status)}</span></h1>\n"
        f"<p class='message'>{esc(str(report.get('message') or ''))}</p>\n"
        f"{_summary(report)}{_section('Figures', ''.join(figures))}</body></html>\n"
    )
    try:
        out.write_text(page, encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"{out}: cannot write the HTML page ({exc})") from None
