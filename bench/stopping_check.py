"""Does the stopping verdict fire near where the learning curve flattens? (issue 15, point 4)

Replays active learning as the simulator does (`model.simulate`: the service's encoder, its
cache, its head, an ordering of `model/orderings/`), on the simulator's built-in corpora,
and after every round computes what the retrain keeps per version (`model.stopping`: the
stop-set predictions and the kappa with the previous version). It reports, per seed, where
the *stabilizing predictions* verdict first fires for a few thresholds, against where the
held-out test accuracy flattens (first within 1 point of the best it reaches within the
budget), and the accuracy given up by stopping there.

    python -m bench.stopping_check --data builtin:airline --seeds 5 --out bench/results/stopping
    python -m bench.stopping_check --data builtin:airline --seed-data builtin:movies --initial 1000 ...

With `--seed-data` (the simulator's option) the initial labeled set is drawn from other data
and is free: the label counts are pool labels only, as in `model.simulate`.

Writes DIR/<name>.json (every round of every seed) and prints a table in Markdown.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from model import stopping
from model.orderings import OrderingInput, get_ordering
from model.simulate import SimulationConfig, build_table, encode_table, label_grid, load_source, plan_seed

THRESHOLDS = (0.95, 0.98, 0.99)
FLAT_WITHIN = 0.01  # "flattened": within 1 point of the best test accuracy of the run


def run_seed(features, y, labels, plan, config, ordering_name: str) -> list[dict]:
    from model.classifier import ClassifierHead, HeadConfig

    ordering = get_ordering(ordering_name)
    labeled = [int(i) for i in plan.initial]
    is_labeled = np.zeros(len(plan.pool), dtype=bool)
    is_labeled[labeled] = True
    pool_ids = [int(r) for r in plan.pool]  # text-table rows stand in for task ids
    rounds, signals, reference = [], None, None
    head = train_rows = probabilities = None  # of the previous round, which the ordering reads
    for round_number, target in enumerate(label_grid(config, plan)):
        if round_number:
            unlabeled = np.flatnonzero(~is_labeled)
            need = target - len(labeled)
            result = ordering.score(OrderingInput(
                features_labeled=features[train_rows], labels=y[train_rows],
                features_unlabeled=features[plan.pool[unlabeled]], classifier=head,
                batch_size=need, seed=plan.seed * 1000 + round_number,
                probabilities_unlabeled=probabilities[unlabeled]))
            top = list(dict.fromkeys(int(i) for i in np.asarray(result.top(need)).ravel()))[:need]
            for i in np.argsort(result.scores, kind="stable"):  # complete a short batch
                if len(top) == need:
                    break
                if int(i) not in top:
                    top.append(int(i))
            chosen = unlabeled[np.asarray(top, dtype=np.int64)]
            is_labeled[chosen] = True
            labeled.extend(int(i) for i in chosen)
        # A --seed-data set stays in the training set for free, as in model.simulate.
        train_rows = np.concatenate([plan.seed_rows, plan.pool[np.asarray(labeled, dtype=np.int64)]])
        head = ClassifierHead(HeadConfig(labels=list(labels), input_dim=features.shape[1], seed=plan.seed))
        head.fit(features[train_rows], y[train_rows])
        probabilities = head.predict_proba(features[plan.pool])
        predicted = probabilities.argmax(axis=1)
        test_accuracy = float((head.predict_proba(features[plan.test]).argmax(axis=1) == y[plan.test]).mean())
        started = time.perf_counter()
        now = stopping.stop_set_predictions(pool_ids, [labels[i] for i in predicted])
        point, reference = stopping.version_point(len(labeled), now, reference, probabilities[~is_labeled],
                                                  spacing=config.batch_size)
        signals = stopping.next_signals(signals, point)
        seconds = time.perf_counter() - started
        rounds.append({"labels": len(labeled), "test_accuracy": test_accuracy, "kappa": point["kappa"],
                       "uncertainty": point["uncertainty"], "predicted_incorrect": point["predicted_incorrect"],
                       "signals_seconds": round(seconds, 4)})
    history = signals["history"]
    for threshold in THRESHOLDS:
        fired = next((r["labels"] for i, r in enumerate(rounds)
                      if stopping.stopping_signals(history[: i + 1], threshold=threshold)["stabilised"]), None)
        rounds[-1][f"fired_{threshold}"] = fired
    return rounds


def summarise(name: str, runs: dict[int, list[dict]]) -> list[str]:
    lines = [f"### {name}", "",
             "| seed | flattens at | best acc | " + " | ".join(f"verdict at κ̄≥{t} (acc lost)" for t in THRESHOLDS)
             + " |", "|---|---|---|" + "---|" * len(THRESHOLDS)]
    for seed, rounds in runs.items():
        accuracy = [r["test_accuracy"] for r in rounds]
        best = max(accuracy)
        flat = next(r["labels"] for r in rounds if r["test_accuracy"] >= best - FLAT_WITHIN)
        cells = []
        for threshold in THRESHOLDS:
            fired = rounds[-1][f"fired_{threshold}"]
            if fired is None:
                cells.append("never")
                continue
            at = next(r for r in rounds if r["labels"] == fired)
            cells.append(f"{fired} ({100 * (best - at['test_accuracy']):.1f} pt)")
        lines.append(f"| {seed} | {flat} | {best:.3f} | " + " | ".join(cells) + " |")
    kappas = [r["kappa"] for rounds in runs.values() for r in rounds if r["kappa"] is not None]
    seconds = [r["signals_seconds"] for rounds in runs.values() for r in rounds]
    lines += ["", f"kappa between compared versions: median {np.median(kappas):.3f}, "
                  f"max {max(kappas):.3f}; signals computed in at most {max(seconds) * 1000:.0f} ms per version", ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="builtin:airline")
    parser.add_argument("--ordering", default="least_confidence")
    parser.add_argument("--seeds", default="5",
                        help="number of seeds (0..N-1), or a list like 3,4,5 (to add seeds to a run)")
    parser.add_argument("--pool-size", type=int, default=3000)
    parser.add_argument("--test-size", type=float, default=2000)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--budget", type=int, default=1000)
    parser.add_argument("--initial", type=int, default=50,
                        help="initial labeled set: random pool tasks, or examples of --seed-data (free)")
    parser.add_argument("--seed-data", default=None,
                        help="draw the initial labeled set from this data (e.g. builtin:movies)")
    parser.add_argument("--cache", default=None)
    parser.add_argument("--out", default="bench/results/stopping")
    args = parser.parse_args(argv)
    import sklearn.metrics  # noqa: F401  (imported once here, so the per-version timing is the work alone)

    from bench.run_record import Run

    out = Path(args.out)
    name = f"{args.data.replace('builtin:', '')}-{args.ordering}"
    if args.seed_data:
        name = f"{args.seed_data.replace('builtin:', '')}-to-{name}"
    # Commit, machine and load with every seed (refuses uncommitted code, as every benchmark).
    record = Run("stopping_check", argv, out=out / f"{name}-record.json")
    seeds = list(range(int(args.seeds))) if args.seeds.strip().isdigit() else \
        [int(v) for v in args.seeds.replace(",", " ").split()]
    config = SimulationConfig(data=args.data, orderings=[args.ordering], seeds=seeds,
                              initial=args.initial, batch_size=args.batch_size, budget=args.budget,
                              pool_size=args.pool_size, test_size=args.test_size, seed_data=args.seed_data,
                              **({"cache": args.cache} if args.cache else {}))
    seed_data = load_source(args.seed_data) if args.seed_data else None
    table = build_table(load_source(args.data), seed_data, None)
    plans = [plan_seed(table, config, seed) for seed in config.seeds]
    features, _, _ = encode_table(table, plans, config, all_layers=False)
    runs = {}
    for plan in plans:
        started = time.perf_counter()
        with record.measure(seed=plan.seed):
            runs[plan.seed] = run_seed(features, table.y, table.labels, plan, config, args.ordering)
        print(f"seed {plan.seed}: {len(runs[plan.seed])} rounds in {time.perf_counter() - started:.0f} s",
              file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    record.write()
    (out / f"{name}.json").write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))
    seeded = f", {args.initial} free labels of {args.seed_data} to start" if args.seed_data else ""
    print("\n".join(summarise(f"{args.data}{seeded}, {args.ordering}, pool {args.pool_size}, batches of "
                              f"{args.batch_size} to {args.budget} labels", runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
