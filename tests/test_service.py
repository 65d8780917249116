"""The HTTP contract and the queue, against a real redis-server, gunicorn and rq worker."""

import asyncio
import json
import statistics
import threading
import time
from types import SimpleNamespace

import pytest
import requests
from redis import Redis

from backend.app import webhook_allowed
from backend.job_queue import key
from tests.support.prometheus_text import samples

CONFIG = ('<View><Text name="text" value="$text"/><Choices name="sentiment" toName="text">'
          '<Choice value="Positive"/><Choice value="Negative"/></Choices></View>')


@pytest.fixture
def web(services):
    services.env.update(LABEL_STUDIO_URL="http://127.0.0.1:9", LABEL_STUDIO_API_KEY="not-a-token",
                        JOB_RETRIES="0")
    services.start_web()
    return services


def _timed(method, url, **kwargs):
    started = time.perf_counter()
    response = requests.request(method, url, timeout=5, **kwargs)
    return response, (time.perf_counter() - started) * 1000


def test_health_and_setup_answer_fast_without_a_model(web):
    health = [_timed("GET", web.url + "/health") for _ in range(20)]
    setup = [_timed("POST", web.url + "/setup",
                    json={"project": "3.1700000000", "schema": CONFIG, "hostname": "http://ls",
                          "access_token": "x", "extra_params": {}}) for _ in range(20)]
    assert all(r.status_code == 200 for r, _ in health + setup)
    assert health[0][0].json()["status"] == "UP"
    assert setup[0][0].json() == {"model_version": "untrained", "controls": ["sentiment"],
                                  "ignored_controls": []}
    assert statistics.median(ms for _, ms in health) < 50
    assert statistics.median(ms for _, ms in setup) < 50


def test_predict_before_any_model_gives_one_valid_result_per_task(web):
    tasks = [{"id": i, "data": {"text": f"text {i}"}} for i in range(5)]
    response = requests.post(web.url + "/predict", json={"tasks": tasks, "project": "3.17",
                                                          "label_config": CONFIG}, timeout=10)
    assert response.status_code == 200
    results = response.json()["results"]
    assert len(results) == 5
    assert results == [[]] * 5  # nothing for Label Studio to store (README: /predict)


# Bad input and its 4xx messages: tests/test_http_contract.py (Flask's test client).


def test_events_that_do_not_change_annotations_are_ignored(web):
    for action in ("PROJECT_UPDATED", "TASKS_DELETED", "LABEL_LINK_CREATED"):
        response = requests.post(web.url + "/webhook", json={"action": action, "project": {"id": 4}}, timeout=5)
        assert response.status_code == 200
        assert response.json()["status"] == "ignored"
    assert requests.get(web.url + "/jobs/4", timeout=5).json()["requested"] == 0


def test_tasks_created_queues_one_encoding_job(web):
    event = {"action": "TASKS_CREATED", "project": {"id": 12}, "tasks": [{"id": 1}]}
    first = requests.post(web.url + "/webhook", json=event, timeout=5).json()
    second = requests.post(web.url + "/webhook", json=event, timeout=5).json()
    assert first["status"] == "queued" and first["job_id"].startswith("encode-12-")
    assert second["status"] == "coalesced"
    # Encoding is not a retrain.
    assert requests.get(web.url + "/jobs/12", timeout=5).json()["requested"] == 0


def test_webhooks_coalesce_into_one_waiting_job_and_acknowledge_fast(web):
    timings, statuses = [], []
    for _ in range(10):
        response, ms = _timed("POST", web.url + "/webhook",
                              json={"action": "ANNOTATION_CREATED", "project": {"id": 8},
                                    "annotation": {"id": 1, "project": 8}})
        timings.append(ms)
        statuses.append(response.json()["status"])
    # No worker runs: the first event queues a job, the other nine find it waiting.
    assert statuses == ["queued"] + ["coalesced"] * 9
    assert statistics.median(timings) < 50
    jobs = requests.get(web.url + "/jobs/8", timeout=5).json()
    assert jobs["waiting"] and jobs["running"] is None and jobs["requested"] == 1
    assert jobs["coalesced"] == 9
    metrics = samples(requests.get(web.url + "/metrics", timeout=5).text)
    assert metrics[("atl_events_coalesced_total", (("project", "8"),))] == 9


def test_a_failing_job_is_visible_and_the_next_event_queues_again(web):
    requests.post(web.url + "/webhook", json={"action": "START_TRAINING", "project": {"id": 9}}, timeout=5)
    web.start_worker()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        jobs = requests.get(web.url + "/jobs/9", timeout=5).json()
        if jobs["failed"]:
            break
        time.sleep(0.5)
    assert jobs["failed"] == 1, web.log_tail("worker.log")
    # Label Studio at 127.0.0.1:9 refuses connections: the error says what to check.
    assert "Label Studio" in jobs["last"]["error"] and "reachable" in jobs["last"]["error"]
    assert jobs["waiting"] is None and jobs["running"] is None
    again = requests.post(web.url + "/webhook", json={"action": "ANNOTATION_UPDATED", "project": {"id": 9}},
                          timeout=5)
    assert again.json()["status"] == "queued"
    metrics = samples(requests.get(web.url + "/metrics", timeout=5).text)
    assert metrics[("atl_jobs_total", (("outcome", "failed"), ("project", "9")))] == 1


def test_versions_route(web):
    response = requests.get(web.url + "/versions", json={"project": "5.123"}, timeout=5)
    assert response.status_code == 200
    assert response.json()["versions"] == []


def test_basic_auth_and_webhook_secret(services):
    services.env.update(BASIC_AUTH_USER="ls", BASIC_AUTH_PASS="s3cret-pass", WEBHOOK_SECRET="hook-token",
                        MAX_BODY_MB="1")
    services.start_web()
    url = services.url
    assert requests.get(url + "/health", timeout=5).status_code == 200  # always open
    setup = {"project": "1.1"}
    assert requests.post(url + "/setup", json=setup, timeout=5).status_code == 401
    assert requests.post(url + "/setup", json=setup, auth=("ls", "wrong"), timeout=5).status_code == 401
    assert requests.post(url + "/setup", json=setup, auth=("ls", "s3cret-pass"), timeout=5).status_code == 200
    assert requests.get(url + "/metrics", timeout=5).status_code == 401
    event = {"action": "ANNOTATION_CREATED", "project": {"id": 2}}
    # Label Studio's auto-created webhook: no auth header, the secret in its URL.
    assert requests.post(url + "/webhook", json=event, timeout=5).status_code == 401
    assert requests.post(url + "/webhook?secret=nope", json=event, timeout=5).status_code == 401
    assert requests.post(url + "/webhook?secret=hook-token", json=event, timeout=5).status_code == 201
    # Label Studio's START_TRAINING call uses the connection's Basic auth.
    start = {"action": "START_TRAINING", "project": {"id": 2}}
    assert requests.post(url + "/webhook", json=start, auth=("ls", "s3cret-pass"), timeout=5).ok
    # Oversized bodies: 413 with a JSON message.
    big = requests.post(url + "/predict", data=b"x" * (2 * 1024 * 1024), auth=("ls", "s3cret-pass"),
                        headers={"Content-Type": "application/json"}, timeout=10)
    assert big.status_code == 413 and "error" in big.json()
    # The password never reaches the log.
    assert "s3cret-pass" not in services.log_tail("web.log", 10**6)


def _webhook(project_id: int, n: int = 0) -> bytes:
    return json.dumps({"action": "ANNOTATION_CREATED", "project": {"id": project_id, "title": "t"},
                       "annotation": {"id": n, "project": project_id, "task": n, "result": []}}).encode()


async def _concurrent_webhooks(port: int, bodies: list[bytes]) -> list[tuple[int, dict]]:
    """Each body on its own connection, all opened at once, as Label Studio sends a burst."""
    async def one(body):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"POST /webhook HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        await writer.drain()
        answer = await reader.read()
        writer.close()
        head, _, payload = answer.partition(b"\r\n\r\n")
        return int(head.split(b" ", 2)[1]), json.loads(payload)

    return await asyncio.gather(*(one(b) for b in bodies))


def test_a_burst_of_200_concurrent_webhooks_is_one_queued_retrain(web):
    answers = asyncio.run(_concurrent_webhooks(web.port, [_webhook(41, n=i) for i in range(200)]))
    statuses = [status for status, _ in answers]
    assert statuses.count(201) == 1 and statuses.count(200) == 199, statuses
    jobs = {payload["job_id"] for _, payload in answers}
    assert len(jobs) == 1
    state = requests.get(web.url + "/jobs/41", timeout=5).json()
    assert state["requested"] == 1 and state["coalesced"] == 199 and state["waiting"] == jobs.pop()


def test_redis_down_is_a_fast_503_and_webhooks_work_again_when_it_is_back(web):
    url = web.url + "/webhook"
    assert requests.post(url, data=_webhook(45), timeout=5).status_code == 201
    port = int(web.redis_url.rsplit(":", 1)[1].split("/")[0])
    web.stop_redis()
    started = time.perf_counter()
    down = [requests.post(url, data=_webhook(45), timeout=10) for _ in range(5)]
    assert [r.status_code for r in down] == [503] * 5
    assert all("Redis" in r.json()["error"] for r in down)
    assert time.perf_counter() - started < 10
    web.start_redis(port)
    # Each worker skips Redis for 1 s after a failure and drops a broken connection on first
    # use, so a few 503s may follow the restart; then every webhook is acknowledged again.
    deadline, in_a_row = time.monotonic() + 20, 0
    while in_a_row < 20:
        assert time.monotonic() < deadline, web.log_tail("web.log")
        status = requests.post(url, data=_webhook(45), timeout=10).status_code
        assert status in (200, 201, 503)
        in_a_row = in_a_row + 1 if status != 503 else 0
        time.sleep(0.1)


def test_a_stale_enqueue_lock_stalls_only_its_own_project(web):
    """A process that died holding a project's enqueue lock (it expires after 10 s): that
    project's webhook waits for it and gets a 503, while the other gunicorn worker keeps
    answering webhooks of other projects at once."""
    Redis.from_url(web.redis_url).set(key(48, "enqueue"), "a-dead-process", px=8000)
    blocked = {}

    def blocked_webhook():
        started = time.perf_counter()
        blocked["answer"] = requests.post(web.url + "/webhook", data=_webhook(48), timeout=30)
        blocked["seconds"] = time.perf_counter() - started

    thread = threading.Thread(target=blocked_webhook)
    thread.start()
    time.sleep(0.5)  # it is waiting for the lock now
    for i in range(20):
        started = time.perf_counter()
        answer = requests.post(web.url + "/webhook", data=_webhook(49, n=i), timeout=5)
        assert answer.status_code in (200, 201)
        assert time.perf_counter() - started < 1
    thread.join(30)
    assert blocked["answer"].status_code == 503, blocked["answer"].text
    assert "Redis" in blocked["answer"].json()["error"]
    assert 4 < blocked["seconds"] < 15


def test_webhook_allowed_takes_the_secret_or_basic_auth():
    def settings(secret="", user="", password=""):
        return SimpleNamespace(webhook_secret=secret, basic_auth_user=user, basic_auth_pass=password)

    assert webhook_allowed(settings(), "", None)
    assert webhook_allowed(settings(secret="k"), "k", None)
    assert not webhook_allowed(settings(secret="k"), "x", None)
    assert not webhook_allowed(settings(secret="k"), "", None)
    assert webhook_allowed(settings(secret="k", user="u", password="p"), "", ("u", "p"))
    assert not webhook_allowed(settings(secret="k", user="u", password="p"), "", ("u", "x"))
    assert webhook_allowed(settings(user="u", password="p"), "", ("u", "p"))
    assert not webhook_allowed(settings(user="u", password="p"), "", None)
