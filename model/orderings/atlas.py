"""ATLAS: Active Transfer Learning for Adaptive Sampling.

Source: Munro, *Human-in-the-Loop Machine Learning*, ch. 5 ("Active transfer learning for
adaptive sampling") and its cheatsheet. One batch is built in rounds: pick the tasks the
Correct/Incorrect head of `predicted_incorrect` finds most likely incorrect, assume they will
be labeled and then predicted correctly, add them to the Correct side, retrain the head, pick
again. Once a task is assumed handled its neighbours stop looking risky, so the batch covers
several kinds of error instead of many copies of one: uncertainty and diversity in one loop.

Several controls: the head is predicted-incorrect's one Correct/Incorrect head over every
control (P(any control wrong)), and "the classifier's last hidden layer" is every head's,
side by side (`model.orderings.transfer`).

How the head is retrained: round 1 uses predicted-incorrect's head (the classifier's
uncertainty, corrected where the labeled tasks support it). Every later round keeps that
head's logit as a fixed offset and refits a correction from the labeled tasks plus the picked
ones, which join the Correct side with the weight of one in-domain labeled task
(`picked_weight`). By default the correction's inputs are kernel similarities, in the
classifier's last hidden layer, to each picked task, with weights kept <= 0: a task close to
one assumed handled looks safer, a task far from all of them keeps its score, and labeled
Incorrect tasks near a picked one limit how much safer. The fixed offset keeps the head from
simply ceasing to trust uncertainty everywhere.

What was measured while building it (bench/explore_orderings.py, 3 paired seeds; see the
report of issue 5): adaptations strong enough to make batches clearly more diverse (a linear
correction on the hidden layer) also made them find fewer errors and lost label efficiency
to least confidence, most after a domain shift; the kernel version stays close to
predicted-incorrect.

The loop stops early when no remaining task is confidently incorrect (P(Incorrect) below
`min_incorrect_probability` for all of them); the batch is then shorter than `batch_size`.

Scores: the batch is what Label Studio must serve first, in the order it was built, so batch
tasks get rank-based scores below every other task (first picked = lowest); tasks outside the
batch keep their last-round P(Correct). **Lower = label sooner.** With too few Incorrect
examples it falls back to least confidence, as `predicted_incorrect` does, and says so in
`info`; with few errors its first round is predicted-incorrect's prior head
(`few_errors="prior"`), so it adapts from the first rounds.
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit

from model.orderings.base import Ordering, OrderingInput, OrderingResult, combined_score, integer, number, one_of
from model.orderings.least_confidence import least_confidence_score
from model.orderings.transfer import (
    ERROR_HEAD_DEFAULTS,
    ERROR_HEAD_RULES,
    BinaryHead,
    balanced_weights,
    error_head_fallback,
    error_logits,
)

ATLAS_DEFAULTS: dict = {
    **ERROR_HEAD_DEFAULTS,
    "per_round": 5,  # tasks picked between two retrains of the Correct/Incorrect head
    "min_incorrect_probability": 0.5,  # "confidently incorrect": stop when nobody is above
    "picked_weight": 1.0,  # weight of a picked task, relative to an in-domain labeled task
    "adaptive_regularization": 1.0,  # C of the correction retrained every round
    # What the per-round correction sees: "similarity" (a kernel on the closeness of a task
    # to each picked task, weights <= 0: only the picked tasks' neighbours stop looking
    # risky), "nearest" (one such kernel feature, to the closest picked task: a bounded,
    # milder version) or "hidden" (the last hidden layer itself: a linear correction, which
    # moves whole half-spaces of the pool at once).
    "adaptive_features": "similarity",
    "locality": 0.3,  # width of the kernel exp((cos - 1) / locality); cos of centred vectors
    "similarity_space": "hidden",  # "hidden" (the classifier's last hidden layer) or "encoder"
    # Pool tasks that keep the base head's P(Incorrect) as a soft target in every refit, and
    # the weight of each. Off by default: the kernel is local by construction. A linear
    # correction ("hidden") needs them (~0.1), or after a domain shift, where the labeled
    # tasks weigh almost nothing, the picked tasks teach it "every tweet is correct".
    "anchor_size": 2000,
    "anchor_weight": 0.0,
}
ATLAS_RULES: dict = {
    **ERROR_HEAD_RULES,
    "per_round": integer(1, 10_000),
    "min_incorrect_probability": number(0.0, 1.0),
    "picked_weight": number(0.0, 1e6),
    "adaptive_regularization": number(1e-9, 1e6),
    "adaptive_features": one_of("similarity", "nearest", "hidden"),
    "locality": number(1e-6, 100.0),
    "similarity_space": one_of("hidden", "encoder"),
    "anchor_size": integer(0, 10_000_000),
    "anchor_weight": number(0.0, 1e6),
}


def unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def nearness(units: np.ndarray, picked_units: np.ndarray, locality: float) -> np.ndarray:
    """Kernel similarity of every task to every picked task, (n, picked), in (0, 1]."""
    return np.exp((units @ picked_units.T - 1.0) / locality)


class Atlas(Ordering):
    """Batch built in rounds; rank-based scores for the batch, P(Correct) outside it."""

    name = "atlas"
    defaults = dict(ATLAS_DEFAULTS)
    rules = dict(ATLAS_RULES)

    def score(self, data: OrderingInput) -> OrderingResult:
        settings = self.settings(data)
        views = data.pool_heads()
        fallback, training = error_head_fallback(data, settings)
        if fallback is not None:
            info = {"fallback": "least_confidence", "fallback_reason": fallback}
            if training is not None:
                info.update(training.info)
            return self.finish(data, combined_score(least_confidence_score, views), views, info)

        # Round 1 is predicted-incorrect's head: the classifier's uncertainty, corrected where
        # the labeled tasks show it (cross-validated C).
        base_labeled, base_pool, regularization_info = error_logits(training, settings, data.seed)
        labeled_weights = balanced_weights(training.incorrect, training.weights)
        # Later rounds: the base logit as offset plus a correction learned from the labeled
        # tasks and the picked ones, assumed Correct. A picked task is a pool task, so it
        # weighs like one in-domain labeled task (times `picked_weight`), and it keeps its
        # own inputs: "a task like this, as uncertain as this, will be predicted correctly".
        picked_weight = float(settings["picked_weight"])
        adaptive = float(settings["adaptive_regularization"])
        locality = float(settings["locality"])
        if settings["adaptive_features"] in ("similarity", "nearest"):
            # Unit vectors, centred on the pool (ReLU activations are all positive: uncentred,
            # every pair of tasks looks alike).
            if settings["similarity_space"] == "hidden":
                labeled_space, pool_space = training.labeled_hidden, training.pool_hidden
            else:
                labeled_space = np.asarray(data.features_labeled)[training.labeled_rows]
                pool_space = data.features_unlabeled
            centre = np.asarray(pool_space, dtype=np.float64).mean(axis=0)
            labeled_unit = unit_rows(labeled_space - centre)
            pool_unit = unit_rows(pool_space - centre)
        else:  # "hidden" (the rules allow nothing else)
            labeled_inputs, pool_inputs = training.labeled_hidden, training.pool_hidden
        anchor = np.zeros(0, dtype=np.int64)
        if float(settings["anchor_weight"]) > 0:
            rng = np.random.default_rng(data.seed)
            anchor = np.sort(rng.permutation(len(training.pool))[: int(settings["anchor_size"])])

        batch: list[int] = []
        available = np.ones(len(training.pool), dtype=bool)
        p_incorrect = expit(base_pool)
        rounds, stopped_early = 0, False
        threshold = float(settings["min_incorrect_probability"])
        while len(batch) < min(data.batch_size, len(training.pool)):
            if batch:
                picked = np.asarray(batch)
                anchored = anchor[available[anchor]]
                if settings["adaptive_features"] == "similarity":
                    labeled_inputs = nearness(labeled_unit, pool_unit[picked], locality)
                    pool_inputs = nearness(pool_unit, pool_unit[picked], locality)
                elif settings["adaptive_features"] == "nearest":
                    labeled_inputs = nearness(labeled_unit, pool_unit[picked], locality).max(1, keepdims=True)
                    pool_inputs = nearness(pool_unit, pool_unit[picked], locality).max(1, keepdims=True)
                head = BinaryHead(adaptive).fit(
                    np.vstack([labeled_inputs, pool_inputs[anchored], pool_inputs[picked]]),
                    np.concatenate(
                        [training.incorrect, expit(base_pool[anchored]), np.zeros(len(picked))]
                    ),
                    np.concatenate(
                        [
                            labeled_weights,
                            np.full(len(anchored), float(settings["anchor_weight"])),
                            np.full(len(picked), picked_weight),
                        ]
                    ),
                    offset=np.concatenate([base_labeled, base_pool[anchored], base_pool[picked]]),
                    fixed_offset=True,
                    # Kernel features are 0 far from every picked task: keep them so.
                    standardize=settings["adaptive_features"] == "hidden",
                    # Being near a task assumed correct can only make a task look safer.
                    nonpositive=settings["adaptive_features"] != "hidden",
                )
                p_incorrect = head.positive_probability(pool_inputs, base_pool)
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
            data, last_p_correct, views, info, batch=np.asarray(batch, dtype=np.int64) if batch else None
        )
