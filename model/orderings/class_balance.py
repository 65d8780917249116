"""The class guard: keep a batch from collapsing onto one predicted class.

Issue 5, point 7. An ordering that ranks by "likely wrong" or "unlike the training data" can
fill a whole batch with tasks the classifier predicts as one class (right after a domain
shift: every tweet looks negative). Labeling such a batch teaches the classifier the shortcut
"tweet => negative". The guard reserves part of each batch for every class the classifier
predicts in the pool, taking each class's best-ranked tasks, and otherwise keeps the
ordering's own ranking. It works for any ordering on plain arrays.
"""

from __future__ import annotations

import numpy as np


def class_quotas(predicted: np.ndarray, size: int, min_class_fraction: float) -> dict:
    """Minimum places in a batch of `size` per predicted class.

    `min_class_fraction` of the batch is split evenly over the classes predicted in the pool;
    every class gets at least one place (as long as the batch has room for one per class) and
    never more than it has tasks in the pool.
    """
    classes, counts = np.unique(np.asarray(predicted), return_counts=True)
    if len(classes) < 2 or size < 2:
        return {}
    each = max(1, int(min_class_fraction * size / len(classes)))
    each = min(each, max(1, size // len(classes)))
    return {int(c): int(min(each, n)) for c, n in zip(classes, counts)}


def balanced_batch(
    order: np.ndarray, predicted: np.ndarray, size: int, min_class_fraction: float
) -> np.ndarray:
    """The first `size` tasks of `order`, except that each predicted class gets its quota.

    Walks `order` (best first) and takes a task unless the places left are all needed for
    classes still short of their quota. The batch is a subsequence of `order`: its own
    ranking is kept, the guard only swaps the worst-ranked tasks of an over-full class for
    the best-ranked tasks of the short ones. With more classes than places, the classes
    whose best task ranks highest get one place each.
    """
    order = np.asarray(order)
    size = min(int(size), len(order))
    quotas = class_quotas(predicted[order], size, min_class_fraction)
    if not quotas:
        return order[:size]
    if sum(quotas.values()) > size:  # more classes than places: the best-ranked classes win
        seen: list[int] = []
        for c in predicted[order]:
            if int(c) not in seen:
                seen.append(int(c))
            if len(seen) == size:
                break
        quotas = {c: 1 for c in seen}
    have = {c: 0 for c in quotas}
    picked: list[int] = []
    for index in order:
        if len(picked) == size:
            break
        c = int(predicted[index])
        short = sum(max(0, quotas[k] - have[k]) for k in quotas)
        fills_need = c in quotas and have[c] < quotas[c]
        if fills_need or size - len(picked) > short:
            picked.append(int(index))
            if c in have:
                have[c] += 1
    return np.asarray(picked, dtype=np.int64)


def put_batch_first(scores: np.ndarray, batch: np.ndarray, rank_based: bool = False) -> np.ndarray:
    """Scores under which Label Studio (lowest first) serves `batch` first, in its order.

    Tasks outside the batch keep their score. Batch tasks keep theirs while they already sort
    first and in order (so a probability stays a probability where nothing moved); the rest
    of the batch, or all of it with `rank_based`, gets evenly spaced values below the lowest
    score outside the batch, in batch order.
    """
    scores = np.asarray(scores, dtype=np.float64).copy()
    batch = np.asarray(batch, dtype=np.int64)
    if len(batch) == 0:
        return scores
    outside = np.ones(len(scores), dtype=bool)
    outside[batch] = False
    floor = scores[outside].min() if outside.any() else np.inf
    kept = 0
    if not rank_based:
        previous = -np.inf
        for value in scores[batch]:
            if not (previous <= value < floor):
                break
            previous = value
            kept += 1
    rest = len(batch) - kept
    if rest == 0:
        return scores
    low = scores[batch[kept - 1]] if kept else (min(0.0, floor - 1.0) if np.isfinite(floor) else 0.0)
    high = floor if np.isfinite(floor) else low + 1.0
    if not high > low:  # a tie at the boundary: step just below it
        high = low = np.nextafter(high, -np.inf)
        scores[batch[kept:]] = low
        return scores
    scores[batch[kept:]] = np.linspace(low, high, rest + 2)[1:-1]
    return scores


def guard_batch(
    scores: np.ndarray,
    predicted: np.ndarray,
    batch_size: int,
    batch: np.ndarray | None = None,
    enabled: bool = True,
    min_class_fraction: float = 0.3,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """The batch an ordering serves first, guarded, and scores that serve it first.

    `batch` is the ordering's own ordered batch if it builds one (ATLAS); otherwise the batch
    is the `batch_size` lowest scores. Returns (scores, batch, info for the metadata).
    """
    scores = np.asarray(scores, dtype=np.float64)
    predicted = np.asarray(predicted)
    if batch is None:
        order = np.argsort(scores, kind="stable")
        proposed = order[: min(batch_size, len(order))]
        rank_based = False
    else:
        batch = np.asarray(batch, dtype=np.int64)
        rest = np.setdiff1d(np.arange(len(scores)), batch)
        order = np.concatenate([batch, rest[np.argsort(scores[rest], kind="stable")]])
        proposed = batch
        rank_based = True
    size = len(proposed)
    final = balanced_batch(order, predicted, size, min_class_fraction) if enabled else proposed
    moved = int(len(np.setdiff1d(final, proposed)))
    info = {
        "class_guard": bool(enabled),
        "class_guard_swapped": moved,
        "batch_predicted_classes": {
            str(int(c)): int(n) for c, n in zip(*np.unique(predicted[final], return_counts=True))
        } if len(final) else {},
    }
    if not rank_based and moved == 0:
        return scores, final, info
    return put_batch_first(scores, final, rank_based=rank_based), final, info
