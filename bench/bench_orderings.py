"""Time every ordering on a pool of 10,000 cached tasks (issue 5, point 9).

The pool is 10,000 airline tweets; the labeled set is 500 movie snippets plus 500 tweets,
so the heads see two domains as they would after a domain shift. Vectors (all encoder
layers) come from the encoding cache; the first run fills it, which takes minutes and is
not part of the timing. Each ordering is timed `--repeats` times after one warm-up call
(imports, first allocations); the table shows the median and the slowest.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_orderings.py [--repeats 3]
    # -> a table on stdout, bench/results/bench_orderings.json

The figure that holds under load is each ordering's time divided by the reference measured
in the same round: training the classifier head on the labeled set, which every retrain
does anyway. Rounds interleave the reference and every ordering. Runs on one CPU thread
(torch.set_num_threads(1)): the machine is shared.

`--controls 3` (issue 13, point 6) times what a retrain of a project with three controls
runs after training instead (`bench/three_controls.py`: sentiment, length, multi-label
tone): the reference is `model.heads.train_heads` (three heads and the retrain's one
out-of-fold pass, 5 folds), and each ordering's row is the whole scoring step,
`model.queue_scores.queue_scores_multi` over the labeled and pool tasks with that pass
handed over and the k-means centroids of the warm-up call reused, as a retrain after the
first does; the k-means first fit (`cluster_ids` without centroids, the first retrain of a
project) is its own row.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_orderings.py --pool 10000 --controls 3
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
from run_record import REPO, Run, spread, spread_text, table  # also puts the repository on sys.path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CACHE = Path.home() / ".cache" / "atl-backend" / "orderings-encodings.sqlite3"
LABELS = ["Negative", "Positive"]


def main() -> None:
    import torch

    from model.classifier import ClassifierHead, HeadConfig
    from model.datasets import airline_tweets, movie_snippets
    from model.encoder import Encoder
    from model.encoding_cache import EncodingCache, encode_with_cache
    from model.orderings import ORDERINGS, OrderingInput, get_ordering

    parser = argparse.ArgumentParser()
    parser.add_argument("--pool", type=int, default=10_000)
    parser.add_argument("--labeled-tweets", type=int, default=500)
    parser.add_argument("--labeled-movies", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3, help="rounds")
    parser.add_argument("--controls", type=int, choices=(1, 3), default=1,
                        help="1: one sentiment head, each ordering alone; 3: three heads, the whole "
                             "scoring step (see the module docstring)")
    parser.add_argument("--out", type=Path, default=None,
                        help="result JSON (default bench/results/bench_orderings.json, "
                             "bench_orderings-3-controls.json with --controls 3)")
    args = parser.parse_args()
    suffix = "-3-controls" if args.controls == 3 else ""
    run = Run("bench_orderings", out=args.out or REPO / "bench" / "results" / f"bench_orderings{suffix}.json")
    torch.set_num_threads(1)

    encoder = Encoder()
    cache = EncodingCache(CACHE)
    tweets = airline_tweets().sample(args.pool + args.labeled_tweets, seed=7)
    movies = movie_snippets().sample(args.labeled_movies, seed=7)
    start = time.perf_counter()
    tweet_layers, encoded_tweets = encode_with_cache(encoder, cache, tweets.texts, all_layers=True)
    movie_layers, encoded_movies = encode_with_cache(encoder, cache, movies.texts, all_layers=True)
    first_read = time.perf_counter() - start
    start = time.perf_counter()
    encode_with_cache(encoder, cache, tweets.texts, all_layers=True)
    encode_with_cache(encoder, cache, movies.texts, all_layers=True)
    cached_read = time.perf_counter() - start
    print(
        f"vectors: {len(tweets) + len(movies)} texts, {encoded_tweets + encoded_movies} encoded now "
        f"({first_read:.1f}s); reading all from the cache: {cached_read:.2f}s",
        flush=True,
    )

    tweet_y = np.array([LABELS.index(label) for label in tweets.labels])
    movie_y = np.array([LABELS.index(label) for label in movies.labels])
    labeled_layers = np.concatenate([movie_layers, tweet_layers[: args.labeled_tweets]])
    labeled_y = np.concatenate([movie_y, tweet_y[: args.labeled_tweets]])
    pool_layers = tweet_layers[args.labeled_tweets :]
    if args.controls == 3:
        labeled_texts = movies.texts + tweets.texts[: args.labeled_tweets]
        labeled_sentiments = movies.labels + tweets.labels[: args.labeled_tweets]
        three_controls(run, labeled_layers, labeled_texts, labeled_sentiments, pool_layers, args.repeats)
        return

    start = time.perf_counter()
    classifier = ClassifierHead(HeadConfig(labels=LABELS, input_dim=labeled_layers.shape[2]))
    classifier.fit(labeled_layers[:, -1], labeled_y)
    classifier_seconds = time.perf_counter() - start
    print(f"classifier training on {len(labeled_y)} labeled tasks: {classifier_seconds:.2f}s", flush=True)

    data = OrderingInput.from_all_layers(labeled_layers, labeled_y, pool_layers, classifier,
                                         batch_size=50, seed=0)
    orderings = {name: get_ordering(name) for name in ORDERINGS}
    results = {}
    for name, ordering in orderings.items():
        results[name] = ordering.score(data)  # warm-up: imports and first allocations are not the ordering
    # Rounds: in each, the reference (training the head on the labeled set, as every retrain
    # does) and then every ordering once, so a load spike touches one round of all of them.
    for round_ in range(1, args.repeats + 1):
        with run.measure(round=round_, ordering="reference: head fit"):
            ClassifierHead(HeadConfig(labels=LABELS, input_dim=labeled_layers.shape[2])).fit(
                labeled_layers[:, -1], labeled_y)
        for name, ordering in orderings.items():
            with run.measure(round=round_, ordering=name):
                results[name] = ordering.score(data)

    def seconds(name: str) -> list[float]:
        return [m["seconds"] for m in run.measurements if m["ordering"] == name]

    reference = seconds("reference: head fit")
    rows = []
    for name in ORDERINGS:
        times = seconds(name)
        ratios = [t / r for t, r in zip(times, reference)]
        info = results[name].info
        rows.append({
            "ordering": name,
            "median s": round(float(np.median(times)), 3),
            "range s": f"{min(times):.3f}–{max(times):.3f}",
            "÷ head fit (median, range)": spread_text(ratios, 2),
            "note": (f"batch built in rounds: {info['batch_built']} tasks" if info.get("batch_built") is not None
                     else f"fallback: {info['fallback']}" if info.get("fallback") else ""),
        })
    loads = [m[k] for m in run.measurements for k in ("load_before", "load_after")]
    run["settings"] = {"pool": len(pool_layers), "labeled": len(labeled_y), "labeled_movies": args.labeled_movies,
                       "labeled_tweets": args.labeled_tweets, "rounds": args.repeats,
                       "torch_threads": torch.get_num_threads()}
    run["cache_read_seconds"] = round(cached_read, 3)
    run["reference_head_fit_s"] = spread(reference)
    run["orderings"] = rows
    print()
    print(f"pool {len(pool_layers):,}, labeled {len(labeled_y):,}; reference: the head fit on the labeled set, "
          f"{spread_text(reference, 3)} s; load {min(loads)}–{max(loads)}")
    print(table(rows))
    run.write()


def three_controls(run: Run, labeled_layers: np.ndarray, labeled_texts: list[str], labeled_sentiments: list[str],
                   pool_layers: np.ndarray, rounds: int) -> None:
    """`--controls 3`: the reference is training the three heads with the out-of-fold pass;
    each ordering's row is `queue_scores_multi`, the whole scoring step of a retrain."""
    import three_controls as layout

    from model.heads import answered, train_heads
    from model.orderings import ORDERINGS
    from model.queue_scores import cluster_ids, queue_scores_multi

    # Labeled tasks first, then the pool, as one project; the pool answers nothing.
    layers = np.concatenate([labeled_layers, pool_layers])
    features = layers[:, -1]
    n_labeled = len(labeled_layers)
    labeled = np.arange(n_labeled)
    targets = []
    for t in layout.targets(labeled_texts, labeled_sentiments):
        unanswered = np.full((len(pool_layers),) + t.shape[1:], -1, dtype=t.dtype)
        targets.append(np.concatenate([t, unanswered]))
    specs = layout.control_specs()
    head_features = [features] * len(specs)  # every control reads the one text object

    def train():
        return train_heads(specs, head_features, targets, labeled, folds=5)

    def score(name, centroids):
        return queue_scores_multi(features, heads, head_features, targets, ordering=name, batch_size=50,
                                  all_layers=layers, centroids=centroids, out_of_fold=oof)

    heads, oof = train()
    centroids, results = {}, {}
    for name in ORDERINGS:  # warm-up; its centroids are the "previous retrain's"
        results[name] = score(name, None)
        centroids[name] = results[name].centroids
    for round_ in range(1, rounds + 1):
        with run.measure(round=round_, ordering="reference: train 3 heads + out-of-fold pass"):
            train()
        with run.measure(round=round_, ordering="k-means first fit (cluster_ids, no centroids)"):
            cluster_ids(features)
        for name in ORDERINGS:
            with run.measure(round=round_, ordering=name):
                results[name] = score(name, centroids[name])

    reference = [m["seconds"] for m in run.measurements if m["ordering"].startswith("reference")]
    rows = []
    for name in ["k-means first fit (cluster_ids, no centroids)", *ORDERINGS]:
        times = [m["seconds"] for m in run.measurements if m["ordering"] == name]
        info = results[name].info if name in results else {}
        rows.append({
            "ordering": name,
            "median s": round(float(np.median(times)), 3),
            "range s": f"{min(times):.3f}–{max(times):.3f}",
            "÷ training (median, range)": spread_text([t / r for t, r in zip(times, reference)], 2),
            "note": (f"batch built in rounds: {info['batch_built']} tasks" if info.get("batch_built") is not None
                     else f"fallback: {info['fallback']}" if info.get("fallback") else ""),
        })
    loads = [m[k] for m in run.measurements for k in ("load_before", "load_after")]
    run["settings"] = {"controls": [s.name for s in specs], "pool": len(pool_layers), "labeled": n_labeled,
                       "rounds": rounds, "out_of_fold_folds": 5}
    run["answered"] = {s.name: int(answered(t).sum()) for s, t in zip(specs, targets)}
    run["reference_train_s"] = spread(reference)
    run["orderings"] = rows
    print()
    print(f"three controls ({', '.join(s.name for s in specs)}), pool {len(pool_layers):,}, labeled {n_labeled:,}; "
          f"reference: training the heads with the out-of-fold pass, {spread_text(reference, 3)} s; "
          f"load {min(loads)}–{max(loads)}")
    print(table(rows))
    run.write()


if __name__ == "__main__":
    main()
