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
