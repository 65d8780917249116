"""The scoring maths on one thread (model/threads.py) and the stacked logits of
domain-likeness's fold heads (model.orderings.transfer.stacked_logits), on plain arrays."""

from __future__ import annotations

import numpy as np
from threadpoolctl import threadpool_info


def pool_threads() -> dict[str, int]:
    """Threads of every BLAS/OpenMP pool loaded in this process, by library path."""
    return {info["filepath"]: info["num_threads"] for info in threadpool_info()}


def test_one_thread_limits_every_pool_and_restores_them():
    import torch

    from model.threads import one_thread

    before, torch_before = pool_threads(), torch.get_num_threads()
    assert before, "numpy's BLAS should be among the loaded thread pools"
    with one_thread():
        assert set(pool_threads().values()) == {1}
        assert torch.get_num_threads() == 1
    assert pool_threads() == before
    assert torch.get_num_threads() == torch_before


def test_every_ordering_scores_on_one_thread():
    from model.orderings import ORDERINGS, OrderingInput
    from model.orderings.base import Ordering, OrderingResult

    seen = {}

    class Probe(Ordering):
        name = "probe"

        def score(self, data):
            seen["threads"] = set(pool_threads().values())
            return OrderingResult(scores=np.zeros(len(data.features_unlabeled)))

    rng = np.random.default_rng(0)
    data = OrderingInput(features_labeled=rng.random((4, 3)), labels=np.array([0, 1, 0, 1]),
                         features_unlabeled=rng.random((5, 3)), classifier=None)
    before = pool_threads()
    Probe().score(data)
    assert seen["threads"] == {1}
    assert pool_threads() == before
    # The orderings of the package are wrapped the same way (their own or inherited score).
    for cls in ORDERINGS.values():
        assert getattr(cls.score, "__wrapped__", None) is not None, cls.name


def test_stacked_logits_equal_each_heads_own_logit():
    from model.orderings.transfer import BinaryHead, stacked_logits

    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 20)) * rng.uniform(0.1, 5, size=20) + rng.normal(size=20)
    y = x[:, 0] + rng.normal(size=300) > x[:, 0].mean()
    heads = [BinaryHead(c).fit(x[k::3], y[k::3], np.ones(len(y[k::3]))) for k, c in enumerate((0.01, 0.1, 1.0))]
    pool = rng.normal(size=(5000, 20)).astype(np.float32)  # more rows than one chunk
    expected = np.column_stack([h.positive_logit(pool) for h in heads])
    np.testing.assert_allclose(stacked_logits(heads, pool), expected, rtol=1e-10, atol=1e-10)
    rows = np.array([4999, 0, 17, 2500])
    np.testing.assert_allclose(stacked_logits(heads, pool, rows), expected[rows], rtol=1e-10, atol=1e-10)
    assert stacked_logits(heads, pool, np.zeros(0, dtype=np.int64)).shape == (0, 3)


def test_training_probabilities_score_the_tasks_left_out_of_training():
    from model.orderings.transfer import training_probabilities

    rng = np.random.default_rng(2)
    labeled = rng.normal(size=(60, 8))
    unlabeled = rng.normal(loc=0.8, size=(400, 8))
    p_labeled, p_unlabeled = training_probabilities(labeled, unlabeled, folds=3, max_per_side=50)
    assert p_labeled.shape == (60,) and p_unlabeled.shape == (400,)
    assert np.all((p_labeled > 0) & (p_labeled < 1)) and np.all((p_unlabeled > 0) & (p_unlabeled < 1))
    # The two sides are told apart, left-out tasks included (350 of the pool's 400).
    assert p_labeled.mean() > p_unlabeled.mean() + 0.1
    again = training_probabilities(labeled, unlabeled, folds=3, max_per_side=50)
    np.testing.assert_array_equal(again[1], p_unlabeled)
