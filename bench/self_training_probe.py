"""Does the single-choice head gain from the project's unlabeled tasks? (issue 17, points 1 and 6)

    .venv/bin/python bench/self_training_probe.py --data builtin:movies --seed-data builtin:airline \\
        --initial 1000 --seeds 6 --first-seed 100 --labels 0,50,100,150,200,300,500 \\
        --picks margin --out bench/results/self_training_probe/domain_shift_reverse

A pilot, not the head: on the labeled sets of `bench/head_c_probe.py` (`labeled_sets`: random
ones, or those an ordering's loop bought) the default head (logistic regression, classes
balanced, C and a sharpening temperature by out-of-fold log loss) is fitted and scored on the
test set; then each variant below refits a logistic regression at the C the head chose on the
labels plus the unlabeled pool tasks it is confident about, each pseudo-label counted with a
weight (self-training, Yarowsky 1995; for a pool from another domain than the labels, the
classic adaptation by self-labeling). The labels keep their balanced weights.

- "confident p": every unlabeled pool task whose top probability is at least p, weight 1.
- "soft a": every unlabeled pool task, weight a x its top probability.
- "top per class": per class, the unlabeled tasks the head is surest of for that class, as many
  as the labels of the commonest class (as many pseudo-labels of every class).
- "top by label share": as many pseudo-labels as labels, per class as many as it has labels
  (the pseudo-labels keep the labels' class mix).
- "top by pool estimate": as many pseudo-labels as labels, per class in proportion to the
  head's mean probability for it over the unlabeled tasks (the pool's class mix as the head
  sees it); "top by pool estimate f": f times as many; "..., pool f": f times the unlabeled
  tasks.
- each with "x2": the same step once more from the refitted model.

The table: per labeled-set size, each variant's test accuracy minus the head's, mean over the
seeds, and the head's own accuracy. The JSON keeps every set's numbers.
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
from model.classifier import ClassifierHead, HeadConfig, class_weights  # noqa: E402


def top_of_each(probabilities: np.ndarray, per_class) -> np.ndarray:
    """Per class c, the per_class[c] unlabeled tasks most probably of c; a task chosen for two
    classes counts once, for its most probable."""
    keep = np.concatenate([np.argsort(-probabilities[:, c])[:int(k)] for c, k in enumerate(per_class)])
    return np.unique(keep.astype(np.int64))


def pseudo_labels(probabilities: np.ndarray, rule: str, y: np.ndarray) -> tuple:
    """(the chosen unlabeled rows' positions, their pseudo-labels, their weights)."""
    top = probabilities.max(axis=1)
    guess = probabilities.argmax(axis=1)
    if rule.startswith("confident"):
        keep = np.flatnonzero(top >= float(rule.split()[1]))
        return keep, guess[keep], np.ones(len(keep))
    if rule.startswith("soft"):
        return np.arange(len(top)), guess, float(rule.split()[1]) * top
    n_classes = probabilities.shape[1]
    counts = np.bincount(y, minlength=n_classes)
    if rule == "top per class":
        per_class = np.full(n_classes, counts.max())
    elif rule == "top by label share":
        per_class = counts
    elif rule.startswith("top by pool estimate"):
        # As many as the labels, f times as many ("... f"), or f times the unlabeled tasks.
        factor = rule.removeprefix("top by pool estimate").removeprefix(", pool").strip()
        how_many = (len(probabilities) if ", pool" in rule else len(y)) * float(factor or 1)
        per_class = np.rint(how_many * probabilities.mean(axis=0))
    else:
        raise ValueError(rule)
    keep = top_of_each(probabilities, np.minimum(per_class, len(probabilities)))
    return keep, guess[keep], np.ones(len(keep))


RULES = ["confident 0.9", "soft 1", "top per class", "top by label share", "top by pool estimate",
         "top by pool estimate 0.5", "top by pool estimate 2", "top by pool estimate, pool 0.25"]


def refit(x, y, weights, pool_x, probabilities, rule: str, C: float, n_classes: int):
    from sklearn.linear_model import LogisticRegression

    keep, guess, w = pseudo_labels(probabilities, rule, y)
    features = np.vstack([x, pool_x[keep]])
    targets = np.r_[y, guess]
    sample = np.r_[weights, w]
    model = LogisticRegression(C=C, max_iter=1000, l1_ratio=0.0).fit(features, targets, sample_weight=sample)
    full = np.zeros((len(pool_x), n_classes))
    full[:, model.classes_] = model.predict_proba(pool_x)
    return model, full, len(keep)


def main(argv=None) -> int:
    parser = scenario_parser(__doc__.split("\n\n")[0])
    args = parser.parse_args(argv)
    sizes = [int(n) for n in args.labels.split(",")]
    record = Run("self_training_probe", argv=argv, out=args.out / "summary.json")
    from threadpoolctl import threadpool_limits

    variants = RULES + [f"{r} x2" for r in RULES]
    sets = []
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", UserWarning)
        for plan, n, rows, features, targets in labeled_sets(args, sizes):
            x, y = np.asarray(features[rows], dtype=np.float64), targets[rows]
            if len(np.unique(y)) < 2:  # a rare class not labeled yet: nothing to refit
                continue
            unlabeled = np.setdiff1d(plan.pool, rows)
            pool_x = np.asarray(features[unlabeled], dtype=np.float64)
            test_x, test_y = np.asarray(features[plan.test], dtype=np.float64), targets[plan.test]
            n_classes = int(targets.max()) + 1
            head = ClassifierHead(HeadConfig(labels=[str(i) for i in range(n_classes)], input_dim=x.shape[1],
                                             kind="linear", seed=plan.seed))
            head.fit(x.astype(np.float32), y)
            base = 100 * float(np.mean(head.predict(head.predict_proba(test_x.astype(np.float32))) == test_y))
            weights = class_weights(y, n_classes)[y]
            weights = weights * len(y) / weights.sum()
            start = head.predict_proba(pool_x.astype(np.float32))
            out = {}
            for rule in RULES:
                model, probabilities, used = refit(x, y, weights, pool_x, start, rule, head.C_, n_classes)
                out[rule] = (100 * float(np.mean(model.predict(test_x) == test_y)), used)
                model, _, used = refit(x, y, weights, pool_x, probabilities, rule, head.C_, n_classes)
                out[f"{rule} x2"] = (100 * float(np.mean(model.predict(test_x) == test_y)), used)
            sets.append({"seed": plan.seed, "n": n, "labels": len(rows), "head": base, "C": head.C_,
                         "variants": out})
    present = [n for n in sizes if any(s["n"] == n for s in sets)]
    rows_out = []
    for name in variants:
        row = {"variant": name}
        for n in present:
            at = [s for s in sets if s["n"] == n]
            gain = [s["variants"][name][0] - s["head"] for s in at]
            ahead = sum(g > 0 for g in gain)
            row[f"@{n}"] = f"{np.mean(gain):+.2f} ({ahead}/{len(at)})"
        rows_out.append(row)
    rows_out.append({"variant": "head's accuracy",
                     **{f"@{n}": f"{np.mean([s['head'] for s in sets if s['n'] == n]):.2f}" for n in present}})
    record["rows"] = rows_out
    record["sets"] = json.loads(json.dumps(sets, default=float))
    record.write()
    print("accuracy minus the head's, mean over seeds (sets where the variant is ahead / sets)")
    print(table(rows_out, columns=list(rows_out[0])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
