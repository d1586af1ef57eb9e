"""The paper-size Burgers generator's sensitivity options (sample_data/make_burgers_paper.py).

`--alpha` changes the field's smoothness at the same pointwise spread; `--extra-train` appends
training functions and leaves the validation and test functions as they were, so a run on more
data is scored on the same test set.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gen():
    path = ROOT / "sample_data" / "make_burgers_paper.py"
    spec = importlib.util.spec_from_file_location("make_burgers_paper_under_test", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_field_scale_keeps_the_pointwise_spread(gen):
    assert gen.field_scale(gen.GRF_ALPHA) == gen.GRF_S  # the shipped data are unchanged
    k = np.arange(1, gen.NUM_MODES + 1)
    base = gen.GRF_TAU**2 + (k * np.pi) ** 2

    def variance(alpha: float) -> float:  # pointwise variance averaged over x: ½ Σ s² base^−α
        return 0.5 * gen.field_scale(alpha) ** 2 * float(np.sum(base**-alpha))

    for alpha in (2.0, 3.0, 4.0):
        assert variance(alpha) == pytest.approx(variance(gen.GRF_ALPHA), rel=1e-12)
    smooth = gen.initial_coefficients(np.random.default_rng(0), 2000, 4.0)
    rough = gen.initial_coefficients(np.random.default_rng(0), 2000)
    # the smoother field puts more of its variance in the first modes
    assert np.mean(smooth[:, :2] ** 2) / np.mean(smooth**2) > np.mean(rough[:, :2] ** 2) / np.mean(rough**2) + 0.05


def test_extra_training_functions_leave_val_and_test_alone(gen, tmp_path, monkeypatch):
    monkeypatch.setattr(gen, "SPLITS", {"train": 4, "val": 2, "test": 2})
    monkeypatch.setattr(gen, "FINE", 256)  # a coarser solve: this test is about the splits, not the solver
    monkeypatch.setattr(gen, "DT", 2e-3)
    gen.make_data(tmp_path / "base.h5", seed=0)
    gen.make_data(tmp_path / "more.h5", seed=0, extra_train=3)
    with h5py.File(tmp_path / "base.h5") as a, h5py.File(tmp_path / "more.h5") as b:
        assert b["train/targets"].shape == (7, gen.GRID)
        assert b["train/inputs/branch"].shape == (7, gen.GRID)
        np.testing.assert_allclose(b["train/targets"][:4], a["train/targets"][:], atol=1e-13)
        for split in ("val", "test"):
            for name in ("inputs/branch", "targets"):
                np.testing.assert_allclose(b[f"{split}/{name}"][:], a[f"{split}/{name}"][:], atol=1e-13)
        # the appended functions are new ones
        assert np.abs(b["train/inputs/branch"][4:] - a["train/inputs/branch"][:3]).max() > 1e-2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--alpha", "4"], "give --out DIR"),  # would write over the shipped files
        (["--extra-train", "-3", "--out", "OUT"], "expected a count of functions >= 0, got -3"),
    ],
)
def test_bad_sensitivity_options_are_refused(args, message, tmp_path):
    out = tmp_path / "out"
    args = [str(out) if a == "OUT" else a for a in args]
    shipped = ROOT / "sample_data" / "burgers_paper.h5"
    before = shipped.stat().st_mtime_ns
    proc = subprocess.run(
        [sys.executable, str(ROOT / "sample_data" / "make_burgers_paper.py"), "--only", "data", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert message in proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr
    assert not out.exists() and shipped.stat().st_mtime_ns == before
