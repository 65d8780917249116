"""/metrics: prometheus_client in multiprocess mode under a real gunicorn, and the collector
of the series that live in Redis, against a real redis-server."""

import os
import re
import signal
import threading
import time

import psutil
import pytest
import requests
from prometheus_client import generate_latest

from backend import metrics
from backend.job_queue import JobQueue, redis_connection
from backend.model_store import ModelStore, version_number
from backend.settings import Settings
from model.classifier import ClassifierHead, HeadConfig
from tests.support.prometheus_text import samples


def stage_model(data_dir, project_id: int) -> str:
    store = ModelStore(Settings.from_env(data_dir=data_dir).models_dir)
    version = store.stage(project_id, ClassifierHead(HeadConfig(labels=["a", "b"], input_dim=4)), {"encoder": "e"})
    store.activate(project_id, version)
    return version


# -- the collector, on a real Redis ----------------------------------------------------------

@pytest.fixture
def job_queue(services):
    settings = Settings.from_env(redis_url=services.redis_url, data_dir=services.data_dir, job_retries=0)
    return JobQueue(redis_connection(services.redis_url, fast_fail=True), settings)


def scrape(job_queue, queue=None) -> dict[tuple, float]:
    store = ModelStore(job_queue.settings.models_dir)
    registry = metrics.registry(store, (lambda: job_queue) if queue is None else queue)
    return samples(generate_latest(registry).decode())


def test_the_collector_reports_queue_state_outcomes_and_versions_from_redis(job_queue, services):
    version = stage_model(services.data_dir, 5)
    _, waiting = job_queue.request_retrain(3, "ANNOTATION_CREATED")
    for _ in range(4):
        job_queue.request_retrain(3, "ANNOTATION_CREATED")
    job_queue.record_result(4, {"status": "finished", "duration": 12.5})
    job_queue.record_result(4, {"status": "failed", "error": "x"})
    with job_queue.training_lock(4, "retrain-4-running"):
        found = scrape(job_queue)
    assert found[("atl_redis_up", ())] == 1
    assert found[("atl_jobs_current", (("project", "3"), ("state", "queued")))] == 1
    assert found[("atl_jobs_current", (("project", "3"), ("state", "running")))] == 0
    assert found[("atl_jobs_current", (("project", "4"), ("state", "queued")))] == 0
    assert found[("atl_jobs_current", (("project", "4"), ("state", "running")))] == 1
    assert found[("atl_jobs_total", (("outcome", "requested"), ("project", "3")))] == 1
    assert found[("atl_events_coalesced_total", (("project", "3"),))] == 4
    assert found[("atl_jobs_total", (("outcome", "succeeded"), ("project", "4")))] == 1
    assert found[("atl_jobs_total", (("outcome", "failed"), ("project", "4")))] == 1
    # The last result was the failure: it has no duration, so none is reported.
    assert ("atl_retrain_duration_seconds", (("project", "4"),)) not in found
    job_queue.record_result(4, {"status": "finished", "duration": 7.25})
    assert scrape(job_queue)[("atl_retrain_duration_seconds", (("project", "4"),))] == 7.25
    assert found[("atl_model_version_number", (("model_version", version), ("project", "5")))] == \
        version_number(version)
    # After the job: nothing running for project 4.
    assert scrape(job_queue)[("atl_jobs_current", (("project", "4"), ("state", "running")))] == 0


def test_with_redis_down_the_scrape_still_answers_with_redis_up_0(job_queue, services):
    version = stage_model(services.data_dir, 5)
    job_queue.request_retrain(3, "ANNOTATION_CREATED")
    services.stop_redis()
    started = time.perf_counter()
    found = scrape(job_queue)
    assert time.perf_counter() - started < 5  # the web app's fast-fail client
    assert found[("atl_redis_up", ())] == 0
    assert not [k for k in found if k[0].startswith(("atl_jobs", "atl_events"))]
    # The model versions are on disk, not in Redis.
    assert found[("atl_model_version_number", (("model_version", version), ("project", "5")))] > 0
    # The app's "skip Redis for a second" state gives no queue at all: the same answer.
    assert scrape(job_queue, queue=lambda: None)[("atl_redis_up", ())] == 0


def test_the_in_process_histogram_counts_predict_calls(job_queue):
    before = scrape(job_queue).get(("atl_predict_latency_seconds_count", ()), 0)
    for seconds in (0.003, 0.03, 3.0):
        metrics.observe_predict(seconds)
    found = scrape(job_queue)
    assert found[("atl_predict_latency_seconds_count", ())] == before + 3
    assert found[("atl_predict_latency_seconds_bucket", (("le", "+Inf"),))] == before + 3


# -- a real gunicorn with two workers ---------------------------------------------------------

ACCESS = re.compile(r"^<(\d+)> (\S+) (\S*)$")


@pytest.fixture
def web(services):
    """gunicorn × 2 whose access log names the worker (pid) that answered each request."""
    services.env.update(LABEL_STUDIO_URL="http://127.0.0.1:9", LABEL_STUDIO_API_KEY="not-a-token")
    services.start_web(workers=2, extra_args=(
        "--access-logfile", str(services.data_dir / "access.log"),
        "--access-logformat", "%(p)s %(U)s %(q)s"))
    return services


def answered_by(services, queries) -> dict[str, int]:
    """{query string: worker pid} of the requests with these query strings, from the access
    log (a worker writes its line just after the response, so wait for all of them)."""
    path = services.data_dir / "access.log"
    deadline = time.monotonic() + 15
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        found = {m.group(3): int(m.group(1)) for m in map(ACCESS.match, lines) if m}
        if set(queries) <= set(found):
            return {q: found[q] for q in queries}
        assert time.monotonic() < deadline, f"no access log line for {set(queries) - set(found)}"
        time.sleep(0.05)


def scrapes_from_every_worker(services, pids: set[int], tag: str) -> dict[int, list[dict]]:
    """Scrape concurrently (a sync worker takes one request at a time, so both get some)
    until each pid in `pids` has answered at least twice; {pid: [samples of each scrape]}."""
    by_tag: dict[str, dict] = {}
    deadline = time.monotonic() + 60
    n = 0
    while True:
        def one(i):
            by_tag[f"scrape={tag}-{i}"] = samples(requests.get(services.url + f"/metrics?scrape={tag}-{i}",
                                                              timeout=10).text)

        threads = [threading.Thread(target=one, args=(n + i,)) for i in range(8)]
        n += 8
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        who = answered_by(services, by_tag)
        result: dict[int, list[dict]] = {}
        for query, found in by_tag.items():
            result.setdefault(who[query], []).append(found)
        if all(len(result.get(pid, [])) >= 2 for pid in pids):
            return result
        assert time.monotonic() < deadline, (pids, {p: len(v) for p, v in result.items()})


def predicts_on_every_worker(services, pids: set[int], tag: str) -> int:
    """Concurrent /predict calls for a project with no model, in rounds of 10, until every
    pid in `pids` has served some (a worker still booting takes none); how many were made."""
    made, served = 0, set()
    deadline = time.monotonic() + 60

    def one(i):
        response = requests.post(services.url + f"/predict?call={tag}-{i}", timeout=30,
                                 json={"tasks": [{"id": i, "data": {"text": "t"}}], "project": "3.1"})
        assert response.status_code == 200

    while not pids <= served:
        assert time.monotonic() < deadline, f"/predict reached only {served} of {pids}"
        threads = [threading.Thread(target=one, args=(made + i,)) for i in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        made += 10
        served = set(answered_by(services, [f"call={tag}-{i}" for i in range(made)]).values())
    return made


def workers_of(services) -> set[int]:
    deadline = time.monotonic() + 30
    while len(children := psutil.Process(services.web.pid).children()) != 2:
        assert time.monotonic() < deadline, services.log_tail("web.log")
        time.sleep(0.1)
    return {c.pid for c in children}


def test_every_worker_gives_the_same_series_and_restarts_add_no_label_values(web):
    version = stage_model(web.data_dir, 5)
    for _ in range(3):
        requests.post(web.url + "/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 8}}, timeout=5)
    pids = workers_of(web)
    predicts = predicts_on_every_worker(web, pids, "a")

    by_worker = scrapes_from_every_worker(web, pids, "a")
    series = {frozenset(found) for scrapes in by_worker.values() for found in scrapes}
    assert len(series) == 1, "the series differ between scrapes"
    names = {name for name, _ in next(iter(series))}
    assert {"atl_predict_latency_seconds_count", "atl_jobs_current", "atl_jobs_total",
            "atl_events_coalesced_total", "atl_model_version_number", "atl_redis_up"} <= names
    # No series names a process.
    assert not [labels for _, labels in next(iter(series)) if any(k in ("pid", "process") for k, _ in labels)]
    for scrapes in by_worker.values():
        for found in scrapes:
            # Both workers served /predict; every scrape counts all calls, whoever answers.
            assert found[("atl_predict_latency_seconds_count", ())] == predicts
            assert found[("atl_predict_latency_seconds_bucket", (("le", "+Inf"),))] == predicts
            assert found[("atl_events_coalesced_total", (("project", "8"),))] == 2
            assert found[("atl_model_version_number", (("model_version", version), ("project", "5")))] > 0

    # Kill one worker; gunicorn starts a new one (a new pid).
    victim = min(pids)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while victim in (new_pids := workers_of(web)):
        assert time.monotonic() < deadline, web.log_tail("web.log")
        time.sleep(0.1)
    assert len(new_pids) == 2
    predicts += predicts_on_every_worker(web, new_pids, "b")
    after = scrapes_from_every_worker(web, new_pids, "b")
    after_series = {frozenset(found) for scrapes in after.values() for found in scrapes}
    # The same series as before the kill: the new worker added no label values; the dead
    # worker's /predict counts are kept.
    assert after_series == series
    for scrapes in after.values():
        for found in scrapes:
            assert found[("atl_predict_latency_seconds_count", ())] == predicts


def test_serve_start_empties_the_metrics_directory(services):
    """A gunicorn start begins from zero, not from the counts a previous run left on disk."""
    services.start_web(workers=1)
    predicts = [requests.post(services.url + "/predict", json={"tasks": [], "project": "3.1"}, timeout=30)
                for _ in range(3)]
    assert all(p.status_code == 200 for p in predicts)
    assert samples(requests.get(services.url + "/metrics", timeout=10).text)[
        ("atl_predict_latency_seconds_count", ())] == 3
    assert list((services.data_dir / "prometheus").glob("histogram_*.db"))
    services.stop_web()
    services.start_web(workers=1)
    assert samples(requests.get(services.url + "/metrics", timeout=10).text)[
        ("atl_predict_latency_seconds_count", ())] == 0
