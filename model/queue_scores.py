"""From a trained classifier to what Label Studio stores per task: score, cluster, mislabeling.

* **score** (lower = label sooner, always within [0, 1]: Label Studio drops predictions
  whose score lies outside): unlabeled tasks get their rank under the chosen ordering,
  scaled into [0, 0.9), the ordering's batch (ATLAS, class guard) first; labeled tasks get
  0.9 + 0.1 × the classifier's confidence, so an ascending sort shows every unlabeled task
  before any labeled one.
* **cluster**: k-means on the encoder vectors, so Label Studio Enterprise can rotate
  through clusters when it serves tasks.
* **mislabeling**: for labeled tasks, how strongly an out-of-fold classifier prefers another
  label where confident learning finds evidence against the human one (`model.mislabeling`;
  0 elsewhere), so reviewers can sort suspicious labels first.

Several controls (`queue_scores_multi`): the ordering combines the heads (its docstring
says how); a labeled task's confidence is the lowest over its controls
(`ControlHeads.confidence`), and its mislabeling the strongest over the controls it
answers (multi-label: over its choices; `model.mislabeling` says how). The retrain's one
out-of-fold pass (`model.heads.ControlHeads.out_of_fold`, with the ordering's `folds`, else
3) serves the mislabeling score and the ordering alike; `train_heads` hands it over, else it runs here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from model import mislabeling
from model.classifier import ClassifierHead, HeadConfig
from model.heads import ControlHeads, OutOfFold, labeled_tasks
from model.orderings import DEFAULT_ORDERING, get_ordering
from model.orderings.base import OrderingInput
from model.threads import on_one_thread

# Folds of the out-of-fold pass when the ordering has no `folds` of its own.
MISLABELING_FOLDS = 3


LABELED_FLOOR = 0.9


@dataclass
class QueueScores:
    scores: np.ndarray  # (n_tasks,)
    clusters: np.ndarray  # (n_tasks,) int
    mislabeling: np.ndarray  # (n_tasks,) 0..1, nonzero only for labeled tasks
    predicted: np.ndarray  # (n_tasks,) predicted class index of the first control
    info: dict = field(default_factory=dict)
    centroids: np.ndarray | None = None  # k-means centroids behind `clusters`, to reuse next time
    # Per control: predicted label index (n_tasks,), or chosen choices (n_tasks, n_choices)
    # bool for multi-label; and each head's probabilities.
    predictions: list = field(default_factory=list)
    probabilities: list = field(default_factory=list)
    confidence: np.ndarray | None = None  # (n_tasks,) ControlHeads.confidence
    out_of_fold: OutOfFold | None = None  # the pass used, over the labeled tasks


def rank_scores(order: np.ndarray, n: int) -> np.ndarray:
    """Scores in [0, 1) that sort exactly as `order` (first = lowest)."""
    scores = np.empty(n, dtype=np.float64)
    scores[np.asarray(order)] = np.arange(n) / max(n, 1)
    return scores


def cluster_count(n: int, max_clusters: int = 50) -> int:
    """k for k-means over n tasks: about one cluster per 50 tasks' square root."""
    return int(np.clip(round(np.sqrt(n / 50)), 1, max_clusters))


# One thread: a first fit of 11,000 vectors took 0.2-0.3 s instead of 3-10 s at load 7 (model/threads.py).
@on_one_thread
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


def disagreement(heads: ControlHeads, oof: OutOfFold, targets: list[np.ndarray],
                 features: list[np.ndarray] | None = None) -> np.ndarray:
    """Mislabeling per task of the out-of-fold pass: confident learning's verdict
    (`model.mislabeling`: the rule, its thresholds and what the value means), the strongest
    over the controls the task answers; 0 where no control has evidence against its label.
    `features[i]`: control i's input for the same tasks, for the neighbours' second opinion
    (None: the heads' opinion alone)."""
    n = len(oof.probabilities[0])
    result = np.zeros(n)
    for i, (head, p, scored, t) in enumerate(zip(heads.heads, oof.probabilities, oof.scored, targets)):
        t = np.asarray(t)
        # Rows the pass did not score (answered but left out) say nothing.
        t = np.where(scored if t.ndim == 1 else scored[:, None], t, -1)
        rule = mislabeling.multi_label if getattr(head, "multi_label", False) else mislabeling.single_choice
        result = np.maximum(result, rule(p, t, None if features is None else features[i]))
    return result


def out_of_fold_disagreement(features: np.ndarray, y: np.ndarray, config: HeadConfig,
                             folds: int = MISLABELING_FOLDS, seed: int = 0) -> np.ndarray:
    """Mislabeling per task from heads that never saw it and from its nearest labeled
    neighbours (one single-choice control; see `disagreement`)."""
    heads = ControlHeads.single(ClassifierHead(config))
    y = np.asarray(y, dtype=np.int64)
    if len(y) < 2:
        return np.zeros(len(y))
    features = np.asarray(features, dtype=np.float32)
    oof = heads.out_of_fold([features], [y], folds=folds, seed=seed)
    return disagreement(heads, oof, [y], [features])


def out_of_fold_folds(ordering: str, params: dict | None = None) -> int:
    """Folds of the retrain's one out-of-fold pass: the ordering's checked `folds`
    (predicted_incorrect, atlas), else MISLABELING_FOLDS. Give it to `train_heads`."""
    settings, _ = get_ordering(ordering).checked(params)
    return int(settings.get("folds", MISLABELING_FOLDS))


def queue_scores(
    features: np.ndarray,
    labels: list[int | None],
    head: ClassifierHead,
    ordering: str = DEFAULT_ORDERING,
    batch_size: int = 50,
    params: dict | None = None,
    all_layers: np.ndarray | None = None,
    seed: int = 0,
    centroids: np.ndarray | None = None,
) -> QueueScores:
    """Score every task of a project with one single-choice control for Label Studio's queue.

    `labels`: the label index per task, None where unlabeled. `centroids`: the project's
    cluster centroids from its previous scoring, if any (see `cluster_ids`); the ones used
    come back in `QueueScores.centroids` for the caller to keep.
    """
    targets = np.array([-1 if label is None else int(label) for label in labels], dtype=np.int64)
    return queue_scores_multi(features, ControlHeads.single(head), [features], [targets],
                              ordering=ordering, batch_size=batch_size, params=params,
                              all_layers=all_layers, seed=seed, centroids=centroids)


def queue_scores_multi(
    task_features: np.ndarray,
    heads: ControlHeads,
    head_features: list[np.ndarray],
    targets: list[np.ndarray],
    ordering: str = DEFAULT_ORDERING,
    batch_size: int = 50,
    params: dict | None = None,
    all_layers: np.ndarray | None = None,
    seed: int = 0,
    centroids: np.ndarray | None = None,
    out_of_fold: OutOfFold | None = None,
) -> QueueScores:
    """Score every task of a project with one head per control for Label Studio's queue.

    `task_features` (n, dim): each task's input, every text object's vector side by side
    (`model.heads.concat_inputs`): the clusters and domain-likeness look at it, and
    `all_layers` (n, layers, dim) is its all-layer version. `head_features[i]` and
    `targets[i]` (over all n tasks, `model.heads.encode_targets`) are control i's input and
    answers. A task is labeled when it answers any control (`model.heads.labeled_tasks`);
    `out_of_fold`, if given, is the pass over exactly those tasks in that order
    (`model.heads.train_heads`), else it runs here.
    """
    n = len(task_features)
    labeled = labeled_tasks(targets)
    is_labeled = np.zeros(n, dtype=bool)
    is_labeled[labeled] = True
    unlabeled = np.flatnonzero(~is_labeled)
    probabilities = heads.predict_proba(head_features)
    predictions = heads.predict(probabilities)
    confidence = heads.confidence(probabilities)
    chosen = get_ordering(ordering)
    labeled_targets = [np.asarray(t)[labeled] for t in targets]
    if out_of_fold is None and len(labeled) >= 2:
        out_of_fold = heads.out_of_fold([np.asarray(x, dtype=np.float32)[labeled] for x in head_features],
                                        labeled_targets, folds=out_of_fold_folds(ordering, params), seed=seed)

    scores = LABELED_FLOOR + (1 - LABELED_FLOOR) * confidence  # labeled: after every unlabeled
    info: dict = {"ordering": ordering}
    if len(unlabeled):
        data = OrderingInput(
            features_labeled=task_features[labeled],
            labels=labeled_targets[0],
            features_unlabeled=task_features[unlabeled],
            classifier=heads.heads[0],
            all_layers_labeled=all_layers[labeled] if all_layers is not None else None,
            all_layers_unlabeled=all_layers[unlabeled] if all_layers is not None else None,
            batch_size=batch_size,
            seed=seed,
            params=dict(params or {}),
            probabilities_unlabeled=probabilities[0][unlabeled],
            heads=heads,
            head_features_labeled=[np.asarray(x)[labeled] for x in head_features],
            head_features_unlabeled=[np.asarray(x)[unlabeled] for x in head_features],
            targets=labeled_targets,
            head_probabilities_unlabeled=[p[unlabeled] for p in probabilities],
            out_of_fold=out_of_fold,
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
    if out_of_fold is not None:
        mislabeling[labeled] = disagreement(heads, out_of_fold, labeled_targets,
                                            [np.asarray(x)[labeled] for x in head_features])
    clusters, centroids = cluster_ids(task_features, seed=seed, centroids=centroids)
    # The first control's class per task (multi-label: its most likely choice).
    predicted = np.asarray(probabilities[0]).argmax(axis=1)
    return QueueScores(scores=scores, clusters=clusters, mislabeling=mislabeling, predicted=predicted,
                       info=info, centroids=centroids, predictions=predictions,
                       probabilities=probabilities, confidence=confidence, out_of_fold=out_of_fold)
