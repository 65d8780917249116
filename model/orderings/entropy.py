"""Entropy-based uncertainty sampling.

Source: Munro, *Human-in-the-Loop Machine Learning*, ch. 3 (entropy); the entropy is
normalised by log(k) so it lies in [0, 1] for any number of classes k.

Score = 1 - normalised entropy. Lower = a flatter prediction = label sooner.

Several controls: the lowest score over every head's decisions (`base.combined_score`);
with `decisions="joint"`, the normalised entropy of the whole answer.
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


def joint_entropy_score(decisions: list[np.ndarray]) -> np.ndarray:
    """1 - the entropy of the whole answer (the sum of the decisions' entropies, taken as
    independent) over the log of its number of combinations."""
    total, log_k = 0.0, 0.0
    for p in decisions:
        p = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1.0)
        total = total - (p * np.log(p)).sum(axis=1)
        log_k += np.log(p.shape[1])
    return 1.0 - np.clip(total / log_k, 0.0, 1.0)


class Entropy(ConfidenceOrdering):
    name = "entropy"
    defaults: dict = {}
    confidence = staticmethod(entropy_score)
    joint_confidence = staticmethod(joint_entropy_score)
