"""Least-confidence uncertainty sampling.

Source: Munro, *Human-in-the-Loop Machine Learning*, ch. 3 (uncertainty sampling), used as
the fallback of active transfer learning (ch. 5). Uncertainty is the normalised
least confidence (1 - p_max) * k / (k - 1) for k classes, in [0, 1].

Score = 1 - uncertainty: how confident the classifier is, rescaled to [0, 1]. Lower = less
confident = label sooner.
"""

from __future__ import annotations

import numpy as np

from model.orderings.base import Ordering, OrderingInput, OrderingResult


def least_confidence_score(probabilities: np.ndarray) -> np.ndarray:
    """1 - normalised least confidence: 0 for a uniform prediction, 1 for a certain one."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    k = probabilities.shape[1]
    if k < 2:
        return np.ones(len(probabilities))
    uncertainty = (1.0 - probabilities.max(axis=1)) * k / (k - 1)
    return 1.0 - uncertainty


class LeastConfidence(Ordering):
    name = "least_confidence"
    defaults: dict = {}

    def score(self, data: OrderingInput) -> OrderingResult:
        probabilities = self.probabilities(data)
        return self.finish(data, least_confidence_score(probabilities), probabilities)
