"""Orderings of the labeling queue, found by name.

Each ordering lives in its own file and implements `model.orderings.base.Ordering`:
given cached features of labeled and unlabeled tasks, the labels and the current
classifier, it returns a score per unlabeled task (**lower = label sooner**) and the batch
Label Studio serves first.

    from model.orderings import get_ordering
    result = get_ordering("least_confidence").score(OrderingInput(...))

Names: random, least_confidence, margin, entropy (baselines); predicted_incorrect,
domain_likeness, atlas (active transfer learning, Munro, *Human-in-the-Loop Machine
Learning*, ch. 5).
"""

from __future__ import annotations

from model.orderings.atlas import Atlas
from model.orderings.base import Ordering, OrderingInput, OrderingResult
from model.orderings.domain_likeness import DomainLikeness
from model.orderings.entropy import Entropy
from model.orderings.least_confidence import LeastConfidence
from model.orderings.margin import Margin
from model.orderings.predicted_incorrect import PredictedIncorrect
from model.orderings.random_order import RandomOrder

ORDERINGS: dict[str, type[Ordering]] = {
    cls.name: cls
    for cls in (
        RandomOrder,
        LeastConfidence,
        Margin,
        Entropy,
        PredictedIncorrect,
        DomainLikeness,
        Atlas,
    )
}


def get_ordering(name: str, **params) -> Ordering:
    """The ordering called `name`, configured with `params` (see its `defaults`)."""
    try:
        cls = ORDERINGS[name]
    except KeyError:
        raise ValueError(
            f"unknown ordering {name!r}; choose one of: {', '.join(ORDERINGS)}"
        ) from None
    return cls(**params)


__all__ = ["ORDERINGS", "Ordering", "OrderingInput", "OrderingResult", "get_ordering"]
