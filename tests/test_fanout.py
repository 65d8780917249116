"""Publishing a large project fans out across RQ workers (issue 3, point 5).

A real Label Studio 1.23.2, the backend under gunicorn and two real rq workers. With
FANOUT_TASKS=100 a project of 300 tasks is "too large for one worker": the retrain job
scores it, then one job per slice uploads the predictions and a last job, which depends on
every slice, switches Label Studio's model_version and /predict to the new version.
"""

from __future__ import annotations

import pytest
from redis import Redis
from rq.job import Job
from rq.serializers import JSONSerializer

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
    client.ml.create(url=services.url, project=project.id, title="Active Transfer Learning",
                     is_interactive=False)

    project.annotate_balanced(10)
    project.wait_for_version(0, services)
    jobs = wait_until_idle(services, project.id)
    version = project.model_version()  # the annotations may have led to more than one retrain
    last = jobs["last"]
    assert last["status"] == "finished", last
    assert last["model_version"] == version == jobs["model_version"]
    assert jobs["publishing"] is None
    # 300 tasks, minus the few disputed labeled ones sent one by one, in slices of <= 100.
    publish = last["publish"]
    assert publish["slices"] == 3, publish
    assert publish["uploaded"] + last["mislabeled"] == 300, (publish, last["mislabeled"])
    assert len(publish["workers"]) == 2, f"the slices ran on one worker only: {publish}"
    assert jobs["succeeded"] >= 1 and jobs["failed"] == 0, jobs

    # The version was switched only after every slice had finished uploading.
    redis = Redis.from_url(services.redis_url)
    fetch = lambda job_id: Job.fetch(job_id, connection=redis, serializer=JSONSerializer)  # noqa: E731
    slices = [fetch(f"publish-{project.id}-{version}-{n}of3") for n in (1, 2, 3)]
    finish = fetch(f"publish-{project.id}-{version}-finish")
    assert all(job.get_status().value == "finished" for job in slices + [finish])
    assert finish.started_at >= max(job.ended_at for job in slices)
    assert {job.return_value()["worker"] for job in slices} == set(publish["workers"])

    # Every task carries exactly one prediction of the new version, and Label Studio serves it.
    tasks = project.tasks()
    assert len(tasks) == 300
    for task in tasks:
        mine = [p for p in task["predictions"] if p["model_version"] == version]
        assert len(mine) == 1, f"task {task['id']}: {len(mine)} predictions of {version}"
    assert project.model_version() == version
    assert jobs_of(services, project.id)["model_version"] == version
