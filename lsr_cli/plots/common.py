"""What the figures and the HTML page share: the kind of a report, the pointwise errors of a field,
and tolerant access to report values."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from lsr_cli.errors import DataError


@dataclass
class FieldData:
    """Pointwise errors of one split for 1-D/2-D inputs: inputs [N, d] (d = 1 or 2), numpy float64;
    before/after: |prediction - target| per point [N] (for multi-output: the norm over outputs)."""

    split: str
    inputs: np.ndarray
    before: np.ndarray
    after: np.ndarray


def report_kind(report: dict[str, Any]) -> str:
    """``"refine"``, ``"iterate"`` or ``"instances"``, from ``report["command"]``."""
    kind = report.get("command") if isinstance(report, dict) else None
    if kind not in ("refine", "iterate", "instances"):
        raise DataError(f"report.command: expected 'refine', 'iterate' or 'instances', got {kind!r}")
    return str(kind)


def _positive(v: Any) -> float | None:
    """``v`` as a float if it can go on a log axis, else None."""
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0:
        return float(v)
    return None


def _get(d: Any, *keys: str) -> Any:
    """``d[k0][k1]...`` or None where a level is missing or not a dict."""
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d
