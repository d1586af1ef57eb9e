"""``--max-memory`` as a bound: the plan (budget.py), its refusal, and a run that stays under it."""

from __future__ import annotations

import json

import pytest
import torch

from lsr_cli.budget import SAFETY, fold_bytes, plan_memory, released_sketch_bytes, sketch_bytes, triangle_bytes
from lsr_cli.errors import ConfigError
from lsr_cli.runtime import MemoryMeter

from .test_cli import assert_clean_failure, listing, run

MB = 10**6


class _Meter:
    """A meter holding ``held`` bytes now, with nothing to measure (dense operators)."""

    def __init__(self, held: int) -> None:
        self.held = held

    def current_above_start(self) -> int:
        return self.held


def _plan(budget: int, held: int = 0, adaptable: bool = True, **kw):
    args = {
        "sketch_rows": 20000,
        "m": 5000,
        "max_columns": 2058,
        "min_columns": 266,
        "max_rank": 2048,
        "out_numel": 1,
        "row_chunk": 512,
        "tangent_chunk": 32,
        **kw,
    }
    return plan_memory(budget, _Meter(held), None, adaptable=adaptable, **args)  # type: ignore[arg-type]


def test_plan_keeps_the_full_sketch_when_it_fits():
    plan = _plan(4000 * MB)
    assert plan.max_columns == 2058 and plan.adapted == []
    assert plan.sketch == sketch_bytes(20000, 5000, 2058)
    assert plan.minimum <= 4000 * MB


def test_auto_rank_plan_narrows_the_sketch_to_fit_and_says_so():
    budget = 300 * MB
    plan = _plan(budget, held=20 * MB)
    assert 266 <= plan.max_columns < 2058
    r = min(2048, plan.max_columns)
    used = 20 * MB + sketch_bytes(20000, 5000, plan.max_columns) + triangle_bytes(r) + fold_bytes(r, 64)
    assert used <= SAFETY * budget
    assert any("sketch width capped" in a for a in plan.adapted)
    # the widest that leaves room for the requested chunk (512 samples) and folds of 2r rows
    k1 = plan.max_columns + 1
    r1 = min(2048, k1)
    fixed = 20 * MB + sketch_bytes(20000, 5000, k1) + triangle_bytes(r1) + fold_bytes(r1, 64)
    assert fixed + 8 * r1 * 512 + fold_bytes(r1, 2 * r1) > SAFETY * budget
    r = min(2048, plan.max_columns)
    assert plan.fold_budget >= fold_bytes(r, 2 * r) and plan.row_chunk == 512


def test_auto_rank_plan_narrows_a_sketch_that_fits_only_without_room_for_folds():
    # 2058 columns fit with one-sample chunks and 64-row folds, not with the requested chunk and
    # folds of 2r rows: the plan narrows the sketch rather than folding 64 rows at a time
    full = 20 * MB + sketch_bytes(20000, 5000, 2058) + triangle_bytes(2048) + fold_bytes(2048, 64)
    budget = int((full + 8 * 2048 + MB) / SAFETY)
    plan = _plan(budget, held=20 * MB)
    assert 266 <= plan.max_columns < 2058 and plan.row_chunk == 512
    r = min(2048, plan.max_columns)
    assert plan.fold_budget >= fold_bytes(r, 2 * r)
    fixed = _plan(budget, held=20 * MB, adaptable=False)  # a fixed rank keeps its sketch
    assert fixed.max_columns == 2058


def test_fixed_ranks_that_do_not_fit_are_refused_with_the_minimum():
    with pytest.raises(ConfigError) as exc:
        _plan(300 * MB, held=20 * MB, adaptable=False)
    msg = str(exc.value)
    assert msg.startswith("lsr.max_memory: 300.0 MB is below the ")
    assert "this run needs" in msg and "lower lsr.max_rank" in msg
    minimum = float(msg.split("below the ")[1].split(" MB")[0]) * MB
    assert minimum > 300 * MB
    plan = _plan(int(minimum) + MB, held=20 * MB, adaptable=False)  # the minimum it named is enough
    assert plan.max_columns == 2058


def test_chunks_shrink_when_the_autodiff_workspace_is_large(monkeypatch):
    import lsr_cli.budget as budget_mod

    monkeypatch.setattr(budget_mod, "measure_workspace", lambda op, meter: (2e4, True))  # 20 kB per sample·tangent
    plan = _plan(400 * MB, max_columns=266, min_columns=266, max_rank=256)
    assert plan.row_chunk * plan.tangent_chunk * 2e4 <= SAFETY * 400 * MB
    assert plan.row_chunk < 512 or plan.tangent_chunk < 32
    assert any("per Jacobian-product chunk" in a or "tangent columns" in a for a in plan.adapted)


def test_meter_measures_a_section_and_keeps_the_run_peak():
    meter = MemoryMeter(torch.device("cpu"))
    if not meter.resettable:
        pytest.skip("this kernel does not let a process reset its peak resident set")
    big = torch.ones(6_000_000, dtype=torch.float64)  # 48 MB, touched
    del big
    peak_run = meter.peak_above_start()
    assert peak_run >= 40 * MB
    section = meter.measure(lambda: torch.ones(2_000_000, dtype=torch.float64).sum())  # 16 MB
    assert section is not None and 12 * MB <= section < 40 * MB
    assert meter.peak_above_start() >= peak_run  # the reset of the counter did not lose the run's peak


def test_budget_below_the_minimum_is_a_one_line_error_and_writes_nothing(regression_files, tmp_path):
    files = regression_files
    out = tmp_path / "out" / "r.pt"
    before = listing(tmp_path)
    result = run(
        "refine", files["state_dict"], "-c", files["config"], "-d", files["data"],
        "--rank", "64", "--max-memory", "2MB", "--out", out,
    )  # fmt: skip
    assert_clean_failure(result, 2, ["lsr.max_memory: 2.0 MB is below the", "this run needs"], [out])
    assert listing(tmp_path) == before
    assert len([ln for ln in result.stderr.splitlines() if ln.strip()]) == 1


def test_a_run_under_a_budget_stays_under_it_and_reports_its_plan(regression_files, tmp_path):
    files = regression_files
    out = tmp_path / "r.pt"
    result = run(
        "refine", files["state_dict"], "-c", files["config"], "-d", files["data"],
        "--rank", "64", "--max-memory", "64MB", "--out", out, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    mem = json.loads(result.stdout)["memory"]
    assert mem["budget_bytes"] == 64 * MB
    assert mem["peak_above_start_bytes"] <= 64 * MB
    assert mem["plan"]["minimum_budget_bytes"] <= 64 * MB
    assert set(mem["peak_above_start_by_stage"]) == {"baseline", "sketch_project_solve", "evaluate"}


def test_fixed_rank_plan_counts_the_sketch_it_releases():
    # a fixed rank above the sweep limit takes one round and releases Q and B before the SVD:
    # the plan counts that peak (about 2 m k), not the full SVD's copies (4 m k)
    kw = {"max_columns": 4106, "min_columns": 4106, "max_rank": 4096}
    lean = released_sketch_bytes(20000, 5000, 4106)
    full = sketch_bytes(20000, 5000, 4106)
    assert lean < 0.6 * full
    budget = int((20 * MB + lean + triangle_bytes(4096) + fold_bytes(4096, 64) + 8 * 4096 + MB) / SAFETY)
    with pytest.raises(ConfigError):
        _plan(budget, held=20 * MB, adaptable=False, **kw)
    plan = _plan(budget, held=20 * MB, adaptable=False, full_svd_columns=2058, **kw)
    assert plan.max_columns == 4106 and plan.sketch == max(lean, sketch_bytes(20000, 5000, 2058))
    narrow = _plan(4000 * MB, held=20 * MB, adaptable=False, full_svd_columns=2058)  # 2 058 columns: full SVD
    assert narrow.sketch == sketch_bytes(20000, 5000, 2058)


def test_a_released_sketch_stays_within_its_count():
    from lsr_cli.budget import limit_allocator_slack
    from lsr_cli.linear_ops import DenseOperator
    from lsr_cli.sketch import RangeSketch

    meter = MemoryMeter(torch.device("cpu"))
    if not meter.resettable:
        pytest.skip("this kernel does not let a process reset its peak resident set")
    limit_allocator_slack()  # as lsr refine does
    rows, m, k = 1500, 6000, 700
    J = torch.randn(rows, m, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def run(k: int) -> None:
        op = DenseOperator(None, J)  # type: ignore[arg-type]  # products only
        sketch = RangeSketch(op, torch.Generator().manual_seed(1), torch.float64, torch.device("cpu"))
        sketch.extend(k)
        sketch.release()
        P, _ = sketch.basis(k - 10, consume=True)
        assert P.shape == (m, k - 10)

    run(40)  # BLAS and LAPACK allocate their buffers once, at their first call
    peak = meter.measure(lambda: run(k))
    assert peak is not None
    assert peak <= released_sketch_bytes(rows, m, k) + 4 * MB
    assert peak < 0.75 * sketch_bytes(rows, m, k)
