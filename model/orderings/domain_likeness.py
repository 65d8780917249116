"""Domain-likeness: active transfer learning for representative sampling.

Source: Munro, *Human-in-the-Loop Machine Learning*, ch. 5 ("Active transfer learning for
representative sampling") and its cheatsheet. A new head learns to tell tasks that look like
the current training data (labeled: "training") from tasks of the application domain
(unlabeled: "application"). It sees **all layers**: the pooled hidden state of every encoder
layer, the embedding layer included, because words new to the application domain may never
reach the top layer, let alone the classifier's hidden layer. (The book describes this
strategy but its code does not implement it.)

Score = P(training), **lower = more like the application domain and unlike anything labeled
= label sooner**. By default (`uncertainty_candidates=4`) the head corrects uncertainty
rather than replacing it: the 4 x batch-size least confident tasks are ordered by
P(training), the rest follow by least confidence. Alone (`uncertainty_candidates=0`) it
serves the tasks least like anything labeled, which right after a domain shift are the
oddest tasks of the new domain, and it did worse than random there (BENCHMARKS.md).

Every unlabeled task is scored by a head that did not train on it: k-fold over the tasks
the heads train on, and the average of the fold heads for pool tasks left out of training
(large pools are subsampled to `max_per_side` to keep this fast;
`model.orderings.transfer.training_probabilities`).

Several controls: domain-likeness looks at the input (every text object's encoder layers),
so it is unchanged; the uncertainty it corrects is the combined least confidence over every
head (`base.combined_score`).

The book warns this is the strategy most sensitive to noise (garbage text, other languages):
such tasks look like nothing labeled and come first, which is one more reason the default
only lets it choose among the tasks the classifier is unsure of.
"""

from __future__ import annotations

import numpy as np

from model.orderings.base import (
    Ordering,
    OrderingInput,
    OrderingResult,
    combined_score,
    flag,
    integer,
    lowest_per_cluster,
    number,
)
from model.orderings.least_confidence import least_confidence_score
from model.orderings.transfer import training_probabilities

DOMAIN_DEFAULTS: dict = {
    "domain_folds": 3,
    "domain_regularization": 0.01,  # inverse L2 strength (C) of the logistic head
    "max_per_side": 1500,  # training and application tasks the head trains on, at most
    # Build the batch from k-means clusters of the pool (k = batch size): from each cluster,
    # its most application-like task. Off by default: it is an experiment (BENCHMARKS.md).
    "cluster_batch": False,
    # > 0: domain-likeness as a correction of uncertainty. The most uncertain
    # `uncertainty_candidates x batch size` tasks (least confidence) are ordered by
    # P(application), the book's "uncertainty first, then representative" combination;
    # the rest of the queue follows in least-confidence order. 0 = domain-likeness alone,
    # which was worse than random after a domain shift (BENCHMARKS.md), hence 4.
    "uncertainty_candidates": 4,
}
DOMAIN_RULES: dict = {
    "domain_folds": integer(2, 20),
    "domain_regularization": number(1e-9, 1e6),
    "max_per_side": integer(2, 10_000_000),
    "cluster_batch": flag(),
    "uncertainty_candidates": integer(0, 10_000),
}


def cluster_batch(features: np.ndarray, p_training: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """A batch that covers the pool: k-means with k = `size` on the pool's features, and from
    each cluster the task with the lowest P(training), most application-like first.

    Alone, domain-likeness serves the tasks least like anything labeled, which after a
    domain shift are the oddest tasks of the pool rather than its typical ones; one per
    cluster spreads the batch over the pool the way its tasks are spread."""
    from sklearn.cluster import MiniBatchKMeans

    n = len(features)
    size = int(min(size, n))
    if size < 2:
        return np.argsort(p_training, kind="stable")[:size]
    clusters = MiniBatchKMeans(n_clusters=size, random_state=seed, n_init=1,
                               batch_size=1024).fit_predict(np.asarray(features, dtype=np.float32))
    return lowest_per_cluster(clusters, p_training)


def uncertainty_first(confidence: np.ndarray, p_training: np.ndarray, candidates: int) -> np.ndarray:
    """Scores that serve the `candidates` least confident tasks first, most application-like
    (lowest P(training)) first among them, then the rest by least confidence.

    `confidence`: the least-confidence score per task (over every head: `combined_score`).
    Candidates score P(training) in [0, 1]; the rest 1 + least-confidence score in [1, 2]."""
    confidence = np.asarray(confidence, dtype=np.float64)
    chosen = np.argsort(confidence, kind="stable")[:candidates]
    scores = 1.0 + confidence
    scores[chosen] = np.asarray(p_training, dtype=np.float64)[chosen]
    return scores


def layer_features(all_layers: np.ndarray | None, features: np.ndarray) -> np.ndarray:
    """All encoder layers side by side, (n, layers * dim); the top layer if none given."""
    if all_layers is None:
        return np.asarray(features, dtype=np.float32)
    all_layers = np.asarray(all_layers, dtype=np.float32)
    return all_layers.reshape(len(all_layers), -1)


class DomainLikeness(Ordering):
    """Score = P(training) from a training-vs-application head on all layers, among the most
    uncertain tasks by default; lower = sooner."""

    name = "domain_likeness"
    needs_all_layers = True
    defaults = dict(DOMAIN_DEFAULTS)
    rules = dict(DOMAIN_RULES)

    def score(self, data: OrderingInput) -> OrderingResult:
        settings = self.settings(data)
        views = data.pool_heads()
        if data.all_layers_unlabeled is None or data.all_layers_labeled is None:
            raise ValueError(
                "domain_likeness needs the pooled hidden states of every encoder layer: pass "
                "all_layers_labeled and all_layers_unlabeled (encode_with_cache(..., all_layers=True))"
            )
        if len(data.features_labeled) == 0 or len(data.features_unlabeled) < 2:
            info = {"fallback": "random", "fallback_reason": "nothing labeled or nothing to order"}
            scores = np.random.default_rng(data.seed).random(len(data.features_unlabeled))
            return self.finish(data, scores, views, info)
        _, p_training = training_probabilities(
            layer_features(data.all_layers_labeled, data.features_labeled),
            layer_features(data.all_layers_unlabeled, data.features_unlabeled),
            folds=settings["domain_folds"],
            seed=data.seed,
            regularization=settings["domain_regularization"],
            max_per_side=settings["max_per_side"],
        )
        info = {"fallback": None, "layers": int(np.asarray(data.all_layers_unlabeled).shape[1])}
        scores = p_training
        candidates = int(settings["uncertainty_candidates"])
        if candidates > 0:
            confidence = combined_score(least_confidence_score, views)
            scores = uncertainty_first(confidence, p_training, candidates * data.batch_size)
            info["uncertainty_candidates"] = min(candidates * data.batch_size, len(scores))
        batch = None
        if settings["cluster_batch"]:
            batch = cluster_batch(data.features_unlabeled, scores, data.batch_size, data.seed)
            info["cluster_batch"] = len(batch)
        return self.finish(data, scores, views, info, batch=batch)
