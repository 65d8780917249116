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
(large pools are subsampled to `max_per_side` to keep this fast).

The book warns this is the strategy most sensitive to noise (garbage text, other languages):
such tasks look like nothing labeled and come first, which is one more reason the default
only lets it choose among the tasks the classifier is unsure of.
"""

from __future__ import annotations

import numpy as np

from model.orderings.base import Ordering, OrderingInput, OrderingResult
from model.orderings.predicted_incorrect import BinaryHead, balanced_weights

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
    picked = []
    for cluster in np.unique(clusters):
        members = np.flatnonzero(clusters == cluster)
        picked.append(int(members[np.argmin(p_training[members])]))
    picked = np.array(picked, dtype=int)
    return picked[np.argsort(p_training[picked], kind="stable")]


def uncertainty_first(probabilities: np.ndarray, p_training: np.ndarray, candidates: int) -> np.ndarray:
    """Scores that serve the `candidates` least confident tasks first, most application-like
    (lowest P(training)) first among them, then the rest by least confidence.

    Candidates score P(training) in [0, 1]; the rest 1 + least-confidence score in [1, 2]."""
    from model.orderings.least_confidence import least_confidence_score

    confidence = least_confidence_score(probabilities)
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


def training_probabilities(
    labeled: np.ndarray,
    unlabeled: np.ndarray,
    folds: int = DOMAIN_DEFAULTS["domain_folds"],
    seed: int = 0,
    regularization: float = DOMAIN_DEFAULTS["domain_regularization"],
    max_per_side: int = DOMAIN_DEFAULTS["max_per_side"],
) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold P(training) of every labeled and every unlabeled task (rows of features)."""
    labeled = np.asarray(labeled, dtype=np.float32)
    unlabeled = np.asarray(unlabeled, dtype=np.float32)
    n_labeled, n_unlabeled = len(labeled), len(unlabeled)
    rng = np.random.default_rng(seed)
    chosen_labeled = np.sort(rng.permutation(n_labeled)[:max_per_side])
    chosen_unlabeled = np.sort(rng.permutation(n_unlabeled)[:max_per_side])
    x = np.concatenate([labeled[chosen_labeled], unlabeled[chosen_unlabeled]])
    is_training = np.concatenate([np.ones(len(chosen_labeled), bool), np.zeros(len(chosen_unlabeled), bool)])
    # Seeded folds, stratified by side, so both sides are in every fold.
    fold_of = np.empty(len(x), dtype=np.int64)
    folds = int(max(2, min(folds, len(chosen_labeled), len(chosen_unlabeled))))
    for side in (True, False):
        members = np.flatnonzero(is_training == side)
        fold_of[rng.permutation(members)] = np.arange(len(members)) % folds

    out_of_fold = np.zeros(len(x))
    left_out_labeled = np.setdiff1d(np.arange(n_labeled), chosen_labeled)
    left_out_unlabeled = np.setdiff1d(np.arange(n_unlabeled), chosen_unlabeled)
    ensemble_labeled = np.zeros(len(left_out_labeled))
    ensemble_unlabeled = np.zeros(len(left_out_unlabeled))
    for fold in range(folds):
        train, held_out = fold_of != fold, fold_of == fold
        head = BinaryHead(regularization).fit(
            x[train], is_training[train], balanced_weights(is_training[train], np.ones(train.sum()))
        )
        out_of_fold[held_out] = head.positive_probability(x[held_out])
        if len(left_out_labeled):
            ensemble_labeled += head.positive_probability(labeled[left_out_labeled]) / folds
        if len(left_out_unlabeled):
            ensemble_unlabeled += head.positive_probability(unlabeled[left_out_unlabeled]) / folds

    p_labeled = np.zeros(n_labeled)
    p_unlabeled = np.zeros(n_unlabeled)
    p_labeled[chosen_labeled] = out_of_fold[: len(chosen_labeled)]
    p_unlabeled[chosen_unlabeled] = out_of_fold[len(chosen_labeled) :]
    p_labeled[left_out_labeled] = ensemble_labeled
    p_unlabeled[left_out_unlabeled] = ensemble_unlabeled
    return p_labeled, p_unlabeled


class DomainLikeness(Ordering):
    """Score = P(training) from a training-vs-application head on all layers, among the most
    uncertain tasks by default; lower = sooner."""

    name = "domain_likeness"
    needs_all_layers = True
    defaults = dict(DOMAIN_DEFAULTS)

    def score(self, data: OrderingInput) -> OrderingResult:
        settings = self.settings(data)
        probabilities = self.probabilities(data)
        if data.all_layers_unlabeled is None or data.all_layers_labeled is None:
            raise ValueError(
                "domain_likeness needs the pooled hidden states of every encoder layer: pass "
                "all_layers_labeled and all_layers_unlabeled (encode_with_cache(..., all_layers=True))"
            )
        if len(data.labels) == 0 or len(data.features_unlabeled) < 2:
            info = {"fallback": "random", "fallback_reason": "nothing labeled or nothing to order"}
            scores = np.random.default_rng(data.seed).random(len(data.features_unlabeled))
            return self.finish(data, scores, probabilities, info)
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
            scores = uncertainty_first(probabilities, p_training, candidates * data.batch_size)
            info["uncertainty_candidates"] = min(candidates * data.batch_size, len(scores))
        batch = None
        if settings["cluster_batch"]:
            batch = cluster_batch(data.features_unlabeled, scores, data.batch_size, data.seed)
            info["cluster_batch"] = len(batch)
        return self.finish(data, scores, probabilities, info, batch=batch)
