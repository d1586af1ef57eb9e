"""PNG figures and the HTML page of a report (lsr_cli.plots), on hand-built report dicts."""

from __future__ import annotations

import base64
import copy
import html
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("matplotlib")

import matplotlib.image as mpimg  # noqa: E402

from lsr_cli.errors import ConfigError, DataError  # noqa: E402
from lsr_cli.plots import FieldData, report_kind, write_html, write_plots  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _errors(rel_l2: float) -> dict[str, float | None]:
    return {"rel_l2": rel_l2, "rel_l2_mean": None, "rmse": rel_l2 / 2, "max_abs": rel_l2 * 3, "mse": rel_l2**2}


def _sweep(rank: int, val: float | None) -> dict[str, Any]:
    return {
        "rank": rank,
        "train_loss": 1e-2 / (1 + rank),
        "val_loss": val,
        "linearized_residual": 1.0 / (1 + rank) ** 0.5,
        "tikhonov": 1e-8,
        "num_truncated": 0,
        "cond": 10.0 * (1 + rank),
    }


def refine_report() -> dict[str, Any]:
    return {
        "command": "refine",
        "status": "improved",
        "message": "rank 16: test relative L2 error 3.2e-02 -> 4.1e-04 (78x)",
        "created": "2024-01-01T00:00:00+00:00",
        "input": {"checkpoint": "model.pt", "format": "state_dict"},
        "output": {"checkpoint": "model.refined.pt"},
        "splits": {
            s: {"before": _errors(3e-2), "after": _errors(4e-4 * (i + 1)), "network_after": _errors(5e-3)}
            for i, s in enumerate(("train", "val", "test"))
        },
        "rank": 16,
        "selection_metric": "val_loss",
        "rank_sweep": [_sweep(r, 1e-2 / (1 + r) if r < 64 else 2e-3) for r in (0, 4, 8, 16, 32, 64, 128)],
        "adaptive_stop": "the val_loss rose above its best for 2 rounds (overfitting)",
        "regularization": {"tikhonov": 1e-8, "chosen_by": "val_loss"},
        "singular_values": list(np.logspace(2, -10, 40)),
        "timings": {"load": 0.1, "sketch": 1.2, "solve": 0.3, "total": 2.0},
        "peak_memory_bytes": 123_456_789,
        "peak_memory_kind": "rss",
        "device": "cpu",
        "dtype": "float64",
        "seed": 0,
        "num_parameters": 8513,
        "num_linearized_parameters": 8513,
        "num_residuals": 2000,
        "versions": {"lsr": "0.1.0", "torch": "2.3.0", "python": "3.11.7"},
        "warnings": ["a <warning> & more"],
    }


def pde_refine_report() -> dict[str, Any]:
    r = refine_report()
    r["splits"] = {"reference": {"before": _errors(1e-2), "after": _errors(2e-4), "network_after": _errors(3e-3)}}
    r["residual_blocks"] = {
        "interior": {"before": 1e-1, "after": 1e-5, "network_after": 1e-3},
        "boundary": {"before": 1e-3, "after": 1e-7, "network_after": 0.0},
    }
    r["residual_loss"] = {"before": 1e-1, "after": 1e-5}
    r["selection_metric"] = "holdout_loss"
    return r


def nonlinear_pde_report() -> dict[str, Any]:
    r = pde_refine_report()
    r["nonlinear"] = {
        "ran": True,
        "monitor": "holdout exact residual",
        "history": [
            {"iteration": k, "fit_objective": 10.0 / 4**k, "monitor": 1e-2 / 3**k + (1e-5 if k > 4 else 0.0)}
            for k in range(7)
        ],
    }
    return r


def iterate_report() -> dict[str, Any]:
    its = [
        {
            "iteration": k,
            "rank": 32,
            "residual_loss": {"linearized": 1e-4 / 3**k, "network": 1e-3 / 2**k},
            "reference_rel_l2": {"linearized": 1e-3 / 2**k, "network": None if k == 1 else 1e-2 / 2**k},
        }
        for k in range(5)
    ]
    return {
        "command": "iterate",
        "status": "improved",
        "message": "iteration 3 has the best distance to the last LSR predictor",
        "best_iteration": 3,
        "iterations": its,
        "splits": {"reference": {"before": _errors(1e-2), "after": _errors(1e-3)}},
        "residual_blocks": {"interior": {"before": 1e-2, "after": 1e-4}},
        "timings": {"total": 5.0},
        "device": "cpu",
        "dtype": "float64",
        "versions": {"lsr": "0.1.0"},
        "warnings": [],
    }


def instances_report(with_reference: bool = True) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(30):
        b = float(10 ** rng.uniform(-3, -1))
        rows.append(
            {
                "index": i,
                "rank": 8,
                "rel_l2_before": b if with_reference else None,
                "rel_l2_after": (b / float(10 ** rng.uniform(-0.3, 2))) if with_reference and i != 3 else None,
                "residual_before": b**2,
                "residual_after": b**3,
                "seconds": 0.5,
            }
        )
    return {
        "command": "instances",
        "status": "done",
        "message": "30 instances: mean relative L2 error 2.1e-02 -> 1.0e-03 (21x)",
        "summary": {
            "num_instances": 30,
            "rel_l2_before": {"mean": 2e-2, "std": 1e-2, "median": 2e-2, "min": 1e-3, "max": 1e-1},
        },
        "num_resumed": 0,
        "per_instance": rows,
        "device": "cpu",
        "warnings": [],
    }


def fields() -> list[FieldData]:
    rng = np.random.default_rng(1)
    x1 = np.linspace(0.0, 1.0, 50)[:, None]
    x2 = rng.uniform(-1.0, 1.0, size=(300, 2))
    e2 = np.abs(np.sin(3 * x2[:, 0]) * x2[:, 1])
    e2[0] = 0.0  # an exact point must not break the log colour scale
    return [
        FieldData("test", x1, np.abs(np.sin(6 * x1[:, 0])) * 1e-2, np.abs(np.cos(6 * x1[:, 0])) * 1e-4),
        FieldData("val/2d", x2, e2 * 1e-2, e2 * 1e-4),
    ]


def check_png(path: Path) -> None:
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    assert 200 <= img.shape[0] <= 2000 and 300 <= img.shape[1] <= 2000
    assert float(img[..., :3].std()) > 0.01  # something was drawn


def check_html(page: Path, report: dict[str, Any], images: list[Path]) -> str:
    text = page.read_text(encoding="utf-8")
    assert text.count('<img src="data:image/png;base64,') == len(images)
    for blob in re.findall(r'data:image/png;base64,([A-Za-z0-9+/=]+)"', text):
        assert base64.b64decode(blob)[:8] == PNG_SIGNATURE
    assert html.escape(report["message"]) in text
    assert "<script" not in text and "http://" not in text and "https://" not in text
    assert text.count("<figcaption>") == len(images)
    return text


@pytest.mark.parametrize(
    ("report", "with_fields", "expected"),
    [
        (refine_report(), True, ["errors", "rank_sweep", "singular_values", "field_test", "field_val_2d"]),
        (pde_refine_report(), False, ["errors", "residual_blocks", "rank_sweep", "singular_values"]),
        (nonlinear_pde_report(), False, ["errors", "residual_blocks", "rank_sweep", "singular_values", "nonlinear"]),
    ],
    ids=["data", "pde", "pde-nonlinear"],
)
def test_refine_plots_and_html(tmp_path: Path, report: dict[str, Any], with_fields: bool, expected: list[str]) -> None:
    images = write_plots(report, tmp_path / "plots", fields() if with_fields else None)
    assert [p.name for p in images] == [f"{i + 1:02d}_{n}.png" for i, n in enumerate(expected)]
    for p in images:
        check_png(p)
    write_html(report, tmp_path / "report.html", images)
    text = check_html(tmp_path / "report.html", report, images)
    assert "lsr refine" in text and "improved" in text
    assert "a &lt;warning&gt; &amp; more" in text  # escaped, not raw HTML
    assert "117.7 MiB" in text  # peak memory
    assert ">val_loss<" in text or ">holdout_loss<" in text  # selection metric


def test_iterate_plots_and_html(tmp_path: Path) -> None:
    report = iterate_report()
    images = write_plots(report, tmp_path)
    assert [p.name for p in images] == ["01_iterations.png", "02_errors.png", "03_residual_blocks.png"]
    for p in images:
        check_png(p)
    write_html(report, tmp_path / "page.html", images)
    check_html(tmp_path / "page.html", report, images)


@pytest.mark.parametrize("with_reference", [True, False])
def test_instances_plots_and_html(tmp_path: Path, with_reference: bool) -> None:
    report = instances_report(with_reference)
    images = write_plots(report, tmp_path)
    assert [p.name for p in images] == ["01_instances_hist.png", "02_instances_scatter.png"]
    for p in images:
        check_png(p)
    write_html(report, tmp_path / "page.html", images)
    check_html(tmp_path / "page.html", report, images)


def test_missing_optional_fields(tmp_path: Path) -> None:
    """Reports without sweep, spectrum, references or errors give fewer (or no) figures, no error."""
    minimal = {"command": "refine", "status": "unchanged", "message": "rank 0: nothing to do"}
    assert write_plots(minimal, tmp_path / "a") == []
    write_html(minimal, tmp_path / "a.html", [])
    check_html(tmp_path / "a.html", minimal, [])

    r = refine_report()
    r["rank_sweep"] = [_sweep(0, None) | {"train_loss": None}, _sweep(8, None)]  # null val_loss
    r["singular_values"] = []
    r["splits"]["test"]["after"]["rel_l2"] = None
    del r["splits"]["val"]["network_after"], r["timings"], r["versions"], r["peak_memory_bytes"], r["rank"]
    images = write_plots(r, tmp_path / "b")
    assert [p.name for p in images] == ["01_errors.png", "02_rank_sweep.png"]
    write_html(r, tmp_path / "b.html", images)
    check_html(tmp_path / "b.html", r, images)

    empty = FieldData("empty", np.zeros((0, 2)), np.zeros(0), np.zeros(0))
    exact = FieldData("exact", np.zeros((4, 2)), np.zeros(4), np.full(4, np.nan))  # zero and non-finite errors
    images = write_plots(minimal, tmp_path / "e", [empty, exact])
    assert [p.name for p in images] == ["01_field_exact.png"]
    check_png(images[0])

    it = {"command": "iterate", "status": "unchanged", "message": "m", "iterations": [{"iteration": 0}]}
    assert write_plots(it, tmp_path / "c") == []
    inst = {"command": "instances", "status": "done", "message": "m", "per_instance": [{"rel_l2_before": None}]}
    assert write_plots(inst, tmp_path / "d") == []
    write_html(copy.deepcopy(inst), tmp_path / "d.html", [])


def test_report_kind_and_bad_input(tmp_path: Path) -> None:
    assert [report_kind(r) for r in (refine_report(), iterate_report(), instances_report())] == [
        "refine",
        "iterate",
        "instances",
    ]
    with pytest.raises(DataError, match=r"report.command: expected 'refine', 'iterate' or 'instances', got 'fit'"):
        write_plots({"command": "fit"}, tmp_path)
    bad = FieldData("test", np.zeros((5, 3)), np.zeros(5), np.zeros(5))
    with pytest.raises(DataError, match=r"fields\[0\] \(split 'test'\): inputs must have shape \[N, 1\] or \[N, 2\]"):
        write_plots(refine_report(), tmp_path, [bad])
    bad = FieldData("val", np.zeros((5, 2)), np.zeros(5), np.zeros(4))
    with pytest.raises(DataError, match=r"fields\[0\] \(split 'val'\): after must have shape \[5\], got \(4,\)"):
        write_plots(refine_report(), tmp_path, [bad])


def test_matplotlib_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    hint = "--plots needs matplotlib: pip install 'lsr-cli[plots]' (or pip install matplotlib)"
    with pytest.raises(ConfigError, match=re.escape(hint)):
        write_plots(refine_report(), tmp_path / "plots")
    assert not (tmp_path / "plots").exists()


# --------------------------------------------------------------------------------------------
# the CLI: --plots and lsr report
# --------------------------------------------------------------------------------------------


def test_refine_with_plots_and_report_command(regression_files):
    from tests.test_cli import assert_clean_failure, assert_ok, refine_args, run

    files = regression_files
    out, report, plots = files["dir"] / "r.pt", files["dir"] / "r.json", files["dir"] / "plots"
    result = run(*refine_args(files["state_dict"], files, out, report, "--plots", plots))
    assert_ok(result)
    names = sorted(p.name for p in plots.iterdir())
    assert "index.html" in names
    assert any(n.endswith("field_test.png") for n in names), names  # 2-D inputs: the error field
    html = (plots / "index.html").read_text()
    assert html.count('<img src="data:image/png;base64,') == len(names) - 1

    page = files["dir"] / "again.html"
    assert_ok(run("report", report, "--html", page))
    assert page.is_file() and (files["dir"] / "again_files").is_dir()
    assert_clean_failure(run("report", report, "--html", page), 6, ["again.html", "--force"])
    bad = files["dir"] / "bad.json"
    bad.write_text("[1, 2]")
    assert_clean_failure(run("report", bad, "--html", files["dir"] / "x.html"), 2, ["bad.json", "command"])


def test_plots_flag_without_matplotlib_fails_before_any_work(regression_files, monkeypatch):
    from tests.test_cli import assert_clean_failure, refine_args, run

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    files = regression_files
    out, report = files["dir"] / "r.pt", files["dir"] / "r.json"
    before = {p.name for p in files["dir"].iterdir()}
    result = run(*refine_args(files["state_dict"], files, out, report, "--plots", files["dir"] / "plots"))
    assert_clean_failure(result, 2, ["matplotlib", "pip install"], directory=files["dir"], before=before)
