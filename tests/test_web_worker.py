"""The gunicorn worker that answers webhooks on an event loop (backend/web_worker.py).

Against real gunicorn and redis-server: a burst is answered by the fast path with the same
bytes the Flask app sends, everything the fast path is not sure about reaches the Flask app,
a stalled client holds nothing up, Redis outages are 503s, and the worker stops on SIGTERM.
"""

import asyncio
import json
import socket
import time
from types import SimpleNamespace

import pytest
import requests

from backend.web_worker import Limits, basic_credentials, parse_webhook_head

def _default_limits() -> Limits:
    from gunicorn.config import Config

    return Limits.of(Config())


LIMITS = _default_limits()


def webhook(project_id: int, action: str = "ANNOTATION_CREATED", n: int = 0) -> bytes:
    return json.dumps({"action": action, "project": {"id": project_id, "title": "t"},
                       "annotation": {"id": n, "project": project_id, "task": n, "result": []}}).encode()


def raw_request(port: int, body: bytes, target: str = "/webhook", extra: str = "") -> bytes:
    return (f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n").encode() + body


def exchange(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes on a new connection and read the whole answer (the server closes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def split(response: bytes) -> tuple[str, dict, bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return lines[0], headers, body


def fast_path_lines(services) -> int:
    return services.log_tail("web.log", 10**7).count("(fast path)")


async def _burst(port: int, requests_: list[bytes]) -> list[bytes]:
    async def one(data):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(data)
        await writer.drain()
        answer = await reader.read()
        writer.close()
        return answer

    return await asyncio.gather(*(one(r) for r in requests_))


@pytest.fixture
def web(services):
    # DEBUG: the worker logs each fast-path answer, which shows who answered.
    services.env.update(LOG_LEVEL="DEBUG", LABEL_STUDIO_URL="http://127.0.0.1:9",
                        LABEL_STUDIO_API_KEY="not-a-token", WEBHOOK_SECRET="s3cret")
    services.start_web()
    return services


def test_a_burst_is_one_queued_retrain_answered_on_the_fast_path(web):
    port = web.port
    answers = asyncio.run(_burst(port, [raw_request(port, webhook(41, n=i), "/webhook?secret=s3cret")
                                        for i in range(200)]))
    statuses = [split(a)[0] for a in answers]
    assert statuses.count("HTTP/1.1 201 CREATED") == 1, statuses
    assert statuses.count("HTTP/1.1 200 OK") == 199, statuses
    jobs = {json.loads(split(a)[2])["job_id"] for a in answers}
    assert len(jobs) == 1
    state = requests.get(web.url + "/jobs/41", auth=None, timeout=5).json()
    assert state["requested"] == 1 and state["coalesced"] == 199 and state["waiting"] == jobs.pop()
    assert fast_path_lines(web) == 200


def test_the_fast_path_answers_byte_for_byte_as_the_sync_worker(web, services):
    port = web.port
    first = exchange(port, raw_request(port, webhook(42), "/webhook?secret=s3cret"))
    fast = exchange(port, raw_request(port, webhook(42), "/webhook?secret=s3cret"))
    assert fast_path_lines(web) == 2
    sync = services.__class__(services.data_dir / "sync", extra_env=dict(services.env))
    sync.env["REDIS_URL"] = services.redis_url
    try:
        sync.start_web(workers=1, worker_class="sync")
        plain = exchange(sync.port, raw_request(sync.port, webhook(42), "/webhook?secret=s3cret"))
        assert "(fast path)" not in sync.log_tail("web.log", 10**7)
    finally:
        sync.stop()

    def without_date(response):
        return b"\r\n".join(line for line in response.split(b"\r\n") if not line.startswith(b"Date: "))

    assert split(first)[0] == "HTTP/1.1 201 CREATED"
    assert without_date(fast) == without_date(plain)
    assert split(fast)[0] == "HTTP/1.1 200 OK" and json.loads(split(fast)[2])["status"] == "coalesced"
    assert set(split(fast)[1]) == {"Server", "Date", "Connection", "Content-Type", "Content-Length"}


def test_what_the_fast_path_is_not_sure_about_reaches_the_app(web):
    port = web.port
    url = web.url + "/webhook"
    assert requests.post(url + "?secret=s3cret", data=webhook(43), timeout=5).status_code == 201
    before = fast_path_lines(web)

    wrong = requests.post(url + "?secret=nope", data=webhook(43), timeout=5)
    assert wrong.status_code == 401 and "secret" in wrong.json()["error"]
    missing = requests.post(url, data=webhook(43), timeout=5)
    assert missing.status_code == 401
    bad = requests.post(url + "?secret=s3cret", data=b'{"action": "ANNOTATION_CREATED"', timeout=5)
    assert bad.status_code == 400 and "JSON" in bad.json()["error"]
    no_project = requests.post(url + "?secret=s3cret", data=b'{"action": "ANNOTATION_CREATED"}', timeout=5)
    assert no_project.status_code == 400 and "project" in no_project.json()["error"]
    ignored = requests.post(url + "?secret=s3cret", data=webhook(43, "PROJECT_UPDATED"), timeout=5)
    assert ignored.json() == {"status": "ignored", "action": "PROJECT_UPDATED"}
    encode = requests.post(url + "?secret=s3cret", data=webhook(43, "TASKS_CREATED"), timeout=5)
    assert encode.status_code == 201 and encode.json()["job_id"].startswith("encode-43-")
    # A chunked body: gunicorn's parser reads it, the app coalesces it.
    chunked = requests.post(url + "?secret=s3cret", data=iter([webhook(43)]), timeout=5)
    assert chunked.status_code == 200 and chunked.json()["status"] == "coalesced"
    # Pipelined: two requests in one write are gunicorn's to parse (it answers the first).
    two = exchange(port, raw_request(port, webhook(43), "/webhook?secret=s3cret") * 2)
    assert split(two)[0] == "HTTP/1.1 200 OK"
    assert fast_path_lines(web) == before  # none of these was answered by the fast path

    assert requests.get(web.url + "/health", timeout=5).json()["status"] == "UP"
    coalesced = requests.post(url + "?secret=s3cret", data=webhook(43), timeout=5)
    assert coalesced.json()["status"] == "coalesced" and fast_path_lines(web) == before + 1
    state = requests.get(web.url + "/jobs/43", timeout=5).json()
    assert state["requested"] == 1 and state["coalesced"] == 3


def test_a_stalled_client_holds_up_no_webhook(web):
    port = web.port
    stalled = []
    for partial in (b"POST /webhook?secret=s3cret HTTP/1.1\r\nContent-Length: 500\r\n\r\n{\"act",
                    b"POST /webhook?secret=s3cret HTTP/1.1\r\nHost: x\r\n",
                    b"GET /heal"):
        for _ in range(2):  # both workers may have one of each
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(partial)
            stalled.append(sock)
    try:
        for i in range(30):
            started = time.perf_counter()
            answer = exchange(port, raw_request(port, webhook(44, n=i), "/webhook?secret=s3cret"))
            assert split(answer)[0] in ("HTTP/1.1 201 CREATED", "HTTP/1.1 200 OK")
            assert time.perf_counter() - started < 2
    finally:
        for sock in stalled:
            sock.close()
    assert requests.get(web.url + "/jobs/44", timeout=5).json()["requested"] == 1


def test_a_worker_busy_on_its_wsgi_thread_leaves_other_requests_to_the_other_worker(web):
    """One worker's WSGI thread is held by a client that stalls mid-request. That worker
    takes at most one more request (which waits); the rest are served by the other worker."""
    from concurrent.futures import ThreadPoolExecutor

    stalled = socket.create_connection(("127.0.0.1", web.port))
    stalled.sendall(b"GET /heal")
    time.sleep(0.5)
    try:
        with ThreadPoolExecutor(max_workers=20) as pool:
            futures = [pool.submit(requests.get, web.url + "/health", timeout=30) for _ in range(20)]
            time.sleep(4)
            answered_while_stalled = sum(f.done() for f in futures)
            stalled.close()
            statuses = [f.result().status_code for f in futures]
    finally:
        stalled.close()
    assert answered_while_stalled >= 19, answered_while_stalled
    assert statuses == [200] * 20


def test_a_request_stuck_past_the_timeout_restarts_its_worker(services):
    """As with gunicorn's sync worker: the stuck worker is replaced, the others serve on."""
    import psutil

    services.start_web(workers=1, extra_args=("--timeout", "3"))
    before = [p.pid for p in psutil.Process(services.web.pid).children()]
    stalled = socket.create_connection(("127.0.0.1", services.port))
    stalled.sendall(b"GET /heal")
    try:
        deadline = time.monotonic() + 30
        while [p.pid for p in psutil.Process(services.web.pid).children()] in (before, []):
            assert time.monotonic() < deadline, services.log_tail("web.log")
            time.sleep(0.2)
    finally:
        stalled.close()
    assert "WORKER TIMEOUT" in services.log_tail("web.log", 10**6)
    deadline = time.monotonic() + 30
    while True:
        try:
            if requests.get(services.url + "/health", timeout=2).ok:
                break
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_redis_down_is_a_503_and_webhooks_work_again_when_it_is_back(web, services):
    url = web.url + "/webhook?secret=s3cret"
    assert requests.post(url, data=webhook(45), timeout=5).status_code == 201
    port = int(services.redis_url.rsplit(":", 1)[1].split("/")[0])
    services.stop_redis()
    started = time.perf_counter()
    down = [requests.post(url, data=webhook(45), timeout=10) for _ in range(5)]
    assert [r.status_code for r in down] == [503] * 5
    assert all("Redis" in r.json()["error"] for r in down)
    assert time.perf_counter() - started < 10
    services.start_redis(port)
    # Each worker skips Redis for 1 s after a failure and drops a broken connection on first
    # use, so a few 503s may follow the restart; then every webhook is acknowledged again.
    before = fast_path_lines(web)
    deadline, in_a_row = time.monotonic() + 20, 0
    while in_a_row < 20:
        assert time.monotonic() < deadline, web.log_tail("web.log")
        status = requests.post(url, data=webhook(45), timeout=10).status_code
        assert status in (200, 201, 503)
        in_a_row = in_a_row + 1 if status != 503 else 0
        time.sleep(0.1)
    # The fast path answers again (it reloaded its script into the restarted Redis).
    assert fast_path_lines(web) > before


def test_sigterm_stops_the_workers_promptly_after_their_requests(web):
    import psutil

    deadline = time.monotonic() + 30
    while len(workers := psutil.Process(web.web.pid).children()) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert requests.post(web.url + "/webhook?secret=s3cret", data=webhook(46), timeout=5).status_code == 201
    started = time.monotonic()
    web.stop_web()
    assert time.monotonic() - started < 10
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)


def test_max_requests_restarts_a_worker_and_no_webhook_is_lost(services):
    import psutil

    services.start_web(workers=1, extra_args=("--max-requests", "40"))
    first = [p.pid for p in psutil.Process(services.web.pid).children()]
    port = services.port
    statuses = []
    for i in range(100):
        statuses.append(split(exchange(port, raw_request(port, webhook(47, n=i))))[0])
    assert statuses.count("HTTP/1.1 201 CREATED") == 1 and statuses.count("HTTP/1.1 200 OK") == 99
    assert [p.pid for p in psutil.Process(services.web.pid).children()] != first
    assert "Autorestarting worker" in services.log_tail("web.log", 10**6)


# -- the narrow request parser, on plain bytes ----------------------------------------------

def test_limits_follow_gunicorns_normalisation():
    from gunicorn.config import Config

    cfg = Config()
    for name, value in (("limit_request_line", "0"), ("limit_request_field_size", "0"),
                        ("limit_request_fields", "0")):
        cfg.set(name, value)
    limits = Limits.of(cfg)
    # "no limit" in gunicorn still stops at its defaults in the fast path
    assert (limits.request_line, limits.field_size, limits.fields) == (8190, 8190, 32768)
    assert {"x-forwarded-proto", "x-forwarded-ssl", "x-forwarded-protocol"} <= limits.refused_headers


def test_parse_webhook_head_takes_only_plain_webhooks():
    good = b"POST /webhook?secret=a%20b HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\nAuthorization: Basic eDp5"
    hook, length = parse_webhook_head(good, LIMITS)
    assert length == 12 and hook.query == "secret=a%20b" and hook.version == "HTTP/1.1"
    assert hook.headers["authorization"] == "Basic eDp5" and hook.headers["host"] == "x"
    refused = [
        b"POST /webhooks HTTP/1.1\r\nContent-Length: 1",
        b"GET /webhook HTTP/1.1\r\nContent-Length: 1",
        b"POST /webhook HTTP/2.0\r\nContent-Length: 1",
        b"POST /webhook HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1",
        b"POST /webhook HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked",
        b"POST /webhook HTTP/1.1\r\nContent-Length: 1\r\nExpect: 100-continue",
        b"POST /webhook HTTP/1.1\r\nContent-Length: +1",
        b"POST /webhook HTTP/1.1\r\nContent-Length: 1\r\n folded",
        b"POST /webhook HTTP/1.1\r\nContent-Length : 1",
        b"POST /webhook HTTP/1.1\r\nX: a\x00b\r\nContent-Length: 1",
        b"POST /webhook HTTP/1.1\r\nX: \xff\r\nContent-Length: 1",
        b"POST /webhook HTTP/1.1\r\nHost: x",
        b"POST  /webhook HTTP/1.1\r\nContent-Length: 1",
        b"POST /webhook?" + b"a" * 5000 + b" HTTP/1.1\r\nContent-Length: 1",
        # gunicorn answers these with a 400 or 431 (found in review): the app must see them
        b"POST /webhook?secret=s&x=\t HTTP/1.1\r\nContent-Length: 1",
        b"POST /webhook?x=\x01 HTTP/1.1\r\nContent-Length: 1",
        b"POST /webhook?x=\x7f HTTP/1.1\r\nContent-Length: 1",
        b"POST /webhook HTTP/1.1\r\nContent-Length: 1\r\nX: " + b"a" * 8186,
        b"POST /webhook HTTP/1.1\r\nContent-Length: 1\r\nX-Forwarded-Proto: https",
        b"POST /webhook HTTP/1.1\r\nContent-Length: 1\r\nX_Foo: 1",
        b"POST /webhook HTTP/1.1\r\nContent-Length: 1\r\nSCRIPT_NAME: /webhook",
    ]
    for head in refused:
        assert parse_webhook_head(head, LIMITS) is None, head
    many = b"POST /webhook HTTP/1.1\r\nContent-Length: 1" + b"".join(b"\r\nX%d: 1" % i for i in range(100))
    assert parse_webhook_head(many, LIMITS) is None
    assert parse_webhook_head(many, Limits(4094, 200, 8190)) is not None


def test_basic_credentials_are_read_strictly():
    assert basic_credentials("Basic dXNlcjpwYTpzcw==") == ("user", "pa:ss")
    assert basic_credentials("basic dXNlcjpwYTpzcw==") == ("user", "pa:ss")
    assert basic_credentials("Bearer dXNlcjpwYTpzcw==") is None
    assert basic_credentials("Basic not*base64") is None
    assert basic_credentials("Basic dXNlcg==") is None  # no colon
    assert basic_credentials(None) is None


def test_the_fast_path_allows_exactly_what_the_app_allows():
    """webhook_allowed is the one rule both use; here its table."""
    from backend.app import webhook_allowed

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


def test_a_stale_enqueue_lock_stalls_only_its_own_project(web, services):
    """A process that died holding a project's enqueue lock (it expires after 10 s): that
    project's webhook waits in the WSGI app and gets a 503, while webhooks of other projects
    are still answered at once by the loop."""
    import threading

    from redis import Redis

    from backend.job_queue import key

    Redis.from_url(services.redis_url).set(key(48, "enqueue"), "a-dead-process", px=8000)
    blocked = {}

    def blocked_webhook():
        started = time.perf_counter()
        blocked["answer"] = requests.post(web.url + "/webhook?secret=s3cret", data=webhook(48), timeout=30)
        blocked["seconds"] = time.perf_counter() - started

    thread = threading.Thread(target=blocked_webhook)
    thread.start()
    time.sleep(0.5)  # it is waiting for the lock now
    for i in range(20):
        started = time.perf_counter()
        answer = requests.post(web.url + "/webhook?secret=s3cret", data=webhook(49, n=i), timeout=5)
        assert answer.status_code in (200, 201)
        assert time.perf_counter() - started < 1
    thread.join(30)
    assert blocked["answer"].status_code == 503, blocked["answer"].text
    assert "Redis" in blocked["answer"].json()["error"]
    assert 4 < blocked["seconds"] < 15
