"""Publishing a staged model version: its predictions into Label Studio, then the switch.

A version goes live in two steps, in this order: every task's prediction is uploaded, then
Label Studio's project `model_version` and /predict's CURRENT are switched to it
(`switch_version`). A failed upload therefore leaves the project on its previous version.
A small project does both inside the retrain job (`publish_inline`); a large one uploads
through slice jobs on any free worker and switches in `backend.jobs.finish_publish` once
all are in. Both switch through `switch_version` and then run `after_switch`: once the
new version is live, the disputed labels imported in bulk get their `mislabeling` (inline
path; slice jobs create them one by one), Label Studio's "Label All Tasks" is pointed at our
order (the first time only) and the predictions of superseded versions are deleted, in bulk,
keeping KEEP_PREDICTION_VERSIONS previous ones for a rollback.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from backend.cold_start import is_cold_start_version
from backend.job_results import AfterSwitch, Status
from backend.label_config import LabelConfig
from backend.label_studio import LabelStudioProject
from backend.model_store import VERSION_RE, ModelStore, version_number
from backend.settings import Settings
from model.training import TrainingResult

log = logging.getLogger(__name__)

# The model version /setup and /predict report before a project's first model.
UNTRAINED = "untrained"
# Label Studio's project `sampling` values ("Label All Tasks"): its default, and the one that
# serves tasks holding a prediction of the project's model_version, lowest score first.
SEQUENTIAL = "Sequential sampling"
UNCERTAINTY = "Uncertainty sampling"
# In the project's model-store directory once the backend has set (or left) the sampling:
# from then on it is the owner's to change, and never touched again.
SAMPLING_FILE = "sampling.json"

# The bulk import keeps only these fields (Label Studio 1.23).
BULK_FIELDS = ("task", "result", "score", "model_version")


@dataclass
class Predictions:
    """A version's predictions, split by the way Label Studio can take them."""

    bulk: list[dict]  # the chunked bulk import: task, result, score, model_version
    one_by_one: list[dict]  # disputed labels: the single-prediction API keeps mislabeling, cluster

    def __len__(self) -> int:
        return len(self.bulk) + len(self.one_by_one)

    def all_in_bulk(self) -> list[dict]:
        """Every prediction in the bulk import's shape: the disputed ones without the fields
        it drops, which `LabelStudioProject.mark_disputed` sets once the version is live."""
        return self.bulk + [{k: p[k] for k in BULK_FIELDS} for p in self.one_by_one]

    def slices(self, size: int) -> list[tuple[list[dict], list[dict]]]:
        """(bulk, one_by_one) parts of at most about `size` predictions, one per slice job;
        the disputed ones are shared out across the parts like the rest."""
        parts = -(-len(self) // size)
        return [(self.bulk[i::parts], self.one_by_one[i::parts]) for i in range(parts)]


def predictions_for(config: LabelConfig, trained: TrainingResult, version: str) -> Predictions:
    """One prediction per task in Label Studio's shape: one result per control (its
    predicted choice; multi-label: every chosen one), the queue score (lower = label
    sooner), the k-means cluster and, for disputed labels, mislabeling."""
    mislabeling = trained.mislabeling
    bulk, one_by_one = [], []
    with _collector_paused():
        for i, task_id in enumerate(trained.task_ids):
            prediction = {
                "task": task_id,
                "result": config.results_for(trained.answers(i)),
                "score": float(trained.scores[i]),
                "model_version": version,
            }
            if mislabeling[i] > 0:
                one_by_one.append(dict(prediction, cluster=int(trained.clusters[i]),
                                       mislabeling=float(mislabeling[i])))
            else:
                bulk.append(prediction)
    return Predictions(bulk, one_by_one)


@contextlib.contextmanager
def _collector_paused():
    """Python's cyclic garbage collector off for the enclosed loop, back as it was after.

    Every dict the loop builds counts towards the next full collection, which walks every
    live object of the worker (hundreds of thousands): 10,000 three-control predictions took
    2.9-4.2 s with it on and 0.55 s off at load 15 (BENCHMARKS.md, finding 9). The
    predictions hold no reference cycles, so nothing is freed later than it would be.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def switch_version(ls: LabelStudioProject, store: ModelStore, version: str) -> Status:
    """Make `version` the project's live version, in Label Studio and for /predict.

    The caller holds the project's training lock, so no other switch interleaves. A version
    not newer than the live one is left alone and reported SUPERSEDED: two fan-outs can
    finish out of order, and the project must never go back to the older one.
    """
    current = store.current_version(ls.project_id)
    if current is not None and version_number(current) >= version_number(version):
        return Status.SUPERSEDED
    ls.set_model_version(version)
    store.activate(ls.project_id, version)
    return Status.FINISHED


def go_live(ls: LabelStudioProject, store: ModelStore, version: str, settings: Settings,
            published: int, disputed: list[dict] | None = None) -> tuple[Status, AfterSwitch | None]:
    """`switch_version`, then, if the switch happened, `after_switch`. Both publish paths
    (inline and `backend.jobs.finish_publish`) end here, under the training lock."""
    status = switch_version(ls, store, version)
    if status is not Status.FINISHED:
        return status, None
    return status, after_switch(ls, store, version, settings, published, disputed)


def publish_inline(ls: LabelStudioProject, store: ModelStore, version: str, predictions: Predictions,
                   settings: Settings, progress: Callable[[int, int], None] | None = None,
                   upload_done: Callable[[], None] | None = None) -> tuple[Status, AfterSwitch | None]:
    """Upload every prediction of `version` from this job through the bulk import, switch to
    it, then give the disputed labels their `mislabeling` and `cluster` and tidy up (under
    the training lock the retrain holds).

    The disputed ones used to be created one request each before the bulk chunks, because
    the bulk import drops those two fields; Label Studio takes requests one at a time, so
    those creates (0.2-0.4 s each, a few per retrain) delayed every task's new prediction.
    Imported with the rest and marked after the switch, they delay nothing: a reviewer's
    hint arrives a moment after the version goes live. `upload_done` is called once every
    prediction is in (the retrain times the upload apart from the switch)."""
    # The version was staged by this run of the retrain, so nothing of it is in Label
    # Studio yet: no listing of what is stored first (a chunk retried within the upload
    # still checks).
    ls.upload_predictions(predictions.all_in_bulk(), settings.prediction_chunk, progress=progress,
                          sent_before=False)
    if upload_done is not None:
        upload_done()
    return go_live(ls, store, version, settings, len(predictions), predictions.one_by_one)


def after_switch(ls: LabelStudioProject, store: ModelStore, version: str, settings: Settings,
                 published: int, disputed: list[dict] | None = None) -> AfterSwitch:
    """What follows a switch to `version`, which put `published` predictions into Label Studio:
    the `disputed` predictions (imported in bulk) get their `mislabeling` and `cluster`, the
    project's sampling is set the first time, superseded predictions are removed.

    No step can fail the retrain: the new version is live already. A failure is
    logged and reported in the job result (`after_switch.errors`); the sampling and the
    removal are tried again after the next retrain, the next version marks its own disputes.
    """
    outcome = AfterSwitch(switched_at=round(time.time(), 3))
    if disputed:
        try:
            outcome.marked = ls.mark_disputed(disputed)
        except Exception as exc:  # Label Studio unreachable: the predictions stand without the hint
            outcome.errors.append(f"marking {len(disputed)} disputed labels failed: {exc}")
    if settings.uncertainty_sampling:
        try:
            outcome.sampling = first_sampling(ls, store, version)
        except Exception as exc:  # Label Studio unreachable, or refused the field
            outcome.errors.append(f"setting the project's sampling failed: {exc}")
    try:
        outcome.removed, outcome.kept, outcome.too_large = remove_superseded(
            ls, version, published, settings.keep_prediction_versions, settings.prune_max_predictions)
    except Exception as exc:
        outcome.errors.append(f"removing superseded predictions failed: {exc}")
    for error in outcome.errors:
        log.warning("project=%s after switching to %s: %s", ls.project_id, version, error)
    outcome.seconds = round(time.time() - outcome.switched_at, 3)
    return outcome


def first_sampling(ls: LabelStudioProject, store: ModelStore, version: str) -> str | None:
    """The first time a version of the project goes live (a model's, or the cold start's,
    `backend.cold_start`): "Label All Tasks" serves our order (Uncertainty sampling),
    unless the owner had chosen another than Label Studio's default. Remembered in the
    project's directory, so a choice made afterwards in Label Studio stands. Returns what
    was done, None when it was done before."""
    marker = store.project_dir(ls.project_id) / SAMPLING_FILE
    marker.parent.mkdir(parents=True, exist_ok=True)
    if marker.exists():
        return None
    current = ls.project(("id", "sampling")).get("sampling") or SEQUENTIAL
    if current == SEQUENTIAL:
        ls.set_sampling(UNCERTAINTY)
        done = f"set to {UNCERTAINTY}"
    else:
        done = f"left at {current}, the project's own choice"
    tmp = marker.with_name(f".{SAMPLING_FILE}.{os.getpid()}")
    tmp.write_text(json.dumps({"sampling": done, "model_version": version,
                               "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
    os.replace(tmp, marker)
    log.info("project=%s Label Studio's sampling %s", ls.project_id, done)
    return done


def superseded_plan(counts: dict[str, int], live: str, keep: int,
                    max_predictions: int = 0) -> tuple[list[str], list[str], dict[str, int]]:
    """Which prediction versions to delete once `live` is live: (delete, kept, too large).

    Our versions older than `live` go but the `keep` newest (a rollback finds their
    predictions still there); the empty `untrained` predictions of older backends and the
    cold-start versions (`backend.cold_start`, never a rollback target) other than `live`
    always go (a live cold start has no model versions before it). Versions
    that are not ours (another model's, imported ones) and versions newer than `live` (a
    fan-out still uploading) are never touched. A version of more than `max_predictions`
    predictions (0: no limit) is left in place and reported instead: Label Studio deletes
    a version's predictions one by one inside one transaction (a count and a task save
    each), and on its default SQLite database that holds the write lock for about a minute
    per 10,000 predictions at load, during which submitting an annotation fails with
    "database is locked".
    """
    older = sorted((v for v in counts if VERSION_RE.match(v) and version_number(v) < version_number(live)),
                   key=version_number, reverse=True)
    kept = older[:max(keep, 0)]
    always = [v for v in counts if v != live and (v == UNTRAINED or is_cold_start_version(v))]
    candidates = [v for v in [v for v in older if v not in kept] + always if counts[v] > 0]
    too_large = {v: counts[v] for v in candidates if max_predictions and counts[v] > max_predictions}
    return [v for v in candidates if v not in too_large], kept, too_large


def remove_superseded(ls: LabelStudioProject, live: str, published: int, keep: int,
                      max_predictions: int = 0) -> tuple[dict[str, int], list[str], dict[str, int]]:
    """Delete the predictions of the versions `superseded_plan` names, one bulk request per
    version, only after Label Studio holds at least `published` predictions of `live` (what
    was uploaded): a task never loses its last prediction.
    Returns ({version: predictions deleted}, versions kept, {version: predictions} left in
    place for being larger than `max_predictions`).
    """
    counts = ls.prediction_versions()
    if counts.get(live, 0) < published:
        raise RuntimeError(f"Label Studio holds {counts.get(live, 0)} predictions of {live}, "
                           f"{published} were uploaded; older versions are kept")
    delete, kept, too_large = superseded_plan(counts, live, keep, max_predictions)
    removed = {version: ls.delete_predictions_of(version) for version in delete}
    if removed:
        log.info("project=%s removed the predictions of superseded versions %s, kept %s",
                 ls.project_id, removed, kept)
    if too_large:
        log.warning("project=%s left the predictions of superseded versions %s in Label Studio: deleting "
                    "more than PRUNE_MAX_PREDICTIONS=%s at once locks its database while annotators work; "
                    "the reconcile deletes them once the project is idle for PRUNE_IDLE_MINUTES (or delete them "
                    "in Settings > Predictions, or raise the setting)",
                    ls.project_id, too_large, max_predictions)
    return removed, kept, too_large


def idle_long_enough(store: ModelStore, project_id: int, settings: Settings, now: float | None = None) -> bool:
    """Whether `prune_when_idle` may delete now: it is turned on (PRUNE_IDLE_MINUTES and
    PRUNE_MAX_PREDICTIONS above 0) and the project's live version is PRUNE_IDLE_MINUTES old."""
    if settings.prune_idle_minutes <= 0 or not settings.prune_max_predictions:
        return False
    switched = store.switched_at(project_id)
    now = time.time() if now is None else now
    return switched is not None and now - switched >= settings.prune_idle_minutes * 60


def prune_when_idle(ls: LabelStudioProject, store: ModelStore, settings: Settings,
                    now: float | None = None) -> dict[str, int]:
    """Delete the oldest superseded version that `remove_superseded` left in place for being
    larger than PRUNE_MAX_PREDICTIONS, once nobody is annotating; returns {version: deleted}.

    Without this, every retrain of a large project leaves its predictions behind and Label
    Studio's prediction table grows by the project's size per annotation (10,000 tasks and
    200 retrains: two million rows), which slows its imports and listings. The delete
    locks Label Studio's SQLite database while it runs (about a minute per 10,000
    predictions at load), so it waits until the project's live version is
    PRUNE_IDLE_MINUTES old: every submitted annotation makes a new version, so none was
    submitted meanwhile. One version per call (the reconcile, every RECONCILE_INTERVAL
    seconds) bounds each lock to one version's delete. The caller holds the project's
    training lock, so no retrain switches versions meanwhile.
    """
    live = store.current_version(ls.project_id)
    if live is None or not idle_long_enough(store, ls.project_id, settings, now):
        return {}
    counts = ls.prediction_versions()
    if counts.get(live, 0) == 0:  # the live version is not (or no longer) in Label Studio
        return {}
    _, _, too_large = superseded_plan(counts, live, settings.keep_prediction_versions,
                                      settings.prune_max_predictions)
    if not too_large:
        return {}
    oldest = min(too_large, key=lambda v: version_number(v) if VERSION_RE.match(v) else -1)
    started = time.monotonic()
    deleted = ls.delete_predictions_of(oldest)
    log.info("project=%s idle: deleted the %d predictions of superseded version %s in %.1f s (%d more "
             "too large to delete at once remain)", ls.project_id, deleted, oldest, time.monotonic() - started,
             len(too_large) - 1)
    return {oldest: deleted}
