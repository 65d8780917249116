"""What a retrain or an encoding job reports: typed here, written for /jobs in one place.

`GET /jobs/<project>` shows a project's last retrain under `last` and its last encoding of
new tasks under `last_encode` (README, "Large projects"). Both are built as the dataclasses
below and written by `record`; RQ jobs return the same dict (`to_dict`), since RQ stores
return values as JSON. A field that does not apply to a result (None) is left out of the
dict, so each outcome shows the keys it has always shown.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from backend.job_queue import JobQueue


class Status(StrEnum):
    """How a job ended (or where it stands, while slice jobs run)."""

    FINISHED = "finished"  # the new version is live (retrain), the texts are cached (encoding)
    SKIPPED = "skipped"  # nothing to train on yet
    FAILED = "failed"  # see `error`; the project keeps its previous version
    PUBLISHING = "publishing"  # staged; slice jobs upload its predictions (fan-out)
    SUPERSEDED = "superseded"  # a newer version went live first; this one never will
    ENCODING = "encoding"  # slice jobs encode the texts (fan-out)


class _Result:
    in_flight: ClassVar[Status]  # the status of a result handed on to the job that finishes it

    def to_dict(self) -> dict:
        """The JSON object /jobs shows and the RQ job returns; fields that are None are left out."""
        return {f.name: value.value if isinstance(value, Status) else value
                for f in dataclasses.fields(self)
                if (value := getattr(self, f.name)) is not None}

    @classmethod
    def from_dict(cls, data: dict):
        """A result handed from one job to the next as JSON (fan-out). Unknown keys are
        ignored, so a job queued by an older version of the backend still finishes."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        values["status"] = Status(values.get("status") or cls.in_flight)
        return cls(**values)


@dataclass
class RetrainResult(_Result):
    """A retrain (`backend.jobs.retrain`, finished by `finish_publish` after a fan-out)."""

    in_flight: ClassVar[Status] = Status.PUBLISHING

    status: Status
    model_version: str | None = None
    reason: str | None = None  # why it was skipped
    error: str | None = None  # why it failed, in words a user can act on
    tasks: int | None = None
    labeled: int | None = None
    encoded: int | None = None  # texts and images that had to be encoded
    sync: dict | None = None  # how the task copy was brought up to date (backend.task_store)
    image_errors: int | None = None  # tasks left out: their image could not be fetched or decoded
    image_error_examples: list | None = None  # a few of them: {task, object, error}
    training_accuracy: float | None = None
    ordering: dict | None = None  # the ordering choice and where it came from
    mislabeled: int | None = None
    controls: dict | None = None  # several controls: per control, what its head trained on
    ignored_controls: list | None = None  # controls of the label config no head learns, and why
    param_warnings: list | None = None  # bad ordering params that fell back to their defaults
    stopping: dict | None = None  # the version's stopping signals (model.stopping), without history
    timings: dict | None = None  # seconds per stage
    publish_jobs: int | None = None  # slice jobs queued for the upload (fan-out)
    publish: dict | None = None  # after a fan-out: slices, workers, uploaded
    after_switch: dict | None = None  # AfterSwitch: sampling, superseded predictions removed
    job_id: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    duration: float | None = None
    queue_wait: float | None = None  # seconds between the webhook and the job's start


@dataclass
class AfterSwitch:
    """What followed a switch to a new version (`backend.publish.after_switch`)."""

    sampling: str | None = None  # what was done to the project's sampling, the first time
    removed: dict[str, int] = dataclasses.field(default_factory=dict)  # version -> predictions deleted
    kept: list[str] = dataclasses.field(default_factory=list)  # older versions whose predictions stay
    # superseded versions left in place for their size (PRUNE_MAX_PREDICTIONS): version -> predictions
    too_large: dict[str, int] = dataclasses.field(default_factory=dict)
    errors: list[str] = dataclasses.field(default_factory=list)  # steps that failed; the version is live
    # When the version went live (epoch seconds), and how long these steps took after it:
    # freshness ends at the switch; deleting superseded predictions comes after.
    switched_at: float | None = None
    seconds: float | None = None
    marked: int = 0  # disputed labels given their mislabeling value after the switch

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v or k == "removed"}


@dataclass
class EncodeResult(_Result):
    """Encoding a project's new tasks (`backend.jobs.encode_tasks`, `store_encodings`)."""

    in_flight: ClassVar[Status] = Status.ENCODING

    status: Status
    error: str | None = None
    tasks: int | None = None
    to_encode: int | None = None  # distinct texts handed to slice jobs (fan-out)
    encode_jobs: int | None = None
    encoded: int | None = None
    sync: dict | None = None
    image_errors: int | None = None  # tasks whose image could not be fetched or decoded
    image_error_examples: list | None = None  # a few of them: {task, object, error}
    encoder: str | None = None
    workers: list[str] | None = None  # after a fan-out: the workers that encoded
    cold_start: dict | None = None  # the cold-start order published, or why not (backend.cold_start)
    job_id: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    duration: float | None = None


def record(queue: JobQueue, project_id: int, result: RetrainResult | EncodeResult) -> dict:
    """Write a job's result where /jobs and /metrics read it; returns it as the plain dict.

    A superseded version is not written: the newer version that went live first is the
    project's last result, and stays so.
    """
    data = result.to_dict()
    if result.status is Status.SUPERSEDED:
        return data
    if isinstance(result, EncodeResult):
        queue.record_encode(project_id, data)
    else:
        queue.record_result(project_id, data)
    return data
