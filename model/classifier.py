"""The project's classifiers: small heads trained on top of the encoder's vectors.

Two kinds (`HeadConfig.kind`), with one interface (fit, predict_proba, hidden, save/load):

* `"linear"` (what every retrain trains, whatever the ordering): a logistic regression on the
  encoder's vectors, fitted by scikit-learn, class-weighted as below. Its L2 strength `C`
  (0.01-1,000) and a temperature of at least 1 that its logits are multiplied by are chosen
  together, by the out-of-fold log loss on the labels (stratified folds;
  `HeadConfig.c_objective`, "sharpened_log_loss"): a strong penalty whose decisions are
  right but whose probabilities are shrunk is sharpened back, so it can win; a weak one is
  never softened, for on the boundary cases an ordering buys that lets an overconfident,
  nearly unpenalised model win the log loss and decide worse. On the MiniLM
  sentence vectors it was at least as accurate as the MLP at every budget of the simulator
  scenarios (BENCHMARKS.md, "Issue 17"). Its weights live in a `torch.nn.Linear`, so it
  is saved, loaded, fine-tuned and run on the GPU like the MLP. It has no hidden layer:
  `hidden()` is its input, the encoder's vector, which is the last hidden layer of the
  whole model (encoder + head) and what the Active Transfer Learning orderings then read.
* `"mlp"`: one real hidden layer (input → Linear → ReLU → Dropout → Linear), trained a
  fixed number of full-batch AdamW epochs, as in *Human-in-the-Loop Machine Learning*;
  `hidden()` is that layer. `HeadConfig`'s default (for code that builds a head directly),
  and the kind of versions saved before `kind` existed.

* `ClassifierHead`: single-choice, softmax over the choices; classes weighted by inverse
  frequency so an imbalanced project does not learn its class prior instead of its task.
  The linear head can instead choose its weighting with its C, on the same out-of-fold
  pass (`HeadConfig.class_weight="auto"`): balanced or none, whichever has the lower
  out-of-fold log loss, a tie going to balanced. It is not the default: in the simulator's
  paired runs (BENCHMARKS.md, "Issue 17, points 1 and 2", class weighting) it closed the
  always-balanced head's gaps to an unweighted logistic regression (up to 1.35 points after
  the reverse domain shift, 0.13-0.32 with a 5 % class), but the choice is scored on the
  labels' own class mix, and where that is not the project's (only free labels from another
  domain: both shift scenarios at 0 labels) it picks unweighted and the first model is
  5.5 points below a balanced one; the active-learning loop's AULC was lower in three of
  five scenarios.
* `MultiLabelHead`: multi-label (`<Choices choice="multiple">`), one sigmoid per choice
  (the linear head's each fitted on the labels' own yes/no mix or with its positives
  weighted against its negatives, whichever has the lower out-of-fold log loss,
  `HeadConfig.choice_weight`; the MLP's always weighted), and a per-choice decision
  threshold (`thresholds_`) chosen on out-of-fold probabilities (`choose_thresholds`): by
  default the one that gets the most tasks' yes/no on that choice right, i.e. leaves the
  annotator the fewest choices to change.

Weights are stored as safetensors plus JSON, never pickle.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

# The small head's maths runs on one thread: why in model/threads.py.
from model.threads import one_thread

WEIGHTS_FILE = "classifier.safetensors"
CONFIG_FILE = "classifier.json"


def class_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """Inverse-frequency weights (mean 1 over the examples); 0 for an absent class."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(n_classes)
    weights[present] = len(y) / (present.sum() * counts[present])
    return weights


# The linear head's candidate L2 strengths (scikit-learn's C, inverse). Sentence vectors
# are unit-length, so their logits need large weights: the grid reaches far above
# scikit-learn's default of 1, which under-fits them.
C_GRID = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)
# When too few labels per class leave no out-of-fold choice (fewer than two of some class).
FALLBACK_C = 10.0
# The single-choice linear head's class weightings (scikit-learn's `class_weight`): "auto"
# chooses between the other two out-of-fold, with C. Where no out-of-fold choice is possible
# (FALLBACK_C's case, or one class), "auto" is balanced, the rule before the choice existed.
CLASS_WEIGHTS = ("auto", "balanced", None)
# The multi-label linear head's per-choice weightings (`HeadConfig.choice_weight`).
# "auto" chooses between the two per choice, out-of-fold, with its C (as `CLASS_WEIGHTS`).
CHOICE_WEIGHTS = (None, "balanced", "auto")
C_FOLDS = 5
C_OBJECTIVES = ("log_loss", "accuracy", "scaled_log_loss", "sharpened_log_loss")
# How the out-of-fold scores that choose C (and an "auto" weighting) count each label
# (`HeadConfig.c_weighting`): "uniform" alike; "pool" by how like the project's unlabeled
# tasks it is (`pool_importance`).
C_WEIGHTINGS = ("uniform", "pool", "pool_fit")
# `pool_importance`: at most this many unlabeled tasks (a random sample) stand for the pool,
# the cross-fitting folds over the labels, the L2 strength of the labeled-vs-pool
# classifier, and the range its density ratios are clipped to before they are normalised.
IMPORTANCE_POOL_SAMPLE = 2000
IMPORTANCE_FOLDS = 3
IMPORTANCE_C = 1.0
IMPORTANCE_CLIP = (0.01, 100.0)
# By accuracy, balanced heads on few labels of many classes chose the grid's strongest
# penalty (0.1) most often (a nearly class-centroid rule), so its grid reaches lower.
ACCURACY_C_GRID = (0.01, 0.03) + C_GRID
# The temperatures a head's logits may be scaled by (c_objective "accuracy" and
# "scaled_log_loss"), for the lowest out-of-fold log loss: a strong penalty leaves its
# probabilities underconfident.
TEMPERATURES = tuple(float(t) for t in np.logspace(-1, 2, 31))
# `c_objective="sharpened_log_loss"`'s temperatures: those of at least 1, which can only make
# a model more confident. A strong penalty shrinks the logits, and sharpening undoes that;
# softening would instead let an almost unpenalised model, overconfident on the boundary
# cases an ordering buys, win the log loss while deciding worse (BENCHMARKS.md, "C and a
# sharpening temperature").
SHARPENING = tuple(t for t in TEMPERATURES if t >= 1.0)
# The objectives that choose C and a temperature together, and the temperatures each may use.
JOINT_TEMPERATURES = {"scaled_log_loss": TEMPERATURES, "sharpened_log_loss": SHARPENING}
HEAD_KINDS = ("linear", "mlp")
# What every retrain trains, for every ordering alike (so the simulator's seeds stay paired):
# chosen by the simulator scenarios, BENCHMARKS.md "Issue 17, point 1".
RETRAIN_HEAD_KIND = "linear"


@dataclass
class HeadConfig:
    labels: list[str]
    input_dim: int
    # "linear" (logistic regression, C chosen out-of-fold) or "mlp" (one hidden layer). A
    # retrain trains `RETRAIN_HEAD_KIND`; a head built directly is the MLP as before.
    kind: str = "mlp"
    # linear: the L2 strength; None chooses it per fit by `c_objective`.
    C: float | None = None
    # Single-choice linear head: "balanced" (inverse class frequency), None (unweighted), or
    # "auto", the one of the two with the lower out-of-fold log loss, chosen per fit with C
    # on the same folds (a tie goes to balanced; balanced where no out-of-fold pass runs: a
    # given C, a class with one label). Balanced by default: why in the module docstring.
    # The MLP always weights (its rare side counts as much as its common side); the
    # multi-label linear head follows `choice_weight`.
    class_weight: str | None = "balanced"
    # Multi-label linear head: each choice's logistic regression unweighted (None, the labels'
    # own yes/no mix), "balanced" (its positives weighted against its negatives by
    # `positive_weights`, as the MLP's loss; the rule before), or "auto" (the default): per
    # choice, the one of the two with the lower out-of-fold log loss, chosen with its C on the
    # same folds; balanced where a choice has fewer than two of a side (no out-of-fold pass)
    # or its C is given. On both 500-label Debian scenarios the weighted head was 1.4-3.8
    # points of exact match behind an unweighted logistic regression at 200-500 labels; the
    # unweighted one was behind a balanced one at 25 labels; "auto" was behind neither on
    # any of the four Debian scenarios, and its loop 1.1-2.4 AULC ahead of the weighted one
    # at 500 labels (BENCHMARKS.md, "Multi-label choices unweighted"). It fits each choice
    # twice. Settings saved before this field existed load as "balanced" (`from_config_dict`).
    choice_weight: str | None = "auto"
    # Multi-label heads: what the per-choice thresholds maximise on the out-of-fold pass,
    # "accuracy" (that choice right per task) or "f1" (that choice's F1; the rule before issue
    # 17, which over-predicted the rare choices: exact-match accuracy 13-26 % instead of
    # 33-49 % on the Debian scenarios, BENCHMARKS.md "Issue 17, points 1 and 2").
    threshold_objective: str = "accuracy"
    # Linear heads with C None: what the out-of-fold pass scores each candidate C by,
    # "log_loss" or "accuracy" (the share of labels predicted right; mean log loss breaks
    # ties, which small folds make common). "accuracy" then scales the logits by the
    # temperature with the lowest out-of-fold log loss (TEMPERATURES: the decisions stay,
    # the probabilities are calibrated), searches ACCURACY_C_GRID, and searches even when a
    # class has a single label (the others' folds still tell C apart). "auto" class
    # weighting compares the two weightings by the same score. Not the default: it closed
    # the head's gap to an accuracy-chosen logistic regression on many-class text but cost
    # the loop 0.51 AULC on three-class tweets (BENCHMARKS.md, "C by out-of-fold accuracy").
    # "scaled_log_loss" chooses C (ACCURACY_C_GRID) and the temperature together, by the
    # out-of-fold log loss each C has at its best temperature; it also searches with a
    # single-label class. "sharpened_log_loss" (the default since 2026-12-03) does the same
    # with the temperatures of at least 1 only (SHARPENING): in the simulator's paired loops
    # it was 0.81 AULC ahead of "log_loss" on 8-class text, its head never behind the
    # accuracy-chosen balanced logistic regression there (log loss was, by up to 1.15 points
    # at 50-300 labels), and tied on the eight other scenarios (BENCHMARKS.md, "C and a
    # sharpening temperature"). Settings saved before it was the default load as "log_loss".
    c_objective: str = "sharpened_log_loss"
    # Linear heads with C None: how the out-of-fold scores that choose C (and an "auto" class
    # or choice weighting) count each label. "uniform": alike. "pool": importance-weighted
    # cross-validation (Sugiyama, Krauledat and Mueller 2007), each label by how like the
    # project's unlabeled tasks it is (`pool_importance`), so that the C chosen is the one
    # for the tasks still to predict, not for the labels an ordering bought near the
    # boundary or that came free from another domain. Needs the unlabeled tasks' vectors:
    # `fit(..., pool=...)` (`ControlHeads.fit` passes every task that does not answer the
    # control); without them it scores uniformly. Log-loss objectives only. "pool_fit" also
    # weights each label's loss in the fits themselves by it (covariate-shift adaptation,
    # Shimodaira 2000), a balanced weighting then balancing the weighted class counts.
    # Not the default: after the reverse domain shift both cost the loop 1.3-1.8 AULC
    # (BENCHMARKS.md, "C chosen for the pool").
    c_weighting: str = "uniform"
    # mlp only, below (seed also orders the linear head's folds).
    hidden_dim: int = 128
    epochs: int = 150
    learning_rate: float = 3e-3
    weight_decay: float = 1e-3
    dropout: float = 0.1
    seed: int = 0
    extra: dict = field(default_factory=dict)


class _TwoLayerHead:
    """`body` (the MLP's Linear → ReLU → Dropout; the linear head's identity) → (last hidden
    layer) → `out` (Linear); what both heads share."""

    def __init__(self, config: HeadConfig, device: str = "cpu"):
        import torch
        from torch import nn

        if config.kind not in HEAD_KINDS:
            raise ValueError(f"unknown head kind {config.kind!r}; choose one of {HEAD_KINDS}")
        self.config = config
        self.device = device
        if config.class_weight not in CLASS_WEIGHTS:
            raise ValueError(f"unknown class weighting {config.class_weight!r}; choose one of {CLASS_WEIGHTS}")
        if config.choice_weight not in CHOICE_WEIGHTS:
            raise ValueError(f"unknown choice weighting {config.choice_weight!r}; choose one of {CHOICE_WEIGHTS}")
        if config.c_objective not in C_OBJECTIVES:
            raise ValueError(f"unknown C objective {config.c_objective!r}; choose one of {C_OBJECTIVES}")
        if config.c_weighting not in C_WEIGHTINGS:
            raise ValueError(f"unknown C weighting {config.c_weighting!r}; choose one of {C_WEIGHTINGS}")
        if config.c_weighting != "uniform" and config.c_objective == "accuracy":
            raise ValueError(f"c_weighting={config.c_weighting!r} weights a log loss; use it with "
                             "c_objective 'log_loss', 'scaled_log_loss' or 'sharpened_log_loss'")
        self.C_: float | None = None  # the linear head's chosen C, once fitted
        # The single-choice linear head's logit scale, chosen with C by a temperature
        # objective (the default among them); None: not scaled.
        self.temperature_: float | None = None
        # The single-choice linear head's class weighting ("auto": not chosen yet).
        self.class_weight_: str | None = config.class_weight
        # c_weighting="pool": the labels' importance weights of the last fit (None: uniform).
        self.importance_: np.ndarray | None = None
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(config.seed)
        if config.kind == "linear":
            self.body = nn.Identity().to(device)
            self.out = nn.Linear(config.input_dim, len(config.labels)).to(device)
        else:
            self.body = nn.Sequential(
                nn.Linear(config.input_dim, config.hidden_dim), nn.ReLU(), nn.Dropout(config.dropout)
            ).to(device)
            self.out = nn.Linear(config.hidden_dim, len(config.labels)).to(device)
        torch.random.set_rng_state(generator_state)

    @property
    def hidden_width(self) -> int:
        """Width of `hidden()`'s output."""
        return self.config.input_dim if self.config.kind == "linear" else self.config.hidden_dim

    def fresh_copy(self):
        """An untrained head with the same settings; a fitted linear head's copy keeps its
        chosen C and class weighting (the out-of-fold pass's fold heads: one search per
        retrain, not per fold)."""
        config = self.config
        if config.kind == "linear" and config.C is None and self.C_ is not None:
            config = replace(config, C=self.C_)
        if config.kind == "linear" and config.class_weight == "auto" and self.class_weight_ != "auto":
            config = replace(config, class_weight=self.class_weight_)
        if config.kind == "linear" and self.temperature_ is not None and "temperature" not in config.extra:
            config = replace(config, extra={**config.extra, "temperature": self.temperature_})
        return type(self)(config, device=self.device)

    @property
    def labels(self) -> list[str]:
        return self.config.labels

    def _fit_weights(self) -> np.ndarray | None:
        """The labels' weights in the fits themselves: the importance weights with
        `c_weighting="pool_fit"`, else None."""
        return self.importance_ if self.config.c_weighting == "pool_fit" else None

    def parameters(self) -> list:
        """The trainable tensors (for an optimiser that also tunes the encoder)."""
        return list(self.body.parameters()) + list(self.out.parameters())

    def _loss_function(self, targets: np.ndarray):
        raise NotImplementedError

    def _as_targets(self, y) -> np.ndarray:
        raise NotImplementedError

    def _activation(self, logits):
        raise NotImplementedError

    def _fit_linear(self, features: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """(weights (n_choices, dim), biases (n_choices,), C) of the linear head."""
        raise NotImplementedError

    def fit(self, features: np.ndarray, y, pool: np.ndarray | None = None) -> _TwoLayerHead:
        """Train on (features, targets); see the subclass for the targets. `pool`: the
        unlabeled tasks' vectors, read only by a linear head with `c_weighting` "pool" or "pool_fit"."""
        import torch

        y = self._as_targets(y)
        if len(y) == 0:
            raise ValueError("cannot train a classifier on zero labeled examples")
        if self.config.kind == "linear":
            self.importance_ = None
            weighting = self.config.c_weighting
            if weighting != "uniform" and (self.config.C is None or weighting == "pool_fit") \
                    and pool is not None and len(pool):
                with one_thread():
                    self.importance_ = pool_importance(np.asarray(features, dtype=np.float64),
                                                       np.asarray(pool, dtype=np.float64), seed=self.config.seed)
            with one_thread():
                weights, biases, self.C_ = self._fit_linear(np.asarray(features, dtype=np.float64), y)
            with torch.no_grad():
                self.out.weight.copy_(torch.as_tensor(weights, dtype=torch.float32))
                self.out.bias.copy_(torch.as_tensor(biases, dtype=torch.float32))
            return self
        x = torch.as_tensor(np.asarray(features, dtype=np.float32), device=self.device)
        t = torch.as_tensor(y, device=self.device)
        loss_fn = self._loss_function(y)
        optimiser = torch.optim.AdamW(
            self.parameters(), lr=self.config.learning_rate, weight_decay=self.config.weight_decay
        )
        torch.manual_seed(self.config.seed)  # dropout masks are reproducible too
        self.body.train()
        with one_thread():
            for _ in range(self.config.epochs):
                optimiser.zero_grad()
                loss = loss_fn(self.out(self.body(x)), t)
                loss.backward()
                optimiser.step()
        self.body.eval()
        return self

    def _forward(self, features: np.ndarray, hidden_only: bool) -> np.ndarray:
        import torch

        outputs = []
        with torch.inference_mode(), one_thread():
            for start in range(0, len(features), 8192):
                x = torch.as_tensor(
                    np.asarray(features[start : start + 8192], dtype=np.float32),
                    device=self.device,
                )
                h = self.body(x)
                outputs.append((h if hidden_only else self._activation(self.out(h))).cpu().numpy())
        if not outputs:
            width = self.hidden_width if hidden_only else len(self.labels)
            return np.zeros((0, width), dtype=np.float32)
        return np.concatenate(outputs)

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Probabilities, shape (n, n_choices)."""
        return self._forward(features, hidden_only=False)

    def hidden(self, features: np.ndarray) -> np.ndarray:
        """Activations of the last hidden layer, shape (n, hidden_width): the MLP's hidden
        layer; for the linear head its input, the encoder's vectors."""
        return self._forward(features, hidden_only=True)

    def tensors(self) -> dict:
        """The weights by name ("body.0.weight", "out.bias", ...), on the CPU."""
        tensors = {f"body.{k}": v for k, v in self.body.state_dict().items()}
        tensors.update({f"out.{k}": v for k, v in self.out.state_dict().items()})
        return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}

    def load_tensors(self, tensors: dict) -> None:
        """Weights from `tensors()`'s names."""
        self.body.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("body.")})
        self.out.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("out.")})
        self.body.eval()

    def config_dict(self) -> dict:
        """The head's settings (and fitted decision state) as plain JSON."""
        data = asdict(self.config)
        if self.C_ is not None:
            data["extra"] = {**data["extra"], "chosen_C": self.C_}
        if self.class_weight_ != self.config.class_weight:  # "auto", and a fit chose one
            data["extra"] = {**data["extra"], "chosen_class_weight": self.class_weight_}
        if self.temperature_ is not None:
            data["extra"] = {**data["extra"], "chosen_temperature": self.temperature_}
        return data

    @classmethod
    def from_config_dict(cls, data: dict, device: str = "cpu"):
        """An untrained head from `config_dict()`'s output (weights: `load_tensors`).
        Settings saved before `kind` existed are the MLP's; before `choice_weight`, weighted;
        before `c_objective`, by log loss."""
        data = {"kind": "mlp", "choice_weight": "balanced", "c_objective": "log_loss", **data}
        head = cls(HeadConfig(**data), device=device)
        head.C_ = head.config.extra.get("chosen_C")
        if "chosen_class_weight" in head.config.extra:
            head.class_weight_ = head.config.extra["chosen_class_weight"]
        head.temperature_ = head.config.extra.get("chosen_temperature")
        return head

    def save(self, directory: str | Path) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        save_file(self.tensors(), str(directory / WEIGHTS_FILE))
        (directory / CONFIG_FILE).write_text(json.dumps(self.config_dict(), indent=2))

    @classmethod
    def load(cls, directory: str | Path, device: str = "cpu"):
        from safetensors.torch import load_file

        directory = Path(directory)
        head = cls.from_config_dict(json.loads((directory / CONFIG_FILE).read_text()), device=device)
        head.load_tensors(load_file(str(directory / WEIGHTS_FILE), device=device))
        return head


class ClassifierHead(_TwoLayerHead):
    """Single-choice: input → Linear → ReLU → (last hidden layer) → Linear → softmax.

    `fit(features, y)`: `y` are label indices; the MLP: class-weighted cross-entropy; the
    linear head: logistic regression, class weighting and C chosen out-of-fold
    (`HeadConfig.class_weight`), recorded in `class_weight_` and `C_`.
    """

    multi_label = False

    def _as_targets(self, y) -> np.ndarray:
        return np.asarray(y, dtype=np.int64)

    def _loss_function(self, targets: np.ndarray):
        import torch
        from torch import nn

        weights = torch.as_tensor(
            class_weights(targets, len(self.labels)), dtype=torch.float32, device=self.device
        )
        return nn.CrossEntropyLoss(weight=weights)

    def _activation(self, logits):
        import torch

        return torch.softmax(logits, -1)

    def _fit_linear(self, features: np.ndarray, targets: np.ndarray):
        n_labels = len(self.labels)
        present = np.unique(targets)
        weights = np.zeros((n_labels, features.shape[1]))
        # A choice never labeled yet: a constant logit far below the others (probability ~0).
        biases = np.full(n_labels, ABSENT_LOGIT)
        smallest = int(np.bincount(targets)[present].min())
        candidates = ["balanced", None] if self.config.class_weight == "auto" else [self.config.class_weight]
        if len(present) == 1 or smallest < 2 or self.config.C is not None:
            candidates = candidates[:1]  # no out-of-fold pass runs: "auto" is balanced
        self.class_weight_ = candidates[0]
        if len(present) == 1:
            biases[present[0]] = 0.0
            return weights, biases, self.config.C or FALLBACK_C
        best = None
        for class_weight in candidates:  # ties go to the first, balanced
            model, chosen, loss, temperature = _logistic_regression(
                features, targets, class_weight, self.config.C, self.config.seed, smallest,
                self.config.c_objective, self.config.extra.get("temperature"), self.importance_,
                self._fit_weights())
            if best is None or loss < best[2] - 1e-12:
                best = (model, chosen, loss, temperature)
                self.class_weight_ = class_weight
        model, chosen, _, self.temperature_ = best
        classes = model.classes_
        if len(classes) == 2:  # one logit z for classes[1]: softmax([-z/2, z/2]) is sigmoid(z)
            weights[classes[0]], weights[classes[1]] = -model.coef_[0] / 2, model.coef_[0] / 2
            biases[classes[0]], biases[classes[1]] = -model.intercept_[0] / 2, model.intercept_[0] / 2
        else:
            weights[classes], biases[classes] = model.coef_, model.intercept_
        return weights, biases, chosen

    def fit(self, features: np.ndarray, y: Sequence[int], pool: np.ndarray | None = None) -> ClassifierHead:
        """Train with classes weighted by inverse frequency. `y` are label indices."""
        return super().fit(features, y, pool=pool)

    def predict(self, probabilities: np.ndarray) -> np.ndarray:
        """The chosen label index per row of `predict_proba`'s output."""
        return np.asarray(probabilities).argmax(axis=1)


ABSENT_LOGIT = -20.0


def _accuracy_then_log_loss(estimator, features, targets) -> float:
    """A fold's accuracy less a thousandth of its mean log loss (clipped at 10, so at most
    0.01): C by accuracy, ties (a fold of 10 labels has 11 possible accuracies) going to the
    better calibrated C; the loss can only outweigh an accuracy gap of under 1 %."""
    from sklearn.metrics import log_loss

    probabilities = estimator.predict_proba(features)
    accuracy = float(np.mean(estimator.classes_[probabilities.argmax(axis=1)] == targets))
    loss = min(float(log_loss(targets, probabilities, labels=estimator.classes_)), 10.0)
    return accuracy - 1e-3 * loss


def _logistic_regression(features: np.ndarray, targets: np.ndarray, class_weight, C: float | None,
                         seed: int, smallest_class: int, objective: str = "log_loss",
                         temperature: float | None = None, score_weights: np.ndarray | None = None,
                         fit_weights: np.ndarray | None = None):
    """(a fitted scikit-learn logistic regression, its C, its out-of-fold score, lower is
    better, the temperature its logits were scaled by or None): `C` if given, else the best
    of the objective's grid by stratified out-of-fold `objective` (C_OBJECTIVES;
    `LogisticRegressionCV`, which refits on every label with it); FALLBACK_C when no
    out-of-fold choice is possible. The score is the mean log loss, or one minus the
    accuracy score of `_accuracy_then_log_loss`. The folds depend only on the targets and
    `seed`, so calls with other class weights score on the same folds; the score is
    unweighted (the labels' own class mix) whatever the weighting, and nan where no
    out-of-fold pass ran. With "accuracy", the chosen model's logits are scaled by
    `temperature`, or when none is given by the one of TEMPERATURES with the lowest log loss
    on out-of-fold probabilities at the chosen C (five more fits). `score_weights` (one per
    label, `pool_importance`): the log-loss objectives' out-of-fold mean is weighted by them
    (`_c_and_temperature_by_log_loss`'s search instead of `LogisticRegressionCV`'s);
    `fit_weights` (the same, `c_weighting="pool_fit"`) weight every fit's labels too."""
    import warnings

    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold

    by_accuracy = objective == "accuracy"
    # Objectives whose chosen model's logits are scaled by a temperature.
    scaled = by_accuracy or objective in JOINT_TEMPERATURES
    counts = np.bincount(targets)
    usable = counts[counts >= 2]
    if scaled and smallest_class < 2 and len(usable) >= 2:
        # A class with one label sits in one fold and is missing from the others' training;
        # the classes with two or more still tell the candidate C apart.
        n_folds = min(C_FOLDS, int(usable.min()))
    else:
        n_folds = min(C_FOLDS, int(smallest_class))
    if fit_weights is not None and class_weight == "balanced":
        # "balanced" over the weighted counts: the classes as the weights see them.
        mass = np.bincount(targets, weights=fit_weights)
        class_weight = {int(c): float(mass.sum() / (np.count_nonzero(mass) * mass[c]))
                        for c in np.flatnonzero(mass)}
    if C is not None or n_folds < 2:
        C = float(C if C is not None else FALLBACK_C)
        model = LogisticRegression(C=C, class_weight=class_weight, max_iter=1000, l1_ratio=0.0)
        model.fit(features, targets, sample_weight=fit_weights)
        if scaled and temperature is not None:
            _scale_logits(model, temperature)
        return model, C, float("nan"), temperature if scaled else None
    folds = StratifiedKFold(n_folds, shuffle=True, random_state=seed)
    if objective in JOINT_TEMPERATURES:
        chosen, temperature, loss = _c_and_temperature_by_log_loss(
            features, targets, class_weight, folds, ACCURACY_C_GRID, score_weights,
            temperatures=JOINT_TEMPERATURES[objective], fit_weights=fit_weights)
        model = LogisticRegression(C=chosen, class_weight=class_weight, max_iter=1000, l1_ratio=0.0)
        model.fit(features, targets, sample_weight=fit_weights)
        _scale_logits(model, temperature)
        return model, chosen, loss, temperature
    if score_weights is not None and not by_accuracy:
        # LogisticRegressionCV scores every held-out label alike; the weighted mean needs the
        # out-of-fold probabilities themselves.
        chosen, _, loss = _c_and_temperature_by_log_loss(
            features, targets, class_weight, folds, C_GRID, score_weights, temperatures=(1.0,),
            fit_weights=fit_weights)
        model = LogisticRegression(C=chosen, class_weight=class_weight, max_iter=1000, l1_ratio=0.0)
        model.fit(features, targets, sample_weight=fit_weights)
        return model, chosen, loss, None
    scoring = _accuracy_then_log_loss if by_accuracy else "neg_log_loss"
    model = LogisticRegressionCV(Cs=list(ACCURACY_C_GRID if by_accuracy else C_GRID), cv=folds,
                                 scoring=scoring, class_weight=class_weight, max_iter=1000,
                                 l1_ratios=(0.0,), use_legacy_attributes=False)
    with warnings.catch_warnings():
        # "The least populated class has only 1 member": the single-label class's case above.
        warnings.filterwarnings("ignore", message=".*least populated class", category=UserWarning)
        model.fit(features, targets)
    chosen = float(np.ravel(model.C_)[0])
    # scores_: (folds, l1 ratios, Cs) of the score, higher is better; the chosen C's mean over
    # the folds, as a loss.
    best = float(np.max(model.scores_.mean(axis=0)))
    if not by_accuracy:
        return model, chosen, -best, None
    if temperature is None:
        temperature = _best_temperature(features, targets, class_weight, chosen, folds)
    _scale_logits(model, temperature)
    return model, chosen, 1.0 - best, temperature


def _c_and_temperature_by_log_loss(features, targets, class_weight, folds, grid, score_weights=None,
                                   temperatures=TEMPERATURES, fit_weights=None, per_label: bool = False) -> tuple:
    """(C, temperature, mean log loss): the pair of `grid` x `temperatures` whose scaled
    out-of-fold probabilities have the lowest mean log loss (`c_objective="scaled_log_loss"`;
    with `temperatures=(1.0,)`, C alone by its plain out-of-fold log loss). The mean is
    weighted by `score_weights` (one per label) where given. With `per_label`, a fourth
    value: each label's out-of-fold log loss at that pair (nan for a label whose class its
    fold never saw), for `bench/weighting_probe.py`.

    scikit-learn's `LogisticRegressionCV` scores each C as it is; here every C is first
    given its best logit scale, so a strong penalty (whose probabilities are underconfident
    but whose decisions may be the better ones) competes on calibrated terms. Each fold fits
    the grid in order, warm-started. A task whose class its fold never saw (a class with one
    label) is left out of the loss: its column is 0 there, a log loss that no C can change
    and that would only pull every temperature down."""
    import warnings

    from scipy.special import logsumexp
    from sklearn.linear_model import LogisticRegression

    classes = np.unique(targets)
    truth = np.searchsorted(classes, targets)
    log_p = np.zeros((len(grid), len(targets), len(classes)))
    scored = np.ones(len(targets), dtype=bool)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*least populated class", category=UserWarning)
        for train, test in folds.split(features, targets):
            seen = np.unique(targets[train])
            columns = np.searchsorted(classes, seen)
            scored[test[~np.isin(targets[test], seen)]] = False
            model = LogisticRegression(C=grid[0], class_weight=class_weight, max_iter=1000, l1_ratio=0.0,
                                       warm_start=True)
            for i, C in enumerate(grid):
                model.set_params(C=C)
                model.fit(features[train], targets[train],
                          sample_weight=None if fit_weights is None else fit_weights[train])
                full = np.zeros((len(test), len(classes)))
                full[:, columns] = model.predict_proba(features[test])
                log_p[i, test] = np.log(np.clip(full, 1e-12, 1.0))
    rows = np.flatnonzero(scored)
    weights = np.ones(len(rows)) if score_weights is None else np.asarray(score_weights, dtype=np.float64)[rows]
    best = (float("inf"), 0, 1.0)

    def losses(i: int, t: float) -> np.ndarray:
        lp = log_p[i, rows]
        return logsumexp(t * lp, axis=1) - t * lp[np.arange(len(rows)), truth[rows]]

    for i in range(len(grid)):  # ties go to the first: the stronger penalty
        for t in temperatures:
            loss = float(np.average(losses(i, t), weights=weights))
            if loss < best[0] - 1e-12:
                best = (loss, i, float(t))
    chosen = (float(grid[best[1]]), best[2], best[0])
    if not per_label:
        return chosen
    each = np.full(len(targets), np.nan)
    each[rows] = losses(best[1], best[2])
    return (*chosen, each)


def pool_importance(labeled: np.ndarray, pool: np.ndarray, seed: int = 0) -> np.ndarray:
    """Per labeled row, an estimate of how much more often its like occurs among the
    unlabeled tasks than among the labels (the density ratio p_pool(x) / p_labeled(x)),
    normalised to mean 1: importance-weighted cross-validation's weights (Sugiyama,
    Krauledat and Mueller 2007) for `c_weighting="pool"`.

    By probabilistic classification: a logistic regression (IMPORTANCE_C, classes balanced,
    so its odds are the density ratio) tells the labels from at most IMPORTANCE_POOL_SAMPLE
    unlabeled tasks. Each label's odds come from a fit that did not see it
    (IMPORTANCE_FOLDS folds over the labels; every fit sees the whole pool sample), or a
    label would always look labeled. Clipped to IMPORTANCE_CLIP, so that no single label
    decides the score and none counts for nothing. Uniform (all 1) with fewer labels or
    unlabeled tasks than folds. scikit-learn has no density-ratio estimator, hence this."""
    from sklearn.linear_model import LogisticRegression

    n = len(labeled)
    rng = np.random.default_rng(seed)
    if len(pool) > IMPORTANCE_POOL_SAMPLE:
        pool = pool[np.sort(rng.choice(len(pool), IMPORTANCE_POOL_SAMPLE, replace=False))]
    if n < IMPORTANCE_FOLDS or len(pool) < IMPORTANCE_FOLDS:
        return np.ones(n)
    odds = np.empty(n)
    for held in np.array_split(rng.permutation(n), IMPORTANCE_FOLDS):
        kept = np.setdiff1d(np.arange(n), held)
        x = np.vstack([labeled[kept], pool])
        is_pool = np.r_[np.zeros(len(kept)), np.ones(len(pool))]
        model = LogisticRegression(C=IMPORTANCE_C, class_weight="balanced", max_iter=1000).fit(x, is_pool)
        odds[held] = np.exp(np.clip(model.decision_function(labeled[held]), -50, 50))
    weights = np.clip(odds, *IMPORTANCE_CLIP)
    return weights / weights.mean()


def _best_temperature(features, targets, class_weight, C: float, folds) -> float:
    """The one of TEMPERATURES whose scaled out-of-fold probabilities (a logistic regression
    with `C` per fold) have the lowest mean log loss. Scaling a softmax's logits by t is
    raising its probabilities to the power t and renormalising, so the out-of-fold
    probabilities are all it needs."""
    import warnings

    from scipy.special import logsumexp
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*least populated class", category=UserWarning)
        # ...and a fold trained without it (its column is 0 there: that is the evidence).
        warnings.filterwarnings("ignore", message="Number of classes in training fold", category=RuntimeWarning)
        probabilities = cross_val_predict(
            LogisticRegression(C=C, class_weight=class_weight, max_iter=1000, l1_ratio=0.0),
            features, targets, cv=folds, method="predict_proba")
    classes = np.unique(targets)
    truth = np.searchsorted(classes, targets)
    log_p = np.log(np.clip(probabilities, 1e-12, 1.0))
    right = log_p[np.arange(len(truth)), truth]
    losses = [float(np.mean(logsumexp(t * log_p, axis=1) - t * right)) for t in TEMPERATURES]
    return TEMPERATURES[int(np.argmin(losses))]


def _scale_logits(model, temperature: float) -> None:
    """Multiply a fitted logistic regression's logits by `temperature` (argmax unchanged)."""
    model.coef_ = model.coef_ * temperature
    model.intercept_ = model.intercept_ * temperature


def positive_weights(targets: np.ndarray) -> np.ndarray:
    """Per choice, negatives / positives (1 where a choice has no positive or no negative),
    clipped to [0.1, 10]: each choice's rare side counts as much as its common side without
    a handful of positives taking over the loss."""
    targets = np.asarray(targets, dtype=np.float64)
    positives = targets.sum(axis=0)
    negatives = len(targets) - positives
    weights = np.ones(targets.shape[1])
    both = (positives > 0) & (negatives > 0)
    weights[both] = negatives[both] / positives[both]
    return np.clip(weights, 0.1, 10.0)


THRESHOLD_OBJECTIVES = ("accuracy", "f1")


def choose_thresholds(probabilities: np.ndarray, targets: np.ndarray, min_positives: int = 3,
                      default: float = 0.5, objective: str = "accuracy") -> np.ndarray:
    """Per choice, the decision threshold with the best `objective` on (out-of-fold) probabilities.

    `objective`: "accuracy", the share of tasks whose yes/no on that choice is right (the
    choices an annotator does not have to change), or "f1", that choice's F1. Candidates
    are 0.05, 0.10, ..., 0.95; a tie goes to the candidate closest to `default`. A choice
    with fewer than `min_positives` positives or negatives keeps `default`: a threshold
    fitted to two examples is noise.
    """
    if objective not in THRESHOLD_OBJECTIVES:
        raise ValueError(f"unknown threshold objective {objective!r}; choose one of {THRESHOLD_OBJECTIVES}")
    probabilities = np.asarray(probabilities, dtype=np.float64)
    targets = np.asarray(targets).astype(bool)
    candidates = np.round(np.arange(0.05, 0.951, 0.05), 2)
    thresholds = np.full(targets.shape[1], float(default))
    for j in range(targets.shape[1]):
        truth = targets[:, j]
        if truth.sum() < min_positives or (~truth).sum() < min_positives:
            continue
        predicted = probabilities[:, j][:, None] >= candidates[None, :]  # (n, candidates)
        if objective == "accuracy":
            score = (predicted == truth[:, None]).mean(axis=0)
        else:
            true_positive = (predicted & truth[:, None]).sum(axis=0)
            score = 2 * true_positive / np.maximum(predicted.sum(axis=0) + truth.sum(), 1)
        best = np.flatnonzero(score >= score.max() - 1e-12)
        thresholds[j] = float(candidates[best[np.argmin(np.abs(candidates[best] - default))]])
    return thresholds


class MultiLabelHead(_TwoLayerHead):
    """Multi-label: input → Linear → ReLU → (last hidden layer) → Linear → one sigmoid per choice.

    `fit(features, y)`: `y` is a 0/1 matrix (n, n_choices); the MLP: binary cross-entropy
    with each choice's positives weighted by `positive_weights`; the linear head: one
    logistic regression per choice, weighted or not as `choice_weight` says. `thresholds_` (one per choice, 0.5
    until `choose_thresholds` sets them from out-of-fold probabilities) decide the choices
    a prediction selects.
    """

    multi_label = True

    def __init__(self, config: HeadConfig, device: str = "cpu"):
        super().__init__(config, device=device)
        self.thresholds_ = np.full(len(config.labels), 0.5)
        self.choice_C_: list[float] | None = None  # the linear head's C per choice, once fitted
        # Per choice, its logit scale (the objectives with a temperature: the default
        # "sharpened_log_loss", "scaled_log_loss", "accuracy"); None: not scaled.
        self.choice_temperature_: list[float | None] | None = None
        self.choice_weight_: list[str | None] | None = None  # choice_weight="auto" only, once fitted

    def _as_targets(self, y) -> np.ndarray:
        y = np.asarray(y, dtype=np.float32)
        if y.ndim != 2 or y.shape[1] != len(self.labels):
            raise ValueError(f"multi-label targets must be a (n, {len(self.labels)}) 0/1 matrix, "
                             f"got shape {y.shape}")
        return y

    def _fit_linear(self, features: np.ndarray, targets: np.ndarray):
        # One binary logistic regression per choice, unweighted or its positives weighted as
        # in the MLP's loss (`HeadConfig.choice_weight`).
        n_labels = len(self.labels)
        weights = np.zeros((n_labels, features.shape[1]))
        biases = np.zeros(n_labels)
        # Each choice has its own C: given (a fold copy's, `fresh_copy`) or chosen here.
        given = self.config.extra.get("choice_C") or [self.config.C] * n_labels
        # With a temperature objective, each choice's logit scale is chosen with its C (a fold
        # copy gets them given, as its C); otherwise 1.
        temperatures = self.config.extra.get("choice_temperature") or [None] * n_labels
        # With choice_weight="auto", each choice's weighting is chosen with its C (a fold copy
        # gets them given); "auto" in the list: not chosen yet.
        given_weights = self.config.extra.get("choice_weights") or ["auto"] * n_labels
        weighting: list[str | None] = [self.config.choice_weight] * n_labels
        chosen = []
        scales = list(temperatures)
        for j, weight in enumerate(positive_weights(targets)):
            truth = targets[:, j].astype(np.int64)
            positives = int(truth.sum())
            if positives in (0, len(truth)):  # never (or always) chosen so far: a constant
                biases[j] = ABSENT_LOGIT / 4 if positives == 0 else -ABSENT_LOGIT / 4
                chosen.append(given[j] or FALLBACK_C)
                continue
            rarer = min(positives, len(truth) - positives)
            balanced = {0: 1.0, 1: float(weight)}
            rule = given_weights[j] if given_weights[j] != "auto" else self.config.choice_weight
            if rule == "auto" and (rarer < 2 or given[j] is not None):
                rule = "balanced"  # no out-of-fold pass runs for this choice
            candidates = ["balanced", None] if rule == "auto" else [rule]
            best = None
            for candidate in candidates:  # ties go to the first, balanced
                fitted = _logistic_regression(features, truth, balanced if candidate == "balanced" else None,
                                              given[j], self.config.seed, rarer, self.config.c_objective,
                                              temperatures[j], self.importance_, self._fit_weights())
                if best is None or fitted[2] < best[1][2] - 1e-12:
                    best = (candidate, fitted)
            weighting[j], (model, C, _, scale) = best
            weights[j], biases[j] = model.coef_[0], model.intercept_[0]
            chosen.append(C)
            scales[j] = scale
        self.choice_C_ = chosen
        self.choice_temperature_ = scales if any(t is not None for t in scales) else None
        self.choice_weight_ = weighting if self.config.choice_weight == "auto" else None
        return weights, biases, float(np.median(chosen))

    def fresh_copy(self):
        if self.config.kind != "linear" or self.choice_C_ is None or self.config.extra.get("choice_C"):
            return super().fresh_copy()
        extra = {**self.config.extra, "choice_C": self.choice_C_}
        if self.choice_temperature_ is not None:
            extra["choice_temperature"] = self.choice_temperature_
        if self.choice_weight_ is not None:
            extra["choice_weights"] = self.choice_weight_
        return type(self)(replace(self.config, extra=extra), device=self.device)

    def _loss_function(self, targets: np.ndarray):
        import torch
        from torch import nn

        weights = torch.as_tensor(positive_weights(targets), dtype=torch.float32, device=self.device)
        return nn.BCEWithLogitsLoss(pos_weight=weights)

    def _activation(self, logits):
        import torch

        return torch.sigmoid(logits)

    def predict(self, probabilities: np.ndarray) -> np.ndarray:
        """Chosen choices per row (bool, (n, n_choices)): every choice at or above its
        threshold, and at least the most likely one (a Choices answer is never empty)."""
        probabilities = np.asarray(probabilities, dtype=np.float64)
        chosen = probabilities >= self.thresholds_[None, :]
        if len(probabilities):
            chosen[np.arange(len(chosen)), probabilities.argmax(axis=1)] = True
        return chosen

    def config_dict(self) -> dict:
        # Adds to the base's extra (its chosen C) instead of replacing it.
        data = super().config_dict()
        extra = {**data["extra"], "thresholds": self.thresholds_.tolist()}
        if self.choice_C_ is not None:
            extra["chosen_choice_C"] = list(self.choice_C_)
        if self.choice_temperature_ is not None:
            extra["chosen_choice_temperature"] = list(self.choice_temperature_)
        if self.choice_weight_ is not None:
            extra["chosen_choice_weights"] = list(self.choice_weight_)
        return {**data, "extra": extra}

    @classmethod
    def from_config_dict(cls, data: dict, device: str = "cpu") -> MultiLabelHead:
        head = super().from_config_dict(data, device=device)
        thresholds = head.config.extra.get("thresholds")
        if thresholds is not None:
            head.thresholds_ = np.asarray(thresholds, dtype=np.float64)
        head.choice_C_ = head.config.extra.get("chosen_choice_C")
        head.choice_temperature_ = head.config.extra.get("chosen_choice_temperature")
        head.choice_weight_ = head.config.extra.get("chosen_choice_weights")
        return head
