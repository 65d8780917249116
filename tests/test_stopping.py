"""Stopping signals (model/stopping.py) on plain numpy arrays."""

import json
import random
import time

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score

from model import stopping


def test_kappa_matches_a_hand_computed_value():
    a = [0, 0, 1, 1, 0, 1, 0, 0]
    b = [0, 1, 1, 1, 0, 0, 0, 0]
    # Observed agreement 6/8; each rater says 0 five times and 1 three times, so chance
    # agreement is (5/8)^2 + (3/8)^2 = 34/64, and kappa = (48/64 - 34/64) / (30/64) = 7/15.
    assert stopping.cohen_kappa(a, b) == pytest.approx(7 / 15)


def test_kappa_matches_scikit_learn_on_random_labels_of_any_type():
    rng = np.random.default_rng(3)
    for classes in (2, 3, 5):
        a = rng.integers(0, classes, 500)
        # b agrees with a on about 70% of the items, otherwise random.
        b = np.where(rng.random(500) < 0.7, a, rng.integers(0, classes, 500))
        expected = cohen_kappa_score(a, b)
        assert stopping.cohen_kappa(a, b) == pytest.approx(expected)
        names = np.array(["Positive", "Negative", "Neutral", "Mixed", "Other"])
        assert stopping.cohen_kappa(names[a], names[b]) == pytest.approx(expected)


def test_kappa_of_identical_single_label_predictions_is_one_not_nan():
    assert stopping.cohen_kappa(["a"] * 10, ["a"] * 10) == 1.0
    assert stopping.cohen_kappa([1, 2, 1], [1, 2, 1]) == 1.0
    with pytest.raises(ValueError, match="same items"):
        stopping.cohen_kappa([1, 2], [1])


def test_stop_set_is_independent_of_order_and_stable_under_added_and_removed_tasks():
    ids = list(range(1, 10_001))
    sample = set(stopping.stop_set(ids, 200))
    assert len(sample) == 200
    shuffled = ids[:]
    random.Random(0).shuffle(shuffled)
    assert set(stopping.stop_set(shuffled, 200)) == sample

    added = list(range(20_001, 20_051))
    grown = set(stopping.stop_set(ids + added, 200))
    # Every task of the new set that existed before was in the old set, so at most one old
    # task leaves per task added.
    assert grown - set(added) <= sample
    assert len(grown & sample) >= 200 - len(added)

    # Removing tasks outside the set changes nothing; removing one inside lets one task in.
    outside = [t for t in ids if t not in sample][:500]
    kept = [t for t in ids if t not in set(outside)]
    assert set(stopping.stop_set(kept, 200)) == sample
    victim = sorted(sample)[0]
    after = set(stopping.stop_set([t for t in ids if t != victim], 200))
    assert len(after & sample) == 199 and victim not in after


def test_stop_set_of_a_small_project_is_every_task():
    assert sorted(stopping.stop_set([5, 3, 9], 1000)) == [3, 5, 9]
    assert len(stopping.stop_set([], 10)) == 0


def test_agreement_compares_only_the_tasks_both_versions_share():
    before = {"task_ids": [1, 2, 3, 4], "predicted": ["a", "b", "a", "b"]}
    now = {"task_ids": [2, 3, 4, 5], "predicted": ["b", "a", "a", "a"]}
    result = stopping.agreement(before, now)
    assert result["compared"] == 3
    assert result["kappa"] == pytest.approx(cohen_kappa_score(["b", "a", "b"], ["b", "a", "a"]))
    assert stopping.agreement(None, now) == {"kappa": None, "compared": 0}


def test_pool_uncertainty_and_predicted_incorrect_rate():
    uniform = np.full((4, 3), 1 / 3)
    certain = np.eye(3)[[0, 1, 2, 0]]
    assert stopping.pool_uncertainty(uniform) == pytest.approx(1.0)
    assert stopping.pool_uncertainty(certain) == pytest.approx(0.0)
    assert stopping.predicted_incorrect_rate(np.array([[0.7, 0.3], [0.9, 0.1]])) == pytest.approx(0.2)
    assert stopping.pool_uncertainty(np.zeros((0, 2))) is None
    assert stopping.predicted_incorrect_rate(np.zeros((0, 2))) is None


def test_out_of_fold_quality_skips_tasks_without_an_out_of_fold_prediction():
    truth = ["a", "a", "b", "b", "c", "c"]
    guess = ["a", "b", "b", "b", None, "c"]
    quality = stopping.out_of_fold_quality(truth, guess)
    assert quality["n"] == 5
    assert quality["accuracy"] == pytest.approx(4 / 5)
    # F1 per class: a 2/3 (p 1, r 1/2), b 4/5 (p 2/3, r 1), c 1 (p 1, r 1).
    assert quality["macro_f1"] == pytest.approx((2 / 3 + 4 / 5 + 1) / 3)
    assert stopping.out_of_fold_quality([0, 1], [-1, -1]) == {"accuracy": None, "macro_f1": None, "n": 0}


def _versions(predictions_per_version, pool, labels_per_version=50):
    """The signals of each version in turn, as the retrain would chain them."""
    ids = list(range(len(predictions_per_version[0])))
    signals, reference = None, None
    out = []
    for number, predicted in enumerate(predictions_per_version, start=1):
        now = stopping.stop_set_predictions(ids, predicted, size=500)
        point, reference = stopping.version_point(labels_per_version * number, now, reference, pool,
                                                  version=f"v{number:04d}")
        signals = stopping.next_signals(signals, point)
        out.append(signals)
    return out


def test_verdict_flips_once_predictions_stop_changing():
    rng = np.random.default_rng(0)
    n = 2000
    pool = rng.dirichlet([1, 1], size=n)
    changing = [rng.integers(0, 2, n) for _ in range(4)]
    settled = changing[-1]
    history = _versions(changing + [settled] * 3, pool)
    verdicts = [s["verdict"] for s in history]
    # Four unrelated versions, then the same predictions three times: the third identical
    # comparison completes the window.
    assert verdicts[:6] == [stopping.STILL_LEARNING] * 6
    assert verdicts[6] == stopping.STABILISED
    assert history[6]["kappa_window"] == [1.0, 1.0, 1.0]
    assert history[0]["kappa"] is None and "0 of the 3" in history[0]["reason"]
    assert abs(history[2]["kappa"]) < 0.1  # random predictions barely agree
    assert [p["labeled"] for p in history[-1]["history"]] == [50 * i for i in range(1, 8)]
    # And back: one version that changes its mind breaks the window.
    flipped = settled.copy()
    flipped[: n // 4] = 1 - flipped[: n // 4]
    again = _versions(changing + [settled] * 3 + [flipped], pool)
    assert again[-1]["verdict"] == stopping.STILL_LEARNING
    assert f"below {stopping.THRESHOLD}" in again[-1]["reason"]
    json.dumps(again[-1])  # what the version's meta keeps


def test_versions_closer_than_the_spacing_are_compared_with_an_older_reference():
    # The service retrains after nearly every annotation: ten versions one label apart.
    rng = np.random.default_rng(5)
    pool = rng.dirichlet([1, 1], size=100)
    ids = list(range(300))
    predictions = [rng.integers(0, 2, 300) for _ in range(61)]
    signals, reference, points = None, None, []
    for labeled, predicted in zip(range(10, 71), predictions):
        now = stopping.stop_set_predictions(ids, predicted)
        point, reference = stopping.version_point(labeled, now, reference, pool, spacing=20)
        points.append(point)
        signals = stopping.next_signals(signals, point)
    compared = [p for p in points if p["comparison"]]
    # 10 starts the reference; then 30, 50 and 70 are each 20 labels past the last one.
    assert points[0]["restart"] and [p["labeled"] for p in compared] == [30, 50, 70]
    assert [p["reference_labeled"] for p in compared] == [10, 30, 50]
    assert compared[0]["kappa"] == pytest.approx(cohen_kappa_score(predictions[0], predictions[20]))
    assert reference["labeled"] == 70 and len(signals["kappa_window"]) == 3
    # The history keeps the comparisons (and the restart), not the 57 versions between them.
    assert [p["labeled"] for p in signals["history"]] == [10, 30, 50, 70]
    # Identical predictions one label apart would have "stabilised" at once; spaced, they
    # need three comparisons, 60 labels.
    same = rng.integers(0, 2, 300)
    signals, reference = None, None
    for labeled in range(10, 71):
        point, reference = stopping.version_point(labeled, stopping.stop_set_predictions(ids, same),
                                                  reference, pool, spacing=20)
        signals = stopping.next_signals(signals, point)
        assert signals["stabilised"] == (labeled >= 70)


def test_window_restarts_after_a_version_without_reference():
    points = [{"kappa": None, "restart": True}, {"kappa": 1.0}, {"kappa": None, "restart": True},
              {"kappa": 1.0}, {"kappa": None}, {"kappa": 1.0}]  # the fifth: between comparisons
    signals = stopping.stopping_signals(points)
    assert signals["kappa_window"] == [1.0, 1.0]
    assert not signals["stabilised"]
    assert stopping.stopping_signals(points, window=2)["stabilised"]
    with pytest.raises(ValueError, match="threshold"):
        stopping.stopping_signals(points, threshold=1.5)


def test_several_controls_combine_to_the_worst_one():
    settled = stopping.stopping_signals([{"kappa": 1.0}] * 3)
    unsettled = stopping.stopping_signals([{"kappa": 1.0}, {"kappa": 0.9, "uncertainty": 0.4},
                                           {"kappa": 0.7, "uncertainty": 0.3}])
    combined = stopping.combine_controls({"sentiment": settled, "topic": unsettled})
    assert combined["verdict"] == stopping.STILL_LEARNING
    assert combined["kappa"] == pytest.approx(0.7)
    assert combined["uncertainty"] == pytest.approx(0.3)
    assert "topic" in combined["reason"] and "sentiment" not in combined["reason"]
    assert stopping.combine_controls({"a": settled, "b": settled})["stabilised"]
    # Each control chains on from its own signals in the next version.
    following = stopping.next_signals(combined["controls"]["topic"], {"kappa": 1.0})
    assert len(following["history"]) == 4 and following["kappa_window"] == [0.9, 0.7, 1.0]


def test_signals_of_a_10000_task_project_take_well_under_a_few_seconds():
    rng = np.random.default_rng(1)
    n = 10_000
    ids = list(rng.permutation(np.arange(100_000))[:n])
    reference = dict(stopping.stop_set_predictions(ids, rng.integers(0, 3, n)), labeled=900)
    pool = rng.dirichlet([1, 1, 1], size=n - 1000)
    truth = rng.integers(0, 3, 1000)
    started = time.perf_counter()
    now = stopping.stop_set_predictions(ids, rng.integers(0, 3, n))
    point, _ = stopping.version_point(1000, now, reference, pool, truth, rng.integers(0, 3, 1000),
                                      spacing=50, version="v0002")
    signals = stopping.next_signals({"history": [{"version": "v0001", "restart": True}]}, point)
    elapsed = time.perf_counter() - started
    assert point["compared"] == 1000 and signals["labeled"] == 1000
    assert elapsed < 10, f"stopping signals took {elapsed:.1f} s at 10,000 tasks"
    assert len(json.dumps(now)) < 30_000 and len(json.dumps(signals)) < 10_000
    assert signals["kappa"] is not None
