"""Margin-of-confidence uncertainty sampling.

Source: Munro, *Human-in-the-Loop Machine Learning*, ch. 3 (margin of confidence).

Score = p_first - p_second, the gap between the two most probable classes, in [0, 1].
Lower = the classifier hesitates between two classes = label sooner.

Several controls: the lowest margin over every head's decisions (`base.combined_score`);
with `decisions="joint"`, the margin between the two most probable whole answers.

The batch served first is diverse (`base.diverse_batch`: one task per k-means cluster of the
10 x batch-size lowest margins), unless the project's params say `"diverse_batch": false`.
"""

from __future__ import annotations

import numpy as np

from model.orderings.base import ConfidenceOrdering, top_two_log


def margin_score(probabilities: np.ndarray) -> np.ndarray:
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.shape[1] < 2:
        return np.ones(len(probabilities))
    top_two = np.sort(probabilities, axis=1)[:, -2:]
    return top_two[:, 1] - top_two[:, 0]


def joint_margin_score(decisions: list[np.ndarray]) -> np.ndarray:
    """The margin between the two most probable whole answers: P(top) * (1 - the largest
    second-to-first ratio of any decision), P(top) the product of the top probabilities."""
    log_top, ratio = top_two_log(decisions)
    return np.exp(log_top.sum(axis=0)) * (1.0 - ratio.max(axis=0))


class Margin(ConfidenceOrdering):
    name = "margin"
    diverse_by_default = True
    defaults: dict = {}
    confidence = staticmethod(margin_score)
    joint_confidence = staticmethod(joint_margin_score)
