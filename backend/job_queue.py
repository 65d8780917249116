"""The retraining queue: at most one job per project waiting and one running.

Label Studio sends a webhook for every annotation, often several a second. Each retrain
reads the whole truth from Label Studio, so one job that starts after an annotation was
saved covers it. Hence per project:

* while a retrain **waits** in the queue, new events add nothing (they are "coalesced");
* once it **holds the project's training lock**, it clears the waiting mark and only then
  reads Label Studio, so the next event queues exactly one follow-up, which runs after the
  current one. A job a worker has started but that still waits for the lock (another
  worker trains the project) has read nothing yet: events keep coalescing into it, as long
  as it keeps announcing that it waits (a key with a short TTL, so a job whose worker died
  stops collecting events within seconds);
* a per-project training lock with a heartbeat keeps two workers from training the same
  project at once, and expires by itself if a worker dies mid-job.

Jobs are plain importable functions with JSON arguments (`backend.jobs.retrain(project_id,
reason)`), serialised as JSON rather than pickle.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
import uuid
from datetime import timedelta

from redis import Redis
from rq import Queue, Retry, Worker
from rq.job import Dependency, Job, JobStatus
from rq.serializers import JSONSerializer

from backend.settings import Settings

log = logging.getLogger(__name__)

PREFIX = "atl"
WAITING_STATES = {JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED}
LOCK_TTL = 15  # seconds; refreshed every LOCK_TTL / 3 while a job runs, so a killed worker frees it fast

# The fast path of every webhook, one round trip: if a retrain of the project is still
# waiting, count the event (or ARGV[2] events that arrived together) as coalesced and
# return that job's id.
COALESCE_SCRIPT = """
local waiting = redis.call('GET', KEYS[1])
if not waiting then return false end
local status = redis.call('HGET', ARGV[1] .. waiting, 'status')
if status == 'queued' or status == 'deferred' or status == 'scheduled'
   or (status == 'started' and redis.call('GET', KEYS[3]) == waiting) then
  redis.call('INCRBY', KEYS[2], tonumber(ARGV[2]) or 1)
  return waiting
end
return false
"""


# The web app's clients: short timeouts so a dead Redis costs milliseconds, and no retries:
# the web app answers 503 at once and Label Studio's next event retries.
FAST_FAIL_TIMEOUTS = {"socket_timeout": 0.5, "socket_connect_timeout": 0.25}


def redis_connection(url: str, fast_fail: bool = False) -> Redis:
    """A client; `fast_fail` gives the web app short timeouts so a dead Redis costs ms."""
    if fast_fail:
        from redis.backoff import NoBackoff
        from redis.retry import Retry as RedisRetry

        return Redis.from_url(url, **FAST_FAIL_TIMEOUTS, retry=RedisRetry(NoBackoff(), 0))
    return Redis.from_url(url, socket_timeout=30, socket_connect_timeout=5, health_check_interval=30)


def key(project_id: int, what: str) -> str:
    return f"{PREFIX}:project:{int(project_id)}:{what}"


def config_digest(label_config: str) -> str:
    """A short fingerprint of a label config's exact text: "has it changed since?"."""
    return hashlib.sha256(label_config.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def coalesce_keys(project_id: int) -> list[str]:
    """KEYS of COALESCE_SCRIPT for a project; its one ARGV is RQ's job key prefix."""
    return [key(project_id, "waiting"), key(project_id, "coalesced"), key(project_id, "lock-wait")]


class JobQueue:
    enqueue_lock_wait = 5.0  # seconds a webhook waits for the enqueue lock before failing

    def __init__(self, connection: Redis, settings: Settings):
        self.redis = connection
        self.settings = settings
        self.queue = Queue(
            settings.queue_name,
            connection=connection,
            serializer=JSONSerializer,
            default_timeout=settings.job_timeout,
        )
        self._coalesce = connection.register_script(COALESCE_SCRIPT)

    # -- called by the web app ---------------------------------------------------------
    def _enqueue_lock(self, project_id: int):
        """The short lock around queueing a retrain and clearing its waiting mark.

        It is held for a few Redis round trips, so it is polled every 2 ms: redis-py's
        default of 100 ms made the second webhook of a burst sleep 100 ms while its
        gunicorn worker served nothing else.
        """
        return self.redis.lock(key(project_id, "enqueue"), timeout=10, sleep=0.002,
                               blocking_timeout=self.enqueue_lock_wait)

    def request_retrain(self, project_id: int, reason: str,
                        label_config: str | None = None) -> tuple[str, str | None]:
        """Queue a retrain unless one is already waiting. Returns (status, job id).

        Webhooks are hints and may be forged or floods: at most one retrain per project
        waits, and a follow-up starts no sooner than RETRAIN_MIN_INTERVAL seconds after the
        previous one was queued (it is scheduled for then instead; nothing is dropped).

        A project whose label config a retrain refused (`refuse_config`) gets no retrain
        ("refused", None) until its config changes: `label_config`, the config the caller
        saw (a webhook's project, the reconcile's read), is compared with the refused one;
        without it the refusal stands.
        """
        keys = coalesce_keys(project_id)
        waiting = self._coalesce(keys=keys, args=[Job.redis_job_namespace_prefix])
        if waiting:
            return "coalesced", waiting.decode()
        with self._enqueue_lock(project_id):
            # Again under the lock: the job may have just taken the training lock.
            waiting = self._coalesce(keys=keys, args=[Job.redis_job_namespace_prefix])
            if waiting:
                return "coalesced", waiting.decode()
            refused = self.redis.get(key(project_id, "refused-config"))
            if refused is not None:
                if label_config is None or config_digest(label_config) == refused.decode():
                    return "refused", None
                self.redis.delete(key(project_id, "refused-config"))
                log.info("project=%s label config changed since it was refused; retraining", project_id)
            job_id = f"retrain-{int(project_id)}-{uuid.uuid4().hex[:12]}"
            now = time.time()
            last = float(self.redis.get(key(project_id, "last_queued")) or 0)
            delay = self.settings.retrain_min_interval - (now - last)
            self.redis.set(key(project_id, "waiting"), job_id, ex=self.settings.job_timeout * 2)
            self.redis.set(key(project_id, "last_queued"), now + max(delay, 0))
            enqueue = (self.queue.enqueue if delay <= 0 else
                       lambda *a, **kw: self.queue.enqueue_in(timedelta(seconds=delay), *a, **kw))
            enqueue(
                "backend.jobs.retrain",
                int(project_id),
                reason,
                job_id=job_id,
                retry=Retry(max=self.settings.job_retries, interval=[10, 30, 90])
                if self.settings.job_retries > 0 else None,
                result_ttl=24 * 3600,
                failure_ttl=7 * 24 * 3600,
                description=f"retrain project {int(project_id)} ({reason})",
            )
            self.redis.incr(key(project_id, "requested"))
            return "queued", job_id

    def refuse_config(self, project_id: int, label_config: str) -> None:
        """Remember that a retrain refused this label config: no retrain is queued for the
        project until its config differs (`request_retrain`)."""
        self.redis.set(key(project_id, "refused-config"), config_digest(label_config))

    def config_updated(self, project_id: int, label_config: str | None) -> tuple[str, str | None]:
        """PROJECT_UPDATED: a project whose config was refused is retrained once its config
        changed; any other project update is ignored (one Redis read)."""
        if label_config is None or not self.redis.exists(key(project_id, "refused-config")):
            return "ignored", None
        return self.request_retrain(project_id, "label config changed", label_config)

    def request_encode(self, project_id: int) -> tuple[str, str | None]:
        """Queue encoding of a project's new tasks, unless such a job already waits.

        Imports come in bursts of TASKS_CREATED events; one job reads every new task.
        """
        job_id = f"encode-{int(project_id)}-{uuid.uuid4().hex[:12]}"
        if not self.redis.set(key(project_id, "encode-waiting"), job_id, nx=True, ex=600):
            return "coalesced", None
        self.queue.enqueue("backend.jobs.encode_tasks", int(project_id), job_id=job_id,
                           result_ttl=3600, failure_ttl=24 * 3600,
                           description=f"encode new tasks of project {int(project_id)}")
        return "queued", job_id

    def mark_encode_started(self, project_id: int) -> None:
        self.redis.delete(key(project_id, "encode-waiting"))

    def record_encode(self, project_id: int, result: dict) -> None:
        self.redis.set(key(project_id, "last_encode"), json.dumps(result))

    def _status(self, job_id: str):
        try:
            return Job.fetch(job_id, connection=self.redis, serializer=JSONSerializer).get_status()
        except Exception:  # the job expired or never existed
            return None

    # -- called inside the job ---------------------------------------------------------
    def mark_started(self, project_id: int, job_id: str) -> None:
        """Clear the waiting mark so later events queue a follow-up (before reading LS)."""
        with self._enqueue_lock(project_id):
            current = self.redis.get(key(project_id, "waiting"))
            if current is not None and current.decode() == job_id:
                self.redis.delete(key(project_id, "waiting"), key(project_id, "lock-wait"))

    @contextlib.contextmanager
    def training_lock(self, project_id: int, job_id: str, still_waiting: bool = False):
        """Hold the project's training lock for the duration; refreshed by a heartbeat.

        `still_waiting` (retrains): until the lock is taken, the job counts as waiting, so
        events coalesce into it; once it holds the lock, the waiting mark is cleared
        (`mark_started`) before the caller reads anything.
        """
        # thread_local=False: the heartbeat thread must see the token to extend the lock.
        lock = self.redis.lock(key(project_id, "training"), timeout=LOCK_TTL, thread_local=False)
        deadline = time.monotonic() + self.settings.job_timeout
        while True:
            if still_waiting:
                self.redis.set(key(project_id, "lock-wait"), job_id, ex=LOCK_TTL)
            step = min(LOCK_TTL / 3, deadline - time.monotonic())
            if step > 0 and lock.acquire(token=job_id.encode(), blocking_timeout=step):
                break
            if time.monotonic() >= deadline:
                raise TimeoutError(f"project {project_id} stayed locked by another retrain")
        if still_waiting:
            self.mark_started(project_id, job_id)
        stop = threading.Event()

        def heartbeat():
            while not stop.wait(LOCK_TTL / 3):
                try:
                    lock.extend(LOCK_TTL, replace_ttl=True)
                    self.redis.pexpire(key(project_id, "state"), int(LOCK_TTL * 1000))
                except Exception as exc:  # Redis briefly down: try again next beat
                    log.warning("project=%s could not refresh the training lock: %s", project_id, exc)

        beat = threading.Thread(target=heartbeat, name=f"lock-{project_id}", daemon=True)
        beat.start()
        self.redis.hset(key(project_id, "state"), mapping={"running": job_id, "started_at": time.time()})
        # Expires with the lock, so a worker killed mid-job does not show as running forever.
        self.redis.pexpire(key(project_id, "state"), int(LOCK_TTL * 1000))
        try:
            yield
        finally:
            stop.set()
            beat.join(timeout=5)
            self.redis.hdel(key(project_id, "state"), "running", "started_at")
            with contextlib.suppress(Exception):
                lock.release()

    def record_result(self, project_id: int, result: dict) -> None:
        self.redis.set(key(project_id, "last"), json.dumps(result))
        if result.get("status") == "publishing":  # counted when its last job finishes
            return
        counter = "failed" if result.get("status") == "failed" else "succeeded"
        self.redis.incr(key(project_id, counter))

    def fan_out_pays(self) -> bool:
        """Whether splitting a large job into slice jobs can pay: only when another worker
        listens on the queue to take some of them (RQ's registry of the queue's workers,
        this one included; a worker killed without a goodbye stays in it until a
        maintenance pass removes it, which at worst means a fan-out as before).

        With one worker the slices run one after the other in that same worker, so the
        split only adds its costs: every prediction or text goes into Redis and back, and at
        100,000 tasks the slices' uploads were slower per chunk than the same requests sent
        by one job (BENCHMARKS.md, "100,000 tasks, one worker: inline against slices").
        """
        return Worker.count(connection=self.redis, queue=self.queue) > 1

    def fan_out_publish(self, project_id: int, version: str,
                        slices: list[tuple[list[dict], list[dict]]], result: dict) -> list[str]:
        """Queue one upload job per slice of predictions, then `finish_publish`.

        A slice is (predictions for the bulk import, predictions to create one by one);
        `result` is the retrain's result so far, which `finish_publish` completes (the caller
        has recorded it as "publishing").

        The slice jobs carry their predictions (JSON) and need only Label Studio and Redis,
        so any worker on any machine can take one: more workers, more upload throughput.
        The finishing job depends on all of them (failures included, so a failed slice is
        reported instead of leaving the version staged forever) and switches the version.
        Slice jobs are not retried by RQ: Label Studio duplicates a re-imported prediction,
        and each chunk inside a slice already retries on its own.
        """
        project_id = int(project_id)
        jobs = []
        for number, (bulk, one_by_one) in enumerate(slices, 1):
            jobs.append(self.queue.enqueue(
                "backend.jobs.publish_slice", project_id, version, bulk, one_by_one,
                job_id=f"publish-{project_id}-{version}-{number}of{len(slices)}",
                result_ttl=24 * 3600, failure_ttl=7 * 24 * 3600,
                description=f"upload {len(bulk) + len(one_by_one)} predictions of {version}, "
                            f"project {project_id} (slice {number} of {len(slices)})",
            ))
        ids = [job.id for job in jobs]
        finish = self.queue.enqueue(
            "backend.jobs.finish_publish", project_id, version, ids, result,
            job_id=f"publish-{project_id}-{version}-finish",
            depends_on=Dependency(jobs=jobs, allow_failure=True),
            result_ttl=24 * 3600, failure_ttl=7 * 24 * 3600,
            description=f"switch project {project_id} to {version} once its predictions are in",
        )
        self.redis.set(key(project_id, "publishing"),
                       json.dumps({"model_version": version, "jobs": ids, "finish": finish.id,
                                   "queued_at": time.time()}),
                       ex=self.settings.job_timeout * 2)
        return ids

    def fan_out_encode(self, project_id: int, encoder_id: str, slices: list[list[str]],
                       result: dict) -> list[str]:
        """Queue one `encode_slice` job per slice of texts, then `store_encodings` (which
        depends on all of them, failures included) to put the vectors into the cache and
        complete `result`, which the caller has recorded as "encoding"."""
        project_id = int(project_id)
        batch = uuid.uuid4().hex[:8]
        jobs = [
            self.queue.enqueue(
                "backend.jobs.encode_slice", project_id, encoder_id, part,
                job_id=f"encode-{project_id}-{batch}-{number}of{len(slices)}",
                result_ttl=3600, failure_ttl=24 * 3600,
                description=f"encode {len(part)} new texts of project {project_id} "
                            f"(slice {number} of {len(slices)})",
            )
            for number, part in enumerate(slices, 1)
        ]
        ids = [job.id for job in jobs]
        self.queue.enqueue(
            "backend.jobs.store_encodings", project_id, encoder_id, ids, result,
            job_id=f"encode-{project_id}-{batch}-store",
            depends_on=Dependency(jobs=jobs, allow_failure=True),
            result_ttl=3600, failure_ttl=24 * 3600,
            description=f"store the new encodings of project {project_id}",
        )
        return ids

    def publish_finished(self, project_id: int, version: str) -> None:
        current = self.redis.get(key(project_id, "publishing"))
        if current is not None and json.loads(current).get("model_version") == version:
            self.redis.delete(key(project_id, "publishing"))

    # -- state for /jobs, /health and /metrics ----------------------------------------
    def project_ids(self) -> list[int]:
        ids = set()
        for raw in self.redis.scan_iter(match=f"{PREFIX}:project:*", count=500):
            part = raw.decode().split(":")[2]
            if part.isdigit():
                ids.add(int(part))
        return sorted(ids)

    def project_status(self, project_id: int) -> dict:
        pipe = self.redis.pipeline()
        pipe.get(key(project_id, "waiting"))
        pipe.hgetall(key(project_id, "state"))
        pipe.get(key(project_id, "last"))
        for counter in ("requested", "succeeded", "failed", "coalesced"):
            pipe.get(key(project_id, counter))
        pipe.get(key(project_id, "last_encode"))
        pipe.get(key(project_id, "publishing"))
        pipe.exists(key(project_id, "refused-config"))
        (waiting, state, last, requested, succeeded, failed, coalesced, last_encode,
         publishing, refused) = pipe.execute()
        running_id = state.get(b"running", b"").decode() or None
        waiting_id = waiting.decode() if waiting else None
        if waiting_id:
            job_status = self._status(waiting_id)
            # Started but still waiting for the training lock counts as waiting (see above).
            blocked = (job_status == JobStatus.STARTED
                       and self.redis.get(key(project_id, "lock-wait")) == waiting)
            if job_status not in WAITING_STATES and not blocked:
                waiting_id = None
        status = {
            "project_id": int(project_id),
            "waiting": waiting_id,
            "running": None,
            "last": json.loads(last) if last else None,
            "requested": int(requested or 0),
            "succeeded": int(succeeded or 0),
            "failed": int(failed or 0),
            "coalesced": int(coalesced or 0),
            "last_encode": json.loads(last_encode) if last_encode else None,
            # A version whose predictions are still being uploaded by slice jobs (fan-out).
            "publishing": json.loads(publishing) if publishing else None,
            # The last retrain refused the label config (`last.error` says why): no retrain
            # until the config changes in Label Studio.
            "label_config_refused": bool(refused),
        }
        if running_id:
            progress = {}
            with contextlib.suppress(Exception):
                job = Job.fetch(running_id, connection=self.redis, serializer=JSONSerializer)
                progress = job.get_meta(refresh=True).get("progress", {})
            status["running"] = {
                "job_id": running_id,
                "started_at": float(state.get(b"started_at", 0) or 0),
                "progress": progress,
            }
        return status
