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
* Few errors (issue 17): with fewer than `min_incorrect` Incorrect examples, or too few
  pool-like ones to cross-validate a correction, the default (`few_errors="prior"`) still
  learns from them: the classifier's confidence is a fixed prior and a correction with
  shrunk weights (`prior_regularization`) moves it (`transfer.prior_head`). Only with fewer
  than `min_prior_incorrect` Incorrect (or Correct) examples, or with
  `few_errors="least_confidence"`, does the ordering fall back to least confidence, and it
  says so in `info`.
* **Several controls** (multi-label heads included): one Correct/Incorrect head over all of
  them. A labeled task is Incorrect when the out-of-fold prediction of any control it
  answers is wrong (multi-label: the predicted set of choices differs from the human's);
  the head sees every head's last hidden layer and every decision's confidence features,
  and its offset is the log-odds that any decision is wrong. Score = P(all controls right).
  The out-of-fold pass is the retrain's one pass (`OrderingInput.out_of_fold`), shared with
  the mislabeling score; the machinery lives in `model.orderings.transfer`.
* The ranking points the right way: score = P(Correct), **lower = more likely incorrect =
  label sooner** (the reference code sorts by one minus P(incorrect) and serves the tasks most
  likely correct first).
"""

from __future__ import annotations

from scipy.special import expit

from model.orderings.base import Ordering, OrderingInput, OrderingResult, combined_score
from model.orderings.least_confidence import least_confidence_score
from model.orderings.transfer import (
    ERROR_HEAD_DEFAULTS,
    ERROR_HEAD_RULES,
    error_head_fallback,
    error_logits,
)


class PredictedIncorrect(Ordering):
    """Score = P(Correct) from the Correct/Incorrect head; lower = label sooner."""

    name = "predicted_incorrect"
    defaults = dict(ERROR_HEAD_DEFAULTS)
    rules = dict(ERROR_HEAD_RULES)

    def score(self, data: OrderingInput) -> OrderingResult:
        settings = self.settings(data)
        views = data.pool_heads()
        fallback, training = error_head_fallback(data, settings)
        if fallback is not None:
            info = {"fallback": "least_confidence", "fallback_reason": fallback}
            if training is not None:
                info.update(training.info)
            return self.finish(data, combined_score(least_confidence_score, views), views, info)
        _, pool_logit, regularization_info = error_logits(training, settings, data.seed)
        p_correct = expit(-pool_logit)
        info = {"fallback": None, **training.info, **regularization_info}
        return self.finish(data, p_correct, views, info)
