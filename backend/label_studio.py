"""Everything the backend reads from and writes to Label Studio, through label-studio-sdk.

Webhooks are only hints; a retraining job reads the truth here: the project's label config,
all its tasks and their annotations. It writes predictions back in chunks and switches the
project's `model_version` so the Data Manager's "Prediction score" column shows our scores.

The one retry layer (README: "Calls to Label Studio: retries and idempotent uploads"):
every call goes through `LabelStudioProject._retry`, built on tenacity. The SDK's own
retries are switched off (`max_retries=0`): they retry POSTs blindly (a prediction import
whose answer was lost would be stored twice) and, stacked under ours, would multiply the
attempts and hide the timing. Uploads are made idempotent here: before a chunk is sent
again, Label Studio is asked which of its tasks already hold a prediction of that version.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any

import httpx
import tenacity

from backend.settings import Settings

log = logging.getLogger(__name__)

# HTTP answers worth another try: a timeout, throttling, and any server-side fault (a
# restarting Label Studio behind a proxy answers 502/503/504; SQLite's "database is
# locked" surfaces as 500). Every other 4xx is final: a retry cannot fix a bad token
# (401/403), a missing project (404) or a rejected payload (400). One 401 is the
# exception: an access token that expired while its request was on the way
# (`LabelStudioProject._expired_in_flight`).
RETRYABLE_STATUS = frozenset({408, 429})

# Task ids per "which of these tasks already hold version V" query: they travel in the URL
# (GET), which must stay well under the 8 KB a reverse proxy in front of Label Studio allows.
IDS_PER_QUERY = 200

# Single-prediction creates in flight at once beside the bulk import (`publish_predictions`):
# a few, so a large batch of disputed labels does not crowd out the chunks' requests.
ONE_BY_ONE_THREADS = 4

# For a project update whose answer the caller does not read: Label Studio answers a PATCH
# with the whole project and its counters unless `include` names fewer fields, and the
# counters cost as much as in a read (`LabelStudioProject.project`). The switch of
# `model_version` took 0.16-0.21 s with every counter and 0.11-0.14 s with the id alone
# at 10,000 tasks and 150,000 predictions.
ANSWER_ID_ONLY = {"additional_query_parameters": {"include": "id"}}

# SDK clients by (process, URL, API key): `LabelStudioProject._shared_client`.
_CLIENTS: dict[tuple[int, str, str], Any] = {}
_CLIENTS_LOCK = threading.Lock()


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a failed call to Label Studio is tried again.

    Attempt n (n >= 1) that fails waits `first_delay * factor**(n-1)` seconds, shortened at
    random by up to half (so workers that failed together do not retry in step), at most
    `max_delay`; a `Retry-After` header (429/503) replaces the computed wait, also capped.
    The defaults wait 1, 3, 9 s (at most 13 s in all) before the fourth and last attempt.
    """

    attempts: int = 4
    first_delay: float = 1.0
    factor: float = 3.0
    max_delay: float = 30.0

    def delay(self, attempt: int, exc: BaseException | None = None) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            return min(float(retry_after), self.max_delay)
        base = min(self.first_delay * self.factor ** (attempt - 1), self.max_delay)
        return base * random.uniform(0.5, 1.0)


class LabelStudioError(RuntimeError):
    """Label Studio could not be reached or refused a call; the message says what to check.

    `retryable` is true for faults that may pass (connection errors, timeouts, 5xx, 408,
    429), false for ones a retry cannot fix (no API key, a rejected token, a missing
    project, a refused payload). `status` is the HTTP status, None when no answer came.
    `retried` is true once the retry layer has spent its attempts on it.
    """

    def __init__(self, message: str, retryable: bool = False, status: int | None = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.status = status
        self.retry_after = retry_after
        self.retried = False


def _plain(obj: Any) -> Any:
    """SDK objects are pydantic models; we work with plain dicts."""
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if hasattr(obj, "dict"):
        return obj.dict()
    return obj


def _retry_after(headers: dict | None) -> float | None:
    for key, value in (headers or {}).items():
        if key.lower() == "retry-after":
            try:
                return max(0.0, float(value))
            except (TypeError, ValueError):
                return None  # an HTTP date: fall back to the computed backoff
    return None


def _ls_datetime(timestamp: str) -> str:
    """An ISO timestamp in the one format Label Studio's Datetime filter parses
    (`%Y-%m-%dT%H:%M:%S.%fZ`, UTC): without microseconds it answers 500."""
    moment = datetime.fromisoformat(timestamp)
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _holding(version: str) -> list[dict]:
    """Data Manager filter: tasks with a prediction whose model_version contains `version`
    (a substring match in Label Studio, so callers check the exact version themselves)."""
    return [{"filter": "filter:tasks:predictions_model_versions", "operator": "contains",
             "type": "List", "value": [version]}]


def _reason(body) -> str:
    """Label Studio's words in an error answer: its `detail` and, for a 400, the
    `validation_errors` that say which field or item was refused (the detail alone is only
    "Validation error")."""
    if not isinstance(body, dict):
        return str(body)
    reason = str(body.get("detail", body))
    errors = body.get("validation_errors")
    if errors:
        reason += f" ({json.dumps(errors, default=str)})"
    return reason


def _sdk_request(client, method: str, path: str, **body) -> Any:
    """One request through the SDK's own authenticated HTTP client (it carries the base URL
    and refreshes the access token), for what its generated methods lack or do slowly; the
    parsed JSON answer (None when empty). A failure is the SDK's own `ApiError`, as its
    methods raise, with Label Studio's answer as its body. `body`: `json=` or `content=`."""
    from label_studio_sdk.core.api_error import ApiError

    response = client._client_wrapper.httpx_client.request(path, method=method, **body)
    try:
        answer = response.json() if response.content else None
    except ValueError:
        answer = response.text
    if not 200 <= response.status_code < 300:
        raise ApiError(status_code=response.status_code, headers=dict(response.headers), body=answer)
    return answer


def import_predictions_json(client, project_id: int, predictions: list[dict]) -> int | None:
    """`POST /api/projects/<id>/import/predictions` with `predictions` encoded by the standard
    library's JSON encoder (`_sdk_request`); returns Label Studio's `created` count, None when
    the answer has none.

    Why not the SDK's `projects.import_predictions`: it first walks every prediction through
    its serialisation layer in Python (`convert_and_respect_annotation_metadata`, then the
    body filter), 0.25 s per 10,000 one-result predictions and 0.74 s per 10,000
    three-result ones on this machine, against about 0.03 s for `json.dumps` of the same
    list. Our predictions are plain JSON-ready dicts already, so that walk only adds time
    to every retrain, in proportion to the number of controls.
    """
    answer = _sdk_request(client, "POST", f"api/projects/{int(project_id)}/import/predictions",
                          content=json.dumps(predictions, separators=(",", ":")).encode(),
                          headers={"content-type": "application/json"})
    created = answer.get("created") if isinstance(answer, dict) else None
    return None if created is None else int(created)


class LabelStudioProject:
    """One Label Studio project, seen by the backend's own API key.

    Every method retries transient faults itself (`retry`, default `RetryPolicy()`);
    callers need no retry loop of their own.
    """

    def __init__(self, settings: Settings, project_id: int, client=None,
                 retry: RetryPolicy | None = None):
        self.settings = settings
        self.project_id = int(project_id)
        self._client = client
        self._retried_expiry: datetime | None = None  # see _expired_in_flight
        self.retry = retry or RetryPolicy()

    @property
    def client(self):
        if self._client is None:
            if not self.settings.label_studio_api_key:
                raise LabelStudioError(
                    "LABEL_STUDIO_API_KEY is not set: create a personal access token in Label "
                    "Studio (Account & Settings > Personal Access Token) and set it, together "
                    "with LABEL_STUDIO_URL, in the backend's environment"
                )
            self._client = self._shared_client()
        return self._client

    def _shared_client(self):
        """The process's SDK client for this Label Studio URL and API key, made on first use.

        Kept across jobs: a new client first exchanges the personal access token for an
        access token (a request) and opens a new connection, 0.05-0.06 s of every retrain's
        first read on the 2-core machine. The SDK renews an expired access token itself
        before a request (`_expired_in_flight` covers one that runs out on the way), and
        httpx's client is safe to share between threads. Keyed by process as well, so a
        forked process never shares its parent's connections.
        """
        key = (os.getpid(), self.settings.label_studio_url, self.settings.label_studio_api_key)
        with _CLIENTS_LOCK:
            client = _CLIENTS.get(key)
            if client is None:
                from label_studio_sdk.client import LabelStudio

                # The SDK checks a JWT's expiry here and raises ApiError(401) for an expired one.
                client = self._once("connect", lambda: LabelStudio(
                    base_url=self.settings.label_studio_url,
                    api_key=self.settings.label_studio_api_key,
                    timeout=60,
                    max_retries=0,  # ours is the one retry layer (module docstring)
                ))
                _CLIENTS[key] = client
        return client

    # ------------------------------------------------------------------ the retry layer

    def _error(self, what: str, exc: Exception) -> LabelStudioError:
        """Translate an SDK or transport exception into a LabelStudioError that says what to do."""
        from label_studio_sdk.core.api_error import ApiError

        status = getattr(exc, "status_code", None) if isinstance(exc, ApiError) else None
        retry_after = None
        if isinstance(exc, httpx.TransportError):
            # No answer: refused, reset, timed out, or the server hung up mid-request.
            # A request that was never well-formed on our side is not worth repeating.
            retryable = not isinstance(exc, (httpx.LocalProtocolError, httpx.UnsupportedProtocol))
            hint = f" (is Label Studio reachable at LABEL_STUDIO_URL={self.settings.label_studio_url}?)"
        elif isinstance(exc, ApiError) and status is not None:
            retryable = status >= 500 or status in RETRYABLE_STATUS or (
                status == 401 and self._expired_in_flight())
            retry_after = _retry_after(getattr(exc, "headers", None)) if retryable else None
            hint = ""
            if status in (401, 403):
                hint = " (check LABEL_STUDIO_API_KEY: it must be a valid personal access token)"
            elif status == 404:
                hint = f" (not found: does project {self.project_id} still exist in Label Studio?)"
            elif status == 400 or status >= 500:
                # Label Studio's own words (a refused field, a server-side exception).
                hint = f": {_reason(getattr(exc, 'body', None))[:300]}"
        else:
            retryable = False
            hint = (" (an answer the SDK could not read: is LABEL_STUDIO_URL a Label Studio "
                    "1.23 server?)")
        detail = f"{type(exc).__name__} {status}" if status is not None else type(exc).__name__
        return LabelStudioError(
            f"Label Studio call '{what}' for project {self.project_id} failed: {detail}{hint}",
            retryable=retryable, status=status, retry_after=retry_after)

    def _expired_in_flight(self) -> bool:
        """Whether a 401 just received is the SDK's access token running out in flight.

        With a personal access token the SDK sends a short-lived access token (5 minutes in
        Label Studio 1.23) and refreshes it only when it finds it expired before a send. A
        request that reaches a busy Label Studio after its token expired (seen at 100,000
        tasks under load, bench_freshness) is refused before anything is done, so sending
        it again is safe, and the SDK refreshes the token first. True when the cached token
        has expired by now, once per token: if the refresh itself is refused, the next 401
        is final and says to check the key. The SDK keeps the token in private attributes
        (no public accessor); if they change, a 401 simply stays final, as before.
        """
        wrapper = getattr(self._client, "_client_wrapper", None)
        tokens = getattr(wrapper, "_tokens_client", None)
        expiry = getattr(tokens, "_access_token_expiration", None)
        if tokens is None or getattr(tokens, "_use_legacy_token", True) or not isinstance(expiry, datetime):
            return False
        if expiry > datetime.now(UTC) or expiry == self._retried_expiry:
            return False
        self._retried_expiry = expiry
        log.info("project=%s Label Studio refused an access token that expired in flight; "
                 "sending again with a fresh one", self.project_id)
        return True

    def _once(self, what: str, fn: Callable[[], Any]) -> Any:
        """One attempt at an SDK call, its failure translated; no retry."""
        from label_studio_sdk.core.api_error import ApiError
        from label_studio_sdk.core.parse_error import ParsingError

        try:
            return fn()
        except (httpx.TransportError, ApiError, ParsingError) as exc:
            raise self._error(what, exc) from exc

    def _retry(self, what: str, attempt: Callable[[int], Any],
               on_retry: Callable[[int, Exception], None] | None = None) -> Any:
        """Run `attempt(n)` (n = 1, 2, ...) until it returns, retrying retryable
        LabelStudioErrors under `self.retry`. `attempt` gets its number so that a non-idempotent
        call can first find out what an earlier, failed attempt already did."""
        return _run_with_retries(attempt, self.retry, what, self.project_id, on_retry)

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        """An idempotent SDK call (a read, or a write that may be repeated), retried."""
        return self._retry(what, lambda _n: self._once(what, fn))

    # ------------------------------------------------------------------ reads

    def project(self, fields: tuple[str, ...] | None = None) -> dict:
        """The project as Label Studio shows it (label config, counters, model_version).

        `fields`, if given, are the only ones asked for (Label Studio's `include` query
        parameter): its project view otherwise computes every counter, over every task,
        annotation and prediction of the project, for each request. At 10,000 tasks and
        150,000 predictions the full read took 0.10-0.13 s on the 2-core machine, the
        retrain's fields 0.06-0.07 s. A Label Studio that ignores `include` answers with
        every field, a superset.
        """
        options = {"additional_query_parameters": {"include": ",".join(fields)}} if fields else None
        return _plain(self._call("get project", lambda: self.client.projects.get(
            id=self.project_id, request_options=options)))

    def ml_extra_params(self) -> dict:
        """The extra params (JSON) of this project's ML backend connection, if any."""
        backends = self._call("list ML backends", lambda: self.client.ml.list(project=self.project_id))
        for backend in backends or []:
            params = _plain(backend).get("extra_params")
            if isinstance(params, dict) and params:
                return params
        return {}

    def _task_pages(self, *, filters: Iterable[dict] = (), selected: list[int] | None = None,
                    page_size: int, fields: str, include: str | None = None,
                    call: Callable[[str, Callable[[], Any]], Any] | None = None) -> Iterator[list]:
        """The project's tasks (filtered), one page at a time, in id order.

        Pages are read by id ("id greater than the last one seen", always page 1), never by
        page number: the SDK's pager asks for the page after the last one, which Label Studio
        answers with a 404 and an "Invalid page" traceback in its log; and page numbers shift
        when tasks are deleted during the read, silently skipping tasks. Each page is one
        retried call, so a fault costs that page, not the whole read. `call` replaces the
        retried `_call` (with `_once`) where the caller runs its own retry loop.
        """
        call = call or self._call
        after = 0
        while True:
            query: dict[str, Any] = {
                "filters": {"conjunction": "and", "items": [
                    {"filter": "filter:tasks:id", "operator": "greater", "type": "Number", "value": after},
                    *filters]},
                "ordering": ["tasks:id"],
            }
            if selected is not None:
                query["selectedItems"] = {"all": False, "included": selected}
            page = call("list tasks", partial(
                self.client.tasks.list, project=self.project_id, page=1, page_size=page_size,
                fields=fields, include=include, query=json.dumps(query, separators=(",", ":"))))
            items = list(page.items or [])
            if items:
                yield items
            # `total` counts what is left after `after`: this page held all of it, or the
            # server capped page_size (TASK_API_PAGE_SIZE_MAX) and there is more.
            if not items or len(items) >= (page.response.total or 0):
                return
            after = int(items[-1].id)

    def tasks(self, page_size: int = 1000, progress: Callable[[int], None] | None = None,
              updated_after: str | None = None) -> list[dict]:
        """Tasks with their data and annotations, as plain dicts, in id order.

        `updated_after` (an ISO timestamp) reads only tasks Label Studio changed since then.
        """
        filters = []
        if updated_after:
            filters.append({"filter": "filter:tasks:updated_at", "operator": "greater",
                            "type": "Datetime", "value": _ls_datetime(updated_after)})
        tasks: list[dict] = []
        for page in self._task_pages(filters=filters, page_size=page_size, fields="all"):
            tasks.extend(_plain(task) for task in page)
            if progress is not None:
                progress(len(tasks))
        return tasks

    def task_ids(self) -> list[int]:
        """Ids of all tasks (cheap: no annotations, no predictions)."""
        pages = self._task_pages(page_size=10000, fields="task_only", include="id")
        return [int(task.id) for page in pages for task in page]

    # ------------------------------------------------------------------ idempotent uploads

    def _candidates(self, version: str) -> set[int]:
        """Tasks that may hold a prediction of `version` (ids only, one cheap listing).

        Label Studio's model-version filter matches substrings, so this is a superset;
        `_stored` checks exactly.
        """
        pages = self._task_pages(filters=_holding(version), page_size=10000, fields="task_only",
                                 include="id")
        return {int(task.id) for page in pages for task in page}

    def _stored(self, version: str, task_ids: list[int], retried: bool = True) -> dict[int, list[int]]:
        """{task id: ids of its predictions of exactly `version`} for those of `task_ids`
        that hold any. `retried=False` inside an upload's own retry loop."""
        call = self._call if retried else self._once
        stored: dict[int, list[int]] = {}
        for start in range(0, len(task_ids), IDS_PER_QUERY):
            group = task_ids[start : start + IDS_PER_QUERY]
            for page in self._task_pages(filters=_holding(version), selected=group, page_size=len(group),
                                         fields="all", include="id,predictions", call=call):
                for task in page:
                    ids = sorted(int(p["id"]) for p in map(_plain, task.predictions or [])
                                 if p.get("model_version") == version)
                    if ids:
                        stored[int(task.id)] = ids
        return stored

    def _delete_extra(self, stored: dict[int, list[int]], retried: bool = True) -> int:
        """Keep the oldest prediction of a version per task, delete the others; returns how many."""
        call = self._call if retried else self._once
        deleted = 0
        for ids in stored.values():
            for prediction_id in ids[1:]:
                try:
                    call("delete duplicate prediction",
                         lambda i=prediction_id: self.client.predictions.delete(id=i))
                except LabelStudioError as exc:
                    if exc.status != 404:  # 404: already gone, which is what we wanted
                        raise
                deleted += 1
        if deleted:
            log.warning("project=%s removed %d duplicate predictions (a retried upload had "
                        "reached Label Studio after all)", self.project_id, deleted)
        return deleted

    def _without_stored(self, predictions: list[dict], retried: bool = True,
                        listing_first: bool = False) -> list[dict]:
        """`predictions` less those whose task already holds one of the same version;
        a task found holding it twice keeps only the oldest.

        `listing_first` narrows the tasks to check with one id-only listing per version
        first (cheap when nothing is stored yet); `retried=False` inside an upload's own
        retry loop.
        """
        remaining = predictions
        for version in sorted({p["model_version"] for p in predictions}):
            tasks = {p["task"] for p in remaining if p["model_version"] == version}
            if listing_first:
                tasks &= self._candidates(version)
            if not tasks:
                continue
            stored = self._stored(version, sorted(tasks), retried)
            self._delete_extra(stored, retried)
            remaining = [p for p in remaining
                         if not (p["model_version"] == version and p["task"] in stored)]
            if stored and listing_first:
                log.info("project=%s %d tasks already hold a prediction of %s; not sending "
                         "them again", self.project_id, len(stored), version)
        return remaining

    def upload_predictions(
        self,
        predictions: list[dict],
        chunk: int,
        progress: Callable[[int, int], None] | None = None,
        on_retry: Callable[[int, Exception], None] | None = None,
        sent_before: bool = True,
    ) -> None:
        """Bulk-import predictions, `chunk` at a time, so no single request is large.

        Idempotent: Label Studio stores a re-imported prediction twice, so a chunk whose
        request failed is re-sent only for the tasks that still lack a prediction of its
        version; and since a failed request may still be committed later, the tasks of
        every chunk that needed a retry are checked for duplicates once all chunks are in.

        An upload run again sends only what is missing: one listing first finds the tasks
        that already hold the version. `sent_before=False` skips it, for a version that no
        earlier attempt can have sent (a retrain's inline publish: its version was staged
        by the same run, `ModelStore.stage` never hands out a name twice, and a retried
        retrain stages a new one). The listing is a Data Manager filter over the
        predictions; it costs 0.1 s with 60,000 of them stored and grows with the table.
        """
        if not predictions:
            return
        missing = self._without_stored(predictions, listing_first=True) if sent_before else predictions
        self._import_chunks(missing, chunk, len(predictions), progress, on_retry)

    def _import_chunks(self, predictions: list[dict], chunk: int, total: int,
                       progress: Callable[[int, int], None] | None,
                       on_retry: Callable[[int, Exception], None] | None = None) -> None:
        """`upload_predictions` after its check of what is stored: `predictions` are the
        missing ones of `total`."""
        skipped = total - len(predictions)
        suspects: list[dict] = []
        for start in range(0, len(predictions), chunk):
            part = predictions[start : start + chunk]
            if progress is not None:
                progress(skipped + start, total)
            if self._import_chunk(part, on_retry):
                suspects.extend(part)
            if progress is not None:
                progress(skipped + min(start + chunk, len(predictions)), total)
        if suspects:
            self._without_stored(suspects)  # deletes second predictions stored late

    def _import_chunk(self, part: list[dict], on_retry) -> bool:
        """Import one chunk; returns whether any attempt failed (the chunk is then suspect)."""
        pending = part
        failed = False

        def attempt(number: int) -> None:
            nonlocal pending, failed
            if number > 1:
                failed = True
                pending = self._without_stored(pending, retried=False)
                if not pending:
                    return
            created = self._once("import predictions", lambda: import_predictions_json(
                self.client, self.project_id, pending))
            if created is not None and created != len(pending):
                # Label Studio answers 201 even when it drops predictions it finds invalid.
                raise LabelStudioError(
                    f"Label Studio stored {created} of {len(pending)} predictions for project "
                    f"{self.project_id}; check that the label config still matches the model")

        self._retry("import predictions", attempt, on_retry)
        return failed

    def _create_prediction(self, prediction: dict, on_retry) -> None:
        """Create one prediction through the single-prediction API.

        Label Studio 1.23's bulk import keeps only task, result, score and model_version;
        `mislabeling` and `cluster` survive only this way, one request per prediction, so it
        is used for the few labeled tasks whose label the model disputes. Idempotent like
        the bulk path: a retried create first asks whether the task got the prediction.
        """
        task, version = prediction["task"], prediction["model_version"]

        def attempt(number: int) -> None:
            if number > 1:
                existing = self._once("list predictions", lambda: self.client.predictions.list(task=task))
                ids = sorted(int(p.id) for p in existing or [] if p.model_version == version)
                if ids:
                    self._delete_extra({task: ids}, retried=False)
                    return
            self._once("create prediction", lambda: self.client.predictions.create(**prediction))

        self._retry("create prediction", attempt, on_retry)

    def publish_predictions(self, bulk: list[dict], one_by_one: list[dict], chunk: int,
                            progress: Callable[[int, int], None] | None = None,
                            sent_before: bool = True) -> None:
        """`bulk` through the chunked import and, at the same time on a few threads,
        `one_by_one` (disputed labels, which keep `mislabeling` and `cluster` only through
        the single-prediction API). Safe to run again for the same version: one listing
        first finds the tasks that already hold it, and they are not sent twice. Used by the
        slice jobs of a fan-out; a retrain that publishes itself imports everything in bulk
        and marks the disputed labels after the switch (`backend.publish.publish_inline`).

        Sent one after the other, the single creates cost a round trip each before the
        first bulk chunk (0.2 s each on an idle machine, 3-5 of them per retrain at 10,000
        tasks under the argmax rule); Label Studio serves requests on threads and takes a
        create while it imports a chunk, so they overlap instead.

        `sent_before=False` says no earlier attempt sent any of these predictions (a slice
        job's first run), so the listing is skipped. It is not free: Label Studio's listing
        of the tasks holding a version grows with the version's earlier slices, and at
        100,000 tasks it made the five slices of one version take 16, 28, 41, 53 and 73 s
        against 13 s each for the bare import (bench_freshness, commit b054054).
        """
        if not bulk and not one_by_one:
            return
        everything = one_by_one + bulk
        missing = self._without_stored(everything, listing_first=True) if sent_before else everything
        disputed = {id(p) for p in one_by_one}
        singles = [p for p in missing if id(p) in disputed]
        rest = [p for p in missing if id(p) not in disputed]
        if not singles:
            self._import_chunks(rest, chunk, len(bulk), progress)
            return
        from concurrent.futures import ThreadPoolExecutor

        self.client  # noqa: B018  (connect once here, not from several threads at once)
        with ThreadPoolExecutor(max_workers=min(ONE_BY_ONE_THREADS, len(singles)),
                                thread_name_prefix=f"ls-create-{self.project_id}") as pool:
            created = [pool.submit(self._create_prediction, p, None) for p in singles]
            self._import_chunks(rest, chunk, len(bulk), progress)
            for future in created:
                future.result()  # the first failed create fails the upload, as before

    def mark_disputed(self, disputed: list[dict]) -> int:
        """Set `mislabeling` and `cluster` on predictions that went in through the bulk
        import (which drops both), one update each; the prediction of each task is found
        by task and model version. Idempotent: an update sent twice sets the same values.
        Returns how many were updated (a task without the prediction is skipped)."""
        updated = 0
        for version in sorted({p["model_version"] for p in disputed}):
            mine = [p for p in disputed if p["model_version"] == version]
            stored = self._stored(version, sorted({p["task"] for p in mine}))
            for prediction in mine:
                for prediction_id in stored.get(prediction["task"], [])[:1]:
                    self._call("update prediction", partial(
                        self.client.predictions.update, id=prediction_id,
                        mislabeling=prediction["mislabeling"], cluster=prediction["cluster"]))
                    updated += 1
        return updated

    def set_model_version(self, version: str) -> None:
        """Point the project's `model_version` at `version` (the score column and the
        uncertainty-sampling queue follow it)."""
        self._call(
            "update project model_version",
            lambda: self.client.projects.update(id=self.project_id, model_version=version,
                                                request_options=ANSWER_ID_ONLY),
        )

    def set_sampling(self, sampling: str) -> None:
        """Set how "Label All Tasks" picks the next task (the project's `sampling`:
        "Sequential sampling", "Uniform sampling" or "Uncertainty sampling")."""
        self._call("update project sampling",
                   lambda: self.client.projects.update(id=self.project_id, sampling=sampling,
                                                       request_options=ANSWER_ID_ONLY))

    def _raw(self, what: str, method: str, path: str, body: dict | None = None) -> Any:
        """A call to an endpoint the SDK has no method for (Label Studio leaves
        `model-versions` out of its API schema, so the generated SDK lacks it); one attempt."""
        return self._once(what, lambda: _sdk_request(self.client, method, path, json=body))

    def prediction_versions(self) -> dict[str, int]:
        """{model_version: number of predictions} of every version the project holds
        (Label Studio's `GET /api/projects/<id>/model-versions/`, with counters)."""
        answer = self._retry("list model versions", lambda _n: self._raw(
            "list model versions", "GET", f"api/projects/{self.project_id}/model-versions/"))
        return {str(k): int(v) for k, v in (answer or {}).items()}

    def delete_predictions_of(self, version: str) -> int:
        """Delete every prediction of `version` in one request; returns how many went.

        Label Studio (`DELETE /api/projects/<id>/model-versions/`) also clears the
        project's `model_version` when it names this version: never call it for the live one.
        A retry after a lost answer deletes nothing more, so retrying is safe.
        """
        answer = self._retry("delete model version", lambda _n: self._raw(
            "delete model version", "DELETE", f"api/projects/{self.project_id}/model-versions/",
            {"model_version": version}))
        return int((answer or {}).get("deleted_predictions", 0))


def _run_with_retries(attempt: Callable[[int], Any], policy: RetryPolicy, what: str,
                      project_id: int | None,
                      on_retry: Callable[[int, Exception], None] | None) -> Any:
    def should_retry(exc: BaseException) -> bool:
        return isinstance(exc, LabelStudioError) and exc.retryable and not exc.retried

    def before_sleep(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception()
        log.warning("project=%s Label Studio call '%s' failed (attempt %d of %d), retrying in "
                    "%.1f s: %s", project_id, what, state.attempt_number, policy.attempts,
                    state.next_action.sleep, exc)
        if on_retry is not None:
            on_retry(state.attempt_number, exc)

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(policy.attempts),
        wait=lambda state: policy.delay(state.attempt_number, state.outcome.exception()),
        retry=tenacity.retry_if_exception(should_retry),
        before_sleep=before_sleep,
        sleep=time.sleep,
        reraise=True,
    )
    try:
        for try_ in retrying:
            with try_:
                result = attempt(try_.retry_state.attempt_number)
            if not try_.retry_state.outcome.failed:
                return result
    except LabelStudioError as exc:
        if exc.retryable:
            exc.retried = True  # spent: the message and /jobs can say it was retried
        raise
    raise AssertionError("unreachable: tenacity either returns or re-raises")


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
