"""The model side of a retrain (`model.training.train_and_score`) on its own: a real encoder,
a real encoding cache on disk, no Label Studio, Redis or web app."""

import numpy as np
import pytest

from model.datasets import airline_tweets
from model.encoder import Encoder
from model.encoding_cache import EncodingCache
from model.orderings.least_confidence import least_confidence_score
from model.queue_scores import LABELED_FLOOR
from model.training import (
    ControlLabels,
    FineTuning,
    ObjectVectors,
    OrderingChoice,
    ProjectExamples,
    train_and_score,
)

CHOICES = ("Positive", "Negative")


@pytest.fixture(scope="module")
def encoder():
    return Encoder("default", device="cpu", batch_size=16)


@pytest.fixture(scope="module")
def project():
    """200 airline tweets, 100 of each class in a shuffled order; 40 of each labeled."""
    tweets = airline_tweets()
    rng = np.random.default_rng(0)
    all_labels = np.array(tweets.labels)
    picked = rng.permutation(np.concatenate(
        [rng.choice(np.flatnonzero(all_labels == c), 100, replace=False) for c in CHOICES]))
    texts, truth = [tweets.texts[i] for i in picked], [tweets.labels[i] for i in picked]
    labels, seen = [], {label: 0 for label in CHOICES}
    for label in truth:
        keep = seen[label] < 40
        seen[label] += keep
        labels.append(label if keep else None)
    examples = ProjectExamples(task_ids=list(range(1001, 1201)), texts=texts,
                               controls={"sentiment": ControlLabels(CHOICES, labels)})
    return examples, truth


def test_one_head_per_control_scores_every_task_for_the_queue(encoder, project, tmp_path):
    examples, truth = project
    stages = []
    trained = train_and_score(
        examples, encoder, EncodingCache(tmp_path / "cache.sqlite3"),
        OrderingChoice("least_confidence", batch_size=10, params={"class_guard": False}),
        progress=lambda stage, done, total: stages.append(stage))

    assert list(trained.heads) == ["sentiment"]
    head = trained.heads["sentiment"]
    assert head.head.labels == list(CHOICES)
    assert head.labeled == 80 and head.label_counts == {"Positive": 40, "Negative": 40}
    assert head.training_accuracy >= 0.9
    assert trained.task_ids == examples.task_ids
    assert trained.encoded == len(set(examples.texts)) and trained.encoder_id == encoder.id
    assert set(trained.timings) == {"encode", "train", "score"}
    assert {"encoding", "training", "scoring"} <= set(stages)

    labels = examples.controls["sentiment"].labels
    labeled = np.array([label is not None for label in labels])
    # The head learned the task: well above chance (half of them are positive) on the 120
    # tasks nobody labeled.
    hits = [p == t for p, t, known in zip(head.predicted, truth, labeled) if not known]
    assert np.mean(hits) > 0.7, np.mean(hits)

    scores = trained.scores
    assert scores.shape == (200,) and ((scores >= 0) & (scores <= 1)).all()
    # Every unlabeled task comes before every labeled one ...
    assert scores[~labeled].max() < LABELED_FLOOR <= scores[labeled].min()
    # ... and among them, least confident first.
    confidence = least_confidence_score(head.head.predict_proba(
        _features(encoder, examples.texts)[~labeled]))
    in_queue_order = confidence[np.argsort(scores[~labeled])]
    assert (np.diff(in_queue_order) >= -1e-3).all(), in_queue_order
    assert trained.clusters.shape == (200,)
    # Only labeled tasks can have a disputed label.
    assert (trained.mislabeling[~labeled] == 0).all() and (trained.mislabeling >= 0).all()
    assert trained.mislabeled == int((trained.mislabeling > 0).sum())


def test_a_second_retrain_reads_the_cache_and_gives_the_same_scores(encoder, project, tmp_path):
    examples, _ = project
    cache = EncodingCache(tmp_path / "cache.sqlite3")
    choice = OrderingChoice("margin", batch_size=10)
    first = train_and_score(examples, encoder, cache, choice)
    again = train_and_score(examples, encoder, cache, choice, centroids=first.centroids)
    assert first.encoded == len(set(examples.texts)) and again.encoded == 0
    assert np.array_equal(first.scores, again.scores)
    assert np.array_equal(first.clusters, again.clusters)
    assert again.heads["sentiment"].predicted == first.heads["sentiment"].predicted


def test_fine_tuning_gives_the_version_its_own_encoder(encoder, project, tmp_path):
    """FINE_TUNE_LAYERS > 0: the top layer trains with the head, is saved where the caller
    said, and every text is encoded again under the fine-tuned encoder's own cache id."""
    examples, _ = project
    small = ProjectExamples(examples.task_ids[:40], examples.texts[:40],
                            {"sentiment": ControlLabels(CHOICES, examples.controls["sentiment"].labels[:40])})
    cache = EncodingCache(tmp_path / "cache.sqlite3")
    stages = []
    trained = train_and_score(small, encoder, cache, OrderingChoice(batch_size=5),
                              fine_tuning=FineTuning(1, tmp_path / "tuned"),
                              progress=lambda stage, done, total: stages.append(stage))
    assert trained.encoder_dir == tmp_path / "tuned" and (tmp_path / "tuned" / "config.json").is_file()
    assert trained.encoder_id.startswith(encoder.id + "+ft-")
    assert trained.encoded == len(set(small.texts)) and cache.count(trained.encoder_id) == trained.encoded
    assert cache.count(encoder.id) == 0  # the base encoder never ran
    assert set(trained.timings) == {"train", "encode_fine_tuned", "score"}
    assert {"fine-tuning the encoder", "encoding with the fine-tuned encoder"} <= set(stages)
    assert trained.heads["sentiment"].labeled == small.labeled > 0


def test_project_examples_refuse_what_cannot_be_trained(encoder, tmp_path):
    with pytest.raises(ValueError, match="not among the control's choices"):
        ControlLabels(CHOICES, ["Positive", "Neutral"])
    with pytest.raises(ValueError, match="2 task ids but 1 texts"):
        ProjectExamples([1, 2], ["a"], {"sentiment": ControlLabels(CHOICES, [None, None])})
    with pytest.raises(ValueError, match="has 1 labels for 2 tasks"):
        ProjectExamples([1, 2], ["a", "b"], {"sentiment": ControlLabels(CHOICES, ["Positive"])})

    cache = EncodingCache(tmp_path / "cache.sqlite3")
    unlabeled = ProjectExamples([1, 2], ["a", "b"], {"sentiment": ControlLabels(CHOICES, [None, None])})
    assert unlabeled.labeled == 0
    with pytest.raises(ValueError, match="nothing to train on"):
        train_and_score(unlabeled, encoder, cache, OrderingChoice())
    two = ProjectExamples([1], ["a"], {"sentiment": ControlLabels(CHOICES, ["Positive"]),
                                       "topic": ControlLabels(("film", "music"), [None])})
    assert two.labeled == 1
    with pytest.raises(ValueError, match="not among the control's choices"):
        ControlLabels(("film", "music"), [{"film", "jazz"}], multi_label=True)
    with pytest.raises(ValueError, match="reads objects"):
        ProjectExamples([1], ["a"], {"topic": ControlLabels(("film", "music"), [None], inputs=("title",))})


TAGS = ("delay", "service", "thanks")


def _two_controls(project, n=200):
    """The tweets as a two-object, two-control project: "sentiment" (single-choice) reads
    the body; "tags" (multi-label, keyword tags) reads title and body and is answered on
    only half the labeled tasks, as a conditional question would be."""
    examples, truth = project
    texts = examples.texts[:n]
    titles = [" ".join(t.split()[:4]) for t in texts]
    sentiment = examples.controls["sentiment"].labels[:n]
    tags = []
    for i, (text, label) in enumerate(zip(texts, sentiment)):
        words = text.lower()
        chosen = {tag for tag, keys in (("delay", ("delay", "late", "hour", "wait")),
                                        ("service", ("service", "staff", "agent", "rude")),
                                        ("thanks", ("thank", "great", "love")))
                  if any(k in words for k in keys)} or {"service"}
        tags.append(chosen if label is not None and i % 2 == 0 else None)
    return ProjectExamples(
        examples.task_ids[:n], texts,
        {"sentiment": ControlLabels(CHOICES, sentiment, inputs=("body",)),
         "tags": ControlLabels(TAGS, tags, multi_label=True, inputs=("title", "body"))},
        object_texts={"body": texts, "title": titles}), truth[:n]


def test_two_controls_each_train_on_the_tasks_that_answer_them(encoder, project, tmp_path):
    examples, _ = _two_controls(project)
    cache = EncodingCache(tmp_path / "cache.sqlite3")
    trained = train_and_score(examples, encoder, cache, OrderingChoice("least_confidence", batch_size=10))
    assert list(trained.heads) == ["sentiment", "tags"]
    sentiment, tags = trained.heads["sentiment"], trained.heads["tags"]
    answered_tags = sum(label is not None for label in examples.controls["tags"].labels)
    assert sentiment.labeled == 80 and tags.labeled == answered_tags and 20 < answered_tags < 60
    assert trained.labeled == 80
    # One encoding per object and task: 200 bodies and 200 titles, each distinct text once.
    assert trained.encoded == len(set(examples.texts) | set(examples.objects["title"]))
    assert trained.control_heads.names == ["sentiment", "tags"]
    assert trained.control_heads.heads[1].config.input_dim == 2 * encoder.dim
    # Multi-label: every task gets at least one tag, each one of the control's choices.
    assert all(isinstance(p, list) and p and set(p) <= set(TAGS) for p in tags.predicted)
    assert all(p in CHOICES for p in sentiment.predicted)
    assert tags.label_counts["service"] > 0 and tags.training_accuracy > 0.5
    labeled = np.array([a is not None for a in examples.controls["sentiment"].labels])
    assert trained.scores[~labeled].max() < LABELED_FLOOR <= trained.scores[labeled].min()
    assert trained.answers(0).keys() == {"sentiment", "tags"}

    # Stopping: each control chained on its own, combined so the worst control decides.
    signals, reference = trained.stopping(None, None, spacing=10)
    assert set(signals["controls"]) == {"sentiment", "tags"}
    assert set(reference["controls"]) == {"sentiment", "tags"} and reference["labeled"] == 80
    tag_signals = signals["controls"]["tags"]
    assert tag_signals["labeled"] == answered_tags and tag_signals["oof_n"] == answered_tags
    assert signals["oof_accuracy"] == min(s["oof_accuracy"] for s in signals["controls"].values())
    again, _ = trained.stopping(signals, reference, spacing=10)
    assert len(again["controls"]["tags"]["history"]) == 2


def test_fine_tuning_trains_every_head_with_the_encoder(encoder, project, tmp_path):
    examples, _ = _two_controls(project, n=40)
    cache = EncodingCache(tmp_path / "cache.sqlite3")
    trained = train_and_score(examples, encoder, cache, OrderingChoice(batch_size=5),
                              fine_tuning=FineTuning(1, tmp_path / "tuned"))
    assert trained.encoder_id.startswith(encoder.id + "+ft-") and cache.count(encoder.id) == 0
    assert list(trained.heads) == ["sentiment", "tags"]
    assert all(p for p in trained.heads["tags"].predicted)


def _features(encoder, texts):
    # The cache rounds vectors through float16; so does this, to see what the head saw.
    return encoder.encode(texts).astype(np.float16).astype(np.float32)


def _image_project(project, n=200, dim=24, seed=3):
    """The tweets as captions beside an image object whose vectors are given: two kinds of
    picture drawn around two centres (what an image encoder's features of two classes look
    like to a head), 30 of each labeled, and every stage's vectors wider than the top."""
    examples, truth = project
    rng = np.random.default_rng(seed)
    kinds = np.array(["Cat", "Dog"])[rng.integers(0, 2, n)]
    centres = {"Cat": rng.normal(0, 1, dim), "Dog": rng.normal(0, 1, dim)}
    features = np.stack([centres[k] + rng.normal(0, 0.6, dim) for k in kinds]).astype(np.float32)
    stages = np.concatenate([features, rng.normal(0, 1, (n, 40)).astype(np.float32)], axis=1)
    seen = {"Cat": 0, "Dog": 0}
    labels = []
    for kind in kinds:
        labels.append(kind if seen[kind] < 30 else None)
        seen[kind] += 1
    vectors = {"photo": ObjectVectors("image-encoder-x", features, stages)}
    controls = {"kind": ControlLabels(("Cat", "Dog"), labels, inputs=("photo",)),
                "sentiment": ControlLabels(CHOICES, examples.controls["sentiment"].labels[:n], inputs=("caption",))}
    urls = [f"/data/upload/1/{i}.jpg" for i in range(n)]
    captions = examples.texts[:n]
    return ProjectExamples(task_ids=examples.task_ids[:n], texts=urls, controls=controls,
                           object_texts={"photo": urls, "caption": captions}, object_vectors=vectors), kinds


def test_image_vectors_train_their_head_and_only_text_objects_are_encoded(encoder, project, tmp_path):
    examples, kinds = _image_project(project)
    cache = EncodingCache(tmp_path / "cache.sqlite3")
    # domain_likeness reads every layer: the image's stages and the caption's layers side by side.
    trained = train_and_score(examples, encoder, cache, OrderingChoice("domain_likeness", batch_size=10))
    assert set(trained.heads) == {"kind", "sentiment"}
    kind = trained.heads["kind"]
    assert kind.labeled == 60 and kind.label_counts == {"Cat": 30, "Dog": 30}
    unlabeled = [i for i, label in enumerate(examples.controls["kind"].labels) if label is None]
    hits = np.mean([kind.predicted[i] == kinds[i] for i in unlabeled])
    assert hits > 0.9, hits  # two well separated centres
    # The image URLs never reach the text encoder: only the captions are encoded and cached.
    assert trained.encoded == len(set(examples.object_texts["caption"]))
    assert cache.count(encoder.id) == trained.encoded
    assert ((trained.scores >= 0) & (trained.scores <= 1)).all()
    assert trained.ordering_info.get("fallback") is None, trained.ordering_info


def test_image_only_examples_need_no_text_encoding(encoder, project, tmp_path):
    examples, _ = _image_project(project)
    only_images = ProjectExamples(task_ids=examples.task_ids, texts=examples.texts,
                                  controls={"kind": examples.controls["kind"]},
                                  object_texts={"photo": examples.object_texts["photo"]},
                                  object_vectors=examples.object_vectors)
    cache = EncodingCache(tmp_path / "cache.sqlite3")
    for ordering in ("least_confidence", "atlas", "domain_likeness"):
        trained = train_and_score(only_images, encoder, cache, OrderingChoice(ordering, batch_size=10))
        assert trained.encoded == 0 and cache.count() == 0, ordering
        unlabeled = trained.scores[trained.scores < LABELED_FLOOR]
        assert len(unlabeled) == 140 and len(set(np.round(unlabeled, 6))) > 1, ordering


def test_given_vectors_are_checked(encoder, project, tmp_path):
    examples, _ = _image_project(project)
    cache = EncodingCache(tmp_path / "cache.sqlite3")
    short = {"photo": ObjectVectors("x", examples.object_vectors["photo"].features[:5])}
    with pytest.raises(ValueError, match="5 vectors for 200 tasks"):
        ProjectExamples(examples.task_ids, examples.texts, examples.controls,
                        object_texts=examples.object_texts, object_vectors=short)
    with pytest.raises(ValueError, match="fine-tuning trains the text encoder only"):
        train_and_score(examples, encoder, cache, OrderingChoice(), fine_tuning=FineTuning(1, tmp_path / "ft"))
    top_only = {"photo": ObjectVectors("x", examples.object_vectors["photo"].features)}
    without_stages = ProjectExamples(examples.task_ids, examples.texts, examples.controls,
                                     object_texts=examples.object_texts, object_vectors=top_only)
    with pytest.raises(ValueError, match="came without all_layers"):
        train_and_score(without_stages, encoder, cache, OrderingChoice("domain_likeness"))
