"""The Label Studio client: its one retry layer, idempotent uploads, and reading tasks.

The retry rules are checked against a throwaway local HTTP server that answers what each
test scripts (a 503, a dropped connection, a 401...), so every request the client really
sends is counted, the SDK's own retries included, were they on. Uploads and reading tasks
are checked against the real Label Studio (`label_studio` fixture), through the TCP proxy
that loses one answer or one request for real.
"""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
from datetime import UTC, datetime
from urllib.parse import urlparse

import pytest

from backend.label_studio import LabelStudioError, LabelStudioProject, RetryPolicy
from backend.ml_backend import PROJECT_FIELDS
from backend.settings import Settings
from backend.task_store import TaskStore
from tests.support.tcp_proxy import TcpProxy

FAST = RetryPolicy(attempts=3, first_delay=0.05, factor=2.0)


# --------------------------------------------------------------------------- a scripted server


class ScriptedServer:
    """Answers request n with script[n] (the last entry repeats): an HTTP status, a
    (status, headers) pair, or "hangup" (close the connection without an answer)."""

    def __init__(self, script):
        self.script = list(script)
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                outer.requests.append(f"{self.command} {self.path}")
                step = outer.script[min(len(outer.requests), len(outer.script)) - 1]
                if step == "hangup":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                status, headers = step if isinstance(step, tuple) else (step, {})
                body = json.dumps({"id": 1, "title": "scripted"} if status == 200
                                  else {"detail": f"scripted {status}"}).encode()
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_PATCH = do_POST = do_GET

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def scripted():
    servers = []

    def start(*script):
        server = ScriptedServer(script)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def _project(url, retry=FAST, project_id=1):
    # Not a JWT: the SDK sends it as a legacy token and asks nothing else of the server.
    return LabelStudioProject(Settings(label_studio_url=url, label_studio_api_key="legacy-token"),
                              project_id, retry=retry)


@pytest.mark.parametrize("fault", [503, 502, 500, 429, 408, "hangup"])
def test_transient_faults_are_retried_until_an_answer(scripted, fault):
    server = scripted(fault, fault, 200)
    assert _project(server.url).project()["id"] == 1
    # Three requests in all: ours are the only retries (the SDK's are off).
    assert len(server.requests) == 3, server.requests


@pytest.mark.parametrize("status,hint", [(400, "scripted 400"), (401, "LABEL_STUDIO_API_KEY"),
                                         (403, "LABEL_STUDIO_API_KEY"), (404, "still exist"),
                                         (409, "409")])
def test_final_answers_are_raised_at_once_with_what_to_check(scripted, status, hint):
    server = scripted(status, 200)
    with pytest.raises(LabelStudioError) as raised:
        _project(server.url).project()
    assert len(server.requests) == 1
    assert not raised.value.retryable and raised.value.status == status
    assert hint in str(raised.value)


def test_gives_up_after_the_policy_attempts(scripted):
    server = scripted(503)
    ls = _project(server.url)
    with pytest.raises(LabelStudioError) as raised:
        ls.project()
    assert len(server.requests) == FAST.attempts
    assert raised.value.retryable and raised.value.retried and raised.value.status == 503


def test_retry_after_replaces_the_computed_backoff(scripted):
    server = scripted((503, {"Retry-After": "0.2"}), 200)
    slow = RetryPolicy(attempts=2, first_delay=20.0)  # would wait 10-20 s without the header
    started = time.monotonic()
    assert _project(server.url, retry=slow).project()["id"] == 1
    assert time.monotonic() - started < 8
    assert len(server.requests) == 2


def test_unreachable_label_studio_is_retried_with_bounded_backoff():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: connections are refused
    policy = RetryPolicy(attempts=3, first_delay=0.4, factor=2.0)
    started = time.monotonic()
    with pytest.raises(LabelStudioError) as raised:
        _project(f"http://127.0.0.1:{port}", retry=policy).project()
    elapsed = time.monotonic() - started
    # Two waits, each at least half its nominal 0.4 s and 0.8 s; far less than a minute.
    assert 0.6 <= elapsed < 30, elapsed
    assert raised.value.retryable and raised.value.status is None
    assert "LABEL_STUDIO_URL" in str(raised.value)


def test_delay_grows_by_factor_is_jittered_down_and_capped():
    policy = RetryPolicy(attempts=10, first_delay=1.0, factor=3.0, max_delay=20.0)
    for attempt, nominal in [(1, 1.0), (2, 3.0), (3, 9.0), (4, 20.0), (8, 20.0)]:
        delays = [policy.delay(attempt) for _ in range(200)]
        assert all(nominal / 2 <= d <= nominal for d in delays), (attempt, min(delays), max(delays))
        assert max(delays) - min(delays) > 0  # jittered, so workers do not retry in step
    capped = LabelStudioError("x", retryable=True, retry_after=600.0)
    assert policy.delay(1, capped) == 20.0


def test_errors_that_are_not_label_studio_faults_are_not_retried():
    calls = []

    class Projects:
        def get(self, id, request_options=None):
            calls.append(id)
            raise ZeroDivisionError("a bug of ours")

    class Client:
        projects = Projects()

    ls = LabelStudioProject(Settings(label_studio_url="http://127.0.0.1:9", label_studio_api_key="k"), 3,
                            client=Client(), retry=FAST)
    with pytest.raises(ZeroDivisionError):
        ls.project()
    assert calls == [3]


def test_a_missing_api_key_says_what_to_set():
    ls = LabelStudioProject(Settings(label_studio_url="http://127.0.0.1:9", label_studio_api_key=""), 1)
    with pytest.raises(LabelStudioError, match="LABEL_STUDIO_API_KEY is not set"):
        ls.project()


# --------------------------------------------------------------------------- real Label Studio

CONFIG = """<View>
  <Text name="text" value="$text"/>
  <Choices name="label" toName="text" choice="single">
    <Choice value="A"/>
    <Choice value="B"/>
  </Choices>
</View>"""
RESULT = [{"from_name": "label", "to_name": "text", "type": "choices", "value": {"choices": ["A"]}}]


def _client(label_studio):
    from label_studio_sdk.client import LabelStudio

    return LabelStudio(base_url=label_studio.url, api_key=label_studio.api_key)


def _new_project(client, n_tasks):
    project = client.projects.create(title=f"client {time.time():.3f}", label_config=CONFIG)
    client.projects.import_tasks(id=project.id, request=[{"text": f"text {i}"} for i in range(n_tasks)])
    return project.id


def _through(proxy, label_studio, project_id):
    settings = Settings(label_studio_url=proxy.url, label_studio_api_key=label_studio.api_key)
    return LabelStudioProject(settings, project_id, retry=RetryPolicy(attempts=4, first_delay=0.2))


def _proxy(label_studio):
    url = urlparse(label_studio.url)
    return TcpProxy(url.hostname, url.port)


def _project_behind_proxy(label_studio, n_tasks):
    """(SDK client, a new project of `n_tasks` tasks, a proxy in front of Label Studio that
    can break requests, our client for the project through that proxy)."""
    client = _client(label_studio)
    project_id = _new_project(client, n_tasks)
    proxy = _proxy(label_studio)
    return client, project_id, proxy, _through(proxy, label_studio, project_id)


def _predictions_per_task(client, project_id, version):
    """{task id: its predictions of `version`}, read straight from Label Studio."""
    return {t.id: [p for p in t.predictions if p.model_version == version]
            for t in client.tasks.list(project=project_id, fields="all", page_size=1000)}


def _predictions(task_ids, version):
    return [{"task": i, "result": RESULT, "score": 0.25, "model_version": version} for i in task_ids]


@pytest.mark.e2e
def test_the_retrains_project_read_and_the_switch_ask_label_studio_for_few_fields(label_studio):
    """`include` keeps Label Studio from counting every prediction of the project for the
    retrain's read and for the answer to the switch; what the retrain reads is still there,
    and every LabelStudioProject of one URL and key uses the process's one SDK client."""
    client = _client(label_studio)
    project_id = _new_project(client, 4)
    settings = Settings(label_studio_url=label_studio.url, label_studio_api_key=label_studio.api_key)
    ls = LabelStudioProject(settings, project_id)
    full, some = ls.project(), ls.project(PROJECT_FIELDS)
    # The SDK's model lists every field; Label Studio answered only those asked for.
    assert full["total_predictions_number"] == 0 and some["total_predictions_number"] is None
    assert {name for name, value in some.items() if value is not None} <= set(PROJECT_FIELDS), some
    assert {name: some[name] for name in PROJECT_FIELDS} == {name: full[name] for name in PROJECT_FIELDS}
    assert some["task_number"] == 4 and "<Choices" in some["label_config"]
    sampling = ls.project(("id", "sampling"))
    assert {name: value for name, value in sampling.items() if value is not None} == \
        {"id": project_id, "sampling": full["sampling"]}

    client.projects.import_predictions(id=project_id, request=_predictions(ls.task_ids(), "v0003-20261202-090000"))
    ls.set_model_version("v0003-20261202-090000")
    assert client.projects.get(id=project_id).model_version == "v0003-20261202-090000"
    assert LabelStudioProject(settings, project_id).client is ls.client
    other_key = Settings(label_studio_url=label_studio.url, label_studio_api_key=label_studio.api_key + "x")
    assert LabelStudioProject(other_key, project_id)._shared_client() is not ls.client


@pytest.mark.e2e
def test_lost_requests_and_answers_mid_upload_leave_one_prediction_per_task(label_studio):
    client, project_id, proxy, ls = _project_behind_proxy(label_studio, 120)
    ids = ls.task_ids()
    version = "v0007-20261201-120000"
    bulk = _predictions(ids[:100], version)
    one_by_one = [dict(p, cluster=3, mislabeling=0.5) for p in _predictions(ids[100:], version)]

    # Chunks of 25: the 2nd import loses its answer after Label Studio stored it, the 3rd
    # dies on its way; the 3rd single create loses its answer, the 5th dies on its way.
    proxy.drop_next(b"/import/predictions", when="response", skip=1)
    proxy.drop_next(b"/import/predictions", when="request", skip=2)
    proxy.drop_next(b"POST /api/predictions", when="response", skip=2)
    proxy.drop_next(b"POST /api/predictions", when="request", skip=4)
    ls.publish_predictions(bulk, one_by_one, chunk=25)

    assert proxy.faults_fired() == 4
    # Label Studio did store the requests whose answers were lost: a blind retry would
    # have stored them twice.
    assert len(proxy.dropped_responses) == 2
    assert all(r.startswith(b"HTTP/1.1 201") for r in proxy.dropped_responses), proxy.dropped_responses
    stored = _predictions_per_task(client, project_id, version)
    counts = {task_id: len(predictions) for task_id, predictions in stored.items()}
    assert sorted(counts) == sorted(ids)
    assert all(count == 1 for count in counts.values()), \
        {task_id: count for task_id, count in counts.items() if count != 1}
    # The single-prediction path kept what only it can carry.
    assert all(stored[i][0].cluster == 3 for i in ids[100:])


@pytest.mark.e2e
def test_an_access_token_that_expires_in_flight_is_refreshed_and_the_request_sent_again(label_studio):
    """The SDK refreshes its short-lived access token only before a send; a request that
    reaches Label Studio after the token expired gets a real 401. That one is retried (the
    SDK then refreshes), where a 401 for a bad key stays final (`test_final_answers_...`)."""
    import jwt

    from tests.support.label_studio import SECRET_KEY

    client, project_id, proxy, ls = _project_behind_proxy(label_studio, 3)
    assert ls.project()["id"] == project_id  # connected: the SDK holds a real access token
    tokens = ls.client._client_wrapper._tokens_client
    claims = jwt.decode(tokens._access_token, options={"verify_signature": False})
    assert claims.get("token_type") == "access"
    # The same token, signed by the server's key, but valid for 2 more seconds only; the
    # proxy holds the next request for 4, so it arrives expired.
    claims["exp"] = int(time.time()) + 2
    tokens._set_access_token(jwt.encode(claims, SECRET_KEY, algorithm="HS256"))
    proxy.delay_next(b"GET /api/projects/", seconds=4)

    assert ls.project()["id"] == project_id
    assert proxy.faults_fired() == 1
    assert tokens._access_token_expiration > datetime.now(UTC)  # refreshed


@pytest.mark.e2e
def test_an_inline_upload_without_the_first_listing_still_stores_each_prediction_once(label_studio):
    """A retrain's own publish skips the listing of what is stored (its version is new), so
    only the chunk retry protects it: answers lost after Label Studio stored a chunk, and a
    chunk lost on its way, must still leave exactly one prediction per task."""
    client, project_id, proxy, ls = _project_behind_proxy(label_studio, 80)
    ids = ls.task_ids()
    version = "v0009-20261202-010000"
    proxy.drop_next(b"/import/predictions", when="response", skip=0)
    proxy.drop_next(b"/import/predictions", when="request", skip=2)
    ls.upload_predictions(_predictions(ids, version), chunk=20, sent_before=False)

    assert proxy.faults_fired() == 2
    assert all(r.startswith(b"HTTP/1.1 201") for r in proxy.dropped_responses), proxy.dropped_responses
    counts = {t: len(p) for t, p in _predictions_per_task(client, project_id, version).items()}
    assert sorted(counts) == sorted(ids)
    assert all(count == 1 for count in counts.values()), {t: c for t, c in counts.items() if c != 1}


@pytest.mark.e2e
def test_publishing_the_same_version_again_sends_only_what_is_missing(label_studio):
    """An RQ retry of a publish job re-sends a version that is partly in Label Studio."""
    client, project_id, proxy, ls = _project_behind_proxy(label_studio, 60)
    ids = ls.task_ids()
    version = "v0003-20261201-130000"
    # Another version whose name contains this one: Label Studio's filter matches it too.
    other = version + "-b"
    ls.publish_predictions(_predictions(ids, other), [], chunk=50)
    ls.publish_predictions(_predictions(ids[:35], version), [], chunk=10)

    ls.publish_predictions(_predictions(ids, version), [], chunk=10)

    counts = {t: len(p) for t, p in _predictions_per_task(client, project_id, version).items()}
    assert all(counts[i] == 1 for i in ids), counts
    assert all(len(p) == 1 for p in _predictions_per_task(client, project_id, other).values())


@pytest.mark.e2e
def test_an_import_label_studio_rejects_is_reported_at_once_with_its_reason(label_studio):
    """The bulk import goes through our own JSON request (`import_predictions_json`), not the
    SDK method: Label Studio's refusal must still come back as one final, explained error,
    and what it accepted must be stored exactly once."""
    client, project_id, proxy, ls = _project_behind_proxy(label_studio, 20)
    ids = ls.task_ids()
    version = "v0004-20261201-140000"
    ls.upload_predictions(_predictions(ids, version), chunk=8)
    stored = _predictions_per_task(client, project_id, version)
    assert [len(stored[i]) for i in ids] == [1] * len(ids)
    assert stored[ids[0]][0].result == RESULT and stored[ids[0]][0].score == 0.25

    foreign = max(ids) + 10_000  # no such task in the project
    retries = []
    with pytest.raises(LabelStudioError, match="import predictions") as raised:
        ls.upload_predictions(_predictions([foreign], "v0005-20261201-140000"), chunk=8,
                              on_retry=lambda n, exc: retries.append(exc))
    assert str(foreign) in str(raised.value)  # Label Studio's reason names the task
    assert retries == []  # a 400 is final: not retried


@pytest.mark.e2e
def test_disputed_labels_imported_in_bulk_get_their_mislabeling_after_the_switch(label_studio):
    """The inline publish path: every prediction through the bulk import (which drops
    `mislabeling` and `cluster`), then one update per disputed label, even where an update's
    answer is lost (sent again: it sets the same values)."""
    from backend.publish import Predictions

    client, project_id, proxy, ls = _project_behind_proxy(label_studio, 30)
    ids = ls.task_ids()
    version = "v0004-20261201-140000"
    disputed = [dict(p, cluster=2, mislabeling=0.75) for p in _predictions(ids[:3], version)]
    predictions = Predictions(bulk=_predictions(ids[3:], version), one_by_one=disputed)
    ls.upload_predictions(predictions.all_in_bulk(), chunk=10)
    before = _predictions_per_task(client, project_id, version)
    assert all(len(before[i]) == 1 for i in ids)
    assert all(not before[i][0].mislabeling for i in ids[:3])  # the bulk import dropped it

    proxy.drop_next(b"PATCH /api/predictions", when="response", skip=1)
    assert ls.mark_disputed(disputed) == 3
    assert proxy.faults_fired() == 1
    after = _predictions_per_task(client, project_id, version)
    assert [(after[i][0].mislabeling, after[i][0].cluster) for i in ids[:3]] == [(0.75, 2)] * 3
    assert all(not after[i][0].mislabeling for i in ids[3:])
    assert [after[i][0].id for i in ids] == [before[i][0].id for i in ids]  # updated, not added


def _log_since(label_studio, offset):
    with open(label_studio.log_path, "rb") as log:
        log.seek(offset)
        return log.read().decode(errors="replace")


@pytest.mark.e2e
def test_reading_tasks_leaves_no_invalid_page_in_label_studio_log(label_studio, tmp_path):
    client, project_id, proxy, ls = _project_behind_proxy(label_studio, 120)
    offset = label_studio.log_path.stat().st_size

    # 120 tasks in pages of 40: a page-number pager asks for page 4, past the end.
    pages = []
    tasks = ls.tasks(page_size=40, progress=pages.append)
    ids = [t["id"] for t in tasks]
    assert ids == sorted(ids) and len(set(ids)) == 120 and pages == [40, 80, 120]
    assert ls.task_ids() == ids
    # A timestamp without microseconds (Label Studio's filter parses only one format).
    assert [t["id"] for t in ls.tasks(updated_after="2000-01-01T00:00:00Z")] == ids

    # The task store's three reads: full, incremental, and the id listing after a deletion.
    store = TaskStore(tmp_path, project_id)
    all_tasks, info = store.sync(ls, ls.project()["task_number"])
    assert info["mode"] == "full" and len(all_tasks) == 120
    for task_id in ids[:3]:
        client.annotations.create(id=task_id, result=RESULT)
    client.tasks.delete(id=ids[-1])
    all_tasks, info = store.sync(ls, ls.project()["task_number"])
    assert info["mode"] == "incremental" and info["deleted"] == 1, info
    assert 3 <= info["read"] < 120, info
    assert [t["id"] for t in all_tasks] == ids[:-1]
    assert all(t["annotations"] for t in all_tasks if t["id"] in ids[:3])

    log = _log_since(label_studio, offset)
    assert "Invalid page" not in log, log[-3000:]
    assert "[ERROR]" not in log, log[-3000:]
    assert "GET /api/tasks/" in log  # the reads did reach this server's log


@pytest.mark.e2e
def test_an_idle_project_loses_its_oldest_too_large_superseded_version(label_studio, tmp_path):
    """Versions too large to delete right after a switch (PRUNE_MAX_PREDICTIONS) are deleted
    by the reconcile once the live version is PRUNE_IDLE_MINUTES old, one per run, the
    rollback version and the live one kept."""
    import os

    from backend.model_store import ModelStore
    from backend.publish import prune_when_idle

    client = _client(label_studio)
    project_id = _new_project(client, 6)
    settings = Settings(label_studio_url=label_studio.url, label_studio_api_key=label_studio.api_key,
                        prune_max_predictions=4, prune_idle_minutes=30, keep_prediction_versions=1)
    ls = LabelStudioProject(settings, project_id)
    ids = ls.task_ids()
    versions = [f"v000{n}-20261202-0{n}0000" for n in (1, 2, 3, 4)]
    for version in versions:
        ls.upload_predictions(_predictions(ids, version), chunk=10)
    store = ModelStore(tmp_path / "models")
    pointer = store.project_dir(project_id) / "CURRENT"
    pointer.parent.mkdir(parents=True)
    pointer.write_text(versions[-1] + "\n")  # live: the newest, switched just now

    assert prune_when_idle(ls, store, settings) == {}  # someone may be annotating
    assert set(ls.prediction_versions()) == set(versions)

    half_an_hour_ago = pointer.stat().st_mtime - 31 * 60
    os.utime(pointer, (half_an_hour_ago, half_an_hour_ago))
    never = Settings(**dict(settings.model_dump(), prune_idle_minutes=0))
    assert prune_when_idle(ls, store, never) == {}  # PRUNE_IDLE_MINUTES=0: never
    assert set(ls.prediction_versions()) == set(versions)
    assert prune_when_idle(ls, store, settings) == {versions[0]: 6}
    assert prune_when_idle(ls, store, settings) == {versions[1]: 6}
    # What is left: the live version and the one kept for a rollback.
    assert prune_when_idle(ls, store, settings) == {}
    assert ls.prediction_versions() == {versions[2]: 6, versions[3]: 6}
