"""Fetching task images as Label Studio stores them, against real servers, and the encoding cache.

A local `http.server` in a thread serves good, truncated, non-image, mislabelled and bomb
files, fails on purpose (503, stalls, redirects) and checks the token; the real Label
Studio serves an uploaded image.
"""

from __future__ import annotations

import base64
import http.server
import socket
import threading
import time
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest

from backend.images import (
    CachingFetcher,
    ImageBytesCache,
    ImageFetcher,
    ImageFetchError,
    ImageIndex,
    content_digest,
    encode_task_images,
)
from model.encoding_cache import EncodingCache
from model.image_encoder import ImageEncoder
from tests.test_image_encoder import bomb_png, sample_photo

TOKEN = "legacy-test-token-0123456789"  # not a JWT: the SDK sends it as a legacy "Token"


class Site:
    """A real HTTP server on loopback; `routes` maps a path to (status, headers, body)."""

    def __init__(self, require_token: bool = False):
        self.routes: dict[str, tuple[int, dict, bytes]] = {}
        self.requests: list[tuple[str, dict]] = []
        self.flaky: dict[str, int] = {}  # path -> failures (503) still to serve
        self.require_token = require_token
        site = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                site.requests.append((self.path, dict(self.headers)))
                path = urlsplit(self.path).path
                if site.require_token and self.headers.get("Authorization") != f"Token {TOKEN}":
                    return self._send(401, {"Content-Type": "application/json"}, b'{"detail": "no"}')
                if site.flaky.get(path, 0) > 0:
                    site.flaky[path] -= 1
                    return self._send(503, {}, b"busy")
                if path == "/stall":
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Content-Length", "100000")
                    self.end_headers()
                    self.wfile.write(b"\xff\xd8")
                    self.wfile.flush()
                    time.sleep(3)
                    return None
                if path.startswith("/tasks/") and "/resolve/" in path:
                    fileuri = parse_qs(urlsplit(self.path).query)["fileuri"][0]
                    target = site.resolve.get(base64.urlsafe_b64decode(fileuri).decode())
                    if target is None:
                        return self._send(404, {}, b"")
                    return self._send(303, {"Location": target}, b"")
                status, headers, body = site.routes.get(path, (404, {}, b"not found"))
                return self._send(status, headers, body)

            def _send(self, status, headers, body):
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.resolve: dict[str, str] = {}
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def site():
    s = Site()
    jpeg = sample_photo("rocket.jpg")
    png = sample_photo("coffee.png")
    s.routes.update({
        "/cat.png": (200, {"Content-Type": "image/png"}, sample_photo("chelsea.png")),
        "/coffee.png": (200, {"Content-Type": "image/png"}, png),
        "/copy-of-coffee": (200, {"Content-Type": "application/octet-stream"}, png),
        "/rocket.jpg": (200, {"Content-Type": "image/jpeg"}, jpeg),
        "/truncated.jpg": (200, {"Content-Type": "image/jpeg"}, jpeg[: len(jpeg) // 3]),
        "/page.html": (200, {"Content-Type": "text/html"}, b"<!DOCTYPE html><html>hello</html>"),
        "/page-as-image": (200, {"Content-Type": "image/png"}, b"<!DOCTYPE html><html>login</html>"),
        "/png-as-html": (200, {"Content-Type": "text/html; charset=utf-8"}, png),
        "/bomb.png": (200, {"Content-Type": "image/png"}, bomb_png(50_000, 50_000)),
        "/forbidden.png": (403, {}, b""),
    })
    yield s
    s.close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fetcher_for(url: str, **kw) -> ImageFetcher:
    kw.setdefault("backoff", 0.05)
    return ImageFetcher(label_studio_url=url, api_key=TOKEN, **kw)


def test_url_kinds_map_to_label_studio_or_the_open_web():
    f = ImageFetcher(label_studio_url="http://ls:8080/", api_key=TOKEN)
    assert f.url_for("/data/upload/3/ab12-cat.jpg") == ("http://ls:8080/data/upload/3/ab12-cat.jpg", True)
    assert f.url_for("upload/3/cat.jpg") == ("http://ls:8080/data/upload/3/cat.jpg", True)
    local = "/data/local-files/?d=photos/cat.jpg"
    assert f.url_for(local) == ("http://ls:8080" + local, True)
    url, token = f.url_for("s3://bucket/dir/cat.jpg", task_id=7)
    assert token and url.startswith("http://ls:8080/tasks/7/resolve/?fileuri=")
    assert base64.urlsafe_b64decode(url.split("fileuri=")[1]).decode() == "s3://bucket/dir/cat.jpg"
    for scheme in ("gs://b/x.png", "azure-blob://c/x.png"):
        assert "/tasks/7/resolve/?fileuri=" in f.url_for(scheme, task_id=7)[0]
    # Label Studio's HOSTNAME in resolved data may not be how the backend reaches it.
    resolved = "http://localhost:8080/tasks/7/resolve/?fileuri=czM6Ly9iL3g="
    assert f.url_for(resolved) == ("http://ls:8080/tasks/7/resolve/?fileuri=czM6Ly9iL3g=", True)
    assert f.url_for("http://ls:8080/data/upload/1/x.png")[1] is True
    assert f.url_for("https://images.example.org/data/upload/1/x.png") == (
        "https://images.example.org/data/upload/1/x.png", False)
    with pytest.raises(ImageFetchError, match="task id"):
        f.url_for("s3://bucket/cat.jpg")
    with pytest.raises(ImageFetchError, match="unsupported"):
        f.url_for("ftp://host/cat.jpg")
    with pytest.raises(ImageFetchError, match="not a URL"):
        f.url_for(None)
    assert f.cache_key("s3://bucket/cat.jpg", 1) == f.cache_key("s3://bucket/cat.jpg", 2)


def test_fetch_good_files_and_clear_errors_for_bad_ones(site):
    f = fetcher_for("http://127.0.0.1:1", read_timeout=0.5, max_bytes=2_000_000)  # LS not used here
    assert f.fetch(site.url + "/cat.png") == sample_photo("chelsea.png")
    assert f.fetch(site.url + "/copy-of-coffee") == sample_photo("coffee.png")  # generic type: decoder decides
    with pytest.raises(ImageFetchError, match="served as 'text/html', not as an image"):
        f.fetch(site.url + "/png-as-html")
    with pytest.raises(ImageFetchError, match="not found"):
        f.fetch(site.url + "/missing.png")
    with pytest.raises(ImageFetchError, match="403"):
        f.fetch(site.url + "/forbidden.png")
    small = fetcher_for("http://127.0.0.1:1", max_bytes=1000)
    with pytest.raises(ImageFetchError, match="limit of 1,000"):
        small.fetch(site.url + "/cat.png")
    started = time.monotonic()
    with pytest.raises(ImageFetchError, match="time-out") as stalled:
        f.fetch(site.url + "/stall")
    assert stalled.value.retryable and time.monotonic() - started < 10
    site.flaky["/rocket.jpg"] = 2  # two 503s, then the file: within the three attempts
    assert f.fetch(site.url + "/rocket.jpg") == sample_photo("rocket.jpg")
    assert f.stats["retries"] >= 2 + 2  # the stall was retried too
    site.flaky["/rocket.jpg"] = 5
    with pytest.raises(ImageFetchError, match="503"):
        f.fetch(site.url + "/rocket.jpg")
    unreachable = f"http://127.0.0.1:{closed_port()}/cat.png"
    with pytest.raises(ImageFetchError, match="could not be downloaded") as refused:
        f.fetch(unreachable)
    assert refused.value.retryable
    tiny = base64.b64encode(sample_photo("chelsea.png")).decode()
    assert f.fetch("data:image/png;base64," + tiny) == sample_photo("chelsea.png")


def test_label_studio_token_goes_to_label_studio_only(site):
    """Cloud URIs resolve through Label Studio's resolve endpoint; its redirect to a presigned
    URL elsewhere must not carry the backend's token (it would leak, and break the signature)."""
    ls = Site(require_token=True)
    try:
        ls.routes["/data/upload/1/cat.png"] = (200, {"Content-Type": "image/png"}, sample_photo("chelsea.png"))
        ls.resolve["s3://bucket/coffee.png"] = site.url + "/coffee.png?X-Amz-Signature=abc"
        f = fetcher_for(ls.url)
        assert f.fetch("/data/upload/1/cat.png") == sample_photo("chelsea.png")
        assert f.fetch("s3://bucket/coffee.png", task_id=5) == sample_photo("coffee.png")
        assert ls.requests[-1][0].startswith("/tasks/5/resolve/?fileuri=")
        presigned_headers = site.requests[-1][1]
        assert site.requests[-1][0].startswith("/coffee.png?X-Amz-Signature=")
        assert "Authorization" not in presigned_headers
        with pytest.raises(ImageFetchError, match="no storage connected"):
            f.fetch("s3://other-bucket/x.png", task_id=5)
        wrong = ImageFetcher(label_studio_url=ls.url, api_key="wrong-token", backoff=0.01)
        with pytest.raises(ImageFetchError, match="LABEL_STUDIO_API_KEY"):
            wrong.fetch("/data/upload/1/cat.png")
        without = ImageFetcher(label_studio_url=ls.url)
        with pytest.raises(ImageFetchError, match="needs LABEL_STUDIO_API_KEY"):
            without.fetch("/data/upload/1/cat.png")
    finally:
        ls.close()


@pytest.fixture(scope="module")
def encoder():
    return ImageEncoder(device="cpu", batch_size=4)


def test_project_images_are_fetched_and_encoded_once(site, encoder, tmp_path):
    cache = EncodingCache(tmp_path / "encodings.sqlite3")
    f = fetcher_for("http://127.0.0.1:1")
    images = [
        (1, site.url + "/cat.png"),
        (2, site.url + "/truncated.jpg"),
        (3, site.url + "/page.html"),
        (4, site.url + "/coffee.png"),
        (5, site.url + "/bomb.png"),
        (6, site.url + "/page-as-image"),
        (7, site.url + "/cat.png"),  # the same URL twice
        (8, f"http://127.0.0.1:{closed_port()}/x.png"),
        (9, "s3://bucket/x.png"),  # no such storage at this "Label Studio": unreachable
        (10, site.url + "/rocket.jpg"),
    ]
    first = encode_task_images(encoder, cache, f, images, fetch_threads=4, chunk=4)
    assert sorted(first.errors) == [1, 2, 4, 5, 7, 8], first.errors
    assert "complete" in first.errors[1] and "text/html" in first.errors[2]
    assert "pixels" in first.errors[4] and "HTML" in first.errors[5]
    assert first.ok.tolist() == [True, False, False, True, False, False, True, False, False, True]
    assert first.encoded == 3  # cat, coffee, rocket: the second cat was not encoded again
    np.testing.assert_array_equal(first.features[0], first.features[6])
    assert first.features[first.ok].any(axis=1).all() and not first.features[~first.ok].any()
    np.testing.assert_allclose(first.stages[:, -encoder.dim:], first.features, atol=2e-2)

    downloads, decoded, forwarded = f.stats["downloads"], encoder.stats["decoded"], encoder.stats["forwarded"]
    second = encode_task_images(encoder, cache, f, images)
    assert f.stats["downloads"] == downloads, "a seen image was downloaded again"
    assert (encoder.stats["decoded"], encoder.stats["forwarded"]) == (decoded, forwarded)
    assert second.encoded == 0 and second.downloaded == 0
    # Decode errors are remembered; fetch errors (may be transient) are tried again.
    assert set(second.errors) == set(first.errors)
    np.testing.assert_array_equal(second.features, first.features)
    np.testing.assert_array_equal(second.stages, first.stages)

    # A new URL with content seen before: downloaded once, not decoded or encoded.
    third = encode_task_images(encoder, cache, f, [(11, site.url + "/copy-of-coffee")])
    assert third.downloaded == 1 and third.encoded == 0
    assert encoder.stats["decoded"] == decoded
    np.testing.assert_array_equal(third.features[0], first.features[3])
    assert ImageIndex(cache.path).count() == 7  # every downloaded value, good or undecodable


def test_a_fine_tuned_network_reads_the_files_from_the_bytes_cache(site, encoder, tmp_path):
    """FINE_TUNE_LAYERS: every version encodes every image again under its own encoder id;
    the files come from the bounded on-disk cache, not from the server again."""
    cache = EncodingCache(tmp_path / "encodings.sqlite3")
    plain = fetcher_for("http://127.0.0.1:1")
    store = ImageBytesCache(tmp_path / "bytes", max_bytes=10 * 1024 * 1024)
    f = CachingFetcher(plain, ImageIndex(cache.path), store)
    images = [(1, site.url + "/cat.png"), (2, site.url + "/truncated.jpg"), (3, site.url + "/rocket.jpg"),
              (4, site.url + "/cat.png")]
    first = encode_task_images(encoder, cache, f, images)
    assert sorted(first.errors) == [1] and plain.stats["downloads"] == 4  # the first pass fetches each row
    tuned = ImageEncoder(device="cpu", batch_size=4, cache_id="lite0+ft-version-2")
    again = encode_task_images(tuned, cache, f, images)
    assert plain.stats["downloads"] == 4, "a file the cache holds was downloaded again"
    assert f.stats["cache_hits"] == 3 and again.encoded == 2 and sorted(again.errors) == [1]
    assert cache.count("lite0+ft-version-2") == 2
    np.testing.assert_allclose(again.features, first.features, atol=2e-2)  # same weights here
    # A file changed on disk is not trusted: it is fetched again.
    digest = content_digest(sample_photo("rocket.jpg"))
    (tmp_path / "bytes" / digest[:2] / digest).write_bytes(b"not the file")
    assert f.fetch(site.url + "/rocket.jpg") == sample_photo("rocket.jpg") and plain.stats["downloads"] == 5
    # Bounded: over the limit, the least recently used files go first.
    small = ImageBytesCache(tmp_path / "bytes", max_bytes=len(sample_photo("rocket.jpg")) + 10)
    small.get(digest)  # the most recently used
    assert small.trim() >= 1
    assert small.get(digest) == sample_photo("rocket.jpg")
    assert sum(p.stat().st_size for p in (tmp_path / "bytes").glob("*/*")) <= small.max_bytes
    f.close()


@pytest.mark.e2e
def test_an_image_uploaded_to_label_studio(label_studio, encoder, tmp_path):
    """The real Label Studio 1.23.2: an image uploaded through the import API, fetched back as
    the task's `/data/upload/...` value with the personal access token."""
    import httpx
    from label_studio_sdk.client import LabelStudio

    client = LabelStudio(base_url=label_studio.url, api_key=label_studio.api_key)
    project = client.projects.create(
        title=f"images {time.time():.0f}",
        label_config='<View><Image name="image" value="$image"/>'
                     '<Choices name="kind" toName="image"><Choice value="cat"/><Choice value="cup"/></Choices></View>',
    )
    f = ImageFetcher(label_studio_url=label_studio.url, api_key=label_studio.api_key, backoff=0.05)
    photo = sample_photo("chelsea.png")
    # The SDK's import_tasks sends JSON only; a file upload is the same endpoint, multipart.
    response = httpx.post(f"{label_studio.url}/api/projects/{project.id}/import",
                          headers={"Authorization": f._authorization()},
                          files={"file": ("chelsea.png", photo, "image/png")}, timeout=60)
    assert response.status_code == 201, response.text
    tasks = [t.model_dump(mode="json") for t in client.tasks.list(project=project.id, fields="all")]
    assert len(tasks) == 1
    value = tasks[0]["data"]["image"]
    assert value.startswith("/data/upload/"), value
    assert f.fetch(value, tasks[0]["id"]) == photo
    # A cloud URI of a bucket the project has no storage for: the real resolve endpoint
    # answers 404 (so the token and the URL form were accepted), reported per task.
    with pytest.raises(ImageFetchError, match="no storage connected"):
        f.fetch("s3://no-such-bucket/cat.png", tasks[0]["id"])
    result = encode_task_images(encoder, EncodingCache(tmp_path / "c.sqlite3"), f,
                                [(tasks[0]["id"], value), (tasks[0]["id"], value + "-gone")])
    assert result.ok.tolist() == [True, False] and "no longer exists" in result.errors[1]
    assert f.stats["retries"] == 0  # neither the 404 nor that 500 is worth retrying
    client.projects.delete(id=project.id)


@pytest.mark.e2e
def test_an_image_in_label_studio_local_storage(label_studio, encoder, tmp_path):
    """Local Storage: tasks hold `/data/local-files/?d=...`, served by the real Label Studio.

    Label Studio 1.23 serves Local Storage when the directory it starts in has a `mydata`
    folder (its autodetected LOCAL_FILES_DOCUMENT_ROOT); the harness starts it in its data dir.
    """
    import shutil

    from label_studio_sdk.client import LabelStudio

    root = label_studio.data_dir / "mydata"
    root.mkdir(exist_ok=True)
    folder = root / f"images-{time.time_ns()}"
    folder.mkdir()
    (folder / "coffee.png").write_bytes(sample_photo("coffee.png"))
    client = LabelStudio(base_url=label_studio.url, api_key=label_studio.api_key)
    project = client.projects.create(
        title=f"local images {time.time():.0f}",
        label_config='<View><Image name="image" value="$image"/>'
                     '<Choices name="kind" toName="image"><Choice value="cup"/></Choices></View>',
    )
    try:
        try:
            storage = client.import_storage.local.create(project=project.id, path=str(folder),
                                                         use_blob_urls=True, regex_filter=r".*\.png")
        except Exception as exc:  # the SDK's ApiError: LS refuses paths outside its document root
            if "LOCAL_FILES" in str(exc) or "document root" in str(exc).lower():
                pytest.skip(f"this Label Studio was started before {root} existed, so it does not serve "
                            f"Local Storage yet (it will from its next start): {exc}")
            raise
        client.import_storage.local.sync(id=storage.id)
        tasks = [t.model_dump(mode="json") for t in client.tasks.list(project=project.id, fields="all")]
        assert len(tasks) == 1
        value = tasks[0]["data"]["image"]
        assert value.startswith("/data/local-files/?d="), value
        f = ImageFetcher(label_studio_url=label_studio.url, api_key=label_studio.api_key, backoff=0.05)
        assert f.fetch(value, tasks[0]["id"]) == sample_photo("coffee.png")
        result = encode_task_images(encoder, EncodingCache(tmp_path / "c.sqlite3"), f, [(tasks[0]["id"], value)])
        assert result.ok.all() and result.encoded == 1
    finally:
        client.projects.delete(id=project.id)
        shutil.rmtree(folder, ignore_errors=True)


def test_a_project_s_image_objects_report_their_broken_tasks(site, encoder, tmp_path):
    from backend.images import encode_project_images

    cache = EncodingCache(tmp_path / "encodings.sqlite3")
    f = fetcher_for("http://127.0.0.1:1")
    task_ids = [11, 12, 13, 14]
    values = {
        "photo": [site.url + "/cat.png", site.url + "/page.html", site.url + "/coffee.png", ""],
        "thumb": [site.url + p for p in ("/rocket.jpg", "/rocket.jpg", "/truncated.jpg", "/cat.png")],
    }
    seen = []
    images = encode_project_images(encoder, cache, f, task_ids, values, progress=lambda d, t: seen.append((d, t)))
    assert images.failed == [1, 2, 3]  # a row fails when any of its images does
    count, examples = images.error_report()
    assert count == 3
    assert [(e["task"], e["object"]) for e in examples] == [(12, "photo"), (13, "thumb"), (14, "photo")]
    assert "text/html" in examples[0]["error"] and "complete" in examples[1]["error"]
    assert "not a URL or path" in examples[2]["error"]  # a task without its image field
    assert seen[-1] == (8, 8)
    vectors = images.object_vectors([0])
    assert set(vectors) == {"photo", "thumb"} and vectors["photo"].features.shape == (1, encoder.dim)
    assert vectors["thumb"].all_layers.shape == (1, sum(encoder.stage_dims))
    # cat, coffee, rocket: the second cat was cached, the truncated file failed
    assert vectors["photo"].encoder_id == encoder.id and images.encoded == 3
    again = encode_project_images(encoder, cache, f, task_ids, values)
    assert again.encoded == 0 and again.failed == images.failed
