"""Queue semantics on a real redis-server: one waiting, one running, per project."""

import json
import time

import pytest
from rq import Queue, Worker
from rq.job import Job
from rq.serializers import JSONSerializer

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


def test_a_started_job_waiting_for_the_training_lock_still_collects_events(job_queue):
    """Two workers: retrain A trains, retrain B has started on the other worker but waits
    for the lock. B has read nothing yet, so a burst coalesces into B (two retrains in all);
    once B holds the lock, the next event queues exactly one follow-up."""
    import threading

    from rq.job import JobStatus

    _, first = job_queue.request_retrain(7, "ANNOTATION_CREATED")
    with job_queue.training_lock(7, first, still_waiting=True):
        assert job_queue.project_status(7)["waiting"] is None
        _, second = job_queue.request_retrain(7, "ANNOTATION_CREATED")
        # What a worker does when it takes the job from the queue.
        Job.fetch(second, connection=job_queue.redis, serializer=JSONSerializer).set_status(JobStatus.STARTED)
        holding, release = threading.Event(), threading.Event()

        def second_job():
            with job_queue.training_lock(7, second, still_waiting=True):
                holding.set()
                release.wait(10)

        worker = threading.Thread(target=second_job)
        worker.start()
        deadline = time.monotonic() + 5
        while job_queue.redis.get("atl:project:7:lock-wait") != second.encode():
            assert time.monotonic() < deadline, "the second job never announced it waits"
            time.sleep(0.01)
        for _ in range(20):
            assert job_queue.request_retrain(7, "ANNOTATION_CREATED") == ("coalesced", second)
        assert job_queue.project_status(7)["waiting"] == second
        assert not holding.is_set()
    assert holding.wait(10), "the second job never got the lock"
    try:
        # B holds the lock and has cleared its mark: it may already have read Label Studio.
        assert job_queue.project_status(7)["waiting"] is None
        status, third = job_queue.request_retrain(7, "ANNOTATION_CREATED")
        assert status == "queued" and third not in (first, second)
    finally:
        release.set()
        worker.join(10)
    assert job_queue.redis.get("atl:project:7:requested") == b"3"
    assert job_queue.redis.get("atl:project:7:coalesced") == b"20"


def test_a_job_that_stops_announcing_it_waits_collects_no_more_events(job_queue, monkeypatch):
    """A started job whose worker died while it waited for the lock: once its announcement
    expires, the next event queues a new retrain instead of coalescing into a dead job."""
    from rq.job import JobStatus

    _, job_id = job_queue.request_retrain(8, "ANNOTATION_CREATED")
    Job.fetch(job_id, connection=job_queue.redis, serializer=JSONSerializer).set_status(JobStatus.STARTED)
    job_queue.redis.set("atl:project:8:lock-wait", job_id, px=300)
    assert job_queue.request_retrain(8, "ANNOTATION_CREATED") == ("coalesced", job_id)
    time.sleep(0.5)
    status, new_id = job_queue.request_retrain(8, "ANNOTATION_CREATED")
    assert status == "queued" and new_id != job_id


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
    job_queue.redis.set("atl:project:5:publishing", json.dumps({"model_version": older}))

    result = jobs.finish_publish(5, older, [], {"model_version": older})
    assert result["status"] == "superseded"
    assert store.current_version(5) == newer
    status = job_queue.project_status(5)
    assert status["last"] == {"status": "finished", "model_version": newer}
    assert status["publishing"] is None


def test_the_worker_outlives_a_redis_outage_that_hits_a_running_job(services):
    """Redis dies while a job runs, so RQ's bookkeeping at the job's end fails and RQ's
    work loop quits. The worker process must wait for Redis and serve the queue again."""
    from rq import Queue

    worker = services.start_worker()
    queue = Queue("atl", connection=redis_connection(services.redis_url), serializer=JSONSerializer)
    running = queue.enqueue("time.sleep", 4, job_timeout=60)
    deadline = time.monotonic() + 60
    while running.get_status(refresh=True) != "started":
        assert time.monotonic() < deadline, services.log_tail("worker.log")
        time.sleep(0.1)
    port = int(services.redis_url.rsplit(":", 1)[1].split("/")[0])
    services.redis_process.kill()
    services.redis_process.wait()
    time.sleep(6)  # the job ends while Redis is down
    assert worker.poll() is None, services.log_tail("worker.log")
    services.start_redis(port=port)

    after = queue.enqueue("time.sleep", 0, job_timeout=60)
    deadline = time.monotonic() + 90
    while after.get_status(refresh=True) != "finished":
        assert worker.poll() is None, services.log_tail("worker.log")
        assert time.monotonic() < deadline, services.log_tail("worker.log")
        time.sleep(0.2)
    assert "waiting for Redis to come back" in services.log_tail("worker.log", 20000)


def test_an_idle_worker_stops_at_once_on_sigterm_and_logs_no_redis_errors(services):
    """Ctrl-C of `make serve` (SIGTERM to each worker) must stop an idle worker in seconds,
    with exit code 0, not restart it; and an idle worker's blocking wait for jobs must not
    hit the client's socket timeout (an ERROR line every 30 s)."""
    import signal

    services.env["RECONCILE_INTERVAL"] = "1"  # the reconcile schedule talks to Redis too
    worker = services.start_worker()
    time.sleep(35)  # longer than the 30 s socket timeout of our Redis clients
    assert worker.poll() is None, services.log_tail("worker.log")
    log = services.log_tail("worker.log", 50000)
    assert "Listening on" in log
    assert "could not connect to Redis" not in log, log
    stopped = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=15) == 0, services.log_tail("worker.log")
    assert time.monotonic() - stopped < 10
    assert "starting a new rq worker" not in services.log_tail("worker.log", 50000)


def test_a_webhook_waits_for_the_enqueue_lock_by_milliseconds_not_a_poll_period(job_queue):
    """The enqueue lock is held for a few Redis round trips. redis-py's default lock poll
    (100 ms) made the second webhook of a burst wait 100 ms for a lock freed after ~1 ms."""
    import threading

    from backend.job_queue import key

    held, release = threading.Event(), threading.Event()

    def other_web_worker():
        with job_queue.redis.lock(key(3, "enqueue"), timeout=10):
            held.set()
            release.wait(5)
            time.sleep(0.01)

    thread = threading.Thread(target=other_web_worker)
    thread.start()
    assert held.wait(5)
    release.set()
    started = time.perf_counter()
    status, _ = job_queue.request_retrain(3, "ANNOTATION_CREATED")
    waited = time.perf_counter() - started
    thread.join()
    assert status == "queued"
    # ~10 ms of holding plus one 2 ms poll; the old default could not answer before 100 ms.
    assert waited < 0.09, f"waited {waited * 1000:.0f} ms for a lock held 10 ms"


def test_fan_out_pays_only_when_another_worker_listens_on_the_queue(job_queue):
    """Workers registered the way a starting RQ worker registers itself (its birth), in real Redis."""
    def worker(name, queue=job_queue.queue):
        w = Worker([queue], connection=job_queue.redis, serializer=JSONSerializer, name=name)
        w.register_birth()
        return w

    assert not job_queue.fan_out_pays()  # no worker at all: the job runs inline when it runs
    first = worker("first")
    assert not job_queue.fan_out_pays()  # only the worker that runs the job itself
    worker("elsewhere", Queue("another-queue", connection=job_queue.redis))
    assert not job_queue.fan_out_pays()  # a worker of another queue takes no slice
    second = worker("second")
    assert job_queue.fan_out_pays()
    second.register_death()
    assert not job_queue.fan_out_pays()
    first.register_death()
