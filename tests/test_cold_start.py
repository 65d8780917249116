"""Cold start (model/cold_start.py) on plain numpy arrays."""

import numpy as np
import pytest

from model import cold_start


def _blobs(sizes, dim=8, spread=0.05, seed=0):
    """Tight clusters around random unit directions; the label of each row is its blob."""
    rng = np.random.default_rng(seed)
    centres = cold_start.normalise(rng.normal(size=(len(sizes), dim)))
    rows = np.concatenate([centres[i] + spread * rng.normal(size=(n, dim)) for i, n in enumerate(sizes)])
    labels = np.repeat(np.arange(len(sizes)), sizes)
    return rows, labels, centres


def test_the_first_picks_are_one_central_task_of_each_cluster_largest_first():
    x, blob, centres = _blobs([60, 30, 10])
    result = cold_start.representative_order(x, n_clusters=3, seed=1)
    assert sorted(result.order) == list(range(len(x)))  # a permutation of every task
    first = result.order[:3]
    assert list(blob[first]) == [0, 1, 2]  # one per cluster, the largest cluster's turn first
    for pick in first:  # each is the member nearest its blob's centre
        own = np.flatnonzero(blob == blob[pick])
        cosines = cold_start.normalise(x[own]) @ centres[blob[pick]]
        assert own[cosines.argmax()] == pick or cosines.max() - cosines[own == pick][0] < 1e-3
    # Round-robin: the next three again come one from each cluster.
    assert sorted(blob[result.order[3:6]]) == [0, 1, 2]
    # Once the small cluster is used up, the others keep alternating.
    tail = blob[result.order[30:50]]
    assert set(tail) == {0, 1} and abs((tail == 0).sum() - (tail == 1).sum()) <= 1
    assert result.ranks()[result.order[0]] == 0 and result.ranks()[result.order[-1]] == len(x) - 1


def test_random_order_would_miss_the_small_cluster_that_the_representative_order_finds():
    x, blob, _ = _blobs([190, 8, 2], seed=4)
    result = cold_start.representative_order(x, n_clusters=3, seed=0)
    assert set(blob[result.order[:3]]) == {0, 1, 2}


def test_degenerate_pools_still_give_a_permutation():
    assert len(cold_start.representative_order(np.zeros((0, 4))).order) == 0
    one = cold_start.representative_order(np.ones((1, 4)))
    assert list(one.order) == [0] and list(one.clusters) == [0]
    same = cold_start.representative_order(np.ones((5, 4)), n_clusters=3)  # one distinct point
    assert sorted(same.order) == list(range(5))
    small = cold_start.representative_order(np.eye(4), n_clusters=50)  # more clusters than tasks
    assert sorted(small.order) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="n_clusters"):
        cold_start.representative_order(np.eye(4), n_clusters=0)


def test_a_guess_interleaves_the_clusters_turns_by_guessed_class():
    # Four clusters: the two largest both guessed class 0, the two smaller class 1.
    x, blob, _ = _blobs([50, 40, 20, 10], seed=2)
    guess = np.where(blob < 2, 0, 1)
    plain = cold_start.representative_order(x, n_clusters=4, seed=0)
    mixed = cold_start.representative_order(x, n_clusters=4, seed=0, guess=guess)
    assert list(guess[plain.order[:4]]) == [0, 0, 1, 1]
    assert list(guess[mixed.order[:4]]) == [0, 1, 0, 1]
    assert sorted(mixed.order) == list(range(len(x)))
    # The clustering of one call serves another on the same features.
    clustering = (mixed.clusters, cold_start.kmeans_centroids(x, mixed.clusters))
    again = cold_start.representative_order(x, n_clusters=4, guess=guess, clustering=clustering)
    assert list(again.order) == list(mixed.order)


def test_zero_shot_guesses_the_nearest_name_and_sums_to_one():
    names = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    texts = np.array([[0.9, 0.1, 0.3], [0.2, 0.8, 0.0], [0.0, 0.0, 1.0]])
    p = cold_start.zero_shot(texts, names)
    assert p.shape == (3, 2) and np.allclose(p.sum(axis=1), 1.0)
    assert list(p.argmax(axis=1)[:2]) == [0, 1]
    assert p[2, 0] == pytest.approx(0.5)  # equally far from both: no preference
    # Scale does not matter (cosine), and a sharper temperature only sharpens.
    assert np.allclose(cold_start.zero_shot(10 * texts, names), p)
    soft = cold_start.zero_shot(texts, names, temperature=1.0)
    assert 0.5 < soft[0, 0] < p[0, 0] and list(soft.argmax(axis=1)[:2]) == [0, 1]
    with pytest.raises(ValueError, match="temperature"):
        cold_start.zero_shot(texts, names, temperature=0)


def test_zero_shot_order_takes_turns_over_guessed_classes_surest_first():
    p = np.array([[0.9, 0.1], [0.6, 0.4], [0.8, 0.2], [0.3, 0.7], [0.55, 0.45]])
    # Class 0 is guessed for 4 tasks (0.9, 0.8, 0.6, 0.55), class 1 for one (0.7).
    assert list(cold_start.zero_shot_order(p)) == [0, 3, 2, 1, 4]


@pytest.mark.parametrize("names, expected", [
    (["Positive", "Negative"], True),
    (["Positive", "Negative", "Neutral"], True),
    (["spam", "off-topic", "billing question"], True),
    (["Très bien", "Mauvais"], True),
    (["A", "B", "C"], False),
    (["1", "2"], False),
    (["c1", "c2"], False),
    (["LABEL_0", "LABEL_1"], False),
    (["class 1", "class 2"], False),
    (["Positive", "x"], False),  # one code among words: no guess for any
    (["Good", "good!"], False),  # the same word twice
    (["Positive"], False),
])
def test_names_are_words(names, expected):
    assert cold_start.names_are_words(names) is expected


def test_each_name_gets_every_template_and_one_mean_vector():
    sentences = cold_start.sentences_for([" Positive ", "off-topic"])
    assert sentences == ["Positive", "off-topic", "This text is about Positive.", "This text is about off-topic."]
    assert cold_start.sentences_for(["x"], ("{name}",)) == ["x"]
    encoded = np.array([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [0.0, 1.0]])  # Positive twice, off-topic twice
    vectors = cold_start.name_vectors(encoded, 2)
    assert np.allclose(vectors, [[0.5, 0.5], [0.0, 1.0]])
    with pytest.raises(ValueError, match="names"):
        cold_start.name_vectors(encoded[:3], 2)


# -- the service side (backend/cold_start.py): what it publishes, on plain arrays ------------

THREE_CONTROLS = """<View>
  <Text name="title" value="$title"/>
  <Text name="body" value="$body"/>
  <Choices name="sentiment" toName="body" choice="single">
    <Choice value="Positive"/><Choice value="Negative"/>
  </Choices>
  <Choices name="grade" toName="title,body" choice="single">
    <Choice value="A"/><Choice value="B"/>
  </Choices>
  <Choices name="topics" toName="title" choice="multiple">
    <Choice value="billing"/><Choice value="delay"/><Choice value="food"/>
  </Choices>
</View>"""


def _project(n=30, seed=0):
    from backend.label_config import parse_label_config
    from backend.training_data import project_data

    config = parse_label_config(THREE_CONTROLS)
    tasks = [{"id": 100 + i, "data": {"title": f"t{i}", "body": f"b{i}"}} for i in range(n)]
    data = project_data(tasks, config)
    rng = np.random.default_rng(seed)
    vectors = {"title": rng.normal(size=(n, 6)), "body": rng.normal(size=(n, 6))}
    return config, data, vectors


def test_plan_guesses_only_the_controls_with_word_names_and_ranks_every_task():
    from backend.cold_start import plan

    config, data, vectors = _project()
    worded = {c.name: np.eye(6)[:len(c.choices)] for c in config.controls
              if cold_start.names_are_words(c.choices)}
    assert sorted(worded) == ["sentiment", "topics"]  # "A"/"B" are codes: no guess
    for order in cold_start.ORDERS:
        ranks, guesses = plan(config, data, vectors, worded, order, seed=3)
        assert sorted(ranks) == list(range(30)), order
        assert sorted(guesses) == ["sentiment", "topics"]
        # The sentiment guess is the nearest name to the body's vector (its one input).
        expected = cold_start.zero_shot(vectors["body"], worded["sentiment"]).argmax(axis=1)
        assert list(guesses["sentiment"]) == list(expected)
    # The zero-shot order serves the guessed classes of the first control in turn.
    ranks, guesses = plan(config, data, vectors, worded, "zero_shot")
    first_two = np.argsort(ranks)[:2]
    assert guesses["sentiment"][first_two[0]] != guesses["sentiment"][first_two[1]]
    # With no control to guess for, a zero-shot order falls back to k-means.
    ranks_none, none = plan(config, data, vectors, {}, "zero_shot")
    assert none == {} and sorted(ranks_none) == list(range(30))


def test_no_cold_start_once_the_project_has_annotations_or_a_model(tmp_path):
    from backend.cold_start import is_cold_start_version, why_not
    from backend.label_config import parse_label_config
    from backend.model_store import ModelStore
    from backend.settings import Settings
    from backend.training_data import project_data

    store = ModelStore(tmp_path)
    config, data, _ = _project(n=4)
    assert why_not(Settings(), store, 1, data) is None
    assert "COLD_START" in why_not(Settings(cold_start=False), store, 1, data)
    annotated = project_data([{"id": 1, "data": {"title": "t", "body": "b"}, "annotations": [
        {"id": 9, "result": [{"from_name": "sentiment", "to_name": "body", "type": "choices",
                              "value": {"choices": ["Positive"]}}]}]}], parse_label_config(THREE_CONTROLS))
    assert "annotations" in why_not(Settings(), store, 1, annotated)
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "CURRENT").write_text("v0001-20261201-000000")
    assert "model" in why_not(Settings(), store, 1, data)
    assert is_cold_start_version("cold-start-3") and not is_cold_start_version("cold-start-x")
    assert not is_cold_start_version("v0001-20261201-000000")


def test_an_unknown_cold_start_order_stops_the_backend_with_the_choices():
    from backend.settings import Settings

    with pytest.raises(SystemExit, match="COLD_START_ORDER.*kmeans, zero_shot"):
        Settings.from_env(cold_start_order="clever")


IMAGE_AND_TEXT = """<View>
  <Image name="photo" value="$photo"/>
  <Text name="caption" value="$caption"/>
  <Choices name="kind" toName="photo"><Choice value="Shirt"/><Choice value="Sandal"/></Choices>
  <Choices name="tone" toName="caption"><Choice value="Positive"/><Choice value="Negative"/></Choices>
  <Choices name="both" toName="photo,caption"><Choice value="Keep"/><Choice value="Drop"/></Choices>
</View>"""


def test_an_image_project_is_ordered_by_its_image_vectors_and_only_text_controls_are_guessed():
    """A choice name's text vector cannot be compared with an image network's vector: only
    `tone`, which reads the caption alone, gets a zero-shot guess. The order is k-means over
    every object's vectors, the image's included; an image-only project is ordered by its
    images' vectors alone."""
    from backend.cold_start import guessable, plan
    from backend.label_config import parse_label_config
    from backend.training_data import project_data

    def ranks_of(order):
        ranks = np.empty(len(order), dtype=np.int64)
        ranks[order] = np.arange(len(order))
        return ranks

    config = parse_label_config(IMAGE_AND_TEXT)
    assert [c.name for c in guessable(config)] == ["tone"]
    n = 40
    tasks = [{"id": 500 + i, "data": {"photo": f"/data/upload/1/{i}.jpg", "caption": f"c{i}"}} for i in range(n)]
    data = project_data(tasks, config)
    rng = np.random.default_rng(5)
    photos, captions = rng.normal(size=(n, 8)), rng.normal(size=(n, 6))
    ranks, guesses = plan(config, data, {"photo": photos, "caption": captions}, {"tone": np.eye(6)[:2]},
                          "kmeans", seed=2)
    both = np.c_[cold_start.normalise(photos), cold_start.normalise(captions)]
    assert list(ranks) == list(ranks_of(cold_start.representative_order(both, seed=2).order))
    assert sorted(guesses) == ["tone"]
    image_only = parse_label_config("""<View><Image name="photo" value="$photo"/>
      <Choices name="kind" toName="photo"><Choice value="Shirt"/><Choice value="Sandal"/></Choices></View>""")
    assert guessable(image_only) == []
    only = project_data([{"id": t["id"], "data": {"photo": t["data"]["photo"]}} for t in tasks], image_only)
    ranks, guesses = plan(image_only, only, {"photo": photos}, {}, "kmeans", seed=2)
    assert guesses == {}
    assert list(ranks) == list(ranks_of(cold_start.representative_order(photos, seed=2).order))
    assert list(ranks) != list(range(n))  # not id order
