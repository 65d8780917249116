"""From a trained model to what Label Studio and /jobs receive: predictions, slices, job results."""

import json

import numpy as np
import pytest

from backend.job_queue import JobQueue, redis_connection
from backend.job_results import EncodeResult, RetrainResult, Status, record
from backend.label_config import parse_label_config
from backend.publish import BULK_FIELDS, Predictions, predictions_for
from backend.settings import Settings
from model.classifier import ClassifierHead, HeadConfig
from model.training import TrainedHead, TrainingResult

CONFIG = ('<View><Text name="text" value="$text"/><Choices name="sentiment" toName="text">'
          '<Choice value="Positive"/><Choice value="Negative"/></Choices></View>')


def _trained(n: int, disputed: set[int]) -> TrainingResult:
    mislabeling = np.array([0.5 + i / 100 if i in disputed else 0.0 for i in range(n)])
    head = TrainedHead(head=ClassifierHead(HeadConfig(labels=["Positive", "Negative"], input_dim=4)),
                       predicted=["Positive" if i % 3 else "Negative" for i in range(n)],
                       mislabeling=mislabeling, labeled=len(disputed), label_counts={},
                       training_accuracy=1.0)
    return TrainingResult(task_ids=[100 + i for i in range(n)], heads={"sentiment": head},
                          scores=np.linspace(0, 1, n), clusters=np.arange(n) % 2, ordering_info={},
                          centroids=None, encoder_id="e", encoder_dir=None, encoded=0)


def test_every_task_gets_one_prediction_and_disputed_labels_go_one_by_one():
    config = parse_label_config(CONFIG)
    trained = _trained(6, disputed={1, 4})
    predictions = predictions_for(config, trained, "v0002-x")
    assert len(predictions) == 6
    assert [p["task"] for p in predictions.one_by_one] == [101, 104]
    assert [p["task"] for p in predictions.bulk] == [100, 102, 103, 105]
    # The bulk import keeps only four fields; the single-prediction API keeps the rest.
    assert all(tuple(p) == BULK_FIELDS for p in predictions.bulk)
    assert predictions.one_by_one[1] == {
        "task": 104, "result": config.result_for("Positive"), "score": pytest.approx(0.8),
        "model_version": "v0002-x", "cluster": 0, "mislabeling": pytest.approx(0.54)}
    assert predictions.bulk[0]["result"] == config.result_for("Negative")
    # Published inline, all go through the bulk import; the disputed ones are marked later.
    everything = predictions.all_in_bulk()
    assert [p["task"] for p in everything] == [100, 102, 103, 105, 101, 104]
    assert all(tuple(p) == BULK_FIELDS for p in everything)
    assert everything[-1]["score"] == predictions.one_by_one[1]["score"]
    assert all(p["model_version"] == "v0002-x" for p in predictions.bulk + predictions.one_by_one)


def test_building_predictions_leaves_the_garbage_collector_as_it_was():
    import gc

    config = parse_label_config(CONFIG)
    assert gc.isenabled()
    assert len(predictions_for(config, _trained(3, disputed=set()), "v0002-x")) == 3
    assert gc.isenabled()
    gc.disable()
    try:
        predictions_for(config, _trained(3, disputed=set()), "v0002-x")
        assert not gc.isenabled()  # paused by someone else: not switched on behind their back
    finally:
        gc.enable()


def test_slices_share_out_every_prediction_exactly_once():
    predictions = Predictions(bulk=[{"task": i} for i in range(10)],
                              one_by_one=[{"task": 100 + i} for i in range(3)])
    slices = predictions.slices(4)
    assert len(slices) == 4
    seen = [p["task"] for bulk, one_by_one in slices for p in bulk + one_by_one]
    assert sorted(seen) == list(range(10)) + [100, 101, 102]
    assert all(len(bulk) + len(one_by_one) <= 5 for bulk, one_by_one in slices)
    # The disputed predictions are shared out too, not all left to one slice.
    assert max(len(one_by_one) for _, one_by_one in slices) == 1
    assert Predictions([{"task": 1}], []).slices(4) == [([{"task": 1}], [])]


def test_job_results_show_the_keys_of_their_outcome_only():
    failed = RetrainResult(Status.FAILED, job_id="retrain-1-a", error="Label Studio is not reachable",
                           finished_at=10.0, duration=1.5)
    assert failed.to_dict() == {"status": "failed", "job_id": "retrain-1-a",
                                "error": "Label Studio is not reachable", "finished_at": 10.0, "duration": 1.5}
    skipped = RetrainResult(Status.SKIPPED, reason="the project has no usable annotations yet", tasks=3,
                            timings={"read_label_studio": 0.1})
    assert set(skipped.to_dict()) == {"status", "reason", "tasks", "timings"}
    # Plain JSON: the status is the string /jobs has always shown.
    assert json.loads(json.dumps(skipped.to_dict()))["status"] == "skipped"


def test_a_result_handed_to_the_next_job_survives_json_and_ignores_unknown_keys():
    partial = RetrainResult(Status.PUBLISHING, model_version="v0003-x", tasks=5, publish_jobs=2,
                            ordering={"ordering": "margin", "batch_size": 10, "params": {}},
                            started_at=1.0)
    again = RetrainResult.from_dict(json.loads(json.dumps(partial.to_dict())) | {"added_later": 1})
    assert again == partial and again.status is Status.PUBLISHING
    # A result without a status is the in-flight state of its kind.
    assert RetrainResult.from_dict({"model_version": "v1"}).status is Status.PUBLISHING
    assert EncodeResult.from_dict({"tasks": 3}).status is Status.ENCODING


def test_record_writes_retrains_and_encodings_where_jobs_reads_them(services):
    settings = Settings.from_env(redis_url=services.redis_url, data_dir=services.data_dir)
    queue = JobQueue(redis_connection(services.redis_url), settings)
    returned = record(queue, 3, RetrainResult(Status.FINISHED, model_version="v0001-x", tasks=4))
    assert returned == {"status": "finished", "model_version": "v0001-x", "tasks": 4}
    record(queue, 3, EncodeResult(Status.ENCODING, tasks=4, to_encode=4, encode_jobs=1))
    record(queue, 3, RetrainResult(Status.FAILED, error="boom"))
    status = queue.project_status(3)
    assert status["last"] == {"status": "failed", "error": "boom"}
    assert status["last_encode"] == {"status": "encoding", "tasks": 4, "to_encode": 4, "encode_jobs": 1}
    assert (status["succeeded"], status["failed"]) == (1, 1)
    # A superseded version leaves the newer version's result in place.
    record(queue, 3, RetrainResult(Status.SUPERSEDED, model_version="v0000-x"))
    assert queue.project_status(3)["last"] == {"status": "failed", "error": "boom"}
    # "publishing" is not an outcome yet: it is shown, and counted once its last job ends.
    record(queue, 3, RetrainResult(Status.PUBLISHING, model_version="v0002-x"))
    status = queue.project_status(3)
    assert status["last"]["status"] == "publishing" and (status["succeeded"], status["failed"]) == (1, 1)


def test_a_failed_slice_leaves_the_project_on_its_previous_version(services, monkeypatch):
    """finish_publish after a fan-out whose slice job is gone (failed, expired): no switch,
    the failure is the project's last result, counted once, and /jobs stops showing it as
    publishing."""
    from backend import jobs
    from backend.model_store import ModelStore

    monkeypatch.setenv("REDIS_URL", services.redis_url)
    monkeypatch.setenv("DATA_DIR", str(services.data_dir))
    monkeypatch.setenv("LABEL_STUDIO_URL", "http://127.0.0.1:9")  # any call to it would fail
    settings = Settings.from_env()
    queue = JobQueue(redis_connection(services.redis_url), settings)
    store = ModelStore(settings.models_dir)
    head = ClassifierHead(HeadConfig(labels=["a", "b"], input_dim=4))
    live = store.stage(6, head, {"encoder": "e"})
    store.activate(6, live)
    staged = store.stage(6, head, {"encoder": "e"})
    partial = RetrainResult(Status.PUBLISHING, model_version=staged, publish_jobs=1, job_id="retrain-6-a",
                            started_at=1.0)
    record(queue, 6, partial)
    queue.redis.set("atl:project:6:publishing", json.dumps({"model_version": staged}))

    with pytest.raises(RuntimeError, match="stays on its previous version"):
        jobs.finish_publish(6, staged, ["publish-6-gone-1of1"], partial.to_dict())
    assert store.current_version(6) == live
    status = queue.project_status(6)
    assert status["last"]["status"] == "failed" and "publish-6-gone-1of1 (missing)" in status["last"]["error"]
    assert status["last"]["model_version"] == staged and status["last"]["job_id"] == "retrain-6-a"
    assert (status["succeeded"], status["failed"]) == (0, 1)
    assert status["publishing"] is None


TWO_CONTROLS = ('<View><Text name="title" value="$title"/><Text name="body" value="$body"/>'
                '<Choices name="topic" toName="title,body" choice="multiple">'
                '<Choice value="film"/><Choice value="music"/><Choice value="sport"/></Choices>'
                '<Choices name="urgency" toName="body"><Choice value="low"/><Choice value="high"/></Choices>'
                '<TextArea name="comment" toName="body"/></View>')


def test_a_stored_two_control_version_predicts_one_result_per_control(tmp_path):
    """All heads of a version are stored together and /predict's model answers every control
    (multi-label: at least one choice), in a shape the SDK's label interface accepts; an old
    single-head version still loads and answers its one control."""
    from label_studio_sdk.label_interface import LabelInterface

    from backend.ml_backend import ActiveLearningBackend
    from backend.model_store import ModelStore
    from backend.training_data import control_specs
    from model.encoder import encoder_id
    from model.heads import ControlHeads

    config = parse_label_config(TWO_CONTROLS)
    settings = Settings(data_dir=tmp_path)
    store = ModelStore(settings.models_dir)
    rng = np.random.default_rng(0)
    specs = control_specs(config)
    heads = ControlHeads.build(specs, [768, 384], epochs=20)
    heads.fit([rng.normal(size=(12, 768)).astype(np.float32), rng.normal(size=(12, 384)).astype(np.float32)],
              [(rng.random((12, 3)) > 0.5).astype(np.int8), np.array([0, 1] * 6)])
    meta = {"label_config": config.to_dict(), "encoder": encoder_id("default")}
    store.activate(8, store.stage(8, heads, meta))
    tasks = [{"id": i, "data": {"title": f"title {i}", "body": f"a film review number {i}"}} for i in range(4)]
    predictions = ActiveLearningBackend(settings, 8, store=store).predict(tasks)
    assert len(predictions) == 4
    interface = LabelInterface(TWO_CONTROLS)
    for prediction in predictions:
        by_control = {r["from_name"]: r["value"]["choices"] for r in prediction["result"]}
        assert set(by_control) == {"topic", "urgency"}
        assert by_control["topic"] and set(by_control["topic"]) <= {"film", "music", "sport"}
        assert len(by_control["urgency"]) == 1
        assert 0 <= prediction["score"] <= 1
        assert interface.validate_prediction(prediction, return_errors=True) == []
    assert store.load(8).heads.names == ["topic", "urgency"]

    single = parse_label_config(CONFIG)
    head = ClassifierHead(HeadConfig(labels=["Positive", "Negative"], input_dim=384, epochs=5))
    head.fit(rng.normal(size=(4, 384)).astype(np.float32), np.array([0, 1, 0, 1]))
    store.activate(9, store.stage(9, head, {"label_config": single.to_dict(), "encoder": encoder_id("default")}))
    old = ActiveLearningBackend(settings, 9, store=store).predict([{"id": 1, "data": {"text": "fine"}}])
    assert [r["from_name"] for r in old[0]["result"]] == ["sentiment"]


def test_superseded_versions_go_but_the_kept_ones_and_those_too_large_to_delete_at_once():
    from backend.publish import superseded_plan

    v0, v1, v2, v3, v4 = (f"v000{k}-20261201-12000{k}" for k in range(5))
    counts = {v3: 300, v2: 300, v1: 300, v4: 300, "cold-start-1": 300, "untrained": 5,
              "someone-elses": 300, v0: 0}
    delete, kept, too_large = superseded_plan(counts, v3, keep=1)
    # v4 is newer than the live v3 (a fan-out still uploading); a version not ours is never touched.
    assert kept == [v2] and too_large == {}
    assert sorted(delete) == ["cold-start-1", "untrained", v1]
    # A limit leaves larger versions in place and names them; 0 is no limit.
    counts.update({v1: 10_000, "cold-start-1": 10_000})
    delete, kept, too_large = superseded_plan(counts, v3, keep=1, max_predictions=2000)
    assert delete == ["untrained"] and too_large == {v1: 10_000, "cold-start-1": 10_000}
    assert sorted(superseded_plan(counts, v3, keep=0, max_predictions=0)[0]) == ["cold-start-1", "untrained", v1, v2]
    # A live cold start (no model yet): only the other cold starts and `untrained` go.
    counts.update({"cold-start-2": 300})
    assert sorted(superseded_plan(counts, "cold-start-2", keep=1)[0]) == ["cold-start-1", "untrained"]
