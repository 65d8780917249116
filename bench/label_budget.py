"""Issue 17, point 6: how many labels an ordering needs to reach random's full-budget accuracy.

Reads the `results.json` of `model.simulate` runs (one per scenario) and prints one Markdown
row per scenario: random's mean accuracy at the full budget, the first budget where the
ordering's mean accuracy reaches it (the simulator's `labels_to_reach_random_full_budget`),
that as a share of the budget, and a paired per-seed check at the 30 % point: the ordering's
accuracy there minus random's at the full budget in the same seed (mean, 95 % t interval),
and in how many seeds it is not below. The mean-curve figure alone moves by a grid step with
a few tenths of a point of noise; the paired figure says how sure it is.

Usage: python bench/label_budget.py [--ordering least_confidence] [--share 0.3] DIR ...
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model.simulate import _t95  # noqa: E402  (the simulator's own interval)


def budget_row(results: dict, ordering: str, share: float) -> dict:
    """The figures of one scenario's results for `ordering` against random."""
    aggregate = results["aggregate"]
    entry = aggregate[ordering]
    grid = entry["labels_used"]
    budget = grid[-1]
    target = aggregate["_random_full_budget_accuracy"]
    reach = entry.get("labels_to_reach_random_full_budget")
    point = budget * share
    # The last grid point at or below the allowed share of the budget.
    allowed = max((lx for lx in grid if lx <= point + 1e-9), default=None)
    runs_random, runs_ordering = results["runs"]["random"], results["runs"][ordering]
    seeds = sorted(set(runs_random) & set(runs_ordering), key=int)
    diffs = []
    for s in seeds:
        ours, theirs = runs_ordering[s], runs_random[s]
        if allowed is None or allowed not in ours["labels_used"]:
            continue
        diffs.append(100 * (ours["accuracy"][ours["labels_used"].index(allowed)] - theirs["accuracy"][-1]))
    diffs = np.asarray(diffs)
    n = len(diffs)
    half = float(_t95(n) * diffs.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return {
        "budget": budget,
        "random_full": target,
        "reach": reach,
        "reach_share": reach / budget if reach is not None else None,
        "met": reach is not None and reach <= point + 1e-9,
        "allowed": allowed,
        "ordering_at_allowed": entry["accuracy_mean"][grid.index(allowed)] if allowed in grid else None,
        "paired_mean": float(diffs.mean()) if n else float("nan"),
        "paired_ci": (float(diffs.mean()) - half, float(diffs.mean()) + half) if n else (math.nan, math.nan),
        "paired_seeds_reached": int((diffs >= 0).sum()),
        "seeds": n,
        "aulc_diff": entry.get("aulc_diff_vs_random_mean"),
        "aulc_ci": entry.get("aulc_diff_vs_random_ci95"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="simulator output directories (results.json)")
    parser.add_argument("--ordering", default="least_confidence")
    parser.add_argument("--share", type=float, default=0.3, help="allowed share of the budget (default 0.3)")
    args = parser.parse_args()
    print("| scenario | random@budget | labels to reach (share) | met | ordering@30 % | "
          "paired: ordering@30 % − random@budget [95% CI], seeds reached | ΔAULC vs random [95% CI] |")
    print("|---|---|---|---|---|---|---|")
    for d in args.dirs:
        row = budget_row(json.loads((d / "results.json").read_text()), args.ordering, args.share)
        reach = (f"{row['reach']} ({100 * row['reach_share']:.0f} %)" if row["reach"] is not None
                 else f"not within {row['budget']}")
        lo, hi = row["paired_ci"]
        alo, ahi = row["aulc_ci"]
        print(f"| {d.name} | {row['random_full']:.1f} @{row['budget']} | {reach} | "
              f"{'met' if row['met'] else 'missed'} | {row['ordering_at_allowed']:.1f} @{row['allowed']} | "
              f"{row['paired_mean']:+.2f} [{lo:+.2f}, {hi:+.2f}], {row['paired_seeds_reached']}/{row['seeds']} | "
              f"{row['aulc_diff']:+.2f} [{alo:+.2f}, {ahi:+.2f}] |")


if __name__ == "__main__":
    main()
