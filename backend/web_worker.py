"""The gunicorn worker of the web app: training webhooks are answered on an event loop.

Why: Label Studio sends one webhook per annotation and a project with many annotators sends
them in bursts. Nearly all of a burst joins the retrain already waiting in the queue (one
Redis script, see `backend.job_queue`), yet under gunicorn's sync worker each of them is a
whole WSGI request served one after another: 200 concurrent webhooks took ~90 ms at p99 on
2 cores with two sync workers (BENCHMARKS.md). This worker answers those webhooks itself,
on an asyncio loop: one pipelined Redis round trip for all webhooks that arrived together,
and the first webhook of a burst queues the retrain inline (`JobQueue.request_retrain`).

Everything else, and any webhook the loop is not sure about (TASKS_CREATED, a wrong or
missing secret, bad JSON, chunked bodies, odd or repeated headers, pipelined requests, a
Redis error), is handed, with the bytes already read, to gunicorn's own sync request
handling and the unchanged Flask app on one thread (`--threads` is ignored: torch's thread
setting, which /predict changes, is process-wide). So the loop only answers what the
Flask app would have answered to the same bytes: 201 `{"job_id", "project", "status":
"queued"}` or 200 `... "coalesced"`, byte for byte (tests/test_web_worker.py).

Differences from the sync worker, on purpose:
* accepting pauses while one request runs on the WSGI thread and another waits for it (or
  512 requests are still arriving), so a worker busy with /predict leaves new connections
  to the other workers;
* webhooks answered by the loop are logged by `backend.web_worker` (queued at INFO,
  coalesced at DEBUG), not in gunicorn's access log;
* listening TCP sockets get TCP_DEFER_ACCEPT (1 s): a connection is accepted once its
  request has arrived.
As with the sync worker, a request that runs longer than `--timeout` gets the worker
restarted (the loop stops telling the arbiter it is alive once a WSGI request has run for a
second, so the arbiter counts the timeout from about the request's start). Configurations whose effect on
a request the loop does not mirror (SCRIPT_NAME in the environment, `--protocol uwsgi`,
`--proxy-protocol`) turn the fast path off, with a warning.

Use: `gunicorn --worker-class backend.web_worker.WebhookWorker backend.wsgi:app` (what
`make serve`, `python -m backend serve` and the Dockerfile run). TLS listeners fall back
to the plain sync worker.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import errno
import gc
import json
import logging
import os
import re
import socket
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import parse_qsl

from gunicorn import util
from gunicorn.workers.sync import SyncWorker
from redis.exceptions import LockError
from rq.job import Job

from backend.app import TRAIN_EVENTS, webhook_allowed, webhook_project
from backend.job_queue import (COALESCE_SCRIPT, JobQueue, async_redis_connection, coalesce_keys,
                               redis_connection)
from backend.ml_backend import project_id_from_ls
from backend.settings import Settings

log = logging.getLogger(__name__)

HEAD_LIMIT = 16 * 1024  # a longer request head is gunicorn's to judge
BODY_LIMIT = 1024 * 1024  # larger webhook bodies go the WSGI way
HEAD_TIMEOUT = 10.0  # seconds for a whole webhook to arrive before gunicorn takes over
MAX_READING = 512  # connections whose request is still arriving; accepting pauses above
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_TARGET = re.compile(r"[\x21-\x7e]+")  # visible ASCII, as gunicorn requires of a request target
_PREFIX = b"POST /webhook"
_MORE, _DONE = object(), object()  # states of reading a request


@dataclass
class Webhook:
    version: str
    query: str
    headers: dict[str, str]
    body: bytes


class _Replay:
    """A client socket whose first recv() calls return the bytes the event loop already read."""

    def __init__(self, sock: socket.socket, prefix: bytes):
        self._sock = sock
        self._prefix = prefix

    def recv(self, size: int, *flags) -> bytes:
        if self._prefix:
            data, self._prefix = self._prefix[:size], self._prefix[size:]
            return data
        return self._sock.recv(size, *flags)

    def __getattr__(self, name):
        return getattr(self._sock, name)


@dataclass(frozen=True)
class Limits:
    """What gunicorn's parser allows, normalised as it does, read once (cfg lookups are slow).

    Where gunicorn would accept more (no limit, a bigger limit) the fast path stays at
    gunicorn's defaults: refusing here only sends the request the WSGI way.
    """
    request_line: int = 8190
    fields: int = 100
    field_size: int = 8190
    refused_headers: frozenset = frozenset()  # lower-case names gunicorn treats specially

    @classmethod
    def of(cls, cfg) -> "Limits":
        def capped(value: int, default: int) -> int:
            return default if value <= 0 else min(value, default)

        special = set(getattr(cfg, "secure_scheme_headers", {}) or {}) | set(getattr(cfg, "forwarder_headers", []) or [])
        return cls(capped(cfg.limit_request_line, 8190), capped(cfg.limit_request_fields, 32768),
                   capped(cfg.limit_request_field_size, 8190), frozenset(h.lower() for h in special))


def parse_webhook_head(head: bytes, limits: Limits) -> tuple[Webhook, int] | None:
    """(webhook without body, body length) for a plain `POST /webhook`; None for anything else.

    Deliberately narrow: one Content-Length, no Transfer-Encoding or Expect, no repeated,
    folded or odd header, no header gunicorn treats specially (scheme and forwarding
    headers, names with "_"), within gunicorn's limits. Whatever is refused here is served
    by gunicorn's parser, which answers edge cases the way the sync worker always did.
    """
    try:
        lines = head.decode("ascii").split("\r\n")
    except UnicodeDecodeError:
        return None
    request_line = lines[0]
    if len(request_line) + 2 > limits.request_line:
        return None
    parts = request_line.split(" ")
    if len(parts) != 3 or parts[0] != "POST" or parts[2] not in ("HTTP/1.1", "HTTP/1.0"):
        return None
    if not _TARGET.fullmatch(parts[1]):
        return None
    path, _, query = parts[1].partition("?")
    if path != "/webhook" or "#" in query:
        return None
    if len(lines) - 1 > limits.fields:
        return None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if (not colon or not _TOKEN.fullmatch(name) or "_" in name or _BAD_VALUE.search(value)
                or len(line) + 2 > limits.field_size):
            return None
        name = name.lower()
        if name in headers or name in limits.refused_headers:
            return None
        headers[name] = value.strip(" \t")
    if "transfer-encoding" in headers or "expect" in headers:
        return None
    length = headers.get("content-length", "")
    if not (length.isascii() and length.isdigit()) or len(length) > 9:
        return None
    return Webhook(parts[2], query, headers, b""), int(length)


def basic_credentials(header: str | None) -> tuple[str, str] | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    user, colon, password = decoded.partition(":")
    return (user, password) if colon else None


def webhook_response(version: str, project_id: int, status: str, job_id: str) -> bytes:
    """Byte for byte what gunicorn and Flask's jsonify send for a queued or coalesced webhook."""
    body = (json.dumps({"job_id": job_id, "project": project_id, "status": status},
                       sort_keys=True, separators=(",", ":")) + "\n").encode()
    code = "201 CREATED" if status == "queued" else "200 OK"
    head = (f"{version} {code}\r\nServer: gunicorn\r\nDate: {util.http_date()}\r\n"
            f"Connection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode("latin-1") + body


class FastPath:
    """Answers training webhooks: one pipelined Redis round trip per batch that arrives together.

    Callback based, not a task per webhook: a burst of 200 is mostly bookkeeping, and the
    loop's own overhead per task was a large part of the cost per webhook.
    """

    def __init__(self, settings: Settings, max_body: int):
        self.settings = settings
        self.max_body = max_body
        self.redis = None
        self.queue: JobQueue | None = None
        self.batches = 0  # pipelines sent so far
        self.queued_in: dict[int, int] = {}  # project -> batches sent when this worker last queued it
        self.sha: str | None = None
        self.loading: asyncio.Task | None = None
        self.pending: list[tuple[int, str, Callable, int, int]] = []
        self.down_until = 0.0
        self.flushes: set[asyncio.Task] = set()
        if settings.redis_url:
            # Fast-fail, as the Flask app's client: on a dead Redis the app answers 503.
            self.redis = async_redis_connection(settings.redis_url)

    def ready(self) -> bool:
        """Whether webhooks can be taken now (Redis configured and not failing)."""
        return self.redis is not None and time.monotonic() >= self.down_until

    def disable(self, reason: str) -> None:
        if self.redis is not None:
            log.warning("webhook fast path off: %s; every request goes to the WSGI app", reason)
        self.redis = None

    async def preload(self) -> None:
        """Load the script at start, not on the first webhook (which would wait for it)."""
        if self.ready():
            try:
                await asyncio.wait_for(self._script(), timeout=1)
            except Exception as exc:
                log.warning("webhook fast path: could not load its Redis script yet (%s)", exc)

    async def _script(self) -> str:
        """The coalesce script's hash, loading it once however many batches ask meanwhile."""
        if self.sha is None:
            if self.loading is None or self.loading.done():
                self.loading = asyncio.get_running_loop().create_task(self.redis.script_load(COALESCE_SCRIPT))
            self.sha = await asyncio.shield(self.loading)
        return self.sha

    def _redis_failed(self, exc: Exception) -> None:
        self.down_until = time.monotonic() + 1.0
        log.warning("webhook fast path: Redis failed (%s); the WSGI app takes webhooks for 1 s", exc)

    def check(self, hook: Webhook) -> tuple[int, str] | None:
        """(project, action) of a training webhook the app would accept; None otherwise."""
        try:
            payload = json.loads(hook.body)
        except (ValueError, RecursionError):
            return None
        if not isinstance(payload, dict):
            return None
        action = payload.get("action")
        if not isinstance(action, str) or action not in TRAIN_EVENTS:
            return None
        secret = next((v for k, v in parse_qsl(hook.query, keep_blank_values=True) if k == "secret"), "")
        if not webhook_allowed(self.settings, secret, basic_credentials(hook.headers.get("authorization"))):
            return None
        try:
            return project_id_from_ls(webhook_project(payload)), action
        except Exception:  # the WSGI app words the 400
            return None

    def submit(self, project_id: int, action: str, done: Callable, attempt: int = 0) -> None:
        """Later, call done((project, action, "coalesced" or "queued", job id)) or done(None)."""
        self.pending.append((project_id, action, done, attempt, self.batches + 1))
        if len(self.pending) == 1:
            # Every webhook read in this turn of the loop joins the same pipeline.
            asyncio.get_running_loop().call_soon(self._start_flush)

    def _start_flush(self) -> None:
        task = asyncio.get_running_loop().create_task(self._flush())
        self.flushes.add(task)
        task.add_done_callback(self.flushes.discard)

    async def _flush(self) -> None:
        batch, self.pending = self.pending, []
        self.batches += 1
        # One script call per project: a burst is mostly one project, and the script counts
        # all of its webhooks in this batch at once.
        by_project: dict[int, list] = {}
        for entry in batch:
            by_project.setdefault(entry[0], []).append(entry)
        try:
            sha = await self._script()
            pipe = self.redis.pipeline(transaction=False)
            for project_id, entries in by_project.items():
                pipe.evalsha(sha, 3, *coalesce_keys(project_id), Job.redis_job_namespace_prefix,
                             len(entries))
            results = await pipe.execute()
        except asyncio.CancelledError:  # stopping: the WSGI app cannot take them any more
            for entry in batch:
                _call(entry[2], None)
            raise
        except Exception as exc:
            from redis.exceptions import NoScriptError

            if isinstance(exc, NoScriptError):  # Redis restarted and forgot the script
                self.sha = None
            else:
                self._redis_failed(exc)
            for entry in batch:
                _call(entry[2], None)
            return
        for entries, waiting in zip(by_project.values(), results):
            for project_id, action, done, attempt, sent_in in entries:
                try:
                    if waiting is not None:
                        answer = (project_id, action, "coalesced", waiting.decode())
                    elif self.queued_in.get(project_id, -1) >= sent_in and attempt < 2:
                        # A webhook of this batch has queued a retrain since: ask again in the
                        # next batch rather than queue behind it one round trip at a time.
                        self.submit(project_id, action, done, attempt + 1)
                        continue
                    else:
                        answer = self._queue_retrain(project_id, action)
                except Exception:
                    log.exception("webhook fast path: project=%s", project_id)
                    answer = None  # the WSGI app answers it
                _call(done, answer)

    def _queue_retrain(self, project_id: int, action: str) -> tuple[int, str, str, str] | None:
        """No retrain waits: queue one, here on the loop. It takes a few local round trips once
        per burst; in a thread it would wait for the GIL at every one of them while the loop
        reads the rest of the burst."""
        if time.monotonic() < self.down_until:
            return None
        try:
            status, job_id = self._queue().request_retrain(project_id, action)
        except LockError:
            return None
        except Exception as exc:
            self._redis_failed(exc)
            return None
        if status == "refused":
            # Refused until the config changes, which only the webhook's body can tell: the
            # WSGI app reads it and asks again with the config.
            return None
        self.queued_in[project_id] = self.batches
        return project_id, action, status, job_id

    def _queue(self) -> JobQueue:
        if self.queue is None:
            self.queue = JobQueue(redis_connection(self.settings.redis_url, fast_fail=True), self.settings)
            # The loop must not stall on a lock a dead process left behind: after 0.25 s the
            # webhook goes to the WSGI app, which waits the full time in its thread.
            self.queue.enqueue_lock_wait = 0.25
        return self.queue

    async def close(self) -> None:
        if self.flushes:
            await asyncio.wait(self.flushes, timeout=2)
        if self.redis is not None:
            await self.redis.aclose()


def _call(done: Callable, answer) -> None:
    try:
        done(answer)
    except Exception:
        log.exception("webhook fast path: answering failed")


class WebhookWorker(SyncWorker):
    """gunicorn's sync worker, plus an event loop that answers training webhooks itself."""

    def run(self):
        if self.cfg.is_ssl:
            self.log.warning("TLS listener: the webhook fast path is off; serving as the sync worker")
            return super().run()
        for s in self.sockets:
            s.setblocking(False)
            if s.family in (socket.AF_INET, socket.AF_INET6) and hasattr(socket, "TCP_DEFER_ACCEPT"):
                # Wake us for a connection once its request has arrived (HTTP clients speak
                # first), so most webhooks are read and answered without waiting for them.
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 1)
        settings = Settings.from_env()
        if self.cfg.threads > 1:
            self.log.warning("--threads %d ignored: /predict runs one request at a time per worker "
                             "(torch's thread setting is process-wide); add --workers instead",
                             self.cfg.threads)
        self.threads = 1
        self.limits = Limits.of(self.cfg)
        self.pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="wsgi")
        self.fast = FastPath(settings, min(BODY_LIMIT, settings.max_body_mb * 1024 * 1024))
        if os.environ.get("SCRIPT_NAME"):
            self.fast.disable("SCRIPT_NAME is set (the app is mounted below a prefix)")
        if getattr(self.cfg, "protocol", "http") != "http":
            self.fast.disable(f"--protocol {self.cfg.protocol}")
        if getattr(self.cfg, "proxy_protocol", "off") not in ("off", False, None):
            self.fast.disable("--proxy-protocol is on")
        self.pool_since: float | None = None  # when the WSGI request now running began
        self._freeze_heap()
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._serve())
        finally:
            self.pool.shutdown(wait=False, cancel_futures=True)
            loop.close()

    # -- the loop --------------------------------------------------------------------
    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        self.wake = asyncio.Event()
        self.in_pool = 0  # connections handed to the WSGI thread (running or waiting)
        self.reading = 0  # connections whose request is still arriving
        self.in_fast = 0  # connections submitted to the fast path, not yet answered
        self.listening = False
        self.connections: set[asyncio.Task] = set()
        # gunicorn's signal handlers write to this pipe (set_wakeup_fd): a stop wakes the loop.
        loop.add_reader(self.PIPE[0], self._drain_pipe)
        await self.fast.preload()
        self._listen(True)
        try:
            while self.alive and self.is_parent_alive():
                since = self.pool_since
                # While a WSGI request has run for more than a second, stop telling the
                # arbiter this worker is alive: as with the sync worker, a request that runs
                # past --timeout then gets the worker restarted ("WORKER TIMEOUT").
                if since is None or time.monotonic() - since < 1.0:
                    self.notify()
                self.wake.clear()
                try:
                    await asyncio.wait_for(self.wake.wait(), timeout=1.0)
                except asyncio.TimeoutError:
                    pass
        finally:
            self._listen(False)
            deadline = loop.time() + self.cfg.graceful_timeout
            if self.connections or self.in_fast:
                self.log.info("Waiting for %d request(s) to finish", len(self.connections) + self.in_fast)
            while (self.connections or self.in_fast) and loop.time() < deadline:
                if self.connections:
                    await asyncio.wait(self.connections, timeout=deadline - loop.time())
                else:
                    await asyncio.sleep(0.01)
            if self.connections:  # past the graceful timeout: close what never got its turn
                for task in self.connections:
                    task.cancel()
                await asyncio.gather(*self.connections, return_exceptions=True)
            loop.remove_reader(self.PIPE[0])
            await self.fast.close()

    def _drain_pipe(self) -> None:
        try:
            os.read(self.PIPE[0], 4096)
        except OSError:
            pass
        self.wake.set()

    def _listen(self, on: bool) -> None:
        """Watch the listening sockets for connections, or leave them to the other workers."""
        if on == self.listening:
            return
        loop = asyncio.get_running_loop()
        for listener in self.sockets:
            if on:
                loop.add_reader(listener.fileno(), self._accept, listener)
            else:
                loop.remove_reader(listener.fileno())
        self.listening = on

    def _busy(self) -> bool:
        """One request on the WSGI thread and one waiting, or many requests still arriving."""
        return self.in_pool > self.threads or self.reading >= MAX_READING

    def _resume(self) -> None:
        if self.alive and not self._busy():
            self._listen(True)

    def _accept(self, listener) -> None:
        """Take the connections waiting on a listener (a burst arrives together).

        A webhook whose bytes are all there already is read and submitted right here, with
        no task; anything else gets a task that reads it with a deadline.
        """
        loop = asyncio.get_running_loop()
        for _ in range(64):
            if not self.alive or self._busy():
                # Stop watching (a readable listener would wake the loop at once again).
                self._listen(False)
                self.wake.set()
                return
            try:
                client, addr = listener.accept()
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                    return
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.log.error("accept() failed: %s; pausing 0.5 s", exc)
                    self._listen(False)
                    loop.call_later(0.5, self._resume)
                    return
                raise
            client.setblocking(False)  # (Python sockets are close-on-exec already)
            try:
                data = client.recv(65536)
            except BlockingIOError:
                data = b""
            except OSError:
                client.close()
                continue
            if data:
                state, hook = self._parse(data)
                if state is not _MORE:
                    self._dispatch(listener, client, addr, data, hook)
                    continue
            self.reading += 1
            self._spawn(self._connection(listener, client, addr, bytearray(data)))

    def _spawn(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self.connections.add(task)
        task.add_done_callback(self.connections.discard)

    def _parse(self, buffered) -> tuple[object, Webhook | None]:
        """(_MORE, None) until the request is all there; then (_DONE, webhook) for a fast-path
        candidate, (_DONE, None) for anything else (which may stop short of its end)."""
        end = buffered.find(b"\r\n\r\n")
        if end < 0:
            if len(buffered) > HEAD_LIMIT or bytes(buffered[:len(_PREFIX)]) != _PREFIX[:len(buffered)]:
                return _DONE, None  # not a webhook: no need to wait for the rest of the head
            return _MORE, None
        parsed = parse_webhook_head(bytes(buffered[:end]), self.limits)
        if parsed is None or parsed[1] > self.fast.max_body:
            return _DONE, None
        hook, length = parsed
        total = end + 4 + length
        if len(buffered) < total:
            return _MORE, None
        if len(buffered) > total:  # a pipelined second request: gunicorn's business
            return _DONE, None
        hook.body = bytes(buffered[end + 4:])
        return _DONE, hook

    async def _connection(self, listener, client: socket.socket, addr, buffered: bytearray) -> None:
        """Read a request that did not arrive at once, with a deadline, then dispatch it."""
        try:
            await self._read_rest(listener, client, addr, buffered)
        finally:
            self.reading -= 1
            self._resume()

    async def _read_rest(self, listener, client: socket.socket, addr, buffered: bytearray) -> None:
        loop = asyncio.get_running_loop()
        hook = None
        try:
            async with asyncio.timeout(HEAD_TIMEOUT):
                while True:
                    chunk = await loop.sock_recv(client, 65536)
                    if not chunk:
                        break
                    buffered += chunk
                    state, hook = self._parse(buffered)
                    if state is _DONE:
                        break
        except TimeoutError:
            pass  # gunicorn takes over, with its own timeout
        except OSError as exc:
            self.log.debug("client went away: %s", exc)
            client.close()
            return
        except asyncio.CancelledError:
            client.close()
            raise
        if not buffered:  # connected and closed without a byte
            client.close()
            return
        self._dispatch(listener, client, addr, bytes(buffered), hook)

    def _dispatch(self, listener, client: socket.socket, addr, data: bytes, hook: Webhook | None) -> None:
        """Submit a webhook to the fast path, or hand the connection to the WSGI app."""
        checked = self.fast.check(hook) if hook is not None and self.fast.ready() else None
        if checked is None:
            self._hand_over(listener, client, addr, data)
            return
        self.in_fast += 1

        def answered(answer) -> None:
            self.in_fast -= 1
            if answer is None:
                self._hand_over(listener, client, addr, data)
                return
            try:
                self._reply(client, hook.version, answer)
            except Exception:
                log.exception("webhook fast path: answering failed")
                client.close()

        self.fast.submit(*checked, answered)

    def _reply(self, client: socket.socket, version: str, answer: tuple[int, str, str, str]) -> None:
        project_id, action, status, job_id = answer
        # Logged before the answer goes out, so the log is never behind the client.
        log.log(logging.INFO if status == "queued" else logging.DEBUG,
                "project=%s webhook %s -> %s job=%s (fast path)", project_id, action, status, job_id)
        response = webhook_response(version, project_id, status, job_id)
        self._count_request()
        try:
            sent = client.send(response)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self.log.debug("client went away: %s", exc)
            client.close()
            return
        if sent < len(response):
            self._spawn(self._send_rest(client, response[sent:]))
            return
        # The whole request was read (no byte more), so closing now sends FIN, not RST.
        client.close()

    async def _send_rest(self, client: socket.socket, rest: bytes) -> None:
        try:
            async with asyncio.timeout(HEAD_TIMEOUT):
                await asyncio.get_running_loop().sock_sendall(client, rest)
        except (OSError, TimeoutError) as exc:
            self.log.debug("client went away: %s", exc)
        finally:
            client.close()

    def _count_request(self) -> None:
        self.nr += 1
        if self.nr >= self.max_requests and self.alive:
            self.log.info("Autorestarting worker after current request.")
            self.alive = False
            self.wake.set()

    # -- everything else: gunicorn's sync handling on the pool ------------------------
    def _hand_over(self, listener, client: socket.socket, addr, buffered: bytes) -> None:
        """Queue a connection for the WSGI thread; counted now, so accepting pauses at once."""
        self.in_pool += 1
        if self._busy():
            # Busy: leave new connections in the backlog for the other workers.
            self._listen(False)
        self._spawn(self._to_pool(listener, client, addr, buffered))

    async def _to_pool(self, listener, client: socket.socket, addr, buffered: bytes) -> None:
        started = []
        try:
            await asyncio.get_running_loop().run_in_executor(
                self.pool, self._handle_blocking, listener, client, addr, buffered, started)
        except asyncio.CancelledError:
            if not started:  # stopping before its turn came: close rather than leave it open
                client.close()
            raise
        finally:
            self.in_pool -= 1
            self._resume()
            if not self.alive:
                self.wake.set()

    def _handle_blocking(self, listener, client: socket.socket, addr, buffered: bytes, started: list) -> None:
        started.append(True)
        self.pool_since = time.monotonic()
        try:
            client.setblocking(True)
            # handle() parses, runs the WSGI app, answers errors and closes the socket.
            SyncWorker.handle(self, listener, _Replay(client, buffered), addr)
        finally:
            self.pool_since = None
        if len(sys.modules) > self.frozen_modules + 50:  # e.g. the first /predict imported torch
            self._freeze_heap()

    def _freeze_heap(self) -> None:
        """Move what is loaded now out of the garbage collector's sight.

        A full collection walks every object: 35 ms with the app loaded, 130 ms once /predict
        has imported torch, and a burst of webhooks can trigger one mid-burst. Frozen objects
        are never walked; only objects made later are. Done at start and once more after a
        request that imported many modules (one such pause per worker).
        """
        gc.collect()
        gc.freeze()
        self.frozen_modules = len(sys.modules)
