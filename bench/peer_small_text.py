"""Our learner against small-text's on the simulator's own splits and cached embeddings (issue 17).

    .venv/bin/python bench/peer_small_text.py --data builtin:airline --initial 50 \\
        --pool-size 3000 --test-size 2000 --batch-size 50 --budget 500 --seeds 20 \\
        --out bench/results/peer/in_domain_binary

Each seed is one paired setup of `model.simulate` (`plan_seed`: the same pool, test set and
initial labels; `--seed-data` rows free), with the vectors `encode_table` reads from the
shared encoding cache. On it run, with the same label grid:

* **ours**, `ours:<ordering>[:<head>]`: the simulator's own loop (`run_ordering`) with the
  retrain's head (`RETRAIN_HEAD_KIND`), or `mlp` (the head before issue 17), or other
  `HeadConfig` fields (`threshold_objective=f1`, the multi-label thresholds before it);
* **the peer**, `smalltext:<strategy>`: small-text 1.4.1's `PoolBasedActiveLearner` with
  scikit-learn's `LogisticRegression(class_weight="balanced")` (its defaults otherwise) and
  its `LeastConfidence`, `BreakingTies`, `PredictionEntropy`, or an embedding-based strategy
  (`EmbeddingKMeans`, `GreedyCoreset`), which read the sentence vectors themselves through
  a classifier whose `embed` returns them.

**Head only** (issue 17, point 1), `--replay`: on the labeled sets the first `ours:` learner
bought (its picks, replayed round by round, so the picks are the same), scikit-learn's
`LogisticRegressionCV` with C among `REPLAY_C_GRID` chosen by stratified out-of-fold
*accuracy* on those labels (`lr_cv_balanced`: classes weighted as our head weights them;
`lr_cv`: unweighted), one per control (per choice of a multi-label control, which then
predicts every choice at or above 0.5 and at least its most likely one, as our head
does). Scored on the same test set as our head, so the paired difference per grid point
(ours minus it) is the head alone.

Prints, per learner, test accuracy at `--report-at` and the AULC (mean accuracy over the
label grid, points), and per learner the paired AULC difference from the first one (mean,
95 % t interval, seeds won); with `--replay`, per baseline and grid point, our head's
accuracy minus the baseline's (mean, 95 % t interval, seeds where ours is at least as
accurate). Writes runs.jsonl (one line per finished seed and learner; `--resume` keeps
those) and summary.json with the run record (`bench/run_record.py`).

Data: ours and the replay take every scenario of `bench/simulate_scenarios.sh` (several
controls, multi-label, images); small-text takes one control, single-choice or multi-label
(`SklearnClassifier(multi_label=True)`, one-vs-rest, predicting every choice above 0.5; its
multi-label strategy `CategoryVectorInconsistencyAndRanking`). Accuracy is the simulator's:
exact match of the set for a multi-label control, every control right with several.
"""

from __future__ import annotations

import argparse
import dataclasses
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

DEFAULT_LEARNERS = ("ours:margin,ours:least_confidence,ours:least_confidence:mlp,"
                    "smalltext:LeastConfidence,smalltext:BreakingTies,smalltext:EmbeddingKMeans")
# The replay's candidate C: wider than the head's own grid (model.classifier.C_GRID), so the
# baseline is not limited to our choices.
REPLAY_C_GRID = tuple(float(c) for c in np.logspace(-2, 4, 13))
REPLAY_BASELINES = ("lr_cv_balanced", "lr_cv")
# `--replay-heads`: our own head variants (`head_settings` texts) replayed on the same labeled
# sets, named "head:<text>": a head's effect apart from the picks it would make.
REPLAY_HEADS: list[str] = []


def small_text_strategy(name: str):
    """One of small-text's query strategies by class name."""
    from small_text import query_strategies

    if name == "GreedyCoreset":
        # Euclidean: its "cosine" takes arccos of similarities that rounding puts above 1 on
        # unit-length vectors (NaN distances); on those vectors the euclidean order is the
        # cosine order, and euclidean is the coreset paper's own metric for the images.
        return query_strategies.GreedyCoreset(distance_metric="euclidean")
    if name == "CategoryVectorInconsistencyAndRanking":
        return query_strategies.CategoryVectorInconsistencyAndRanking(pbar=None)
    strategy = getattr(query_strategies, name, None)
    if strategy is None:
        raise SystemExit(f"small-text has no query strategy {name!r}")
    return strategy()


def _vector_classifier_factory(num_classes: int, multi_label: bool = False):
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
            return VectorClassifier(LogisticRegression(class_weight="balanced", max_iter=1000), num_classes,
                                    multi_label=multi_label)

    return Factory()


def run_small_text(plan, strategy_name: str, config) -> dict:
    """small-text's loop on one seed's paired setup: accuracy on the test set per round."""
    from scipy.sparse import csr_matrix
    from small_text import PoolBasedActiveLearner, SklearnDataset

    started = time.perf_counter()
    features, y = simulate._CONTEXT["features"], simulate._CONTEXT["y"]
    spec = simulate._CONTEXT["specs"][0]
    n_labels = len(spec.labels)
    classes = np.arange(n_labels)
    # small-text's multi-label datasets hold a sparse 0/1 label matrix.
    as_labels = (lambda rows_: csr_matrix(np.asarray(y[rows_], dtype=np.int64))) if spec.multi_label \
        else (lambda rows_: y[rows_])
    rows = np.concatenate([plan.seed_rows, plan.pool]).astype(np.int64)
    train = SklearnDataset(np.asarray(features[rows], dtype=np.float64), as_labels(rows), target_labels=classes)
    test = SklearnDataset(np.asarray(features[plan.test], dtype=np.float64), as_labels(plan.test),
                          target_labels=classes)
    initial = np.concatenate([np.arange(len(plan.seed_rows)), len(plan.seed_rows) + plan.initial]).astype(np.int64)
    learner = PoolBasedActiveLearner(_vector_classifier_factory(n_labels, spec.multi_label),
                                     small_text_strategy(strategy_name), train)
    np.random.seed(plan.seed)  # strategies that draw (k-means) follow the seed
    learner.initialize_data(initial, as_labels(rows[initial]))
    out = {"labels_used": [], "accuracy": []}
    used = len(plan.initial)
    for round_number, target in enumerate(simulate.label_grid(config, plan)):
        if round_number:
            picked = learner.query(num_samples=target - used, query_strategy_kwargs=_quiet(strategy_name))
            learner.update(as_labels(rows[picked]))
            used = target
        predicted = learner.classifier.predict(test)
        if spec.multi_label:
            predicted = np.where(predicted.toarray() > 0, 1, 0)
        scores = simulate.score_controls([spec], [predicted], [y[plan.test]])
        out["labels_used"].append(used)
        out["accuracy"].append(scores["accuracy"])
    out["seconds"] = time.perf_counter() - started
    return out


def _quiet(strategy_name: str) -> dict:
    return {"pbar": None} if strategy_name in ("EmbeddingKMeans", "GreedyCoreset", "LightweightCoreset") else {}


def head_settings(text: str) -> dict:
    """The head part of `ours:<ordering>:<head>`: a kind ("mlp") or HeadConfig fields as
    `key=value` joined by "+" (`kind=mlp+threshold_objective=f1`); "" is the retrain's head.
    A key `ordering.<name>` is the ordering's parameter `<name>` (`ordering.decisions=joint`)."""
    if not text:
        return {}
    if "=" not in text:
        return {"kind": text}
    settings = {}
    for item in text.split("+"):
        key, _, value = item.partition("=")
        try:
            settings[key] = json.loads(value)
        except json.JSONDecodeError:
            settings[key] = value
    return settings


def run_ours(plan, ordering: str, head: str, config, replay: bool = False) -> dict:
    """The simulator's own loop with the given head (`head_settings`; "": the service's); with
    `replay`, the head-only baselines on the labeled sets it bought (`replay_baselines`)."""
    settings = head_settings(head)
    # `ordering.<name>=<value>` items are the ordering's parameters, not the head's.
    ordering_params = {key.removeprefix("ordering."): settings.pop(key) for key in list(settings)
                       if key.startswith("ordering.")}
    if ordering_params:
        config = dataclasses.replace(config, ordering_params={
            **config.ordering_params, ordering: {**config.ordering_params.get(ordering, {}), **ordering_params}})
    simulate._CONTEXT["head_settings"] = settings
    started = time.perf_counter()
    result = simulate.run_ordering(plan, ordering, config)
    out = {"labels_used": result["labels_used"], "accuracy": result["accuracy"],
           "seconds": time.perf_counter() - started}
    if replay:
        started = time.perf_counter()
        out["replay"] = replay_baselines(plan, result["picked"], result["labels_used"])
        out["seconds_replay"] = time.perf_counter() - started
    return out


def _cv_logistic_regression(x: np.ndarray, y: np.ndarray, balanced: bool, seed: int):
    """A fitted classifier for one binary or multi-class problem: `LogisticRegressionCV` over
    REPLAY_C_GRID by stratified out-of-fold accuracy (as many folds as the rarest class has
    members, 2 to 5); a constant where only one class is labeled."""
    import warnings

    from sklearn.dummy import DummyClassifier
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold

    present, counts = np.unique(y, return_counts=True)
    if len(present) < 2:
        return DummyClassifier(strategy="most_frequent").fit(x, y)
    folds = StratifiedKFold(int(np.clip(counts.min(), 2, 5)), shuffle=True, random_state=seed)
    model = LogisticRegressionCV(Cs=list(REPLAY_C_GRID), cv=folds, scoring="accuracy",
                                 class_weight="balanced" if balanced else None, max_iter=1000,
                                 l1_ratios=(0.0,), use_legacy_attributes=False)
    with warnings.catch_warnings():
        # A class with a single member leaves some folds without it; the fit stays valid.
        warnings.simplefilter("ignore", UserWarning)
        return model.fit(x, y)


def baseline_predict(specs: list, x: np.ndarray, targets: list[np.ndarray], test_x: np.ndarray,
                     balanced: bool, seed: int) -> list[np.ndarray]:
    """Per control, the cross-validated logistic regression's test predictions, in the form
    `simulate.score_controls` reads (label indices, or a 0/1 matrix for multi-label: every
    choice at or above 0.5 and at least the most likely, as `MultiLabelHead.predict`)."""
    from model.heads import answered

    predicted = []
    for spec, t in zip(specs, targets):
        rows = answered(t)
        if not spec.multi_label:
            predicted.append(_cv_logistic_regression(x[rows], t[rows], balanced, seed).predict(test_x))
            continue
        proba = np.zeros((len(test_x), len(spec.labels)))
        for j in range(len(spec.labels)):
            model = _cv_logistic_regression(x[rows], t[rows, j].astype(np.int64), balanced, seed)
            column = list(model.classes_).index(1) if 1 in model.classes_ else None
            proba[:, j] = model.predict_proba(test_x)[:, column] if column is not None else 0.0
        chosen = proba >= 0.5
        chosen[np.arange(len(chosen)), proba.argmax(axis=1)] = True
        predicted.append(chosen.astype(np.int64))
    return predicted


def replay_baselines(plan, picked: list[int], labels_used: list[int]) -> dict:
    """Test accuracy per grid point of each REPLAY_BASELINES head, trained on the labeled set
    our learner had at that point (seed rows, initial labels, then `picked` in order)."""
    from threadpoolctl import threadpool_limits

    features, targets, specs = simulate._CONTEXT["features"], simulate._CONTEXT["targets"], simulate._CONTEXT["specs"]
    test_x = np.asarray(features[plan.test], dtype=np.float64)
    test_targets = [np.asarray(t[plan.test]) for t in targets]
    start = np.concatenate([plan.seed_rows, plan.pool[plan.initial]]).astype(np.int64)
    bought = np.asarray(picked, dtype=np.int64)
    out = {name: [] for name in REPLAY_BASELINES}
    with threadpool_limits(1):  # one process, one thread, as a retrain runs
        for used in labels_used:
            rows = np.concatenate([start, bought[: used - len(plan.initial)]])
            x = np.asarray(features[rows], dtype=np.float64)
            for name in REPLAY_BASELINES:
                predicted = baseline_predict(specs, x, [np.asarray(t[rows]) for t in targets], test_x,
                                             balanced=name.endswith("_balanced"), seed=plan.seed)
                out[name].append(simulate.score_controls(specs, predicted, test_targets)["accuracy"])
            for text in REPLAY_HEADS:
                heads, _ = simulate.train_round(rows, plan.seed, {"kind": "linear", **head_settings(text)},
                                                pool_rows=np.setdiff1d(plan.pool, rows))
                out.setdefault(f"head:{text}", []).append(simulate._evaluate(heads, plan.test)["accuracy"])
    return out


def _job(args):
    plan, learner, config, replay = args
    kind, _, rest = learner.partition(":")
    if kind == "ours":
        ordering, _, head = rest.partition(":")
        result = run_ours(plan, ordering, head, config, replay)
    else:
        result = run_small_text(plan, rest, config)
    return learner, plan.seed, result


def _interval(diffs: np.ndarray) -> str:
    half = simulate._t95(len(diffs)) * diffs.std(ddof=1) / np.sqrt(len(diffs))
    return f"{diffs.mean():+.2f} [{diffs.mean() - half:+.2f}, {diffs.mean() + half:+.2f}]"


def summarise_replay(result_runs: dict[int, dict], report_at: list[int]) -> tuple[list[dict], list[str]]:
    """Head-only table: per baseline and grid point (the first, the report points, AULC), our
    head's mean accuracy, the baseline's, and ours minus it (points; mean, 95 % t interval,
    seeds where ours is at least as accurate); and the grid points where ours is behind
    beyond noise (the interval's upper end below 0)."""
    seeds = sorted(s for s, r in result_runs.items() if "replay" in r)
    if len(seeds) < 2:
        return [], []
    x = result_runs[seeds[0]]["labels_used"]
    points = [p for p in dict.fromkeys([x[0], *report_at]) if p in x]
    rows, behind = [], []
    for name in result_runs[seeds[0]]["replay"]:  # REPLAY_BASELINES, then any REPLAY_HEADS
        ours = 100 * np.array([result_runs[s]["accuracy"] for s in seeds])
        theirs = 100 * np.array([result_runs[s]["replay"][name] for s in seeds])
        for k, point in enumerate(x):
            d = ours[:, k] - theirs[:, k]
            half = simulate._t95(len(d)) * d.std(ddof=1) / np.sqrt(len(d))
            if d.mean() + half < 0:
                behind.append(f"{name} @{point}: {_interval(d)}")
        for point in [*points, "AULC"]:
            if point == "AULC":
                a = np.array([simulate.aulc(x, o / 100) for o in ours])
                b = np.array([simulate.aulc(x, t / 100) for t in theirs])
            else:
                a, b = ours[:, x.index(point)], theirs[:, x.index(point)]
            rows.append({"baseline": name, "labels": point, "seeds": len(seeds), "ours": round(float(a.mean()), 2),
                         "baseline acc": round(float(b.mean()), 2), "ours − baseline [95% CI]": _interval(a - b),
                         "seeds ours ≥": f"{int((a >= b).sum())}/{len(seeds)}"})
    return rows, behind


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
            for point in report_at:  # paired accuracy differences at the report points too
                if point in x and point in reference[paired[0]]["labels_used"]:
                    k, j = x.index(point), reference[paired[0]]["labels_used"].index(point)
                    d = 100 * np.array([per_seed[s]["accuracy"][k] - reference[s]["accuracy"][j] for s in paired])
                    row[f"Δ@{point}"] = _interval(d)
            diffs = np.array([aulcs[s] - simulate.aulc(reference[s]["labels_used"], reference[s]["accuracy"])
                              for s in paired])
            row[f"ΔAULC vs {learners[0]} [95% CI]"] = _interval(diffs)
            row["seeds ahead of it"] = f"{int((diffs > 0).sum())}/{len(diffs)}"
        row["s/run"] = round(float(np.mean([per_seed[s]["seconds"] for s in seeds])), 1)
        rows.append(row)
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--seed-data", default=None)
    parser.add_argument("--rare-class", default=None, help="LABEL:SHARE: thin that class of --data "
                        "(model.simulate.thin_class, as the simulator's --rare-class)")
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
    parser.add_argument("--replay", action="store_true",
                        help="also score the head-only baselines on the first ours: learner's labeled sets")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resume", action="store_true", help="keep the finished runs in OUT/runs.jsonl")
    parser.add_argument("--replay-heads", default="",
                        help="with --replay: our head variants (HeadConfig fields as in a learner's head part, "
                             "e.g. c_objective=scaled_log_loss), separated by commas, also replayed")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    learners = [name.strip() for name in args.learners.split(",") if name.strip()]
    REPLAY_HEADS[:] = [text.strip() for text in args.replay_heads.split(",") if text.strip()]
    report_at = [int(p) for p in args.report_at.split(",") if p.strip()]
    record = Run("peer_small_text", argv=argv, out=args.out / "summary.json")
    config = simulate.SimulationConfig(
        data=args.data, orderings=[], seeds=list(range(args.seeds)), initial=args.initial,
        batch_size=args.batch_size, budget=args.budget, pool_size=args.pool_size, test_size=args.test_size,
        seed_data=args.seed_data, test=args.test, rare_class=args.rare_class)
    table_ = simulate.table_from_config(config)
    if len(table_.specs) > 1 and any(name.startswith("smalltext:") for name in learners):
        raise SystemExit("small-text's learner answers one question per task; this data has "
                         f"{len(table_.specs)} controls: run ours and --replay only")
    replay_source = next((name for name in learners if name.startswith("ours:")), None) if args.replay else None
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
    jobs = [(plan, name, config, name == replay_source) for plan in plans for name in learners
            if plan.seed not in runs[name] or (name == replay_source and "replay" not in runs[name][plan.seed])]
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
    if replay_source:
        replay_rows, behind = summarise_replay(runs[replay_source], report_at)
        record["replay"] = {"heads_of": replay_source, "rows": replay_rows, "behind_beyond_noise": behind}
    path = record.write()
    print(table(rows, columns=list(dict.fromkeys(key for row in rows for key in row))))
    if replay_source:
        print(f"\nHead only, on {replay_source}'s labeled sets (ours minus the baseline, accuracy points):")
        print(table(replay_rows, columns=list(dict.fromkeys(key for row in replay_rows for key in row))))
        print("behind beyond noise at: " + ("; ".join(behind) if behind else "no grid point"))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
