"""Start-up and restarts as a new user meets them: `python -m backend serve` and workers,
real processes on a real Redis. The banner says where the backend listens and whether Label
Studio accepted the API key; workers reconcile at start and then once per interval between
them all, through RQ's scheduler."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.serializers import JSONSerializer

from backend.cli import free_port
from backend.job_queue import redis_connection
from backend.worker import PERIODIC_RECONCILE_ID, keep_reconcile_scheduled, request_reconcile_now

REPO = Path(__file__).resolve().parents[1]
PERIODIC_DONE = "Successfully completed reconcile projects with Label Studio every"
AT_START_DONE = "Successfully completed reconcile projects with Label Studio (worker start)"


def _queue(services) -> Queue:
    return Queue("atl", connection=redis_connection(services.redis_url), serializer=JSONSerializer)


def _periodic_job(services) -> Job | None:
    try:
        return Job.fetch(PERIODIC_RECONCILE_ID, connection=redis_connection(services.redis_url),
                         serializer=JSONSerializer)
    except NoSuchJobError:
        return None


def _stop(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout=60)


def test_workers_reconcile_at_start_and_then_once_per_interval_between_them(services):
    """Two workers: a reconcile at start, then one per interval in all, not one per worker."""
    interval, window = 2, 24
    services.env.update(RECONCILE_INTERVAL=str(interval), LABEL_STUDIO_URL=f"http://127.0.0.1:{free_port()}",
                        LABEL_STUDIO_API_KEY="some-token")
    workers = [services.start_worker(), services.start_worker()]
    started = time.monotonic()
    deadline = started + 60
    while AT_START_DONE not in services.log_tail("worker.log", 100000):
        assert time.monotonic() < deadline, services.log_tail("worker.log")
        time.sleep(0.2)
    time.sleep(max(0.0, window - (time.monotonic() - started)))
    log = services.log_tail("worker.log", 500000)
    for worker in workers:
        assert _stop(worker) == 0, services.log_tail("worker.log")
    runs = log.count(PERIODIC_DONE)
    # One schedule for both: at most one run per interval (a schedule per worker would give
    # twice as many), and it does run.
    assert 3 <= runs <= window // interval + 1, log[-6000:]
    assert log.count("Label Studio is not reachable") == 2, log  # each worker checked at its start
    assert _periodic_job(services).repeat_intervals == [interval]


def test_reconcile_interval_0_turns_the_reconcile_off_and_removes_the_schedule(services):
    services.env.update(RECONCILE_INTERVAL="2", LABEL_STUDIO_URL=f"http://127.0.0.1:{free_port()}")
    first = services.start_worker()
    deadline = time.monotonic() + 60
    while _periodic_job(services) is None:
        assert time.monotonic() < deadline, services.log_tail("worker.log")
        time.sleep(0.2)
    assert _stop(first) == 0
    (services.data_dir / "worker.log").write_text("")

    services.env["RECONCILE_INTERVAL"] = "0"
    second = services.start_worker()
    deadline = time.monotonic() + 60
    while "Listening on" not in services.log_tail("worker.log"):
        assert time.monotonic() < deadline, services.log_tail("worker.log")
        time.sleep(0.2)
    time.sleep(6)  # three intervals of the old schedule
    assert _stop(second) == 0
    log = services.log_tail("worker.log", 100000)
    assert _periodic_job(services) is None, log
    assert "switched off" in log
    assert "reconcile projects" not in log, log  # no run of any reconcile job


def test_the_schedule_is_one_job_put_back_when_missing_or_changed(services):
    """What each worker's maintenance pass does, against a real Redis."""
    queue = _queue(services)
    assert keep_reconcile_scheduled(queue, 300) == "scheduled"
    assert keep_reconcile_scheduled(queue, 300) == "kept"  # a second worker adds nothing
    assert len(queue.scheduled_job_registry.get_job_ids()) == 1
    assert keep_reconcile_scheduled(queue, 60) == "scheduled"  # RECONCILE_INTERVAL changed
    assert _periodic_job(services).repeat_intervals == [60]
    assert len(queue.scheduled_job_registry.get_job_ids()) == 1
    _periodic_job(services).delete()  # lost, e.g. with a Redis that keeps no data
    assert keep_reconcile_scheduled(queue, 60) == "scheduled"
    assert keep_reconcile_scheduled(queue, 0) == "removed"
    assert keep_reconcile_scheduled(queue, 0) == "off"
    assert queue.scheduled_job_registry.get_job_ids() == []
    # Workers starting together queue one reconcile between them.
    assert request_reconcile_now(queue) is True
    assert request_reconcile_now(queue) is False
    assert queue.count == 1


def _serve(tmp_path, **env) -> tuple[subprocess.Popen, int, Path]:
    port = free_port()
    environment = {k: v for k, v in os.environ.items() if k not in ("HOST", "REDIS_URL")}
    environment.update(DATA_DIR=str(tmp_path / "data"), PORT=str(port), PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1",
                       RQ_WORKERS="1", WEB_WORKERS="1", **env)
    output = tmp_path / "serve.log"
    process = subprocess.Popen([sys.executable, "-m", "backend", "serve"], env=environment, cwd=tmp_path,
                               stdout=output.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while "Press Ctrl-C to stop." not in output.read_text():
        assert process.poll() is None, output.read_text()
        assert time.monotonic() < deadline, output.read_text()
        time.sleep(0.2)
    return process, port, output


def _listening_addresses(port: int) -> set[str]:
    """Local addresses with a listening TCP socket on `port` (IPv4, from /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, local_port = local.split(":")
        if state == "0A" and int(local_port, 16) == port:
            found.add(".".join(str(int(address[i:i + 2], 16)) for i in (6, 4, 2, 0)))
    return found


def _wait_for_health(port: int, output: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).json()["status"] == "UP":
                return
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, output.read_text()
        time.sleep(0.3)


def test_serve_listens_on_loopback_unless_asked_and_says_so(tmp_path):
    """No HOST: only this machine can connect, and the banner says how to open it up. Label
    Studio down: said plainly, and the backend starts anyway."""
    process, port, output = _serve(tmp_path, LABEL_STUDIO_URL=f"http://127.0.0.1:{free_port()}",
                                   LABEL_STUDIO_API_KEY="some-token", RECONCILE_INTERVAL="0")
    try:
        _wait_for_health(port, output)
        assert _listening_addresses(port) == {"127.0.0.1"}
        banner = output.read_text()
        assert f"URL:  http://localhost:{port}" in banner
        assert "start with HOST=0.0.0.0" in banner
        assert "WARNING: Label Studio is not reachable at LABEL_STUDIO_URL=" in banner
        assert "API key set" not in banner
    finally:
        assert _stop(process) == 0, output.read_text()
    assert "stopped." in output.read_text()


def test_serve_with_host_0_0_0_0_listens_on_every_interface(tmp_path):
    process, port, output = _serve(tmp_path, HOST="0.0.0.0", LABEL_STUDIO_URL=f"http://127.0.0.1:{free_port()}",
                                   RECONCILE_INTERVAL="0")
    try:
        _wait_for_health(port, output)
        assert _listening_addresses(port) == {"0.0.0.0"}
        banner = output.read_text()
        assert "every network interface" in banner
        # No key at all: said at start, with where to make one.
        assert "LABEL_STUDIO_API_KEY is not set" in banner and "Personal Access Token" in banner
    finally:
        assert _stop(process) == 0, output.read_text()


@pytest.mark.e2e
def test_a_wrong_api_key_is_said_in_plain_words_at_start(tmp_path, label_studio):
    """Against the real Label Studio: the banner and the worker's log say the token was
    rejected and where to make one, before any retrain; a right token is confirmed."""
    from backend.label_studio import check_connection
    from backend.settings import Settings

    wrong = label_studio.api_key[:-8] + "AAAAAAAA"
    process, port, output = _serve(tmp_path, LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=wrong,
                                   RECONCILE_INTERVAL="0")
    try:
        _wait_for_health(port, output)
        deadline = time.monotonic() + 60
        while output.read_text().count("rejected LABEL_STUDIO_API_KEY") < 2:  # the banner, then the worker
            assert time.monotonic() < deadline, output.read_text()
            time.sleep(0.3)
        text = output.read_text()
        banner = text[text.index("Active-learning backend is running."):]
        assert re.search(r"WARNING: Label Studio at \S+ rejected LABEL_STUDIO_API_KEY \(HTTP 401\)", banner), banner
        assert "Account & Settings > Personal Access Token" in banner
        assert wrong not in text  # the token itself is never printed
    finally:
        assert _stop(process) == 0, output.read_text()

    state, message = check_connection(Settings(label_studio_url=label_studio.url,
                                               label_studio_api_key=label_studio.api_key))
    assert state == "ok" and "accepted the API key" in message


@pytest.mark.e2e
def test_annotations_made_while_the_backend_was_down_are_trained_on_when_a_worker_starts(label_studio, services):
    """The backend is stopped, people keep labeling (their webhooks are lost), the backend
    starts again: the worker's reconcile at start retrains the project, long before the
    periodic reconcile's interval."""
    from label_studio_sdk.client import LabelStudio

    from backend.model_store import version_number
    from tests.support.ls_project import SnippetProject, wait_until_idle

    services.env.update(LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.api_key,
                        RECONCILE_INTERVAL="3600")
    services.start_web()
    worker = services.start_worker()
    client = LabelStudio(base_url=label_studio.url, api_key=label_studio.api_key)
    project = SnippetProject(client, n_tasks=120, title="startup")
    client.ml.create(url=services.url, project=project.id, title="ATL", is_interactive=False)
    project.annotate_balanced(5)
    project.wait_for_version(0, services)
    first = wait_until_idle(services, project.id)["model_version"]  # every annotation so far in
    assert first == project.model_version()

    # Backend down: the web app and the worker stop; the annotations' webhooks find nobody.
    assert _stop(worker) == 0
    services.workers.clear()
    services.stop_web()
    project.annotate_balanced(3)

    services.start_web()
    services.start_worker()
    second = project.wait_for_version(version_number(first), services, timeout=300)
    final = wait_until_idle(services, project.id)
    assert final["last"]["labeled"] == len(project.annotated)
    assert final["model_version"] == second
    assert "reconcile: annotations changed" in services.log_tail("worker.log", 200000)
