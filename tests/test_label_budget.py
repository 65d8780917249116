"""bench/label_budget.py: the issue 17 point 6 figures from a simulator results dict."""

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("label_budget", REPO / "bench" / "label_budget.py")
label_budget = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(label_budget)


def _results(random_curves, ordering_curves, grid=(50, 100, 150, 200)):
    """A minimal results.json: per-seed curves (fractions) and the simulator's aggregate."""
    def mean(curves):
        return [100 * sum(c[i] for c in curves) / len(curves) for i in range(len(grid))]

    random_mean, ordering_mean = mean(random_curves), mean(ordering_curves)
    target = random_mean[-1]
    reach = next((lx for lx, a in zip(grid, ordering_mean) if a >= target), None)
    runs = {name: {str(s): {"labels_used": list(grid), "accuracy": list(c)} for s, c in enumerate(curves)}
            for name, curves in (("random", random_curves), ("least_confidence", ordering_curves))}
    return {
        "runs": runs,
        "aggregate": {
            "_random_full_budget_accuracy": target,
            "random": {"labels_used": list(grid), "accuracy_mean": random_mean},
            "least_confidence": {"labels_used": list(grid), "accuracy_mean": ordering_mean,
                                 "labels_to_reach_random_full_budget": reach,
                                 "aulc_diff_vs_random_mean": 1.0, "aulc_diff_vs_random_ci95": [0.5, 1.5]},
        },
    }


def test_met_when_the_ordering_reaches_random_full_budget_by_the_share():
    # Budget 200, 30 % = 60: the last grid point allowed is 50; the ordering is there at 0.80 in
    # both seeds against random's 0.79 / 0.81 at 200.
    results = _results([[0.70, 0.74, 0.77, 0.79], [0.70, 0.75, 0.78, 0.81]],
                       [[0.80, 0.80, 0.82, 0.83], [0.80, 0.81, 0.83, 0.84]])
    row = label_budget.budget_row(results, "least_confidence", 0.3)
    assert row["reach"] == 50 and row["met"] and row["allowed"] == 50
    assert row["paired_mean"] == pytest.approx(0.0)  # +1 and -1 point
    assert row["paired_seeds_reached"] == 1 and row["seeds"] == 2


def test_missed_when_the_reach_is_beyond_the_share():
    results = _results([[0.60, 0.70, 0.75, 0.80], [0.60, 0.70, 0.75, 0.80]],
                       [[0.60, 0.72, 0.80, 0.85], [0.60, 0.74, 0.82, 0.86]], grid=(50, 100, 150, 500))
    row = label_budget.budget_row(results, "least_confidence", 0.3)
    # 30 % of 500 = 150: the ordering's mean there is 81, above random's 80 at 500.
    assert row["reach"] == 150 and row["met"]
    row = label_budget.budget_row(results, "least_confidence", 0.2)
    assert row["allowed"] == 100 and not row["met"]
    assert row["paired_mean"] == pytest.approx(-7.0)
    lo, hi = row["paired_ci"]
    assert lo < -7.0 < hi
