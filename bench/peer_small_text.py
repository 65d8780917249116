"""Our learner against small-text's on the simulator's own splits and cached embeddings (issue 17).

    .venv/bin/python bench/peer_small_text.py --data builtin:airline --initial 50 \\
        --pool-size 3000 --test-size 2000 --batch-size 50 --budget 500 --seeds 20 \\
        --out bench/results/peer/in_domain_binary

Each seed is one paired setup of `model.simulate` (`plan_seed`: the same pool, test set and
initial labels; `--seed-data` rows free), with the vectors `encode_table` reads from the
shared encoding cache. On it run, with the same label grid:

* **ours**, `ours:<ordering>[:<head kind>]`: the simulator's own loop (`run_ordering`) with
  the service's head (`HeadConfig` defaults, or `kind=mlp`, the head before issue 17);
* **the peer**, `smalltext:<strategy>`: small-text 1.4.1's `PoolBasedActiveLearner` with
  scikit-learn's `LogisticRegression(class_weight="balanced")` (its defaults otherwise) and
  its `LeastConfidence`, `BreakingTies`, `PredictionEntropy`, or an embedding-based strategy
  (`EmbeddingKMeans`, `GreedyCoreset`), which read the sentence vectors themselves through
  a classifier whose `embed` returns them.

Prints, per learner, test accuracy at `--report-at` and the AULC (mean accuracy over the
label grid, points), and per learner the paired AULC difference from the first one (mean,
95 % t interval, seeds won). Writes runs.jsonl (one line per finished seed and learner;
`--resume` keeps those) and summary.json with the run record (`bench/run_record.py`).
Single-choice data only (small-text's learner takes one label column here).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # `python bench/peer_small_text.py`: import bench/ and model/ from the repo
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.run_record import Run, table  # noqa: E402
from model import simulate  # noqa: E402

DEFAULT_LEARNERS = ("ours:least_confidence,ours:margin,ours:least_confidence:mlp,"
                    "smalltext:LeastConfidence,smalltext:BreakingTies,smalltext:EmbeddingKMeans")


def small_text_strategy(name: str):
    """One of small-text's query strategies by class name."""
    from small_text import query_strategies

    if name == "GreedyCoreset":
        return query_strategies.GreedyCoreset(distance_metric="cosine")
    strategy = getattr(query_strategies, name, None)
    if strategy is None:
        raise SystemExit(f"small-text has no query strategy {name!r}")
    return strategy()


def _vector_classifier_factory(num_classes: int):
    """small-text's scikit-learn adapter around LogisticRegression(class_weight="balanced"),
    whose `embed` gives the embedding-based strategies the sentence vectors it is trained on
    (small-text's own embed needs a transformer classifier)."""
    from sklearn.linear_model import LogisticRegression
    from small_text import SklearnClassifier
    from small_text.classifiers.classification import EmbeddingMixin

    class VectorClassifier(SklearnClassifier, EmbeddingMixin):
        def embed(self, data_set, return_proba=False, pbar=None, **kwargs):
            vectors = np.asarray(data_set.x)
            return (vectors, self.predict_proba(data_set)) if return_proba else vectors

    class Factory:
        def new(self):
            return VectorClassifier(LogisticRegression(class_weight="balanced", max_iter=1000), num_classes)

    return Factory()


def run_small_text(plan, strategy_name: str, config) -> dict:
    """small-text's loop on one seed's paired setup: accuracy on the test set per round."""
    from small_text import PoolBasedActiveLearner, SklearnDataset

    started = time.perf_counter()
    features, y = simulate._CONTEXT["features"], simulate._CONTEXT["y"]
    classes = np.arange(len(simulate._CONTEXT["labels"]))
    rows = np.concatenate([plan.seed_rows, plan.pool]).astype(np.int64)
    train = SklearnDataset(np.asarray(features[rows], dtype=np.float64), y[rows], target_labels=classes)
    test_x = np.asarray(features[plan.test], dtype=np.float64)
    test = SklearnDataset(test_x, y[plan.test], target_labels=classes)
    initial = np.concatenate([np.arange(len(plan.seed_rows)), len(plan.seed_rows) + plan.initial]).astype(np.int64)
    learner = PoolBasedActiveLearner(_vector_classifier_factory(len(simulate._CONTEXT["labels"])),
                                     small_text_strategy(strategy_name), train)
    np.random.seed(plan.seed)  # strategies that draw (k-means) follow the seed
    learner.initialize_data(initial, y[rows[initial]])
    out = {"labels_used": [], "accuracy": []}
    used = len(plan.initial)
    for round_number, target in enumerate(simulate.label_grid(config, plan)):
        if round_number:
            picked = learner.query(num_samples=target - used, query_strategy_kwargs=_quiet(strategy_name))
            learner.update(y[rows[picked]])
            used = target
        predicted = learner.classifier.predict(test)
        out["labels_used"].append(used)
        out["accuracy"].append(float((predicted == y[plan.test]).mean()))
    out["seconds"] = time.perf_counter() - started
    return out


def _quiet(strategy_name: str) -> dict:
    return {"pbar": None} if strategy_name in ("EmbeddingKMeans", "GreedyCoreset", "LightweightCoreset") else {}


def run_ours(plan, ordering: str, head_kind: str | None, config) -> dict:
    """The simulator's own loop with the given head kind (None: the service's default)."""
    simulate._CONTEXT["head_settings"] = {"kind": head_kind} if head_kind else {}
    started = time.perf_counter()
    result = simulate.run_ordering(plan, ordering, config)
    return {"labels_used": result["labels_used"], "accuracy": result["accuracy"],
            "seconds": time.perf_counter() - started}


def _job(args):
    plan, learner, config = args
    kind, _, rest = learner.partition(":")
    if kind == "ours":
        ordering, _, head_kind = rest.partition(":")
        result = run_ours(plan, ordering, head_kind or None, config)
    else:
        result = run_small_text(plan, rest, config)
    return learner, plan.seed, result


def summarise(runs: dict, learners: list[str], report_at: list[int]) -> list[dict]:
    """Per learner: accuracy at the report points, AULC, and the paired AULC difference from
    the first learner (mean, 95 % t interval, seeds won)."""
    reference = runs.get(learners[0], {})
    rows = []
    for learner in learners:
        per_seed = runs.get(learner, {})
        seeds = sorted(per_seed)
        if not seeds:
            continue
        x = per_seed[seeds[0]]["labels_used"]
        row = {"learner": learner, "seeds": len(seeds)}
        for point in report_at:
            if point in x:
                k = x.index(point)
                row[f"@{point}"] = round(100 * float(np.mean([per_seed[s]["accuracy"][k] for s in seeds])), 2)
        aulcs = {s: simulate.aulc(per_seed[s]["labels_used"], per_seed[s]["accuracy"]) for s in seeds}
        row["AULC"] = round(float(np.mean(list(aulcs.values()))), 2)
        paired = [s for s in seeds if s in reference]
        if learner != learners[0] and len(paired) > 1:
            diffs = np.array([aulcs[s] - simulate.aulc(reference[s]["labels_used"], reference[s]["accuracy"])
                              for s in paired])
            half = simulate._t95(len(diffs)) * diffs.std(ddof=1) / np.sqrt(len(diffs))
            row[f"ΔAULC vs {learners[0]} [95% CI]"] = (
                f"{diffs.mean():+.2f} [{diffs.mean() - half:+.2f}, {diffs.mean() + half:+.2f}]")
            row["seeds ahead of it"] = f"{int((diffs > 0).sum())}/{len(diffs)}"
        row["s/run"] = round(float(np.mean([per_seed[s]["seconds"] for s in seeds])), 1)
        rows.append(row)
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--seed-data", default=None)
    parser.add_argument("--test", default=None)
    parser.add_argument("--initial", type=int, default=50)
    parser.add_argument("--pool-size", type=int, default=None)
    parser.add_argument("--test-size", type=float, default=0.25)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--budget", type=int, default=500)
    parser.add_argument("--seeds", type=int, default=10, help="seeds 0..N-1 (default 10)")
    parser.add_argument("--learners", default=DEFAULT_LEARNERS,
                        help="comma-separated; the first is the reference of the paired differences "
                             f"(default {DEFAULT_LEARNERS})")
    parser.add_argument("--report-at", default="100,200,500")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resume", action="store_true", help="keep the finished runs in OUT/runs.jsonl")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    learners = [name.strip() for name in args.learners.split(",") if name.strip()]
    report_at = [int(p) for p in args.report_at.split(",") if p.strip()]
    record = Run("peer_small_text", argv=argv, out=args.out / "summary.json")
    config = simulate.SimulationConfig(
        data=args.data, orderings=[], seeds=list(range(args.seeds)), initial=args.initial,
        batch_size=args.batch_size, budget=args.budget, pool_size=args.pool_size, test_size=args.test_size,
        seed_data=args.seed_data, test=args.test)
    data = simulate.load_source(config.data)
    seed_data = simulate.load_source(config.seed_data) if config.seed_data else None
    test = simulate.load_source(config.test) if config.test else None
    table_ = simulate.build_table(data, seed_data, test)
    if not table_.one_single_choice:
        raise SystemExit("peer_small_text compares single-choice learners: give data with one label column")
    plans = [simulate.plan_seed(table_, config, s) for s in config.seeds]
    simulate.check_plans(config, plans)
    features, _, encoder_id = simulate.encode_table(table_, plans, config, all_layers=False)
    simulate._set_context(features, None, table_.targets, table_.specs, threads=1)

    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "runs.jsonl"
    runs: dict[str, dict[int, dict]] = {name: {} for name in learners}
    if args.resume and log.exists():
        for line in log.read_text().splitlines():
            row = json.loads(line)
            if row["learner"] in runs and row["seed"] in config.seeds:
                runs[row["learner"]][row["seed"]] = row["result"]
    elif log.exists():
        log.unlink()
    jobs = [(plan, name, config) for plan in plans for name in learners if plan.seed not in runs[name]]
    with record.measure(stage="all runs", jobs=len(jobs)):
        # fork: the workers inherit the table's vectors set above.
        with multiprocessing.get_context("fork").Pool(max(1, args.workers)) as pool:
            for done, (name, seed, result) in enumerate(pool.imap_unordered(_job, jobs), 1):
                runs[name][seed] = result
                with log.open("a") as handle:
                    handle.write(json.dumps({"learner": name, "seed": seed, "result": result}) + "\n")
                print(f"[{done}/{len(jobs)}] {name} seed {seed}: "
                      f"AULC {simulate.aulc(result['labels_used'], result['accuracy']):.2f}", flush=True)
    rows = summarise(runs, learners, report_at)
    record["encoder"] = encoder_id
    record["rows"] = rows
    path = record.write()
    print(table(rows, columns=list(dict.fromkeys(key for row in rows for key in row))))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
