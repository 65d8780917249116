"""RQ job functions. Each takes plain ids, fetches what it needs itself, and is safe to run twice."""

from __future__ import annotations

import base64
import logging
import time
from dataclasses import replace
from datetime import UTC

import numpy as np
from rq import get_current_job
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from backend.job_queue import JobQueue, redis_connection
from backend.job_results import EncodeResult, RetrainResult, Status, record
from backend.label_studio import LabelStudioError, LabelStudioProject
from backend.ml_backend import ANNOTATION_COUNTERS, ActiveLearningBackend, ConfigRefused, annotation_counts, get_encoder
from backend.model_store import ModelStore
from backend.publish import go_live, idle_long_enough, prune_when_idle
from backend.settings import Settings
from backend.worker import PERIODIC_RECONCILE_ID
from model.encoding_cache import EncodingCache, text_key

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
        created = created.replace(tzinfo=UTC)
    return round(started - created.timestamp(), 3)


def retrain(project_id: int, reason: str = "") -> dict:
    """Retrain one project's model from Label Studio and publish its predictions."""
    settings = Settings.from_env()
    job = get_current_job()
    job_id = job.id if job is not None else f"inline-{time.time():.0f}"
    connection = job.connection if job is not None else redis_connection(settings.redis_url)
    queue = JobQueue(connection, settings)
    started = time.time()

    def fan_out(version: str, slices: list, partial: RetrainResult) -> None:
        # Recorded before the slices are queued, so /jobs shows "publishing" at once and
        # `finish_publish` (which may follow fast) overwrites it, never the other way round.
        partial = replace(partial, job_id=job_id, started_at=started, queue_wait=_queue_wait(job, started))
        record(queue, project_id, partial)
        queue.fan_out_publish(project_id, version, slices, partial.to_dict())

    log.info("project=%s job=%s retrain started (%s)", project_id, job_id, reason)
    try:
        # Clears the waiting mark once the lock is held, before Label Studio is read.
        with queue.training_lock(project_id, job_id, still_waiting=True):
            result = ActiveLearningBackend(settings, project_id).fit(
                reason, progress=_progress_reporter(job, project_id),
                fan_out=fan_out if queue.fan_out_pays() else None)
    except ConfigRefused as exc:
        # Fails once, with the reason in /jobs, and stays refused (webhooks and the reconcile
        # queue nothing) until the project's config changes: a retry cannot fix a config.
        record(queue, project_id, RetrainResult(Status.FAILED, job_id=job_id, error=str(exc),
                                                finished_at=time.time(),
                                                duration=round(time.time() - started, 3)))
        queue.refuse_config(project_id, exc.label_config)
        if job is not None:
            job.retries_left = 0  # RQ's worker reads it off this job object to decide on a retry
        log.error("project=%s job=%s retrain refused: %s", project_id, job_id, exc)
        # Without the traceback into fit: the message says all there is to say.
        raise exc.with_traceback(None) from None
    except Exception as exc:
        record(queue, project_id, RetrainResult(Status.FAILED, job_id=job_id, error=str(exc),
                                                finished_at=time.time(),
                                                duration=round(time.time() - started, 3)))
        log.error("project=%s job=%s retrain failed: %s", project_id, job_id, exc)
        raise
    result = replace(result, job_id=job_id, finished_at=time.time(),
                     duration=round(time.time() - started, 3), queue_wait=_queue_wait(job, started))
    if result.status is not Status.PUBLISHING:  # a fan-out's last job records its outcome
        record(queue, project_id, result)
    log.info("project=%s job=%s retrain %s version=%s in %.1fs", project_id, job_id,
             result.status, result.model_version, result.duration)
    return result.to_dict()


def _slice_results(connection, job_ids: list[str], delete: bool = False) -> tuple[list, list[str]]:
    """Return values of finished slice jobs, and a description of every other one. With
    `delete`, each finished job is removed from Redis once read (its result is consumed)."""
    results, failed = [], []
    for slice_id in job_ids:
        try:
            slice_job = Job.fetch(slice_id, connection=connection, serializer=JSONSerializer)
            status = slice_job.get_status()
        except Exception:  # expired or deleted: its work cannot be vouched for
            status = None
        if status == JobStatus.FINISHED:
            results.append(slice_job.return_value())
            if delete:
                slice_job.delete()
        else:
            failed.append(f"{slice_id} ({status.value if status else 'missing'})")
    return results, failed


def publish_slice(project_id: int, version: str, predictions: list[dict],
                  one_by_one: list[dict] | None = None) -> dict:
    """Upload one slice of a version's predictions (fan-out of a large project's publish):
    `predictions` through the bulk import, `one_by_one` (disputed labels, which carry
    `mislabeling` and `cluster`) through the single-prediction API."""
    settings = Settings.from_env()
    job = get_current_job()
    started = time.time()
    report = _progress_reporter(job, project_id)
    LabelStudioProject(settings, project_id).publish_predictions(
        predictions, one_by_one or [], settings.prediction_chunk,
        progress=lambda done, total: report("uploading predictions", done, total),
        sent_before=_run_before(job))
    uploaded = len(predictions) + len(one_by_one or [])
    duration = round(time.time() - started, 3)
    worker = getattr(job, "worker_name", None) if job is not None else None
    log.info("project=%s uploaded %d predictions of %s in %.1fs (worker %s)", project_id,
             uploaded, version, duration, worker)
    return {"uploaded": uploaded, "duration": duration, "worker": worker,
            "queue_wait": _queue_wait(job, started)}


def _run_before(job) -> bool:
    """Whether this RQ job was started before (a job requeued by hand after a failure, or
    run again after its worker died); marks it as started. Without a job (called inline)
    the answer is yes: the caller cannot vouch that nothing was sent."""
    if job is None:
        return True
    before = bool(job.meta.get("started_once"))
    if not before:
        job.meta["started_once"] = True
        job.save_meta()  # in Redis before the first request goes out
    return before


def finish_publish(project_id: int, version: str, slice_jobs: list[str], result: dict) -> dict:
    """After every slice job of a fan-out: switch Label Studio and /predict to `version`.

    `result` is the retrain's result so far (status "publishing"). The switch runs under the
    project's training lock, so it cannot interleave with a newer retrain's own switch; a
    version older than the active one is not switched to ("superseded",
    `backend.publish.switch_version`). Once live, `backend.publish.after_switch` runs, as
    on the inline path.
    """
    settings = Settings.from_env()
    job = get_current_job()
    connection = job.connection if job is not None else redis_connection(settings.redis_url)
    queue = JobQueue(connection, settings)
    store = ModelStore(settings.models_dir)
    job_id = job.id if job is not None else "inline"
    partial = RetrainResult.from_dict(result)
    slices, failed = _slice_results(connection, slice_jobs)
    try:
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(slice_jobs)} prediction uploads of {version} "
                               f"failed; the project stays on its previous version: {', '.join(failed)}")
        uploaded = sum(s.get("uploaded", 0) for s in slices if s)
        with queue.training_lock(project_id, job_id):
            status, after = go_live(LabelStudioProject(settings, project_id), store, version,
                                    settings, uploaded)
    except Exception as exc:
        record(queue, project_id, replace(partial, status=Status.FAILED, error=str(exc),
                                          finished_at=time.time()))
        queue.publish_finished(project_id, version)
        log.error("project=%s publishing %s failed: %s", project_id, version, exc)
        raise
    workers = sorted({s.get("worker") for s in slices if s and s.get("worker")})
    outcome = replace(partial, status=status, finished_at=time.time(),
                      after_switch=after.to_dict() if after is not None else None,
                      publish={"slices": len(slice_jobs), "workers": workers, "uploaded": uploaded})
    if outcome.started_at:
        outcome.duration = round(outcome.finished_at - outcome.started_at, 3)
    record(queue, project_id, outcome)  # a superseded one leaves the newer result in place
    queue.publish_finished(project_id, version)
    log.info("project=%s %s %s after %d upload jobs on %s", project_id, version, status,
             len(slice_jobs), ", ".join(workers) or "-")
    return outcome.to_dict()


def encode_tasks(project_id: int) -> dict:
    """Encode a project's new tasks in the background (on TASKS_CREATED), before anyone labels
    them, so the retrain after their first annotation finds every vector cached. A large
    import fans out when another worker listens (`JobQueue.fan_out_pays`): slices of texts go
    to `encode_slice` jobs on any free worker."""
    settings = Settings.from_env()
    job = get_current_job()
    job_id = job.id if job is not None else "inline"
    connection = job.connection if job is not None else redis_connection(settings.redis_url)
    queue = JobQueue(connection, settings)

    def fan_out(encoder_id: str, slices: list[list[str]], partial: EncodeResult) -> None:
        partial = replace(partial, job_id=job_id, started_at=time.time())
        record(queue, project_id, partial)
        queue.fan_out_encode(project_id, encoder_id, slices, partial.to_dict())

    queue.mark_encode_started(project_id)
    try:
        with queue.training_lock(project_id, job_id):  # the task copy has one writer at a time
            result = ActiveLearningBackend(settings, project_id).encode_new_tasks(
                progress=_progress_reporter(job, project_id),
                fan_out=fan_out if queue.fan_out_pays() else None)
    except ConfigRefused as exc:  # nothing to encode for: said in /jobs, not as a traceback
        log.warning("project=%s job=%s encoding skipped: %s", project_id, job_id, exc)
        return record(queue, project_id, EncodeResult(Status.FAILED, error=str(exc), job_id=job_id,
                                                      finished_at=time.time()))
    result = replace(result, job_id=job_id, finished_at=time.time())
    if result.status is Status.ENCODING:  # `store_encodings` records the outcome
        log.info("project=%s job=%s handed %d texts to %d encoding jobs", project_id, job_id,
                 result.to_encode, result.encode_jobs)
        return result.to_dict()
    record(queue, project_id, result)
    log.info("project=%s job=%s encoded %d new of %d tasks in %.1fs", project_id, job_id,
             result.encoded, result.tasks, result.duration)
    return result.to_dict()


def encode_slice(project_id: int, encoder_id: str, texts: list[str]) -> dict:
    """Encode one slice of a large import; the vectors go back through Redis (float16,
    base64) to `store_encodings`, so this worker needs no access to the shared cache."""
    settings = Settings.from_env()
    job = get_current_job()
    started = time.time()
    encoder = get_encoder(settings)
    if encoder.id != encoder_id:
        raise RuntimeError(f"this worker's encoder is {encoder.id}, the project's cache uses "
                           f"{encoder_id}: give every worker the same ENCODER setting")
    report = _progress_reporter(job, project_id)
    vectors = encoder.encode(texts).astype(np.float16)
    report("encoding", len(texts), len(texts))
    duration = round(time.time() - started, 3)
    worker = getattr(job, "worker_name", None) if job is not None else None
    log.info("project=%s encoded %d texts in %.1fs (worker %s)", project_id, len(texts), duration, worker)
    return {"count": len(texts), "dim": int(vectors.shape[1]), "worker": worker, "duration": duration,
            "keys": base64.b64encode(b"".join(text_key(t) for t in texts)).decode("ascii"),
            "vectors": base64.b64encode(vectors.tobytes()).decode("ascii")}


def store_encodings(project_id: int, encoder_id: str, slice_jobs: list[str], result: dict) -> dict:
    """After every `encode_slice` job of an import: put their vectors into the shared cache."""
    settings = Settings.from_env()
    job = get_current_job()
    connection = job.connection if job is not None else redis_connection(settings.redis_url)
    queue = JobQueue(connection, settings)
    # The vectors are large; once read they are only kept in the cache.
    slices, failed = _slice_results(connection, slice_jobs, delete=True)
    cache = EncodingCache(settings.encoding_cache_path)
    stored = 0
    for part in slices:
        keys = base64.b64decode(part["keys"])
        vectors = np.frombuffer(base64.b64decode(part["vectors"]), dtype=np.float16)
        vectors = vectors.reshape(part["count"], part["dim"])
        cache.store_keys(encoder_id, [keys[i * 16:(i + 1) * 16] for i in range(part["count"])], vectors)
        stored += part["count"]
    workers = sorted({part["worker"] for part in slices if part.get("worker")})
    partial = EncodeResult.from_dict(result)
    if not failed:  # every text cached: the project may get its cold-start order now
        with queue.training_lock(project_id, job.id if job is not None else "inline"):
            partial = replace(partial, cold_start=ActiveLearningBackend(settings, project_id).cold_start())
    now = time.time()
    outcome = replace(partial, status=Status.FAILED if failed else Status.FINISHED, encoded=stored,
                      workers=workers, finished_at=now,
                      duration=round(now - (partial.started_at or now), 3),
                      # What was encoded is kept; the retrain encodes the rest itself.
                      error=f"{len(failed)} of {len(slice_jobs)} encoding jobs failed: {', '.join(failed)}"
                      if failed else None)
    record(queue, project_id, outcome)
    log.info("project=%s stored %d encodings from %d jobs on %s%s", project_id, stored, len(slice_jobs),
             ", ".join(workers) or "-", f"; {outcome.error}" if failed else "")
    return outcome.to_dict()


def reconcile() -> dict:
    """Queue a retrain for every known project whose annotations changed since its model.

    Runs when a worker starts and every RECONCILE_INTERVAL seconds (see `backend/worker.py`).
    It catches what webhooks missed, e.g. annotations made while Redis was down and /webhook
    answered 503. It compares Label Studio's annotation counters with those the current model
    was trained on; an edit that keeps every count equal is caught by the next webhook instead.
    A project whose counts are unchanged and whose live version is PRUNE_IDLE_MINUTES old
    loses its oldest superseded version that was too large to delete at the switch
    (`backend.publish.prune_when_idle`; under "pruned" in the result).
    """
    settings = Settings.from_env()
    job = get_current_job()
    if job is not None and job.id == PERIODIC_RECONCILE_ID and settings.reconcile_interval <= 0:
        # A periodic run left over from before RECONCILE_INTERVAL was set to 0 (another
        # worker's scheduler may have queued it): do nothing; maintenance removes the schedule.
        log.info("periodic reconcile skipped: RECONCILE_INTERVAL=0")
        return {"queued": [], "unchanged": [], "unreachable": [], "skipped": "RECONCILE_INTERVAL=0"}
    connection = job.connection if job is not None else redis_connection(settings.redis_url)
    queue = JobQueue(connection, settings)
    store = ModelStore(settings.models_dir)
    queued, unchanged, unreachable, refused = [], [], [], []
    pruned: dict[int, dict[str, int]] = {}
    for project_id in sorted(set(store.projects()) | set(queue.project_ids())):
        version = store.current_version(project_id)
        trained_on = store.read_meta(project_id, version).get("annotation_counts") if version else None
        try:
            project = LabelStudioProject(settings, project_id).project(ANNOTATION_COUNTERS)
            counts = annotation_counts(project)
        except LabelStudioError as exc:
            log.warning("project=%s reconcile: %s", project_id, exc)
            unreachable.append(project_id)
            continue
        if counts == trained_on or not any(counts.values()):
            unchanged.append(project_id)
            if version is not None:
                _prune_when_idle(queue, store, settings, project_id, pruned, job)
            continue
        status, job_id = queue.request_retrain(project_id, "reconcile", project.get("label_config"))
        if status == "refused":  # its config was refused and has not changed since
            refused.append(project_id)
            continue
        log.info("project=%s reconcile: annotations changed, retrain %s job=%s", project_id, status, job_id)
        queued.append(project_id)
    return {"queued": queued, "unchanged": unchanged, "unreachable": unreachable, "refused": refused,
            "pruned": pruned}


def _prune_when_idle(queue: JobQueue, store: ModelStore, settings: Settings, project_id: int,
                     pruned: dict[int, dict[str, int]], job=None) -> None:
    """`backend.publish.prune_when_idle` for one unchanged project, under its training lock:
    /jobs and the project page show the reconcile job running, at the stage "deleting a
    superseded version", while Label Studio deletes. A failure is logged, the next
    reconcile tries again."""
    if not idle_long_enough(store, project_id, settings):
        return  # checked before taking the lock too, so a busy project costs no request
    status = queue.project_status(project_id)
    if status["waiting"] or status["running"] or status["publishing"]:
        return  # a retrain on its way: someone is annotating after all
    try:
        with queue.training_lock(project_id, job.id if job is not None else f"prune-{project_id}"):
            _progress_reporter(job, project_id)("deleting a superseded version", 0, 0)
            done = prune_when_idle(LabelStudioProject(settings, project_id), store, settings)
    except Exception as exc:  # Label Studio unreachable, the lock held too long: next time
        log.warning("project=%s deleting a superseded version while idle failed: %s", project_id, exc)
        return
    if done:
        pruned[project_id] = done
