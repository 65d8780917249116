"""Could the single-choice head choose its class weighting on evidence? (issue 17, point 1)

    .venv/bin/python bench/weighting_probe.py --data builtin:movies --seed-data builtin:airline \\
        --initial 1000 --seeds 6 --first-seed 100 --labels 0,50,100,150,200,250,300,400,500 \\
        --picks margin --out bench/results/weighting_probe/domain_shift_reverse

The default head weights classes "balanced"; the unweighted logistic regression is ahead of
it after the reverse domain shift and with a rare class (BENCHMARKS.md, "C and a sharpening
temperature"), behind it elsewhere. On the labeled sets of `bench/head_c_probe.py`
(`labeled_sets`: random ones, or those an ordering's loop bought), both weightings get the
default's search (C and a sharpening temperature by out-of-fold log loss, the head's own
folds) and are scored on the test set. Each rule below then takes one of the two per
labeled set, from what a retrain could know: the labels, their out-of-fold losses at each
weighting's chosen pair and the project's unlabeled tasks.

- "unweighted": always; "auto": the lower mean out-of-fold log loss (`class_weight="auto"`).
- "pool-weighted auto": the lower mean with each label counted by its importance weight
  (`model.classifier.pool_importance`: how like the unlabeled tasks it is).
- "pool-weighted, z": unweighted only when that weighted mean of the per-label differences
  (unweighted minus balanced) is below zero by more than z standard errors of a weighted
  mean: evidence beyond noise from the labels that look like the tasks still to predict.
- "better in hindsight": the one with the higher test accuracy (no rule can do better).

With `--per-source` (the shift scenarios), two weightings no retrain could apply, as an upper
bound of what knowing where each label came from would buy: the simulator knows which labels
are the free ones of the other domain (`plan.seed_rows`). "per source": classes balanced
within the free labels and, apart, within the pool's; "free labels balanced": classes
balanced within the free labels, the pool's unweighted (sample weights, the default search).

The table: per labeled-set size, each rule's test accuracy minus balanced's, mean over the
seeds; the last row the effective number of labels the importance weights leave,
(sum w)^2 / sum w^2. The JSON keeps every set's numbers.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.head_c_probe import labeled_sets, scenario_parser  # noqa: E402
from bench.run_record import Run, table  # noqa: E402
from model.classifier import (  # noqa: E402
    ACCURACY_C_GRID,
    C_FOLDS,
    SHARPENING,
    _c_and_temperature_by_log_loss,
    pool_importance,
)

WEIGHTINGS = {"balanced": "balanced", "unweighted": None}


def weighting_scores(x, y, test_x, test_y, seed: int = 0) -> dict:
    """Per weighting: (test accuracy, per-label out-of-fold losses) at the pair the default
    search chooses, on the folds `_logistic_regression` uses."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    folds = StratifiedKFold(min(C_FOLDS, int(np.bincount(y)[np.unique(y)].min())), shuffle=True,
                            random_state=seed)
    out = {}
    for name, class_weight in WEIGHTINGS.items():
        C, _, _, each = _c_and_temperature_by_log_loss(x, y, class_weight, folds, ACCURACY_C_GRID,
                                                       temperatures=SHARPENING, per_label=True)
        model = LogisticRegression(C=C, class_weight=class_weight, max_iter=1000, l1_ratio=0.0).fit(x, y)
        out[name] = (100 * float(np.mean(model.predict(test_x) == test_y)), each, C)
    return out


def balanced_within(y: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Sample weights that balance the classes within each group, as `class_weight="balanced"`
    does for the whole set: n_group / (classes in the group x the class's count in it)."""
    weights = np.ones(len(y))
    for group in np.unique(groups):
        member = groups == group
        classes, counts = np.unique(y[member], return_counts=True)
        for c, count in zip(classes, counts):
            weights[member & (y == c)] = member.sum() / (len(classes) * count)
    return weights


def source_scores(x, y, test_x, test_y, free: int, seed: int = 0) -> dict:
    """Test accuracy of the two source-aware weightings (`--per-source`); the first `free`
    rows of `x` are the other domain's free labels."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    folds = StratifiedKFold(min(C_FOLDS, int(np.bincount(y)[np.unique(y)].min())), shuffle=True,
                            random_state=seed)
    groups = (np.arange(len(y)) >= free).astype(int)
    within = balanced_within(y, groups)
    out = {}
    for name, weights in (("per source", within), ("free labels balanced", np.where(groups == 0, within, 1.0))):
        C, _, _ = _c_and_temperature_by_log_loss(x, y, None, folds, ACCURACY_C_GRID, temperatures=SHARPENING,
                                                 fit_weights=weights)
        model = LogisticRegression(C=C, max_iter=1000, l1_ratio=0.0).fit(x, y, sample_weight=weights)
        out[name] = 100 * float(np.mean(model.predict(test_x) == test_y))
    return out


def weighted_difference(d: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """(weighted mean, its standard error) of per-label differences `d` under weights `w`."""
    mean = float(np.average(d, weights=w))
    return mean, float(np.sqrt(np.sum(w**2 * (d - mean) ** 2)) / w.sum())


def main(argv=None) -> int:
    parser = scenario_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--z", default="1,2,3", help="the evidence rule's standard errors, comma-separated")
    parser.add_argument("--per-source", action="store_true",
                        help="also the two weightings that know which labels are the free ones (shift scenarios)")
    args = parser.parse_args(argv)
    sizes = [int(n) for n in args.labels.split(",")]
    zs = [float(z) for z in args.z.split(",")]
    rules = ["unweighted", "auto", "pool-weighted auto"] + [f"pool-weighted, {z:g}" for z in zs]
    record = Run("weighting_probe", argv=argv, out=args.out / "summary.json")
    from threadpoolctl import threadpool_limits

    sets = []
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", UserWarning)
        for plan, n, rows, features, targets in labeled_sets(args, sizes):
            x, y = np.asarray(features[rows], dtype=np.float64), targets[rows]
            unlabeled = np.setdiff1d(plan.pool, rows)
            w = pool_importance(x, np.asarray(features[unlabeled], dtype=np.float64), seed=0)
            scores = weighting_scores(x, y, np.asarray(features[plan.test], dtype=np.float64),
                                      targets[plan.test])
            (bal, bal_each, bal_C), (unw, unw_each, unw_C) = scores["balanced"], scores["unweighted"]
            kept = ~(np.isnan(bal_each) | np.isnan(unw_each))
            d, wk = unw_each[kept] - bal_each[kept], w[kept]
            mean, se = weighted_difference(d, wk)
            takes_unweighted = {"unweighted": True, "auto": bool(np.mean(d) < 0), "pool-weighted auto": mean < 0,
                                **{f"pool-weighted, {z:g}": mean + z * se < 0 for z in zs}}
            if args.per_source:
                sources = source_scores(x, y, np.asarray(features[plan.test], dtype=np.float64),
                                        targets[plan.test], free=len(plan.seed_rows))
            else:
                sources = {}
            sets.append({"seed": plan.seed, "n": n, "labels": len(rows), "balanced": bal, "unweighted": unw,
                         "sources": sources,
                         "C": {"balanced": bal_C, "unweighted": unw_C}, "mean_difference": float(np.mean(d)),
                         "weighted_difference": mean, "weighted_se": se,
                         "effective_labels": float(w.sum() ** 2 / np.sum(w**2)), "takes_unweighted": takes_unweighted})
    rows_out = []
    for rule in rules + ["better in hindsight"]:
        row = {"rule": rule}
        for n in sizes:
            at = [s for s in sets if s["n"] == n]
            if not at:
                continue
            if rule == "better in hindsight":
                gain = [max(s["unweighted"] - s["balanced"], 0.0) for s in at]
            else:
                gain = [s["unweighted"] - s["balanced"] if s["takes_unweighted"][rule] else 0.0 for s in at]
            taken = sum(s["takes_unweighted"][rule] for s in at) if rule in rules else None
            row[f"@{n}"] = f"{np.mean(gain):+.2f}" + (f" ({taken}/{len(at)})" if taken is not None else "")
        rows_out.append(row)
    present = [n for n in sizes if any(s["n"] == n for s in sets)]

    def mean_of(key: str, n: int) -> float:
        return float(np.mean([s[key] for s in sets if s["n"] == n]))

    for name in ("per source", "free labels balanced") if args.per_source else ():
        gains = {n: [s["sources"][name] - s["balanced"] for s in sets if s["n"] == n] for n in present}
        rows_out.append({"rule": f"{name} (knows the free labels)",
                         **{f"@{n}": f"{np.mean(gains[n]):+.2f}" for n in present}})
    rows_out.append({"rule": "balanced's accuracy", **{f"@{n}": f"{mean_of('balanced', n):.2f}" for n in present}})
    rows_out.append({"rule": "effective labels (weights)",
                     **{f"@{n}": f"{mean_of('effective_labels', n):.0f}" for n in present}})
    record["rows"] = rows_out
    record["sets"] = json.loads(json.dumps(sets, default=float))
    record.write()
    print("accuracy minus balanced's, mean over seeds (sets that took unweighted / sets)")
    print(table(rows_out, columns=list(rows_out[0])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
