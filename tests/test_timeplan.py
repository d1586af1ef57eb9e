"""The time plan (lsr.time_limit), the leading-column sweep and the lean SVD of a released sketch."""

from __future__ import annotations

import pytest
import torch

from lsr_cli.config import parse_duration
from lsr_cli.errors import ConfigError
from lsr_cli.sketch import RangeSketch
from lsr_cli.solve import QRAccumulator, leading_column_losses, leading_column_solution
from lsr_cli.timeplan import Costs, ladder, plan_time


class _Op:
    def __init__(self, J: torch.Tensor) -> None:
        self.J = J

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.J.shape[0]), int(self.J.shape[1]))

    def matmat(self, V: torch.Tensor, progress: object = None) -> torch.Tensor:
        return self.J @ V

    def rmatmat(self, U: torch.Tensor, progress: object = None) -> torch.Tensor:
        return self.J.T @ U


def test_leading_column_losses_equal_least_squares_at_every_rank() -> None:
    g = torch.Generator().manual_seed(0)
    A = torch.randn(400, 30, generator=g, dtype=torch.float64)
    f = torch.randn(400, generator=g, dtype=torch.float64)
    As = torch.randn(90, 30, generator=g, dtype=torch.float64)
    fs = torch.randn(90, generator=g, dtype=torch.float64)
    fit, sel = QRAccumulator(30), QRAccumulator(30)
    fit.add(A[:150], f[:150])
    fit.add(A[150:], f[150:])
    sel.add(As, fs)
    fit_loss, sel_loss, usable = leading_column_losses(fit, sel)
    assert usable == 30 and sel_loss is not None
    for r in range(31):
        if r:
            z = torch.linalg.lstsq(A[:, :r], -f[:, None]).solution[:, 0]
        else:
            z = torch.zeros(0, dtype=torch.float64)
        assert torch.allclose(leading_column_solution(fit, r), z, atol=1e-12)
        assert float(fit_loss[r]) == pytest.approx(float(((A[:, :r] @ z + f) ** 2).sum()), rel=1e-12)
        assert float(sel_loss[r]) == pytest.approx(float(((As[:, :r] @ z + fs) ** 2).sum()), rel=1e-12)


def test_leading_column_losses_stop_at_a_singular_column() -> None:
    g = torch.Generator().manual_seed(1)
    A = torch.randn(50, 6, generator=g, dtype=torch.float64)
    A[:, 3] = A[:, 0] + A[:, 1]  # column 3 adds nothing
    fit = QRAccumulator(6)
    fit.add(A, torch.randn(50, generator=g, dtype=torch.float64))
    fit_loss, _, usable = leading_column_losses(fit, None)
    assert usable == 3
    assert torch.isinf(fit_loss[4:]).all() and torch.isfinite(fit_loss[:4]).all()


def test_released_sketch_keeps_the_same_svd() -> None:
    g = torch.Generator().manual_seed(2)
    U = torch.linalg.qr(torch.randn(120, 80, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(90, 80, generator=g, dtype=torch.float64)).Q
    J = U @ torch.diag(torch.logspace(0, -5, 80, dtype=torch.float64)) @ V.T
    a = RangeSketch(_Op(J), torch.Generator().manual_seed(3), torch.float64, torch.device("cpu"), block_size=16)
    b = RangeSketch(_Op(J), torch.Generator().manual_seed(3), torch.float64, torch.device("cpu"), block_size=16)
    a.extend(50)
    b.extend(50)
    W1, S1, _ = a.svd()
    b.release()
    assert b.Q.numel() == 0 and b.B.numel() == 0 and b.num_columns == 50
    W2, S2, _ = b.svd()
    assert torch.allclose(S1, S2, rtol=1e-12, atol=1e-15)
    # the same directions up to sign: |W1ᵀ W2| is the identity on well-separated values
    assert torch.allclose((W1[:, :20].T @ W2[:, :20]).abs(), torch.eye(20, dtype=torch.float64), atol=1e-8)
    Pa, _ = a.basis(20)
    Pb, _ = b.basis(20, consume=True)  # in place: no copy of W
    assert torch.allclose(Pa.abs(), Pb.abs(), atol=1e-8)
    with pytest.raises(RuntimeError):
        b.extend(10)


def _costs() -> Costs:
    return Costs(
        jvp_s=1e-6,
        sketch_jvp_s=1e-6,
        sketch_vjp_s=2e-6,
        flops=1e10,
        rows=100_000,
        rows_sketch=10_000,
        m=50_000,
        oversampling=10,
        eval_rows=100_000,
    )


def test_plan_keeps_the_ladder_when_it_fits_and_else_one_round_that_fits() -> None:
    costs = _costs()
    ranks = ladder(256, 2.0, 4096)
    assert ranks == [256, 512, 1024, 2048, 4096]
    free = plan_time(costs, ranks, [], 128, None, 5.0)
    assert free.ranks == ranks and not free.single and free.estimate_s == pytest.approx(free.unlimited_estimate_s)
    roomy = plan_time(costs, ranks, [], 128, free.estimate_s * 2 + 100, 5.0)
    assert roomy.ranks == ranks and not roomy.single
    tight = plan_time(costs, ranks, [], 128, 120.0, 5.0)
    assert tight.single and len(tight.ranks) == 1
    left = 120.0 - 5.0 - costs.reserve()
    assert tight.estimate_s <= left
    r = tight.ranks[0]
    assert 1 <= r < 4096
    # one more rank would not have fitted
    bigger = plan_time(costs, [r + 1], [r + 1], 128, None, 5.0)
    assert bigger.estimate_s > left
    assert tight.unlimited_ranks == ranks and tight.unlimited_estimate_s > left


def test_fixed_ranks_are_capped_by_the_plan() -> None:
    plan = plan_time(_costs(), [3000], [100, 3000], 128, 60.0, 0.0)
    assert plan.single and plan.ranks[0] < 3000


@pytest.mark.parametrize(("text", "seconds"), [("10min", 600.0), ("90s", 90.0), ("1.5h", 5400.0), (45, 45.0)])
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration("lsr.time_limit", text) == seconds


@pytest.mark.parametrize("bad", ["ten minutes", "5 parsecs", 0.5, True, "-3s"])
def test_bad_durations_are_one_line_config_errors(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"^config\.lsr\.time_limit: ") as exc:
        parse_duration("lsr.time_limit", bad)
    assert "\n" not in str(exc.value)


def test_a_slow_sketch_shrinks_the_projected_rank() -> None:
    from lsr_cli.timeplan import mark_run_start

    mark_run_start()
    plan = plan_time(_costs(), ladder(256, 2.0, 4096), [], 128, 120.0, 0.0)
    assert plan.single
    r = plan.ranks[0]
    est_sketch = plan.costs.round_parts(128, r, [])["sketch"]
    assert plan.shrink_after_sketch(r, est_sketch, None) == r  # on time: unchanged
    slow = plan.shrink_after_sketch(r, 6.0 * est_sketch + 30.0, None)
    assert 1 <= slow < r and "no longer fitted" in plan.replanned


def test_the_plan_counts_the_qr_folds_a_memory_budget_allows() -> None:
    import dataclasses

    from lsr_cli.projection import fold_rows
    from lsr_cli.timeplan import qr_fold_factor

    assert qr_fold_factor(4000, None) == 1.0
    tight = 8 * 3 * (64 + 4001) * 4001  # room for folds of 64 rows only
    assert fold_rows(4000, tight) == 64
    assert qr_fold_factor(4000, tight) == pytest.approx((1 + 8000 / 192) / (1 + 8000 / (3 * 16064)))
    assert qr_fold_factor(4000, 10 * tight) < qr_fold_factor(4000, tight)
    free = _costs().round_parts(0, 4000, [4000])
    held = dataclasses.replace(_costs(), fold_budget=tight).round_parts(0, 4000, [4000])
    qr = 2.0 * 100_000 * 4000**2 / 1e10
    assert held["project"] - free["project"] == pytest.approx(qr * (qr_fold_factor(4000, tight) - 1.0))
    assert held["sketch"] == free["sketch"] and held["solve"] == free["solve"]


def test_a_range_that_runs_out_revises_the_estimate() -> None:
    from lsr_cli.timeplan import mark_run_start

    mark_run_start()
    plan = plan_time(_costs(), [3000], [3000], 128, None, 0.0)
    assert not plan.revised
    line = plan.revise_after_sketch(3000, 1200, 1200, [1200])
    rev = plan.revised
    assert (rev["planned_rank"], rev["usable_rank"], rev["rank"]) == (3000, 1200, 1200)
    assert rev["elapsed_s"] < rev["estimate_total_s"] < plan.estimate_s  # the rest of a smaller round
    assert "range holds 1200 directions" in line and "rank 3000 planned" in line
    assert plan.report(1.0, [1.0], 2.0)["revised"] == rev
