"""The shell examples in ``examples/`` run as documented."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lsr_cli.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
BATCH = ROOT / "examples" / "batch_refine.sh"
COLUMNS = ["checkpoint", "exit_code", "rank", "split", "error_before", "error_after", "seconds"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_batch_refine_keeps_going_past_a_corrupt_checkpoint(regression_files):
    d = regression_files["dir"]
    folder = d / "models"
    folder.mkdir()
    shutil.copyfile(regression_files["state_dict"], folder / "a_state_dict.pt")
    shutil.copyfile(regression_files["torchscript"], folder / "b_torchscript.pt")
    (folder / "c_corrupt.pt").write_bytes(b"\x00garbage, not a checkpoint\xff" * 10)
    out = d / "batch"
    env = {**os.environ, "LSR": f"{sys.executable} -m lsr_cli", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    args = [folder, regression_files["config"], out, "--", "--data", regression_files["data"], "--rank", "128"]
    proc = subprocess.run(["bash", BATCH, *map(str, args)], capture_output=True, text=True, env=env, cwd=d, timeout=300)
    assert proc.returncode == 1, proc.stderr  # one refinement failed
    with (out / "summary.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == COLUMNS
    by_name = {Path(r["checkpoint"]).name: r for r in rows}
    assert sorted(by_name) == ["a_state_dict.pt", "b_torchscript.pt", "c_corrupt.pt"]
    corrupt = by_name["c_corrupt.pt"]
    assert corrupt["exit_code"] == str(CheckpointError.exit_code)
    assert [corrupt[c] for c in COLUMNS[2:]] == [""] * 5
    assert "error:" in (out / "c_corrupt.log").read_text()
    for name in ("a_state_dict.pt", "b_torchscript.pt"):
        row = by_name[name]
        assert row["exit_code"] == "0" and row["rank"] == "128" and row["split"] == "test"
        before, after, seconds = float(row["error_before"]), float(row["error_after"]), float(row["seconds"])
        assert 0 < after < before and seconds > 0
        assert (out / name.replace(".pt", ".refined.pt")).is_file()
