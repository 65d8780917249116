"""Least-confidence uncertainty sampling.

Source: Munro, *Human-in-the-Loop Machine Learning*, ch. 3 (uncertainty sampling), used as
the fallback of active transfer learning (ch. 5). Uncertainty is the normalised
least confidence (1 - p_max) * k / (k - 1) for k classes, in [0, 1].

Score = 1 - uncertainty: how confident the classifier is, rescaled to [0, 1]. Lower = less
confident = label sooner.

Several controls: the lowest score over every head's decisions (a multi-label head: one
yes/no decision per choice), i.e. the largest normalised uncertainty (`base.combined_score`);
with `decisions="joint"`, the least confidence of the whole answer (every decision right).
"""

from __future__ import annotations

import numpy as np

from model.orderings.base import ConfidenceOrdering, top_two_log


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


def joint_least_confidence_score(decisions: list[np.ndarray]) -> np.ndarray:
    """The score of the whole answer as one decision over every combination of the
    decisions' classes (K = the product of their class counts): 1 - (1 - P(most probable
    answer)) * K / (K - 1), the probability a product of the decisions' top probabilities."""
    log_top, _ = top_two_log(decisions)
    log_k = float(sum(np.log(np.asarray(p).shape[1]) for p in decisions))
    wrong = -np.expm1(log_top.sum(axis=0))  # 1 - P(top answer), without cancellation
    return np.clip(1.0 - wrong / -np.expm1(-log_k), 0.0, 1.0)


class LeastConfidence(ConfidenceOrdering):
    name = "least_confidence"
    defaults: dict = {}
    confidence = staticmethod(least_confidence_score)
    joint_confidence = staticmethod(joint_least_confidence_score)
