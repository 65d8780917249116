"""End to end: a real Label Studio 1.23.2, the backend under gunicorn, a real rq worker.

A user creates a text-classification project, imports ~300 Rotten Tomatoes snippets,
connects the backend with `client.ml.create`, and annotates through the API as an annotator
would. The backend must retrain in the background, put a prediction of the new model version
on every task, switch the project's `model_version`, reorder the queue by score, and publish
a newer version after a second round of annotations.
"""

from __future__ import annotations

import time

import pytest
import requests

from backend.model_store import version_number
from model.datasets import movie_snippets

CONFIG = """<View>
  <Text name="text" value="$text"/>
  <Choices name="sentiment" toName="text" choice="single">
    <Choice value="Positive"/>
    <Choice value="Negative"/>
  </Choices>
</View>"""

pytestmark = pytest.mark.e2e


def _annotate(client, task_id: int, choice: str) -> None:
    client.annotations.create(
        id=task_id,
        result=[{"from_name": "sentiment", "to_name": "text", "type": "choices",
                 "value": {"choices": [choice]}}],
    )


def _wait_for_version(client, project_id: int, newer_than: int, services, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    version = None
    while time.monotonic() < deadline:
        version = client.projects.get(id=project_id).model_version
        if version_number(version or "") > newer_than:
            return version
        time.sleep(1)
    jobs = requests.get(f"{services.url}/jobs/{project_id}", timeout=5).json()
    raise AssertionError(f"no model version newer than {newer_than} (project has {version!r}); "
                         f"jobs: {jobs}\nworker log:\n{services.log_tail('worker.log')}")


def _all_tasks(client, project_id: int) -> list[dict]:
    return [t.model_dump(mode="json") for t in
            client.tasks.list(project=project_id, fields="all", page_size=500)]


def test_annotations_retrain_and_reorder_the_queue(label_studio, services):
    from label_studio_sdk.client import LabelStudio

    services.env.update(LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.api_key)
    services.start_web()
    services.start_worker()
    client = LabelStudio(base_url=label_studio.url, api_key=label_studio.api_key)

    snippets = movie_snippets().sample(300, seed=7)
    project = client.projects.create(title=f"e2e {time.time():.0f}", label_config=CONFIG)
    client.projects.import_tasks(id=project.id, request=[{"text": t} for t in snippets.texts])
    truth = dict(zip(snippets.texts, snippets.labels))
    tasks = _all_tasks(client, project.id)
    assert len(tasks) == 300

    client.ml.create(url=services.url, project=project.id, title="Active Transfer Learning",
                     is_interactive=False)

    # Round one: 24 annotations, balanced, submitted one by one like an annotator.
    first_round = _pick_balanced(tasks, truth, 12)
    for task in first_round:
        _annotate(client, task["id"], truth[task["data"]["text"]])
    first = _wait_for_version(client, project.id, newer_than=0, services=services)

    jobs = requests.get(f"{services.url}/jobs/{project.id}", timeout=5).json()
    assert jobs["succeeded"] >= 1 and jobs["last"]["status"] == "finished"
    assert jobs["model_version"] == first

    tasks = _all_tasks(client, project.id)
    for task in tasks:
        versions = {p["model_version"] for p in task["predictions"]}
        assert first in versions, f"task {task['id']} has no prediction of {first}: {versions}"
    scores = {t["id"]: next(p["score"] for p in t["predictions"] if p["model_version"] == first)
              for t in tasks}
    by_score = sorted(scores, key=lambda task_id: (scores[task_id], task_id))
    assert by_score != sorted(scores), "ordering by prediction score is just the task id order"
    assert len(set(scores.values())) > 100  # real scores, not a constant

    # The backend's /predict answers with the same model version Label Studio shows.
    predict = requests.post(f"{services.url}/predict", timeout=30, json={
        "tasks": tasks[:3], "project": f"{project.id}.{int(time.time())}", "label_config": CONFIG})
    assert [r["model_version"] for r in predict.json()["results"]] == [first] * 3

    # Round two: more annotations give a newer version.
    annotated = {t["id"] for t in first_round}
    second_round = _pick_balanced([t for t in tasks if t["id"] not in annotated], truth, 5)
    for task in second_round:
        _annotate(client, task["id"], truth[task["data"]["text"]])
    _wait_for_version(client, project.id, newer_than=version_number(first), services=services)
    final = _wait_until_idle(services, project.id)
    # Nothing lost: the last retrain saw every annotation of both rounds, and it is live.
    assert final["last"]["status"] == "finished"
    assert final["last"]["labeled"] == len(first_round) + len(second_round)
    second = client.projects.get(id=project.id).model_version
    assert second == final["last"]["model_version"] == final["model_version"]
    assert version_number(second) > version_number(first)
    # The encoding cache: the first retrain encoded the project, later ones encoded nothing.
    assert final["last"]["encoded"] == 0
    assert final["last"]["tasks"] == 300


def _wait_until_idle(services, project_id: int, timeout: float = 300) -> dict:
    """No job waiting or running for 3 s in a row (a webhook may still be in flight)."""
    deadline = time.monotonic() + timeout
    idle_polls = 0
    while time.monotonic() < deadline:
        jobs = requests.get(f"{services.url}/jobs/{project_id}", timeout=5).json()
        idle_polls = idle_polls + 1 if not jobs["waiting"] and not jobs["running"] else 0
        if idle_polls >= 3:
            return jobs
        time.sleep(1)
    raise AssertionError(f"project {project_id} never went idle: {jobs}")


def _pick_balanced(tasks, truth, per_class):
    picked, counts = [], {"Positive": 0, "Negative": 0}
    for task in tasks:
        label = truth[task["data"]["text"]]
        if counts[label] < per_class:
            counts[label] += 1
            picked.append(task)
    return picked
