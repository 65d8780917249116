"""Time every ordering on a pool of 10,000 cached tasks (issue 5, point 9).

The pool is 10,000 airline tweets; the labeled set is 500 movie snippets plus 500 tweets,
so the heads see two domains as they would after a domain shift. Vectors (all encoder
layers) come from the encoding cache; the first run fills it, which takes minutes and is
not part of the timing. Each ordering is timed `--repeats` times after one warm-up call
(imports, first allocations); the table shows the median and the slowest.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_orderings.py
    # -> a table on stdout, bench/results/orderings.json

Runs on one CPU thread (torch.set_num_threads(1)): the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

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
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "orderings.json"))
    args = parser.parse_args()
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
    rows = []
    for name in ORDERINGS:
        ordering = get_ordering(name)
        ordering.score(data)  # warm-up: imports and first allocations are not the ordering
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            result = ordering.score(data)
            times.append(time.perf_counter() - start)
        info = result.info
        rows.append(
            {
                "ordering": name,
                "median_seconds": round(float(np.median(times)), 3),
                "max_seconds": round(float(np.max(times)), 3),
                "runs": [round(t, 3) for t in times],
                "fallback": info.get("fallback"),
                "batch_built": info.get("batch_built"),
            }
        )
        print(f"  {name:20s} {np.median(times):7.2f}s (max {np.max(times):.2f}s)", flush=True)

    print()
    print(f"| ordering | median s | max s | pool {len(pool_layers):,}, labeled {len(labeled_y):,} |")
    print("|---|---:|---:|---|")
    for row in rows:
        note = f"fallback: {row['fallback']}" if row["fallback"] else ""
        if row["batch_built"] is not None:
            note = f"batch built in rounds: {row['batch_built']} tasks"
        print(f"| {row['ordering']} | {row['median_seconds']:.2f} | {row['max_seconds']:.2f} | {note} |")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "pool": len(pool_layers),
                "labeled": len(labeled_y),
                "labeled_movies": args.labeled_movies,
                "labeled_tweets": args.labeled_tweets,
                "repeats": args.repeats,
                "torch_threads": torch.get_num_threads(),
                "cpu_count": os.cpu_count(),
                "load_average_at_end": os.getloadavg(),
                "python": platform.python_version(),
                "cache_read_seconds": round(cached_read, 3),
                "classifier_training_seconds": round(classifier_seconds, 3),
                "orderings": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
