"""End to end against a real Label Studio 1.23.2: the queue a labeling team meets.

* "Label All Tasks" (Label Studio's own `GET /api/projects/<id>/next`) hands out our
  lowest-scored unlabeled task once the first version is live, and the new lowest after a
  retrain; an owner's later choice of sampling stands.
* Every task holds the live version's prediction and the previous one's, nothing older
  (KEEP_PREDICTION_VERSIONS=1), counted per task after three versions.
* Before the first annotation, the cold start (`backend/cold_start.py`) orders the queue:
  Label Studio's own next serves its first pick with the zero-shot guess pre-filled, and
  the first model version replaces its predictions.
* Opening a task before the first model stores no prediction; connecting a project queues
  the encoding of its tasks, so the first retrain encodes nothing; a task whose submitted
  annotation is empty sorts after every unlabeled task.
* A refused label config: its reason reaches the connection dialog's error, and a config
  changed to something unsupported fails one retrain (no RQ retry), is reported in /jobs
  and queues nothing more until the config changes.
"""

from __future__ import annotations

import time

import pytest
import requests

from backend.model_store import VERSION_RE, version_number
from tests.support.ls_project import SnippetProject, jobs_of, wait_until_idle

pytestmark = pytest.mark.e2e

TEXTAREA_ONLY = """<View>
  <Text name="text" value="$text"/>
  <TextArea name="comment" toName="text"/>
</View>"""
CHOICES_AND_TEXTAREA = """<View>
  <Text name="text" value="$text"/>
  <Choices name="sentiment" toName="text" choice="single">
    <Choice value="Positive"/>
    <Choice value="Negative"/>
  </Choices>
  <TextArea name="comment" toName="text"/>
</View>"""


def _start(label_studio, services):
    from label_studio_sdk.client import LabelStudio

    services.env.update(LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.api_key)
    services.start_web(workers=1)  # one process: its /metrics counts every /predict
    services.start_worker()
    return LabelStudio(base_url=label_studio.url, api_key=label_studio.api_key)


def _ls_get(client, path: str):
    """A Label Studio endpoint the SDK has no method for, with the SDK's own auth."""
    response = client._client_wrapper.httpx_client.request(path, method="GET")
    assert response.status_code == 200, (path, response.status_code, response.text[:300])
    return response.json()


def _predictions_per_task(project) -> dict[int, list[str]]:
    return {t["id"]: sorted(p["model_version"] for p in t["predictions"]) for t in project.tasks()}


def _scores(project, version: str) -> dict[int, float]:
    return {t["id"]: next(p["score"] for p in t["predictions"] if p["model_version"] == version)
            for t in project.tasks()}


def _predict_calls(services) -> int:
    metrics = requests.get(f"{services.url}/metrics", timeout=5).text
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in metrics.splitlines()
               if line.startswith("atl_predict_latency_seconds_count"))


def _wait_for(check, what: str, services, project_id: int, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"{what} never happened; jobs: {jobs_of(services, project_id)}\n"
                         f"worker log:\n{services.log_tail('worker.log')}")


def _round(project, services, tasks, previous: str) -> tuple[str, dict]:
    """Annotate `tasks` one by one; wait for a newer version and for the backend to be idle."""
    for task in tasks:
        project.annotate(task)
    project.wait_for_version(version_number(previous), services)
    jobs = wait_until_idle(services, project.id)
    assert jobs["last"]["status"] == "finished", jobs["last"]
    live = project.model_version()
    assert live == jobs["model_version"]
    return live, jobs


def test_label_all_tasks_serves_our_order_and_old_predictions_go(label_studio, services):
    # Without the cold start: this test follows a project from no prediction at all to the
    # first model (the cold start has its own test below).
    services.env["COLD_START"] = "false"
    client = _start(label_studio, services)
    project = SnippetProject(client, n_tasks=60, seed=3, title="queue")
    assert client.projects.get(id=project.id).sampling == "Sequential sampling"
    client.ml.create(url=services.url, project=project.id, title="Active Transfer Learning",
                     is_interactive=False)

    # Connecting queued the encoding of the project's 60 tasks (/setup of a new project).
    encode = _wait_for(lambda: (e := jobs_of(services, project.id)["last_encode"])
                       and e.get("status") == "finished" and e, "the encoding at connection",
                       services, project.id)
    assert encode["tasks"] == 60 and encode["encoded"] == 60, encode

    # Opening a task before the first model asks /predict and stores nothing.
    tasks = project.tasks()
    calls = _predict_calls(services)
    opened = client.tasks.get(id=tasks[0]["id"])
    assert _predict_calls(services) > calls, "Label Studio did not ask /predict"
    assert not opened.predictions
    assert all(not t["predictions"] for t in project.tasks())
    assert _ls_get(client, f"api/projects/{project.id}/model-versions/") == {"Active Transfer Learning": 0}

    # Version one: Label All Tasks now follows our order.
    first, jobs = _round(project, services, project.annotate_balanced(4, tasks), "")
    assert jobs["last"]["encoded"] == 0  # encoded at connection: the retrain only trained
    # (The first switch's result says "set to Uncertainty sampling"; a burst may have made
    # a second version since, whose result is the last one.)
    assert client.projects.get(id=project.id).sampling == "Uncertainty sampling"
    _assert_live_and_previous(client, project, first)
    scores = _scores(project, first)
    unlabeled = sorted((s, i) for i, s in scores.items() if i not in project.annotated)
    served = _ls_get(client, f"api/projects/{project.id}/next/")
    print(f"after {first}: next serves {served['id']}, lowest scores {unlabeled[:3]}")
    assert served["id"] == unlabeled[0][1], (served["id"], unlabeled[:3])

    # Version two: the served task annotated, and the next one in the queue submitted empty
    # (a pre-selected choice clicked off), with two more; next is the new lowest.
    by_id = {t["id"]: t for t in project.tasks()}
    emptied = unlabeled[1][1]
    client.annotations.create(id=emptied, result=[])
    more = [by_id[i] for _, i in unlabeled[2:4]]
    second, jobs = _round(project, services, [by_id[served["id"]], *more], first)
    scores = _scores(project, second)
    done = project.annotated | {emptied}
    unlabeled = sorted((s, i) for i, s in scores.items() if i not in done)
    assert scores[emptied] >= 0.9 > max(s for s, _ in unlabeled), "an empty annotation kept its rank"
    served = _ls_get(client, f"api/projects/{project.id}/next/")
    print(f"after {second}: next serves {served['id']}, lowest scores {unlabeled[:3]}, "
          f"emptied task {emptied} scored {scores[emptied]}")
    assert served["id"] == unlabeled[0][1], (served["id"], unlabeled[:3])
    assert "sampling" not in jobs["last"]["after_switch"]  # set once only
    older = [v for v in jobs["last"]["after_switch"]["kept"]]
    assert older and version_number(older[0]) < version_number(second)
    _assert_live_and_previous(client, project, second)

    # The owner picks another sampling; version three leaves it alone.
    client.projects.update(id=project.id, sampling="Uniform sampling")
    third, jobs = _round(project, services, [by_id[i] for _, i in unlabeled[:2]], second)
    assert client.projects.get(id=project.id).sampling == "Uniform sampling"

    # After three versions (or more, if a burst made two): each task holds exactly the live
    # version's prediction and the one before it; older ones were deleted in bulk.
    ours = _assert_live_and_previous(client, project, third)
    assert len(ours) == 2 and first not in ours and version_number(first) < version_number(ours[0])
    assert jobs["last"]["after_switch"]["kept"] == [ours[0]]
    assert jobs["last"]["after_switch"]["removed"]  # the one before was deleted by this switch
    assert "errors" not in jobs["last"]["after_switch"]


def _assert_live_and_previous(client, project, live: str) -> list[str]:
    """Every task holds one prediction of `live` and, once there was one, one of the version
    before it (KEEP_PREDICTION_VERSIONS=1), and no other; returns those versions."""
    counts = _ls_get(client, f"api/projects/{project.id}/model-versions/")
    ours = sorted((v for v in counts if VERSION_RE.match(v)), key=version_number)
    assert ours[-1] == live and len(ours) <= 2 and "untrained" not in counts, counts
    per_task = _predictions_per_task(project)
    assert len(per_task) == 60
    assert all(versions == ours for versions in per_task.values()), per_task
    assert all(counts[v] == 60 for v in ours), counts
    print(f"live {live}: predictions per task {sorted({len(v) for v in per_task.values()})}, "
          f"per version {counts}")
    return ours


def test_cold_start_orders_the_queue_and_prefills_until_the_first_model(label_studio, services):
    client = _start(label_studio, services)
    project = SnippetProject(client, n_tasks=40, seed=11, title="cold start")
    client.ml.create(url=services.url, project=project.id, title="Active Transfer Learning",
                     is_interactive=False)

    # Connecting queued the encoding; with the texts cached, the cold start is published.
    encode = _wait_for(lambda: (e := jobs_of(services, project.id)["last_encode"])
                       and e.get("status") == "finished" and e, "the encoding at connection",
                       services, project.id)
    cold = encode["cold_start"]
    assert cold["model_version"] == "cold-start-1" and cold["prefilled_controls"] == ["sentiment"], cold
    assert project.model_version() == "cold-start-1"
    assert client.projects.get(id=project.id).sampling == "Uncertainty sampling"
    assert _ls_get(client, f"api/projects/{project.id}/model-versions/") == {"cold-start-1": 40}
    scores = _scores(project, "cold-start-1")
    assert all(0 <= s < 0.9 for s in scores.values()) and len(set(scores.values())) == 40
    queue = sorted(scores, key=scores.get)

    # Label All Tasks: Label Studio's own next serves the cold start's first pick (the
    # default k-means order), not the lowest id, with its zero-shot guess on the labeling
    # screen. The guess is rough but better than a coin on these snippets (25 of 40 right
    # when this test was written).
    served = _ls_get(client, f"api/projects/{project.id}/next/")
    assert served["id"] == queue[0] != min(scores), (served["id"], queue[:3], min(scores))
    guesses = {t["id"]: p["result"][0]["value"]["choices"] for t in project.tasks()
               for p in t["predictions"] if p["model_version"] == "cold-start-1"}
    shown = [p for p in served["predictions"] if p["model_version"] == "cold-start-1"]
    assert len(shown) == 1 and shown[0]["result"][0]["from_name"] == "sentiment", served["predictions"]
    assert shown[0]["result"][0]["value"]["choices"] == guesses[queue[0]]
    by_text = {t["id"]: t["data"]["text"] for t in project.tasks()}
    right = sum(guesses[i] == [project.truth[by_text[i]]] for i in guesses)
    assert len(guesses) == 40 and right > 20, f"{right} of 40 zero-shot guesses right"
    print(f"cold start: next serves {served['id']} (lowest id {min(scores)}), {right} of 40 guesses right")

    # The first annotations: the real model version replaces the cold start everywhere.
    by_id = {t["id"]: t for t in project.tasks()}
    first, jobs = _round(project, services, project.annotate_balanced(3, [by_id[i] for i in queue]), "")
    # (A burst may have made a second version; the previous one is kept, the cold start never.)
    counts = _ls_get(client, f"api/projects/{project.id}/model-versions/")
    assert counts[first] == 40 and all(VERSION_RE.match(v) for v in counts) and len(counts) <= 2, counts
    assert "sampling" not in jobs["last"]["after_switch"]  # set by the cold start, once
    served = _ls_get(client, f"api/projects/{project.id}/next/")
    assert [p["model_version"] for p in served["predictions"]] == [first]


def test_a_refused_config_says_why_and_waits_for_a_change(label_studio, services, monkeypatch):
    from label_studio_sdk.core.api_error import ApiError

    client = _start(label_studio, services)

    # Connecting a project whose config has nothing to learn: the reason is in Label
    # Studio's own answer (what its connection dialog shows), not just "400 BAD REQUEST".
    refused = client.projects.create(title=f"refused {time.time():.0f}", label_config=TEXTAREA_ONLY)
    with pytest.raises(ApiError) as error:
        client.ml.create(url=services.url, project=refused.id, title="ATL", is_interactive=False)
    shown = str(error.value.body)
    print(f"Label Studio's answer to connecting: {shown}")
    assert "no control this backend can learn" in shown and "TextArea" in shown, shown

    # A project connected with a good config, then changed to an unsupported one.
    project = SnippetProject(client, n_tasks=10, seed=5, title="refused later")
    client.ml.create(url=services.url, project=project.id, title="ATL", is_interactive=False)
    client.projects.update(id=project.id, label_config=TEXTAREA_ONLY)
    tasks = project.tasks()
    comment = [{"from_name": "comment", "to_name": "text", "type": "textarea", "value": {"text": ["meh"]}}]
    client.annotations.create(id=tasks[0]["id"], result=comment)
    jobs = _wait_for(lambda: (j := jobs_of(services, project.id))["label_config_refused"] and j,
                     "the refusal", services, project.id)
    last = jobs["last"]
    assert last["status"] == "failed" and "label config is not supported" in last["error"], last
    assert "Traceback" not in last["error"]

    # Failed once in RQ, no retry scheduled.
    from redis import Redis
    from rq.job import Job
    from rq.serializers import JSONSerializer

    job = Job.fetch(last["job_id"], connection=Redis.from_url(services.redis_url), serializer=JSONSerializer)
    assert job.get_status() == "failed" and not job.retries_left
    # Another annotation: the webhook is refused, nothing is queued.
    requested = jobs["requested"]
    client.annotations.create(id=tasks[1]["id"], result=comment)
    _wait_for(lambda: f"project={project.id} webhook ANNOTATION_CREATED -> refused" in
              services.log_tail("web.log", 10**6), "a refused webhook", services, project.id, timeout=30)
    # An import: the encoding job says why it has nothing to do, once, in /jobs.
    client.projects.import_tasks(id=project.id, request=[{"text": "a task imported later"}])
    encode = _wait_for(lambda: (e := jobs_of(services, project.id)["last_encode"])
                       and e["status"] == "failed" and e, "the refused encoding", services, project.id)
    assert "label config is not supported" in encode["error"], encode

    # The reconcile sees annotations the model never saw, and queues nothing either.
    for name in ("REDIS_URL", "LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "DATA_DIR"):
        monkeypatch.setenv(name, services.env[name])
    from backend.jobs import reconcile

    assert project.id in reconcile()["refused"]
    jobs = jobs_of(services, project.id)
    assert (jobs["requested"], jobs["failed"], jobs["waiting"]) == (requested, 1, None), jobs

    # The owner adds a classification: PROJECT_UPDATED lifts the refusal and queues a retrain,
    # which finds no choice answered yet (skipped, not failed).
    client.projects.update(id=project.id, label_config=CHOICES_AND_TEXTAREA)
    jobs = _wait_for(lambda: (j := jobs_of(services, project.id))["last"]["status"] != "failed" and j,
                     "the retrain after the config changed", services, project.id)
    assert not jobs["label_config_refused"] and jobs["last"]["status"] == "skipped", jobs
    assert jobs["failed"] == 1
