"""The HTTP contract Label Studio 1.23 speaks, through Flask's test client.

These cases need no server, Redis or model: shapes of answers, status codes and messages.
What depends on a real server (gunicorn workers, Redis, timing, raw HTTP framing) is in
tests/test_service.py and tests/test_fuzz.py.
"""

from __future__ import annotations

import base64

import pytest

from backend.app import create_app
from backend.settings import Settings

CONFIG = ('<View><Text name="text" value="$text"/><Choices name="sentiment" toName="text">'
          '<Choice value="Positive"/><Choice value="Negative"/></Choices></View>')


def make_client(tmp_path, **overrides):
    settings = Settings.from_env(data_dir=tmp_path, redis_url="", **overrides)
    return create_app(settings).test_client()


@pytest.fixture
def client(tmp_path):
    return make_client(tmp_path)


def basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_health_names_the_model_class(client):
    response = client.get("/health")
    assert response.status_code == 200
    assert response.get_json() == {"status": "UP", "model_class": "ActiveTransferLearning"}


def test_setup_answers_the_current_version_before_any_model(client):
    response = client.post("/setup", json={"project": "3.1700000000", "schema": CONFIG,
                                           "hostname": "http://ls", "access_token": "x",
                                           "extra_params": {}})
    assert response.status_code == 200
    assert response.get_json() == {"model_version": "untrained", "controls": ["sentiment"],
                                   "ignored_controls": []}


def test_setup_names_the_controls_it_learns_and_those_it_ignores(client):
    schema = ('<View><Text name="title" value="$title"/><Text name="body" value="$body"/>'
              '<Choices name="topic" toName="title,body" choice="multiple">'
              '<Choice value="film"/><Choice value="music"/><Choice value="sport"/></Choices>'
              '<Choices name="urgency" toName="body"><Choice value="low"/><Choice value="high"/></Choices>'
              '<TextArea name="comment" toName="body"/></View>')
    response = client.post("/setup", json={"project": "3", "schema": schema})
    assert response.status_code == 200
    answer = response.get_json()
    assert answer["controls"] == ["topic", "urgency"]
    assert [(c["name"], c["tag"]) for c in answer["ignored_controls"]] == [("comment", "TextArea")]
    assert "only <Choices>" in answer["ignored_controls"][0]["reason"]


def test_predict_answers_one_entry_per_task_in_order(client):
    tasks = [{"id": i, "data": {"text": f"text {i}"}} for i in range(7)]
    response = client.post("/predict", json={"tasks": tasks, "project": "3.17", "label_config": CONFIG,
                                             "params": {"login": None, "password": None, "context": None}})
    assert response.status_code == 200
    results = response.get_json()["results"]
    assert len(results) == len(tasks)
    # Before the first model: an empty list of predictions per task, which Label Studio
    # stores nothing for (a result without a model would show up as a version card).
    assert results == [[] for _ in tasks]


def test_predict_with_no_tasks_answers_an_empty_list(client):
    response = client.post("/predict", json={"tasks": [], "project": "3"})
    assert response.status_code == 200 and response.get_json() == {"results": []}


@pytest.mark.parametrize(
    "path, body, fragment",
    [
        ("/predict", b"{not json", "must be JSON"),
        ("/predict", b"[1, 2]", "JSON object"),
        ("/predict", b'{"project": "1.2"}', "'tasks' must be a list"),
        ("/predict", b'{"tasks": [1, 2], "project": "1.2"}', "'tasks' must be a list"),
        ("/predict", b'{"tasks": [], "project": "abc"}', "project id"),
        ("/predict", b'{"tasks": [], "project": "0"}', "out of range"),
        ("/setup", b'{"schema": ""}', "missing 'project'"),
        ("/webhook", b'{"project": {"id": 1}}', "missing 'action'"),
        ("/webhook", b'{"action": "ANNOTATION_CREATED"}', "missing 'project'"),
        ("/webhook", b'{"action": "ANNOTATION_CREATED", "project": {"id": "x"}}', "project id"),
    ],
)
def test_bad_input_gets_a_400_with_a_message(client, path, body, fragment):
    response = client.post(path, data=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert fragment in response.get_json()["error"]


def test_an_unsupported_label_config_is_refused_at_setup_with_what_to_change(client):
    schema = '<View><Image name="i" value="$i"/><RectangleLabels name="b" toName="i"/></View>'
    response = client.post("/setup", json={"project": "1.1", "schema": schema})
    assert response.status_code == 400
    assert "Choices" in response.get_json()["error"]


def test_webhook_ignores_events_that_change_no_annotations_without_redis(client):
    for action in ("PROJECT_UPDATED", "TASKS_DELETED", "LABEL_LINK_CREATED"):
        response = client.post("/webhook", json={"action": action, "project": {"id": 4}})
        assert response.status_code == 200
        assert response.get_json()["status"] == "ignored"


def test_a_training_event_without_a_job_queue_is_a_503_not_a_crash(client):
    response = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 4}})
    assert response.status_code == 503
    assert "REDIS_URL" in response.get_json()["error"]


def test_versions_accepts_the_project_in_the_query_or_the_body(client):
    by_query = client.get("/versions?project=5.1700000000")
    by_body = client.get("/versions", json={"project": "5.1700000000"})
    assert by_query.status_code == by_body.status_code == 200
    assert by_query.get_json() == by_body.get_json() == {"versions": [], "current": None}


def test_oversized_body_is_a_413(tmp_path):
    client = make_client(tmp_path, max_body_mb=1)
    response = client.post("/predict", data=b"x" * (1024 * 1024 + 10),
                           headers={"Content-Type": "application/json"})
    assert response.status_code == 413


def test_unknown_routes_and_methods_answer_json(client):
    missing = client.get("/nope")
    wrong_method = client.get("/predict")
    assert missing.status_code == 404 and "error" in missing.get_json()
    assert wrong_method.status_code == 405 and "error" in wrong_method.get_json()


class TestBasicAuth:
    @pytest.fixture
    def client(self, tmp_path):
        return make_client(tmp_path, basic_auth_user="ls", basic_auth_pass="pw")

    def test_health_is_open_everything_else_needs_the_credentials(self, client):
        assert client.get("/health").status_code == 200
        refused = client.post("/setup", json={"project": "1"})
        assert refused.status_code == 401
        assert refused.headers["WWW-Authenticate"].startswith("Basic")
        assert "BASIC_AUTH_USER" in refused.get_json()["error"]
        assert client.post("/setup", json={"project": "1"}, headers=basic("ls", "wrong")).status_code == 401
        assert client.post("/setup", json={"project": "1"}, headers=basic("ls", "pw")).status_code == 200

    def test_webhook_accepts_basic_auth_as_label_studio_sends_it_for_start_training(self, client):
        body = {"action": "PROJECT_UPDATED", "project": {"id": 1}}
        assert client.post("/webhook", json=body).status_code == 401
        assert client.post("/webhook", json=body, headers=basic("ls", "pw")).status_code == 200


class TestWebhookSecret:
    @pytest.fixture
    def client(self, tmp_path):
        return make_client(tmp_path, webhook_secret="s3cret")

    def test_the_auto_created_webhook_carries_the_secret_in_its_url(self, client):
        body = {"action": "PROJECT_UPDATED", "project": {"id": 1}}
        missing = client.post("/webhook", json=body)
        assert missing.status_code == 401 and "secret" in missing.get_json()["error"]
        assert client.post("/webhook?secret=wrong", json=body).status_code == 401
        assert client.post("/webhook?secret=s3cret", json=body).status_code == 200
        # Routes other than /webhook stay open without Basic auth configured.
        assert client.post("/setup", json={"project": "1"}).status_code == 200
