"""200 concurrent webhooks for one project: acknowledgment latency and retrains queued, per server.

Starts the real parts (redis-server, gunicorn with the app) on a temporary DATA_DIR and fires
bursts of 200 `ANNOTATION_CREATED` webhooks for one project at once: 200 connections opened
together by an asyncio client that speaks raw HTTP/1.1 (one new connection per webhook, as
Label Studio sends them; a lighter client than httpx, so the latency measured is the
server's queueing, not the client's; the client's garbage collector is held off during a
burst for the same reason). Each burst uses a new project id, so each starts with
nothing waiting, as after a quiet period.

Part A, latency (no RQ worker): for each gunicorn setting (`sync`: gunicorn's sync workers,
what `make serve` runs; `gthread`: threads; `asgi`: gunicorn's own ASGI worker serving
bench/asgi_webhooks.py, an event-loop webhook route that batches its Redis work per loop
turn; `asgi-backlog`: the same with gunicorn's --backlog reaching the loop, see that file).
All settings run side by side, one gunicorn each on one Redis, and take turns burst by
burst, so the shared machine's changing load falls on all of them alike. Per setting:
sequential webhooks for the per-request cost, then bursts: p50/p99/max of the time from a
webhook's connect to its response (per burst, and p99 over all bursts pooled, on which the
<= 250 ms verdict is given), status codes, and the retrain jobs queued in Redis for
the project (with no worker nothing starts, so the target is exactly one). Also the server's
CPU time per webhook (gunicorn + redis-server), which bounds how soon the last of a burst can
be answered on this many cores; one burst spread evenly over --paced-ms; and bursts of GET
/health, the floor of gunicorn + Flask on this machine with no work in the request.

Part B, retrains (with a real RQ worker): Label Studio is absent (LABEL_STUDIO_URL points at a
closed port), so a retrain cannot finish, but the worker does start the first job during the
burst, which clears the project's waiting mark exactly as in production; the following
webhooks then queue one follow-up and coalesce into it. --retrain-bursts bursts per setting,
each for a new project. Counted: retrain jobs created for the
project (target: at most two). Whether the final model includes every annotation needs Label
Studio; that is point 1's benchmark.

Every burst (part A's, the paced one, the GET /health ones, part B's) is one `Run.measure`
row in the JSON's "measurements", with the commit, the machine, and the load and CPU
pressure before and after it.

    .venv/bin/python bench/bench_webhooks.py [--burst 200] [--bursts 5] [--configs sync:2,gthread:2x8,asgi-backlog:2]
    make bench BENCH=webhooks            # at the Makefile's sizes (--bursts 9)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

from run_record import Run, percentile, table  # also puts the repository on sys.path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import psutil  # noqa: E402
from redis import Redis  # noqa: E402
from rq import Queue, Worker  # noqa: E402
from rq.job import Job  # noqa: E402
from rq.registry import (  # noqa: E402
    DeferredJobRegistry,
    FailedJobRegistry,
    FinishedJobRegistry,
    ScheduledJobRegistry,
    StartedJobRegistry,
)
from rq.serializers import JSONSerializer  # noqa: E402

from backend.cli import free_port  # noqa: E402
from backend.job_queue import key  # noqa: E402
from backend.settings import Settings  # noqa: E402
from tests.support.services import Services  # noqa: E402

DEFAULT_CONFIGS = "sync:2,sync:4,gthread:2x8,asgi:2,asgi-backlog:2"
TARGET_P99_MS = 250  # Label Studio waits 1 s for a webhook; a lost one is caught by the reconcile job


def webhook_request(port: int, project_id: int, n: int) -> bytes:
    body = json.dumps({
        "action": "ANNOTATION_CREATED",
        "project": {"id": project_id, "title": "bench"},
        "annotation": {"id": n, "project": project_id, "task": n,
                       "result": [{"from_name": "sentiment", "to_name": "text", "type": "choices",
                                   "value": {"choices": ["Positive"]}}]},
        "task": {"id": n, "project": project_id, "data": {"text": f"task {n}"}},
    }).encode()
    head = (f"POST /webhook HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    return head + body


def health_request(port: int) -> bytes:
    return f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode()


async def _send(port: int, request: bytes) -> tuple[float, float, int]:
    """(start, milliseconds, status) of one webhook on its own connection; status 0 on error."""
    started = time.perf_counter()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), timeout=30)  # the server closes
        writer.close()
        status = int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/") else 0
    except (TimeoutError, OSError, ValueError, IndexError):
        status = 0
    return started, (time.perf_counter() - started) * 1000, status


async def _burst(port: int, requests: list[bytes]) -> list[tuple[float, float, int]]:
    return await asyncio.gather(*(_send(port, r) for r in requests))


async def _paced(port: int, requests: list[bytes], spread_ms: float) -> list[tuple[float, float, int]]:
    async def later(i: int, request: bytes):
        await asyncio.sleep(spread_ms / 1000 * i / len(requests))
        return await _send(port, request)

    return await asyncio.gather(*(later(i, r) for i, r in enumerate(requests)))


def burst(port: int, project_id: int, size: int, spread_ms: float = 0.0) -> dict:
    """`size` webhooks at once, or evenly spread over `spread_ms`."""
    requests = [webhook_request(port, project_id, n) for n in range(size)]
    # The client's own full garbage collection takes 20-25 ms here and would be counted as
    # server latency for every webhook in flight: collect before, none during the burst.
    gc.collect()
    gc.disable()
    try:
        started = time.perf_counter()
        results = asyncio.run(_paced(port, requests, spread_ms) if spread_ms else _burst(port, requests))
        wall = (time.perf_counter() - started) * 1000
    finally:
        gc.enable()
    latencies = [ms for _, ms, _ in results]
    return {
        "latencies": latencies,
        "statuses": Counter(status for _, _, status in results),
        "wall_ms": wall,
        "send_spread_ms": (max(s for s, _, _ in results) - min(s for s, _, _ in results)) * 1000,
    }


def sequential(port: int, project_id: int, count: int) -> list[float]:
    return [asyncio.run(_send(port, webhook_request(port, project_id, n)))[1] for n in range(count)]


def retrain_jobs(redis: Redis, queue_name: str, project_id: int) -> dict:
    """Retrain jobs of one project, by where RQ keeps them."""
    queue = Queue(queue_name, connection=redis, serializer=JSONSerializer)
    places = {
        "queued": queue.get_job_ids(),
        "scheduled": ScheduledJobRegistry(queue=queue).get_job_ids(),
        "deferred": DeferredJobRegistry(queue=queue).get_job_ids(),
        "started": StartedJobRegistry(queue=queue).get_job_ids(),
        "finished": FinishedJobRegistry(queue=queue).get_job_ids(),
        "failed": FailedJobRegistry(queue=queue).get_job_ids(),
    }
    prefix = f"retrain-{project_id}-"
    found = {place: sorted(j for j in ids if j.startswith(prefix)) for place, ids in places.items()}
    found["requested_counter"] = int(redis.get(key(project_id, "requested")) or 0)
    found["coalesced_counter"] = int(redis.get(key(project_id, "coalesced")) or 0)
    return found


def listen_overflows() -> int:
    """The kernel's count of connects dropped at a full listen queue (TcpExt ListenOverflows)."""
    lines = [line.split() for line in Path("/proc/net/netstat").read_text().splitlines()
             if line.startswith("TcpExt:")]
    return int(dict(zip(lines[0], lines[1]))["ListenOverflows"])


def cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def server_processes(services: Services) -> list[psutil.Process]:
    """The gunicorn master and its workers."""
    master = psutil.Process(services.web.pid)
    return [master, *master.children()]


def parse_config(text: str) -> dict:
    kind, _, size = text.partition(":")
    app = "backend.wsgi:app"
    if kind == "sync":
        return {"label": f"sync, {size} workers", "workers": int(size), "threads": None, "worker_class": "sync",
                "app": app}
    if kind == "asgi":
        return {"label": f"asgi (bench route), {size} workers", "workers": int(size), "threads": None,
                "worker_class": "asgi", "app": "bench.asgi_webhooks:app"}
    if kind == "asgi-backlog":  # with gunicorn's --backlog reaching the event loop (bench/asgi_webhooks.py)
        return {"label": f"asgi (bench route, backlog 2048), {size} workers", "workers": int(size),
                "threads": None, "worker_class": "asgi", "app": "bench.asgi_webhooks:app",
                "env": {"BENCH_ASGI_BACKLOG": "2048"}}
    if kind == "gthread":
        workers, _, threads = size.partition("x")
        return {"label": f"gthread, {workers} workers x {threads} threads", "workers": int(workers),
                "threads": int(threads), "worker_class": "gthread", "app": app}
    raise SystemExit(f"unknown config {text!r}: use sync:<workers>, asgi:<workers>, "
                     f"asgi-backlog:<workers> or gthread:<workers>x<threads>")


def warm_up(port: int, workers: int, project_id: int) -> None:
    """Every worker (thread) opens its Redis connection and loads the Lua script first."""
    for _ in range(3):
        burst(port, project_id, workers * 8)
    sequential(port, project_id, 10)


def part_a(args, run: Run) -> list[dict]:
    """All settings run at once, each its own gunicorn on one shared Redis, and take turns
    burst by burst: the shared machine's load changes by the minute, and this way it falls
    on every setting alike."""
    data_dir = Path(tempfile.mkdtemp(prefix="atl-bench-webhooks-"))
    project_id = 100
    servers: list[tuple[dict, Services]] = []
    try:
        with Services(data_dir) as services:
            services.start_redis()
            redis = Redis.from_url(services.redis_url)
            redis_processes = [psutil.Process(services.redis_process.pid)]
            for n, text in enumerate(args.configs.split(",")):
                config = parse_config(text)
                web = Services(data_dir / f"web-{n}", extra_env={"REDIS_URL": services.redis_url,
                                                                 **config.get("env", {})})
                servers.append((config, web))
                web.start_web(workers=config["workers"], threads=config["threads"],
                              worker_class=config["worker_class"], app=config["app"])
            for config, web in servers:
                project_id += 1
                warm_up(web.port, config["workers"] * (config["threads"] or 1), project_id)
                project_id += 1
                config["sequential"] = sequential(web.port, project_id, args.sequential)
                config["bursts"], config["pooled"], config["overflows"] = [], [], 0
            for round_ in range(args.bursts):
                for config, web in servers:
                    project_id += 1
                    web_processes = server_processes(web)
                    overflows_before = listen_overflows()
                    cpu_before = cpu_seconds(web_processes), cpu_seconds(redis_processes)
                    # The burst itself is the measurement (commit, load and CPU pressure around it).
                    with run.measure(part="A", gunicorn=config["label"], round=round_ + 1,
                                     project_id=project_id, webhooks=args.burst) as b:
                        result = burst(web.port, project_id, args.burst)
                    cpu_web = (cpu_seconds(web_processes) - cpu_before[0]) * 1000 / args.burst
                    cpu_redis = (cpu_seconds(redis_processes) - cpu_before[1]) * 1000 / args.burst
                    config["overflows"] += listen_overflows() - overflows_before
                    config["pooled"].extend(result["latencies"])
                    time.sleep(0.2)
                    jobs = retrain_jobs(redis, Settings().queue_name, project_id)
                    b.update({
                        "p50_ms": round(percentile(result["latencies"], 50), 1),
                        "p99_ms": round(percentile(result["latencies"], 99), 1),
                        "max_ms": round(max(result["latencies"]), 1),
                        "wall_ms": round(result["wall_ms"], 1),
                        "client_send_spread_ms": round(result["send_spread_ms"], 1),
                        "gunicorn_cpu_ms_per_webhook": round(cpu_web, 2),
                        "redis_cpu_ms_per_webhook": round(cpu_redis, 2),
                        "statuses": dict(result["statuses"]),
                        "retrain_jobs": sum(len(v) for k, v in jobs.items() if not k.endswith("counter")),
                        "jobs": jobs,
                    })
                    config["bursts"].append(b)
                    print(f"  round {round_ + 1}, {config['label']}: burst p50 {b['p50_ms']} ms, p99 {b['p99_ms']} ms, "
                          f"statuses {b['statuses']}, retrain jobs {b['retrain_jobs']}, load {b['load_after']}",
                          flush=True)
            return [summary(args, run, config, web, project_id := project_id + 1) for config, web in servers]
    finally:
        for _, web in servers:
            web.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def summary(args, run: Run, config: dict, web: Services, project_id: int) -> dict:
    """One setting's row: its bursts, one paced burst and the GET /health floor."""
    bursts, pooled = config["bursts"], config["pooled"]
    with run.measure(part="A paced", gunicorn=config["label"], project_id=project_id, webhooks=args.burst,
                     spread_ms=args.paced_ms) as row:
        paced = burst(web.port, project_id, args.burst, spread_ms=args.paced_ms)
    row["p99_ms"] = round(percentile(paced["latencies"], 99), 1)
    # The stack's own floor: the same burst of GET /health (no JSON, no Redis).
    health = []
    for n in range(3):
        with run.measure(part="A health", gunicorn=config["label"], round=n + 1, requests=args.burst) as row:
            result = asyncio.run(_burst(web.port, [health_request(web.port)] * args.burst))
        row["p99_ms"] = round(percentile([ms for _, ms, _ in result], 99), 1)
        health.append(row["p99_ms"])
    p99s = [b["p99_ms"] for b in bursts]
    cpu_ms = statistics.median(b["gunicorn_cpu_ms_per_webhook"] + b["redis_cpu_ms_per_webhook"] for b in bursts)
    statuses = Counter()
    for b in bursts:
        statuses.update(b["statuses"])
    seq = config["sequential"]
    return {
        "gunicorn": config["label"],
        "sequential p50 ms": round(percentile(seq, 50), 1),
        "burst p50 ms (median)": statistics.median(b["p50_ms"] for b in bursts),
        "burst p99 ms (median)": statistics.median(p99s),
        "burst p99 ms (range)": f"{min(p99s):.0f}-{max(p99s):.0f}",
        "p99 ms, all bursts pooled": round(percentile(pooled, 99), 1),
        "acknowledged": f"{sum(v for s, v in statuses.items() if s in (200, 201))}/{args.burst * len(bursts)}",
        "statuses": " ".join(f"{s}x{v}" for s, v in sorted(statuses.items())),
        "retrain jobs per burst": "/".join(str(b["retrain_jobs"]) for b in bursts),
        "server CPU ms/webhook": round(cpu_ms, 2),
        # If the server used both cores fully for nothing else, the last of the
        # burst could not be answered sooner than this.
        "CPU floor for last ack ms": round(cpu_ms * args.burst / len(os.sched_getaffinity(0)), 0),
        f"paced over {args.paced_ms:g} ms: p99 ms": round(percentile(paced["latencies"], 99), 1),
        "GET /health burst p99 ms (median)": round(statistics.median(health), 1),
        # Connects the kernel dropped because a listen queue was full during this setting's
        # bursts (machine-wide, so another program's may count too); each costs a 1 s retry.
        "listen overflows": config["overflows"],
        # The verdict is on every webhook of every burst together, not a median.
        f"p99 <= {TARGET_P99_MS} ms (pooled)": "yes" if percentile(pooled, 99) <= TARGET_P99_MS else
                                         f"NO (+{percentile(pooled, 99) - TARGET_P99_MS:.0f} ms)",
        "load (median over its bursts)": statistics.median(b["load_after"] for b in bursts),
        "bursts": bursts,
        "sequential_ms": [round(x, 2) for x in seq],
        "paced": {"spread_ms": args.paced_ms, "p50_ms": round(percentile(paced["latencies"], 50), 1),
                  "p99_ms": round(percentile(paced["latencies"], 99), 1),
                  "statuses": dict(paced["statuses"])},
    }


def part_b(args, run: Run) -> list[dict]:
    rows = []
    for text in args.retrain_configs.split(","):
        config = parse_config(text)
        data_dir = Path(tempfile.mkdtemp(prefix="atl-bench-webhooks-b-"))
        env = {"LABEL_STUDIO_URL": f"http://127.0.0.1:{free_port()}", "LABEL_STUDIO_API_KEY": "absent",
               "JOB_RETRIES": "0", "RECONCILE_INTERVAL": "0", **config.get("env", {})}
        try:
            with Services(data_dir, extra_env=env) as services:
                services.start_redis()
                redis = Redis.from_url(services.redis_url)
                services.start_web(workers=config["workers"], threads=config["threads"],
                                   worker_class=config["worker_class"], app=config["app"])
                warm_up(services.port, config["workers"] * (config["threads"] or 1), 1)
                redis.flushdb()  # the warm-up's job must not keep the worker busy during the burst
                services.start_worker()
                deadline = time.monotonic() + 120
                while not Worker.all(connection=redis) and time.monotonic() < deadline:
                    time.sleep(0.2)
                time.sleep(1.0)  # the worker is in its blocking dequeue
                for round_ in range(args.retrain_bursts):
                    project_id = 7 + round_  # a new project: nothing waits, the worker is idle
                    burst_started = time.time()
                    with run.measure(part="B", gunicorn=config["label"], round=round_ + 1,
                                     project_id=project_id, webhooks=args.burst) as measured:
                        result = burst(services.port, project_id, args.burst)
                    time.sleep(args.retrain_wait)
                    jobs = retrain_jobs(redis, Settings().queue_name, project_id)
                    all_ids = sorted({j for k, v in jobs.items() if not k.endswith("counter") for j in v})
                    started_at = []
                    for job_id in all_ids:
                        job = Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
                        if job.started_at is not None:
                            started_at.append(round((job.started_at.timestamp() - burst_started) * 1000))
                    rows.append({
                        "gunicorn": config["label"],
                        "burst": round_ + 1,
                        "webhooks": args.burst,
                        "acknowledged": sum(v for s, v in result["statuses"].items() if s in (200, 201)),
                        "statuses": " ".join(f"{s}x{v}" for s, v in sorted(result["statuses"].items())),
                        "p99 ms": round(percentile(result["latencies"], 99), 1),
                        "retrain jobs": len(all_ids),
                        "201 queued": result["statuses"].get(201, 0),
                        "coalesced (counter)": jobs["coalesced_counter"],
                        "first job started (ms after burst start)": started_at[0] if started_at else "not yet",
                        "at most two": "yes" if len(all_ids) <= 2 else "NO",
                        "load": measured["load_after"],
                        "jobs": jobs,
                    })
                    measured.update({k: v for k, v in rows[-1].items() if k not in ("gunicorn", "burst", "load")})
                    print(table([{k: v for k, v in rows[-1].items() if k != "jobs"}]), flush=True)
        finally:
            shutil.rmtree(data_dir, ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--burst", type=int, default=200, help="webhooks sent at once")
    parser.add_argument("--bursts", type=int, default=5, help="bursts per gunicorn setting")
    parser.add_argument("--sequential", type=int, default=100, help="one-at-a-time webhooks per setting")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS,
                        help="gunicorn settings for part A: sync:<workers>, asgi:<workers>, "
                             "asgi-backlog:<workers> or gthread:<workers>x<threads>")
    parser.add_argument("--paced-ms", type=float, default=1000.0,
                        help="also send one burst evenly spread over this many ms, per setting")
    parser.add_argument("--retrain-configs", default="sync:2,asgi-backlog:2", help="gunicorn settings for part B")
    parser.add_argument("--retrain-bursts", type=int, default=3,
                        help="bursts per setting in part B, each for a new project")
    parser.add_argument("--retrain-wait", type=float, default=3.0,
                        help="seconds after the burst before counting jobs (> RETRAIN_MIN_INTERVAL)")
    args = parser.parse_args()

    run = Run("bench_webhooks")
    run["burst"] = args.burst
    # The machine is shared: a run may be started under `nice -n -10` to stand for a quiet
    # machine; the servers it starts inherit the niceness, which is recorded with the numbers.
    run["niceness"] = os.nice(0)
    print(f"# niceness {run['niceness']}", flush=True)
    a = part_a(args, run)
    b = part_b(args, run)
    run["latency"] = a
    run["retrains"] = b
    print()
    print(table(a, ["gunicorn", "sequential p50 ms", "burst p50 ms (median)", "burst p99 ms (median)",
                    "burst p99 ms (range)", "p99 ms, all bursts pooled", "acknowledged", "statuses",
                    "retrain jobs per burst",
                    f"p99 <= {TARGET_P99_MS} ms (pooled)", "server CPU ms/webhook", "CPU floor for last ack ms",
                    f"paced over {args.paced_ms:g} ms: p99 ms", "GET /health burst p99 ms (median)",
                    "listen overflows", "load (median over its bursts)"]))
    print()
    print(table(b, ["gunicorn", "burst", "webhooks", "acknowledged", "statuses", "p99 ms", "retrain jobs", "201 queued",
                    "coalesced (counter)", "first job started (ms after burst start)", "at most two", "load"]))
    run.write()


if __name__ == "__main__":
    main()
