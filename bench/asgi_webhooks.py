"""An ASGI webhook route, only for bench_webhooks.py: the event-loop candidate against sync workers.

`gunicorn --worker-class asgi bench.asgi_webhooks:app` (gunicorn 27's own ASGI worker). It
answers `POST /webhook` for the training events the benchmark sends and `GET /health`,
nothing else (no auth, no /predict): enough to measure what an event loop buys on a burst,
not a product. Webhooks that arrive in the same loop turn are answered together: one
coalescing script call per project (counting all of them), and if no retrain was waiting,
the first one queues it through the product's `JobQueue.request_retrain` (in a thread: it is
the blocking client, with the enqueue lock) and the rest then coalesce into it.

Compared with the sync worker it answers no auth, no secret and no other route: before such
a route could serve Label Studio it would need all of the Flask app's /webhook behaviour.
"""

from __future__ import annotations

import asyncio
import asyncio.base_events
import json
import os
from collections import defaultdict

import redis.asyncio as aredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from rq.job import Job

from backend.app import TRAIN_EVENTS, webhook_project
from backend.job_queue import COALESCE_SCRIPT, FAST_FAIL_TIMEOUTS, JobQueue, coalesce_keys, redis_connection
from backend.ml_backend import BadRequest, project_id_from_ls
from backend.settings import Settings

settings = Settings.from_env()
state: dict = {}

# gunicorn 27's asgi worker hands its listening socket to loop.create_server without the
# configured --backlog, so asyncio listens on it again with its own default of 100: of 200
# connects at once, those past the first 100 are dropped and the client's TCP retries them
# after 1 s (TcpExt ListenOverflows in /proc/net/netstat). uvicorn's gunicorn worker had
# the same bug and fixed it by passing the backlog. BENCH_ASGI_BACKLOG=N measures the worker
# as it would be with that fix; imported before the worker creates its servers.
if os.environ.get("BENCH_ASGI_BACKLOG"):
    _create_server = asyncio.base_events.BaseEventLoop.create_server

    async def _create_server_with_backlog(self, *args, **kwargs):
        kwargs.setdefault("backlog", int(os.environ["BENCH_ASGI_BACKLOG"]))
        return await _create_server(self, *args, **kwargs)

    asyncio.base_events.BaseEventLoop.create_server = _create_server_with_backlog


def _clients():
    """One async and one blocking client per worker process, made on first use (after fork)."""
    if "redis" not in state:
        client = aredis.Redis.from_url(settings.redis_url, **FAST_FAIL_TIMEOUTS, retry=Retry(NoBackoff(), 0))
        state["redis"] = client
        state["coalesce"] = client.register_script(COALESCE_SCRIPT)
        state["queue"] = JobQueue(redis_connection(settings.redis_url, fast_fail=True), settings)
    return state["coalesce"], state["queue"]


pending: dict[int, list[asyncio.Future]] = defaultdict(list)


async def _flush() -> None:
    batch = dict(pending)
    pending.clear()
    coalesce, queue = _clients()
    for project_id, futures in batch.items():
        try:
            remaining = futures
            # Each turn either coalesces all the rest or answers one through request_retrain
            # (which queues, or coalesces under the enqueue lock). More than one turn when a
            # worker took the job just queued before the rest could coalesce into it.
            while remaining:
                waiting = await coalesce(keys=coalesce_keys(project_id),
                                         args=[Job.redis_job_namespace_prefix, len(remaining)])
                if waiting:
                    for future in remaining:
                        future.set_result(("coalesced", waiting.decode()))
                    break
                answer = await asyncio.to_thread(queue.request_retrain, project_id, "ANNOTATION_CREATED")
                remaining[0].set_result(answer)
                remaining = remaining[1:]
        except Exception as exc:  # Redis down: each webhook gets its 503
            for future in futures:
                if not future.done():
                    future.set_exception(exc)


async def _webhook(body: bytes) -> tuple[int, dict]:
    try:
        payload = json.loads(body)
        action = payload["action"]
        project_id = project_id_from_ls(webhook_project(payload))
    except (ValueError, KeyError, TypeError, BadRequest) as exc:
        return 400, {"error": str(exc)}
    if action not in TRAIN_EVENTS:
        return 200, {"status": "ignored", "action": action}
    future = asyncio.get_running_loop().create_future()
    if not pending:  # the first webhook of this loop turn schedules the batch after the turn
        asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(_flush()))
    pending[project_id].append(future)
    try:
        status, job_id = await future
    except Exception:
        return 503, {"error": "the job queue (Redis) is unavailable; the event was not queued"}
    return (201 if status == "queued" else 200), {"job_id": job_id, "project": project_id, "status": status}


async def app(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["method"] == "POST" and scope["path"] == "/webhook":
        status, answer = await _webhook(body)
    elif scope["method"] == "GET" and scope["path"] == "/health":
        status, answer = 200, {"status": "UP"}
    else:
        status, answer = 404, {"error": "the benchmark's ASGI app serves only /webhook and /health"}
    data = json.dumps(answer).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
