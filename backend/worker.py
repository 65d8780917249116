"""The RQ worker process (`python -m backend worker`) and the reconcile schedule.

A worker runs retraining jobs in its own process (SimpleWorker), with RQ's scheduler on, so
retries and the periodic reconcile come out of RQ's scheduled-job registry. The reconcile
(`backend.jobs.reconcile`) runs

* once when a worker starts, so annotations made while the backend was down are picked up
  at once instead of after a whole interval, and again when a worker's maintenance pass
  sees that Redis restarted (its `run_id` changed): webhooks got 503 meanwhile;
* every RECONCILE_INTERVAL seconds, as one repeating RQ job (`Repeat`) shared by all
  workers: its fixed id and RQ's unique enqueue keep it to one per Redis however many
  workers run, and only the worker holding RQ's scheduler lock moves it to the queue. Every
  worker's maintenance pass (every 30 s) puts it back if it failed, ran out of repeats,
  or was lost with Redis's data.

RECONCILE_INTERVAL=0 turns all of them off.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from datetime import timedelta

from rq import Queue, Repeat
from rq.exceptions import DuplicateJobError, NoSuchJobError
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer
from rq.worker import SimpleWorker

from backend.settings import Settings

log = logging.getLogger(__name__)

RECONCILE_FUNCTION = "backend.jobs.reconcile"
PERIODIC_RECONCILE_ID = "atl-reconcile-periodic"
STARTUP_RECONCILE_ID = "atl-reconcile-at-start"
# RQ's Repeat takes a count. At one run per interval this outlasts any deployment; should it
# ever run out, the next maintenance pass schedules a fresh one.
REPEATS = 1_000_000
# Waiting or running: another copy would only repeat its work.
ACTIVE_STATES = {JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED, JobStatus.STARTED}


def _fetch(queue: Queue, job_id: str) -> Job | None:
    try:
        return Job.fetch(job_id, connection=queue.connection, serializer=JSONSerializer)
    except NoSuchJobError:
        return None


def request_reconcile_now(queue: Queue) -> bool:
    """Queue one reconcile now, unless one already waits or runs (workers starting together
    queue one between them). Returns whether this call queued it."""
    for _ in range(2):
        try:
            queue.enqueue(RECONCILE_FUNCTION, job_id=STARTUP_RECONCILE_ID, unique=True, result_ttl=3600,
                          failure_ttl=24 * 3600, description="reconcile projects with Label Studio (worker start)")
            return True
        except DuplicateJobError:
            job = _fetch(queue, STARTUP_RECONCILE_ID)
            if job is not None and job.get_status() in ACTIVE_STATES:
                return False
            if job is not None:  # the finished or failed run of an earlier start
                job.delete()
    return False


def keep_reconcile_scheduled(queue: Queue, interval: int) -> str:
    """Make sure the one repeating reconcile job exists with this interval (none for 0).

    Returns what it did: "scheduled", "kept", "removed" or "off".
    """
    job = _fetch(queue, PERIODIC_RECONCILE_ID)
    status = job.get_status() if job is not None else None
    if job is not None:
        if status == JobStatus.STARTED:
            return "kept"  # it reschedules itself when done; a changed interval is applied next pass
        if interval > 0 and status in ACTIVE_STATES and job.repeat_intervals == [interval]:
            return "kept"
        job.delete()  # failed, out of repeats, switched off, or scheduled with another interval
        if interval <= 0:
            log.info("periodic reconcile switched off (RECONCILE_INTERVAL=0)")
            return "removed"
    if interval <= 0:
        return "off"
    try:
        queue.enqueue_in(timedelta(seconds=interval), RECONCILE_FUNCTION, job_id=PERIODIC_RECONCILE_ID,
                         unique=True, repeat=Repeat(times=REPEATS, interval=interval), result_ttl=3600,
                         failure_ttl=24 * 3600, description=f"reconcile projects with Label Studio every {interval} s")
    except DuplicateJobError:  # another worker's maintenance was quicker
        return "kept"
    log.info("periodic reconcile scheduled every %d s", interval)
    return "scheduled"


class RetrainWorker(SimpleWorker):
    """SimpleWorker that keeps the reconcile schedule and says whether it was asked to stop.

    SimpleWorker runs jobs in this process, so the encoder loaded by the first job stays in
    memory for the next ones instead of being reloaded in a fresh fork every time.
    """

    def __init__(self, *args, reconcile_interval: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.reconcile_interval = reconcile_interval  # None: leave the schedule alone (burst runs)
        self.stop_requested = False  # SIGTERM/SIGINT, busy or idle
        self.reconciled_at_start = False
        self.redis_run_id: str | None = None  # Redis's own id of its process: it changes on a restart

    def handle_warm_shutdown_request(self):
        # RQ's hook on the first SIGTERM/SIGINT, whether a job runs (RQ finishes it first) or
        # not (work() returns at once).
        self.stop_requested = True
        super().handle_warm_shutdown_request()

    def run_maintenance_tasks(self):
        # RQ runs these when work() starts and then every maintenance_interval seconds.
        super().run_maintenance_tasks()
        if self.reconcile_interval is None:
            return
        if self.reconcile_interval <= 0:
            keep_reconcile_scheduled(self.queues[0], 0)
            return
        restarted = self._redis_restarted()
        if not self.reconciled_at_start:
            if request_reconcile_now(self.queues[0]):
                log.info("reconcile queued at worker start")
            self.reconciled_at_start = True
        elif restarted:
            # Webhooks sent while Redis was down got 503 and are gone: reconcile now rather
            # than after a whole RECONCILE_INTERVAL.
            if request_reconcile_now(self.queues[0]):
                log.warning("Redis restarted since this worker's last check; reconcile queued")
        keep_reconcile_scheduled(self.queues[0], self.reconcile_interval)

    def _redis_restarted(self) -> bool:
        run_id = self.connection.info("server").get("run_id")
        restarted = self.redis_run_id is not None and run_id != self.redis_run_id
        self.redis_run_id = run_id
        return restarted


def redis_errors() -> tuple[type[Exception], ...]:
    import redis

    return (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


def run_worker(settings: Settings, burst: bool = False) -> int:
    """One RQ worker on the retraining queue, restarted after a Redis outage ends its loop."""
    from backend.job_queue import JobQueue, redis_connection

    if not settings.redis_url:
        raise SystemExit("REDIS_URL is not set; a worker needs the Redis server the web app uses")
    connection = redis_connection(settings.redis_url)
    job_queue = JobQueue(connection, settings)
    stop = threading.Event()
    quits: list[float] = []
    while True:
        # Maintenance every 30 s: RQ then re-queues a job whose worker was killed mid-run and
        # restarts its scheduler if a Redis outage ended it, and the reconcile schedule is
        # checked. RQ runs it between its blocking waits for a job, which last worker_ttl - 15
        # seconds: with RQ's default (7 minutes) a Redis restart went unnoticed that long.
        rq_worker = RetrainWorker([job_queue.queue], connection=connection, serializer=JSONSerializer,
                                  maintenance_interval=30, worker_ttl=45,
                                  reconcile_interval=None if burst else settings.reconcile_interval)
        if not burst and settings.reconcile_interval <= 0:
            # Before this worker's RQ scheduler starts: the scheduler moves a due job from its
            # registry into the queue, which would bring back a schedule removed a moment
            # later by the maintenance pass.
            keep_reconcile_scheduled(job_queue.queue, 0)
        try:
            rq_worker.work(burst=burst, with_scheduler=True, logging_level=settings.log_level)
        except redis_errors() as exc:  # raised from RQ's own teardown while Redis is gone
            log.error("worker lost Redis: %s", exc)
        if burst or rq_worker.stop_requested:
            return 0
        # RQ retries a lost connection only while it waits for a job; a Redis outage that hits
        # a job's bookkeeping makes work() log the error and quit. Outlive that instead of
        # leaving the queue with no worker: wait for Redis, then start a fresh worker (which
        # reconciles at its start, catching what the outage hid). A worker that keeps
        # quitting is a real fault: exit, and let the supervisor see it.
        now = time.monotonic()
        quits = [t for t in quits if now - t < 300] + [now]
        if len(quits) > 5:
            log.error("the rq worker quit %d times in 5 minutes; exiting", len(quits))
            return 1
        _install_stop_handlers(stop)
        if not _redis_reachable(connection):
            log.warning("rq worker quit while Redis is unreachable; waiting for Redis to come back")
            while not _redis_reachable(connection):
                if stop.wait(2.0):
                    return 0
        elif stop.wait(2.0):
            return 0
        log.warning("starting a new rq worker")


def _redis_reachable(connection) -> bool:
    try:
        return bool(connection.ping())
    except redis_errors():
        return False


def _install_stop_handlers(stop: threading.Event) -> None:
    """SIGTERM/SIGINT while waiting for Redis: stop, rather than RQ's handler raising here."""
    def handler(signum, frame):
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
