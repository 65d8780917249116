"""One interface for every ordering of the labeling queue.

An ordering looks at the cached features of labeled and unlabeled tasks, the human labels
and the current classifier, and returns a score per unlabeled task, **lower = label
sooner** (Label Studio serves ascending prediction scores first). Sequential orderings
(ATLAS) also return the ordered batch they built; the others return the batch they would
serve first, after the class guard (`model.orderings.class_balance`).

The maths works on plain numpy arrays so each ordering can be unit-tested with a few
arrays, the way modAL and small-text keep their strategies free of framework objects.

Parameters: every ordering declares its own in `defaults` (name -> default value), plus the
ones shared by all orderings in `COMMON_DEFAULTS`. They can be given to the constructor
(`get_ordering("atlas", rounds=5)`) or per call in `OrderingInput.params` (a project's
*extra params* in Label Studio); per-call values win. An unknown name is an error that lists
the known ones.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

# Parameters every ordering understands (the class guard of issue 5, point 7).
COMMON_DEFAULTS: dict = {
    # Keep each batch from collapsing onto one predicted class when the pool has several.
    "class_guard": True,
    # Share of the batch reserved, split evenly, for the classes the classifier predicts in
    # the pool (each gets at least one place). 0.3 with two classes and batches of 50: at
    # least 7 tasks of each predicted class.
    "min_class_fraction": 0.3,
}


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

    @classmethod
    def from_all_layers(cls, labeled_layers: np.ndarray, labels: np.ndarray,
                        unlabeled_layers: np.ndarray, classifier, **kwargs) -> "OrderingInput":
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

    def __init__(self, **params):
        self._check(params)
        self.params = dict(params)

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

    def settings(self, data: OrderingInput) -> dict:
        """Defaults, overridden by constructor params, overridden by the call's params."""
        self._check(data.params)
        return {**self.known_params(), **self.params, **data.params}

    @staticmethod
    def probabilities(data: OrderingInput) -> np.ndarray:
        """The classifier's class probabilities on the unlabeled tasks."""
        if data.probabilities_unlabeled is not None:
            return np.asarray(data.probabilities_unlabeled, dtype=np.float64)
        return np.asarray(data.classifier.predict_proba(data.features_unlabeled), dtype=np.float64)

    def finish(
        self,
        data: OrderingInput,
        scores: np.ndarray,
        probabilities: np.ndarray,
        info: dict | None = None,
        batch: np.ndarray | None = None,
    ) -> OrderingResult:
        """Apply the class guard to the batch and return scores that serve that batch first."""
        from model.orderings.class_balance import guard_batch

        settings = self.settings(data)
        scores = np.asarray(scores, dtype=np.float64)
        info = {"ordering": self.name, **(info or {})}
        predicted = probabilities.argmax(axis=1) if len(probabilities) else np.zeros(0, int)
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
