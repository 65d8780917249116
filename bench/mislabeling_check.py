"""Can a reviewer trust the `mislabeling` flag? Precision and recall on labels flipped on purpose
(issue 17, point 5).

For each data set and seed: a few hundred labeled texts drawn at random (the simulator's
loading, split and encoding cache: `model.simulate`), a share of their labels flipped to
another class at random (0 %, 5 %, 10 %), the service's head (`RETRAIN_HEAD_KIND`, its
default settings, or `--head` for another kind or `--c-objective` for another C rule)
fitted on them and its one out-of-fold pass over them (`ControlHeads.out_of_fold` with the
retrain's folds, as `model.heads.train_heads` runs it), and then three rules on the same
out-of-fold probabilities:

* **old**: the rule before confident learning: flag where the out-of-fold argmax differs
  from the given label;
* **head CL**: confident learning on the head's probabilities alone
  (`model.mislabeling.single_choice` without neighbours: per-class thresholds, a minimum of
  answers per class, the other class preferred outright);
* **new**: the backend's rule, the same and the nearest labeled neighbours' vote flagging
  the same class (`single_choice` with the encoder vectors);
* **cleanlab**: cleanlab's own `find_label_issues(filter_by="confident_learning")`, the
  paper's confident-joint off-diagonals as its authors implement them, as a cross-check.

Precision = flipped among flagged, recall = flagged among flipped. The data sets' own
labels are not perfectly clean, so a flag on an unflipped label is not always wrong; at 0 %
the table shows how many labels each rule flags.

    .venv/bin/python bench/mislabeling_check.py --data builtin:airline builtin:airline3 --labels 300 --seeds 5

Writes bench/results/mislabeling_check.json (every seed, with the commit, machine and load:
`run_record.Run`) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np  # noqa: E402
from run_record import REPO, Run  # also puts the repository on sys.path

from model import mislabeling  # noqa: E402
from model.simulate import SimulationConfig, build_table, encode_table, load_source, plan_seed  # noqa: E402

RATES = (0.0, 0.05, 0.10)
RULES = ("old", "head_cl", "cleanlab", "new")


def flip(y: np.ndarray, rate: float, classes: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """(labels with round(rate * n) of them changed to another class at random, which ones)."""
    noisy = y.copy()
    flipped = np.zeros(len(y), dtype=bool)
    rows = rng.choice(len(y), size=int(round(rate * len(y))), replace=False)
    for i in rows:
        noisy[i] = rng.choice([c for c in range(classes) if c != y[i]])
    flipped[rows] = True
    return noisy, flipped


def old_rule(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The flag before confident learning: the out-of-fold argmax is another class."""
    return p.argmax(axis=1) != y


def cleanlab_rule(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    from cleanlab.filter import find_label_issues

    return find_label_issues(y, p, filter_by="confident_learning")


def score(flags: np.ndarray, flipped: np.ndarray) -> dict:
    hits = int((flags & flipped).sum())
    return {"flagged": int(flags.sum()), "hits": hits, "flipped": int(flipped.sum())}


def run(record: Run, data: str, labels: int, seeds: int, folds: int, cache: str | None,
        head: dict | None = None) -> list[dict]:
    from model.classifier import RETRAIN_HEAD_KIND, ClassifierHead, HeadConfig
    from model.heads import ControlHeads

    config = SimulationConfig(data=data, orderings=[], seeds=list(range(seeds)), pool_size=labels,
                              test_size=0.25, **({"cache": cache} if cache else {}))
    table = build_table(load_source(data), None, None)
    plans = [plan_seed(table, config, seed) for seed in config.seeds]
    features, _, _ = encode_table(table, plans, config, all_layers=False)
    rows = []
    for plan in plans:
        x, truth = features[plan.pool], table.y[plan.pool]
        for rate in RATES:
            rng = np.random.default_rng([plan.seed, int(rate * 1000), 17])
            y, flipped = flip(truth, rate, len(table.labels), rng)
            settings = {"kind": RETRAIN_HEAD_KIND, **(head or {})}
            heads = ControlHeads.single(ClassifierHead(HeadConfig(labels=list(table.labels),
                                                                  input_dim=x.shape[1], seed=plan.seed, **settings)))
            with record.measure(data=data, seed=plan.seed, rate=rate, labels=len(y)) as row:
                heads.fit([x], [y])  # the retrain's order: fit, then its fold copies
                p = heads.out_of_fold([x], [y], folds=folds, seed=plan.seed).probabilities[0]
            row.update(oof_accuracy_vs_given=float((p.argmax(axis=1) == y).mean()),
                       old=score(old_rule(p, y), flipped),
                       head_cl=score(mislabeling.single_choice(p, y) > 0, flipped),
                       new=score(mislabeling.single_choice(p, y, x) > 0, flipped),
                       cleanlab=score(cleanlab_rule(p, y), flipped))
            rows.append(row)
            print(f"{data} seed {plan.seed} rate {rate:.2f}: " + ", ".join(
                f"{k} {rows[-1][k]['hits']}/{rows[-1][k]['flagged']}" for k in RULES)
                + f" of {rows[-1]['old']['flipped']} flipped", file=sys.stderr)
    return rows


def summarise(rows: list[dict]) -> list[str]:
    """One line per data set, label count and flip rate: each rule's flags, precision and
    recall pooled over seeds (and the range of the per-seed values)."""
    lines = ["| data | labels | flipped | seeds | rule | flagged per seed | precision | recall |",
             "|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["data"], r["labels"], r["rate"]) for r in rows})
    for data, n, rate in keys:
        group = [r for r in rows if (r["data"], r["labels"], r["rate"]) == (data, n, rate)]
        for rule in RULES:
            flagged = [r[rule]["flagged"] for r in group]
            hits = sum(r[rule]["hits"] for r in group)
            flips = sum(r[rule]["flipped"] for r in group)
            per_seed_p = [r[rule]["hits"] / r[rule]["flagged"] for r in group if r[rule]["flagged"]]
            per_seed_r = [r[rule]["hits"] / r[rule]["flipped"] for r in group if r[rule]["flipped"]]
            precision = (f"{hits / sum(flagged):.2f} ({min(per_seed_p):.2f}–{max(per_seed_p):.2f})"
                         if flips and sum(flagged) else "–")
            recall = f"{hits / flips:.2f} ({min(per_seed_r):.2f}–{max(per_seed_r):.2f})" if flips else "–"
            lines.append(f"| {data.replace('builtin:', '')} | {n} | {100 * rate:.0f} % | {len(group)} | {rule} | "
                         f"{np.mean(flagged):.1f} ({min(flagged)}–{max(flagged)}) | {precision} | {recall} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    from model.queue_scores import MISLABELING_FOLDS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", nargs="+", default=["builtin:airline", "builtin:airline3"])
    parser.add_argument("--labels", type=int, nargs="+", default=[300], help="labeled texts per seed")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--folds", type=int, default=MISLABELING_FOLDS,
                        help="folds of the out-of-fold pass (the retrain's default)")
    parser.add_argument("--cache", default=None, help="encoding cache (default: the simulator's)")
    parser.add_argument("--head", default=None, help="head kind (default: the retrain's, RETRAIN_HEAD_KIND)")
    parser.add_argument("--c-objective", default=None, help="the linear head's C rule (default: HeadConfig's)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "mislabeling_check.json")
    args = parser.parse_args(argv)
    record = Run("mislabeling_check", argv=argv, out=args.out)
    head = {**({"kind": args.head} if args.head else {}),
            **({"c_objective": args.c_objective} if args.c_objective else {})}
    record["settings"] = {"data": args.data, "labels": args.labels, "seeds": args.seeds, "head": head,
                          "folds": args.folds, "rates": RATES, "min_class_labels": mislabeling.MIN_CLASS_LABELS}
    rows = [row for data in args.data for n in args.labels
            for row in run(record, data, n, args.seeds, args.folds, args.cache, head)]
    table = summarise(rows)
    record["table"] = table
    print("\n".join(table))
    record.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
