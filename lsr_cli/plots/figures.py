"""PNG figures of a report, drawn with matplotlib's object-oriented API on the Agg canvas."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lsr_cli.errors import ConfigError, DataError, OutputError

from .common import FieldData, _get, _positive, report_kind

FIGSIZE = (6.4, 4.2)
"""Size of a one-panel figure in inches."""
DPI = 110
MAX_SCATTER_POINTS = 200_000
"""Larger fields are subsampled (with a fixed seed) before scattering; the largest errors are kept."""
_INSTALL_HINT = "--plots needs matplotlib: pip install 'lsr-cli[plots]' (or pip install matplotlib)"
_COLORS = {"before": "tab:gray", "after": "tab:blue", "network_after": "tab:orange"}
_LABELS = {"before": "before", "after": "after (LSR)", "network_after": "network at θ0 + δ"}


def _matplotlib() -> tuple[Any, Any, Any]:
    """``(Figure, LogNorm, MaxNLocator)``; ConfigError with the install hint without matplotlib."""
    try:
        import matplotlib  # noqa: F401  (imported first so a blocked parent package fails here)
        from matplotlib.colors import LogNorm
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise ConfigError(_INSTALL_HINT) from None
    return Figure, LogNorm, MaxNLocator


def require_matplotlib() -> None:
    """Raise :class:`ConfigError` with the install hint when matplotlib is missing."""
    _matplotlib()


def _check_fields(fields: Sequence[FieldData]) -> None:
    for i, f in enumerate(fields):
        where = f"fields[{i}] (split {f.split!r})"
        x = np.asarray(f.inputs)
        if x.ndim != 2 or x.shape[1] not in (1, 2):
            raise DataError(f"{where}: inputs must have shape [N, 1] or [N, 2], got {tuple(x.shape)}")
        for name in ("before", "after"):
            e = np.asarray(getattr(f, name))
            if e.shape != (x.shape[0],):
                raise DataError(f"{where}: {name} must have shape [{x.shape[0]}], got {tuple(e.shape)}")


# --- figures ----------------------------------------------------------------------------------
# Each drawer fills a fresh figure and returns False when the report has nothing to draw.


def _grouped_bars(fig: Any, groups: dict[str, dict[str, float | None]], xlabel: str, ylabel: str, title: str) -> bool:
    """Bars per group (x) and kind (before / after / network_after), log y with room for labels and legend."""
    names = list(groups)
    kinds = [k for k in ("before", "after", "network_after") if any(_positive(groups[g].get(k)) for g in names)]
    if not kinds:
        return False
    ax = fig.add_subplot()
    width = 0.8 / len(kinds)
    values = []
    for j, k in enumerate(kinds):
        pairs = [(i + (j - (len(kinds) - 1) / 2) * width, _positive(groups[g].get(k))) for i, g in enumerate(names)]
        keep = [(x, v) for x, v in pairs if v is not None]
        values += [v for _, v in keep]
        bars = ax.bar([x for x, _ in keep], [v for _, v in keep], width, label=_LABELS[k], color=_COLORS[k])
        ax.bar_label(bars, fmt="%.1e", fontsize=7, padding=1)
    ax.set_yscale("log")
    ax.set_ylim(min(values) / 3, max(values) * 30)  # headroom for the bar labels and the legend
    ax.set_xticks(range(len(names)), names)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(ncols=len(kinds), loc="upper center", fontsize=8)
    return True


def _errors(fig: Any, report: dict[str, Any]) -> bool:
    """Relative L2 error per split: before, after, network at θ0 + δ."""
    splits = report.get("splits") or {}
    groups = {s: {k: _get(e, k, "rel_l2") for k in _LABELS} for s, e in splits.items() if isinstance(e, dict)}
    title = f"lsr {report.get('command', '')}: errors before and after"
    return _grouped_bars(fig, groups, "split", "relative L2 error", title)


def _residual_blocks(fig: Any, report: dict[str, Any]) -> bool:
    """Mean squared PDE residual per block: before, after, network at θ0 + δ."""
    blocks = report.get("residual_blocks") or {}
    groups = {b: {k: _get(e, k) for k in _LABELS} for b, e in blocks.items() if isinstance(e, dict)}
    return _grouped_bars(fig, groups, "residual block", "mean squared residual", "PDE residual per block")


def _mark_rank(ax: Any, rank: Any, x: float | None = None) -> None:
    if isinstance(rank, int) and rank >= 0:
        ax.axvline(rank if x is None else x, color="tab:red", ls="--", lw=1, label=f"chosen rank {rank}")


def _rank_sweep(fig: Any, report: dict[str, Any]) -> bool:
    """Linearized losses (top) and relative residual (bottom) against the rank tried."""
    sweep = sorted(
        (e for e in report.get("rank_sweep") or [] if isinstance(e, dict) and isinstance(e.get("rank"), int)),
        key=lambda e: e["rank"],
    )
    series = {
        "train_loss": "train loss",
        "val_loss": "GCV score (every row)"
        if report.get("selection_metric") == "gcv"
        else f"{(report.get('selection_metric') or 'val_loss').replace('_', ' ')} (selection rows)",
        "linearized_residual": "‖f0 + A z‖ / ‖f0‖",
    }
    have = {k: [(e["rank"], v) for e in sweep if (v := _positive(e.get(k))) is not None] for k in series}
    if not any(have.values()):
        return False
    fig.set_size_inches(FIGSIZE[0], FIGSIZE[1] * 1.3)
    ax_loss, ax_res = fig.subplots(2, 1, sharex=True)
    for ax, keys in ((ax_loss, ("train_loss", "val_loss")), (ax_res, ("linearized_residual",))):
        for k in keys:
            if have[k]:
                ax.plot(*zip(*have[k], strict=True), "o-", ms=4, label=series[k])
        ax.set_yscale("log")
        _mark_rank(ax, report.get("rank"))
        ax.legend(fontsize=8)
    ranks = [e["rank"] for e in sweep]
    if max(ranks) > 20 * max(1, min(r for r in ranks if r > 0) if any(ranks) else 1):
        ax_res.set_xscale("symlog", linthresh=1)  # rank 0 stays at x = 0, ranks >= 1 logarithmic
        ax_res.set_xlim(-0.3, max(ranks) * 1.5)
    ax_loss.set_ylabel("mean squared residual")
    ax_res.set_ylabel("relative residual")
    ax_res.set_xlabel("rank")
    ax_loss.set_title("Rank sweep (best λ per rank, linearized predictor)")
    return True


def _spectrum(fig: Any, report: dict[str, Any]) -> bool:
    """Singular values of the Jacobian sketch (log y), the chosen rank between σ_r and σ_r+1."""
    s = np.array([v if (v := _positive(x)) is not None else np.nan for x in report.get("singular_values") or []])
    if not np.any(np.isfinite(s)):
        return False
    ax = fig.add_subplot()
    idx = np.arange(1, s.size + 1)
    ax.plot(idx, s, "o-" if s.size <= 60 else "-", ms=3, label="σ_i")
    rank = report.get("rank")
    _mark_rank(ax, rank, rank + 0.5 if isinstance(rank, int) else None)
    ax.set_yscale("log")
    ax.set_xlabel("index i")
    ax.set_ylabel("singular value σ_i")
    ax.set_title("Singular spectrum of the Jacobian sketch")
    ax.legend()
    return True


def _nonlinear(fig: Any, report: dict[str, Any]) -> bool:
    """The exact-residual stage of a nonlinear PDE: fit objective and held-out exact residual per step."""
    hist = [e for e in _get(report, "nonlinear", "history") or [] if isinstance(e, dict)]
    fit = [(e["iteration"], v) for e in hist if (v := _positive(e.get("fit_objective"))) is not None]
    mon = [(e["iteration"], v) for e in hist if (v := _positive(e.get("monitor"))) is not None]
    if not fit and not mon:
        return False
    _, _, MaxNLocator = _matplotlib()
    ax = fig.add_subplot()
    if fit:
        ax.plot(*zip(*fit, strict=True), "o-", ms=3, label="fit rows: ‖R‖² + λ²‖z‖² (sum)")
    if mon:
        label = str(_get(report, "nonlinear", "monitor") or "monitor")
        ax.plot(*zip(*mon, strict=True), "s-", ms=3, label=f"{label} (mean square)")
        best = min(mon, key=lambda p: p[1])
        ax.axvline(best[0], color="tab:red", ls="--", lw=1, label=f"kept: step {best[0]}")
    ax.set_yscale("log")
    ax.set_xlabel("Levenberg–Marquardt step (0: LSR's linearized step)")
    ax.set_ylabel("exact residual of the refined predictor")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Exact residual in the LSR subspace (nonlinear equation)")
    ax.legend(fontsize=8)
    return True


def _iterations(fig: Any, report: dict[str, Any]) -> bool:
    """Residual loss and reference error of the LSR predictor and the network per iteration."""
    its = [e for e in report.get("iterations") or [] if isinstance(e, dict) and isinstance(e.get("iteration"), int)]
    panels = [
        (
            key,
            label,
            {
                w: [(e["iteration"], v) for e in its if (v := _positive(_get(e, key, w))) is not None]
                for w in ("linearized", "network")
            },
        )
        for key, label in (
            ("residual_loss", "weighted residual loss"),
            ("reference_rel_l2", "relative L2 vs reference"),
        )
    ]
    panels = [p for p in panels if any(p[2].values())]
    if not panels:
        return False
    _, _, MaxNLocator = _matplotlib()
    if len(panels) == 2:
        fig.set_size_inches(FIGSIZE[0], FIGSIZE[1] * 1.3)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    best = report.get("best_iteration")
    for ax, (_, label, data) in zip(axes, panels, strict=True):
        for w, name in (("linearized", "LSR predictor"), ("network", "network")):
            if data[w]:
                ax.plot(*zip(*data[w], strict=True), "o-", ms=4, label=name)
        if isinstance(best, int):
            ax.axvline(best, color="tab:red", ls="--", lw=1, label=f"best iteration {best}")
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    axes[-1].set_xlabel("iteration")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_title("lsr iterate: history")
    return True


def _instance_values(report: dict[str, Any]) -> tuple[str, np.ndarray, np.ndarray] | None:
    """(what, before, after) per instance: reference errors if any, else weighted residuals."""
    rows = [r for r in report.get("per_instance") or [] if isinstance(r, dict)]
    for key, what in (("rel_l2", "relative L2 error"), ("residual", "weighted residual loss")):
        b = np.array([v if (v := _positive(r.get(f"{key}_before"))) is not None else np.nan for r in rows])
        a = np.array([v if (v := _positive(r.get(f"{key}_after"))) is not None else np.nan for r in rows])
        if np.any(np.isfinite(b)) or np.any(np.isfinite(a)):
            return what, b, a
    return None


def _instances_hist(fig: Any, report: dict[str, Any]) -> bool:
    vals = _instance_values(report)
    if vals is None:
        return False
    what, b, a = vals
    finite = np.concatenate([b[np.isfinite(b)], a[np.isfinite(a)]])
    lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo * 1.01:
        lo, hi = lo / 1.5, hi * 1.5
    bins = np.logspace(np.log10(lo), np.log10(hi), int(np.clip(np.sqrt(b.size) * 2, 10, 50)) + 1)
    ax = fig.add_subplot()
    for v, k in ((b, "before"), (a, "after")):
        if np.any(np.isfinite(v)):
            ax.hist(
                v[np.isfinite(v)],
                bins=bins,
                alpha=0.6,
                color=_COLORS[k],
                label=f"{_LABELS[k]} ({np.sum(np.isfinite(v))})",
            )
    ax.set_xscale("log")
    ax.set_xlabel(what)
    ax.set_ylabel("number of instances")
    ax.set_title(f"lsr instances: {what} over {b.size} instances")
    ax.legend()
    return True


def _instances_scatter(fig: Any, report: dict[str, Any]) -> bool:
    vals = _instance_values(report)
    if vals is None:
        return False
    what, b, a = vals
    ok = np.isfinite(b) & np.isfinite(a)
    if not np.any(ok):
        return False
    ax = fig.add_subplot()
    better = ok & (a < b)
    ax.scatter(b[better], a[better], s=12, color="tab:blue", label=f"improved ({np.sum(better)})")
    ax.scatter(b[ok & ~better], a[ok & ~better], s=12, color="tab:red", label=f"not improved ({np.sum(ok & ~better)})")
    lo, hi = float(min(b[ok].min(), a[ok].min())), float(max(b[ok].max(), a[ok].max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"{what} before")
    ax.set_ylabel(f"{what} after")
    ax.set_title("lsr instances: per instance, before vs after")
    ax.legend(fontsize=8)
    return True


def _draw_field(fig: Any, field: FieldData) -> bool:
    """1-D: |error| against x, before and after on one log axis; 2-D: two scatters, one log colour scale."""
    _, LogNorm, _ = _matplotlib()
    x = np.asarray(field.inputs, dtype=np.float64)
    if x.shape[0] == 0:
        return False
    err = {k: np.abs(np.asarray(getattr(field, k), dtype=np.float64)) for k in ("before", "after")}
    finite = np.concatenate([e[np.isfinite(e)] for e in err.values()])
    hi = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    pos = finite[finite > 0]
    lo = max(float(pos.min()) if pos.size else hi * 1e-12, hi * 1e-12)  # zeros drawn at the floor
    if x.shape[1] == 1:
        ax = fig.add_subplot()
        order = np.argsort(x[:, 0])
        for k, e in err.items():
            ax.plot(
                x[order, 0],
                np.clip(e[order], lo, None),
                "-" if x.shape[0] > 200 else ".-",
                color=_COLORS[k],
                label=_LABELS[k],
            )
        ax.set_yscale("log")
        ax.set_xlabel("x")
        ax.set_ylabel("|prediction − target|")
        ax.set_title(f"Pointwise error on split {field.split!r}")
        ax.legend()
        return True
    fig.set_size_inches(FIGSIZE[0] * 1.6, FIGSIZE[1])
    norm = LogNorm(vmin=lo, vmax=hi if hi > lo else lo * 10)
    axes = fig.subplots(1, 2, sharex=True, sharey=True)
    n = x.shape[0]
    idx = np.arange(n)
    if n > MAX_SCATTER_POINTS:
        idx = np.random.default_rng(0).choice(n, MAX_SCATTER_POINTS, replace=False)
    size = float(np.clip(20_000 / idx.size, 0.5, 20))
    sc = None
    for ax, (k, e) in zip(axes, err.items(), strict=True):
        sel = idx[np.isfinite(e[idx])]
        sel = sel[np.argsort(e[sel])]  # largest errors drawn last, on top
        sc = ax.scatter(x[sel, 0], x[sel, 1], c=np.clip(e[sel], lo, None), s=size, norm=norm, cmap="viridis", lw=0)
        ax.set_title(f"{_LABELS[k]} (max {float(np.nanmax(e)) if np.any(np.isfinite(e)) else float('nan'):.2e})")
        ax.set_xlabel("x₁")
        ax.set_aspect("equal", adjustable="box")
    axes[0].set_ylabel("x₂")
    fig.colorbar(sc, ax=list(axes), label="|prediction − target|")
    fig.suptitle(f"Pointwise error on split {field.split!r}")
    return True


_Drawer = Callable[[Any, dict[str, Any]], bool]
_PLOTS: dict[str, list[tuple[str, _Drawer]]] = {
    "refine": [
        ("errors", _errors),
        ("residual_blocks", _residual_blocks),
        ("rank_sweep", _rank_sweep),
        ("singular_values", _spectrum),
        ("nonlinear", _nonlinear),
    ],
    "iterate": [("iterations", _iterations), ("errors", _errors), ("residual_blocks", _residual_blocks)],
    "instances": [("instances_hist", _instances_hist), ("instances_scatter", _instances_scatter)],
}


def write_plots(report: dict[str, Any], out_dir: Path, fields: list[FieldData] | None = None) -> list[Path]:
    """Write PNGs for a report dict (the JSON report of `lsr refine`, `lsr iterate` or `lsr instances`,
    as documented in README) into out_dir (created); return the paths written, in display order.

    Figures the report has no data for are skipped. Files are ``NN_<name>.png`` numbered in
    display order; each field gives ``NN_field_<split>.png``.
    """
    kind = report_kind(report)
    fields = list(fields or [])
    _check_fields(fields)
    Figure, _, _ = _matplotlib()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out_dir}: cannot create the plot directory ({exc})") from None
    jobs: list[tuple[str, Callable[[Any, Any], bool], Any]] = [(name, draw, report) for name, draw in _PLOTS[kind]]
    jobs += [(f"field_{_slug(f.split)}", _draw_field, f) for f in fields]
    written: list[Path] = []
    for name, draw, what in jobs:
        fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
        if not draw(fig, what):
            continue
        path = out_dir / f"{len(written) + 1:02d}_{name}.png"
        try:
            fig.savefig(path, dpi=DPI)
        except OSError as exc:
            raise OutputError(f"{path}: cannot write the plot ({exc})") from None
        fig.clear()
        written.append(path)
    return written


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text) or "split"


# --- HTML ---------------------------------------------------------------------------------------
