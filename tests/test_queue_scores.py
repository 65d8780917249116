"""Queue scores on plain arrays: ranks, labeled after unlabeled, batch first, mislabeling."""

import numpy as np

from model.classifier import ClassifierHead, HeadConfig
from model.queue_scores import LABELED_FLOOR, out_of_fold_disagreement, queue_scores, rank_scores


def _data(seed=0, n=200, dim=8):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(0, 1, (n, dim)).astype(np.float32)
    x[:, 0] += np.where(y == 1, 2.5, -2.5)
    return x, y


def test_rank_scores_sort_exactly_as_the_order():
    order = np.array([3, 0, 2, 1])
    scores = rank_scores(order, 4)
    assert list(np.argsort(scores)) == [3, 0, 2, 1]
    assert scores.min() == 0 and scores.max() < 1


def test_unlabeled_first_least_confident_first_and_all_scores_in_unit_interval():
    x, y = _data()
    labels = [int(v) if i < 40 else None for i, v in enumerate(y)]
    head = ClassifierHead(HeadConfig(labels=["a", "b"], input_dim=8)).fit(x[:40], y[:40])
    result = queue_scores(x, labels, head, ordering="least_confidence", batch_size=10)
    assert result.scores.min() >= 0 and result.scores.max() <= 1
    assert result.scores[:40].min() >= LABELED_FLOOR > result.scores[40:].max()
    # Least confidence: the first served task is much less certain than the last one.
    confidence = head.predict_proba(x[40:]).max(axis=1)
    served = np.argsort(result.scores[40:])
    assert confidence[served[:10]].mean() < confidence[served[-10:]].mean()
    assert result.clusters.shape == (200,) and result.clusters.max() >= 1
    assert result.info["ordering"] == "least_confidence"


def test_a_flipped_label_gets_a_mislabeling_value():
    x, y = _data(seed=1, n=120)
    flipped = y.copy()
    flipped[5] = 1 - flipped[5]
    config = HeadConfig(labels=["a", "b"], input_dim=8)
    disagreement = out_of_fold_disagreement(x, flipped, config)
    assert disagreement[5] > 0.5
    assert (disagreement > 0).mean() < 0.2  # clean labels are mostly left alone


def test_cluster_centroids_are_reused_while_their_count_fits_the_project(tmp_path):
    from backend.model_store import ModelStore
    from model.queue_scores import cluster_count, cluster_ids

    rng = np.random.default_rng(3)
    centres = rng.normal(0, 5, (4, 16))
    x = (centres[rng.integers(0, 4, 2000)] + rng.normal(0, 1, (2000, 16))).astype(np.float32)
    ids, centroids = cluster_ids(x)
    assert centroids.shape == (cluster_count(2000), 16) and len(set(ids)) == len(centroids)
    # The same tasks against the kept centroids: the same clusters, without fitting again.
    again, kept = cluster_ids(x, centroids=centroids)
    assert kept is centroids
    assert (again == ids).mean() > 0.99
    # A few new tasks join the nearest existing cluster.
    more = np.concatenate([x, x[:50] + 0.01])
    grown, kept = cluster_ids(more, centroids=centroids)
    assert kept is centroids and (grown[2000:] == ids[:50]).all()
    # Enough new tasks that k changes: fitted afresh.
    big = np.concatenate([x] * 3)
    assert cluster_count(len(big)) != len(centroids)
    _, refitted = cluster_ids(big, centroids=centroids)
    assert refitted is not centroids and len(refitted) == cluster_count(len(big))

    store = ModelStore(tmp_path)
    assert store.read_centroids(7, "enc-a") is None
    store.write_centroids(7, "enc-a", centroids)
    assert np.array_equal(store.read_centroids(7, "enc-a"), centroids)
    assert store.read_centroids(7, "enc-b") is None  # another encoder's space: not reused


def _two_controls(seed=0, n=300, labeled=160):
    """"side" (single-choice) on x0 and "flags" (multi-label, two choices) on x2, x3; each
    labeled task answers one or both; one multi-label answer is flipped."""
    from model.heads import ControlSpec

    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (n, 8)).astype(np.float32)
    side = (x[:, 0] > 0).astype(int)
    x[:, 0] += np.where(side == 1, 2.0, -2.0)
    flags = np.column_stack([x[:, 2] > 0, x[:, 3] > 0]).astype(np.int8)
    x[:, 2] += np.where(flags[:, 0] == 1, 2.5, -2.5)
    x[:, 3] += np.where(flags[:, 1] == 1, 2.5, -2.5)
    answers_side = np.where(np.arange(n) % 3 == 2, -1, side)
    answers_flags = np.where((np.arange(n) % 3 == 1)[:, None], -1, flags).astype(np.int8)
    answers_side[labeled:] = -1
    answers_flags[labeled:] = -1
    flipped = 3  # answers both controls
    answers_flags[flipped, 0] = 1 - answers_flags[flipped, 0]
    specs = [ControlSpec("side", ["l", "r"]), ControlSpec("flags", ["a", "b"], multi_label=True)]
    return x, specs, [answers_side, answers_flags], flipped


def test_queue_scores_over_several_controls_reuse_the_one_out_of_fold_pass():
    from model.heads import labeled_tasks, train_heads
    from model.queue_scores import out_of_fold_folds, queue_scores_multi

    x, specs, targets, flipped = _two_controls()
    labeled = labeled_tasks(targets)
    assert len(labeled) == 160
    heads, oof = train_heads(specs, [x, x], targets, labeled, folds=5, hidden_dim=32, epochs=100)
    result = queue_scores_multi(x, heads, [x, x], targets, ordering="predicted_incorrect", batch_size=20,
                                params={"domain_weighting": False, "min_incorrect": "eight"},
                                out_of_fold=oof)
    assert result.out_of_fold is oof
    assert result.scores.min() >= 0 and result.scores.max() <= 1
    assert result.scores[labeled].min() >= LABELED_FLOOR > result.scores[160:].max()
    # A bad parameter value is reported, and its default used.
    assert any("min_incorrect='eight' ignored" in w for w in result.info["param_warnings"])
    # One prediction per control: a label index, and a set of choices (at least one).
    assert result.predictions[0].shape == (300,) and result.predictions[1].shape == (300, 2)
    assert result.predictions[1].any(axis=1).all()
    assert np.allclose(result.confidence, heads.confidence(heads.predict_proba([x, x])))
    # The flipped multi-label answer is disputed; clean answers mostly are not.
    assert result.mislabeling[flipped] > 0.5
    assert (result.mislabeling[labeled] > 0).mean() < 0.2
    assert (result.mislabeling[160:] == 0).all()
    # Without a pass handed over, one runs here (the ordering's folds).
    again = queue_scores_multi(x, heads, [x, x], targets, ordering="least_confidence", batch_size=20)
    assert again.out_of_fold is not None and again.out_of_fold.folds == 3 == out_of_fold_folds("margin")
    assert out_of_fold_folds("atlas", {"folds": 4}) == 4 and out_of_fold_folds("atlas", {"folds": 1}) == 5
    assert again.mislabeling[flipped] > 0.5



def test_from_label_studio_tasks_to_one_result_per_control():
    """The data flow of a retrain over a two-control config with a TextArea beside it, on
    stand-in text vectors: config -> answers -> heads -> queue -> Label Studio results."""
    from label_studio_sdk.label_interface import LabelInterface

    from backend.label_config import parse_label_config
    from backend.training_data import control_specs, control_targets, project_data
    from model.heads import concat_inputs, labeled_tasks, train_heads
    from model.queue_scores import out_of_fold_folds, queue_scores_multi

    xml = """<View><Text name="title" value="$title"/><Text name="body" value="$body"/>
      <Choices name="topic" toName="title,body" choice="multiple">
        <Choice value="sport"/><Choice value="money"/></Choices>
      <Choices name="urgent" toName="body" choice="single-radio"><Choice value="yes"/><Choice value="no"/></Choices>
      <TextArea name="note" toName="body"/></View>"""
    config = parse_label_config(xml)
    assert [i.name for i in config.ignored] == ["note"]
    rng = np.random.default_rng(0)
    tasks, vectors = [], {}
    for i in range(160):
        sport, money, urgent = rng.random() < 0.5, rng.random() < 0.4, rng.random() < 0.3
        title, body = f"title {i}", f"body {i}"
        vectors[title] = rng.normal(0, 1, 8) + 2.5 * np.array([sport, money, 0, 0, 0, 0, 0, 0])
        vectors[body] = rng.normal(0, 1, 8) + 2.5 * np.array([0, 0, urgent, 0, 0, 0, 0, 0])
        result = []
        if i < 100:
            chosen = [c for c, on in (("sport", sport), ("money", money)) if on]
            if chosen:
                result.append(config.control("topic").result(chosen))
            if i % 4:  # some annotators skipped the urgency question
                result.append(config.control("urgent").result("yes" if urgent else "no"))
        annotations = [{"id": i, "result": result, "updated_at": "2026-01-01"}] if result else []
        tasks.append({"id": i + 1, "data": {"title": title, "body": body}, "annotations": annotations})

    data = project_data(tasks, config)
    specs = control_specs(config)
    targets = control_targets(data, config)
    objects = {name: np.array([vectors[t] for t in texts], dtype=np.float32)
               for name, texts in data.object_texts.items()}
    head_features = [concat_inputs(objects, spec.inputs) for spec in specs]
    task_features = concat_inputs(objects, [o.name for o in config.objects])
    labeled = labeled_tasks(targets)
    assert list(labeled) == data.labeled_index
    heads, oof = train_heads(specs, head_features, targets, labeled, folds=out_of_fold_folds("atlas"),
                             hidden_dim=16, epochs=80)
    queue = queue_scores_multi(task_features, heads, head_features, targets, ordering="atlas",
                               batch_size=10, out_of_fold=oof)
    answers = heads.answers(queue.probabilities)
    interface = LabelInterface(xml)
    for i in range(len(tasks)):
        results = config.results_for(answers[i])
        assert [r["from_name"] for r in results] == ["topic", "urgent"]  # every control filled
        assert interface.validate_prediction({"result": results}, return_errors=True) == []
    unlabeled = np.setdiff1d(np.arange(len(tasks)), labeled)
    assert queue.scores[unlabeled].max() < LABELED_FLOOR <= queue.scores[labeled].min()
    assert not np.array_equal(np.argsort(queue.scores[unlabeled], kind="stable"), np.arange(len(unlabeled)))
