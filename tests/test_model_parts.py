"""The model half on plain arrays and real files: head, encoding cache, model store."""

import numpy as np
import pytest

from backend.ml_backend import BadRequest, project_id_from_ls
from backend.model_store import ModelStore, version_number
from model.classifier import ClassifierHead, HeadConfig, class_weights
from model.encoding_cache import EncodingCache


def _blobs(n_per_class=(60, 15), dim=16, seed=0):
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for label, n in enumerate(n_per_class):
        center = np.zeros(dim)
        center[label] = 3.0
        xs.append(rng.normal(center, 1.0, size=(n, dim)))
        ys += [label] * n
    return np.vstack(xs).astype(np.float32), np.array(ys)


def test_class_weights_balance_an_imbalanced_set():
    weights = class_weights(np.array([0, 0, 0, 1]), 3)
    assert weights[2] == 0  # an absent class gets no weight
    assert weights[0] * 3 == pytest.approx(weights[1] * 1)


def test_head_learns_separable_classes_and_exposes_its_hidden_layer(tmp_path):
    x, y = _blobs()
    head = ClassifierHead(HeadConfig(labels=["a", "b"], input_dim=16, hidden_dim=32)).fit(x, y)
    probabilities = head.predict_proba(x)
    assert probabilities.shape == (75, 2)
    assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    assert (probabilities.argmax(axis=1) == y).mean() > 0.95
    # The minority class is not sacrificed to the prior.
    assert (probabilities.argmax(axis=1)[y == 1] == 1).mean() > 0.9
    assert head.hidden(x).shape == (75, 32)

    head.save(tmp_path)
    again = ClassifierHead.load(tmp_path)
    assert np.allclose(again.predict_proba(x), probabilities, atol=1e-6)


def test_head_training_is_reproducible():
    x, y = _blobs()
    a = ClassifierHead(HeadConfig(labels=["a", "b"], input_dim=16, seed=3)).fit(x, y).predict_proba(x)
    b = ClassifierHead(HeadConfig(labels=["a", "b"], input_dim=16, seed=3)).fit(x, y).predict_proba(x)
    assert np.array_equal(a, b)


def test_encoding_cache_round_trip_and_missing(tmp_path):
    cache = EncodingCache(tmp_path / "enc.sqlite3")
    vectors = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    cache.store("enc-a", ["one", "two", "three"], vectors)
    found, missing = cache.lookup("enc-a", ["two", "four", "one"])
    assert missing == [1]
    assert np.allclose(found[0], vectors[1], atol=1e-2)
    assert np.allclose(found[2], vectors[0], atol=1e-2)
    assert not found[1].any()
    # Another encoder has its own keys.
    assert cache.lookup("enc-b", ["one"]) == (None, [0])
    assert cache.count("enc-a") == 3


def test_model_store_publishes_whole_versions_only(tmp_path):
    store = ModelStore(tmp_path, keep=2)
    x, y = _blobs(dim=8)
    head = ClassifierHead(HeadConfig(labels=["a", "b"], input_dim=8)).fit(x, y)
    assert store.current_version(7) is None and store.load(7) is None
    first = store.stage(7, head, {"label_config": {}})
    # Staged but not activated: /predict still has nothing.
    assert store.current_version(7) is None
    store.activate(7, first)
    second = store.stage(7, head, {"label_config": {}})
    assert version_number(second) == version_number(first) + 1
    assert store.current_version(7) == first
    store.activate(7, second)
    third = store.stage(7, head, {"label_config": {}})
    store.activate(7, third)
    assert store.versions(7) == [second, third]  # keep=2 pruned the oldest
    assert store.load(7).version == third
    assert not list((tmp_path / "7").glob(".staging-*"))
    with pytest.raises(FileNotFoundError):
        store.activate(7, "v9999-20260101-000000")


@pytest.mark.parametrize("value, expected", [("12.1700000000", 12), (12, 12), ({"id": 3}, 3), ("4", 4)])
def test_project_ids_as_label_studio_sends_them(value, expected):
    assert project_id_from_ls(value) == expected


@pytest.mark.parametrize("value", [None, "", "abc", "-1.5", True, 0, "1e9999", [1]])
def test_bad_project_ids_are_rejected(value):
    with pytest.raises(BadRequest):
        project_id_from_ls(value)


# ---------------------------------------------------------------- several controls

from model.classifier import MultiLabelHead, choose_thresholds, positive_weights  # noqa: E402
from model.heads import (  # noqa: E402
    ControlHeads,
    ControlSpec,
    answered,
    concat_inputs,
    encode_targets,
    labeled_tasks,
    train_heads,
)


def test_thresholds_maximise_f1_per_choice_and_keep_the_default_without_evidence():
    rng = np.random.default_rng(0)
    truth = np.zeros((60, 3), dtype=int)
    truth[:20, 0] = 1
    truth[:2, 1] = 1  # two positives: too few to fit a threshold to
    truth[30:, 2] = 1
    p = np.zeros((60, 3))
    p[:, 0] = np.where(truth[:, 0] == 1, rng.uniform(0.21, 0.35, 60), rng.uniform(0.0, 0.14, 60))
    p[:, 1] = rng.uniform(0, 1, 60)
    p[:, 2] = np.where(truth[:, 2] == 1, rng.uniform(0.75, 0.95, 60), rng.uniform(0.3, 0.6, 60))
    p[0, 2] = 0.61  # a negative just above 0.6
    thresholds = choose_thresholds(p, truth, objective="f1")
    # Choice 0: F1 = 1 anywhere in (0.14, 0.21]; of the candidates 0.15 and 0.2, the one
    # closer to 0.5. Choice 2: F1 = 1 in (0.61, 0.75]: 0.65 .. 0.75, and 0.65 is closest.
    assert thresholds.tolist() == [0.2, 0.5, 0.65]


def test_thresholds_by_accuracy_keep_a_rare_choice_from_being_said_yes_to_too_often():
    # A rare choice: 3 positives at 0.6, and 3 positives mixed with 4 negatives at 0.27; the
    # other 50 negatives at 0.02. Saying yes at 0.27 finds every positive (F1 0.75 against
    # 0.67) but is wrong on 4 tasks instead of 3: F1 takes 0.25 (closest to 0.5 of 0.05-0.25),
    # accuracy 0.5 (closest to 0.5 of 0.3-0.6).
    truth = np.zeros((60, 1), dtype=int)
    truth[:6, 0] = 1
    p = np.full((60, 1), 0.02)
    p[:3, 0] = 0.6
    p[3:10, 0] = 0.27
    assert choose_thresholds(p, truth, objective="f1").tolist() == [0.25]
    assert choose_thresholds(p, truth).tolist() == [0.5]  # accuracy is the default
    with pytest.raises(ValueError, match="threshold objective"):
        choose_thresholds(p, truth, objective="recall")


def test_positive_weights_balance_each_choice():
    targets = np.array([[1, 0, 1], [0, 0, 1], [0, 0, 1], [0, 0, 1]])
    assert positive_weights(targets).tolist() == [3.0, 1.0, 1.0]  # no positive / no negative: 1


def _multi_label_data(n=300, dim=10, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    y = np.column_stack([x[:, 0] > 0, x[:, 1] > 0.8, (x[:, 2] + x[:, 3]) > 0]).astype(np.int8)
    return x, y


def test_multi_label_head_learns_each_choice_and_always_picks_one():
    x, y = _multi_label_data()
    head = MultiLabelHead(HeadConfig(labels=["a", "b", "c"], input_dim=10, hidden_dim=32)).fit(x[:200], y[:200])
    p = head.predict_proba(x[200:])
    assert p.shape == (100, 3) and (p >= 0).all() and (p <= 1).all()
    chosen = head.predict(p)
    assert chosen.dtype == bool and chosen.any(axis=1).all()
    accuracy = (chosen == y[200:].astype(bool)).mean(axis=0)
    majority = np.maximum(y[200:].mean(axis=0), 1 - y[200:].mean(axis=0))
    assert (accuracy > 0.8).all() and (accuracy > majority + 0.1).all(), (accuracy, majority)
    with pytest.raises(ValueError, match="0/1 matrix"):
        head.fit(x, y[:, 0])


def _two_controls(n=240, seed=0):
    """A single-choice "topic" (3 classes) on one object and a multi-label "flags" on two,
    each answered on part of the tasks only."""
    x, flags = _multi_label_data(n, seed=seed)
    rng = np.random.default_rng(seed + 1)
    title, body = x[:, :5], x[:, 5:]
    topic = np.digitize(x[:, 4], [-0.5, 0.5])
    specs = [ControlSpec("topic", ["t0", "t1", "t2"], inputs=["title"]),
             ControlSpec("flags", ["a", "b", "c"], multi_label=True, inputs=["title", "body"])]
    objects = {"title": title, "body": body}
    features = [concat_inputs(objects, s.inputs) for s in specs]
    answers_topic = [f"t{v}" if rng.random() < 0.7 else None for v in topic]
    answers_flags = [frozenset(np.array(["a", "b", "c"])[row.astype(bool)]) or None
                     if rng.random() < 0.6 else None for row in flags]
    answers_topic[-60:] = [None] * 60
    answers_flags[-60:] = [None] * 60  # an unlabeled pool
    targets = [encode_targets(specs[0], answers_topic), encode_targets(specs[1], answers_flags)]
    return specs, features, targets, topic, flags


def test_targets_and_inputs_of_several_controls():
    spec = ControlSpec("flags", ["a", "b", "c"], multi_label=True)
    targets = encode_targets(spec, [frozenset({"a", "c"}), None, {"b"}])
    assert targets.tolist() == [[1, 0, 1], [-1, -1, -1], [0, 1, 0]]
    assert answered(targets).tolist() == [True, False, True]
    single = encode_targets(ControlSpec("t", ["x", "y"]), ["y", None, "x"])
    assert single.tolist() == [1, -1, 0]
    assert labeled_tasks([single, encode_targets(spec, [None, {"a"}, None])]).tolist() == [0, 1, 2]
    objects = {"title": np.ones((3, 2)), "body": np.zeros((3, 4))}
    assert concat_inputs(objects, ["title", "body"]).shape == (3, 6)
    assert concat_inputs(objects, ["body"]) is objects["body"]


def test_a_head_trains_only_on_the_tasks_that_answer_it():
    specs, features, targets, _, _ = _two_controls()
    heads = ControlHeads.build(specs, [f.shape[1] for f in features], hidden_dim=16, epochs=40).fit(features, targets)
    rows = answered(targets[1])
    alone = MultiLabelHead(heads.heads[1].config).fit(features[1][rows], targets[1][rows])
    assert np.array_equal(alone.predict_proba(features[1]), heads.heads[1].predict_proba(features[1]))


def test_train_heads_runs_one_out_of_fold_pass_sets_thresholds_and_saves_all_heads_together(tmp_path):
    specs, features, targets, topic, flags = _two_controls()
    labeled = labeled_tasks(targets)
    heads, oof = train_heads(specs, features, targets, labeled, folds=4, hidden_dim=16, epochs=60)
    assert oof.folds == 4 and len(oof.probabilities) == 2
    for p, h, scored, t in zip(oof.probabilities, oof.hidden, oof.scored, targets):
        assert len(p) == len(h) == len(labeled)
        assert np.array_equal(scored, answered(t[labeled]))  # unanswered rows: the final head
    # Out-of-fold predictions of the single-choice head are mostly right, not memorised.
    rows = oof.scored[0]
    accuracy = (oof.probabilities[0][rows].argmax(1) == targets[0][labeled][rows]).mean()
    assert 0.6 < accuracy < 1.0
    thresholds = heads.heads[1].thresholds_
    assert thresholds.shape == (3,) and ((thresholds >= 0.05) & (thresholds <= 0.95)).all()
    assert not np.allclose(thresholds, 0.5)  # chosen from the out-of-fold pass

    heads.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heads.json", "heads.safetensors"]
    again = ControlHeads.load(tmp_path)
    assert [s.name for s in again.specs] == ["topic", "flags"] and again.specs[1].multi_label
    assert np.array_equal(again.heads[1].thresholds_, thresholds)
    for a, b in zip(again.predict_proba(features), heads.predict_proba(features)):
        assert np.allclose(a, b, atol=1e-6)
    answers = again.answers(again.predict_proba([f[:2] for f in features]))
    assert set(answers[0]) == {"topic", "flags"} and isinstance(answers[0]["flags"], list)
    assert answers[0]["flags"] and answers[0]["topic"] in ("t0", "t1", "t2")
    topic_p, flags_p = again.predict_proba(features)
    expected = np.minimum(topic_p.max(axis=1), np.maximum(flags_p, 1 - flags_p).min(axis=1))
    assert np.allclose(again.confidence([topic_p, flags_p]), expected)


def test_a_version_saved_as_one_classifier_head_loads_as_one_control(tmp_path):
    x, y = _blobs()
    head = ClassifierHead(HeadConfig(labels=["a", "b"], input_dim=16)).fit(x, y)
    head.save(tmp_path)
    heads = ControlHeads.load(tmp_path, single_name="sentiment")
    assert len(heads) == 1 and heads.specs[0].labels == ["a", "b"] and not heads.specs[0].multi_label
    assert heads.names == ["sentiment"]
    assert np.array_equal(heads.predict_proba([x])[0], head.predict_proba(x))
    assert np.array_equal(heads.confidence(heads.predict_proba([x])), head.predict_proba(x).max(axis=1))
