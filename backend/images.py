"""Task images: fetched the way Label Studio stores them, encoded once per encoder and content.

An `<Image value="$image"/>` task holds one of these, and `ImageFetcher` turns each into bytes:

- `/data/upload/<project>/<file>` (files uploaded to Label Studio) and
  `/data/local-files/?d=<path>` (Local Storage): from Label Studio, with the backend's token.
- `s3://`, `gs://`, `azure-blob://` (cloud storage): from Label Studio's
  `/tasks/<id>/resolve/?fileuri=<base64 of the URI>`, which redirects to a presigned URL
  (the token is not sent there) or proxies the bytes itself.
- `.../tasks/<id>/resolve/?fileuri=...` and Label Studio's other file paths (task data it
  already resolved): from LABEL_STUDIO_URL, with the token.
- any other `http(s)://` URL: from that server, without the token.
- `data:image/...;base64,...`: the value itself.

The token is the backend's LABEL_STUDIO_API_KEY: the SDK client exchanges a personal access
token for short-lived access tokens (and refreshes them), and we send its header. The SDK's
own downloader (`label_studio_tools...get_local_path`) is not used: it has no time-out, no
size limit and no retry, and writes every file to a cache directory.

Every failure is an `ImageFetchError` for that one task, with a message saying what to
check; nothing here raises past `encode_task_images`. Encodings are cached by encoder id and
the SHA-256 of the image *content* (in `model.encoding_cache.EncodingCache`), and each task
value is mapped to the content it last gave (`ImageIndex`), so a retrain downloads and
encodes only images it has never seen.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from model.encoding_cache import EncodingCache
from model.image_encoder import (  # noqa: F401 - the cache keys are re-exported for callers
    ImageEncoder,
    ImageError,
    bounded_map,
    content_cache_text,
    content_digest,
)

log = logging.getLogger(__name__)

CLOUD_SCHEMES = ("s3://", "gs://", "azure-blob://")
# Paths Label Studio serves itself (with its own permission checks): a task value on one
# of them is fetched from LABEL_STUDIO_URL even when an absolute URL names another host,
# because Label Studio writes its HOSTNAME setting into resolved URLs, which need not be
# how the backend reaches it (docker service names, proxies).
_LS_PATH = re.compile(r"^/(tasks/\d+/(resolve|presign)/|projects/\d+/(resolve|presign|file-proxy)/)")
# Served types that cannot be an image file. Generic binary types (what S3 serves without
# metadata) and a missing type are let through: the decoder then decides.
_GENERIC_TYPES = {"", "application/octet-stream", "binary/octet-stream", "application/binary",
                  "application/x-binary", "application/unknown"}
_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}

DEFAULT_MAX_BYTES = 50 * 1024 * 1024


class ImageFetchError(ImageError):
    """A task's image could not be fetched; `retryable` when a later try may succeed."""

    def __init__(self, message: str, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


@dataclass
class ImageFetcher:
    """Downloads task images: bounded time, bounded size, bounded retries.

    Thread-safe: one instance serves the fetch threads of a job.
    """

    label_studio_url: str = "http://localhost:8080"
    api_key: str | None = None
    client: object | None = None  # a label_studio_sdk LabelStudio client to take the token from
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    total_timeout: float = 120.0  # per attempt: a server dripping bytes cannot hold a job
    attempts: int = 3
    backoff: float = 0.5  # seconds before the 2nd attempt, x3 for each further one
    max_bytes: int = DEFAULT_MAX_BYTES
    stats: dict = field(default_factory=lambda: {"downloads": 0, "bytes": 0, "retries": 0})

    def __post_init__(self) -> None:
        import httpx

        self.label_studio_url = self.label_studio_url.rstrip("/")
        self._origin = _origin(self.label_studio_url)
        self._lock = threading.Lock()
        self._http = httpx.Client(
            follow_redirects=True,  # httpx drops the Authorization header on cross-origin redirects
            max_redirects=5,
            timeout=httpx.Timeout(self.read_timeout, connect=self.connect_timeout),
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=16),
            headers={"User-Agent": "atl-backend image fetcher"},
        )

    # ---- where a value is fetched from

    def url_for(self, value: str, task_id: int | None = None) -> tuple[str, bool]:
        """(absolute URL, whether to send the Label Studio token) for a task's image value."""
        if not isinstance(value, str) or not value.strip():
            raise ImageFetchError(f"the task's image value is {value!r}, not a URL or path")
        value = value.strip()
        if value.startswith(CLOUD_SCHEMES):
            if task_id is None:
                raise ImageFetchError(f"{_scheme(value)} URLs are resolved per task: the task id is missing")
            fileuri = base64.urlsafe_b64encode(value.encode()).decode()
            return f"{self.label_studio_url}/tasks/{int(task_id)}/resolve/?fileuri={fileuri}", True
        if value.startswith("upload/"):  # exports sometimes hold the bare storage key
            value = "/data/" + value
        if value.startswith("/"):
            return self.label_studio_url + value, True
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ImageFetchError(
                f"unsupported image reference {value[:100]!r}: use an http(s) URL, a Label "
                "Studio upload or Local Storage path, or an s3://, gs:// or azure-blob:// URI"
            )
        if _origin(value) == self._origin:
            return value, True
        if _LS_PATH.match(parts.path):
            rest = parts.path + (f"?{parts.query}" if parts.query else "")
            return self.label_studio_url + rest, True
        return value, False

    def cache_key(self, value: str, task_id: int | None = None) -> str:
        """What identifies the file behind a value, across tasks and retrains."""
        if isinstance(value, str) and value.strip().startswith(CLOUD_SCHEMES):
            return value.strip()  # one object, whichever task points at it
        if isinstance(value, str) and value.startswith("data:"):
            return "data:sha256:" + hashlib.sha256(value.encode()).hexdigest()
        return self.url_for(value, task_id)[0]

    # ---- fetching

    def fetch(self, value: str, task_id: int | None = None) -> bytes:
        """The bytes of a task's image; raises `ImageFetchError` with a plain message."""
        if isinstance(value, str) and value.startswith("data:"):
            return _data_uri(value, self.max_bytes)
        url, with_token = self.url_for(value, task_id)
        delay = self.backoff
        for attempt in range(1, self.attempts + 1):
            try:
                return self._get(url, with_token, value)
            except ImageFetchError as exc:
                if not exc.retryable or attempt == self.attempts:
                    raise
                log.debug("image fetch failed (attempt %d), retrying: %s", attempt, exc)
                with self._lock:
                    self.stats["retries"] += 1
                time.sleep(delay)
                delay *= 3
        raise AssertionError("unreachable")  # pragma: no cover

    def _get(self, url: str, with_token: bool, value: str) -> bytes:
        import httpx

        shown = _shown(value)
        headers = {"Accept": "image/*, */*;q=0.5"}
        if with_token:
            headers["Authorization"] = self._authorization()
        started = time.monotonic()
        try:
            with self._http.stream("GET", url, headers=headers) as response:
                status = response.status_code
                if status != 200:
                    raise _status_error(status, shown, with_token, url)
                kind = response.headers.get("content-type", "").split(";")[0].strip().lower()
                if not (kind.startswith("image/") or kind in _GENERIC_TYPES):
                    raise ImageFetchError(
                        f"{shown} was served as {kind!r}, not as an image: check that the URL "
                        "points at the image file itself (not a web page or a login page)"
                    )
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > self.max_bytes:
                    raise ImageFetchError(f"{shown} is {int(declared):,} bytes, more than the "
                                          f"limit of {self.max_bytes:,} (IMAGE_MAX_BYTES)")
                chunks, size = [], 0
                for chunk in response.iter_bytes(1 << 16):
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise ImageFetchError(f"{shown} is larger than the limit of "
                                              f"{self.max_bytes:,} bytes (IMAGE_MAX_BYTES)")
                    if time.monotonic() - started > self.total_timeout:
                        raise ImageFetchError(f"{shown} took more than {self.total_timeout:.0f} s "
                                              "to download", retryable=True)
                    chunks.append(chunk)
        except ImageFetchError:
            raise
        except httpx.TimeoutException:
            raise ImageFetchError(f"{shown}: no answer within the time-out "
                                  f"({self.connect_timeout:.0f} s to connect, {self.read_timeout:.0f} s "
                                  "to read)", retryable=True) from None
        except httpx.TooManyRedirects:
            raise ImageFetchError(f"{shown}: too many redirects") from None
        except httpx.TransportError as exc:
            hint = (f" (is Label Studio reachable at LABEL_STUDIO_URL={self.label_studio_url}?)"
                    if with_token else "")
            raise ImageFetchError(f"{shown} could not be downloaded: {type(exc).__name__}: "
                                  f"{exc}{hint}", retryable=True) from None
        except httpx.HTTPError as exc:  # invalid URL and the like: a retry cannot fix it
            raise ImageFetchError(f"{shown} could not be downloaded: {exc}") from None
        data = b"".join(chunks)
        with self._lock:
            self.stats["downloads"] += 1
            self.stats["bytes"] += len(data)
        return data

    def _authorization(self) -> str:
        """The Authorization header the SDK sends (an access token, refreshed when it expires)."""
        if self.client is None:
            if not self.api_key:
                raise ImageFetchError(
                    "this image is stored in Label Studio, which needs LABEL_STUDIO_API_KEY: "
                    "create a personal access token (Account & Settings > Personal Access Token) "
                    "and set it in the backend's environment"
                )
            from label_studio_sdk.client import LabelStudio

            with self._lock:
                if self.client is None:
                    self.client = LabelStudio(base_url=self.label_studio_url, api_key=self.api_key)
        try:
            # The SDK has no public accessor for the header it authenticates with; this is
            # the one its own calls use, with the token exchange and refresh built in.
            return self.client._client_wrapper.get_headers()["Authorization"]
        except Exception as exc:
            status = getattr(exc, "status_code", None)
            raise ImageFetchError(
                f"Label Studio refused the backend's token ({status or type(exc).__name__}): "
                "check LABEL_STUDIO_API_KEY", retryable=status is None or status >= 500
            ) from None

    def close(self) -> None:
        self._http.close()


def _status_error(status: int, shown: str, with_token: bool, url: str) -> ImageFetchError:
    if status in (401, 403) and with_token:
        return ImageFetchError(f"{shown}: Label Studio answered {status}: check that "
                               "LABEL_STUDIO_API_KEY is valid and may read this project")
    if status in (401, 403):
        return ImageFetchError(f"{shown}: the server answered {status} (the URL needs access "
                               "the backend does not have; a presigned URL may have expired)")
    if status == 404:
        return ImageFetchError(f"{shown}: not found (404): the file was moved or deleted, or, for "
                               "cloud storage, the project has no storage connected for this bucket")
    if status == 500 and with_token and "/data/upload/" in url:
        # Label Studio 1.23 fails with 500, every time, for an upload that no longer exists.
        return ImageFetchError(f"{shown}: Label Studio answered 500, as it does for an uploaded "
                               "file that no longer exists: re-upload the image or delete the task")
    return ImageFetchError(f"{shown}: the server answered {status}", retryable=status in _RETRY_STATUS)


def _data_uri(value: str, max_bytes: int) -> bytes:
    head, _, payload = value.partition(",")
    if ";base64" not in head:
        raise ImageFetchError("a data: URI image must be base64-encoded")
    if len(payload) * 3 // 4 > max_bytes:
        raise ImageFetchError(f"the data: URI is larger than the limit of {max_bytes:,} bytes")
    try:
        return base64.b64decode(payload, validate=False)
    except (binascii.Error, ValueError):
        raise ImageFetchError("the data: URI is not valid base64") from None


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme, 0)
    return parts.scheme, f"{host}:{port}"


def _scheme(value: str) -> str:
    return value.split("://", 1)[0] + "://"


def _shown(value: str) -> str:
    """The value as a message shows it: short, without query strings (they carry signatures)."""
    text = value if isinstance(value, str) else repr(value)
    if text.startswith("data:"):
        return "the data: URI image"
    text = text.split("?", 1)[0] if "fileuri=" not in text and "?d=" not in text else text
    return repr(text if len(text) <= 120 else text[:117] + "...")


# --------------------------------------------------------------------------- which value gave which content


class ImageIndex:
    """Task image value -> SHA-256 of the content it gave (and the decode error, if any).

    A table of its own in the encoding cache's SQLite file. Only successful downloads are
    recorded: a failed one (time-out, 5xx) is tried again next retrain. A file that was
    downloaded but cannot be decoded keeps its error, so it is not downloaded again either.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._db().execute(
            "CREATE TABLE IF NOT EXISTS image_sources (source TEXT PRIMARY KEY, content TEXT NOT NULL,"
            " error TEXT) WITHOUT ROWID"
        )

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    def get(self, sources: Sequence[str]) -> dict[str, tuple[str, str | None]]:
        found: dict[str, tuple[str, str | None]] = {}
        unique = list(dict.fromkeys(sources))
        for start in range(0, len(unique), 900):
            chunk = unique[start : start + 900]
            rows = self._db().execute(
                f"SELECT source, content, error FROM image_sources WHERE source IN ({','.join('?' * len(chunk))})",
                chunk,
            )
            found.update((s, (c, e)) for s, c, e in rows)
        return found

    def put(self, rows: Sequence[tuple[str, str, str | None]]) -> None:
        if rows:
            self._db().executemany(
                "INSERT OR REPLACE INTO image_sources (source, content, error) VALUES (?,?,?)", rows)

    def count(self) -> int:
        return self._db().execute("SELECT COUNT(*) FROM image_sources").fetchone()[0]


# --------------------------------------------------------------------------- encoding a project's images


@dataclass
class ImageEncodings:
    """Vectors of a list of task images; rows of failed images are zeros and listed in `errors`."""

    features: np.ndarray  # (n, encoder.dim)
    stages: np.ndarray  # (n, sum(encoder.stage_dims)): every stage pooled, for domain-likeness
    errors: dict[int, str]  # row -> what went wrong, to report per task
    downloaded: int = 0  # images fetched this time
    encoded: int = 0  # distinct contents run through the network this time

    @property
    def ok(self) -> np.ndarray:
        mask = np.ones(len(self.features), dtype=bool)
        mask[list(self.errors)] = False
        return mask


def encode_task_images(
    encoder: ImageEncoder,
    cache: EncodingCache,
    fetcher: ImageFetcher,
    images: Sequence[tuple[int | None, str]],
    index: ImageIndex | None = None,
    progress: Callable[[int, int], None] | None = None,
    fetch_threads: int = 8,
    chunk: int = 256,
) -> ImageEncodings:
    """Encode (task id, image value) pairs, downloading and encoding only what is new.

    Both the top features and every stage are computed in the same pass and cached, so
    an ordering that needs all stages later finds them too. Downloads (`fetch_threads`
    at a time), decoding and the network overlap. Never raises for a bad image: its row
    stays zero and `errors` says why.
    """
    index = index or ImageIndex(cache.path)
    n = len(images)
    stage_key = f"{encoder.id}/all-stages"
    width = sum(encoder.stage_dims)
    features = np.zeros((n, encoder.dim), dtype=np.float32)
    stages = np.zeros((n, width), dtype=np.float32)
    errors: dict[int, str] = {}
    result = ImageEncodings(features, stages, errors)

    sources: list[str | None] = []
    for row, (task_id, value) in enumerate(images):
        try:
            sources.append(fetcher.cache_key(value, task_id))
        except ImageError as exc:
            sources.append(None)
            errors[row] = str(exc)
    known = index.get([s for s in sources if s is not None])

    def fill(rows: list[int], digests: list[str]) -> list[int]:
        """Copy cached vectors into `rows`; return the rows whose content is not cached."""
        texts = [content_cache_text(d) for d in digests]
        top, missing_top = cache.lookup(encoder.id, texts)
        deep, missing_deep = cache.lookup(stage_key, texts)
        missing = set(missing_top) | set(missing_deep)
        for j, row in enumerate(rows):
            if j not in missing:
                features[row], stages[row] = top[j], deep[j]
        return [rows[j] for j in sorted(missing)]

    todo: list[int] = []
    seen_rows, seen_digests = [], []
    for row, source in enumerate(sources):
        if source is None:
            continue
        if source in known:
            digest, error = known[source]
            if error:
                errors[row] = error
            else:
                seen_rows.append(row)
                seen_digests.append(digest)
        else:
            todo.append(row)
    todo = sorted(todo + fill(seen_rows, seen_digests))
    done = n - len(todo)
    if progress is not None:
        progress(done, n)

    with ThreadPoolExecutor(fetch_threads, thread_name_prefix="image-fetch") as pool:
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            _encode_chunk(part, images, sources, encoder, cache, fetcher, index, pool,
                          fetch_threads, stage_key, result, fill)
            done += len(part)
            if progress is not None:
                progress(done, n)
    return result


def _encode_chunk(rows, images, sources, encoder, cache, fetcher, index, pool, fetch_threads,
                  stage_key, result: ImageEncodings, fill) -> None:
    """Fetch `rows`, skip contents already cached, encode the rest as they arrive, store them."""
    digest_of: dict[int, str] = {}
    waiting: dict[str, list[int]] = {}  # content -> rows that show it
    queued: list[str] = []  # contents in the order they were fed to the encoder

    def fetch(row: int):
        task_id, value = images[row]
        try:
            return row, fetcher.fetch(value, task_id)
        except ImageError as exc:
            return row, exc
        except Exception as exc:  # never let one image end the job
            return row, ImageFetchError(f"{_shown(value)}: unexpected error {type(exc).__name__}: {exc}")

    def feed() -> Iterator[bytes]:
        for row, data in bounded_map(pool, fetch, rows, ahead=2 * fetch_threads):
            if isinstance(data, ImageError):
                result.errors[row] = str(data)
                continue
            result.downloaded += 1
            digest = content_digest(data)
            digest_of[row] = digest
            if digest in waiting:  # the same content twice in this chunk: encode it once
                waiting[digest].append(row)
                continue
            waiting[digest] = [row]
            if not fill([row], [digest]):  # another value with this content was encoded before
                continue
            queued.append(digest)
            yield data

    decode_errors: dict[str, str] = {}

    def on_error(position: int, exc: ImageError) -> None:
        decode_errors[queued[position]] = str(exc)

    top, deep = encoder.encode_both(feed(), on_error=on_error, stages=True)
    good = [j for j, d in enumerate(queued) if d not in decode_errors]
    if good:
        texts = [content_cache_text(queued[j]) for j in good]
        cache.store(encoder.id, texts, top[good])
        cache.store(stage_key, texts, deep[good])
        result.encoded += len(good)
    # Rows read back through float16, so fresh and cached vectors are identical.
    for digest, rows_ in waiting.items():
        if digest in decode_errors:
            for row in rows_:
                result.errors[row] = decode_errors[digest]
        else:
            missing = fill(rows_, [digest] * len(rows_))
            for row in missing:  # pragma: no cover - stored just above
                result.errors[row] = "the encoding could not be stored"
    index.put([(sources[row], digest, decode_errors.get(digest)) for row, digest in digest_of.items()])


# --------------------------------------------------------------------------- a project's image objects

# Examples of per-task image errors a job result shows (the count covers them all).
ERROR_EXAMPLES = 5


def fetcher_for(settings, client=None) -> ImageFetcher:
    """An `ImageFetcher` with the backend's Label Studio, token, time-out and size limit;
    `client`: the job's SDK client, whose access token it reuses (else it makes its own).
    With FINE_TUNE_LAYERS > 0 it keeps the files it fetches in the bounded bytes cache
    (`CachingFetcher`): each fine-tuned version reads every image again."""
    fetcher = ImageFetcher(label_studio_url=settings.label_studio_url,
                           api_key=settings.label_studio_api_key or None, client=client,
                           read_timeout=settings.image_fetch_timeout, max_bytes=settings.image_max_bytes)
    if settings.fine_tune_layers > 0 and settings.image_bytes_cache_mb > 0:
        return CachingFetcher(fetcher, ImageIndex(settings.encoding_cache_path),
                              ImageBytesCache(settings.data_dir / "image_bytes",
                                              settings.image_bytes_cache_mb * 1024 * 1024))
    return fetcher


class ImageBytesCache:
    """Image files on disk, named by the SHA-256 of their content, at most `max_bytes` in all.

    Fine-tuning needs the images themselves, not their vectors: the labeled ones to train
    on, and every one again to encode it with each new version's network. Keeping the files
    spares Label Studio (or the storage behind it) a download of the whole project per
    retrain. Keyed by content, so two tasks showing one file keep one copy; the least
    recently used files go first when the total passes the limit (`trim`, at the end of a
    job). A file written by another worker is whole or absent (written aside, renamed).
    """

    def __init__(self, directory: str | Path, max_bytes: int):
        self.directory = Path(directory)
        self.max_bytes = int(max_bytes)

    def _path(self, digest: str) -> Path:
        return self.directory / digest[:2] / digest

    def get(self, digest: str) -> bytes | None:
        path = self._path(digest)
        try:
            data = path.read_bytes()
            os.utime(path)  # recently used: trimmed last
        except OSError:  # absent, or trimmed by another worker meanwhile
            return None
        if content_digest(data) != digest:  # damaged on disk: dropped, so `put` writes it anew
            path.unlink(missing_ok=True)
            return None
        return data

    def put(self, data: bytes) -> str:
        digest = content_digest(data)
        path = self._path(digest)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            aside = path.with_name(f".{digest}.{os.getpid()}.{threading.get_ident()}")
            aside.write_bytes(data)
            os.replace(aside, path)
        return digest

    def trim(self) -> int:
        """Delete the least recently used files until the total fits; returns how many went."""
        files = []
        for path in self.directory.glob("*/*"):
            try:
                stat = path.stat()
            except OSError:
                continue
            files.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in files)
        removed = 0
        for _, size, path in sorted(files):
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size
            removed += 1
        return removed


class CachingFetcher:
    """An `ImageFetcher` that answers from an `ImageBytesCache` what it fetched before.

    The file of a task value is the content `ImageIndex` recorded for it (the same rule by
    which the vectors are reused: a value's content is read once). Anything not in the
    cache is fetched and kept.
    """

    def __init__(self, fetcher: ImageFetcher, index: ImageIndex, store: ImageBytesCache):
        self.fetcher, self.index, self.store = fetcher, index, store
        self.stats = {"cache_hits": 0}
        self._lock = threading.Lock()  # fetch runs on several threads

    def url_for(self, value: str, task_id: int | None = None) -> tuple[str, bool]:
        return self.fetcher.url_for(value, task_id)

    def cache_key(self, value: str, task_id: int | None = None) -> str:
        return self.fetcher.cache_key(value, task_id)

    def fetch(self, value: str, task_id: int | None = None) -> bytes:
        source = self.fetcher.cache_key(value, task_id)
        known = self.index.get([source]).get(source)
        if known is not None and not known[1]:
            data = self.store.get(known[0])
            if data is not None:
                with self._lock:
                    self.stats["cache_hits"] += 1
                return data
        data = self.fetcher.fetch(value, task_id)
        self.store.put(data)
        return data

    def close(self) -> None:
        self.fetcher.close()
        try:
            self.store.trim()
        except OSError as exc:  # a full or read-only disk costs downloads, not the job
            log.warning("could not trim the image file cache %s: %s", self.store.directory, exc)


def fetch_task_images(fetcher, task_ids: Sequence[int], values: Sequence[str],
                      threads: int = 8) -> list[bytes | ImageError]:
    """The file of each (task id, image value), fetched `threads` at a time; a failure is that
    task's `ImageError` in its place, never an exception."""
    def one(pair):
        task_id, value = pair
        try:
            return fetcher.fetch(value, task_id)
        except ImageError as exc:
            return exc
        except Exception as exc:  # never let one image end the job
            return ImageFetchError(f"{_shown(value)}: unexpected error {type(exc).__name__}: {exc}")

    with ThreadPoolExecutor(threads, thread_name_prefix="image-fetch") as pool:
        return list(pool.map(one, zip(task_ids, values)))


@dataclass
class ProjectImages:
    """The vectors of every `<Image>` object a project's controls read, one row per task.

    `failed` are the rows (tasks) with a broken image in any object: they get no prediction
    and do not train; `errors` says why, per row and object.
    """

    encoder_id: str
    encodings: dict[str, ImageEncodings]  # object name -> its vectors over all tasks
    task_ids: list[int]

    @property
    def failed(self) -> list[int]:
        return sorted({row for enc in self.encodings.values() for row in enc.errors})

    @property
    def downloaded(self) -> int:
        return sum(enc.downloaded for enc in self.encodings.values())

    @property
    def encoded(self) -> int:
        return sum(enc.encoded for enc in self.encodings.values())

    def error_report(self) -> tuple[int, list[dict]]:
        """(tasks with a broken image, a few examples {task, object, error}) for /jobs."""
        examples = []
        for name, enc in self.encodings.items():
            for row in sorted(enc.errors)[:ERROR_EXAMPLES]:
                examples.append({"task": self.task_ids[row], "object": name, "error": enc.errors[row]})
        examples.sort(key=lambda e: e["task"])
        return len(self.failed), examples[:ERROR_EXAMPLES]

    def object_vectors(self, rows: Sequence[int]) -> dict:
        """Object name -> `model.training.ObjectVectors` of the given rows."""
        from model.training import ObjectVectors

        index = np.asarray(rows, dtype=np.int64)
        return {name: ObjectVectors(self.encoder_id, enc.features[index], enc.stages[index])
                for name, enc in self.encodings.items()}


def encode_project_images(encoder: ImageEncoder, cache: EncodingCache, fetcher: ImageFetcher,
                          task_ids: Sequence[int], object_values: dict[str, Sequence[str]],
                          progress: Callable[[int, int], None] | None = None) -> ProjectImages:
    """Encode each image object's value of every task (object name -> one value per task),
    through the cache: a retrain downloads and encodes only images it has never seen."""
    index = ImageIndex(cache.path)
    names = list(object_values)
    total = len(task_ids) * len(names)
    encodings = {}
    for k, name in enumerate(names):
        before = k * len(task_ids)
        report = None if progress is None else (lambda done, _n, before=before: progress(before + done, total))
        encodings[name] = encode_task_images(encoder, cache, fetcher, list(zip(task_ids, object_values[name])),
                                             index=index, progress=report)
    result = ProjectImages(encoder.id, encodings, list(task_ids))
    failed, examples = result.error_report()
    if failed:
        log.warning("%d of %d tasks have an image that could not be used (they get no prediction), "
                    "e.g. task %s: %s", failed, len(task_ids), examples[0]["task"], examples[0]["error"])
    return result
