"""The machinery of active transfer learning, shared by the orderings that need it.

Munro, *Human-in-the-Loop Machine Learning*, ch. 5: new binary heads learn something about
the current model (Correct/Incorrect, for `predicted_incorrect` and `atlas`) or about the
data (training vs application, for `domain_likeness` and the importance weights). Here
live, in one place, so no ordering imports another:

* `BinaryHead`: the small logistic head all of them train, optionally as a correction of an
  offset (the classifier's own uncertainty);
* `training_probabilities`: out-of-fold P(training) of labeled and unlabeled tasks;
* the Correct/Incorrect training set over **every control's head**
  (`error_training_set`): a labeled task is Incorrect when the out-of-fold prediction of
  any control it answers differs from the human answer, so the head learns
  P(any control wrong); its offset is the log-odds of "any decision wrong" if the heads'
  decisions were independent and calibrated (with one single-choice control:
  log((1 - p_max) / p_max), least confidence's ranking);
* the choice of the head's regularisation by cross-validation, and the fallback reasons.

The out-of-fold pass itself belongs to the classifier heads (`model.heads`): the retrain
runs it once and hands it over in `OrderingInput.out_of_fold`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model.orderings.base import (
    OrderingInput,
    decision_probabilities,
    either,
    flag,
    integer,
    number,
    numbers,
    one_of,
)
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
    # Too few errors for the cross-validated head (fewer than `min_incorrect`, or fewer
    # than `min_effective_incorrect` pool-like ones): "prior" still learns from them, as a
    # correction of the classifier's confidence whose offset is fixed (slope 1: the prior)
    # and whose weights are shrunk by `prior_regularization` (C), so a handful of errors
    # moves the ranking a little and none leaves it least confidence's; "least_confidence"
    # serves least confidence unchanged (the behaviour before issue 17). Only with a
    # correction head (`head_features` ending in "correction"); needs `min_prior_incorrect`
    # Incorrect and Correct examples.
    "few_errors": "prior",
    # What the prior's correction sees: "class" (which class each decision predicts: an
    # error rate per predicted class, unpenalised by position in the hidden layer) or
    # "head" (the head's own inputs, `head_features`). On real text (movie snippets ->
    # airline tweets, tests/test_orderings.py) "head" found the pool's errors worse than
    # least confidence at every C tried (AUC -0.002 to -0.02); "class" stayed within 2e-4.
    "prior_features": "class",
    "prior_regularization": 0.01,
    "min_prior_incorrect": 2,
    # Weight labeled tasks by how much they look like the unlabeled pool.
    "domain_weighting": True,
    "max_domain_weight": 10.0,  # clip of the density ratio
}
HEAD_FEATURES = ("hidden", "confidence", "hidden+confidence", "correction",
                 "confidence_correction", "hidden_correction")
ERROR_HEAD_RULES: dict = {
    "folds": integer(2, 20),
    "min_incorrect": integer(1, 10_000),
    "head_features": one_of(*HEAD_FEATURES),
    "hidden_source": one_of("fold", "final"),
    "head_regularization": either(one_of("auto"), number(0.0, 1e6)),
    "regularization_grid": numbers(0.0, 1e6),
    "correction_min_gain": number(0.0, 1.0),
    "min_effective_incorrect": number(0.0, 1e9),
    "few_errors": one_of("prior", "least_confidence"),
    "prior_features": one_of("class", "head"),
    "prior_regularization": number(1e-9, 1e6),
    "min_prior_incorrect": integer(1, 10_000),
    "domain_weighting": flag(),
    "max_domain_weight": number(1.0, 1e6),
}


# -- the binary head ---------------------------------------------------------------------
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
        free_intercept: bool = False,
    ) -> BinaryHead:
        """Fit on (features, target) with sample weights.

        With `fixed_offset`, logit = offset + w . features: the offset's slope stays 1 and
        there is no intercept, so the data can only move the score through the penalised
        weights (ATLAS's local, per-round corrections). Without `standardize` a feature that
        is 0 leaves the score alone (kernel features: far-away tasks stay where they are).
        With `nonpositive` the weights are kept <= 0: a feature can only lower the score.
        With `fixed_offset` and `free_intercept` the intercept is learned, unpenalised: a
        miscalibration common to all tasks does not have to be paid for by the weights.
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
            bounds = weight_bounds + [(None, None) if free_intercept else (0.0, 0.0), (1.0, 1.0)]
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


def stacked_logits(heads: list[BinaryHead], features: np.ndarray, rows: np.ndarray | None = None,
                   chunk: int = 2048) -> np.ndarray:
    """`positive_logit` of several offset-free heads on `features[rows]` (all rows if None),
    (n, len(heads)).

    The standardisation is folded into each head's weights (x @ (coef / scale) + intercept
    - (mean / scale) @ coef, equal up to rounding), so the rows are read once, in chunks,
    instead of once per head with a standardised float64 copy each: for 8,500 pool tasks of
    all encoder layers (2,688 values) that copy was most of domain-likeness's time.
    """
    weights = np.column_stack([h.coef / h.scale for h in heads])
    intercepts = np.array([h.intercept - (h.mean / h.scale) @ h.coef for h in heads])
    rows = np.arange(len(features)) if rows is None else np.asarray(rows, dtype=np.int64)
    logits = np.empty((len(rows), len(heads)))
    for start in range(0, len(rows), chunk):
        part = np.asarray(features[rows[start:start + chunk]], dtype=np.float64)
        logits[start:start + chunk] = part @ weights + intercepts
    return logits


# -- training vs application ---------------------------------------------------------------
def training_probabilities(
    labeled: np.ndarray,
    unlabeled: np.ndarray,
    folds: int = 3,
    seed: int = 0,
    regularization: float = 0.01,
    max_per_side: int = 1500,
) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold P(training) of every labeled and every unlabeled task (rows of features).

    Every task is scored by a head that did not train on it: k-fold over the tasks the
    heads train on (at most `max_per_side` per side), and the average of the fold heads for
    the tasks left out of training.
    """
    from scipy.special import expit

    labeled = np.asarray(labeled, dtype=np.float32)
    unlabeled = np.asarray(unlabeled, dtype=np.float32)
    n_labeled, n_unlabeled = len(labeled), len(unlabeled)
    rng = np.random.default_rng(seed)
    chosen_labeled = np.sort(rng.permutation(n_labeled)[:max_per_side])
    chosen_unlabeled = np.sort(rng.permutation(n_unlabeled)[:max_per_side])
    x = np.concatenate([labeled[chosen_labeled], unlabeled[chosen_unlabeled]])
    is_training = np.concatenate([np.ones(len(chosen_labeled), bool), np.zeros(len(chosen_unlabeled), bool)])
    # Seeded folds, stratified by side, so both sides are in every fold.
    fold_of = np.empty(len(x), dtype=np.int64)
    folds = int(max(2, min(folds, len(chosen_labeled), len(chosen_unlabeled))))
    for side in (True, False):
        members = np.flatnonzero(is_training == side)
        fold_of[rng.permutation(members)] = np.arange(len(members)) % folds

    out_of_fold = np.zeros(len(x))
    left_out_labeled = np.setdiff1d(np.arange(n_labeled), chosen_labeled)
    left_out_unlabeled = np.setdiff1d(np.arange(n_unlabeled), chosen_unlabeled)
    heads = []
    for fold in range(folds):
        train, held_out = fold_of != fold, fold_of == fold
        head = BinaryHead(regularization).fit(
            x[train], is_training[train], balanced_weights(is_training[train], np.ones(train.sum()))
        )
        out_of_fold[held_out] = head.positive_probability(x[held_out])
        heads.append(head)
    # The tasks left out of training: the mean of the fold heads' probabilities.
    ensemble_labeled = expit(stacked_logits(heads, labeled, left_out_labeled)).mean(axis=1)
    ensemble_unlabeled = expit(stacked_logits(heads, unlabeled, left_out_unlabeled)).mean(axis=1)

    p_labeled = np.zeros(n_labeled)
    p_unlabeled = np.zeros(n_unlabeled)
    p_labeled[chosen_labeled] = out_of_fold[: len(chosen_labeled)]
    p_unlabeled[chosen_unlabeled] = out_of_fold[len(chosen_labeled) :]
    p_labeled[left_out_labeled] = ensemble_labeled
    p_unlabeled[left_out_unlabeled] = ensemble_unlabeled
    return p_labeled, p_unlabeled


def domain_weights(data: OrderingInput, settings: dict) -> tuple[np.ndarray, dict]:
    """Importance weight of each labeled task: density ratio p_pool(x) / p_labeled(x).

    A training-vs-application head trained with balanced classes estimates the ratio as
    P(application | x) / P(training | x), out-of-fold. The weights are *not* renormalised:
    right after a domain shift every labeled task is unlike the pool, all weights are near
    zero, and the Correct/Incorrect head (a correction of least confidence) learns almost
    nothing from errors on the old domain, which say little about the new one. In-domain
    the weights are near 1. From the task's input features (every text object): separating
    the domains does not need all layers, and this runs on every retrain.
    """
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


# -- Correct / Incorrect over every head ------------------------------------------------------
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


def error_features(decisions: list[np.ndarray], hidden: list[np.ndarray], which: str) -> np.ndarray:
    """The inputs of the Correct/Incorrect head, per `head_features`: the last hidden layer
    of every head and/or the confidence features of every decision, side by side."""
    hidden_part = [np.asarray(h, dtype=np.float64) for h in hidden]
    confidence_part = [confidence_features(p) for p in decisions]
    if which == "hidden":
        return np.column_stack(hidden_part)
    if which == "confidence":
        return np.column_stack(confidence_part)
    if which == "hidden+confidence":
        return np.column_stack(hidden_part + confidence_part)
    raise ValueError(
        f"head_features must be 'hidden', 'confidence' or 'hidden+confidence', not {which!r}"
    )


def wrong_probability(decisions: list[np.ndarray]) -> np.ndarray:
    """P(at least one decision wrong) if each decision's argmax were calibrated and the
    decisions independent; with one decision exactly 1 - p_max (computed without
    cancellation)."""
    wrong = [np.clip(other_classes_probability(p), 0.0, 1.0) for p in decisions]
    if len(wrong) == 1:
        return wrong[0]
    log_right = np.sum([np.log1p(-np.minimum(w, 1.0 - 1e-12)) for w in wrong], axis=0)
    return -np.expm1(log_right)


def uncertainty_logit(decisions: list[np.ndarray] | np.ndarray) -> np.ndarray:
    """Log-odds that the prediction is wrong, if calibrated: log((1 - p_max) / p_max) for one
    decision, log(P(any wrong) / P(all right)) for several."""
    if isinstance(decisions, np.ndarray):
        decisions = [decisions]
    # From 1 - p_max alone, so the ranking is exactly least confidence's (p_max read back
    # from float32 probabilities would not sum with the rest to exactly 1).
    rest = np.clip(wrong_probability(decisions), 1e-30, 1.0 - 1e-12)
    return np.log(rest) - np.log1p(-rest)


def labeled_incorrect(data: OrderingInput, oof) -> tuple[np.ndarray, np.ndarray]:
    """(Incorrect, marked) per labeled task: Incorrect when the out-of-fold prediction of a
    control the task answers differs from its answer (multi-label: the predicted set of
    choices differs); marked when the task answers a control scored out-of-fold."""
    heads = data.control_heads()
    targets = data.control_targets()
    n = len(data.features_labeled)
    incorrect = np.zeros(n, dtype=bool)
    marked = np.zeros(n, dtype=bool)
    for head, p, scored, t in zip(heads.heads, oof.probabilities, oof.scored, targets):
        t = np.asarray(t)
        if not scored.any():
            continue
        predicted = head.predict(p)
        wrong = (predicted != t).any(axis=1) if t.ndim == 2 else predicted != t
        incorrect |= scored & wrong
        marked |= scored
    return incorrect, marked


@dataclass
class ErrorTrainingSet:
    """What the Correct/Incorrect head learns from, and what it scores."""

    labeled: np.ndarray  # head inputs of the labeled tasks (out-of-fold)
    incorrect: np.ndarray  # bool, out-of-fold prediction != human label
    weights: np.ndarray  # per labeled task, before balancing
    pool: np.ndarray  # head inputs of the unlabeled tasks (current classifier)
    info: dict
    # The classifier's own uncertainty (log-odds of a wrong prediction) when the head
    # corrects least confidence ("correction"); None otherwise.
    labeled_offset: np.ndarray | None = None
    pool_offset: np.ndarray | None = None
    # The last hidden layer(s) alone (ATLAS's per-round corrections look only at them).
    labeled_hidden: np.ndarray | None = None
    pool_hidden: np.ndarray | None = None
    # Which labeled tasks (indices into OrderingInput's labeled set) the rows above are.
    labeled_rows: np.ndarray | None = None
    # One-hot predicted class of every decision, side by side (the "class" prior's inputs).
    labeled_classes: np.ndarray | None = None
    pool_classes: np.ndarray | None = None

    def fit_head(self, regularization: float) -> BinaryHead:
        return BinaryHead(regularization).fit(
            self.labeled,
            self.incorrect,
            balanced_weights(self.incorrect, self.weights),
            offset=self.labeled_offset,
        )


def error_training_set(data: OrderingInput, settings: dict) -> ErrorTrainingSet:
    """Mark every labeled task Correct/Incorrect out-of-fold and build the head's inputs.

    Labeled tasks that answer no control scored out-of-fold are left out of the head's
    training set; the rest keep their rows.
    """
    heads = data.control_heads()
    oof = data.out_of_fold_pass(settings["folds"])
    incorrect, marked = labeled_incorrect(data, oof)
    pool_views = data.pool_heads()
    pool_decisions = decision_probabilities(pool_views)
    pool_hidden = heads.hidden(data.control_features_unlabeled())
    oof_hidden = list(oof.hidden)
    if settings["hidden_source"] == "final":
        # The current classifier's hidden layer for labeled tasks too (one space for all).
        oof_hidden = heads.hidden(data.control_features_labeled())
    labeled_views = [view.with_probabilities(p) for view, p in zip(pool_views, oof.probabilities)]
    labeled_decisions = decision_probabilities(labeled_views)
    which = settings["head_features"]
    info = {
        "labeled_incorrect": int(incorrect[marked].sum()),
        "labeled_correct": int((~incorrect[marked]).sum()),
        "head_features": which,
    }
    weights = np.ones(len(incorrect))
    if settings["domain_weighting"] and len(data.features_unlabeled) and len(incorrect) >= 4:
        weights, weighting_info = domain_weights(data, settings)
        info.update(weighting_info)
    else:
        info["domain_weighting"] = False
    correction = which.endswith("correction")
    which = {"correction": "hidden+confidence", "confidence_correction": "confidence",
             "hidden_correction": "hidden"}.get(which, which)
    # A labeled task's offset counts only the decisions of the controls it answers: those
    # are the ones its Incorrect mark is about.
    labeled_offset = None
    if correction:
        labeled_offset = uncertainty_logit(_answered_decisions(labeled_views, oof.scored))
    rows = np.flatnonzero(marked)
    return ErrorTrainingSet(
        labeled=error_features(labeled_decisions, oof_hidden, which)[rows],
        incorrect=incorrect[rows],
        weights=weights[rows],
        pool=error_features(pool_decisions, pool_hidden, which),
        info=info,
        labeled_offset=labeled_offset[rows] if correction else None,
        pool_offset=uncertainty_logit(pool_decisions) if correction else None,
        labeled_hidden=np.column_stack(oof_hidden)[rows],
        pool_hidden=np.column_stack(pool_hidden),
        labeled_rows=rows,
        labeled_classes=predicted_classes(labeled_decisions)[rows],
        pool_classes=predicted_classes(pool_decisions),
    )


def predicted_classes(decisions: list[np.ndarray]) -> np.ndarray:
    """One-hot argmax of every decision, side by side: (n, total number of classes)."""
    return np.column_stack([np.eye(p.shape[1])[np.asarray(p).argmax(axis=1)] for p in decisions])


def _answered_decisions(views: list, scored: list[np.ndarray]) -> list[np.ndarray]:
    """Each head's decisions, with unanswered rows made certain (they cannot be wrong)."""
    out = []
    for view, rows in zip(views, scored):
        for decision in decision_probabilities([view]):
            decision = decision.copy()
            decision[~rows] = 0.0
            decision[~rows, 0] = 1.0
            out.append(decision)
    return out


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
    effective = effective_incorrect(training)
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
        offset = training.labeled_offset
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


def uses_prior(settings: dict) -> bool:
    """Whether few errors are learned from as a correction of a fixed confidence prior."""
    return settings["few_errors"] == "prior" and settings["head_features"].endswith("correction")


def effective_incorrect(training: ErrorTrainingSet) -> float:
    """Effective number of Incorrect examples under the importance weights (Kish)."""
    wrong_weights = training.weights[training.incorrect]
    return float(wrong_weights.sum() ** 2 / max((wrong_weights**2).sum(), 1e-300))


class PriorHead:
    """`prior_head`'s fit with the inputs it was fitted on: P(Incorrect) of the pool."""

    def __init__(self, head: BinaryHead, by_class: bool):
        self.head, self.by_class = head, by_class

    def pool_logit(self, training: ErrorTrainingSet) -> np.ndarray:
        inputs = training.pool_classes if self.by_class else training.pool
        return self.head.positive_logit(inputs, training.pool_offset)

    def labeled_logit(self, training: ErrorTrainingSet) -> np.ndarray:
        inputs = training.labeled_classes if self.by_class else training.labeled
        return self.head.positive_logit(inputs, training.labeled_offset)


def prior_head(training: ErrorTrainingSet, regularization: float, by_class: bool = False) -> BinaryHead:
    """The Correct/Incorrect head for few errors: logit P(Incorrect) = offset + w . x.

    With `by_class` x is the one-hot predicted class of each decision (not standardised):
    w is then a penalised shift of the log-odds per predicted class, which moves tasks of a
    class whose predictions go wrong more often than their confidence says (a rare class)
    ahead of equally confident tasks of the other classes.

    The offset (the classifier's own log-odds of being wrong) is the prior and is kept
    as it is (slope 1, plus a free intercept, which moves no ranking); only the
    L2-penalised weights learn, from every
    importance-weighted labeled task, Incorrect and Correct balanced by weight as for the
    cross-validated head: the free intercept absorbs the balancing, and P(Incorrect) keeps
    the scale ATLAS's `min_incorrect_probability` is set for. Where the errors share something
    (a region of the hidden layer, a confidence pattern) the pool tasks that share it
    move up; where they share nothing the weights stay near 0 and the ranking stays least
    confidence's. Unlike the cross-validated head it needs no held-out errors to choose C,
    so it acts from the first rounds.
    """
    return BinaryHead(regularization).fit(
        training.labeled_classes if by_class else training.labeled,
        training.incorrect,
        balanced_weights(training.incorrect, training.weights),
        offset=training.labeled_offset,
        fixed_offset=True,
        standardize=not by_class,
        free_intercept=True,
    )


def error_logits(training: ErrorTrainingSet, settings: dict, seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """(labeled logits, pool logits, info) of P(Incorrect): the head of predicted-incorrect
    and of ATLAS's first round.

    With enough (pool-like) errors: the cross-validated correction (`head_regularization`).
    With fewer, and `few_errors="prior"`: `prior_head`.
    """
    wrong = int(training.incorrect.sum())
    few = wrong < settings["min_incorrect"] or effective_incorrect(training) < settings["min_effective_incorrect"]
    if uses_prior(settings) and few:
        regularization = float(settings["prior_regularization"])
        by_class = settings["prior_features"] == "class"
        head = PriorHead(prior_head(training, regularization, by_class), by_class)
        return head.labeled_logit(training), head.pool_logit(training), {
            "head_regularization": regularization,
            "effective_incorrect": round(effective_incorrect(training), 1),
            "correction": "prior: too few errors to cross-validate; the classifier's confidence, "
                          "corrected with shrunk weights",
        }
    regularization, info = head_regularization(training, settings, seed)
    head = training.fit_head(regularization)
    return (head.positive_logit(training.labeled, training.labeled_offset),
            head.positive_logit(training.pool, training.pool_offset), info)


def error_head_fallback(data: OrderingInput, settings: dict) -> tuple[str | None, ErrorTrainingSet | None]:
    """(why the ordering falls back to least confidence or None, the training set if built).

    With `few_errors="prior"` a correction head needs only `min_prior_incorrect` Incorrect
    (and Correct) examples; otherwise `min_incorrect`.
    """
    least = settings["min_prior_incorrect"] if uses_prior(settings) else settings["min_incorrect"]
    fallback = too_little_to_mark(data, least)
    training = None
    if fallback is None:
        training = error_training_set(data, settings)
        fallback = too_few_errors(training, least)
    return fallback, training


def too_few_errors(training: ErrorTrainingSet, min_incorrect: int) -> str | None:
    """Why the head cannot be trained, or None."""
    wrong, right = int(training.incorrect.sum()), int((~training.incorrect).sum())
    if wrong < min_incorrect:
        return f"only {wrong} labeled tasks predicted incorrectly out-of-fold (< {min_incorrect})"
    if right < min_incorrect:
        return f"only {right} labeled tasks predicted correctly out-of-fold (< {min_incorrect})"
    return None


def too_little_to_mark(data: OrderingInput, min_incorrect: int) -> str | None:
    """Why labeled tasks cannot be marked Correct/Incorrect at all, or None."""
    n = len(data.features_labeled)
    if n < 2 * min_incorrect:
        return f"only {n} labeled tasks (< {2 * min_incorrect})"
    for t in data.control_targets():
        t = np.asarray(t)
        rows = t[(t >= 0) if t.ndim == 1 else (t >= 0).all(axis=1)]
        if len(np.unique(rows, axis=0)) >= 2:
            return None
    return "all labeled tasks have the same label"
