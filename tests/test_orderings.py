"""The orderings of the labeling queue (issue 5): on plain arrays, then on real text.

Unit tests use small numpy arrays and the real ClassifierHead. The real-data tests encode
movie snippets (the training domain) and airline tweets (the application domain) with the
offline MiniLM encoder once, through the encoding cache, and check that each ordering does
its job: predicted-incorrect finds the current model's pool errors at least as well as
least confidence, domain-likeness separates tweets from held-out movie snippets, an ATLAS
batch is more diverse than the top of predicted-incorrect, and no batch collapses onto one
predicted class.
"""

from __future__ import annotations

import numpy as np
import pytest

from model.classifier import ClassifierHead, HeadConfig, MultiLabelHead
from model.heads import ControlHeads
from model.orderings import DEFAULT_ORDERING, ORDERINGS, OrderingInput, get_ordering
from model.orderings.class_balance import balanced_batch, guard_batch, put_batch_first
from model.orderings.entropy import entropy_score
from model.orderings.least_confidence import least_confidence_score
from model.orderings.margin import margin_score

NAMES = ["random", "least_confidence", "margin", "entropy", "predicted_incorrect", "domain_likeness", "atlas"]


# ---------------------------------------------------------------- plain arrays


class FixedProbabilities:
    """A stand-in classifier for the baselines: probabilities given per task."""

    def __init__(self, probabilities):
        self.probabilities = np.asarray(probabilities, dtype=np.float32)

    def predict_proba(self, features):
        return self.probabilities[np.asarray(features[:, 0], dtype=int)]


def _baseline_input(probabilities, batch_size=2, **params):
    n = len(probabilities)
    return OrderingInput(
        features_labeled=np.zeros((2, 1)),
        labels=np.array([0, 1]),
        features_unlabeled=np.arange(n, dtype=float)[:, None],
        classifier=FixedProbabilities(probabilities),
        batch_size=batch_size,
        params=params,
    )


def test_the_default_ordering_is_margin_everywhere_a_default_is_taken():
    """Settings (ORDERING), a retrain's OrderingChoice and queue_scores all default to margin,
    which ranks two choices as least confidence does and three or more its own way."""
    import inspect

    from backend.settings import Settings
    from model.queue_scores import queue_scores, queue_scores_multi
    from model.training import OrderingChoice

    assert DEFAULT_ORDERING == "margin"
    assert Settings.model_fields["ordering"].default == DEFAULT_ORDERING
    assert OrderingChoice().ordering == DEFAULT_ORDERING
    for function in (queue_scores, queue_scores_multi):
        assert inspect.signature(function).parameters["ordering"].default == DEFAULT_ORDERING
    rng = np.random.default_rng(0)
    two = rng.dirichlet(np.ones(2), size=200)
    assert np.array_equal(np.argsort(margin_score(two), kind="stable"),
                          np.argsort(least_confidence_score(two), kind="stable"))
    # Three choices: (0.5, 0.49, 0.01) is a near tie for margin, (0.4, 0.3, 0.3) is the least
    # confident: the two orderings disagree on which to label first.
    three = np.array([[0.5, 0.49, 0.01], [0.4, 0.3, 0.3]])
    assert np.argmin(margin_score(three)) == 0 and np.argmin(least_confidence_score(three)) == 1


def test_registry_has_exactly_the_issue_names():
    assert list(ORDERINGS) == NAMES
    for name in NAMES:
        assert get_ordering(name).name == name
    with pytest.raises(ValueError, match="choose one of"):
        get_ordering("most_interesting")
    with pytest.raises(ValueError, match="known parameters"):
        get_ordering("atlas", rounds_per_batch=3)


def test_uncertainty_baselines_serve_the_least_certain_first():
    probabilities = [[0.99, 0.01], [0.5, 0.5], [0.8, 0.2], [0.3, 0.7]]
    for score in (least_confidence_score, margin_score, entropy_score):
        values = score(np.array(probabilities))
        assert list(np.argsort(values)) == [1, 3, 2, 0]
        assert values.min() >= 0 and values.max() <= 1
    # A float32 softmax saturates: p_max rounds to 1.0 while the other class does not.
    saturated = np.array([[1.0, 1e-9], [1.0, 1e-12]], dtype=np.float32)
    assert least_confidence_score(saturated)[0] < least_confidence_score(saturated)[1]
    for name in ("least_confidence", "margin", "entropy"):
        result = get_ordering(name).score(_baseline_input(probabilities))
        assert list(result.top(2)) == [1, 3]


def test_a_diverse_batch_takes_the_least_certain_task_of_each_group_of_near_duplicates():
    # 12 groups of 4 near-duplicate tasks, far apart; the lower a group's index, the less
    # certain its tasks. With batches of 6 plain margin serves groups 0 and 1; margin's
    # default diverse batch, here from the 4 x 6 = 24 least certain (groups 0-5), one task
    # per group, the least certain of each, served least certain first (class guard off:
    # one predicted class here). Least confidence stays plain unless asked.
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(12), 4)
    centres = rng.normal(size=(12, 16)) * 10
    features = centres[groups] + rng.normal(scale=0.01, size=(len(groups), 16))
    p_top = 0.5 + 0.04 * groups + rng.uniform(0, 0.005, len(groups))
    probabilities = np.column_stack([p_top, 1 - p_top])
    data = OrderingInput(features_labeled=features[:2], labels=np.array([0, 1]), features_unlabeled=features,
                         classifier=None, probabilities_unlabeled=probabilities, batch_size=6,
                         params={"class_guard": False})
    assert set(groups[get_ordering("margin", diverse_batch=False).score(data).top(6)]) == {0, 1}
    assert set(groups[get_ordering("least_confidence").score(data).top(6)]) == {0, 1}
    result = get_ordering("margin", diversity_candidates=4).score(data)
    # On two choices least confidence ranks as margin does, so asked for it, its batch is the same.
    same = get_ordering("least_confidence", diverse_batch=True, diversity_candidates=4).score(data)
    assert list(same.top(6)) == list(result.top(6))
    batch = result.top(6)
    assert list(groups[batch]) == [0, 1, 2, 3, 4, 5]
    margins = margin_score(probabilities)
    for task in batch:
        assert margins[task] == margins[groups == groups[task]].min()
    assert list(np.argsort(result.scores, kind="stable")[:6]) == list(batch)
    assert result.info["diverse_batch"] is True and result.info["diverse_batch_outside_top"] == 4
    # Nothing to choose when the pool is no larger than the batch: plain margin's batch.
    small = OrderingInput(features_labeled=features[:2], labels=np.array([0, 1]), features_unlabeled=features[:6],
                          classifier=None, probabilities_unlabeled=probabilities[:6], batch_size=6,
                          params={"class_guard": False})
    assert sorted(get_ordering("margin").score(small).top(6)) == list(range(6))


def test_random_order_is_seeded():
    data = _baseline_input([[0.6, 0.4]] * 30, batch_size=5)
    first = get_ordering("random").score(data).scores
    assert np.array_equal(first, get_ordering("random").score(data).scores)
    data.seed = 1
    assert not np.array_equal(first, get_ordering("random").score(data).scores)


def test_params_come_from_the_constructor_and_the_call():
    probabilities = [[0.9, 0.1]] * 8 + [[0.4, 0.6]] * 2
    unguarded = get_ordering("least_confidence", class_guard=False).score(
        _baseline_input(probabilities, batch_size=4)
    )
    assert unguarded.info["class_guard"] is False
    # Per-call extra params win over the constructor's.
    guarded = get_ordering("least_confidence", class_guard=False).score(
        _baseline_input(probabilities, batch_size=4, class_guard=True)
    )
    assert guarded.info["class_guard"] is True
    assert "param_warnings" not in guarded.info
    # An unknown name or a bad value in the call's params (a project's extra params) is
    # skipped with a warning, and the value it would have replaced stays.
    result = get_ordering("least_confidence", class_guard=False).score(_baseline_input(
        probabilities, batch_size=4, folds="many", class_guard="yes", min_class_fraction=2.0))
    warnings = result.info["param_warnings"]
    assert len(warnings) == 3
    assert "no parameter 'folds'" in warnings[0] and "known parameters: class_guard" in warnings[0]
    assert "class_guard='yes' ignored: it must be true or false; using False" in warnings[1]
    assert "min_class_fraction=2.0 ignored: it must be in [0.0, 1.0]; using 0.3" in warnings[2]
    assert result.info["class_guard"] is False


def test_every_default_passes_its_own_rule_and_bad_values_fall_back():
    for name, cls in ORDERINGS.items():
        rules = cls.param_rules()
        assert set(rules) == set(cls.known_params()), name
        for param, default in cls.known_params().items():
            assert rules[param](default) == default, (name, param)
    atlas = get_ordering("atlas")
    bad = {"folds": 1, "min_incorrect": "8", "head_features": "everything", "head_regularization": -1,
           "regularization_grid": [], "domain_weighting": "no", "per_round": 2.5, "locality": float("nan")}
    settings, warnings = atlas.resolve(OrderingInput(None, None, None, None, params=bad))
    assert len(warnings) == len(bad)
    assert settings == atlas.known_params()
    good = {"folds": 3.0, "head_regularization": 0.5, "domain_weighting": 0, "regularization_grid": [0, 1]}
    settings, warnings = atlas.resolve(OrderingInput(None, None, None, None, params=good))
    assert warnings == []
    assert (settings["folds"], settings["head_regularization"], settings["domain_weighting"],
            settings["regularization_grid"]) == (3, 0.5, False, [0.0, 1.0])


# ---------------------------------------------------------------- class guard


def test_guard_keeps_a_batch_from_collapsing_onto_one_class():
    # The 60 lowest scores are all predicted class 0; class 1 exists further down.
    scores = np.linspace(0.0, 1.0, 100)
    predicted = np.array([0] * 60 + [1] * 40)
    batch = balanced_batch(np.argsort(scores), predicted, 20, min_class_fraction=0.3)
    assert len(batch) == 20 == len(set(batch))
    assert (predicted[batch] == 1).sum() == 3  # 0.3 * 20 / 2 classes
    # The ordering's own ranking is kept otherwise: the best 17 of class 0, then the best 3
    # of class 1.
    assert list(batch) == list(range(17)) + [60, 61, 62]

    new_scores, guarded, info = guard_batch(scores, predicted, 20)
    assert info["class_guard_swapped"] == 3
    assert list(np.argsort(new_scores, kind="stable")[:20]) == list(guarded)
    # Tasks the guard did not move keep their score.
    untouched = np.setdiff1d(np.arange(100), guarded[-3:])
    assert np.array_equal(new_scores[untouched], scores[untouched])

    _, unguarded, info = guard_batch(scores, predicted, 20, enabled=False)
    assert set(predicted[unguarded]) == {0} and info["class_guard_swapped"] == 0


def test_guard_leaves_a_mixed_batch_and_a_one_class_pool_alone():
    scores = np.linspace(0, 1, 50)
    mixed = np.arange(50) % 2
    new_scores, batch, info = guard_batch(scores, mixed, 10)
    assert info["class_guard_swapped"] == 0 and np.array_equal(new_scores, scores)
    one_class = np.zeros(50, dtype=int)
    _, batch, info = guard_batch(scores, one_class, 10)
    assert list(batch) == list(range(10)) and info["class_guard_swapped"] == 0


def test_guard_with_more_classes_than_places_gives_the_best_classes_one_each():
    order = np.arange(30)
    predicted = np.array([0] * 10 + [1] * 10 + [2] * 10)
    batch = balanced_batch(order, predicted, 2, min_class_fraction=0.3)
    assert sorted(predicted[batch]) == [0, 1]


def test_domain_likeness_cluster_batch_takes_the_most_application_like_task_of_each_cluster():
    from model.orderings.domain_likeness import cluster_batch

    rng = np.random.default_rng(5)
    centres = np.array([[10, 0], [-10, 0], [0, 10], [0, -10]], dtype=float)
    blob = np.repeat(np.arange(4), 30)
    features = centres[blob] + rng.normal(0, 1, (120, 2))
    p_training = rng.random(120)
    batch = cluster_batch(features, p_training, size=4)
    assert sorted(blob[batch]) == [0, 1, 2, 3]  # one task from every cluster
    for i in batch:
        assert p_training[i] == p_training[blob == blob[i]].min()
    assert list(p_training[batch]) == sorted(p_training[batch])  # most application-like first
    # Without the option, the batch is just the lowest P(training) (which may sit in one cluster).
    assert get_ordering("domain_likeness").defaults["cluster_batch"] is False


def test_uncertainty_first_orders_the_least_confident_by_domain_likeness():
    from model.orderings.domain_likeness import uncertainty_first

    probabilities = np.array([[0.5, 0.5], [0.9, 0.1], [0.6, 0.4], [0.99, 0.01], [0.7, 0.3]])
    p_training = np.array([0.9, 0.0, 0.2, 0.1, 0.5])
    scores = uncertainty_first(least_confidence_score(probabilities), p_training, candidates=3)
    # Candidates: tasks 0, 2, 4 (least confident); among them the lowest P(training) first;
    # then the rest by least confidence (1 before 3), whatever their P(training).
    assert list(np.argsort(scores, kind="stable")) == [2, 4, 0, 1, 3]
    assert np.allclose(scores[[0, 2, 4]], p_training[[0, 2, 4]])
    assert (scores[[1, 3]] >= 1).all()


def test_put_batch_first_is_rank_based_below_everything_else():
    scores = np.array([0.5, 0.1, 0.9, 0.3, 0.7])
    batch = np.array([2, 0])
    new = put_batch_first(scores, batch, rank_based=True)
    assert list(np.argsort(new)[:2]) == [2, 0]
    assert new[2] < new[0] < scores[[1, 3, 4]].min()
    assert np.array_equal(new[[1, 3, 4]], scores[[1, 3, 4]])


# ---------------------------------------------------------------- active transfer learning on arrays


def _hard_region_data(n, seed, dim=12):
    """Two classes split by x0; where x1 > 1 a third of the labels are flipped.

    The classifier cannot fit the flips, so its errors concentrate where x1 > 1: a region
    the Correct/Incorrect head can find from the hidden layer, even among confident tasks.
    """
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    y = (x[:, 0] > 0).astype(int)
    flip = (x[:, 1] > 1.0) & (rng.random(n) < 0.35)
    y[flip] = 1 - y[flip]
    return x, y


def _head(dim, seed=0):
    return ClassifierHead(HeadConfig(labels=["a", "b"], input_dim=dim, hidden_dim=32, epochs=120, seed=seed))


def test_predicted_incorrect_ranks_likely_errors_first_not_last():
    # The reference code's inversion bug would serve the tasks most likely correct first.
    x, y = _hard_region_data(1400, seed=0)
    labeled, pool = slice(0, 600), slice(600, 1400)
    classifier = _head(x.shape[1]).fit(x[labeled], y[labeled])
    wrong = classifier.predict_proba(x[pool]).argmax(1) != y[pool]
    data = OrderingInput(
        x[labeled], y[labeled], x[pool], classifier, batch_size=100,
        params={"domain_weighting": False, "class_guard": False, "head_regularization": 0.05},
    )
    # The default head (a correction of least confidence) and the book's head on the hidden
    # layer alone: both serve a batch with far more errors than the pool has, and than the
    # tasks they leave for last.
    for params, factor in (({}, 2.0), ({"head_features": "hidden"}, 1.5)):
        result = get_ordering("predicted_incorrect", **params).score(data)
        assert result.info["fallback"] is None
        order = np.argsort(result.scores, kind="stable")
        first, last = wrong[order[:100]].mean(), wrong[order[-100:]].mean()
        assert first > factor * wrong.mean() and first > last + 0.1, (params, first, last, wrong.mean())
        assert np.array_equal(result.top(100), order[:100])


def test_the_correction_head_never_turns_uncertainty_upside_down():
    # Labeled tasks where, by chance, the more uncertain ones were *less* often wrong: the
    # best fit has a negative slope on the uncertainty, which would serve the pool's safest
    # tasks first. The slope is kept positive, so the ranking stays least confidence's.
    from model.orderings.transfer import BinaryHead

    rng = np.random.default_rng(0)
    offset = rng.normal(size=400)
    wrong = rng.random(400) < np.where(offset > 0, 0.1, 0.4)
    head = BinaryHead(0.0).fit(np.zeros((400, 3)), wrong, np.ones(400), offset=offset)
    assert head.slope > 0
    pool_offset = np.linspace(-3, 3, 50)
    logits = head.positive_logit(np.zeros((50, 3)), pool_offset)
    assert np.all(np.diff(logits) > 0)  # more uncertain = more likely incorrect


def test_predicted_incorrect_falls_back_to_least_confidence_without_errors():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 8)).astype(np.float32)
    x[:100, 0] += 6  # two far-apart clusters: no out-of-fold mistakes
    y = np.array([1] * 100 + [0] * 100)
    classifier = _head(8).fit(x, y)
    pool = rng.normal(size=(50, 8)).astype(np.float32)
    pool[:, 0] += rng.uniform(0, 6, size=50)
    for name in ("predicted_incorrect", "atlas"):
        result = get_ordering(name, class_guard=False).score(OrderingInput(x, y, pool, classifier, batch_size=10))
        assert result.info["fallback"] == "least_confidence"
        assert "incorrectly" in result.info["fallback_reason"]
        expected = least_confidence_score(classifier.predict_proba(pool))
        assert np.allclose(result.scores, expected)
    # Too few labeled tasks to mark at all.
    result = get_ordering("predicted_incorrect").score(OrderingInput(x[:6], y[:6], pool, classifier))
    assert result.info["fallback"] == "least_confidence"


def test_atlas_serves_its_batch_first_and_stops_when_nothing_looks_incorrect():
    x, y = _hard_region_data(1400, seed=2)
    labeled = slice(0, 600)
    classifier = _head(x.shape[1]).fit(x[labeled], y[labeled])
    rng = np.random.default_rng(3)
    # Pool: confident tasks far from the boundary and outside the hard region, plus a few
    # risky ones near the boundary.
    easy = rng.normal(size=(300, x.shape[1])).astype(np.float32)
    easy[:, 0] = rng.choice([-4.0, 4.0], size=300)
    easy[:, 1] = -1.5
    risky = rng.normal(size=(6, x.shape[1])).astype(np.float32)
    risky[:, 0] = rng.normal(0, 0.05, size=6)
    pool = np.vstack([easy, risky])
    params = {"domain_weighting": False, "per_round": 2, "min_incorrect_probability": 0.5}
    result = get_ordering("atlas", **params).score(
        OrderingInput(x[labeled], y[labeled], pool, classifier, batch_size=40)
    )
    assert result.info["fallback"] is None
    assert result.info["stopped_early"] is True
    assert 0 < len(result.batch) < 40
    assert set(range(300, 306)) & set(result.batch)
    # The batch comes first, in the order it was built; the rest keep last-round P(Correct).
    assert list(np.argsort(result.scores, kind="stable")[: len(result.batch)]) == list(result.batch)
    outside = np.setdiff1d(np.arange(len(pool)), result.batch)
    assert result.scores[outside].min() > result.scores[result.batch].max()
    assert result.scores[outside].max() <= 1.0

    # Nothing risky at all: the first round finds nothing confidently incorrect.
    result = get_ordering("atlas", **params).score(
        OrderingInput(x[labeled], y[labeled], easy, classifier, batch_size=40)
    )
    assert result.info["stopped_early"] is True and result.info["rounds"] == 1
    assert result.info["batch_built"] == 0


# ---------------------------------------------------------------- several controls on arrays


def test_a_multi_label_decision_is_most_uncertain_at_its_threshold():
    from model.orderings.base import HeadView, decision_probabilities, threshold_centred

    thresholds = np.array([0.2, 0.5])
    assert np.allclose(threshold_centred(np.array([0.0, 0.1, 0.2, 0.6, 1.0]), 0.2), [0, 0.25, 0.5, 0.75, 1])
    p = np.array([[0.2, 0.9], [0.9, 0.5]])
    decisions = decision_probabilities([HeadView(True, p, thresholds)])
    assert len(decisions) == 2  # one yes/no decision per choice
    assert np.allclose(decisions[0], [[0.5, 0.5], [0.0625, 0.9375]])  # 0.5 + 0.7 / 1.6
    assert np.allclose(decisions[1], [[0.1, 0.9], [0.5, 0.5]])


def test_uncertainty_over_several_heads_is_the_largest_normalised_one():
    from model.orderings.base import HeadView, combined_score

    topic = np.array([[0.9, 0.05, 0.05], [0.4, 0.3, 0.3], [0.98, 0.01, 0.01], [0.9, 0.05, 0.05]])
    urgent = np.array([[0.95, 0.05], [0.9, 0.1], [0.97, 0.03], [0.55, 0.45]])
    flags = np.array([[0.9, 0.1], [0.95, 0.02], [0.52, 0.99], [0.99, 0.01]])  # sigmoids, threshold 0.5
    views = [HeadView(False, topic), HeadView(False, urgent), HeadView(True, flags)]
    for score in (least_confidence_score, margin_score, entropy_score):
        combined = combined_score(score, views)
        per_decision = [score(topic), score(urgent), score(np.column_stack([1 - flags[:, 0], flags[:, 0]])),
                        score(np.column_stack([1 - flags[:, 1], flags[:, 1]]))]
        assert np.allclose(combined, np.min(per_decision, axis=0))
        assert combined_score(score, views[:1]) is not None
        assert np.array_equal(combined_score(score, views[:1]), score(topic))  # one head: unchanged
    # Normalised per head: task 1's three-class 0.4 (uncertainty 0.9) beats a yes/no 0.9
    # (uncertainty 0.2); task 2's flag at 0.52 and task 3's urgency at 0.55 are near-coin-flips.
    order = np.argsort(combined_score(least_confidence_score, views), kind="stable")
    assert list(order) == [2, 3, 1, 0]
    result = get_ordering("least_confidence", class_guard=False).score(OrderingInput(
        np.zeros((2, 1)), None, np.zeros((4, 1)), None, heads=_FixedHeads([False, False, True]),
        head_probabilities_unlabeled=[topic, urgent, flags], targets=[], batch_size=2))
    assert list(result.top(2)) == [2, 3]


def test_joint_scores_are_the_measures_of_the_whole_answer():
    """decisions="joint": each baseline's measure of the distribution over whole answers
    (every combination of the decisions' classes, decisions independent), checked against
    that distribution enumerated outright."""
    import itertools

    from model.orderings.base import HeadView, decision_probabilities, joint_score
    from model.orderings.entropy import joint_entropy_score
    from model.orderings.least_confidence import joint_least_confidence_score
    from model.orderings.margin import joint_margin_score

    rng = np.random.default_rng(3)
    topic = rng.dirichlet(np.ones(3), size=6)
    flags = rng.random((6, 2))
    thresholds = np.array([0.3, 0.6])
    views = [HeadView(False, topic), HeadView(True, flags, thresholds)]
    decisions = decision_probabilities(views)
    answers = np.array([[np.prod([d[i, c] for d, c in zip(decisions, combo)])
                         for combo in itertools.product(*(range(d.shape[1]) for d in decisions))]
                        for i in range(6)])  # (tasks, 3 * 2 * 2 whole answers)
    assert np.allclose(answers.sum(axis=1), 1.0)
    for joint, score in ((joint_least_confidence_score, least_confidence_score), (joint_margin_score, margin_score),
                         (joint_entropy_score, entropy_score)):
        assert np.allclose(joint(decisions), score(answers)), joint.__name__
        assert np.array_equal(joint_score(joint, score, views[:1]), score(topic))  # one decision: unchanged
    # The least certain decision and the whole answer disagree: a task with one coin-flip
    # decision among certain ones against a task whose every decision is moderately unsure.
    one_flip = [np.array([[0.5, 0.5], [0.75, 0.25]]), np.array([[1.0, 0.0], [0.75, 0.25]]),
                np.array([[1.0, 0.0], [0.75, 0.25]])]
    assert np.argmin(np.min([least_confidence_score(d) for d in one_flip], axis=0)) == 0
    assert np.argmin(joint_least_confidence_score(one_flip)) == 1  # 0.75^3 < 0.5
    # Through the ordering's parameter, and a bad value is refused with a warning.
    heads = _FixedHeads([False, True])
    heads.heads[1].thresholds_ = thresholds
    data = OrderingInput(np.zeros((2, 1)), None, np.zeros((6, 1)), None, heads=heads,
                         head_probabilities_unlabeled=[topic, flags], targets=[], batch_size=2)
    assert np.allclose(data.pool_heads()[1].thresholds, thresholds)
    for name, joint in (("least_confidence", joint_least_confidence_score), ("margin", joint_margin_score),
                        ("entropy", joint_entropy_score)):
        ordering = get_ordering(name, class_guard=False, decisions="joint")
        expected = joint(decision_probabilities(data.pool_heads()))
        assert np.allclose(ordering.score(data).scores, expected), name
        result = get_ordering(name, class_guard=False).score(
            OrderingInput(**{**data.__dict__, "params": {"decisions": "all"}}))
        assert any("decisions" in w for w in result.info["param_warnings"]), name
    with pytest.raises(ValueError, match="decisions"):
        get_ordering("atlas", decisions="joint")  # ATL orderings do not take it


class _FixedHeads:
    """Stand-in ControlHeads for the baselines: only the kinds of heads matter."""

    def __init__(self, multi_label):
        self.heads = [type("Head", (), {"multi_label": m, "thresholds_": None})() for m in multi_label]


def test_wrong_probability_is_any_decision_wrong():
    from model.orderings.transfer import uncertainty_logit, wrong_probability

    a = np.array([[0.9, 0.1], [0.6, 0.4]])
    b = np.array([[0.8, 0.15, 0.05], [0.99, 0.005, 0.005]])
    assert np.allclose(wrong_probability([a]), [0.1, 0.4])
    assert np.allclose(wrong_probability([a, b]), 1 - (1 - np.array([0.1, 0.4])) * (1 - np.array([0.2, 0.01])))
    logit = uncertainty_logit([a, b])
    p = wrong_probability([a, b])
    assert np.allclose(logit, np.log(p / (1 - p)))
    assert np.allclose(uncertainty_logit(a), np.log(np.array([0.1, 0.4]) / np.array([0.9, 0.6])))


def test_a_labeled_task_is_incorrect_when_any_control_it_answers_is_wrong():
    from model.heads import ControlSpec, OutOfFold
    from model.orderings.transfer import labeled_incorrect

    single = ClassifierHead(HeadConfig(labels=["x", "y"], input_dim=2))
    multi = MultiLabelHead(HeadConfig(labels=["a", "b"], input_dim=2))
    heads = ControlHeads([ControlSpec("s", ["x", "y"]), ControlSpec("m", ["a", "b"], multi_label=True)],
                         [single, multi])
    targets = [np.array([0, 1, -1, 0]), np.array([[1, 0], [1, 0], [0, 1], [-1, -1]])]
    oof = OutOfFold(
        probabilities=[np.array([[0.9, 0.1], [0.8, 0.2], [0.5, 0.5], [0.3, 0.7]]),
                       np.array([[0.9, 0.1], [0.8, 0.3], [0.9, 0.2], [0.1, 0.1]])],
        hidden=[np.zeros((4, 1)), np.zeros((4, 1))],
        scored=[targets[0] >= 0, (targets[1] >= 0).all(axis=1)], folds=2, seed=0)
    data = OrderingInput(np.zeros((4, 1)), None, np.zeros((1, 1)), None, heads=heads, targets=targets)
    incorrect, marked = labeled_incorrect(data, oof)
    # 0: both right. 1: single wrong (0.8 for x). 2: only "m" answered, predicted {a}, truth {b}.
    # 3: only "s" answered, predicted y, truth x; the unanswered "m" does not count.
    assert incorrect.tolist() == [False, True, True, True]
    assert marked.all()


def _several_controls_input(n_labeled=500, n_pool=500, seed=0, **params):
    """Two controls: "side" (single-choice, x0 > 0, flipped where x1 > 1) and "flags"
    (multi-label, two choices), each answered on about 80 % of the labeled tasks."""
    from model.heads import ControlSpec, labeled_tasks, train_heads

    x, side = _hard_region_data(n_labeled + n_pool, seed)
    rng = np.random.default_rng(seed)
    flags = np.column_stack([x[:, 2] > 0, x[:, 3] + 0.3 * rng.normal(size=len(x)) > 0.5]).astype(np.int8)
    side_t = np.where(rng.random(len(x)) < 0.8, side, -1)
    flags_t = np.where((rng.random(len(x)) < 0.8)[:, None], flags, -1).astype(np.int8)
    side_t[n_labeled:] = -1
    flags_t[n_labeled:] = -1
    specs = [ControlSpec("side", ["l", "r"]), ControlSpec("flags", ["a", "b"], multi_label=True)]
    targets = [side_t, flags_t]
    labeled = labeled_tasks(targets)
    heads, oof = train_heads(specs, [x, x], targets, labeled, folds=5, hidden_dim=32, epochs=120)
    pool = np.setdiff1d(np.arange(len(x)), labeled)
    data = OrderingInput(
        x[labeled], None, x[pool], None, batch_size=60, heads=heads,
        head_features_labeled=[x[labeled], x[labeled]], head_features_unlabeled=[x[pool], x[pool]],
        targets=[t[labeled] for t in targets], out_of_fold=oof,
        all_layers_labeled=np.stack([x[labeled]] * 2, axis=1), all_layers_unlabeled=np.stack([x[pool]] * 2, axis=1),
        params=params)
    wrong = (heads.heads[0].predict_proba(x[pool]).argmax(1) != side[pool])
    return data, wrong


def test_every_ordering_runs_on_several_controls_with_a_multi_label_head():
    data, wrong = _several_controls_input()
    for name in NAMES:
        result = get_ordering(name).score(data)
        assert result.scores.shape == (len(data.features_unlabeled),), name
        assert np.isfinite(result.scores).all(), name
        assert len(result.top(data.batch_size)) == data.batch_size, name
        assert "param_warnings" not in result.info, name
    # One Correct/Incorrect head over both controls: it was trained (no fallback) and serves
    # a batch with more of the single-choice head's errors than the pool holds.
    for name in ("predicted_incorrect", "atlas"):
        result = get_ordering(name, domain_weighting=False).score(data)
        assert result.info["fallback"] is None, result.info
        assert wrong[result.top(60)].mean() > wrong.mean(), name


# ---------------------------------------------------------------- real data

REAL_DATA_CACHE = "~/.cache/atl-backend/orderings-encodings.sqlite3"


def _mean_pairwise_cosine(vectors: np.ndarray) -> float:
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    similarity = unit @ unit.T
    n = len(unit)
    return float((similarity.sum() - n) / (n * (n - 1)))


@pytest.fixture(scope="module")
def movies_and_tweets():
    """1,400 real texts encoded once (all layers): 700 movie snippets, 700 airline tweets."""
    import os
    from pathlib import Path

    import torch

    from model.datasets import airline_tweets, movie_snippets
    from model.encoder import Encoder
    from model.encoding_cache import EncodingCache, encode_with_cache

    torch.set_num_threads(1)
    try:
        encoder = Encoder()
        movies = movie_snippets().sample(700, seed=11)
        tweets = airline_tweets().sample(700, seed=11)
    except (OSError, RuntimeError) as exc:  # pragma: no cover - depends on the install
        pytest.skip(f"offline encoder or data packages missing: {exc}")
    cache = EncodingCache(Path(os.path.expanduser(REAL_DATA_CACHE)))
    labels = ["Negative", "Positive"]
    out = {}
    for name, texts in (("movies", movies), ("tweets", tweets)):
        layers, _ = encode_with_cache(encoder, cache, texts.texts, all_layers=True)
        out[name] = (layers, np.array([labels.index(label) for label in texts.labels]))
    return out


def _state(movies_and_tweets, labeled_tweets: int, seed: int = 0):
    """Classifier trained on 500 movie snippets (+ some tweets); the other tweets are the pool."""
    movie_layers, movie_y = movies_and_tweets["movies"]
    tweet_layers, tweet_y = movies_and_tweets["tweets"]
    labeled_layers = np.concatenate([movie_layers[:500], tweet_layers[:labeled_tweets]])
    labeled_y = np.concatenate([movie_y[:500], tweet_y[:labeled_tweets]])
    pool_layers, pool_y = tweet_layers[labeled_tweets:], tweet_y[labeled_tweets:]
    classifier = ClassifierHead(HeadConfig(labels=["Negative", "Positive"], input_dim=384, seed=seed))
    classifier.fit(labeled_layers[:, -1], labeled_y)
    data = OrderingInput.from_all_layers(labeled_layers, labeled_y, pool_layers, classifier,
                                         batch_size=50, seed=seed)
    return data, pool_y


@pytest.mark.parametrize("labeled_tweets", [0, 100])
def test_predicted_incorrect_finds_pool_errors_at_least_as_well_as_least_confidence(
    movies_and_tweets, labeled_tweets
):
    from sklearn.metrics import roc_auc_score

    data, pool_y = _state(movies_and_tweets, labeled_tweets)
    wrong = data.classifier.predict_proba(data.features_unlabeled).argmax(1) != pool_y
    assert 0.05 < wrong.mean() < 0.6
    least = get_ordering("least_confidence").score(data)
    predicted = get_ordering("predicted_incorrect").score(data)
    assert predicted.info["fallback"] is None
    least_auc = roc_auc_score(wrong, -least.scores)
    predicted_auc = roc_auc_score(wrong, -predicted.scores)
    print(f"error-detection AUC with {labeled_tweets} labeled tweets: predicted_incorrect "
          f"{predicted_auc:.4f}, least_confidence {least_auc:.4f}, info {predicted.info}")
    assert least_auc > 0.65  # both actually find errors
    # "At least as well": equal is fine. The 1e-4 is float resolution, not slack: P(Correct)
    # rounds to exactly 1.0 for tasks with P(Incorrect) < 1e-16, and those ties among the
    # most confident tasks move the AUC in the fifth decimal.
    assert predicted_auc >= least_auc - 1e-4
    # The batch served first really holds more errors than the pool does.
    assert wrong[predicted.top(50)].mean() > 1.5 * wrong.mean()


def test_domain_likeness_separates_tweets_from_held_out_movie_snippets(movies_and_tweets):
    from sklearn.metrics import roc_auc_score

    movie_layers, movie_y = movies_and_tweets["movies"]
    tweet_layers, _ = movies_and_tweets["tweets"]
    classifier = ClassifierHead(HeadConfig(labels=["Negative", "Positive"], input_dim=384))
    classifier.fit(movie_layers[:500, -1], movie_y[:500])
    # The unlabeled set mixes the application domain with movie snippets nobody labeled.
    unlabeled = np.concatenate([tweet_layers, movie_layers[500:]])
    is_tweet = np.concatenate([np.ones(len(tweet_layers)), np.zeros(len(movie_layers) - 500)])
    data = OrderingInput(
        movie_layers[:500, -1], movie_y[:500], unlabeled[:, -1], classifier,
        all_layers_labeled=movie_layers[:500], all_layers_unlabeled=unlabeled,
    )
    # The head alone (no uncertainty candidates): its scores are P(training) for every task.
    result = get_ordering("domain_likeness", class_guard=False, uncertainty_candidates=0).score(data)
    auc = roc_auc_score(is_tweet, -result.scores)  # lower score = more application-like
    print(f"domain-likeness AUC tweets vs held-out movie snippets: {auc:.4f}")
    assert auc > 0.97
    assert is_tweet[result.top(50)].all()
    # The default corrects uncertainty with it: the batch comes from the 200 least confident
    # tasks, most application-like first, so it holds more tweets than those 200 do.
    from model.orderings.least_confidence import least_confidence_score

    default = get_ordering("domain_likeness", class_guard=False).score(data)
    assert default.info["uncertainty_candidates"] == 200
    uncertain = np.argsort(least_confidence_score(classifier.predict_proba(unlabeled[:, -1])),
                           kind="stable")[:200]
    batch = default.top(50)
    assert set(batch) <= set(uncertain)
    assert list(batch) == list(uncertain[np.argsort(result.scores[uncertain], kind="stable")][:50])
    assert is_tweet[batch].mean() >= is_tweet[uncertain].mean()
    with pytest.raises(ValueError, match="all_layers"):
        get_ordering("domain_likeness").score(
            OrderingInput(movie_layers[:500, -1], movie_y[:500], unlabeled[:, -1], classifier)
        )


@pytest.mark.parametrize("labeled_tweets", [0, 100])
def test_an_atlas_batch_is_more_diverse_than_the_top_of_predicted_incorrect(
    movies_and_tweets, labeled_tweets
):
    # Three paired seeds (classifier initialisation and the orderings' seed): a single batch
    # of 50 is a noisy sample of an ordering's diversity.
    atlas_similarity, predicted_similarity, built = [], [], []
    for seed in range(3):
        data, _ = _state(movies_and_tweets, labeled_tweets, seed=seed)
        atlas = get_ordering("atlas").score(data)
        predicted = get_ordering("predicted_incorrect").score(data)
        assert atlas.info["fallback"] is None and atlas.batch is not None
        built.append(len(atlas.batch))
        atlas_similarity.append(_mean_pairwise_cosine(data.features_unlabeled[atlas.top(50)]))
        predicted_similarity.append(_mean_pairwise_cosine(data.features_unlabeled[predicted.top(50)]))
    print(f"mean pairwise cosine of the first 50, {labeled_tweets} labeled tweets: atlas "
          f"{np.round(atlas_similarity, 4)} (built in rounds: {built}), predicted_incorrect "
          f"{np.round(predicted_similarity, 4)}")
    assert np.mean(atlas_similarity) < np.mean(predicted_similarity)
    assert sum(a < p for a, p in zip(atlas_similarity, predicted_similarity)) >= 2


@pytest.mark.parametrize("labeled_tweets", [0, 100])
def test_no_batch_is_all_one_predicted_class(movies_and_tweets, labeled_tweets):
    data, _ = _state(movies_and_tweets, labeled_tweets)
    predicted = data.classifier.predict_proba(data.features_unlabeled).argmax(1)
    assert len(np.unique(predicted)) > 1
    for name in NAMES:
        result = get_ordering(name).score(data)
        batch = result.top(data.batch_size)
        assert len(batch) == data.batch_size
        classes = np.unique(predicted[batch])
        print(f"{name}: batch predicted classes {dict(zip(*np.unique(predicted[batch], return_counts=True)))}")
        assert len(classes) > 1, name
        # Label Studio serves by ascending score: the batch is what it serves first.
        assert set(np.argsort(result.scores, kind="stable")[: data.batch_size]) == set(batch)


# ---------------------------------------------------------------- few errors (issue 17)


def test_the_prior_head_is_least_confidence_without_evidence_and_moves_with_it():
    from model.orderings.transfer import ErrorTrainingSet, prior_head

    rng = np.random.default_rng(4)
    offset = rng.normal(-2.0, 1.0, size=60)
    features = rng.normal(size=(60, 3))
    incorrect = np.zeros(60, dtype=bool)
    incorrect[:4] = True
    features[:4, 0] = 3.0  # the few errors share a region of feature 0
    pool = np.array([[3.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    pool_offset = np.array([-2.0, -2.0])  # equally confident
    training = ErrorTrainingSet(features, incorrect, np.ones(60), pool, {}, offset, pool_offset)
    head = prior_head(training, 0.01)
    # The prior is kept as it is: slope 1 (the intercept moves no ranking); only shrunk
    # weights learn.
    assert head.slope == 1.0
    assert 0 < np.abs(head.coef).max() < 5
    logits = head.positive_logit(pool, pool_offset)
    assert logits[0] > logits[1]  # like the errors: more likely incorrect than least confidence says
    # Labeled tasks that weigh nothing (all unlike the pool): exactly the offset's ranking.
    silent = ErrorTrainingSet(features, incorrect, np.full(60, 1e-9), pool, {}, offset, pool_offset)
    ranking = prior_head(silent, 0.01).positive_logit(features, offset)
    assert np.array_equal(np.argsort(ranking, kind="stable"), np.argsort(offset, kind="stable"))
    # By predicted class: tasks predicted as class 1, wrong more often than their confidence
    # says, move ahead of equally confident tasks predicted as class 0.
    classes = np.eye(2)[np.r_[np.ones(10, int), np.zeros(50, int)]]
    wrong_of_one = np.zeros(60, dtype=bool)
    wrong_of_one[:5] = True  # half of the class-1 predictions, none of class 0
    by_class = ErrorTrainingSet(features, wrong_of_one, np.ones(60), pool, {}, np.full(60, -2.0), pool_offset,
                                labeled_classes=classes, pool_classes=np.eye(2)[[1, 0]])
    head = prior_head(by_class, 1.0, by_class=True)
    assert head.coef[1] > head.coef[0]
    assert np.diff(head.positive_logit(by_class.pool_classes, pool_offset))[0] < 0


def test_few_errors_are_learned_from_unless_the_old_fallback_is_asked_for():
    x, y = _hard_region_data(260, seed=0)
    classifier = _head(x.shape[1]).fit(x[:60], y[:60])
    data = OrderingInput(x[:60], y[:60], x[60:], classifier, batch_size=20,
                         params={"domain_weighting": False, "class_guard": False})
    least = least_confidence_score(classifier.predict_proba(x[60:]))
    for name in ("predicted_incorrect", "atlas"):
        acting = get_ordering(name).score(data)
        assert acting.info["fallback"] is None, acting.info
        assert acting.info["labeled_incorrect"] < 30  # below what the cross-validated head needs
        assert acting.info["correction"].startswith("prior")
        assert not np.array_equal(np.argsort(acting.scores, kind="stable"), np.argsort(least, kind="stable"))
        old = get_ordering(name, few_errors="least_confidence", min_incorrect=10_000).score(data)
        assert old.info["fallback"] == "least_confidence"
        assert np.allclose(old.scores, least)
    # Below `min_prior_incorrect` even the prior head falls back.
    result = get_ordering("predicted_incorrect", min_prior_incorrect=1000).score(data)
    assert result.info["fallback"] == "least_confidence"
    # The new parameters are checked by type and range like the others.
    _, warnings = get_ordering("atlas").resolve(OrderingInput(None, None, None, None, params={
        "few_errors": "sometimes", "prior_regularization": -1.0, "min_prior_incorrect": 0}))
    assert len(warnings) == 3
