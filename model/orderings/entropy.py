"""Entropy-based uncertainty sampling.

Source: Munro, *Human-in-the-Loop Machine Learning*, ch. 3 (entropy); the entropy is
normalised by log(k) so it lies in [0, 1] for any number of classes k.

Score = 1 - normalised entropy. Lower = a flatter prediction = label sooner.

Several controls: the lowest score over every head's decisions (`base.combined_score`).
"""

from __future__ import annotations

import numpy as np

from model.orderings.base import ConfidenceOrdering


def entropy_score(probabilities: np.ndarray) -> np.ndarray:
    probabilities = np.asarray(probabilities, dtype=np.float64)
    k = probabilities.shape[1]
    if k < 2:
        return np.ones(len(probabilities))
    p = np.clip(probabilities, 1e-12, 1.0)
    entropy = -(p * np.log(p)).sum(axis=1) / np.log(k)
    return 1.0 - np.clip(entropy, 0.0, 1.0)


class Entropy(ConfidenceOrdering):
    name = "entropy"
    defaults: dict = {}
    confidence = staticmethod(entropy_score)
