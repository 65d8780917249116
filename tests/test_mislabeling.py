"""Confident learning's mislabeling flag (`model.mislabeling`) on plain numpy arrays."""

import numpy as np

from model import mislabeling


def _clusters(seed: int, n: int = 200, classes: int = 3, spread: float = 0.35):
    """Separable classes: vectors around one direction per class; labels; out-of-fold-like
    probabilities that favour the true class (softmax of cosine similarities)."""
    rng = np.random.default_rng(seed)
    centres = np.eye(classes, 16) * 3
    y = np.arange(n) % classes
    x = centres[y] + rng.normal(scale=spread * 3, size=(n, 16))
    logits = 4 * (x @ centres.T) / np.linalg.norm(x, axis=1, keepdims=True) / 3
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return x, y, p / p.sum(axis=1, keepdims=True)


def test_thresholds_are_the_mean_self_confidence_per_class():
    p = np.array([[0.9, 0.1], [0.7, 0.3], [0.2, 0.8], [0.4, 0.6], [0.5, 0.5]])
    y = np.array([0, 0, 1, 1, -1])
    assert np.allclose(mislabeling.class_thresholds(p, y, min_labels=2), [0.8, 0.7])
    # A class with too few labels gets no threshold.
    assert np.isinf(mislabeling.class_thresholds(p, y, min_labels=3)).all()


def test_the_rule_as_written():
    p = np.array([
        [0.9, 0.1], [0.8, 0.2],  # labeled 0, agreed
        [0.3, 0.7], [0.4, 0.6],  # labeled 1, agreed
        [0.6, 0.4],              # labeled 1: the argmax says 0, but P(0) = 0.6 misses t_0
        [0.3, 0.7],              # labeled 0: P(1) = 0.7 reaches t_1 and beats P(0)
    ])
    y = np.array([0, 0, 1, 1, 1, 0])
    thresholds = mislabeling.class_thresholds(p, y, min_labels=1)
    assert np.allclose(thresholds, [(0.9 + 0.8 + 0.3) / 3, (0.7 + 0.6 + 0.4) / 3])
    values = mislabeling.single_choice(p, y, min_labels=1, chance_level=None)
    assert np.allclose(values, [0, 0, 0, 0, 0, 0.7 - 0.3])


def test_a_confident_other_class_that_the_head_does_not_prefer_is_not_flagged():
    # Class 1 is rare and unsure (t_1 low); a task labeled 0 reaches t_1 with P(1) = 0.45
    # while P(0) = 0.55: the paper's confident joint counts it off the diagonal, we do not.
    p = np.array([[0.95, 0.05]] * 6 + [[0.6, 0.4]] * 6 + [[0.55, 0.45]])
    y = np.array([0] * 6 + [1] * 6 + [0])
    assert mislabeling.class_thresholds(p, y)[1] < 0.45
    assert mislabeling.single_choice(p, y)[-1] == 0


def test_clean_labels_flag_almost_nothing_and_clear_flips_are_found():
    x, y, p = _clusters(seed=0)
    clean = mislabeling.single_choice(p, y, x)
    assert (clean > 0).mean() <= 0.02
    # Flip 10 labels; each flipped task's probabilities still point at its true class.
    rng = np.random.default_rng(1)
    flipped = rng.choice(len(y), 10, replace=False)
    noisy = y.copy()
    noisy[flipped] = (y[flipped] + 1) % 3
    values = mislabeling.single_choice(p, noisy, x)
    found = set(np.flatnonzero(values > 0))
    assert len(found & set(flipped)) >= 8, (found, flipped)
    assert len(found - set(flipped)) <= 2
    assert ((values >= 0) & (values <= 1)).all()
    # A stronger preference gives a larger value.
    margin = p[flipped, y[flipped]] - p[flipped, noisy[flipped]]
    hit = values[flipped] > 0
    assert np.corrcoef(margin[hit], values[flipped][hit])[0, 1] > 0.99


def test_the_neighbours_veto_a_flag_that_only_the_head_raises():
    x, y, p = _clusters(seed=2, classes=2, n=100)
    # The head is confidently wrong on task 0, whose label and neighbourhood agree.
    p = p.copy()
    p[0] = [0.01, 0.99] if y[0] == 0 else [0.99, 0.01]
    assert mislabeling.single_choice(p, y)[0] > 0.9
    assert mislabeling.single_choice(p, y, x)[0] == 0


def test_a_head_no_better_than_chance_flags_nothing():
    rng = np.random.default_rng(5)
    y = np.arange(40) % 2
    p = rng.dirichlet([0.3, 0.3], size=40)  # confident, and unrelated to the labels
    assert not mislabeling.better_than_chance(p, y)
    assert (mislabeling.single_choice(p, y) == 0).all()
    assert (mislabeling.single_choice(p, y, chance_level=None) > 0).sum() >= 5
    # Always answering the majority class is chance too, however often it is right.
    majority = np.tile([0.9, 0.1], (40, 1))
    assert not mislabeling.better_than_chance(majority, np.r_[np.zeros(34, int), np.ones(6, int)])


def test_too_few_labels_or_one_class_flag_nothing():
    p = np.array([[0.1, 0.9]] * 4 + [[0.9, 0.1]] * 4)
    y = np.array([0] * 4 + [1] * 4)  # every label contradicted, but only 4 per class
    assert (mislabeling.single_choice(p, y) == 0).all()
    assert (mislabeling.single_choice(p[:6], np.zeros(6, dtype=int)) == 0).all()
    # A class with too few labels: its tasks are never flagged, even where the head and
    # the neighbours both point elsewhere (with a lower minimum some are).
    x, y3, p3 = _clusters(seed=3, n=90)
    keep = y3 != 2  # tasks of classes 0 and 1; three of class 0 labeled 2
    x, y3, p3 = x[keep], y3[keep].copy(), p3[keep]
    rare = np.flatnonzero(y3 == 0)[:3]
    y3[rare] = 2
    assert (mislabeling.single_choice(p3, y3, x)[rare] == 0).all()
    assert (mislabeling.single_choice(p3, y3, x, min_labels=3)[rare] > 0).any()
    assert (mislabeling.single_choice(np.zeros((0, 2)), np.zeros(0, dtype=int)) == 0).all()
    # Rows that do not answer the control are never flagged.
    unanswered = np.full(len(y3), -1)
    assert (mislabeling.single_choice(p3, unanswered, x) == 0).all()


def test_multi_label_flags_the_choice_with_evidence():
    rng = np.random.default_rng(4)
    n = 120
    truth = rng.random((n, 2)) < 0.5
    x = np.concatenate([truth.astype(float) * 3, rng.normal(size=(n, 6))], axis=1)
    p = np.where(truth, 0.9, 0.1) + rng.normal(scale=0.03, size=(n, 2))
    targets = truth.astype(int)
    targets[7, 1] = 1 - targets[7, 1]  # one wrong answer on the second choice, clearly contradicted
    p[7, 1] = 0.97 if truth[7, 1] else 0.03
    targets[8] = -1  # a task that does not answer
    values = mislabeling.multi_label(p, targets, x)
    assert np.isclose(values[7], abs(2 * p[7, 1] - 1))
    assert values[8] == 0
    assert (values > 0).sum() == 1
    # One side of a choice with too few tasks: that choice flags nothing.
    few = targets.copy()
    few[:, 0] = 0
    few[:3, 0] = 1
    few[10, 0] = 1 - truth[10, 0]
    assert mislabeling.multi_label(p[:, :1], few[:, :1], x)[10] == 0
