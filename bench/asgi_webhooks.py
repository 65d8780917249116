"""An ASGI webhook route, only for bench_webhooks.py: the event-loop candidate against sync workers.

`gunicorn --worker-class asgi bench.asgi_webhooks:app` (gunicorn 27's own ASGI worker). It
answers `POST /webhook` for the training events the benchmark sends and `GET /health`,
nothing else (no auth, no /predict): enough to measure what an event loop buys on a burst,
not a product. Webhooks that arrive in the same loop turn are answered together: one
coalescing script call per project (counting all of them), and if no retrain was waiting,
the first one queues it through the product's `JobQueue.request_retrain` (in a thread: it is
the blocking client, with the enqueue lock) and the rest then coalesce into it.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict

import redis.asyncio as aredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from rq.job import Job

from backend.app import TRAIN_EVENTS, webhook_project
from backend.job_queue import (COALESCE_SCRIPT, FAST_FAIL_TIMEOUTS, JobQueue, coalesce_keys,
                               redis_connection)
from backend.ml_backend import BadRequest, project_id_from_ls
from backend.settings import Settings

settings = Settings.from_env()
state: dict = {}


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
            keys = coalesce_keys(project_id)
            waiting = await coalesce(keys=keys, args=[Job.redis_job_namespace_prefix, len(futures)])
            answers = [("coalesced", waiting.decode())] * len(futures) if waiting else None
            if answers is None:
                first = await asyncio.to_thread(queue.request_retrain, project_id, "ANNOTATION_CREATED")
                answers = [first]
                if len(futures) > 1:
                    waiting = await coalesce(keys=keys, args=[Job.redis_job_namespace_prefix, len(futures) - 1])
                    answers += [("coalesced", waiting.decode())] * (len(futures) - 1)
            for future, answer in zip(futures, answers):
                future.set_result(answer)
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
