"""Cold start: the queue's order before the first annotation, and a zero-shot first guess.

Before anyone labels there is no head, so no ordering of `model/orderings/` can run; Label
Studio would serve tasks in id order, and the first labels would be whatever was imported
first. Two things are known without labels: the encodings of the tasks, and (where the
choice names are words) the names themselves.

* **Representative and diverse** (`representative_order`): k-means on the L2-normalised
  encodings, then round-robin over the clusters, largest first: the task nearest each
  cluster's centroid, then the second nearest of each, and so on. The first k labels are
  each the most typical task of a different region of the pool. This is pre-clustering for
  active learning (Nguyen and Smeulders, "Active learning using pre-clustering", ICML
  2004) and the cluster-based sampling of Munro, *Human-in-the-Loop Machine Learning*,
  ch. 4 (sample the centroid of each cluster).
* **Zero-shot** (`zero_shot`): each choice name (in a short template) goes through the same
  encoder as the texts; a text's guess is the name it is most similar to (cosine), the
  "embedding similarity" zero-shot classifier (e.g. Veeranna et al. 2016; the idea behind
  SetFit's and sentence-transformers' zero-shot recipes). It pre-fills the labeling screen.
  `names_are_words` says when names carry meaning an encoder can use ("Positive",
  "billing question") and when they do not ("A", "c2", "LABEL_1").
* Both together (`representative_order(..., guess=...)`): the clusters' turns are
  interleaved by the guessed class of their central task, so consecutive picks alternate
  between guessed classes, and a rare class gets its first label early when the guess
  finds it.

Pure numpy plus scikit-learn's k-means; no encoder, Label Studio or Redis here (the
service's `backend/cold_start.py` feeds it cached encodings).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

# The sentences each choice name is put in before encoding; a name's vector is their mean
# (prompt ensembling). The template alone guessed better on the two-class airline tweets
# (78% against 73% for the bare name), the bare name on three classes (45% against 37%);
# the two together held up on both (78%, 44%; bench/cold_start.py prints them).
TEMPLATES = ("{name}", "This text is about {name}.")
# Clusters of the representative order: the first this many labels each come from another
# cluster (more than the pool has tasks is capped). 100 covers the span the cold start is
# measured on (the first 50 and 100 labels): with 50, labels 51-100 were each cluster's
# second most central task, near copies of the first (3 seeds of bench/cold_start.py, three
# classes: accuracy at 100 labels 68.2 with 50 clusters, 71.8 with 100, random 69.9).
DEFAULT_CLUSTERS = 100
# The orders a project can start with (the service's COLD_START_ORDER, default kmeans: the
# winner of bench/cold_start.py's comparison with random).
ORDERS = ("kmeans", "zero_shot", "zero_shot_kmeans", "random")
# Above this many tasks k-means runs on mini-batches (seconds at 100,000 tasks, not minutes).
FULL_KMEANS_LIMIT = 20000

_WORD = re.compile(r"[^\W\d_]{3,}")  # three letters or more, any script
_CODE = re.compile(r"^(label|class|cat|category|option|choice|tag|type)[\s_-]*\d+$", re.IGNORECASE)


@dataclass
class ColdStartOrder:
    """The cold-start queue: `order` lists task positions, first to serve first; `clusters`
    is the k-means cluster of each task (Label Studio's `cluster` field)."""

    order: np.ndarray  # (n,) int, a permutation of range(n)
    clusters: np.ndarray  # (n,) int

    def ranks(self) -> np.ndarray:
        """Each task's place in `order` (0 = served first)."""
        ranks = np.empty(len(self.order), dtype=np.int64)
        ranks[self.order] = np.arange(len(self.order))
        return ranks


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero), so dot products are cosines."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


def kmeans(features: np.ndarray, n_clusters: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(cluster id per row, centroids) of k-means on `features` (scikit-learn's)."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    if len(features) > FULL_KMEANS_LIMIT:
        model = MiniBatchKMeans(n_clusters=n_clusters, random_state=seed, n_init=3, batch_size=4096)
    else:
        model = KMeans(n_clusters=n_clusters, random_state=seed, n_init=3, max_iter=100)
    ids = model.fit_predict(features).astype(np.int64)
    return ids, model.cluster_centers_.astype(np.float32)


def kmeans_centroids(features: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The mean of each cluster's normalised rows (the centroids behind `ids`)."""
    x = normalise(features)
    return np.stack([x[ids == c].mean(axis=0) if (ids == c).any() else np.zeros(x.shape[1], np.float32)
                     for c in range(int(ids.max()) + 1)])


def representative_order(features: np.ndarray, n_clusters: int = DEFAULT_CLUSTERS, seed: int = 0,
                         guess: np.ndarray | None = None,
                         clustering: tuple[np.ndarray, np.ndarray] | None = None) -> ColdStartOrder:
    """Every task in cold-start order: round-robin over k-means clusters, nearest to the
    centroid first within each.

    Clusters take their turns largest first; with `guess` (a guessed class per task, e.g.
    `zero_shot(...).argmax(1)`), the turns alternate between the guessed classes of the
    clusters' central tasks instead (each class's clusters largest first), so the first
    picks spread over the classes the guess sees. `clustering` (ids, centroids) of an
    earlier call on the same features skips k-means.
    """
    x = normalise(features)
    n = len(x)
    if n == 0:
        return ColdStartOrder(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    if n_clusters < 1:
        raise ValueError(f"n_clusters must be at least 1, got {n_clusters}")
    k = min(n_clusters, n, len(np.unique(x, axis=0)))  # k-means cannot make more clusters than points
    if clustering is not None:
        ids, centroids = clustering
    elif k < 2:
        ids, centroids = np.zeros(n, dtype=np.int64), x.mean(axis=0, keepdims=True)
    else:
        ids, centroids = kmeans(x, k, seed)
    # Cosine distance to the own centroid (centroids are not unit length: normalise them).
    distance = 1.0 - np.einsum("ij,ij->i", x, normalise(centroids)[ids])
    members = [np.flatnonzero(ids == c) for c in range(len(centroids))]
    members = [m[np.lexsort((m, distance[m]))] for m in members]  # nearest first, ties by position
    turns = sorted((c for c in range(len(members)) if len(members[c])),
                   key=lambda c: (-len(members[c]), c))
    if guess is not None:
        turns = _interleave_by(turns, {c: int(np.asarray(guess)[members[c][0]]) for c in turns})
    order = [m[r] for r in range(max(len(m) for m in members)) for m in (members[c] for c in turns)
             if r < len(m)]
    return ColdStartOrder(np.asarray(order, dtype=np.int64), ids)


def _interleave_by(items: list, group_of: dict) -> list:
    """`items` reordered round-robin over their groups, each group keeping its own order;
    groups take turns in the order of their first item."""
    groups: dict = {}
    for item in items:
        groups.setdefault(group_of[item], []).append(item)
    queues = list(groups.values())
    return [q[r] for r in range(max(len(q) for q in queues)) for q in queues if r < len(q)]


def zero_shot(text_vectors: np.ndarray, name_vectors: np.ndarray, temperature: float = 0.05) -> np.ndarray:
    """(n_texts, n_names) probabilities: a softmax over each text's cosine similarity to
    each choice name's vector, sharpened by `temperature`.

    Cosines of one sentence encoder span a narrow range (0.0-0.4 for MiniLM and short
    names), hence the low temperature; only the order of a row matters for the guess, the
    spread for the margin.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    similarity = normalise(text_vectors) @ normalise(name_vectors).T
    logits = similarity / temperature
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


def zero_shot_order(probabilities: np.ndarray) -> np.ndarray:
    """Every task, round-robin over the guessed classes: the task most surely of each
    guessed class first, then the next of each (the zero-shot order without clusters)."""
    p = np.asarray(probabilities)
    guess = p.argmax(axis=1)
    surest = p[np.arange(len(p)), guess]
    queues = [idx[np.lexsort((idx, -surest[idx]))] for c in range(p.shape[1])
              if len(idx := np.flatnonzero(guess == c))]
    if not queues:
        return np.zeros(0, dtype=np.int64)
    # Classes take turns, the one with the most guessed tasks first.
    queues.sort(key=len, reverse=True)
    return np.asarray([q[r] for r in range(len(queues[0])) for q in queues if r < len(q)], dtype=np.int64)


def names_are_words(names: list[str] | tuple[str, ...]) -> bool:
    """True when every choice name has a word in it that an encoder can read ("Positive",
    "off-topic", "Very good"), False for codes ("A", "c2", "1", "LABEL_3", "class 2") or
    names that are the same once letters alone are kept."""
    if len(names) < 2:
        return False
    words = []
    for name in names:
        name = str(name).strip()
        if not _WORD.search(name) or _CODE.match(name):
            return False
        words.append(" ".join(_WORD.findall(name)).lower())
    return len(set(words)) == len(words)


def sentences_for(names: list[str] | tuple[str, ...], templates: tuple[str, ...] = TEMPLATES) -> list[str]:
    """The texts to encode for the choice names: each template (with `{name}`) for every
    name, template by template; `name_vectors` averages their encodings back per name."""
    return [template.format(name=str(name).strip()) for template in templates for name in names]


def name_vectors(encoded: np.ndarray, n_names: int) -> np.ndarray:
    """(n_names, dim): the mean unit vector of each name's sentences (`sentences_for`'s order)."""
    encoded = normalise(encoded)
    if len(encoded) % n_names:
        raise ValueError(f"{len(encoded)} encodings cannot be {n_names} names' sentences")
    return encoded.reshape(-1, n_names, encoded.shape[1]).mean(axis=0)
