"""Large projects fan out across RQ workers (issue 3, point 5).

A real Label Studio 1.23.2, the backend under gunicorn and two real rq workers. With
FANOUT_TASKS=100 a project of 320 tasks is "too large for one worker":

* the import's TASKS_CREATED hands the texts to encoding jobs, and a job that depends on
  all of them stores their vectors in the cache;
* the retrain job scores the project, then one job per slice uploads the predictions and a
  last job, which depends on every slice, switches Label Studio's model_version and
  /predict to the new version.
"""

from __future__ import annotations

import time

import pytest
import requests
from redis import Redis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from model.datasets import movie_snippets
from tests.support.ls_project import SnippetProject, jobs_of, wait_until_idle

pytestmark = pytest.mark.e2e


def test_large_project_publishes_through_slice_jobs_on_several_workers(label_studio, services):
    from label_studio_sdk.client import LabelStudio

    services.env.update(LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.api_key,
                        FANOUT_TASKS="100", PREDICTION_CHUNK="25")
    services.start_web()
    services.start_worker()
    services.start_worker()
    client = LabelStudio(base_url=label_studio.url, api_key=label_studio.api_key)
    project = SnippetProject(client, n_tasks=300, title="fan-out")
    # Labels made before the backend is connected send no webhooks: the one retrain below is
    # the only job, so every worker is free when its slices are queued.
    project.annotate_balanced(10)
    client.ml.create(url=services.url, project=project.id, title="Active Transfer Learning",
                     is_interactive=False)

    # Connecting (/setup of a project the backend has never seen) queued the encoding of its
    # 300 tasks, none encoded yet: slice jobs of at most 100, on both workers.
    encode = _encoding_done(services, project.id)
    assert encode["status"] == "finished", encode
    assert (encode["to_encode"], encode["encoded"], encode["encode_jobs"]) == (300, 300, 3), encode
    assert len(encode["workers"]) == 2, f"the encoding ran on one worker only: {encode}"

    # An import after the connection: Label Studio sends TASKS_CREATED, and the 20 new texts
    # are encoded by one job (fewer than FANOUT_TASKS).
    extra = movie_snippets().sample(340, seed=8)
    new = [(t, label) for t, label in zip(extra.texts, extra.labels) if t not in project.truth][:20]
    client.projects.import_tasks(id=project.id, request=[{"text": t} for t, _ in new])
    project.truth.update(new)
    encode = _encoding_done(services, project.id, tasks=320)
    assert (encode["status"], encode["encoded"]) == ("finished", 20), encode

    # Label Studio's "Start training" event: one retrain.
    response = requests.post(f"{services.url}/webhook", timeout=10,
                             json={"action": "START_TRAINING", "project": {"id": project.id}})
    assert response.status_code == 201 and response.json()["status"] == "queued", response.text
    version = project.wait_for_version(0, services)
    jobs = wait_until_idle(services, project.id)
    assert jobs["requested"] == 1 and project.model_version() == version, jobs
    last = jobs["last"]
    assert last["status"] == "finished", last
    assert last["model_version"] == version == jobs["model_version"]
    assert jobs["publishing"] is None
    assert last["encoded"] == 0, "the retrain re-encoded texts the encoding jobs had stored"
    # 320 predictions (the disputed labeled ones included) in slices of <= 100.
    publish = last["publish"]
    assert publish["slices"] == 4, publish
    assert publish["uploaded"] == 320, publish
    assert len(publish["workers"]) == 2, f"the slices ran on one worker only: {publish}"
    assert jobs["succeeded"] == 1 and jobs["failed"] == 0, jobs
    # The switch of the fan-out path ran the same after-switch steps as the inline one.
    after = dict(last["after_switch"])
    switched_at, tidy = after.pop("switched_at"), after.pop("seconds")
    assert after == {"sampling": "set to Uncertainty sampling", "removed": {}}, last
    assert switched_at + tidy <= last["finished_at"] + 0.01

    # The version was switched only after every slice had finished uploading.
    redis = Redis.from_url(services.redis_url)
    fetch = lambda job_id: Job.fetch(job_id, connection=redis, serializer=JSONSerializer)  # noqa: E731
    slices = [fetch(f"publish-{project.id}-{version}-{n}of4") for n in (1, 2, 3, 4)]
    finish = fetch(f"publish-{project.id}-{version}-finish")
    assert all(job.get_status().value == "finished" for job in slices + [finish])
    assert finish.started_at >= max(job.ended_at for job in slices)
    assert {job.return_value()["worker"] for job in slices} == set(publish["workers"])

    # Every task carries exactly one prediction of the new version, and Label Studio serves it.
    tasks = project.tasks()
    assert len(tasks) == 320
    for task in tasks:
        mine = [p for p in task["predictions"] if p["model_version"] == version]
        assert len(mine) == 1, f"task {task['id']}: {len(mine)} predictions of {version}"
    # Disputed labels went through the single-prediction API inside the slices: flagged.
    flagged = sum(1 for task in tasks for p in task["predictions"]
                  if p["model_version"] == version and (p.get("mislabeling") or 0) > 0)
    assert flagged == last["mislabeled"], (flagged, last["mislabeled"])
    assert project.model_version() == version
    assert jobs_of(services, project.id)["model_version"] == version

    # A slice's first run skips the listing of what Label Studio already holds (it grows
    # with every earlier slice); a run again of the same job (requeued by hand, or after its
    # worker died) still checks, and sends nothing twice.
    assert all(job.meta.get("started_once") for job in slices)
    again = slices[0]
    Queue(again.origin, connection=redis, serializer=JSONSerializer).enqueue_job(again)
    deadline = time.monotonic() + 120
    while fetch(again.id).get_status().value != "finished" or fetch(again.id).ended_at <= again.ended_at:
        assert time.monotonic() < deadline, f"the requeued slice did not run: {fetch(again.id).get_status()}"
        time.sleep(0.5)
    for task in project.tasks():
        mine = [p for p in task["predictions"] if p["model_version"] == version]
        assert len(mine) == 1, f"task {task['id']}: {len(mine)} predictions of {version} after a slice ran twice"


def _encoding_done(services, project_id: int, tasks: int | None = None, timeout: float = 300) -> dict:
    """The project's last encoding result once it is no longer running (of `tasks` tasks)."""
    deadline = time.monotonic() + timeout
    encode = None
    while time.monotonic() < deadline:
        encode = jobs_of(services, project_id)["last_encode"]
        if encode and encode["status"] != "encoding" and tasks in (None, encode.get("tasks")):
            return encode
        time.sleep(1)
    raise AssertionError(f"encoding of project {project_id} not done: {encode}")
