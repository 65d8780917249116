"""From a trained classifier to what Label Studio stores per task: score, cluster, mislabeling.

* **score** (lower = label sooner, always within [0, 1]: Label Studio drops predictions
  whose score lies outside): unlabeled tasks get their rank under the chosen ordering,
  scaled into [0, 0.9), the ordering's batch (ATLAS, class guard) first; labeled tasks get
  0.9 + 0.1 × the classifier's confidence, so an ascending sort shows every unlabeled task
  before any labeled one.
* **cluster**: k-means on the encoder vectors, so Label Studio Enterprise can rotate
  through clusters when it serves tasks.
* **mislabeling**: for labeled tasks, how strongly an out-of-fold classifier disagrees
  with the human label (0 when it agrees), so reviewers can sort suspicious labels first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from model.classifier import ClassifierHead, HeadConfig
from model.orderings import get_ordering
from model.orderings.base import OrderingInput


LABELED_FLOOR = 0.9


@dataclass
class QueueScores:
    scores: np.ndarray  # (n_tasks,)
    clusters: np.ndarray  # (n_tasks,) int
    mislabeling: np.ndarray  # (n_tasks,) 0..1, nonzero only for labeled tasks
    predicted: np.ndarray  # (n_tasks,) predicted class index
    info: dict = field(default_factory=dict)
    centroids: np.ndarray | None = None  # k-means centroids behind `clusters`, to reuse next time


def rank_scores(order: np.ndarray, n: int) -> np.ndarray:
    """Scores in [0, 1) that sort exactly as `order` (first = lowest)."""
    scores = np.empty(n, dtype=np.float64)
    scores[np.asarray(order)] = np.arange(n) / max(n, 1)
    return scores


def cluster_count(n: int, max_clusters: int = 50) -> int:
    """k for k-means over n tasks: about one cluster per 50 tasks' square root."""
    return int(np.clip(round(np.sqrt(n / 50)), 1, max_clusters))


def cluster_ids(features: np.ndarray, seed: int = 0, max_clusters: int = 50,
                centroids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(cluster id per task, centroids). With `centroids` from an earlier call whose k still
    fits this many tasks, tasks are assigned to the nearest one instead of fitting again:
    k-means is the slowest part of scoring a large project, and the clusters of a project
    change only when many tasks are added."""
    from sklearn.cluster import MiniBatchKMeans

    n = len(features)
    k = cluster_count(n, max_clusters)
    if k < 2:
        return np.zeros(n, dtype=int), None
    features = np.asarray(features, dtype=np.float32)
    if centroids is not None and len(centroids) == k and centroids.shape[1] == features.shape[1]:
        # Nearest centroid by squared distance, ||x||^2 dropped (the same for every centroid).
        distance = -2.0 * features @ centroids.T + (centroids ** 2).sum(axis=1)
        return distance.argmin(axis=1).astype(int), centroids
    model = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=3, batch_size=2048)
    ids = model.fit_predict(features).astype(int)
    return ids, model.cluster_centers_.astype(np.float32)


def out_of_fold_disagreement(features: np.ndarray, y: np.ndarray, config: HeadConfig,
                             folds: int = 3, seed: int = 0) -> np.ndarray:
    """1 - P(human label) from heads that never saw the task, where they predict otherwise."""
    n = len(y)
    result = np.zeros(n)
    if n < folds * 2 or len(np.unique(y)) < 2:
        return result
    rng = np.random.default_rng(seed)
    fold_of = rng.permutation(n) % folds
    for fold in range(folds):
        held_out = fold_of == fold
        if len(np.unique(y[~held_out])) < 2:
            continue
        head = ClassifierHead(config).fit(features[~held_out], y[~held_out])
        probabilities = head.predict_proba(features[held_out])
        disagree = probabilities.argmax(axis=1) != y[held_out]
        p_label = probabilities[np.arange(held_out.sum()), y[held_out]]
        result[held_out] = np.where(disagree, 1.0 - p_label, 0.0)
    return result


def queue_scores(
    features: np.ndarray,
    labels: list[int | None],
    head: ClassifierHead,
    ordering: str = "least_confidence",
    batch_size: int = 50,
    params: dict | None = None,
    all_layers: np.ndarray | None = None,
    seed: int = 0,
    centroids: np.ndarray | None = None,
) -> QueueScores:
    """Score every task of a project for Label Studio's queue.

    `centroids`: the project's cluster centroids from its previous scoring, if any (see
    `cluster_ids`); the ones used come back in `QueueScores.centroids` for the caller to keep.
    """
    n = len(features)
    labeled = np.array([i for i, label in enumerate(labels) if label is not None], dtype=int)
    unlabeled = np.array([i for i, label in enumerate(labels) if label is None], dtype=int)
    y = np.array([labels[i] for i in labeled], dtype=int)
    probabilities = head.predict_proba(features)
    predicted = probabilities.argmax(axis=1)
    confidence = probabilities.max(axis=1)

    scores = LABELED_FLOOR + (1 - LABELED_FLOOR) * confidence  # labeled: after every unlabeled
    info: dict = {"ordering": ordering}
    if len(unlabeled):
        chosen = get_ordering(ordering)
        data = OrderingInput(
            features_labeled=features[labeled],
            labels=y,
            features_unlabeled=features[unlabeled],
            classifier=head,
            all_layers_labeled=all_layers[labeled] if all_layers is not None else None,
            all_layers_unlabeled=all_layers[unlabeled] if all_layers is not None else None,
            batch_size=batch_size,
            seed=seed,
            params=dict(params or {}),
            probabilities_unlabeled=probabilities[unlabeled],
        )
        result = chosen.score(data)
        # Label Studio sorts by score alone: make the ordering's batch come first, then the
        # rest by the ordering's own scores, as ranks in [0, 1).
        rest = np.argsort(result.scores, kind="stable")
        first = [] if result.batch is None else [int(i) for i in result.batch]
        chosen_set = set(first)
        order = np.array(first + [int(i) for i in rest if int(i) not in chosen_set], dtype=int)
        scores[unlabeled] = LABELED_FLOOR * rank_scores(order, len(unlabeled))
        info.update(result.info or {})
        info["batch"] = len(first)

    mislabeling = np.zeros(n)
    if len(labeled):
        mislabeling[labeled] = out_of_fold_disagreement(features[labeled], y, head.config, seed=seed)
    clusters, centroids = cluster_ids(features, seed=seed, centroids=centroids)
    return QueueScores(scores=scores, clusters=clusters, mislabeling=mislabeling,
                       predicted=predicted, info=info, centroids=centroids)
