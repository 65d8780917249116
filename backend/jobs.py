"""RQ job functions. Each takes plain ids, fetches what it needs itself, and is safe to run twice."""

from __future__ import annotations

import logging
import time
from datetime import timezone

from rq import get_current_job

from backend.job_queue import JobQueue, redis_connection
from backend.label_studio import LabelStudioError, LabelStudioProject
from backend.ml_backend import ActiveLearningBackend, annotation_counts
from backend.model_store import ModelStore
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


def _queue_wait(job, started: float) -> float | None:
    """Seconds the job waited between being created (the webhook) and starting."""
    created = getattr(job, "created_at", None) if job is not None else None
    if created is None:
        return None
    if created.tzinfo is None:
        created = created.replace(tzinfo=timezone.utc)
    return round(started - created.timestamp(), 3)


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
    result.update(job_id=job_id, finished_at=time.time(), duration=round(time.time() - started, 3),
                  queue_wait=_queue_wait(job, started))
    queue.record_result(project_id, result)
    log.info("project=%s job=%s retrain %s version=%s in %.1fs", project_id, job_id,
             result["status"], result.get("model_version"), result["duration"])
    return result


def encode_tasks(project_id: int) -> dict:
    """Encode a project's new tasks in the background (on TASKS_CREATED), before anyone labels
    them, so the retrain after their first annotation finds every vector cached."""
    settings = Settings.from_env()
    job = get_current_job()
    job_id = job.id if job is not None else "inline"
    connection = job.connection if job is not None else redis_connection(settings.redis_url)
    queue = JobQueue(connection, settings)
    queue.mark_encode_started(project_id)
    with queue.training_lock(project_id, job_id):  # the task copy has one writer at a time
        result = ActiveLearningBackend(settings, project_id).encode_new_tasks(
            progress=_progress_reporter(job, project_id))
    result.update(job_id=job_id, finished_at=time.time())
    queue.record_encode(project_id, result)
    log.info("project=%s job=%s encoded %d new of %d tasks in %.1fs", project_id, job_id,
             result["encoded"], result["tasks"], result["duration"])
    return result


def reconcile() -> dict:
    """Queue a retrain for every known project whose annotations changed since its model.

    Runs periodically (see `backend.cli.worker`). It catches what webhooks missed, e.g.
    annotations made while Redis was down and /webhook answered 503. It compares Label
    Studio's annotation counters with those the current model was trained on; an edit that
    keeps every count equal is caught by the next webhook instead.
    """
    settings = Settings.from_env()
    job = get_current_job()
    connection = job.connection if job is not None else redis_connection(settings.redis_url)
    queue = JobQueue(connection, settings)
    store = ModelStore(settings.models_dir)
    queued, unchanged, unreachable = [], [], []
    for project_id in sorted(set(store.projects()) | set(queue.project_ids())):
        version = store.current_version(project_id)
        trained_on = store.read_meta(project_id, version).get("annotation_counts") if version else None
        try:
            counts = annotation_counts(LabelStudioProject(settings, project_id).project())
        except LabelStudioError as exc:
            log.warning("project=%s reconcile: %s", project_id, exc)
            unreachable.append(project_id)
            continue
        if counts == trained_on or not any(counts.values()):
            unchanged.append(project_id)
            continue
        status, job_id = queue.request_retrain(project_id, "reconcile")
        log.info("project=%s reconcile: annotations changed, retrain %s job=%s", project_id, status, job_id)
        queued.append(project_id)
    return {"queued": queued, "unchanged": unchanged, "unreachable": unreachable}
