"""RQ job functions. Each takes plain ids, fetches what it needs itself, and is safe to run twice."""

from __future__ import annotations

import logging
import time

from rq import get_current_job

from backend.job_queue import JobQueue, redis_connection
from backend.ml_backend import ActiveLearningBackend
from backend.settings import Settings

log = logging.getLogger(__name__)


def _progress_reporter(job, project_id: int):
    """Writes {stage, done, total} into the RQ job's meta, at most a few times a second."""
    last = {"t": 0.0, "stage": None}

    def report(stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if stage == last["stage"] and now - last["t"] < 0.5 and done != total:
            return
        if stage != last["stage"]:
            log.info("project=%s job=%s stage: %s", project_id, job.id if job else "-", stage)
        last.update(t=now, stage=stage)
        if job is not None:
            job.meta["progress"] = {"stage": stage, "done": int(done), "total": int(total),
                                    "updated_at": time.time()}
            job.save_meta()

    return report


def retrain(project_id: int, reason: str = "") -> dict:
    """Retrain one project's model from Label Studio and publish its predictions."""
    settings = Settings.from_env()
    job = get_current_job()
    job_id = job.id if job is not None else f"inline-{time.time():.0f}"
    connection = job.connection if job is not None else redis_connection(settings.redis_url)
    queue = JobQueue(connection, settings)
    queue.mark_started(project_id, job_id)
    started = time.time()
    log.info("project=%s job=%s retrain started (%s)", project_id, job_id, reason)
    try:
        with queue.training_lock(project_id, job_id):
            result = ActiveLearningBackend(settings, project_id).fit(
                reason, progress=_progress_reporter(job, project_id)
            )
    except Exception as exc:
        queue.record_result(project_id, {"status": "failed", "job_id": job_id, "error": str(exc),
                                         "finished_at": time.time(), "duration": time.time() - started})
        log.error("project=%s job=%s retrain failed: %s", project_id, job_id, exc)
        raise
    result.update(job_id=job_id, finished_at=time.time(), duration=round(time.time() - started, 3))
    queue.record_result(project_id, result)
    log.info("project=%s job=%s retrain %s version=%s in %.1fs", project_id, job_id,
             result["status"], result.get("model_version"), result["duration"])
    return result
