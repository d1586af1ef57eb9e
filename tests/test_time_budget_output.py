"""The report field ``time_budget`` and its line in the closing summary of ``lsr refine``."""

from __future__ import annotations

import dataclasses

import torch

from lsr_cli.cli.output import time_budget_line
from lsr_cli.refine import RefineResult
from lsr_cli.report import refine_report


def _result(**changes: object) -> RefineResult:
    base = RefineResult(
        status="improved",
        message="",
        model=torch.nn.Identity(),  # type: ignore[arg-type]
        delta={},
        rank=1,
        selection_metric="val_loss",
        regularization={},
        rank_sweep=[],
        errors={},
        timings={},
        singular_values=[],
        num_parameters=1,
        num_linearized_parameters=1,
        num_residuals=1,
        device="cpu",
        dtype="float64",
        peak_memory_bytes=0,
        peak_memory_kind="rss",
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def _report(result: RefineResult) -> dict[str, object]:
    return refine_report(result, input_info={}, output_info={}, data_info={}, config={}, timings={}, seed=0)


def test_report_has_time_budget_only_when_the_result_has_one():
    assert "time_budget" not in _report(_result())
    budget = {"limit_s": 600.0, "estimate_s": 588.0, "measured_s": 618.0}
    assert _report(_result(time_budget=budget))["time_budget"] == budget


def test_time_budget_line_gives_every_key_in_order():
    budget = {"limit_s": 600.0, "estimate_s": 588.0, "measured_s": 45.0, "ranks_tried": [64, 128], "plan": "cut"}
    budget |= {"rounds": [{"rank": 64, "measured_s": 1.0}], "costs": {"dense_gflops": 30.0}, "other_s": None}
    line = time_budget_line({"time_budget": budget})
    assert line == "time budget: limit 10.0 min, estimate 9.8 min, measured 45.0 s, ranks tried 64, 128, plan cut"
    assert time_budget_line({}) is None and time_budget_line({"time_budget": None}) is None
    assert time_budget_line({"time_budget": {"limit_s": None, "estimate_s": 5.0}}) is None  # no limit: report only


def test_time_budget_line_gives_the_estimate_revised_when_the_range_ran_out():
    revised = {"planned_rank": 9000, "usable_rank": 4460, "rank": 4460, "elapsed_s": 600.0, "estimate_total_s": 1106.0}
    budget = {"limit_s": 5100.0, "estimate_total_s": 3713.0, "elapsed_after_solve_s": 1056.0, "revised": revised}
    line = time_budget_line({"time_budget": budget})
    assert line == (
        "time budget: limit 85.0 min, estimate total 61.9 min, revised after the sketch 18.4 min (the range held "
        "4460 directions, rank 9000 planned), elapsed after solve 17.6 min"
    )
