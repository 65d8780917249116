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
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
from run_record import Run, spread, spread_text, table  # also puts the repository on sys.path

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
    args = parser.parse_args()
    run = Run("bench_orderings")
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


if __name__ == "__main__":
    main()
