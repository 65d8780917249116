"""Which out-of-fold rule picks the single-choice linear head's C best? (issue 17, point 1)

    .venv/bin/python bench/head_c_probe.py --data builtin:airline3 --pool-size 3000 --test-size 2000 \\
        --seeds 10 --labels 50,100,200,500 --out bench/results/head_c_probe/in_domain_three_class

On the simulator's paired plans (same pool and test set per seed as `bench/simulate_scenarios.sh`),
a random labeled set of each size is drawn from the pool (the seed rows of a domain-shift
scenario come with it, free). For every C of `model.classifier.ACCURACY_C_GRID` a balanced
logistic regression is fitted on it and scored on the test set, and on the head's own folds
(stratified, 5 or as many as the rarest class has labels) it gets the out-of-fold scores
each rule reads: the mean log loss (`c_objective="log_loss"`, grid from 0.1), the same on
the grid from 0.01, the log loss at the best temperature (`"scaled_log_loss"`; and from
0.1), the best temperature of at least 1 only (`"sharpened_log_loss"`: it may sharpen a
strong penalty's underconfident probabilities, never soften a weak one's) and the accuracy
(`"accuracy"`, log loss breaking ties). The table: per labeled-set size, each rule's test
accuracy at the C it picks, minus the best C's in hindsight (the oracle), mean over seeds,
and the median C it picks. Random labeled sets by default; `--picks ORDERING` takes
instead the labeled sets that ordering's loop bought with the retrain's head
(`model.simulate.run_ordering`, the same plans): the rules on the boundary-heavy sets the
loop trains on, which is where they were seen to differ (BENCHMARKS.md, "C and a
temperature chosen together").

Two rules are not one C but a blend of two: "blend" averages the logits of the log-loss
pick (as it is) and the scaled pick (at its temperature), "blend prob" their
probabilities.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.run_record import Run, table  # noqa: E402
from model import simulate  # noqa: E402
from model.classifier import ACCURACY_C_GRID, C_FOLDS, C_GRID, SHARPENING, TEMPERATURES  # noqa: E402

RULES = ("log_loss", "log_loss from 0.01", "scaled_log_loss", "scaled from 0.1", "sharpened_log_loss", "accuracy")
BLENDS = ("blend", "blend prob")


def out_of_fold_scores(x, y, seed):
    """Per C of ACCURACY_C_GRID: (mean log loss, best-temperature log loss, accuracy, that
    temperature, the best log loss and temperature among the temperatures of at least 1)."""
    from scipy.special import logsumexp
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    classes = np.unique(y)
    truth = np.searchsorted(classes, y)
    counts = np.bincount(truth)
    folds = StratifiedKFold(min(C_FOLDS, int(counts.min())), shuffle=True, random_state=seed)
    scores = []
    log_p = np.zeros((len(ACCURACY_C_GRID), len(y), len(classes)))
    for train, test in folds.split(x, y):
        seen = np.searchsorted(classes, np.unique(y[train]))
        for i, C in enumerate(ACCURACY_C_GRID):
            p = np.zeros((len(test), len(classes)))
            p[:, seen] = LogisticRegression(C=C, class_weight="balanced", max_iter=1000).fit(
                x[train], y[train]).predict_proba(x[test])
            log_p[i, test] = np.log(np.clip(p, 1e-12, 1.0))
    rows = np.arange(len(y))
    for i in range(len(ACCURACY_C_GRID)):
        right = log_p[i][rows, truth]
        raw = float(-right.mean())
        losses = [(float(np.mean(logsumexp(t * log_p[i], axis=1) - t * right)), t) for t in TEMPERATURES]
        scaled, temperature = min(losses)
        sharpened, sharpening = min((loss, t) for loss, t in losses if t in SHARPENING)
        accuracy = float(np.mean(log_p[i].argmax(axis=1) == truth))
        scores.append((raw, scaled, accuracy, temperature, sharpened, sharpening))
    return scores


def pick(rule: str, scores) -> int:
    grid = list(ACCURACY_C_GRID)
    if rule == "log_loss":
        allowed = [i for i, C in enumerate(grid) if C in C_GRID]
        return min(allowed, key=lambda i: scores[i][0])
    if rule == "log_loss from 0.01":
        return min(range(len(grid)), key=lambda i: scores[i][0])
    if rule == "scaled_log_loss":
        return min(range(len(grid)), key=lambda i: scores[i][1])
    if rule == "sharpened_log_loss":  # scaled, but only by temperatures of at least 1
        return min(range(len(grid)), key=lambda i: scores[i][4])
    if rule == "scaled from 0.1":
        allowed = [i for i, C in enumerate(grid) if C in C_GRID]
        return min(allowed, key=lambda i: scores[i][1])
    return max(range(len(grid)), key=lambda i: (scores[i][2], -scores[i][0]))


def scenario_parser(description: str) -> argparse.ArgumentParser:
    """The options that name a scenario (as `bench/scenarios.sh` gives them to the simulator),
    the labeled-set sizes and where they come from; shared with `bench/weighting_probe.py`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data", required=True)
    parser.add_argument("--seed-data", default=None)
    parser.add_argument("--test", default=None)
    parser.add_argument("--rare-class", default=None)
    parser.add_argument("--pool-size", type=int, default=3000)
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--initial", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--labels", default="50,100,200,500")
    parser.add_argument("--picks", default=None,
                        help="an ordering: its loop's labeled sets (at the --labels sizes) instead of random ones")
    parser.add_argument("--budget", type=int, default=None, help="the loop's budget (default: the largest size)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--out", type=Path, required=True)
    return parser


def labeled_sets(args, sizes: list[int]):
    """Per seed plan and size n: (plan, n, the labeled rows, all features, the targets).
    The rows are the plan's free seed rows plus the first n pool tasks of a random order of
    the pool, or with `args.picks` of what that ordering's loop bought (the initial random
    labels first). Sets where a class has a single label are skipped (no stratified folds)."""
    config = simulate.SimulationConfig(
        data=args.data, orderings=[], seeds=list(range(args.first_seed, args.first_seed + args.seeds)),
        initial=args.initial, batch_size=args.batch_size, budget=args.budget or max(sizes),
        pool_size=args.pool_size, test_size=args.test_size, seed_data=args.seed_data, test=args.test,
        rare_class=args.rare_class)
    table_ = simulate.table_from_config(config)
    if len(table_.specs) != 1 or table_.specs[0].multi_label:
        raise SystemExit("one single-choice control only")
    plans = [simulate.plan_seed(table_, config, s) for s in config.seeds]
    features, _, _ = simulate.encode_table(table_, plans, config, all_layers=False)
    targets = np.asarray(table_.targets[0])
    if args.picks:
        simulate._set_context(features, None, table_.targets, table_.specs, threads=1)
    for plan in plans:
        if args.picks:
            loop = simulate.run_ordering(plan, args.picks, config)
            taken_in_order = np.r_[plan.pool[plan.initial], np.asarray(loop["picked"], dtype=np.int64)]
        else:
            taken_in_order = plan.pool[np.random.default_rng(1000 + plan.seed).permutation(len(plan.pool))]
        for n in sizes:
            rows = np.concatenate([plan.seed_rows, taken_in_order[:n]]).astype(np.int64)
            if len(rows) == 0 or np.bincount(targets[rows])[np.unique(targets[rows])].min() < 2:
                continue
            yield plan, n, rows, features, targets
        print(f"seed {plan.seed} done", flush=True)


def main(argv=None) -> int:
    args = scenario_parser(__doc__.split("\n\n")[0]).parse_args(argv)
    sizes = [int(n) for n in args.labels.split(",")]
    record = Run("head_c_probe", argv=argv, out=args.out / "summary.json")
    from scipy.special import softmax
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    results = {rule: {n: [] for n in sizes} for rule in RULES + BLENDS}
    chosen = {rule: {n: [] for n in sizes} for rule in RULES + BLENDS}
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", UserWarning)
        for plan, n, rows, features, targets in labeled_sets(args, sizes):
            test_x = np.asarray(features[plan.test], dtype=np.float64)
            x, y = np.asarray(features[rows], dtype=np.float64), targets[rows]
            scores = out_of_fold_scores(x, y, plan.seed)
            models = [LogisticRegression(C=C, class_weight="balanced", max_iter=1000).fit(x, y)
                      for C in ACCURACY_C_GRID]
            truth = np.searchsorted(models[0].classes_, targets[plan.test])
            logits = [np.atleast_2d(m.decision_function(test_x)) for m in models]
            logits = [np.c_[-z.T / 2, z.T / 2] if z.shape[0] == 1 else z for z in logits]
            accuracy = [float(np.mean(z.argmax(axis=1) == truth)) for z in logits]
            for rule in RULES:
                i = pick(rule, scores)
                results[rule][n].append(100 * (accuracy[i] - max(accuracy)))
                chosen[rule][n].append(ACCURACY_C_GRID[i])
            i, j = pick("log_loss", scores), pick("scaled_log_loss", scores)  # the blends' two
            zi, zj = logits[i], scores[j][3] * logits[j]
            for rule, z in (("blend", zi + zj), ("blend prob", softmax(zi, axis=1) + softmax(zj, axis=1))):
                results[rule][n].append(100 * (float(np.mean(z.argmax(axis=1) == truth)) - max(accuracy)))
                chosen[rule][n].append(float(np.sqrt(ACCURACY_C_GRID[i] * ACCURACY_C_GRID[j])))
            results.setdefault("oracle C", {m: [] for m in sizes})[n].append(
                ACCURACY_C_GRID[int(np.argmax(accuracy))])
    rows_out = []
    for rule in RULES + BLENDS:
        row = {"rule": rule}
        for n in sizes:
            values = np.asarray(results[rule][n])
            row[f"@{n} vs oracle"] = f"{values.mean():+.2f} (C {np.median(chosen[rule][n]):g})" if len(values) else "—"
        rows_out.append(row)
    rows_out.append({"rule": "oracle C (median)",
                     **{f"@{n} vs oracle": f"C {np.median(results['oracle C'][n]):g}" for n in sizes}})
    record["rows"] = rows_out
    record["raw"] = json.loads(json.dumps({"loss_vs_oracle": results, "chosen_C": chosen}, default=float))
    record.write()
    print(table(rows_out, columns=list(rows_out[0])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
