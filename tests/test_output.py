"""What a user reads: tables, progress and closing lines when stdout and stderr are files, and
``--quiet`` / ``--json`` unchanged.

The commands run in a real subprocess with stdout and stderr redirected to files (not a
terminal, as in ``lsr refine ... > log.txt 2>&1``) and ``COLUMNS=60``, narrower than any of the
tables: every cell must still appear in full.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from lsr_cli.report import NETWORK_NOTE, LineProgress, refine_summary

from .test_cli import assert_ok, refine_args, run
from .test_cli_pde import _pinn, pinn, write_config  # noqa: F401  (fixtures)
from .test_instances import _write as write_instances

ITERATE_SETTINGS = {"iterations": 1, "lbfgs_iterations": 10, "gauss_newton_steps": 3, "gauss_newton_rank": 40}
STAGE_LINE = re.compile(r"^\[lsr\] (?P<stage>.+): done in \d+\.\d s( \(stopped at \d+ of \d+\))?$")


def lsr_logged(directory: Path, *args: Any) -> tuple[str, str]:
    """Run ``python -m lsr_cli ARGS > stdout.log 2> stderr.log``; returns both logs."""
    out, err = directory / "stdout.log", directory / "stderr.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "60"}
    with out.open("w") as fo, err.open("w") as fe:
        proc = subprocess.run(
            [sys.executable, "-m", "lsr_cli", *[str(a) for a in args]], stdout=fo, stderr=fe, env=env, timeout=240
        )
    stdout, stderr = out.read_text(encoding="utf-8"), err.read_text(encoding="utf-8")
    assert proc.returncode == 0, stdout + stderr
    return stdout, stderr


def sci(v: float) -> str:
    """A number as the tables write it."""
    return f"{v:.2e}"


def row_of(stdout: str, first_cell: str) -> str:
    rows = [line for line in stdout.splitlines() if re.match(rf"^│ *{re.escape(first_cell)} *│", line)]
    assert len(rows) == 1, stdout
    return rows[0]


def assert_cells(row: str, cells: list[str]) -> None:
    found = [c.strip() for c in row.strip("│").split("│")]
    assert found == cells, (found, cells)


def stages(stderr: str) -> list[str]:
    return [m["stage"] for line in stderr.splitlines() if (m := STAGE_LINE.match(line))]


def test_refine_log_keeps_every_digit_and_one_line_per_stage(regression_files):
    d = regression_files["dir"]
    out, report = d / "r.pt", d / "r.json"
    args = refine_args(regression_files["state_dict"], regression_files, out, report, rank="8,32")
    stdout, stderr = lsr_logged(d, *args)
    rep = json.loads(report.read_text())
    assert "…" not in stdout + stderr
    assert "\x1b[" not in stdout + stderr  # no colours or cursor movements in a log
    for split, errs in rep["splits"].items():
        b, a = errs["before"]["rel_l2"], errs["after"]["rel_l2"]
        assert_cells(row_of(stdout, split), [split, sci(b), sci(a), f"{b / a:.3g}×"])
    assert "θ0" not in stdout  # the plain network at θ0 + δ is shown with --verbose only
    # progress: one plain line per stage and the time plan's estimate, nothing else, no bars
    done = stages(stderr)
    plan = [line for line in stderr.splitlines() if line.startswith("[lsr] time plan: ")]
    assert len(plan) == 1 and " estimate " in plan[0], stderr
    assert len(done) == len(set(done)) == len(stderr.splitlines()) - 1, stderr
    assert done[0].startswith("sketch") and done[-1] == "evaluate", done
    assert "━" not in stderr
    # the closing line: the test error first, then the criterion
    closing = stdout.splitlines()[-2]
    test = rep["splits"]["test"]
    assert closing.startswith(f"test rel L2 error {sci(test['before']['rel_l2'])} -> {sci(test['after']['rel_l2'])} (")
    criterion = (
        f"rank {rep['rank']}, chosen on the validation split"
        if rep["status"] == "improved"
        else "no rank did better than the input on the validation split"
    )
    assert closing.index("test rel L2") < closing.index(criterion)
    assert stdout.splitlines()[-1] == f"wrote {out} and {report}"


def test_refine_verbose_adds_the_plain_network_and_says_it_is_not_the_refined_model(regression_files):
    d = regression_files["dir"]
    out, report = d / "r.pt", d / "r.json"
    result = run(*refine_args(regression_files["state_dict"], regression_files, out, report, rank="8,32"), "-v")
    assert_ok(result)
    rep = json.loads(report.read_text())
    for split, errs in rep["splits"].items():
        b, a = errs["before"]["rel_l2"], errs["after"]["rel_l2"]
        cells = [split, sci(b), sci(a), f"{b / a:.3g}×", sci(errs["after"]["max_abs"])]
        assert_cells(row_of(result.stdout, split), [*cells, sci(errs["network_after"]["rel_l2"])])
    lines = result.stdout.splitlines()
    assert lines[-3] == NETWORK_NOTE  # under the table, before the closing line
    assert "is not the refined model" in NETWORK_NOTE and "lsr iterate" in NETWORK_NOTE


def test_iterate_log_keeps_every_digit_and_says_why_the_residual_moves(pinn):  # noqa: F811
    d = pinn["dir"]
    cfg = write_config(d / "it.yaml", {"iterate": ITERATE_SETTINGS, "lsr": {"rank": [16, 48]}})
    out, report = d / "it.pt", d / "it.json"
    stdout, stderr = lsr_logged(d, "iterate", pinn["state_dict"], "--config", cfg, "--out", out, "--report", report)
    rep = json.loads(report.read_text())
    assert "…" not in stdout + stderr
    for e in rep["iterations"]:
        res, ref = e["residual_loss"], e["reference_rel_l2"]
        cells = [str(e["iteration"]), str(e["rank"]), sci(res["linearized"]), sci(res["network"])]
        cells += [sci(ref["linearized"]), sci(ref["network"]), sci(e["alignment"]["relative_fit"])]
        assert_cells(row_of(stdout, str(e["iteration"])), [*cells, f"{e['seconds']['total']:.1f}"])
    # progress: the stage line and one unwrapped line per iteration
    assert stages(stderr) == ["I-LSR iterations"], stderr
    assert len([line for line in stderr.splitlines() if line.startswith("iteration ")]) == len(rep["iterations"])
    # the closing line: reference error, then the criterion, then the residual loss (and why it may rise)
    closing = stdout.splitlines()[-2]
    assert closing == rep["message"]
    ref = rep["splits"]["reference"]
    assert closing.startswith(
        f"the network's reference rel L2 error {sci(ref['before']['rel_l2'])} -> {sci(ref['after']['rel_l2'])} ("
    )
    if rep["status"] == "improved":
        assert closing.index("reference rel L2") < closing.index("chosen by its") < closing.index("weighted residual")
        loss = rep["residual_loss"]
        assert f"weighted residual loss {sci(loss['before'])} -> {sci(loss['after'])}" in closing
        if loss["after"] > loss["before"]:
            assert "higher; the kept network is chosen by its" in closing


def test_pde_refine_closing_line_leads_with_the_reference_error(pinn):  # noqa: F811
    out, report = pinn["dir"] / "r.pt", pinn["dir"] / "r.json"
    result = run("refine", pinn["torchscript"], "--config", pinn["config"], "--out", out, "--report", report)
    assert_ok(result)
    rep = json.loads(report.read_text())
    closing = result.stdout.splitlines()[-2]
    ref, loss = rep["splits"]["reference"], rep["residual_loss"]
    assert closing.startswith(f"reference rel L2 error {sci(ref['before']['rel_l2'])} -> {sci(ref['after']['rel_l2'])}")
    assert (
        closing.index("reference rel L2")
        < closing.index(f"rank {rep['rank']}, chosen on")
        < closing.index(f"weighted residual loss {sci(loss['before'])} -> {sci(loss['after'])}")
    )


def test_refine_closing_line_without_reference_or_improvement():
    errs = {"before": {"rel_l2": 0.5}, "after": {"rel_l2": 0.5}}
    pde = {
        "status": "unchanged",
        "splits": {},
        "rank": 0,
        "selection_metric": "holdout_loss",
        "regularization": {"holdout_fraction": 0.1},
        "residual_loss": {"before": 2.0, "after": 2.0},
        "message": "m",
    }
    assert refine_summary(pde) == (
        "weighted residual loss 2.00e+00 -> 2.00e+00 (unchanged) (no reference solution to compare with); "
        "no rank did better than the input on the residual loss at 10% of the collocation points (held out): "
        "the refined predictor equals it"
    )
    supervised = {"status": "improved", "splits": {"train": errs, "val": errs | {"after": {"rel_l2": 0.25}}}}
    supervised |= {"rank": 4, "selection_metric": "val_loss", "regularization": {}}
    assert refine_summary(supervised) == (
        "val rel L2 error 5.00e-01 -> 2.50e-01 (2x lower) (no test split); rank 4, chosen on the validation split"
    )


def test_instances_closing_line_leads_with_the_reference_error(tmp_path):
    files = write_instances(tmp_path)
    result = run("instances", "--config", files["config"], "--out", tmp_path / "p.h5", "--count", "2")
    assert_ok(result)
    rep = json.loads((tmp_path / "p.report.json").read_text())
    s = rep["summary"]
    assert rep["message"].startswith(
        f"2 instances: mean reference rel L2 error {sci(s['rel_l2_before']['mean'])} -> "
        f"{sci(s['rel_l2_after']['mean'])} ("
    )
    assert rep["message"].index("reference rel L2") < rep["message"].index("chosen on its own residual")
    assert rep["message"] in result.stdout
    assert "…" not in result.stdout


def test_quiet_prints_nothing_and_json_only_json(regression_files):
    d = regression_files["dir"]
    args = refine_args(regression_files["state_dict"], regression_files, d / "r.pt", d / "r.json")
    stdout, stderr = lsr_logged(d, *args, "--quiet")
    assert stdout == stderr == ""
    stdout, stderr = lsr_logged(d, *args, "--json", "--force")
    assert json.loads(stdout)["command"] == "refine"
    assert stderr == ""


class _FlushCounter(io.StringIO):
    flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


def test_line_progress_writes_one_flushed_line_per_stage():
    stream = _FlushCounter()
    with LineProgress(stream) as sink:
        advance = sink.begin("sketch J (k=8)", 4)
        advance(4)
        inner = sink.begin("inner", 1)  # a stage inside another ends first
        inner(1)
        sink.end()
        sink.end()
        advance = sink.begin("steps", 20)
        advance(3)
        sink.end()
        sink.end()  # an unmatched end is ignored
    lines = stream.getvalue().splitlines()
    assert stages(stream.getvalue()) == ["inner", "sketch J (k=8)", "steps"]
    assert lines[-1].endswith("(stopped at 3 of 20)")
    assert stream.flushes == 3
    quiet = io.StringIO()
    with LineProgress(quiet, enabled=False) as sink:
        sink.begin("stage", 1)(1)
        sink.end()
    assert quiet.getvalue() == ""
