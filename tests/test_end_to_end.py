"""End to end: a real Label Studio 1.23.2, the backend under gunicorn, a real rq worker.

A user creates a text-classification project, imports ~300 Rotten Tomatoes snippets,
connects the backend with `client.ml.create`, and annotates through the API as an annotator
would. The backend must retrain in the background, put a prediction of the new model version
on every task, switch the project's `model_version`, reorder the queue by score, and publish
a newer version after a second round of annotations.
"""

from __future__ import annotations

import json
import time

import pytest
import requests

from backend.model_store import version_number
from tests.support.ls_project import CONFIG, SnippetProject, jobs_of, wait_until_idle

pytestmark = pytest.mark.e2e


def test_annotations_retrain_and_reorder_the_queue(label_studio, services):
    from label_studio_sdk.client import LabelStudio

    # FANOUT_TASKS below the project's size: with this one worker the jobs still do the work
    # themselves (no slice jobs that would only run one after the other in it).
    services.env.update(LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.api_key,
                        FANOUT_TASKS="100")
    services.start_web()
    services.start_worker()
    client = LabelStudio(base_url=label_studio.url, api_key=label_studio.api_key)

    project = SnippetProject(client, n_tasks=300, title="e2e")
    tasks = project.tasks()
    assert len(tasks) == 300
    # The ordering is chosen per project in the connection's extra params.
    client.ml.create(url=services.url, project=project.id, title="Active Transfer Learning",
                     is_interactive=False, extra_params={"ordering": "margin", "batch_size": 10})

    # Round one: 24 annotations, balanced, submitted one by one like an annotator; one of them
    # deliberately wrong.
    first_round = project.annotate_balanced(12, tasks)
    wrong = first_round[0]
    project.truth[wrong["data"]["text"]] = {"Positive": "Negative", "Negative": "Positive"}[
        project.truth[wrong["data"]["text"]]]
    project.annotate(wrong)
    first = project.wait_for_version(0, services)
    wait_until_idle(services, project.id)
    first = project.model_version()

    jobs = jobs_of(services, project.id)
    assert jobs["succeeded"] >= 1 and jobs["last"]["status"] == "finished"
    assert jobs["model_version"] == first
    # One worker: the 300 predictions went up from the retrain itself, the 300 texts were
    # encoded by one job; neither was split although both exceed FANOUT_TASKS.
    assert jobs["last"].get("publish_jobs") is None and jobs["last"].get("publish") is None, jobs["last"]
    assert jobs["last"]["timings"]["upload"] > 0, jobs["last"]  # the inline path's own lap
    assert jobs["last_encode"]["status"] == "finished", jobs["last_encode"]
    assert jobs["last_encode"].get("encode_jobs") is None, jobs["last_encode"]
    assert jobs["last"]["ordering"] == {"ordering": "margin", "batch_size": 10, "params": {},
                                        "source": "extra_params"}

    tasks = project.tasks()
    for task in tasks:
        versions = {p["model_version"] for p in task["predictions"]}
        assert first in versions, f"task {task['id']} has no prediction of {first}: {versions}"
    scores = {t["id"]: next(p["score"] for p in t["predictions"] if p["model_version"] == first)
              for t in tasks}
    by_score = sorted(scores, key=lambda task_id: (scores[task_id], task_id))
    assert by_score != sorted(scores), "ordering by prediction score is just the task id order"
    assert len(set(scores.values())) > 100  # real scores, not a constant
    # Unlabeled tasks come before labeled ones; Label Studio's own sort agrees.
    labeled_ids = {t["id"] for t in tasks if t["annotations"]}
    assert all(0 <= scores[i] < 0.9 for i in scores if i not in labeled_ids)
    assert all(0.9 <= scores[i] <= 1 for i in labeled_ids)
    ls_order = [t.id for t in client.tasks.list(project=project.id, page_size=500, query=json.dumps(
        {"ordering": ["tasks:predictions_score"]}))]
    assert ls_order[:20] == by_score[:20]
    # Label Studio's mislabeling value marks exactly the labels the job reports as disputed, and
    # only labeled tasks. Whether the deliberately wrong one is among them is not asserted: with
    # 25 movie-snippet labels the out-of-fold head is near chance, and a label is flagged only on
    # evidence (model/mislabeling.py; precision and recall are measured by
    # bench/mislabeling_check.py, the flag's upload by test_label_studio_client.py).
    flagged = {t["id"] for t in tasks for p in t["predictions"]
               if p["model_version"] == first and (p.get("mislabeling") or 0) > 0}
    assert len(flagged) == jobs["last"]["mislabeled"], (flagged, jobs["last"])
    assert flagged <= labeled_ids

    # The backend's /predict answers with the same model version Label Studio shows.
    predict = requests.post(f"{services.url}/predict", timeout=30, json={
        "tasks": tasks[:3], "project": f"{project.id}.{int(time.time())}", "label_config": CONFIG})
    assert [r["model_version"] for r in predict.json()["results"]] == [first] * 3

    # New tasks are encoded in the background (TASKS_CREATED) before anyone labels them.
    new_texts = [f"{text} (re-release)" for text in list(project.truth)[:40]]
    client.projects.import_tasks(id=project.id, request=[{"text": t} for t in new_texts])
    for text, original in zip(new_texts, list(project.truth)[:40]):
        project.truth[text] = project.truth[original]
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        encode = jobs_of(services, project.id)["last_encode"]
        if encode and encode["tasks"] == 340:
            break
        time.sleep(1)
    assert encode and encode["encoded"] == 40 and encode["tasks"] == 340, encode
    tasks = project.tasks()

    # Round two: more annotations give a newer version.
    second_round = project.annotate_balanced(5, tasks)
    project.wait_for_version(version_number(first), services)
    final = wait_until_idle(services, project.id)
    # Nothing lost: the last retrain saw every annotation of both rounds, and it is live.
    assert final["last"]["status"] == "finished"
    assert final["last"]["labeled"] == len(first_round) + len(second_round)
    second = project.model_version()
    assert second == final["last"]["model_version"] == final["model_version"]
    assert version_number(second) > version_number(first)
    # The encoding cache: the first retrain encoded the project, later ones encoded nothing.
    assert final["last"]["encoded"] == 0
    assert final["last"]["tasks"] == 340
    # Only the tasks that changed since the previous retrain were read from Label Studio: the 40
    # new ones, the ones annotated since, and the labeled ones whose disputed-label prediction
    # the previous version set one by one (Label Studio moves a task's updated_at on each).
    assert final["last"]["sync"]["mode"] == "incremental"
    flagged_before = {t["id"] for t in project.tasks() for p in t["predictions"]
                      if p["model_version"] != second and (p.get("mislabeling") or 0) > 0}
    changed = 40 + len(second_round) + len(flagged_before)
    assert final["last"]["sync"]["read"] <= changed + 5, (final["last"]["sync"], changed)
    assert final["last"]["sync"]["read"] < 340 // 2

    # Tasks deleted in Label Studio leave the local copy too ("Start Training" button).
    gone = [t["id"] for t in tasks if t["id"] not in project.annotated][:2]
    for task_id in gone:
        client.tasks.delete(id=task_id)
    client.ml.train(id=client.ml.list(project=project.id)[0].id)
    newer = project.wait_for_version(version_number(second), services)
    after_delete = wait_until_idle(services, project.id)
    assert after_delete["last"]["model_version"] == newer
    assert after_delete["last"]["tasks"] == 338
    assert after_delete["last"]["sync"]["deleted"] == 2

    # Logs at INFO carry project and job ids, but no secret and no task text.
    logs = services.log_tail("web.log", 10**7) + services.log_tail("worker.log", 10**7)
    assert f"project={project.id} job=" in logs
    assert label_studio.api_key not in logs and label_studio.api_key[-16:] not in logs
    assert not [text for text in project.truth if text in logs]
