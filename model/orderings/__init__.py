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

# The queue's ordering when neither the project's extra params nor ORDERING name one. Margin:
# on two choices (and on each yes/no of a multi-label control) it ranks as least confidence
# does; with more choices it was ahead of least confidence beyond noise on both many-class
# scenarios and tied on three classes (BENCHMARKS.md, "Margin as the default"). Its batch is
# diverse by default (`Margin.diverse_by_default`; BENCHMARKS.md, "A diverse batch").
DEFAULT_ORDERING = "margin"

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


__all__ = ["DEFAULT_ORDERING", "ORDERINGS", "Ordering", "OrderingInput", "OrderingResult", "get_ordering"]
