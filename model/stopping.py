"""When labeling more stops paying: the stopping signals of one model version.

Every retrain can say, from numbers it already has, whether the model is still changing:

* **Agreement with an earlier version** on a fixed *stop set* of tasks (Cohen's kappa),
  and the *stabilizing predictions* criterion: stop when the mean kappa of the last
  `window` (3) comparisons reaches `threshold`. Source: Bloodgood and Vijay-Shanker, "A
  Method for Stopping Active Learning Based on Stabilizing Predictions and the Need for
  User-Adjustable Stopping", CoNLL 2009. Their models were a batch of labels apart; here a
  version is compared with the last *reference* version at least `spacing` (50) labels
  before it, since the service retrains after almost every annotation. The stop set needs
  no labels, so it can be large; it is picked by a hash of the task id (`stop_set`), so it
  stays the same across versions while tasks are added or removed.
* **Mean uncertainty** of the unlabeled pool (normalised entropy, 0 certain .. 1 uniform).
* **Predicted-incorrect rate** of the pool: the mean of 1 - p_max, the error rate the
  model expects of itself. It is only as good as the model's calibration; a neural head is
  usually overconfident, so this leans **optimistic** (too few errors).
* **Out-of-fold accuracy and macro-F1** on the labeled tasks: each label predicted by a
  head that did not see it. Labels chosen by active learning are **not a random sample** of
  the project: the ordering picked the tasks the model found hardest, so these estimates
  lean **pessimistic** for the project as a whole (and each fold's head saw fewer labels
  than the real one). The two estimates bracket the truth; neither is a test set.
* A **verdict** in plain words: "still learning" or "predictions have stabilised".

Everything here is a pure function of numpy arrays and plain dicts (no model, no I/O), so
the retrain computes it in milliseconds at 10,000 tasks. A version keeps two things: the
JSON-ready dict of `stopping_signals` in its meta, which carries the points of earlier
comparisons, so the learning curve and the kappa window survive the pruning of old
versions (it grows by about 300 bytes per comparison, one per `spacing` labels); and the
stop-set reference that `version_point` hands on (about 15 KB), so the next version can be
compared with it.

Several controls (several `<Choices>` of one project): compute a point per control with
that control's arrays, then `combine_controls`: the worst control decides (the lowest
kappa, the highest uncertainty and predicted-incorrect rate; stabilised only when every
control is).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

import numpy as np

from model.orderings.least_confidence import other_classes_probability

STOP_SET_SIZE = 1000
WINDOW = 3  # successive kappas averaged, as in Bloodgood and Vijay-Shanker (2009)
# Their default is 0.99. Replayed on the airline tweets (bench/stopping_check.py: pools of
# 2,000, batches of 50, 3 seeds each), 0.99 fired 450-550 labels after the test accuracy had
# flattened with two classes, and within 1,000 labels in only one seed of three with three
# classes; 0.98 fired 100-550 labels after the flattening, within 1.2 points of the best
# accuracy of the run. Lower stops sooner, at a larger risk of stopping early.
THRESHOLD = 0.98
# Labels between two compared versions. The criterion compares models a batch of labels
# apart; the service retrains after almost every annotation, and two versions one label
# apart agree almost perfectly long before the model has stopped learning.
SPACING = 50
HISTORY_LIMIT = 1000  # comparisons kept in a version's history (50,000 labels at the default spacing)

STILL_LEARNING = "still learning"
STABILISED = "predictions have stabilised"

# The caveat shown beside the out-of-fold numbers, in the JSON and on the page.
OUT_OF_FOLD_CAVEAT = (
    "Labels chosen by active learning are not a random sample: the queue served the tasks "
    "the model found hardest, so out-of-fold accuracy and macro-F1 lean pessimistic for the "
    "project as a whole. The predicted-incorrect rate is the model's own estimate and leans "
    "optimistic when the model is overconfident."
)


def _task_hash(task_id) -> int:
    # blake2b, not Python's hash(): that one is salted per process (PYTHONHASHSEED), and the
    # stop set must be the same in every worker and every retrain.
    digest = hashlib.blake2b(str(task_id).encode(), digest_size=8, person=b"atl-stopset").digest()
    return int.from_bytes(digest, "big")


def stop_set(task_ids: Sequence, size: int = STOP_SET_SIZE) -> np.ndarray:
    """The task ids of the stop set: the `size` tasks with the smallest hash of their id.

    A bottom-k sample by hash is the same set whatever order the ids come in, and adding or
    removing tasks changes it only at the margin: a task of the old set leaves only when
    it is removed or when a new task with a smaller hash pushes it out (so every task of
    the new set that already existed was in the old set). Kappa is computed on the tasks
    both versions' sets share. Labeled tasks stay in the set: the criterion compares two
    models' predictions, and the human labels play no part in it.
    """
    if size < 1:
        raise ValueError(f"the stop set needs at least 1 task, got size={size}")
    ids = list(task_ids)
    if not ids:
        return np.array([], dtype=object)
    hashes = np.fromiter((_task_hash(t) for t in ids), dtype=np.uint64, count=len(ids))
    if len(ids) <= size:
        chosen = np.argsort(hashes, kind="stable")
    else:
        chosen = np.argpartition(hashes, size - 1)[:size]
        chosen = chosen[np.argsort(hashes[chosen], kind="stable")]
    return np.asarray(ids, dtype=object)[chosen]


def cohen_kappa(a: Sequence, b: Sequence) -> float:
    """Cohen's kappa between two raters' labels of the same items (any hashable labels).

    scikit-learn computes it; the one case it leaves undefined (nan, with a warning) is
    both raters giving every item the same single label, which is perfect agreement of
    two models that have not yet learnt to tell classes apart: that is 1.0 here, as a
    version that repeats its predecessor exactly has stopped changing.
    """
    from sklearn.metrics import cohen_kappa_score

    a, b = list(a), list(b)
    if len(a) != len(b):
        raise ValueError(f"kappa needs the same items rated twice: got {len(a)} and {len(b)} labels")
    if not a:
        raise ValueError("kappa of zero items is undefined: the stop set is empty")
    if a == b:
        return 1.0
    # Map both to indices of their union: labels may be strings, ints, or a mix of versions.
    names = {label: i for i, label in enumerate(dict.fromkeys(a + b))}
    return float(cohen_kappa_score([names[x] for x in a], [names[x] for x in b]))


def stop_set_predictions(task_ids: Sequence, predicted: Sequence, size: int = STOP_SET_SIZE) -> dict:
    """What a version stores of its predictions for the next version's kappa.

    `task_ids` and `predicted` (the label predicted for each task, e.g. its name) cover the
    project's tasks; the result keeps the stop set's: `{"task_ids": [...], "predicted": [...]}`
    (JSON-ready, about 15 KB at the default size).
    """
    if len(task_ids) != len(predicted):
        raise ValueError(f"{len(task_ids)} task ids but {len(predicted)} predictions")
    chosen = stop_set(task_ids, size)
    position = {task_id: i for i, task_id in enumerate(task_ids)}
    return {"task_ids": [_plain(t) for t in chosen],
            "predicted": [_plain(predicted[position[t]]) for t in chosen]}


def agreement(previous: Mapping | None, current: Mapping | None) -> dict:
    """Kappa between two versions' stop-set predictions (`stop_set_predictions`), on the
    tasks both share: `{"kappa": float | None, "compared": n}`; None when there is nothing
    to compare (the first version, or no shared task)."""
    if not previous or not current:
        return {"kappa": None, "compared": 0}
    before = dict(zip(previous["task_ids"], previous["predicted"], strict=True))
    shared = [(before[t], p) for t, p in zip(current["task_ids"], current["predicted"], strict=True)
              if t in before]
    if not shared:
        return {"kappa": None, "compared": 0}
    old, new = zip(*shared)
    return {"kappa": cohen_kappa(old, new), "compared": len(shared)}


def pool_uncertainty(probabilities: np.ndarray) -> float | None:
    """Mean normalised entropy of the unlabeled pool's predictions: 0 = every prediction
    certain, 1 = every prediction uniform. None for an empty pool."""
    p = _probabilities(probabilities)
    if len(p) == 0:
        return None
    k = p.shape[1]
    if k < 2:
        return 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    return float(np.clip(entropy / math.log(k), 0.0, 1.0).mean())


def predicted_incorrect_rate(probabilities: np.ndarray) -> float | None:
    """Share of the pool the model expects to get wrong: mean of 1 - p_max. It equals the
    true error rate only for a calibrated model; an overconfident one makes it too low."""
    p = _probabilities(probabilities)
    if len(p) == 0:
        return None
    return float(other_classes_probability(p).mean())


def out_of_fold_quality(y_true: Sequence, y_out_of_fold: Sequence) -> dict:
    """Accuracy and macro-F1 of out-of-fold predictions of the labeled tasks.

    `y_out_of_fold[i]` is the label a head that never saw task i predicts for it; None (or
    a negative int) where no such head exists (a fold with a single class), and those tasks
    are left out. Macro-F1 averages over the classes present in the labels. See the module
    docstring: labels picked by active learning make both lean pessimistic.
    """
    if len(y_true) != len(y_out_of_fold):
        raise ValueError(f"{len(y_true)} labels but {len(y_out_of_fold)} out-of-fold predictions")
    pairs = [(t, p) for t, p in zip(y_true, y_out_of_fold, strict=True) if not _missing(p)]
    if not pairs:
        return {"accuracy": None, "macro_f1": None, "n": 0}
    from sklearn.metrics import accuracy_score, f1_score

    truth, guess = (list(x) for x in zip(*pairs))
    names = {label: i for i, label in enumerate(dict.fromkeys(truth + guess))}
    truth = [names[x] for x in truth]
    guess = [names[x] for x in guess]
    return {"accuracy": float(accuracy_score(truth, guess)),
            "macro_f1": float(f1_score(truth, guess, labels=sorted(set(truth)), average="macro",
                                       zero_division=0)),
            "n": len(pairs)}


def version_point(labeled: int, stop_set_now: Mapping, reference: Mapping | None,
                  pool_probabilities: np.ndarray, y_true: Sequence = (), y_out_of_fold: Sequence = (),
                  spacing: int = SPACING, version: str | None = None) -> tuple[dict, dict]:
    """The numbers of one version (of one control), and the reference the next one compares with.

    `labeled`: tasks labeled for this control; `stop_set_now`: this version's
    `stop_set_predictions`; `reference`: what the previous version handed on (None for the
    first version, or one trained before this existed); `pool_probabilities`: (n_unlabeled,
    n_classes) of this version on the unlabeled tasks; `y_true` / `y_out_of_fold`: the
    labeled tasks' labels and their out-of-fold predictions (empty when not computed);
    `version`: its name where known (the store names a version only when staging it).

    A version `spacing` labels or more away from the reference is a *comparison*: its point
    gets the kappa with the reference, and it becomes the next reference. A version closer
    than that gets no kappa and hands the same reference on. Without a reference the version
    becomes one, and the window of the criterion starts again. Returns (point, reference):
    the point goes into the history (`next_signals`), the reference is kept with the version
    (JSON-ready, about 15 KB) for the next retrain.
    """
    if spacing < 1:
        raise ValueError(f"spacing is a number of labels, at least 1, got {spacing}")
    quality = out_of_fold_quality(y_true, y_out_of_fold)
    point = {
        "version": version,
        "labeled": int(labeled),
        "kappa": None,
        "compared": 0,
        "reference_labeled": None,
        "comparison": False,
        "restart": False,
        "pool": int(len(pool_probabilities)),
        "uncertainty": pool_uncertainty(pool_probabilities),
        "predicted_incorrect": predicted_incorrect_rate(pool_probabilities),
        "oof_accuracy": quality["accuracy"],
        "oof_macro_f1": quality["macro_f1"],
        "oof_n": quality["n"],
    }
    own = {"task_ids": list(stop_set_now["task_ids"]), "predicted": list(stop_set_now["predicted"]),
           "labeled": int(labeled), "version": version}
    usable = bool(reference) and isinstance(reference.get("labeled"), int)
    if not usable:
        point["restart"] = True
        return point, own
    if abs(int(labeled) - reference["labeled"]) < spacing:
        return point, dict(reference)
    kappa = agreement(reference, stop_set_now)
    point.update(kappa=kappa["kappa"], compared=kappa["compared"], comparison=True,
                 reference_labeled=reference["labeled"], restart=kappa["kappa"] is None)
    return point, own


def stopping_signals(history: Sequence[Mapping], window: int = WINDOW,
                     threshold: float = THRESHOLD) -> dict:
    """The stopping signals of the newest version, from the points of every version so far
    (`version_point`, oldest first, the newest last).

    `history` is the previous version's `stopping_signals(...)["history"]` plus this
    version's point; the result (JSON-ready) is what a version keeps in its meta under
    "stopping". Stabilised when there have been `window` comparisons since the last
    restart and the mean kappa of the last `window` is at least `threshold`.
    """
    if window < 1:
        raise ValueError(f"window must be at least 1 comparison, got {window}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold is a kappa in (0, 1], got {threshold}")
    if not history:
        raise ValueError("stopping_signals needs at least this version's point")
    # Versions between comparisons add nothing the curve needs once a newer one exists: a
    # project retrained per annotation keeps one point per comparison, not one per label.
    last = len(history) - 1
    points = [dict(p) for i, p in enumerate(history)
              if i == last or p.get("kappa") is not None or p.get("restart")][-HISTORY_LIMIT:]
    latest = points[-1]
    # The window holds the last `window` comparisons; versions between comparisons do not
    # count, and a restart (no reference to compare with) starts the count again.
    recent: list[float] = []
    for point in reversed(points):
        if point.get("restart") or len(recent) == window:
            break
        if point.get("kappa") is not None:
            recent.append(float(point["kappa"]))
    recent.reverse()
    mean = sum(recent) / len(recent) if recent else None
    stabilised = len(recent) == window and mean is not None and mean >= threshold
    if stabilised:
        reason = (f"the last {window} comparisons of versions agreed on a mean kappa of "
                  f"{mean:.3f} (at least {threshold}): more labels of the kind the queue serves "
                  f"are unlikely to change the model's predictions much")
    elif len(recent) < window:
        reason = (f"{len(recent)} of the {window} comparisons of versions the criterion needs "
                  f"so far")
    else:
        reason = (f"the last {window} comparisons of versions agreed on a mean kappa of "
                  f"{mean:.3f}, below {threshold}: the predictions are still changing")
    return {
        "verdict": STABILISED if stabilised else STILL_LEARNING,
        "stabilised": stabilised,
        "reason": reason,
        "kappa": recent[-1] if recent else None,  # the latest comparison's
        "kappa_window": recent,
        "kappa_mean": mean,
        "window": window,
        "threshold": threshold,
        "uncertainty": latest.get("uncertainty"),
        "predicted_incorrect": latest.get("predicted_incorrect"),
        "oof_accuracy": latest.get("oof_accuracy"),
        "oof_macro_f1": latest.get("oof_macro_f1"),
        "oof_n": latest.get("oof_n"),
        "labeled": latest.get("labeled"),
        "caveat": OUT_OF_FOLD_CAVEAT,
        "history": points,
    }


def next_signals(previous_signals: Mapping | None, point: Mapping, window: int = WINDOW,
                 threshold: float = THRESHOLD) -> dict:
    """`stopping_signals` of a new version, given the previous version's (its meta's
    "stopping", or None for the first version or one trained before this existed)."""
    history = list((previous_signals or {}).get("history") or [])
    return stopping_signals(history + [dict(point)], window=window, threshold=threshold)


def combine_controls(per_control: Mapping[str, Mapping]) -> dict:
    """One set of signals for a project with several controls, from each control's
    `stopping_signals`: the worst control decides. The project has stabilised only when
    every control has; its kappa is the lowest, its uncertainty and predicted-incorrect rate
    the highest, its out-of-fold accuracy and macro-F1 the lowest. The controls' own signals
    are kept whole under "controls": the next version chains each control on its own,
    `next_signals(previous["controls"][name], point_of_that_control)`."""
    if not per_control:
        raise ValueError("combine_controls needs the signals of at least one control")
    signals = list(per_control.values())
    stabilised = all(s.get("stabilised") for s in signals)
    unsettled = [name for name, s in per_control.items() if not s.get("stabilised")]
    combined = {
        "verdict": STABILISED if stabilised else STILL_LEARNING,
        "stabilised": stabilised,
        "reason": ("every control's predictions have stabilised" if stabilised
                   else f"still changing: {', '.join(unsettled)}"),
        "kappa": _worst(signals, "kappa", min),
        "uncertainty": _worst(signals, "uncertainty", max),
        "predicted_incorrect": _worst(signals, "predicted_incorrect", max),
        "oof_accuracy": _worst(signals, "oof_accuracy", min),
        "oof_macro_f1": _worst(signals, "oof_macro_f1", min),
        "caveat": OUT_OF_FOLD_CAVEAT,
        "controls": {name: dict(s) for name, s in per_control.items()},
    }
    return combined


def _worst(signals: list[Mapping], key: str, pick) -> float | None:
    values = [s[key] for s in signals if s.get(key) is not None]
    return pick(values) if values else None


def _probabilities(probabilities) -> np.ndarray:
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probabilities must be (tasks, classes), got shape {p.shape}")
    return p


def _missing(label) -> bool:
    return label is None or (isinstance(label, (int, np.integer)) and label < 0)


def _plain(value):
    """numpy scalars to Python ones, for JSON."""
    return value.item() if isinstance(value, np.generic) else value
