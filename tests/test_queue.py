"""Queue semantics on a real redis-server: one waiting, one running, per project."""

import pytest
from rq.serializers import JSONSerializer
from rq.job import Job

from backend.job_queue import JobQueue, redis_connection
from backend.settings import Settings


@pytest.fixture
def job_queue(services):
    settings = Settings.from_env(redis_url=services.redis_url, data_dir=services.data_dir, job_retries=0)
    return JobQueue(redis_connection(services.redis_url), settings)


def test_one_waiting_and_one_running_per_project(job_queue):
    status, first = job_queue.request_retrain(1, "ANNOTATION_CREATED")
    assert status == "queued"
    assert job_queue.request_retrain(1, "ANNOTATION_CREATED") == ("coalesced", first)
    # Another project has its own queue slot.
    assert job_queue.request_retrain(2, "ANNOTATION_CREATED")[0] == "queued"

    # The job starts (what backend.jobs.retrain does before reading Label Studio) ...
    job_queue.mark_started(1, first)
    with job_queue.training_lock(1, first):
        assert job_queue.project_status(1)["running"]["job_id"] == first
        # ... so the next event queues exactly one follow-up, and later ones coalesce into it.
        status, follow_up = job_queue.request_retrain(1, "ANNOTATION_CREATED")
        assert status == "queued" and follow_up != first
        for _ in range(5):
            assert job_queue.request_retrain(1, "ANNOTATION_UPDATED") == ("coalesced", follow_up)
        state = job_queue.project_status(1)
        assert state["waiting"] == follow_up and state["requested"] == 2
    assert job_queue.project_status(1)["running"] is None
    job = Job.fetch(follow_up, connection=job_queue.redis, serializer=JSONSerializer)
    assert job.args == [1, "ANNOTATION_CREATED"]
    assert job.func_name == "backend.jobs.retrain"


def test_a_lost_waiting_job_does_not_block_new_events(job_queue):
    _, job_id = job_queue.request_retrain(3, "START_TRAINING")
    # The queued job vanishes (e.g. someone emptied the queue); the mark must not block us.
    Job.fetch(job_id, connection=job_queue.redis, serializer=JSONSerializer).delete()
    status, new_id = job_queue.request_retrain(3, "START_TRAINING")
    assert status == "queued" and new_id != job_id


def test_training_lock_excludes_a_second_trainer(job_queue):
    job_queue.settings.job_timeout = 1
    with job_queue.training_lock(4, "job-a"):
        with pytest.raises(TimeoutError):
            with job_queue.training_lock(4, "job-b"):
                pass


def test_training_lock_outlives_its_ttl_while_the_job_runs(job_queue, monkeypatch):
    import time

    import backend.job_queue as job_queue_module

    monkeypatch.setattr(job_queue_module, "LOCK_TTL", 1.5)  # heartbeat every 0.5 s
    with job_queue.training_lock(6, "job-long"):
        time.sleep(4)  # well past the TTL: only the heartbeat keeps lock and state alive
        assert job_queue.project_status(6)["running"]["job_id"] == "job-long"
        assert job_queue.redis.get("atl:project:6:training") == b"job-long"
    assert job_queue.project_status(6)["running"] is None
    assert job_queue.redis.get("atl:project:6:training") is None


def test_a_slower_fan_out_of_an_older_version_never_switches_back(job_queue, services, monkeypatch):
    """Two retrains' fan-outs can finish out of order: the older one is "superseded", does
    not touch Label Studio or /predict, and leaves the newer result as the project's last."""
    from backend import jobs
    from backend.model_store import ModelStore
    from model.classifier import ClassifierHead, HeadConfig

    monkeypatch.setenv("REDIS_URL", services.redis_url)
    monkeypatch.setenv("DATA_DIR", str(services.data_dir))
    # Nothing listens here: a call to Label Studio would fail the job.
    monkeypatch.setenv("LABEL_STUDIO_URL", "http://127.0.0.1:9")
    store = ModelStore(job_queue.settings.models_dir)
    head = ClassifierHead(HeadConfig(labels=["a", "b"], input_dim=4))
    older = store.stage(5, head, {"encoder": "e"})
    newer = store.stage(5, head, {"encoder": "e"})
    store.activate(5, newer)
    job_queue.record_result(5, {"status": "finished", "model_version": newer})
    job_queue.redis.set("atl:project:5:publishing", '{"model_version": "%s"}' % older)

    result = jobs.finish_publish(5, older, [], {"model_version": older})
    assert result["status"] == "superseded"
    assert store.current_version(5) == newer
    status = job_queue.project_status(5)
    assert status["last"] == {"status": "finished", "model_version": newer}
    assert status["publishing"] is None
