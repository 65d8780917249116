"""One interface for every ordering of the labeling queue.

An ordering looks at the cached features of labeled and unlabeled tasks, the human labels
and the current classifier, and returns a score per unlabeled task, **lower = label
sooner** (Label Studio serves ascending prediction scores first). Sequential orderings
(ATLAS) also return the ordered batch they built.

The maths works on plain numpy arrays so each ordering can be unit-tested with a few
arrays, the way modAL and small-text keep their strategies free of framework objects.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np


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
    """Base class: subclasses set `name` and implement `score`."""

    name: str = ""
    needs_all_layers: bool = False

    @abstractmethod
    def score(self, data: OrderingInput) -> OrderingResult:
        ...
