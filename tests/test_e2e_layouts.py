"""End to end with the label configs real projects bring: a multi-label project, and a project
with two classification controls over two text fields beside a free-text `<TextArea>`.

A real Label Studio 1.23.2, the backend under gunicorn and a real rq worker, as in
tests/test_end_to_end.py; small projects (120 tasks) annotated through the API. Each project
must get new model versions with one prediction per task holding a result for every control,
a queue order that is not the task id order, and Label Studio's labeling screen, opened in a
real headless Chromium, must show every control pre-filled.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import requests

from backend.model_store import version_number
from model.datasets import movie_snippets
from tests.support.ls_project import jobs_of, wait_until_idle

pytestmark = pytest.mark.e2e

SHOTS = Path(os.environ.get("E2E_SCREENSHOTS", "/tmp/e2e-layouts"))

MULTI_LABEL = """<View>
  <Text name="text" value="$text"/>
  <Choices name="tags" toName="text" choice="multiple">
    <Choice value="Positive"/>
    <Choice value="Negative"/>
    <Choice value="Long"/>
  </Choices>
</View>"""

TWO_CONTROLS = """<View>
  <Text name="title" value="$title"/>
  <Text name="body" value="$text"/>
  <Choices name="sentiment" toName="body" choice="single-radio">
    <Choice value="Positive"/>
    <Choice value="Negative"/>
  </Choices>
  <Choices name="length" toName="title,body">
    <Choice value="Short"/>
    <Choice value="Long"/>
  </Choices>
  <TextArea name="comment" toName="body"/>
</View>"""


class LayoutProject:
    """A project of movie snippets under `config`, annotated with `answer(text)` -> result."""

    def __init__(self, client, config: str, answer, n_tasks: int = 120, seed: int = 11):
        self.client = client
        snippets = movie_snippets().sample(n_tasks, seed=seed)
        self.sentiment = dict(zip(snippets.texts, snippets.labels))
        lengths = sorted(len(t.split()) for t in snippets.texts)
        self.median = lengths[len(lengths) // 2]
        self.answer = answer
        project = client.projects.create(title=f"layouts {time.time():.0f}", label_config=config)
        self.id = project.id
        client.projects.import_tasks(id=self.id, request=[
            {"text": t, "title": " ".join(t.split()[:5])} for t in snippets.texts])
        self.annotated: set[int] = set()

    def long(self, text: str) -> bool:
        return len(text.split()) > self.median

    def tasks(self) -> list[dict]:
        return [t.model_dump(mode="json") for t in
                self.client.tasks.list(project=self.id, fields="all", page_size=500)]

    def annotate(self, count: int) -> None:
        """Annotate `count` more tasks, as many of each sentiment, one by one."""
        per_class = {"Positive": 0, "Negative": 0}
        for task in self.tasks():
            label = self.sentiment[task["data"]["text"]]
            if task["id"] in self.annotated or per_class[label] >= count // 2:
                continue
            per_class[label] += 1
            self.client.annotations.create(id=task["id"], result=self.answer(self, task["data"]["text"]))
            self.annotated.add(task["id"])

    def version(self) -> int:
        return version_number(self.client.projects.get(id=self.id).model_version or "")

    def wait_for_version(self, newer_than: int, services, timeout: float = 300) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.version() > newer_than:
                wait_until_idle(services, self.id)
                return self.client.projects.get(id=self.id).model_version
            time.sleep(1)
        raise AssertionError(f"no version newer than {newer_than}; jobs: {jobs_of(services, self.id)}\n"
                             f"worker log:\n{services.log_tail('worker.log')}")


def multi_label_answer(project: LayoutProject, text: str) -> list[dict]:
    tags = [project.sentiment[text]] + (["Long"] if project.long(text) else [])
    return [{"from_name": "tags", "to_name": "text", "type": "choices", "value": {"choices": tags}}]


def two_controls_answer(project: LayoutProject, text: str) -> list[dict]:
    return [
        {"from_name": "sentiment", "to_name": "body", "type": "choices",
         "value": {"choices": [project.sentiment[text]]}},
        {"from_name": "length", "to_name": "title", "type": "choices",
         "value": {"choices": ["Long" if project.long(text) else "Short"]}},
        {"from_name": "comment", "to_name": "body", "type": "textarea", "value": {"text": ["seen"]}},
    ]


def check_predictions(project: LayoutProject, version: str, controls: dict[str, bool]) -> dict[int, dict]:
    """One prediction of `version` per task, one result per control (`controls`: name ->
    multi-label), and an order by score that is not the task id order. Returns them by task."""
    current = {}
    for task in project.tasks():
        mine = [p for p in task["predictions"] if p["model_version"] == version]
        assert len(mine) == 1, f"task {task['id']}: {len(mine)} predictions of {version}"
        results = {r["from_name"]: r for r in mine[0]["result"]}
        assert set(results) == set(controls), (task["id"], mine[0]["result"])
        for name, multi in controls.items():
            chosen = results[name]["value"]["choices"]
            assert chosen and (multi or len(chosen) == 1), (task["id"], name, chosen)
        current[task["id"]] = mine[0]
    by_score = sorted(current, key=lambda task_id: (current[task_id]["score"], task_id))
    assert by_score != sorted(current), "the queue is in task id order"
    return current


def test_multi_label_and_two_control_projects_learn_every_control(label_studio, services, browser):
    from label_studio_sdk.client import LabelStudio

    services.env.update(LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.api_key)
    services.start_web()
    services.start_worker()
    client = LabelStudio(base_url=label_studio.url, api_key=label_studio.api_key)

    multi = LayoutProject(client, MULTI_LABEL, multi_label_answer)
    two = LayoutProject(client, TWO_CONTROLS, two_controls_answer)
    # One bad ordering parameter (out of range) falls back to its default with a warning;
    # the rest of the extra params still apply.
    for project, params in ((multi, {"min_class_fraction": 7}), (two, {})):
        client.ml.create(url=services.url, project=project.id, title="Active Transfer Learning",
                         is_interactive=False, extra_params={"batch_size": 10, "params": params})
    # What /setup says of the two-control config: both controls learned, the TextArea ignored.
    setup = requests.post(f"{services.url}/setup", timeout=10,
                          json={"project": str(two.id), "schema": TWO_CONTROLS}).json()
    assert setup["controls"] == ["sentiment", "length"]
    assert [c["name"] for c in setup["ignored_controls"]] == ["comment"]

    for project in (multi, two):
        project.annotate(30)
    first = {p.id: p.wait_for_version(0, services) for p in (multi, two)}
    for project in (multi, two):
        project.annotate(6)
    latest = {p.id: p.wait_for_version(version_number(first[p.id]), services) for p in (multi, two)}

    predictions = check_predictions(multi, latest[multi.id], {"tags": True})
    # Multi-label for real: some task gets two tags (a sentiment and "Long").
    assert any(len(p["result"][0]["value"]["choices"]) > 1 for p in predictions.values())
    check_predictions(two, latest[two.id], {"sentiment": False, "length": False})

    last = jobs_of(services, two.id)["last"]
    assert last["status"] == "finished" and last["model_version"] == latest[two.id]
    assert [c["name"] for c in last["ignored_controls"]] == ["comment"]
    assert set(last["controls"]) == {"sentiment", "length"} and last["labeled"] == 36
    assert set(last["stopping"]["controls"]) == {"sentiment", "length"} and last["stopping"]["verdict"]
    last_multi = jobs_of(services, multi.id)["last"]
    assert last_multi["stopping"]["oof_accuracy"] is not None
    assert last_multi["ordering"]["batch_size"] == 10
    assert any("min_class_fraction" in w for w in last_multi["param_warnings"]), last_multi
    assert "param_warnings" not in last
    metrics = requests.get(f"{services.url}/metrics", timeout=10).text
    assert f'atl_out_of_fold_accuracy{{project="{two.id}"}}' in metrics

    # The project page shows the combined signals of the two controls, not "not computed yet".
    page_html = requests.get(f"{services.url}/projects/{two.id}", timeout=10).text
    assert "Still learning" in page_html or "Predictions have stabilised" in page_html

    # Label Studio's labeling screen pre-fills every control from the prediction.
    page = login(browser, label_studio)
    for project, expected in ((multi, 1), (two, 2)):
        task_id = next(t["id"] for t in project.tasks() if not t["annotations"])
        checked = labeling_screen_checked(page, label_studio.url, project.id, task_id,
                                          SHOTS / f"project-{project.id}-task-{task_id}.png", expected)
        assert checked >= expected, f"project {project.id} task {task_id}: {checked} choices shown selected"




def login(browser, label_studio):
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(f"{label_studio.url}/user/login/", wait_until="domcontentloaded")
    page.fill("input[name=email]", label_studio.username)
    page.fill("input[name=password]", label_studio.password)
    page.click("button[type=submit], input[type=submit]")
    page.wait_for_url(lambda url: "/user/login" not in url, timeout=60_000)
    return page


def labeling_screen_checked(page, url: str, project_id: int, task_id: int, shot: Path, expected: int,
                            timeout: float = 90) -> int:
    """How many choices the labeling screen of a task shows selected, once it has drawn
    (waits until `expected` are, or `timeout`); a screenshot is kept at `shot`."""
    page.goto(f"{url}/projects/{project_id}/data?task={task_id}", wait_until="domcontentloaded")
    deadline = time.monotonic() + timeout
    checked = 0
    while time.monotonic() < deadline:
        checked = page.locator("input[type=checkbox]:checked, input[type=radio]:checked").count()
        if checked >= expected:
            break
        time.sleep(1)
    try:  # let the editor finish drawing, so the screenshot shows what an annotator sees
        page.wait_for_load_state("networkidle", timeout=20_000)
        page.wait_for_timeout(1000)
    except Exception:  # a page that keeps polling never goes idle; the count above stands
        pass
    shot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shot), full_page=True)
    return checked
