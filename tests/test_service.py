"""The HTTP contract and the queue, against a real redis-server, gunicorn and rq worker."""

import statistics
import time

import pytest
import requests

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
    assert setup[0][0].json() == {"model_version": "untrained"}
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


@pytest.mark.parametrize(
    "path, body, fragment",
    [
        ("/predict", b"{not json", "must be JSON"),
        ("/predict", b"[1, 2]", "JSON object"),
        ("/predict", b'{"project": "1.2"}', "'tasks' must be a list"),
        ("/predict", b'{"tasks": [], "project": "abc"}', "project id"),
        ("/setup", b'{"project": "1.1", "schema": "<View><Image name=\\"i\\" value=\\"$i\\"/></View>"}',
         "supports a label config"),
        ("/webhook", b'{"project": {"id": 1}}', "missing 'action'"),
        ("/webhook", b'{"action": "ANNOTATION_CREATED"}', "missing 'project'"),
        ("/webhook", b'{"action": "ANNOTATION_CREATED", "project": {"id": "x"}}', "project id"),
    ],
)
def test_bad_input_gets_a_4xx_json_message(web, path, body, fragment):
    response = requests.post(web.url + path, data=body, timeout=5,
                             headers={"Content-Type": "application/json"})
    assert 400 <= response.status_code < 500
    assert fragment in response.json()["error"]
    assert "Traceback" not in response.text


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
    metrics = requests.get(web.url + "/metrics", timeout=5).text
    assert 'atl_events_coalesced_total{project="8"} 9' in metrics


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
    metrics = requests.get(web.url + "/metrics", timeout=5).text
    assert 'atl_jobs_total{project="9",outcome="failed"} 1' in metrics


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
