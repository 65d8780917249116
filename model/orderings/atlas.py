"""ATLAS: Active Transfer Learning for Adaptive Sampling.

Source: Munro, *Human-in-the-Loop Machine Learning*, ch. 5 ("Active transfer learning for
adaptive sampling") and its cheatsheet. One batch is built in rounds: pick the tasks the
Correct/Incorrect head of `predicted_incorrect` finds most likely incorrect, assume they will
be labeled and then predicted correctly, add them to the Correct side, retrain the head, pick
again. Once a task is assumed handled its neighbours stop looking risky, so the batch covers
several kinds of error instead of many copies of one: uncertainty and diversity in one loop.

How the head is retrained: round 1 uses predicted-incorrect's head (the classifier's
uncertainty, corrected where the labeled tasks support it). Every later round keeps that
head's logit as a fixed offset and refits a penalised correction on the last hidden layer
and confidence features (`adaptive_regularization`) from the labeled tasks plus the picked
ones, which join the Correct side with their own inputs ("a task like this, as uncertain as
this, will be predicted correctly once labeled") and the weight of one in-domain labeled task
(`picked_weight`). The fixed offset keeps the correction local: the head cannot simply stop
trusting uncertainty everywhere, it learns where the picked tasks' neighbours are.

The loop stops early when no remaining task is confidently incorrect (P(Incorrect) below
`min_incorrect_probability` for all of them); the batch is then shorter than `batch_size`.

Scores: the batch is what Label Studio must serve first, in the order it was built, so batch
tasks get rank-based scores below every other task (first picked = lowest); tasks outside the
batch keep their last-round P(Correct). **Lower = label sooner.** With too few Incorrect
examples it falls back to least confidence, as `predicted_incorrect` does, and says so in
`info`.
"""

from __future__ import annotations

import numpy as np

from scipy.special import expit

from model.orderings.base import Ordering, OrderingInput, OrderingResult
from model.orderings.least_confidence import least_confidence_score
from model.orderings.predicted_incorrect import (
    ERROR_HEAD_DEFAULTS,
    BinaryHead,
    PredictedIncorrect,
    balanced_weights,
    error_training_set,
    head_regularization,
    too_few_errors,
)

ATLAS_DEFAULTS: dict = {
    **ERROR_HEAD_DEFAULTS,
    "per_round": 5,  # tasks picked between two retrains of the Correct/Incorrect head
    "min_incorrect_probability": 0.5,  # "confidently incorrect": stop when nobody is above
    "picked_weight": 1.0,  # weight of a picked task, relative to an in-domain labeled task
    "adaptive_regularization": 0.05,  # C of the correction retrained every round
}


class Atlas(Ordering):
    """Batch built in rounds; rank-based scores for the batch, P(Correct) outside it."""

    name = "atlas"
    defaults = dict(ATLAS_DEFAULTS)

    def score(self, data: OrderingInput) -> OrderingResult:
        settings = self.settings(data)
        probabilities = self.probabilities(data)
        fallback = PredictedIncorrect._fallback_reason(data, settings)
        training = None
        if fallback is None:
            training = error_training_set(data, settings, probabilities)
            fallback = too_few_errors(training, settings["min_incorrect"])
        if fallback is not None:
            info = {"fallback": "least_confidence", "fallback_reason": fallback}
            if training is not None:
                info.update(training.info)
            return self.finish(data, least_confidence_score(probabilities), probabilities, info)

        # Round 1 is predicted-incorrect's head: the classifier's uncertainty, corrected where
        # the labeled tasks show it (cross-validated C).
        regularization, regularization_info = head_regularization(training, settings, data.seed)
        base = training.fit_head(regularization)
        base_labeled = base.positive_logit(training.labeled, training.labeled_offset)
        base_pool = base.positive_logit(training.pool, training.pool_offset)
        labeled_weights = balanced_weights(training.incorrect, training.weights)
        # Later rounds: the base logit as offset plus a correction learned from the labeled
        # tasks and the picked ones, assumed Correct. A picked task is a pool task, so it
        # weighs like one in-domain labeled task (times `picked_weight`), and it keeps its
        # own inputs: "a task like this, as uncertain as this, will be predicted correctly".
        picked_weight = float(settings["picked_weight"])
        adaptive = float(settings["adaptive_regularization"])

        batch: list[int] = []
        available = np.ones(len(training.pool), dtype=bool)
        p_incorrect = expit(base_pool)
        rounds, stopped_early = 0, False
        threshold = float(settings["min_incorrect_probability"])
        while len(batch) < min(data.batch_size, len(training.pool)):
            if batch:
                picked = np.asarray(batch)
                head = BinaryHead(adaptive).fit(
                    np.vstack([training.labeled, training.pool[picked]]),
                    np.concatenate([training.incorrect, np.zeros(len(picked), dtype=bool)]),
                    np.concatenate([labeled_weights, np.full(len(picked), picked_weight)]),
                    offset=np.concatenate([base_labeled, base_pool[picked]]),
                    fixed_offset=True,
                )
                p_incorrect = head.positive_probability(training.pool, base_pool)
            rounds += 1
            candidates = np.flatnonzero(available & (p_incorrect >= threshold))
            if len(candidates) == 0:
                stopped_early = True
                break
            take = min(int(settings["per_round"]), data.batch_size - len(batch), len(candidates))
            # Most likely incorrect first; ties broken by index, so runs are reproducible.
            chosen = candidates[np.argsort(-p_incorrect[candidates], kind="stable")[:take]]
            batch.extend(int(i) for i in chosen)
            available[chosen] = False
        last_p_correct = 1.0 - p_incorrect

        info = {
            "fallback": None,
            **training.info,
            **regularization_info,
            "rounds": rounds,
            "stopped_early": stopped_early,
            "batch_built": len(batch),
        }
        return self.finish(
            data, last_p_correct, probabilities, info, batch=np.asarray(batch, dtype=np.int64) if batch else None
        )
