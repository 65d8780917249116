"""Small paired-seed learning-curve runs used to tune the orderings (issue 5).

Not the simulator (model/simulate.py, issue 6): a quick loop to compare variants of an
ordering on the two benchmark scenarios while building them.

* in_domain: airline tweets (Positive/Negative, ~20 % positive); 50 random labels, then
  batches of 50 chosen by the ordering up to 500 labels.
* domain_shift: 1,000 labeled movie snippets, then batches of 50 airline tweets up to 500.

Per step it records the test macro-F1 and accuracy, the error-detection AUC of the ordering's
scores against the current classifier's errors in the pool, and the share of positives in
the batch. AULC = mean macro-F1 over the steps.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/explore_orderings.py --seeds 3 \
        random least_confidence "predicted_incorrect:head_features=hidden,domain_weighting=0"
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CACHE = Path.home() / ".cache" / "atl-backend" / "orderings-encodings.sqlite3"
LABELS = ["Negative", "Positive"]


def load_data(n_tweets: int = 4000, n_movies: int = 2500):
    """All-layers vectors of a fixed sample of tweets and movie snippets (cached)."""
    from model.datasets import airline_tweets, movie_snippets
    from model.encoder import Encoder
    from model.encoding_cache import EncodingCache, encode_with_cache

    encoder = Encoder()
    cache = EncodingCache(CACHE)
    out = {}
    for name, data in (
        ("tweets", airline_tweets().sample(n_tweets, seed=1)),
        ("movies", movie_snippets().sample(n_movies, seed=1)),
    ):
        layers, _ = encode_with_cache(encoder, cache, data.texts, all_layers=True)
        out[name] = (layers, np.array([LABELS.index(label) for label in data.labels]))
    return out


def parse_variant(text: str) -> tuple[str, str, dict]:
    name, _, rest = text.partition(":")
    params = {}
    for pair in filter(None, rest.split(",")):
        key, value = pair.split("=")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return text, name, params


def run(scenario: str, variant: tuple, seed: int, data: dict, steps: int = 10, batch: int = 50):
    from sklearn.metrics import f1_score, roc_auc_score

    from model.classifier import ClassifierHead, HeadConfig
    from model.orderings import OrderingInput, get_ordering

    tweets_layers, tweets_y = data["tweets"]
    movies_layers, movies_y = data["movies"]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(tweets_y))
    test, pool = order[:1000], order[1000:4000]
    if scenario == "in_domain":
        base_layers = tweets_layers[pool[:batch]]
        base_y = tweets_y[pool[:batch]]
        pool = pool[batch:]
    else:
        chosen = rng.permutation(len(movies_y))[:1000]
        base_layers, base_y = movies_layers[chosen], movies_y[chosen]
    label, ordering_params = variant[1], variant[2]
    ordering = get_ordering(label, **ordering_params)
    picked: list[int] = []
    curve, detection, positives, seconds = [], [], [], []
    for step in range(steps + 1):
        lab_layers = np.concatenate([base_layers, tweets_layers[pool[picked]]])
        lab_y = np.concatenate([base_y, tweets_y[pool[picked]]])
        head = ClassifierHead(HeadConfig(labels=LABELS, input_dim=lab_layers.shape[2], seed=seed))
        head.fit(lab_layers[:, -1], lab_y)
        predicted = head.predict_proba(tweets_layers[test][:, -1]).argmax(1)
        curve.append(f1_score(tweets_y[test], predicted, average="macro"))
        if step == steps:
            break
        remaining = np.setdiff1d(np.arange(len(pool)), picked)
        start = time.perf_counter()
        result = ordering.score(
            OrderingInput(
                features_labeled=lab_layers[:, -1],
                labels=lab_y,
                features_unlabeled=tweets_layers[pool[remaining]][:, -1],
                classifier=head,
                all_layers_labeled=lab_layers,
                all_layers_unlabeled=tweets_layers[pool[remaining]],
                batch_size=batch,
                seed=seed * 1000 + step,
            )
        )
        seconds.append(time.perf_counter() - start)
        pool_wrong = (
            head.predict_proba(tweets_layers[pool[remaining]][:, -1]).argmax(1) != tweets_y[pool[remaining]]
        )
        if 0 < pool_wrong.sum() < len(pool_wrong):
            detection.append(roc_auc_score(pool_wrong, -result.scores))
        chosen = remaining[result.top(batch)]
        positives.append(float(tweets_y[pool[chosen]].mean()))
        picked.extend(int(i) for i in chosen)
    return {
        "aulc": float(np.mean(curve)),
        "curve": [round(float(v), 4) for v in curve],
        "detection_auc": float(np.mean(detection)) if detection else None,
        "first_detection_auc": float(detection[0]) if detection else None,
        "batch_positive_share": float(np.mean(positives)),
        "min_batch_positive_share": float(np.min(positives)),
        "seconds_per_step": float(np.mean(seconds)),
    }


def main() -> None:
    import torch

    torch.set_num_threads(1)
    parser = argparse.ArgumentParser()
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--scenarios", default="in_domain,domain_shift")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    data = load_data()
    variants = [parse_variant(v) for v in args.variants]
    results = {}
    for scenario in args.scenarios.split(","):
        for variant in variants:
            runs = [run(scenario, variant, seed, data) for seed in range(args.seeds)]
            results[(scenario, variant[0])] = runs
            print(
                f"{scenario:12s} {variant[0]:70s} AULC {np.mean([r['aulc'] for r in runs]):.4f}"
                f"  det {np.mean([r['detection_auc'] for r in runs]):.3f}"
                f"  det0 {np.mean([r['first_detection_auc'] for r in runs]):.3f}"
                f"  pos {np.mean([r['batch_positive_share'] for r in runs]):.2f}"
                f"/min {np.min([r['min_batch_positive_share'] for r in runs]):.2f}"
                f"  {np.mean([r['seconds_per_step'] for r in runs]):.2f}s",
                flush=True,
            )
        # Paired differences against the first variant (the reference, usually random).
        reference = results[(scenario, variants[0][0])]
        for variant in variants[1:]:
            diff = [
                r["aulc"] - q["aulc"] for r, q in zip(results[(scenario, variant[0])], reference)
            ]
            print(
                f"  {variant[0]:70s} vs {variants[0][0]}: {100 * np.mean(diff):+.2f} AULC points"
                f"  wins {sum(d > 0 for d in diff)}/{len(diff)}",
                flush=True,
            )
    if args.out:
        Path(args.out).write_text(
            json.dumps({f"{s}|{v}": runs for (s, v), runs in results.items()}, indent=1)
        )


if __name__ == "__main__":
    main()
