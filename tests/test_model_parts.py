"""The model half on plain arrays and real files: head, encoding cache, model store."""

import numpy as np
import pytest

from backend.model_store import ModelStore, version_number
from backend.ml_backend import BadRequest, project_id_from_ls
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
