"""The summary of a run of :func:`~.instances.run_instances`: the per-instance table read back
from the partial file, statistics over the instances, and the one-line message."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from lsr_cli.metrics import describe_change, format_error

__all__ = ["read_results", "stats", "summarize", "summary_message"]


def stats(values: Sequence[float | None]) -> dict[str, float | None]:
    """Mean, standard deviation, median, min and max of the finite ``values`` (all None if none)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"mean": None, "std": None, "median": None, "min": None, "max": None}
    arr = np.asarray(finite)
    return {
        "mean": float(arr.mean()),
        "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
        "median": float(np.median(arr)),
        "min": float(arr.min()),
        "max": float(arr.max()),
    }


def read_results(
    partial: Path, num: int, unknown_names: list[str]
) -> tuple[list[dict[str, Any]], dict[str, dict[str, np.ndarray]]]:
    """Every instance's row of the partial file's table (NaN read as None), and each unknown's
    values ``{name: {"before": [num], "after": [num]}}``."""
    with h5py.File(partial, "r") as f:
        g = f["instances"]
        table = {
            k: g[k][()]
            for k in ("rel_l2_before", "rel_l2_after", "residual_before", "residual_after", "seconds", "rank")
        }
        unknown_values = {
            name: {w: f[f"unknowns/{name}/{w}"][()] for w in ("before", "after")} for name in unknown_names
        }
    per_instance: list[dict[str, Any]] = [
        {
            k: (int(v[i]) if k == "rank" else (None if not math.isfinite(float(v[i])) else float(v[i])))
            for k, v in table.items()
        }
        | {"index": i}
        | ({"unknowns": {n: float(v["after"][i]) for n, v in unknown_values.items()}} if unknown_values else {})
        for i in range(num)
    ]
    return per_instance, unknown_values


def summarize(
    num: int, per_instance: list[dict[str, Any]], unknown_values: dict[str, dict[str, np.ndarray]]
) -> dict[str, Any]:
    """The report's ``summary``: statistics over the instances (reference errors and the
    improvement only when some instance has a reference; constants only with ``pde.unknowns``)."""
    before_err: list[float | None] = [r["rel_l2_before"] for r in per_instance]
    after_err: list[float | None] = [r["rel_l2_after"] for r in per_instance]
    have_ref = any(v is not None for v in after_err)
    ratios = [b / a for b, a in zip(before_err, after_err, strict=True) if b is not None and a is not None and a > 0]
    summary: dict[str, Any] = {
        "num_instances": num,
        "rank": stats([float(r["rank"]) if r["rank"] >= 0 else None for r in per_instance]),
        "residual_before": stats([r["residual_before"] for r in per_instance]),
        "residual_after": stats([r["residual_after"] for r in per_instance]),
        "seconds_per_instance": stats([r["seconds"] for r in per_instance]),
    }
    if unknown_values:  # pde.unknowns: every instance's refined constants
        summary["unknowns"] = {
            n: {"before": stats(v["before"].tolist()), "after": stats(v["after"].tolist())}
            for n, v in unknown_values.items()
        }
    if have_ref:
        summary["rel_l2_before"] = stats(before_err)
        summary["rel_l2_after"] = stats(after_err)
        summary["improvement_of_mean"] = (summary["rel_l2_before"]["mean"] or 0.0) / max(
            summary["rel_l2_after"]["mean"] or 0.0, 1e-300
        )
        summary["improvement_per_instance"] = stats(ratios)
        summary["num_improved"] = sum(1 for r in ratios if r > 1.0)
        summary["num_worse"] = sum(1 for r in ratios if r < 1.0)
    return summary


def summary_message(num: int, summary: dict[str, Any]) -> str:
    """The run's one-line message, in the order a user judges the run: the reference error, the
    criterion, the residual loss (and the constants' means with ``pde.unknowns``)."""
    res_b, res_a = summary["residual_before"]["mean"], summary["residual_after"]["mean"]
    residual = (
        f"mean weighted residual loss {format_error(res_b)} -> {format_error(res_a)} ({describe_change(res_b, res_a)})"
    )
    chosen = "each instance's rank chosen on its own residual"
    if "rel_l2_after" in summary:  # some instance has a reference
        ref_b, ref_a = summary["rel_l2_before"]["mean"], summary["rel_l2_after"]["mean"]
        message = (
            f"{num} instances: mean reference rel L2 error {format_error(ref_b)} -> {format_error(ref_a)} "
            f"({describe_change(ref_b, ref_a)}; {summary['num_improved']} improved, {summary['num_worse']} worse); "
            f"{chosen}, not on the reference; {residual}"
        )
    else:
        message = f"{num} instances: {residual} (no references to compare with); {chosen}"
    if "unknowns" in summary:  # e.g. "; constants (mean over instances): k 1.5 -> 2"
        means = [(n, st["before"]["mean"], st["after"]["mean"]) for n, st in summary["unknowns"].items()]
        message += "; constants (mean over instances): " + ", ".join(
            f"{n} {b:.6g} -> {a:.6g}" if b is not None and a is not None else f"{n} n/a" for n, b, a in means
        )
    return message
