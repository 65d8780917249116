"""Random ordering: the control every other ordering has to beat.

Score: a seeded uniform random number per unlabeled task; lower = label sooner, so the
queue is a random permutation (reproducible for a given `seed`).
"""

from __future__ import annotations

import numpy as np

from model.orderings.base import Ordering, OrderingInput, OrderingResult


class RandomOrder(Ordering):
    name = "random"
    defaults: dict = {}

    def score(self, data: OrderingInput) -> OrderingResult:
        rng = np.random.default_rng(data.seed)
        scores = rng.random(len(data.features_unlabeled))
        return self.finish(data, scores, data.pool_heads())
