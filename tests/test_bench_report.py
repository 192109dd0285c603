"""The benchmark's ratio arithmetic and target verdicts, on synthetic timings (no timing in tests)."""

from __future__ import annotations

import pytest

from soap_dist.bench.report import across_rounds, key_ratios
from soap_dist.bench.timing import Result


def result(name: str, median: float, refresh: float | None = None, k: int = 10) -> Result:
    steps = [(t, median, False) for t in range(1, k)]
    if refresh is not None:
        steps.append((k, refresh, True))
    return Result(name, 0.0, steps, 0, 0)


def test_key_ratios_follow_the_amortized_definition():
    plain, soap, floor = result("plain", 4.0, 13.0), result("soap_dist", 2.0, 7.0), result("floor", 1.6)
    got = key_ratios([floor, plain, soap], k=10)
    assert got["speedup_vs_plain"] == pytest.approx((9 * 4.0 + 13.0) / (9 * 2.0 + 7.0))
    assert got["median_speedup_vs_plain"] == 2.0
    assert got["refresh_s"] == 5.0
    assert got["median_over_floor"] == 2.0 / 1.6
    assert got["amortized_over_floor"] == pytest.approx((9 * 2.0 + 7.0) / 10 / 1.6)


def test_across_rounds_checks_targets_on_the_median_round():
    rounds = [
        [result("plain", 4.0, 13.0), result("soap_dist", 2.0, 7.0)],  # 1.96x
        [result("plain", 4.0, 13.0), result("soap_dist", 3.0, 9.0)],  # 1.36x: a loaded round
        [result("plain", 5.0, 15.0), result("soap_dist", 2.5, 8.0)],  # 1.97x
    ]
    lines = across_rounds(rounds, k=10, cuda=False, full_medium=False)
    speedup = next(line for line in lines if line.startswith("- speedup_vs_plain"))
    assert "1.96, 1.36, 1.97 (median 1.96)" in speedup
    assert any("target (CPU)" in line and "1.96x PASS" in line for line in lines)
    rounds[2][1] = result("soap_dist", 3.5, 10.0)  # now the median round is a slow one
    lines = across_rounds(rounds, k=10, cuda=False, full_medium=False)
    assert any("target (CPU)" in line and "FAIL" in line for line in lines)


def test_gpu_targets_are_checked_against_the_floor():
    results = [result("floor", 0.035), result("soap_dist", 0.041, 0.6)]
    lines = across_rounds([results], k=10, cuda=True, full_medium=True)
    assert any("per-step / floor" in line and "1.17x PASS" in line for line in lines)
    assert any("full refresh" in line and "0.56 s FAIL" in line for line in lines)


def test_staggered_figures_count_every_timed_step():
    """Under a staggered schedule every step refreshes something: the all-steps median and mean."""
    steps = [(1, 2.0, True), (2, 3.0, True), (3, 1.0, False), (4, 6.0, True)]
    res = Result("soap_dist", 0.0, steps, 0, 0)
    assert res.median == 1.0 and res.all_median == 2.5 and res.mean == 3.0 and res.worst == 6.0
    assert res.as_dict(k=2)["all_median_s"] == 2.5
