"""Cold start against random: what the first 50 and 100 labels are worth (issue 15, point 3).

Before the first annotation the backend can order the queue only from the tasks' encodings
and the choice names (`model/cold_start.py`). This replays the simulator's scenarios
(`bench/simulate_scenarios.sh`: pools of 3,000 airline tweets, test sets of 2,000, drawn
per seed by `model.simulate.plan_seed`) and, per paired seed, labels the first 50 and 100
tasks of each cold-start order:

* `random`: the pool in random order (what id order amounts to for a shuffled import);
* `kmeans`: `representative_order`, the central task of each k-means cluster in turn;
* `zero_shot`: `zero_shot_order`, round-robin over the zero-shot guess, surest first;
* `zero_shot_kmeans`: the k-means order with the clusters' turns interleaved by the guess;
* in `domain_shift` also `model`: what the service does there, because a project whose 1,000
  movie labels are annotations already has a model: least confidence of the head trained on
  them, in two batches of 50 (retrained in between), as the simulator's first two rounds.

For each it reports the classes seen, and the test accuracy and macro-F1 of the service's
head (`ClassifierHead`, `HeadConfig` defaults, seeded by the seed) trained on those labels
(plus the free movie labels in `domain_shift`), each variant's paired difference from random
with a 95% interval, and the zero-shot guess's own test accuracy (what pre-filling shows):
with the name vectors the service uses (the mean over `cold_start.TEMPLATES`) and with each
template alone.

    .venv/bin/python bench/cold_start.py --seeds 20                      # all three scenarios
    .venv/bin/python bench/cold_start.py --scenarios in_domain_three_class --seeds 5 --clusters 100

Prints Markdown tables; writes bench/results/cold_start.json (every seed's numbers, with the
commit, machine and load of each scenario, `bench/run_record.py`).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python bench/cold_start.py` from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench.run_record import RESULTS, Run
from model import cold_start
from model.simulate import SimulationConfig, build_table, encode_table, load_source, plan_seed

SCENARIOS = {
    "in_domain_binary": {"data": "builtin:airline"},
    "in_domain_three_class": {"data": "builtin:airline3"},
    "domain_shift": {"data": "builtin:airline", "seed_data": "builtin:movies", "initial": 1000},
}
VARIANTS = ("random", "kmeans", "zero_shot", "zero_shot_kmeans")
BUDGETS = (50, 100)


def _head(labels, dim: int, seed: int):
    from model.classifier import ClassifierHead, HeadConfig

    return ClassifierHead(HeadConfig(labels=list(labels), input_dim=dim, seed=seed))


def _scores(head, features, y, labels) -> tuple[float, float]:
    from sklearn.metrics import f1_score

    predicted = head.predict_proba(features).argmax(axis=1)
    return (float((predicted == y).mean()),
            float(f1_score(y, predicted, average="macro", labels=np.arange(len(labels)), zero_division=0)))


def _model_order(features, y, labels, plan, budget: int, batch: int = 50) -> np.ndarray:
    """Least confidence of the head on the free labels, retrained after each batch."""
    picked: list[int] = []
    while len(picked) < budget:
        rows = np.concatenate([plan.seed_rows, plan.pool[np.asarray(picked, dtype=np.int64)]])
        head = _head(labels, features.shape[1], plan.seed).fit(features[rows], y[rows])
        confidence = head.predict_proba(features[plan.pool]).max(axis=1)
        confidence[picked] = np.inf
        picked += [int(i) for i in np.argsort(confidence, kind="stable")[:min(batch, budget - len(picked))]]
    return np.asarray(picked, dtype=np.int64)


def run_scenario(name: str, seeds: list[int], clusters: int, cache: str | None) -> dict:
    from model.encoder import Encoder, encoder_id
    from model.encoding_cache import EncodingCache, encode_with_cache

    spec = SCENARIOS[name]
    config = SimulationConfig(data=spec["data"], orderings=["random"], seeds=seeds,
                              initial=spec.get("initial", 50), pool_size=3000, test_size=2000,
                              seed_data=spec.get("seed_data"), **({"cache": cache} if cache else {}))
    seed_data = load_source(config.seed_data) if config.seed_data else None
    table = build_table(load_source(config.data), seed_data, None)
    plans = [plan_seed(table, config, s) for s in seeds]
    features, _, _ = encode_table(table, plans, config, all_layers=False, progress=False)
    labels, y = table.labels, table.y
    # The choice names through the same encoder (and cache) as the texts.
    encoder = Encoder(config.encoder)
    assert encoder.id == encoder_id(config.encoder)
    store = EncodingCache(Path(config.cache).expanduser())
    encoded = encode_with_cache(encoder, store, cold_start.sentences_for(labels))[0]
    guess_p = cold_start.zero_shot(features, cold_start.name_vectors(encoded, len(labels)))
    # Each template alone, for the record (the service uses their mean).
    single = {template: cold_start.zero_shot(features, encoded[i * len(labels):(i + 1) * len(labels)]).argmax(axis=1)
              for i, template in enumerate(cold_start.TEMPLATES)}
    variants = list(VARIANTS) + (["model"] if len(table.seed_rows) else [])
    per_seed: dict[int, dict] = {}
    for plan in plans:
        pool_features, p_pool = features[plan.pool], guess_p[plan.pool]
        started = time.perf_counter()
        plain = cold_start.representative_order(pool_features, clusters, seed=plan.seed)
        clustering = (plain.clusters, cold_start.kmeans_centroids(pool_features, plain.clusters))
        orders = {
            "random": np.arange(len(plan.pool)),
            "kmeans": plain.order,
            "zero_shot": cold_start.zero_shot_order(p_pool),
            "zero_shot_kmeans": cold_start.representative_order(pool_features, clusters, guess=p_pool.argmax(axis=1),
                                                                clustering=clustering).order,
        }
        ordering_seconds = time.perf_counter() - started
        if "model" in variants:
            orders["model"] = _model_order(features, y, labels, plan, max(BUDGETS))
        row = {"zero_shot_test_accuracy": float((guess_p[plan.test].argmax(axis=1) == y[plan.test]).mean()),
               "zero_shot_single_template_test_accuracy": {
                   t: float((g[plan.test] == y[plan.test]).mean()) for t, g in single.items()},
               "zero_shot_pool_guess_share": np.bincount(p_pool.argmax(axis=1), minlength=len(labels)).tolist(),
               "ordering_seconds": round(ordering_seconds, 3), "variants": {}}
        for variant in variants:
            cells = {}
            for budget in BUDGETS:
                picks = plan.pool[orders[variant][:budget]]
                rows = np.concatenate([plan.seed_rows, picks])
                head = _head(labels, features.shape[1], plan.seed).fit(features[rows], y[rows])
                accuracy, macro_f1 = _scores(head, features[plan.test], y[plan.test], labels)
                cells[str(budget)] = {"classes_seen": int(len(np.unique(y[picks]))), "accuracy": accuracy,
                                      "macro_f1": macro_f1,
                                      "label_counts": np.bincount(y[picks], minlength=len(labels)).tolist()}
            row["variants"][variant] = cells
        per_seed[plan.seed] = row
        print(f"{name} seed {plan.seed}: " + ", ".join(
            f"{v} {100 * row['variants'][v]['100']['accuracy']:.1f}" for v in variants), file=sys.stderr)
    return {"config": {k: getattr(config, k) for k in ("data", "seed_data", "initial", "pool_size", "test_size")},
            "labels": labels, "variants": variants, "clusters": clusters, "templates": list(cold_start.TEMPLATES),
            "seeds": per_seed}


def _t95(n: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1)) if n > 1 else float("nan")


def summarise(name: str, result: dict) -> tuple[list[str], dict]:
    """Markdown lines and the aggregate (means, paired differences from random)."""
    seeds = list(result["seeds"].values())
    n = len(seeds)
    n_classes = len(result["labels"])
    aggregate: dict = {}
    header = ["variant"]
    for budget in BUDGETS:
        header += [f"classes seen @{budget} (min)", f"acc @{budget}", f"Δacc vs random @{budget} [95% CI] (won)",
                   f"macro-F1 @{budget}"]
    lines = [f"### {name}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant in result["variants"]:
        cells, entry = [variant], {}
        for budget in BUDGETS:
            b = str(budget)
            seen = np.array([s["variants"][variant][b]["classes_seen"] for s in seeds])
            acc = np.array([s["variants"][variant][b]["accuracy"] for s in seeds]) * 100
            f1 = np.array([s["variants"][variant][b]["macro_f1"] for s in seeds]) * 100
            base = np.array([s["variants"]["random"][b]["accuracy"] for s in seeds]) * 100
            diff = acc - base
            half = _t95(n) * diff.std(ddof=1) / math.sqrt(n) if n > 1 else float("nan")
            entry[b] = {"classes_seen_mean": float(seen.mean()), "classes_seen_min": int(seen.min()),
                        "all_classes_share": float((seen == n_classes).mean()),
                        "accuracy_mean": float(acc.mean()), "accuracy_sd": float(acc.std(ddof=1)) if n > 1 else 0.0,
                        "macro_f1_mean": float(f1.mean()), "accuracy_diff_vs_random_mean": float(diff.mean()),
                        "accuracy_diff_vs_random_ci95": [float(diff.mean() - half), float(diff.mean() + half)],
                        "seeds_beating_random": int((diff > 0).sum())}
            cells.append(f"{seen.mean():.2f} ({seen.min()})")
            cells.append(f"{acc.mean():.1f} ± {entry[b]['accuracy_sd']:.1f}")
            cells.append("—" if variant == "random" else
                         f"{diff.mean():+.1f} [{diff.mean() - half:+.1f}, {diff.mean() + half:+.1f}] "
                         f"({(diff > 0).sum()}/{n})")
            cells.append(f"{f1.mean():.1f}")
        aggregate[variant] = entry
        lines.append("| " + " | ".join(cells) + " |")
    zs = np.array([s["zero_shot_test_accuracy"] for s in seeds]) * 100
    aggregate["zero_shot_test_accuracy_mean"] = float(zs.mean())
    alone = {t: 100 * float(np.mean([s["zero_shot_single_template_test_accuracy"][t] for s in seeds]))
             for t in result["templates"]}
    aggregate["zero_shot_single_template_test_accuracy_mean"] = alone
    share = np.sum([s["zero_shot_pool_guess_share"] for s in seeds], axis=0)
    lines += ["", f"Zero-shot guess alone (what pre-filling shows), test accuracy: {zs.mean():.1f} "
                  "(each template alone: " + ", ".join(f"\"{t}\" {v:.1f}" for t, v in alone.items())
              + "); it guesses " + " / ".join(f"{label} {100 * v / share.sum():.0f}%"
                                             for label, v in zip(result["labels"], share))
              + f" of the pool. {n} paired seeds, {result['clusters']} k-means clusters.", ""]
    return lines, aggregate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help=f"comma-separated, of: {', '.join(SCENARIOS)}")
    parser.add_argument("--seeds", type=int, default=20, help="paired seeds 0..N-1 (default 20)")
    parser.add_argument("--clusters", type=int, default=cold_start.DEFAULT_CLUSTERS)
    parser.add_argument("--cache", default=None, help="encoding cache (default: the simulator's)")
    parser.add_argument("--out", type=Path, default=RESULTS / "cold_start.json")
    args = parser.parse_args(argv)
    names = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in names if s not in SCENARIOS]
    if unknown:
        raise SystemExit(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS)}")
    run = Run("cold_start", argv, out=args.out)
    results, report = {}, []
    for name in names:
        with run.measure(scenario=name) as row:
            results[name] = run_scenario(name, list(range(args.seeds)), args.clusters, args.cache)
        lines, results[name]["aggregate"] = summarise(name, results[name])
        report += lines + [f"{row['seconds']:.0f} s, load {row['load_before']}–{row['load_after']}, "
                           f"commit {row['commit']}", ""]
    run["scenarios"] = results
    print("\n".join(report))
    run.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
