"""Which human labels an out-of-fold classifier has real evidence against: confident learning.

Northcutt, Jiang and Chuang, "Confident Learning: Estimating Uncertainty in Dataset Labels",
JAIR 70 (2021). Every labeled task's probabilities come from a head that never trained on
it (the retrain's one out-of-fold pass, `model.heads.ControlHeads.out_of_fold`). A plain
"the argmax differs" rule flags far too much: a head trained on a few hundred labels is
unsure about many correct ones (on a project labeled with gold labels it flagged 17 of 38).
Confident learning asks instead whether the head is as sure of another class as it usually
is of that class's own examples.

**Single-choice**, per control. Classes with fewer than `MIN_CLASS_LABELS` answers get no
threshold (their mean is noise; a head that saw four examples of a class is unsure of all of
them). For each class j with enough answers, the threshold is the mean out-of-fold P(j)
over the tasks labeled j (the paper's per-class threshold t_j). A task labeled i is
**flagged** when

1. i has a threshold (enough answers of its own class), and
2. its confident-joint assignment is another class j: among the classes whose threshold
   its P reaches (P(j) >= t_j), j has the largest P (the paper's confident joint counts
   the task in the off-diagonal cell (i, j)), and
3. P(j) > P(i): the head prefers j outright. The paper counts a task whose own class
   has a high threshold it misses even when P(i) is the larger; we do not, so a flag
   always means the head would rather have answered j.

Its **mislabeling** value is P(j) - P(i), in (0, 1]: how far the head prefers the other
class; every other task gets 0. Nothing is flagged when fewer than two classes have
thresholds, or when the head has not shown that it learned anything: its out-of-fold
predictions must agree with the given labels more often than chance (`better_than_chance`:
a one-sided binomial test at `CHANCE_P` against kappa's expected agreement). On movie
snippets with 24 labels the out-of-fold head scored 50-62 %, and its confident
disagreements fell on half the labels.

**Two opinions.** The retrain's head is overconfident where it is wrong (on airline tweets,
mean top probability 0.97 at 88 % out-of-fold accuracy), so confident learning on its
probabilities alone still flags about one clean label in ten (BENCHMARKS.md, "Mislabeling
flags"). Given the tasks' encoder vectors (`neighbours`), a task is flagged only when a
second out-of-sample opinion, its `NEIGHBOURS` nearest labeled tasks by cosine similarity
(never itself), flags it under the same rule: their vote shares, smoothed by half a vote per
class (`neighbour_probabilities`), stand in for P, with their own per-class thresholds. The
value stays the head's P(j) - P(i), for the class j both opinions name.

**Multi-label**, per choice c, the same rule on the yes/no decision: thresholds
t_yes = mean P(c) over the tasks that chose c and t_no = mean 1 - P(c) over those that did
not (each side needs `MIN_CLASS_LABELS` tasks, else the choice flags nothing). A task's
answer on c is flagged when the other side's probability reaches its threshold and is the
larger of the two (condition 3 with P(no) = 1 - P(yes)); its value on c is
|P(yes) - P(no)| = |2 P(c) - 1|, and the task's value the largest over its flagged
choices. With `neighbours`, the neighbours' yes/no vote on c must flag the same answer.

Several controls: a task's value is the largest over the controls it answers
(`model.queue_scores.disagreement`).
"""

from __future__ import annotations

import numpy as np

# Fewer answers of a class (or of a yes/no side of a choice) than this: no threshold for it.
MIN_CLASS_LABELS = 5
# The second opinion: this many nearest labeled tasks vote.
NEIGHBOURS = 10
# An opinion counts only if its out-of-fold accuracy beats the majority class at this level.
CHANCE_P = 0.05


def class_thresholds(probabilities: np.ndarray, labels: np.ndarray,
                     min_labels: int = MIN_CLASS_LABELS) -> np.ndarray:
    """Per class j, the mean P(j) over the rows labeled j (confident learning's t_j);
    +inf for a class with fewer than `min_labels` rows, which then never counts as confident.
    `labels` holds class indices, -1 for rows to leave out."""
    p = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels)
    thresholds = np.full(p.shape[1], np.inf)
    for j in range(p.shape[1]):
        rows = labels == j
        if rows.sum() >= min_labels:
            thresholds[j] = p[rows, j].mean()
    return thresholds


def single_choice(probabilities: np.ndarray, labels: np.ndarray, neighbours: np.ndarray | None = None,
                  min_labels: int = MIN_CLASS_LABELS, chance_level: float | None = CHANCE_P) -> np.ndarray:
    """Mislabeling value per row under the single-choice rule of the module docstring:
    P(j) - P(i) where a row labeled i is flagged for class j, else 0. `labels`: class index
    per row, -1 where the row does not answer the control (never flagged). `neighbours`
    (rows, dim): the rows' encoder vectors, for the second opinion; None: the head alone.
    `chance_level` None skips the better-than-chance test (for checking the rule by hand)."""
    p = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    values, assigned = _confident_learning(p, labels, min_labels, chance_level)
    if neighbours is not None and values.any():
        answering = np.flatnonzero(labels >= 0)
        votes = neighbour_probabilities(np.asarray(neighbours)[answering], labels[answering], p.shape[1])
        second = np.full(len(labels), -1)
        second[answering] = _confident_learning(votes, labels[answering], min_labels, chance_level)[1]
        values = np.where(second == assigned, values, 0.0)
    return values


def _confident_learning(p: np.ndarray, labels: np.ndarray, min_labels: int,
                        chance_level: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(value per row, the class a flagged row is flagged for, -1 elsewhere) under rules 1-3."""
    n = len(labels)
    values, flagged_for = np.zeros(n), np.full(n, -1)
    thresholds = class_thresholds(p, labels, min_labels)
    if np.isfinite(thresholds).sum() < 2 or (chance_level is not None
                                             and not better_than_chance(p, labels, chance_level)):
        return values, flagged_for
    rows = np.flatnonzero((labels >= 0) & np.isfinite(thresholds[np.maximum(labels, 0)]))
    if not len(rows):
        return values, flagged_for
    given = labels[rows]
    confident = p[rows] >= thresholds  # (rows, classes); +inf never reached
    # The confident-joint assignment: the most probable of the classes reached, -1 if none.
    masked = np.where(confident, p[rows], -np.inf)
    assigned = np.where(confident.any(axis=1), masked.argmax(axis=1), -1)
    p_given = p[rows, given]
    p_assigned = p[rows, np.maximum(assigned, 0)]
    flagged = (assigned >= 0) & (assigned != given) & (p_assigned > p_given)
    values[rows[flagged]] = (p_assigned - p_given)[flagged]
    flagged_for[rows[flagged]] = assigned[flagged]
    return values, flagged_for


def better_than_chance(probabilities: np.ndarray, labels: np.ndarray, level: float = CHANCE_P) -> bool:
    """Whether the argmax of `probabilities` agrees with `labels` (-1: left out) more often
    than chance, by a one-sided binomial test at `level`. Chance is the agreement of
    predictions drawn independently of the labels with the same shares as both (Cohen's
    kappa's expected agreement), so always answering the commonest label is chance however
    often it is right, and a few flipped labels in an imbalanced project are not."""
    from scipy.stats import binomtest

    labels = np.asarray(labels)
    rows = labels >= 0
    n = int(rows.sum())
    if n == 0:
        return False
    classes = np.asarray(probabilities).shape[1]
    predicted = np.asarray(probabilities)[rows].argmax(axis=1)
    given = labels[rows]
    expected = float((np.bincount(predicted, minlength=classes) / n
                      * np.bincount(given, minlength=classes) / n).sum())
    if expected >= 1:
        return False
    return binomtest(int((predicted == given).sum()), n, expected, alternative="greater").pvalue < level


def neighbour_probabilities(features: np.ndarray, labels: np.ndarray, classes: int,
                            k: int = NEIGHBOURS) -> np.ndarray:
    """Per row, the label shares among its k nearest other rows (cosine similarity), each
    class given half a vote more so that no share is exactly 0 or 1: (rows, classes).
    Rows are leave-one-out: a row never votes for itself."""
    from sklearn.neighbors import NearestNeighbors

    n = len(labels)
    k = min(k, n - 1)
    if k < 1:
        return np.full((n, classes), 1.0 / classes)
    index = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(features)
    nearest = index.kneighbors(return_distance=False)  # without X: a row is not its own neighbour
    counts = np.stack([(labels[nearest] == c).sum(axis=1) for c in range(classes)], axis=1)
    return (counts + 0.5) / (k + 0.5 * classes)


def multi_label(probabilities: np.ndarray, targets: np.ndarray, neighbours: np.ndarray | None = None,
                min_labels: int = MIN_CLASS_LABELS, chance_level: float | None = CHANCE_P) -> np.ndarray:
    """Mislabeling value per row under the multi-label rule of the module docstring: the
    largest |2 P(c) - 1| over the choices c whose answer is flagged, else 0. `targets`
    (rows, choices): 1 chosen, 0 not, -1 where the row does not answer the control;
    `neighbours` and `chance_level` as in `single_choice`."""
    p = np.asarray(probabilities, dtype=np.float64)
    targets = np.asarray(targets)
    values = np.zeros(len(targets))
    for c in range(p.shape[1]):
        # A yes/no problem per choice: column 0 "not chosen", column 1 "chosen".
        two = np.stack([1.0 - p[:, c], p[:, c]], axis=1)
        side = np.where(targets[:, c] >= 0, (targets[:, c] == 1).astype(np.int64), -1)
        values = np.maximum(values, single_choice(two, side, neighbours, min_labels, chance_level))
    return values
