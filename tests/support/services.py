"""Start the real parts for tests and benchmarks: redis-server, gunicorn with the app, rq workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from backend.cli import GUNICORN_CONFIG, free_port, start_embedded_redis

REPO = Path(__file__).resolve().parents[2]


class Services:
    """Redis + web app + workers, all real processes, sharing one environment."""

    def __init__(self, data_dir: Path, extra_env: dict | None = None):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.redis_process = None
        self.redis_url = None
        self.web = None
        self.port = None
        self.workers: list[subprocess.Popen] = []
        self.env = dict(os.environ)
        self.env.update({
            "DATA_DIR": str(self.data_dir),
            "HF_HUB_OFFLINE": "1",
            "LOG_LEVEL": "INFO",
            "PYTHONPATH": str(REPO),
        })
        self.env.update(extra_env or {})

    def start_redis(self, port: int | None = None) -> str:
        self.redis_process, self.redis_url = start_embedded_redis(self.data_dir / "redis", port=port)
        self.env["REDIS_URL"] = self.redis_url
        return self.redis_url

    def stop_redis(self) -> None:
        if self.redis_process and self.redis_process.poll() is None:
            self.redis_process.terminate()
            self.redis_process.wait(timeout=20)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start_web(self, workers: int = 2, threads: int | None = None, worker_class: str = "sync",
                  extra_args: tuple[str, ...] = (), app: str = "backend.wsgi:app") -> str:
        """gunicorn with the app, the worker class and the settings module `make serve` uses;
        `threads`, `worker_class` ("gthread", "asgi", ...), `extra_args` and `app` pass through."""
        self.port = free_port()
        log = open(self.data_dir / "web.log", "ab")
        extra = ["--worker-class", worker_class, *extra_args]
        if threads:
            extra += ["--threads", str(threads)]
        self.web = subprocess.Popen(
            # `extra` last: gunicorn takes the last of a repeated flag, so it can override these.
            [sys.executable, "-m", "gunicorn", "--config", GUNICORN_CONFIG, "--workers", str(workers),
             "--bind", f"127.0.0.1:{self.port}", "--timeout", "120", *extra, app],
            env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.web.poll() is not None:
                raise RuntimeError(f"gunicorn exited:\n{self.log_tail('web.log')}")
            try:
                if requests.get(self.url + "/health", timeout=1).ok:
                    return self.url
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"gunicorn did not answer /health:\n{self.log_tail('web.log')}")

    def stop_web(self) -> None:
        """Stop gunicorn only (Redis and workers keep running), e.g. to restart it differently."""
        if self.web and self.web.poll() is None:
            os.killpg(self.web.pid, signal.SIGTERM)
            try:
                self.web.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.web.pid, signal.SIGKILL)
                self.web.wait()
        self.web = None

    def start_worker(self) -> subprocess.Popen:
        log = open(self.data_dir / "worker.log", "ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "backend", "worker"],
            env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.workers.append(process)
        return process

    def log_tail(self, name: str, chars: int = 4000) -> str:
        path = self.data_dir / name
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def stop(self) -> None:
        for process in self.workers + ([self.web] if self.web else []):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.workers + ([self.web] if self.web else []):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.workers.clear()
        self.stop_redis()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
