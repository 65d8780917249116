"""Unit tests of the task store's incremental sync (backend/task_store.py).

The store talks to Label Studio through two calls, `tasks(progress=, updated_after=)` and
`task_ids()`. `ProjectTasks` below answers them from a dict the way Label Studio 1.23 does
(the `filter:tasks:updated_at` "greater" filter, ids of live tasks), and counts what it was
asked, so each test can say how much a sync read. The end-to-end tests run the same store
against the real server.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from backend.task_store import OVERLAP, TaskStore

T0 = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)


def stamp(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


def parse(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


class ProjectTasks:
    """A project's tasks as Label Studio serves them, with a clock the test moves."""

    def __init__(self, n: int):
        # Task i is created at second 10 * i (an import spread over time), the clock then
        # stands a minute after the last one.
        self.tasks = {}
        for i in range(1, n + 1):
            self.now = 10.0 * i
            self.tasks[i] = self._task(i, f"text {i}")
        self.now = 10.0 * n + 60
        self.reads: list[tuple[str | None, int]] = []  # (updated_after, tasks returned)
        self.id_listings = 0

    def _task(self, task_id: int, text: str, annotations=None) -> dict:
        return {"id": task_id, "data": {"text": text}, "annotations": annotations or [],
                "predictions": [{"result": [], "score": 0.5}], "updated_at": stamp(self.now)}

    def tick(self, seconds: float = 10) -> None:
        self.now += seconds

    def annotate(self, task_id: int, label: str) -> None:
        task = self.tasks[task_id]
        task["annotations"].append({
            "id": 1000 + len(task["annotations"]) + task_id * 10, "was_cancelled": False,
            "result": [{"type": "choices", "value": {"choices": [label]}}],
            "created_at": stamp(self.now), "updated_at": stamp(self.now)})
        task["updated_at"] = stamp(self.now)

    def add(self, task_id: int) -> None:
        self.tasks[task_id] = self._task(task_id, f"text {task_id}")

    def delete(self, task_id: int) -> None:
        del self.tasks[task_id]

    @property
    def task_number(self) -> int:
        return len(self.tasks)

    # -- the two calls TaskStore makes ------------------------------------------------
    def tasks_list(self, progress=None, updated_after: str | None = None) -> list[dict]:
        rows = [dict(t) for _, t in sorted(self.tasks.items())
                if updated_after is None or parse(t["updated_at"]) > parse(updated_after)]
        self.reads.append((updated_after, len(rows)))
        return rows

    def task_ids(self) -> list[int]:
        self.id_listings += 1
        return sorted(self.tasks)


class Source:
    """Adapts ProjectTasks to the method names of backend.label_studio.LabelStudioProject."""

    def __init__(self, project: ProjectTasks):
        self.project = project

    def tasks(self, progress=None, updated_after=None):
        return self.project.tasks_list(progress=progress, updated_after=updated_after)

    def task_ids(self):
        return self.project.task_ids()


def test_first_sync_reads_everything_and_keeps_only_what_training_needs(tmp_path):
    project = ProjectTasks(5)
    project.annotate(2, "positive")
    tasks, info = TaskStore(tmp_path, 1).sync(Source(project), project.task_number)
    assert info == {"mode": "full", "read": 5}
    assert [t["id"] for t in tasks] == [1, 2, 3, 4, 5]
    assert project.reads == [(None, 5)]
    assert all("predictions" not in t for t in tasks)
    assert tasks[1]["annotations"][0]["result"][0]["value"]["choices"] == ["positive"]


def test_later_syncs_read_only_changed_tasks_with_an_overlap(tmp_path):
    project = ProjectTasks(50)
    store = TaskStore(tmp_path, 1)
    store.sync(Source(project), project.task_number)
    project.tick()
    project.annotate(7, "negative")
    project.annotate(9, "positive")
    tasks, info = store.sync(Source(project), project.task_number)
    # The two changed tasks, and task 50 again: it was stamped within OVERLAP of the newest.
    assert info == {"mode": "incremental", "read": 3}
    assert project.reads[-1][1] == 3
    asked_after = parse(project.reads[-1][0])
    # The filter starts OVERLAP before the newest change already seen (task 50's creation).
    assert asked_after == parse(stamp(500)) - OVERLAP
    by_id = {t["id"]: t for t in tasks}
    assert len(by_id) == 50
    assert by_id[7]["annotations"][0]["result"][0]["value"]["choices"] == ["negative"]

    # Nothing changed: the overlap re-reads the last changes (harmless upserts), no more.
    tasks_again, info = store.sync(Source(project), project.task_number)
    assert info["mode"] == "incremental" and info["read"] == 2
    assert tasks_again == tasks


def test_a_change_stamped_within_the_overlap_is_not_missed(tmp_path):
    project = ProjectTasks(10)
    store = TaskStore(tmp_path, 1)
    store.sync(Source(project), project.task_number)
    project.annotate(3, "a")
    store.sync(Source(project), project.task_number)
    # A second annotation whose timestamp is *earlier* than the newest one seen (clock skew
    # between Label Studio's workers, or the same second), by less than the overlap.
    project.now -= OVERLAP.total_seconds() / 2
    project.annotate(4, "b")
    tasks, _ = store.sync(Source(project), project.task_number)
    assert {t["id"]: len(t["annotations"]) for t in tasks}[4] == 1


def test_deleted_tasks_are_dropped_and_new_ones_added(tmp_path):
    project = ProjectTasks(20)
    store = TaskStore(tmp_path, 1)
    store.sync(Source(project), project.task_number)
    project.tick()
    project.delete(5)
    project.delete(6)
    project.add(21)
    tasks, info = store.sync(Source(project), project.task_number)
    assert info["mode"] == "incremental"
    assert info["read"] == 2 and info["deleted"] == 2  # task 21, and task 20 within the overlap
    assert project.id_listings == 1
    assert [t["id"] for t in tasks] == [i for i in range(1, 22) if i not in (5, 6)]


def test_counts_that_still_disagree_fall_back_to_a_full_read(tmp_path):
    project = ProjectTasks(10)
    store = TaskStore(tmp_path, 1)
    store.sync(Source(project), project.task_number)
    # A task created with an old updated_at (e.g. restored from a backup): the incremental
    # read cannot see it, the id listing finds nothing stale, so only a full read helps.
    project.tasks[11] = project._task(11, "restored")
    project.tasks[11]["updated_at"] = stamp(-3600)
    project.tick()
    tasks, info = store.sync(Source(project), project.task_number)
    assert info["mode"] == "full (counts disagreed)" and info["read"] == 11
    assert [t["id"] for t in tasks] == list(range(1, 12))


def test_the_copy_survives_a_new_store_object(tmp_path):
    """A restarted worker keeps the copy: its first sync is incremental, not full."""
    project = ProjectTasks(30)
    TaskStore(tmp_path, 1).sync(Source(project), project.task_number)
    project.tick()
    project.annotate(1, "x")
    tasks, info = TaskStore(tmp_path, 1).sync(Source(project), project.task_number)
    assert info == {"mode": "incremental", "read": 2}  # task 1, and task 30 within the overlap
    assert len(tasks) == 30
    # Projects do not share a copy.
    _, other = TaskStore(tmp_path, 2).sync(Source(project), project.task_number)
    assert other["mode"] == "full"
