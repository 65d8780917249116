"""Everything the backend reads from and writes to Label Studio, through label-studio-sdk.

Webhooks are only hints; a retraining job reads the truth here: the project's label config,
all its tasks and their annotations. It writes predictions back in chunks and switches the
project's `model_version` so the Data Manager's "Prediction score" column shows our scores.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable

from backend.settings import Settings

log = logging.getLogger(__name__)


class LabelStudioError(RuntimeError):
    """Label Studio could not be reached or refused a call; the message says what to check.

    `retryable` is true for faults that may pass (connection errors, 5xx, 429), false for
    ones a retry cannot fix (no API key, a rejected token, a missing project).
    """

    def __init__(self, message: str, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


def _plain(obj: Any) -> Any:
    """SDK objects are pydantic models; we work with plain dicts."""
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if hasattr(obj, "dict"):
        return obj.dict()
    return obj


class LabelStudioProject:
    """One Label Studio project, seen by the backend's own API key."""

    def __init__(self, settings: Settings, project_id: int, client=None):
        self.settings = settings
        self.project_id = int(project_id)
        self._client = client

    @property
    def client(self):
        if self._client is None:
            if not self.settings.label_studio_api_key:
                raise LabelStudioError(
                    "LABEL_STUDIO_API_KEY is not set: create a personal access token in Label "
                    "Studio (Account & Settings > Personal Access Token) and set it, together "
                    "with LABEL_STUDIO_URL, in the backend's environment"
                )
            from label_studio_sdk.client import LabelStudio

            self._client = LabelStudio(
                base_url=self.settings.label_studio_url,
                api_key=self.settings.label_studio_api_key,
                timeout=60,
            )
        return self._client

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except LabelStudioError:
            raise
        except Exception as exc:  # the SDK raises httpx and ApiError types
            status = getattr(exc, "status_code", None)
            hint = ""
            if status in (401, 403):
                hint = " (check LABEL_STUDIO_API_KEY: it must be a valid personal access token)"
            elif status == 404:
                hint = f" (project {self.project_id} does not exist in Label Studio)"
            elif status is None:
                hint = f" (is Label Studio reachable at LABEL_STUDIO_URL={self.settings.label_studio_url}?)"
            raise LabelStudioError(
                f"Label Studio call '{what}' for project {self.project_id} failed: "
                f"{type(exc).__name__} {status or ''}{hint}",
                retryable=status is None or status >= 500 or status == 429,
            ) from exc

    def project(self) -> dict:
        return _plain(self._call("get project", lambda: self.client.projects.get(id=self.project_id)))

    def ml_extra_params(self) -> dict:
        """The extra params (JSON) of this project's ML backend connection, if any."""
        backends = self._call("list ML backends", lambda: self.client.ml.list(project=self.project_id))
        for backend in backends or []:
            params = _plain(backend).get("extra_params")
            if isinstance(params, dict) and params:
                return params
        return {}

    def tasks(self, page_size: int = 1000, progress: Callable[[int], None] | None = None,
              updated_after: str | None = None) -> list[dict]:
        """Tasks with their data and annotations, as plain dicts.

        `updated_after` (an ISO timestamp) reads only tasks Label Studio changed since then.
        """
        tasks: list[dict] = []
        query = None
        if updated_after:
            query = json.dumps({"filters": {"conjunction": "and", "items": [
                {"filter": "filter:tasks:updated_at", "operator": "greater", "type": "Datetime",
                 "value": updated_after}]}})

        def fetch():
            tasks.clear()
            pager = self.client.tasks.list(
                project=self.project_id, fields="all", page_size=page_size, query=query
            )
            for task in pager:
                tasks.append(_plain(task))
                if progress is not None and len(tasks) % page_size == 0:
                    progress(len(tasks))
            return tasks

        return self._call("list tasks", fetch)

    def task_ids(self) -> list[int]:
        """Ids of all tasks (cheap: no annotations, no predictions)."""
        def fetch():
            pager = self.client.tasks.list(project=self.project_id, include="id", page_size=10000)
            return [int(_plain(task)["id"]) for task in pager]

        return self._call("list task ids", fetch)

    def upload_predictions(
        self,
        predictions: list[dict],
        chunk: int,
        progress: Callable[[int, int], None] | None = None,
        on_retry: Callable[[int, Exception], None] | None = None,
    ) -> None:
        """Bulk-import predictions, `chunk` at a time, so no single request is large.

        Each chunk is retried on its own: Label Studio duplicates a re-imported prediction,
        so a failure never re-sends the chunks it already accepted.
        """
        total = len(predictions)
        for start in range(0, total, chunk):
            part = predictions[start : start + chunk]
            if progress is not None:
                progress(start, total)
            response = with_retries(
                lambda part=part: self._call(
                    "import predictions",
                    lambda: self.client.projects.import_predictions(id=self.project_id, request=part)),
                on_retry=on_retry,
            )
            created = getattr(response, "created", None)
            if created is not None and created != len(part):
                # Label Studio answers 201 even when it drops predictions it finds invalid.
                raise LabelStudioError(
                    f"Label Studio stored {created} of {len(part)} predictions for project "
                    f"{self.project_id}; check that the label config still matches the model")
            if progress is not None:
                progress(min(start + chunk, total), total)

    def upload_predictions_one_by_one(self, predictions: list[dict],
                                      on_retry: Callable[[int, Exception], None] | None = None) -> None:
        """Create predictions through the single-prediction API.

        Label Studio 1.23's bulk import keeps only task, result, score and model_version;
        `mislabeling` and `cluster` survive only this way, one request per prediction, so it
        is used for the few labeled tasks whose label the model disputes.
        """
        for prediction in predictions:
            with_retries(lambda p=prediction: self._call(
                "create prediction", lambda: self.client.predictions.create(**p)), on_retry=on_retry)

    def publish_predictions(self, bulk: list[dict], one_by_one: list[dict], chunk: int,
                            progress: Callable[[int, int], None] | None = None) -> None:
        """`one_by_one` (disputed labels, which keep `mislabeling` and `cluster` only through
        the single-prediction API) first, then `bulk` through the chunked import."""
        on_retry = retry_logger(self.project_id)
        self.upload_predictions_one_by_one(one_by_one, on_retry=on_retry)
        self.upload_predictions(bulk, chunk, on_retry=on_retry, progress=progress)

    def set_model_version(self, version: str) -> None:
        self._call(
            "update project model_version",
            lambda: self.client.projects.update(id=self.project_id, model_version=version),
        )


def retry_logger(project_id: int) -> Callable[[int, Exception], None]:
    """An `on_retry` for `with_retries` that logs the failed call of a project's job."""
    def log_retry(attempt: int, exc: Exception) -> None:
        log.warning("project=%s Label Studio call failed (attempt %d), retrying: %s",
                    project_id, attempt, exc)
    return log_retry


def with_retries(fn: Callable[[], Any], attempts: int = 4, first_delay: float = 1.0,
                 on_retry: Callable[[int, Exception], None] | None = None) -> Any:
    """Call `fn`, retrying LabelStudioError with exponential backoff."""
    delay = first_delay
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except LabelStudioError as exc:
            if attempt == attempts or not exc.retryable:
                raise
            if on_retry is not None:
                on_retry(attempt, exc)
            time.sleep(delay)
            delay *= 3


PERSONAL_TOKEN_HINT = ("create a personal access token in Label Studio (Account & Settings > "
                       "Personal Access Token) and start the backend with LABEL_STUDIO_API_KEY=<token>")


def check_connection(settings: Settings, timeout: float = 5.0) -> tuple[str, str]:
    """Ask Label Studio who the API key belongs to, once, without retries (for start-up).

    Returns (state, message): state is "ok", "no-key", "rejected" or "unreachable"; the
    message says in plain words what was found and what to do about it.
    """
    url = settings.label_studio_url
    if not settings.label_studio_api_key:
        return "no-key", (f"LABEL_STUDIO_API_KEY is not set, so retraining cannot read annotations from "
                          f"Label Studio at {url}: {PERSONAL_TOKEN_HINT}")
    from label_studio_sdk.client import LabelStudio

    try:
        user = LabelStudio(base_url=url, api_key=settings.label_studio_api_key, timeout=timeout).users.whoami()
    except Exception as exc:  # the SDK raises httpx and ApiError types
        status = getattr(exc, "status_code", None) or getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            return "rejected", (f"Label Studio at {url} rejected LABEL_STUDIO_API_KEY (HTTP {status}): the token "
                                f"is wrong, expired or from another Label Studio; {PERSONAL_TOKEN_HINT}")
        if status is None:
            return "unreachable", (f"Label Studio is not reachable at LABEL_STUDIO_URL={url} "
                                   f"({type(exc).__name__}). The backend runs anyway and retrains once Label "
                                   f"Studio answers; check that URL from this machine (in docker compose it is "
                                   f"http://label-studio:8080)")
        return "unreachable", (f"Label Studio at {url} answered HTTP {status} to a check of the API key; the "
                               f"backend runs anyway and retrains once Label Studio answers")
    return "ok", f"Label Studio at {url} accepted the API key (user {_plain(user).get('email') or user.id})"
