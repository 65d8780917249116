"""One interface for every ordering of the labeling queue.

An ordering looks at the cached features of labeled and unlabeled tasks, the human labels
and the current classifier, and returns a score per unlabeled task, **lower = label
sooner** (Label Studio serves ascending prediction scores first). Sequential orderings
(ATLAS) also return the ordered batch they built; the others return the batch they would
serve first, after the class guard (`model.orderings.class_balance`).

**Several controls.** A project may have several classification controls, each with its own
head (`model.heads.ControlHeads`), single-choice or multi-label. An ordering sees them as
*decisions*: a single-choice head is one decision over its choices; a multi-label head is
one yes/no decision per choice, its probability rescaled so that the choice's threshold
sits at 0.5 (`decision_probabilities`). Uncertainty-based scores combine by the least
certain decision: a task's score is the **lowest** per-decision score, i.e. its uncertainty
is the largest per-decision uncertainty, each normalised to [0, 1] on its own (by its number
of classes), so a ten-choice head and a yes/no head are compared on one scale. With one
single-choice control every score is exactly the single-head one. The class guard balances
the batch over the predictions of the first control.

The maths works on plain numpy arrays so each ordering can be unit-tested with a few
arrays, the way modAL and small-text keep their strategies free of framework objects.

Parameters: every ordering declares its own in `defaults` (name -> default value), plus the
ones shared by all orderings in `COMMON_DEFAULTS`. They can be given to the constructor
(`get_ordering("atlas", rounds=5)`) or per call in `OrderingInput.params` (a project's
*extra params* in Label Studio); per-call values win. An unknown name given to the
constructor is an error that lists the known ones. Values are checked by type and range
when they are read (`rules`): a bad value, or an unknown name in the call's params, is
ignored with a warning in the result's `info["param_warnings"]` and the default is used, so
one typo in a project's extra params cannot fail every retrain.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from model.threads import on_one_thread


# -- parameter rules: each takes a value and returns it (normalised) or raises ValueError ------
def flag() -> Callable:
    def check(value):
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError("must be true or false")
    return check


def integer(low: float, high: float) -> Callable:
    def check(value):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be a whole number in [{low}, {high}]")
        if not low <= value <= high:
            raise ValueError(f"must be in [{low}, {high}]")
        return value
    return check


def number(low: float, high: float) -> Callable:
    def check(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"must be a number in [{low}, {high}]")
        if not low <= value <= high:
            raise ValueError(f"must be in [{low}, {high}]")
        return float(value)
    return check


def numbers(low: float, high: float) -> Callable:
    one = number(low, high)

    def check(value):
        if not isinstance(value, list) or not value:
            raise ValueError(f"must be a non-empty list of numbers in [{low}, {high}]")
        return [one(v) for v in value]
    return check


def one_of(*options) -> Callable:
    def check(value):
        if isinstance(value, str) and value in options:
            return value
        raise ValueError(f"must be one of {', '.join(map(repr, options))}")
    return check


def either(first: Callable, second: Callable) -> Callable:
    def check(value):
        try:
            return first(value)
        except ValueError as exc:
            try:
                return second(value)
            except ValueError as other:
                raise ValueError(f"{exc}, or {other}") from None
    return check

# Parameters every ordering understands (the class guard of issue 5, point 7).
COMMON_DEFAULTS: dict = {
    # Keep each batch from collapsing onto one predicted class when the pool has several.
    "class_guard": True,
    # Share of the batch reserved, split evenly, for the classes the classifier predicts in
    # the pool (each gets at least one place). 0.3 with two classes and batches of 50: at
    # least 7 tasks of each predicted class.
    "min_class_fraction": 0.3,
}
COMMON_RULES: dict = {"class_guard": flag(), "min_class_fraction": number(0.0, 1.0)}


@dataclass
class HeadView:
    """One control's head as an ordering sees it on a set of tasks."""

    multi_label: bool
    probabilities: np.ndarray  # (n, n_choices): softmax rows, or one sigmoid per choice
    thresholds: np.ndarray | None = None  # multi-label: per-choice decision thresholds

    def with_probabilities(self, probabilities: np.ndarray) -> HeadView:
        return HeadView(self.multi_label, np.asarray(probabilities, dtype=np.float64), self.thresholds)

    def predicted_class(self) -> np.ndarray:
        """The class per task (multi-label: the most likely choice)."""
        p = self.probabilities
        return p.argmax(axis=1) if len(p) else np.zeros(0, dtype=int)


def threshold_centred(p: np.ndarray, threshold: np.ndarray) -> np.ndarray:
    """Rescale sigmoid outputs piecewise linearly so that `threshold` maps to 0.5 (0 and 1
    stay): a yes/no decision is most uncertain where it flips."""
    p = np.asarray(p, dtype=np.float64)
    t = np.clip(np.asarray(threshold, dtype=np.float64), 1e-6, 1 - 1e-6)
    return np.where(p < t, p / (2 * t), 0.5 + (p - t) / (2 * (1 - t)))


def decision_probabilities(views: list[HeadView]) -> list[np.ndarray]:
    """Every decision of every head as a probability matrix: a single-choice head as it is,
    each choice of a multi-label head as a (n, 2) [no, yes] matrix, threshold-centred."""
    decisions = []
    for view in views:
        p = np.asarray(view.probabilities, dtype=np.float64)
        if not view.multi_label:
            decisions.append(p)
            continue
        thresholds = view.thresholds if view.thresholds is not None else np.full(p.shape[1], 0.5)
        q = threshold_centred(p, thresholds[None, :])
        decisions.extend(np.column_stack([1.0 - q[:, j], q[:, j]]) for j in range(p.shape[1]))
    return decisions


def combined_score(score: Callable[[np.ndarray], np.ndarray], views: list[HeadView]) -> np.ndarray:
    """A confidence-like score in [0, 1] over several heads: the lowest per-decision score
    (the largest per-decision uncertainty). One decision: `score` of it, unchanged."""
    decisions = decision_probabilities(views)
    if len(decisions) == 1:
        return score(decisions[0])
    return np.min([score(d) for d in decisions], axis=0)


# How a confidence ordering combines several decisions (several controls, or the yes/no
# choices of a multi-label control) into one score per task: "least_certain", its least
# certain decision (`combined_score`), or "joint", the task's whole answer taken as one
# decision (`joint_score`).
DECISION_RULES = ("least_certain", "joint")


def joint_score(joint: Callable[[list[np.ndarray]], np.ndarray], score: Callable[[np.ndarray], np.ndarray],
                views: list[HeadView]) -> np.ndarray:
    """`joint` over every decision of every head; one decision: `score` of it, unchanged."""
    decisions = decision_probabilities(views)
    if len(decisions) == 1:
        return score(decisions[0])
    return joint(decisions)


def top_two_log(decisions: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per decision, the log of its most probable class's probability and the ratio of its
    second's to its first's: (n_decisions, n) each. The probability of the most probable
    whole answer, decisions taken as independent, is exp of the first's column sums; the
    second most probable answer changes only the decision with the largest ratio."""
    log_top, ratio = [], []
    for p in decisions:
        p = np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)
        ordered = np.sort(p, axis=1)
        first = np.maximum(ordered[:, -1], 1e-300)
        second = ordered[:, -2] if p.shape[1] > 1 else np.zeros(len(p))
        log_top.append(np.log(first))
        ratio.append(second / first)
    return np.array(log_top), np.array(ratio)


@dataclass
class OrderingInput:
    features_labeled: np.ndarray  # (n_labeled, dim) encoder vectors
    labels: np.ndarray  # (n_labeled,) label indices
    features_unlabeled: np.ndarray  # (n_unlabeled, dim)
    classifier: object  # model.classifier.ClassifierHead trained on the labeled tasks
    # Pooled hidden states of every encoder layer, embedding layer included, (n, layers, dim);
    # only orderings that need them (domain-likeness) require these.
    all_layers_labeled: np.ndarray | None = None
    all_layers_unlabeled: np.ndarray | None = None
    batch_size: int = 50
    seed: int = 0
    params: dict = field(default_factory=dict)
    # Optional: the classifier's probabilities on the unlabeled tasks, if the caller already
    # computed them (saves one forward pass per ordering in the simulator).
    probabilities_unlabeled: np.ndarray | None = None
    # Several controls (model.heads.ControlHeads), instead of `classifier` and `labels`:
    # per control, its input features on the labeled and unlabeled tasks, its targets on the
    # labeled tasks (model.heads.encode_targets) and, optionally, its pool probabilities.
    # `features_labeled`/`features_unlabeled` stay the task's input (every text object),
    # what domain-likeness and the clusters look at.
    heads: object | None = None
    head_features_labeled: list | None = None
    head_features_unlabeled: list | None = None
    targets: list | None = None
    head_probabilities_unlabeled: list | None = None
    # The retrain's one out-of-fold pass over the labeled tasks (model.heads.OutOfFold);
    # computed on demand when absent.
    out_of_fold: object | None = None

    # -- one view for one or several controls ---------------------------------------------
    def control_heads(self):
        """The heads as model.heads.ControlHeads (one control around `classifier` if none)."""
        from model.heads import ControlHeads

        return self.heads if self.heads is not None else ControlHeads.single(self.classifier)

    def control_targets(self) -> list[np.ndarray]:
        return list(self.targets) if self.targets is not None else [np.asarray(self.labels, dtype=np.int64)]

    def control_features_labeled(self) -> list[np.ndarray]:
        if self.head_features_labeled is not None:
            return list(self.head_features_labeled)
        return [np.asarray(self.features_labeled, dtype=np.float32)]

    def control_features_unlabeled(self) -> list[np.ndarray]:
        if self.head_features_unlabeled is not None:
            return list(self.head_features_unlabeled)
        return [np.asarray(self.features_unlabeled, dtype=np.float32)]

    def pool_heads(self) -> list[HeadView]:
        """Each head's probabilities on the unlabeled tasks."""
        if self.heads is None:
            return [HeadView(False, Ordering.probabilities(self))]
        probabilities = self.head_probabilities_unlabeled
        if probabilities is None:
            probabilities = self.heads.predict_proba(self.control_features_unlabeled())
        return [HeadView(bool(getattr(head, "multi_label", False)), np.asarray(p, dtype=np.float64),
                         getattr(head, "thresholds_", None))
                for head, p in zip(self.heads.heads, probabilities)]

    def out_of_fold_pass(self, folds: int):
        """The given out-of-fold pass, or one computed now with `folds` folds."""
        if self.out_of_fold is not None:
            return self.out_of_fold
        return self.control_heads().out_of_fold(
            self.control_features_labeled(), self.control_targets(), folds=folds, seed=self.seed)

    @classmethod
    def from_all_layers(cls, labeled_layers: np.ndarray, labels: np.ndarray,
                        unlabeled_layers: np.ndarray, classifier, **kwargs) -> OrderingInput:
        """Input from all-layer vectors (n, layers, dim): the features are the last layer."""
        return cls(features_labeled=labeled_layers[:, -1], labels=labels,
                   features_unlabeled=unlabeled_layers[:, -1], classifier=classifier,
                   all_layers_labeled=labeled_layers, all_layers_unlabeled=unlabeled_layers,
                   **kwargs)


@dataclass
class OrderingResult:
    scores: np.ndarray  # (n_unlabeled,) lower = label sooner
    batch: np.ndarray | None = None  # ordered indices into the unlabeled set, if sequential
    info: dict = field(default_factory=dict)  # goes into the model version's metadata

    def top(self, n: int) -> np.ndarray:
        """The first n unlabeled indices Label Studio would serve."""
        if self.batch is not None and len(self.batch) >= n:
            return np.asarray(self.batch[:n])
        return np.argsort(self.scores, kind="stable")[:n]


class Ordering(ABC):
    """Base class: subclasses set `name` (and `defaults`) and implement `score`."""

    name: str = ""
    needs_all_layers: bool = False
    defaults: dict = {}
    rules: dict = {}  # parameter name -> rule (flag(), integer(lo, hi), ...), for every default

    def __init__(self, **params):
        self._check(params)
        self.params = dict(params)

    def __init_subclass__(cls, **kwargs):
        # Every ordering's `score` runs on one thread (model/threads.py): its logistic heads,
        # matrix products and k-means are small, and under load the BLAS/OpenMP pools'
        # threads made them 10-80 times slower.
        super().__init_subclass__(**kwargs)
        if "score" in cls.__dict__ and not getattr(cls.__dict__["score"], "__isabstractmethod__", False):
            cls.score = on_one_thread(cls.__dict__["score"])

    @classmethod
    def known_params(cls) -> dict:
        return {**COMMON_DEFAULTS, **cls.defaults}

    @classmethod
    def _check(cls, params: dict) -> None:
        unknown = sorted(set(params) - set(cls.known_params()))
        if unknown:
            raise ValueError(
                f"ordering {cls.name!r} has no parameter {', '.join(map(repr, unknown))}; "
                f"known parameters: {', '.join(sorted(cls.known_params()))}"
            )

    @classmethod
    def param_rules(cls) -> dict:
        return {**COMMON_RULES, **cls.rules}

    def resolve(self, data: OrderingInput) -> tuple[dict, list[str]]:
        """(settings, warnings) for this call: see `checked`."""
        return self.checked(data.params)

    def checked(self, params: dict | None) -> tuple[dict, list[str]]:
        """(settings, warnings): defaults, overridden by constructor params, overridden by
        `params`, each value checked by its rule; a bad value or an unknown name is skipped
        with a warning and the value it would have replaced stays."""
        settings = dict(self.known_params())
        rules = self.param_rules()
        warnings: list[str] = []
        for given in (self.params, params or {}):
            for name, value in given.items():
                if name not in settings:
                    warnings.append(f"ordering {self.name!r} has no parameter {name!r}, ignored; "
                                    f"known parameters: {', '.join(sorted(settings))}")
                    continue
                try:
                    settings[name] = rules[name](value)
                except ValueError as exc:
                    warnings.append(f"{self.name} parameter {name}={repr(value)[:60]} ignored: it {exc}; "
                                    f"using {settings[name]!r}")
        return settings, warnings

    def settings(self, data: OrderingInput) -> dict:
        """The checked settings for this call (see `resolve`)."""
        return self.resolve(data)[0]

    @staticmethod
    def probabilities(data: OrderingInput) -> np.ndarray:
        """The (first) classifier's class probabilities on the unlabeled tasks."""
        if data.heads is not None:
            return data.pool_heads()[0].probabilities
        if data.probabilities_unlabeled is not None:
            return np.asarray(data.probabilities_unlabeled, dtype=np.float64)
        return np.asarray(data.classifier.predict_proba(data.features_unlabeled), dtype=np.float64)

    def finish(
        self,
        data: OrderingInput,
        scores: np.ndarray,
        views: list[HeadView] | np.ndarray,
        info: dict | None = None,
        batch: np.ndarray | None = None,
    ) -> OrderingResult:
        """Apply the class guard to the batch and return scores that serve that batch first.

        `views`: the heads on the pool (`data.pool_heads()`), or one probability matrix; the
        guard balances over the first one's predicted classes."""
        from model.orderings.class_balance import guard_batch

        settings, warnings = self.resolve(data)
        scores = np.asarray(scores, dtype=np.float64)
        info = {"ordering": self.name, **(info or {})}
        if warnings:
            info["param_warnings"] = warnings
        first = views[0] if isinstance(views, list) else HeadView(False, np.asarray(views))
        predicted = first.predicted_class()
        scores, batch, guard_info = guard_batch(
            scores,
            predicted,
            data.batch_size,
            batch=batch,
            enabled=bool(settings["class_guard"]),
            min_class_fraction=float(settings["min_class_fraction"]),
        )
        info.update(guard_info)
        return OrderingResult(scores=scores, batch=batch, info=info)

    @abstractmethod
    def score(self, data: OrderingInput) -> OrderingResult:
        ...


class ConfidenceOrdering(Ordering):
    """An uncertainty baseline: a confidence-like score per decision (`confidence`, in [0, 1],
    lower = less certain), combined over the heads by the `decisions` parameter
    (DECISION_RULES): `combined_score`, or `joint_score` with `joint_confidence`, the same
    measure of the task's whole answer (every decision taken as independent)."""

    @staticmethod
    def confidence(probabilities: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @staticmethod
    def joint_confidence(decisions: list[np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    # `diverse_batch` unless a project's params say otherwise: on for margin, the default
    # ordering (BENCHMARKS.md, "A diverse batch"); off for least confidence and entropy, the
    # plain baselines the Active Transfer Learning orderings are measured against.
    diverse_by_default = False

    @classmethod
    def known_params(cls) -> dict:
        # `diverse_batch`: the batch is spread over the task vectors instead of being the
        # `batch_size` least certain tasks (`diverse_batch`, below); `diversity_candidates`:
        # how many times the batch size of the least certain tasks it is chosen from.
        return {**super().known_params(), "decisions": "least_certain", "diverse_batch": cls.diverse_by_default,
                "diversity_candidates": 10}

    @classmethod
    def param_rules(cls) -> dict:
        return {**super().param_rules(), "decisions": one_of(*DECISION_RULES), "diverse_batch": flag(),
                "diversity_candidates": integer(1, 50)}

    def score(self, data: OrderingInput) -> OrderingResult:
        views = data.pool_heads()
        settings = self.settings(data)
        if settings["decisions"] == "joint":
            scores = joint_score(type(self).joint_confidence, type(self).confidence, views)
        else:
            scores = combined_score(type(self).confidence, views)
        if not settings["diverse_batch"]:
            return self.finish(data, scores, views)
        batch, info = diverse_batch(scores, data.features_unlabeled, data.batch_size,
                                    settings["diversity_candidates"], data.seed)
        return self.finish(data, scores, views, info=info, batch=batch)


def lowest_per_cluster(clusters: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """From each cluster (a label per task) the task with the lowest score, ties to the
    lower index; the picks in score order. What a one-per-cluster batch serves."""
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(scores, kind="stable")
    _, first = np.unique(np.asarray(clusters)[order], return_index=True)
    picked = order[first]
    return picked[np.argsort(scores[picked], kind="stable")]


def diverse_batch(scores: np.ndarray, features: np.ndarray, batch_size: int, candidates: int,
                  seed: int = 0) -> tuple[np.ndarray | None, dict]:
    """(the batch, info): the `candidates` x `batch_size` lowest scores (least certain
    tasks), clustered into `batch_size` groups by k-means on their vectors, each group's
    least certain task, in score order. Diverse mini-batch active learning (Zhdanov 2019):
    the least certain tasks of a round are often near-duplicates of one another, and a
    batch of 50 of them teaches the head about as much as a few; one per cluster spreads the
    labels over the uncertain region. k-means is weighted by uncertainty (1 - score), so the
    centres sit where the head is least sure. (None, ...) when the pool is no larger than
    the batch, or when the picks are the least certain tasks anyway: the scores serve that
    batch as they are."""
    import warnings

    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    scores = np.asarray(scores, dtype=np.float64)
    size = min(batch_size, len(scores))
    pool = min(len(scores), max(size, candidates * size))
    if size < 2 or pool <= size:
        return None, {"diverse_batch": False}
    order = np.argsort(scores, kind="stable")[:pool]
    x = np.asarray(features, dtype=np.float64)[order]
    weights = np.clip(1.0 - scores[order], 1e-6, None)
    with warnings.catch_warnings():
        # Fewer distinct vectors than clusters (duplicate tasks): the fill below covers it.
        warnings.filterwarnings("ignore", message="Number of distinct clusters", category=ConvergenceWarning)
        clusters = KMeans(n_clusters=size, n_init=1, random_state=seed, max_iter=100).fit(
            x, sample_weight=weights).labels_
    # Positions in `order`, which is by score: sorted, they are the batch in score order.
    picked = np.sort(lowest_per_cluster(clusters, scores[order]))
    if len(picked) < size:  # k-means left a cluster empty: the next least certain fill it
        picked = np.sort(np.concatenate([picked, np.setdiff1d(np.arange(pool), picked)[: size - len(picked)]]))
    outside = int(np.count_nonzero(picked >= size))
    info = {"diverse_batch": True, "diversity_candidates": int(pool), "diverse_batch_outside_top": outside}
    return (order[picked] if outside else None), info


def jsonable(value):
    """Ordering info as plain JSON (model metadata, simulator results): numpy scalars become
    numbers, small arrays lists, large arrays a short description."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist()) if value.size <= 64 else f"<array {value.shape}>"
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
