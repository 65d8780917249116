"""A Label Studio project of movie snippets, and annotating it as an annotator would."""

from __future__ import annotations

import time

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


class SnippetProject:
    def __init__(self, client, n_tasks: int = 300, seed: int = 7, title: str = "test"):
        self.client = client
        snippets = movie_snippets().sample(n_tasks, seed=seed)
        self.truth = dict(zip(snippets.texts, snippets.labels))
        project = client.projects.create(title=f"{title} {time.time():.0f}", label_config=CONFIG)
        self.id = project.id
        client.projects.import_tasks(id=self.id, request=[{"text": t} for t in snippets.texts])
        self.annotated: set[int] = set()

    def tasks(self) -> list[dict]:
        return [t.model_dump(mode="json") for t in
                self.client.tasks.list(project=self.id, fields="all", page_size=500)]

    def annotate(self, task: dict) -> None:
        self.client.annotations.create(
            id=task["id"],
            result=[{"from_name": "sentiment", "to_name": "text", "type": "choices",
                     "value": {"choices": [self.truth[task["data"]["text"]]]}}],
        )
        self.annotated.add(task["id"])

    def annotate_balanced(self, per_class: int, tasks: list[dict] | None = None) -> list[dict]:
        """Annotate `per_class` not yet annotated tasks of each class, one by one."""
        picked, counts = [], {"Positive": 0, "Negative": 0}
        for task in tasks if tasks is not None else self.tasks():
            label = self.truth[task["data"]["text"]]
            if task["id"] not in self.annotated and counts[label] < per_class:
                counts[label] += 1
                picked.append(task)
        for task in picked:
            self.annotate(task)
        return picked

    def model_version(self) -> str | None:
        return self.client.projects.get(id=self.id).model_version

    def wait_for_version(self, newer_than: int, services, timeout: float = 300) -> str:
        deadline = time.monotonic() + timeout
        version = None
        while time.monotonic() < deadline:
            version = self.model_version()
            if version_number(version or "") > newer_than:
                return version
            time.sleep(1)
        raise AssertionError(
            f"no model version newer than {newer_than} (project has {version!r}); "
            f"jobs: {jobs_of(services, self.id)}\nworker log:\n{services.log_tail('worker.log')}")


def jobs_of(services, project_id: int) -> dict:
    return requests.get(f"{services.url}/jobs/{project_id}", timeout=5).json()


def wait_until_idle(services, project_id: int, timeout: float = 300) -> dict:
    """No job waiting, running or publishing for 3 s in a row (a webhook may still be in flight)."""
    deadline = time.monotonic() + timeout
    idle_polls = 0
    jobs = {}
    while time.monotonic() < deadline:
        jobs = jobs_of(services, project_id)
        busy = jobs["waiting"] or jobs["running"] or jobs.get("publishing")
        idle_polls = 0 if busy else idle_polls + 1
        if idle_polls >= 3:
            return jobs
        time.sleep(1)
    raise AssertionError(f"project {project_id} never went idle: {jobs}")
