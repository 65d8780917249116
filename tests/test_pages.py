"""The project pages (`/`, `/projects/<id>`): in a real headless Chromium against the real app
under gunicorn with a real Redis, and, for the cases of missing data, through Flask's test
client."""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import requests

from backend.model_store import ModelStore
from backend.progress import read_queue_preview, read_stop_set, write_queue_preview, write_stop_set
from model import stopping
from model.classifier import ClassifierHead, HeadConfig

LABELS = ["Positive", "Negative", "Neutral"]
LS_URL = "http://labelstudio.test:8080"
USER, PASSWORD = "team", "s3cret-pass"


def train_versions(store: ModelStore, project_id: int, rounds: list[int], seed: int = 0) -> list[dict]:
    """Train and store a project's versions the way the retrain does: a real head per round
    on more labels, its stopping signals (out-of-fold predictions from 3 fold heads), the
    stop-set predictions and the queue preview. Returns each version's signals."""
    rng = np.random.default_rng(seed)
    n, dim = 400, 16
    centres = rng.normal(0, 2.0, size=(len(LABELS), dim))
    truth = rng.integers(0, len(LABELS), n)
    features = (centres[truth] + rng.normal(0, 3.0, size=(n, dim))).astype(np.float32)
    task_ids = [1000 + i for i in range(n)]
    order = rng.permutation(n)
    out = []
    for labeled_count in rounds:
        labeled = np.sort(order[:labeled_count])
        unlabeled = np.setdiff1d(np.arange(n), labeled)
        config = HeadConfig(labels=LABELS, input_dim=dim, epochs=60)
        head = ClassifierHead(config).fit(features[labeled], truth[labeled])
        probabilities = head.predict_proba(features)
        predicted = [LABELS[i] for i in probabilities.argmax(axis=1)]
        oof = np.full(len(labeled), -1)
        fold_of = np.arange(len(labeled)) % 3
        for fold in range(3):
            held = fold_of == fold
            fold_head = ClassifierHead(config).fit(features[labeled][~held], truth[labeled][~held])
            oof[held] = fold_head.predict_proba(features[labeled][held]).argmax(axis=1)
        # What the previous version kept, read back from the store as the retrain does.
        previous = store.current_version(project_id)
        before = read_stop_set(store, project_id, previous)
        previous_signals = store.read_meta(project_id, previous).get("stopping") if previous else None
        now = stopping.stop_set_predictions(task_ids, predicted, size=200)
        point, reference = stopping.version_point(labeled_count, now, before, probabilities[unlabeled],
                                                  truth[labeled], oof, spacing=20)
        signals = stopping.next_signals(previous_signals, point)
        meta = {"labeled": labeled_count, "tasks": n, "training_accuracy": float(
                    (probabilities[labeled].argmax(axis=1) == truth[labeled]).mean()),
                "label_counts": {label: int((truth[labeled] == i).sum()) for i, label in enumerate(LABELS)},
                "ordering": {"ordering": "least_confidence", "batch_size": 50},
                "stopping": signals}
        version = store.stage(project_id, head, meta)
        write_stop_set(store, project_id, version, reference)
        scores = probabilities[unlabeled].max(axis=1)  # least confidence first
        write_queue_preview(store, project_id, version, [task_ids[i] for i in unlabeled], scores,
                            [predicted[i] for i in unlabeled],
                            texts=[f"Review text number {task_ids[i]} <b>not bold</b>" for i in unlabeled])
        store.activate(project_id, version)
        out.append(signals)
    return out


# -- headless browser against the real services -------------------------------------------



def test_project_page_in_a_real_browser_shows_the_numbers_of_a_trained_project(services, browser, tmp_path):
    from rq.job import Job
    from rq.serializers import JSONSerializer

    from backend.job_queue import JobQueue, redis_connection
    from backend.settings import Settings

    services.env.update(BASIC_AUTH_USER=USER, BASIC_AUTH_PASS=PASSWORD, LABEL_STUDIO_URL=LS_URL)
    services.start_web(workers=1)
    project_id = 7
    store = ModelStore(services.data_dir / "models")
    signals = train_versions(store, project_id, rounds=[12, 24, 48, 80, 120, 160, 210])
    versions = store.versions(project_id)
    live = store.current_version(project_id)
    preview = read_queue_preview(store, project_id, live)
    assert len(versions) == 5  # the store prunes to its newest five; the history keeps the rest
    # Seven versions: the first starts the reference, 24 labels is too close to it to be
    # compared, the five others are comparisons.
    assert [p["labeled"] for p in signals[-1]["history"]] == [12, 48, 80, 120, 160, 210]
    assert read_stop_set(store, project_id, live)["labeled"] == 210

    # Job state through the real queue: a retrain that failed, and one running now.
    settings = Settings.from_env(redis_url=services.redis_url)
    connection = redis_connection(services.redis_url)
    queue = JobQueue(connection, settings)
    failure = "Label Studio at http://labelstudio.test:8080 did not answer after 4 tries: check LABEL_STUDIO_URL"
    queue.record_result(project_id, {"status": "failed", "job_id": "retrain-old", "error": failure,
                                     "finished_at": time.time() - 300})
    job = Job.create("backend.jobs.retrain", args=[project_id, "test"], connection=connection,
                     serializer=JSONSerializer, id=f"retrain-{uuid.uuid4().hex[:8]}")
    job.meta["progress"] = {"stage": "uploading predictions", "done": 300, "total": 400}
    job.save()

    assert requests.get(services.url + "/", timeout=10).status_code == 401
    assert requests.get(services.url + f"/projects/{project_id}", timeout=10).status_code == 401

    context = browser.new_context(http_credentials={"username": USER, "password": PASSWORD},
                                  viewport={"width": 1320, "height": 900})
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda message: problems.append(f"console {message.type}: {message.text}")
            if message.type in ("error", "warning") else None)
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("requestfailed", lambda request: problems.append(f"request failed: {request.url}"))
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))

    with queue.training_lock(project_id, job.id):
        response = page.goto(services.url + "/")
        assert response.status == 200
        row = page.locator("tr", has=page.locator(f"a[href='/projects/{project_id}']"))
        assert row.locator("td").nth(1).inner_text() == "5"
        assert "training: uploading predictions" in row.inner_text()
        page.click(f"a[href='/projects/{project_id}']")
        page.wait_for_url(f"**/projects/{project_id}")

        assert page.locator("#version-count").inner_text() == "5"
        assert page.locator("#live-version").inner_text() == live
        assert page.locator("#labeled").inner_text() == "210"
        expected_accuracy = f"{100 * signals[-1]['oof_accuracy']:.1f}%"
        assert page.locator("#oof-accuracy").inner_text() == expected_accuracy
        assert expected_accuracy in page.locator("#signals").inner_text()
        assert page.locator("#kappa").inner_text() == f"{signals[-1]['kappa']:.3f}"
        assert page.locator("#verdict").inner_text().lower() == signals[-1]["verdict"]
        job_text = page.locator("#job").inner_text()
        assert "uploading predictions" in job_text and "300 of 400 (75%)" in job_text
        assert failure in page.locator("#failure").inner_text()
        assert "not computed yet" not in page.locator("#signals").inner_text()

        links = page.locator("#next-tasks a.task-link")
        assert links.count() == len(preview["next"]) == 20
        hrefs = [links.nth(i).get_attribute("href") for i in range(links.count())]
        assert hrefs == [f"{LS_URL}/projects/{project_id}/data?task={t['task_id']}" for t in preview["next"]]
        # The task text is shown as text, never as markup.
        assert "<b>not bold</b>" in page.locator("#next-tasks").inner_text()
        mix = page.locator("#label-mix").inner_text()
        label_counts = store.read_meta(project_id, live)["label_counts"]
        for label in LABELS:
            predicted = preview["predicted_counts"].get(label, 0)
            assert f"{label_counts[label]} labeled · {predicted} predicted" in mix
        # The charts: both accuracy estimates at each of the six points, the five kappas.
        assert page.locator("svg.chart").count() == 3
        assert page.locator("svg.chart").first.locator("circle").count() == 2 * 6
        assert page.locator("svg.chart").nth(1).locator("circle").count() == 5
        assert page.locator("table#versions tbody tr").count() == 5

        shot = tmp_path / "project-page.png"
        page.screenshot(path=str(shot), full_page=True)
    context.close()

    assert shot.stat().st_size > 20_000
    if os.environ.get("SCREENSHOTS_DIR"):  # refresh the README's picture
        shutil.copy(shot, Path(os.environ["SCREENSHOTS_DIR"]) / "project-page.png")
    assert problems == []
    # No external assets: everything the page needed came from the backend itself.
    assert all(url.startswith(services.url) or url.startswith("data:") for url in requested), requested


# -- missing data: never a 500 ----------------------------------------------------------------

@pytest.fixture
def client(tmp_path):
    from backend.app import create_app
    from backend.settings import Settings

    settings = Settings.from_env(data_dir=tmp_path, redis_url="", basic_auth_user="", basic_auth_pass="")
    app = create_app(settings)
    return app.test_client(), ModelStore(settings.models_dir)


def _head():
    return ClassifierHead(HeadConfig(labels=LABELS, input_dim=4))


def test_versions_from_before_the_signals_read_not_computed_yet(client):
    test_client, store = client
    # A version as the retrain writes it today: no stopping signals, no queue preview.
    version = store.stage(3, _head(), {"labeled": 12, "tasks": 90, "training_accuracy": 1.0,
                                       "label_counts": {"Positive": 7, "Negative": 5, "Neutral": 0}})
    store.activate(3, version)
    page = test_client.get("/projects/3")
    assert page.status_code == 200
    text = page.get_data(as_text=True)
    assert "Stopping signals: not computed yet" in text
    assert text.count("not computed yet") >= 6
    assert "training accuracy (on its own labels: optimistic)" in text  # the curve it can draw
    assert "7 labeled · 0 predicted" in text
    assert "job queue (Redis) is not answering" in text  # REDIS_URL unset here
    listing = test_client.get("/")
    assert listing.status_code == 200 and 'href="/projects/3"' in listing.get_data(as_text=True)
    assert ">unknown<" in listing.get_data(as_text=True)  # not "idle": Redis did not answer


def test_broken_or_odd_files_do_not_break_the_page(client):
    test_client, store = client
    first = store.stage(4, _head(), {"labeled": 5})
    second = store.stage(4, _head(), {"labeled": 9, "stopping": {"history": "not a list", "verdict": None},
                                      "label_counts": ["not", "a", "dict"], "ordering": None})
    store.activate(4, second)
    (store.project_dir(4) / first / "meta.json").write_text("{ truncated")
    (store.project_dir(4) / second / "queue_preview.json").write_text("[1, 2]")
    page = test_client.get("/projects/4")
    assert page.status_code == 200, page.get_data(as_text=True)[:500]
    assert "unreadable" in page.get_data(as_text=True)
    assert test_client.get("/").status_code == 200


def test_a_project_the_backend_does_not_know_is_a_404_page_that_says_what_to_do(client):
    test_client, _ = client
    page = test_client.get("/projects/99")
    assert page.status_code == 404
    assert "Connect Model" in page.get_data(as_text=True)
    assert test_client.get("/projects/0").status_code == 400  # the same id range as everywhere


def test_queue_preview_keeps_the_lowest_scores_and_the_predicted_mix(tmp_path):
    store = ModelStore(tmp_path)
    version = store.stage(5, _head(), {})
    written = write_queue_preview(store, 5, version, [10, 11, 12, 13], [0.5, 0.1, 0.9, 0.3],
                                  ["Positive", "Negative", "Positive", "Positive"],
                                  texts=["a", "b " * 200, "c", "d"], size=2)
    assert [t["task_id"] for t in written["next"]] == [11, 13]
    assert written["predicted_counts"] == {"Positive": 3, "Negative": 1}
    assert len(written["next"][0]["text"]) <= 140
    assert read_queue_preview(store, 5, version) == written
    assert read_queue_preview(store, 5, None) is None
    with pytest.raises(FileNotFoundError, match="stage it"):
        write_queue_preview(store, 5, "v9999-20260101-000000", [1], [0.1], ["Positive"])
    with pytest.raises(ValueError, match="one score"):
        write_queue_preview(store, 5, version, [1, 2], [0.1], ["Positive"])
    assert not any(re.match(r"^\.", p.name) for p in (store.project_dir(5) / version).iterdir())
