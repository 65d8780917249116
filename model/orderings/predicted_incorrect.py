"""Predicted incorrect: active transfer learning for uncertainty sampling.

Source: Munro, *Human-in-the-Loop Machine Learning*, ch. 5 ("Active transfer learning for
uncertainty sampling") and its cheatsheet. Labeled tasks the classifier was not trained on
are predicted and marked Correct or Incorrect (argmax vs the human label, any number of
classes); a new head learns Correct/Incorrect from the classifier's **last hidden layer**;
unlabeled tasks likely to be Incorrect are labeled first.

What differs from the book's code, and why:

* Out-of-fold predictions (stratified k-fold, each fold a fresh copy of the classifier) mark
  *every* labeled task, instead of the last 10 % of unshuffled data that can hold one class
  and no Incorrect example at all. A held-out task is described by the hidden layer and the
  probabilities of the fold model that did not see it, the way a pool task is described by
  the current classifier that has not seen it.
* The head is a *correction of least confidence* (`head_features="correction"`): its logit
  is the classifier's own uncertainty, log((1 - p_max) / p_max), with a learned slope, plus a
  penalised linear term on the last hidden layer and the confidence features (probabilities,
  least confidence, margin, entropy). The penalty is chosen by cross-validation on the
  labeled tasks (`head_regularization="auto"`) and the correction is kept only when it finds
  held-out errors better than the uncertainty alone; otherwise the ranking is least
  confidence's. Measured on movie snippets -> airline tweets, a head on the hidden layer
  alone (the book's; `head_features="hidden"`) found the pool's errors far worse than least
  confidence (AUC ~0.47-0.72 vs ~0.77-0.81), and so did any correction the data could not
  back up.
* Incorrect and Correct are balanced by weight, not by truncation.
* `domain_weighting`: each labeled task is weighted by the density ratio
  p_pool(x) / p_labeled(x) (a training-vs-application head, out-of-fold), *not*
  renormalised: right after a domain shift every labeled task is unlike the pool, the
  weights are near zero and errors on the old domain, which say little about the new one,
  barely count; labeled tasks of the new domain count fully.
* With fewer than `min_incorrect` Incorrect (or Correct) examples there is nothing to learn
  from: the ordering falls back to least confidence and says so in `info`.
* The ranking points the right way: score = P(Correct), **lower = more likely incorrect =
  label sooner** (the reference code sorts by one minus P(incorrect) and serves the tasks most
  likely correct first).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from model.orderings.base import Ordering, OrderingInput, OrderingResult
from model.orderings.entropy import entropy_score
from model.orderings.least_confidence import least_confidence_score, other_classes_probability
from model.orderings.margin import margin_score

ERROR_HEAD_DEFAULTS: dict = {
    "folds": 5,  # k of the out-of-fold Correct/Incorrect marking
    "min_incorrect": 8,  # fewer Incorrect (or Correct) examples: fall back to least confidence
    # What the Correct/Incorrect head sees: "hidden" (the book: last hidden layer only),
    # "confidence" (probabilities, least confidence, margin, entropy), "hidden+confidence",
    # or "correction": hidden+confidence as a penalised correction of the classifier's own
    # uncertainty (an offset whose slope is learned, unpenalised and kept positive), so no
    # information means exactly least confidence's ranking.
    "head_features": "correction",
    # Hidden layer of labeled tasks: "fold" (the fold model that did not see the task) or
    # "final" (the current classifier, the one that describes the pool).
    "hidden_source": "fold",
    # Inverse L2 strength (C) of the head's weights, or "auto": chosen by cross-validation
    # (importance-weighted error-detection AUC) from `regularization_grid`; 0 means no
    # correction at all (least confidence), kept unless a correction gains
    # `correction_min_gain` AUC on held-out labeled tasks.
    "head_regularization": "auto",
    "regularization_grid": [0.0, 0.003, 0.01, 0.03, 0.1],
    "correction_min_gain": 0.01,
    # Below this many (effective, importance-weighted) Incorrect examples, no correction is
    # tried at all: cross-validation on a handful of errors picks noise.
    "min_effective_incorrect": 30,
    # Weight labeled tasks by how much they look like the unlabeled pool.
    "domain_weighting": True,
    "max_domain_weight": 10.0,  # clip of the density ratio
}


def fresh_classifier(classifier):
    """An untrained copy of the classifier (same architecture, settings and seed)."""
    config = getattr(classifier, "config", None)
    if config is None:
        raise TypeError(
            "predicted-incorrect needs a classifier with a `config` it can retrain per fold "
            "(model.classifier.ClassifierHead)"
        )
    return type(classifier)(config, device=getattr(classifier, "device", "cpu"))


def out_of_fold(classifier, features: np.ndarray, labels: np.ndarray, folds: int, seed: int):
    """Out-of-fold (probabilities, hidden layer) of every labeled task.

    Each fold trains a fresh copy of `classifier` on the other folds and describes its
    held-out tasks. Stratified and seeded, so every run marks the same tasks.
    """
    from sklearn.model_selection import KFold, StratifiedKFold

    labels = np.asarray(labels)
    n = len(labels)
    folds = int(max(2, min(folds, n)))
    counts = np.bincount(labels)
    counts = counts[counts > 0]
    splitter = (
        StratifiedKFold(folds, shuffle=True, random_state=seed)
        if counts.max() >= folds
        else KFold(folds, shuffle=True, random_state=seed)
    )
    probabilities = hidden = None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class")
        for train, held_out in splitter.split(np.zeros(n), labels):
            model = fresh_classifier(classifier).fit(features[train], labels[train])
            fold_probabilities = model.predict_proba(features[held_out])
            fold_hidden = model.hidden(features[held_out])
            if probabilities is None:
                probabilities = np.zeros((n, fold_probabilities.shape[1]), dtype=np.float64)
                hidden = np.zeros((n, fold_hidden.shape[1]), dtype=np.float32)
            probabilities[held_out] = fold_probabilities
            hidden[held_out] = fold_hidden
    return probabilities, hidden


def confidence_features(probabilities: np.ndarray) -> np.ndarray:
    """What plain uncertainty sampling knows: probabilities, confidence, margin, entropy."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    return np.column_stack(
        [
            probabilities,
            least_confidence_score(probabilities),
            margin_score(probabilities),
            entropy_score(probabilities),
        ]
    )


def error_features(probabilities: np.ndarray, hidden: np.ndarray, which: str) -> np.ndarray:
    """The inputs of the Correct/Incorrect head, per `head_features`."""
    if which == "hidden":
        return np.asarray(hidden, dtype=np.float64)
    if which == "confidence":
        return confidence_features(probabilities)
    if which == "hidden+confidence":
        return np.column_stack([np.asarray(hidden, dtype=np.float64), confidence_features(probabilities)])
    raise ValueError(
        f"head_features must be 'hidden', 'confidence' or 'hidden+confidence', not {which!r}"
    )


def balanced_weights(target: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Rescale `weights` so both sides of a binary target carry half of the total weight.

    The total is kept: with importance weights near zero (labeled tasks unlike the pool),
    the data hardly counts against the head's regularisation, and a correction head stays
    close to its offset.
    """
    target = np.asarray(target, dtype=bool)
    weights = np.asarray(weights, dtype=np.float64).copy()
    grand_total = weights.sum()
    for side in (True, False):
        total = weights[target == side].sum()
        if total > 0:
            weights[target == side] *= grand_total / (2.0 * total)
    return weights


class BinaryHead:
    """Standardised features -> L2-regularised logistic regression with sample weights.

    Optionally with an `offset` per example whose slope is learned but not penalised:
    logit P(positive) = slope * offset + w . features + b. With the classifier's own
    uncertainty as the offset, the head is a *correction* of least confidence: when the
    features carry no information about errors, w shrinks to zero and the ranking is least
    confidence's. Solved with L-BFGS (scipy); deterministic, a few milliseconds for a few
    thousand examples, so ATLAS can retrain it every round.
    """

    def __init__(self, regularization: float):
        self.regularization = float(regularization)

    def fit(
        self,
        features: np.ndarray,
        target: np.ndarray,
        weights: np.ndarray,
        offset: np.ndarray | None = None,
        fixed_offset: bool = False,
        standardize: bool = True,
        nonpositive: bool = False,
    ) -> "BinaryHead":
        """Fit on (features, target) with sample weights.

        With `fixed_offset`, logit = offset + w . features: the offset's slope stays 1 and
        there is no intercept, so the data can only move the score through the penalised
        weights (ATLAS's local, per-round corrections). Without `standardize` a feature that
        is 0 leaves the score alone (kernel features: far-away tasks stay where they are).
        With `nonpositive` the weights are kept <= 0: a feature can only lower the score.
        """
        from scipy.optimize import minimize
        from scipy.special import expit

        features = np.asarray(features, dtype=np.float64)
        self.mean = features.mean(axis=0) if standardize else np.zeros(features.shape[1])
        self.scale = features.std(axis=0) if standardize else np.ones(features.shape[1])
        self.scale[self.scale < 1e-8] = 1.0
        # C = 0: no correction at all, only the slope of the offset and the intercept.
        learn_weights = self.regularization > 0
        x = (features - self.mean) / self.scale if learn_weights else np.zeros((len(features), 0))
        t = np.asarray(target, dtype=np.float64)
        weights = np.asarray(weights, dtype=np.float64)
        penalty = 0.5 / self.regularization if learn_weights else 0.0
        u = None if offset is None else np.asarray(offset, dtype=np.float64)
        d = x.shape[1]
        if fixed_offset and u is None:
            raise ValueError("fixed_offset needs an offset")

        # Divided by the total weight (same minimiser) so the solver's tolerances mean the
        # same thing whatever the scale of the importance weights.
        total = max(float(weights.sum()), 1e-300)

        def objective(theta):
            w, b = theta[:d], theta[d]
            z = x @ w + b + (theta[d + 1] * u if u is not None else 0.0)
            loss = np.sum(weights * (np.logaddexp(0.0, z) - t * z)) + penalty * (w @ w)
            g = weights * (expit(z) - t)
            grad = np.concatenate([x.T @ g + 2 * penalty * w, [g.sum()], [g @ u] if u is not None else []])
            return loss / total, grad / total

        start = np.zeros(d + 1 + (u is not None))
        if u is not None:
            start[-1] = 1.0  # start from the offset as it is: the plain uncertainty score
        bounds = None
        weight_bounds = [(None, 0.0) if nonpositive else (None, None)] * d
        if fixed_offset:
            bounds = weight_bounds + [(0.0, 0.0), (1.0, 1.0)]
        elif nonpositive:
            bounds = weight_bounds + [(None, None)] * (1 + (u is not None))
        elif u is not None:
            # The offset's slope stays positive: more uncertain never means less likely
            # wrong. Weighted labeled tasks unlike the pool can make a negative slope fit
            # best, and it would serve the tasks least likely to be wrong first (the
            # reference code's inversion, by another road).
            bounds = [(None, None)] * (d + 1) + [(1e-3, None)]
        theta = minimize(
            objective, start, jac=True, method="L-BFGS-B", bounds=bounds, options={"maxiter": 500}
        ).x
        self.coef = np.zeros(features.shape[1])
        self.coef[:d] = theta[:d]
        self.intercept = theta[d]
        self.slope = theta[d + 1] if u is not None else None
        return self

    def positive_logit(self, features: np.ndarray, offset: np.ndarray | None = None) -> np.ndarray:
        x = (np.asarray(features, dtype=np.float64) - self.mean) / self.scale
        z = x @ self.coef + self.intercept
        if self.slope is not None:
            z = z + self.slope * np.asarray(offset, dtype=np.float64)
        return z

    def positive_probability(self, features: np.ndarray, offset: np.ndarray | None = None) -> np.ndarray:
        from scipy.special import expit

        return expit(self.positive_logit(features, offset))


def uncertainty_logit(probabilities: np.ndarray) -> np.ndarray:
    """log((1 - p_max) / p_max): the log-odds that the argmax is wrong, if calibrated."""
    # From 1 - p_max alone, so the ranking is exactly least confidence's (p_max read back
    # from float32 probabilities would not sum with the rest to exactly 1).
    rest = np.clip(other_classes_probability(probabilities), 1e-30, 1.0 - 1e-12)
    return np.log(rest) - np.log1p(-rest)


@dataclass
class ErrorTrainingSet:
    """What the Correct/Incorrect head learns from, and what it scores."""

    labeled: np.ndarray  # head inputs of the labeled tasks (out-of-fold)
    incorrect: np.ndarray  # bool, out-of-fold prediction != human label
    weights: np.ndarray  # per labeled task, before balancing
    pool: np.ndarray  # head inputs of the unlabeled tasks (current classifier)
    pool_probabilities: np.ndarray
    info: dict
    # The classifier's own uncertainty (log-odds of a wrong argmax) when the head corrects
    # least confidence ("correction"); None otherwise.
    labeled_offset: np.ndarray | None = None
    pool_offset: np.ndarray | None = None
    # The last hidden layer alone (ATLAS's per-round corrections look only at it).
    labeled_hidden: np.ndarray | None = None
    pool_hidden: np.ndarray | None = None

    def fit_head(self, regularization: float) -> BinaryHead:
        return BinaryHead(regularization).fit(
            self.labeled,
            self.incorrect,
            balanced_weights(self.incorrect, self.weights),
            offset=self.labeled_offset,
        )


def domain_weights(data: OrderingInput, settings: dict) -> tuple[np.ndarray, dict]:
    """Importance weight of each labeled task: density ratio p_pool(x) / p_labeled(x).

    A training-vs-application head trained with balanced classes estimates the ratio as
    P(application | x) / P(training | x), out-of-fold. The weights are *not* renormalised:
    right after a domain shift every labeled task is unlike the pool, all weights are near
    zero, and the Correct/Incorrect head (a correction of least confidence) learns almost
    nothing from errors on the old domain, which say little about the new one. In-domain
    the weights are near 1. From the top-layer features: separating the domains does not
    need all layers, and this runs on every retrain.
    """
    from model.orderings.domain_likeness import training_probabilities

    p_training_labeled, _ = training_probabilities(
        data.features_labeled, data.features_unlabeled, seed=data.seed
    )
    p = np.clip(p_training_labeled, 1e-4, 1 - 1e-4)
    ratio = np.minimum((1 - p) / p, settings["max_domain_weight"])
    # Effective sample size and total mass: how much of the labeled set still counts.
    effective = float(ratio.sum() ** 2 / max((ratio**2).sum(), 1e-12))
    return ratio, {
        "domain_weighting": True,
        "domain_effective_examples": round(effective, 1),
        "domain_weight_mass": round(float(ratio.sum()), 1),
    }


def error_training_set(data: OrderingInput, settings: dict, probabilities: np.ndarray) -> ErrorTrainingSet:
    """Mark every labeled task Correct/Incorrect out-of-fold and build the head's inputs."""
    labels = np.asarray(data.labels, dtype=np.int64)
    features_labeled = np.asarray(data.features_labeled, dtype=np.float32)
    oof_probabilities, oof_hidden = out_of_fold(
        data.classifier, features_labeled, labels, settings["folds"], data.seed
    )
    incorrect = oof_probabilities.argmax(axis=1) != labels
    pool_hidden = data.classifier.hidden(np.asarray(data.features_unlabeled, dtype=np.float32))
    which = settings["head_features"]
    if settings["hidden_source"] == "final":
        # The current classifier's hidden layer for labeled tasks too (one space for all).
        oof_hidden = data.classifier.hidden(features_labeled)
    elif settings["hidden_source"] != "fold":
        raise ValueError("hidden_source must be 'fold' or 'final'")
    info = {
        "labeled_incorrect": int(incorrect.sum()),
        "labeled_correct": int((~incorrect).sum()),
        "head_features": which,
    }
    weights = np.ones(len(labels))
    if settings["domain_weighting"] and len(data.features_unlabeled) and len(labels) >= 4:
        weights, weighting_info = domain_weights(data, settings)
        info.update(weighting_info)
    else:
        info["domain_weighting"] = False
    correction = which.endswith("correction")
    which = {"correction": "hidden+confidence", "confidence_correction": "confidence",
             "hidden_correction": "hidden"}.get(which, which)
    return ErrorTrainingSet(
        labeled=error_features(oof_probabilities, oof_hidden, which),
        incorrect=incorrect,
        weights=weights,
        pool=error_features(probabilities, pool_hidden, which),
        pool_probabilities=probabilities,
        info=info,
        labeled_offset=uncertainty_logit(oof_probabilities) if correction else None,
        pool_offset=uncertainty_logit(probabilities) if correction else None,
        labeled_hidden=oof_hidden,
        pool_hidden=pool_hidden,
    )


def choose_regularization(training: ErrorTrainingSet, settings: dict, seed: int) -> tuple[float, dict]:
    """Pick the head's C by k-fold cross-validation on the labeled tasks.

    The criterion is the error-detection AUC on held-out labeled tasks, weighted by the
    importance weights (how much each labeled task looks like the pool), i.e. an estimate
    of how well the head finds errors in the pool. Smaller C wins unless a larger one gains
    `correction_min_gain`: without evidence the head stays least confidence.
    """
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    grid = sorted(float(c) for c in settings["regularization_grid"])
    if training.labeled_offset is None:
        grid = [c for c in grid if c > 0] or [0.05]
    wrong_weights = training.weights[training.incorrect]
    effective = float(wrong_weights.sum() ** 2 / max((wrong_weights**2).sum(), 1e-300))
    if training.labeled_offset is not None and effective < settings["min_effective_incorrect"]:
        return 0.0, {
            "head_regularization": 0.0,
            "effective_incorrect": round(effective, 1),
            "correction": "none: too few (pool-like) Incorrect examples to back one up",
        }
    target = training.incorrect
    folds = int(max(2, min(settings["folds"], target.sum(), (~target).sum())))
    splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    held_out_logits = {c: np.zeros(len(target)) for c in grid}
    for train, held_out in splitter.split(np.zeros(len(target)), target):
        offset = None if training.labeled_offset is None else training.labeled_offset
        for c in grid:
            head = BinaryHead(c).fit(
                training.labeled[train],
                target[train],
                balanced_weights(target[train], training.weights[train]),
                offset=None if offset is None else offset[train],
            )
            held_out_logits[c][held_out] = head.positive_logit(
                training.labeled[held_out], None if offset is None else offset[held_out]
            )
    weights = np.maximum(training.weights, 1e-12)
    auc = {c: float(roc_auc_score(target, held_out_logits[c], sample_weight=weights)) for c in grid}
    chosen = grid[0]
    for c in grid[1:]:
        if auc[c] >= auc[chosen] + float(settings["correction_min_gain"]):
            chosen = c
    return chosen, {
        "head_regularization": chosen,
        "effective_incorrect": round(effective, 1),
        "cv_auc": {str(c): round(a, 4) for c, a in auc.items()},
    }


def head_regularization(training: ErrorTrainingSet, settings: dict, seed: int) -> tuple[float, dict]:
    """The configured C, or the cross-validated one for "auto"."""
    if settings["head_regularization"] == "auto":
        return choose_regularization(training, settings, seed)
    return float(settings["head_regularization"]), {"head_regularization": float(settings["head_regularization"])}


def too_few_errors(training: ErrorTrainingSet, min_incorrect: int) -> str | None:
    """Why the head cannot be trained, or None."""
    wrong, right = int(training.incorrect.sum()), int((~training.incorrect).sum())
    if wrong < min_incorrect:
        return f"only {wrong} labeled tasks predicted incorrectly out-of-fold (< {min_incorrect})"
    if right < min_incorrect:
        return f"only {right} labeled tasks predicted correctly out-of-fold (< {min_incorrect})"
    return None


class PredictedIncorrect(Ordering):
    """Score = P(Correct) from the Correct/Incorrect head; lower = label sooner."""

    name = "predicted_incorrect"
    defaults = dict(ERROR_HEAD_DEFAULTS)

    def score(self, data: OrderingInput) -> OrderingResult:
        settings = self.settings(data)
        probabilities = self.probabilities(data)
        fallback = self._fallback_reason(data, settings)
        training = None
        if fallback is None:
            training = error_training_set(data, settings, probabilities)
            fallback = too_few_errors(training, settings["min_incorrect"])
        if fallback is not None:
            info = {"fallback": "least_confidence", "fallback_reason": fallback}
            if training is not None:
                info.update(training.info)
            return self.finish(data, least_confidence_score(probabilities), probabilities, info)
        regularization, regularization_info = head_regularization(training, settings, data.seed)
        head = training.fit_head(regularization)
        p_correct = 1.0 - head.positive_probability(training.pool, training.pool_offset)
        info = {"fallback": None, **training.info, **regularization_info}
        return self.finish(data, p_correct, probabilities, info)

    @staticmethod
    def _fallback_reason(data: OrderingInput, settings: dict) -> str | None:
        labels = np.asarray(data.labels)
        if len(labels) < 2 * settings["min_incorrect"]:
            return f"only {len(labels)} labeled tasks (< {2 * settings['min_incorrect']})"
        if len(np.unique(labels)) < 2:
            return "all labeled tasks have the same label"
        return None
