"""Least-confidence uncertainty sampling.

Source: Munro, *Human-in-the-Loop Machine Learning*, ch. 3 (uncertainty sampling), used as
the fallback of active transfer learning (ch. 5). Uncertainty is the normalised
least confidence (1 - p_max) * k / (k - 1) for k classes, in [0, 1].

Score = 1 - uncertainty: how confident the classifier is, rescaled to [0, 1]. Lower = less
confident = label sooner.

Several controls: the lowest score over every head's decisions (a multi-label head: one
yes/no decision per choice), i.e. the largest normalised uncertainty (`base.combined_score`).
"""

from __future__ import annotations

import numpy as np

from model.orderings.base import ConfidenceOrdering


def least_confidence_score(probabilities: np.ndarray) -> np.ndarray:
    """1 - normalised least confidence: 0 for a uniform prediction, 1 for a certain one."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    k = probabilities.shape[1]
    if k < 2:
        return np.ones(len(probabilities))
    # 1 - p_max computed as the sum of the other classes: a float32 softmax rounds p_max to
    # exactly 1.0 long before the others reach 0, and ties would hide the ranking.
    uncertainty = other_classes_probability(probabilities) * k / (k - 1)
    return 1.0 - uncertainty


def other_classes_probability(probabilities: np.ndarray) -> np.ndarray:
    """1 - p_max, computed without cancellation."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    top = probabilities.argmax(axis=1)
    rest = probabilities.copy()
    rest[np.arange(len(rest)), top] = 0.0
    return rest.sum(axis=1)


class LeastConfidence(ConfidenceOrdering):
    name = "least_confidence"
    defaults: dict = {}
    confidence = staticmethod(least_confidence_score)
