"""A local copy of each project's tasks, kept in sync with Label Studio incrementally.

Reading every task with its annotations from Label Studio costs tens of seconds for 10,000
tasks (its serializer also returns every prediction of every model version). A retrain after
one annotation only needs what changed: Label Studio moves a task's `updated_at` when one
of its annotations is created, updated or deleted, so each sync asks only for tasks updated
since the newest `updated_at` seen. Predictions imported in bulk leave `updated_at` alone;
one created through the single-prediction API (a disputed label's, see backend.publish)
moves it, so those few labeled tasks are read again at the next sync. Deleted tasks are
noticed by the project's task count and trigger a cheap id listing.

One SQLite file per project under DATA_DIR/projects/<id>/; only the retraining job (which
holds the project's training lock) writes it.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from datetime import datetime, timedelta
from pathlib import Path

log = logging.getLogger(__name__)

# Overlap between syncs: tasks updated within this margin of the last sync are read again
# (upserts make that harmless), so equal or slightly skewed timestamps are never missed.
OVERLAP = timedelta(seconds=2)


def _shift(timestamp: str, delta: timedelta) -> str:
    moment = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    return (moment + delta).isoformat().replace("+00:00", "Z")


class TaskStore:
    def __init__(self, data_dir: Path, project_id: int):
        directory = Path(data_dir) / "projects" / str(int(project_id))
        directory.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(directory / "tasks.sqlite3", timeout=30, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS tasks (id INTEGER PRIMARY KEY, task TEXT NOT NULL)")
        self.db.execute("CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT)")

    def _get(self, name: str) -> str | None:
        row = self.db.execute("SELECT value FROM state WHERE key = ?", [name]).fetchone()
        return row[0] if row else None

    def _save(self, tasks: list[dict], synced_until: str | None, replace_all: bool) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            if replace_all:
                self.db.execute("DELETE FROM tasks")
            self.db.executemany(
                "INSERT OR REPLACE INTO tasks (id, task) VALUES (?, ?)",
                [(int(t["id"]), json.dumps(_slim(t))) for t in tasks],
            )
            if synced_until:
                self.db.execute("INSERT OR REPLACE INTO state VALUES ('synced_until', ?)", [synced_until])
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM tasks").fetchone()[0]

    def all(self) -> list[dict]:
        return [json.loads(row[0]) for row in self.db.execute("SELECT task FROM tasks ORDER BY id")]

    def sync(self, ls, task_number: int | None, progress=None) -> tuple[list[dict], dict]:
        """Bring the copy up to date; returns (all tasks, what was read)."""
        since = self._get("synced_until")
        if since is None:
            tasks = ls.tasks(progress=progress)
            self._save(tasks, _newest(tasks, None), replace_all=True)
            return self.all(), {"mode": "full", "read": len(tasks)}
        changed = ls.tasks(progress=progress, updated_after=_shift(since, -OVERLAP))
        self._save(changed, _newest(changed, since), replace_all=False)
        info = {"mode": "incremental", "read": len(changed)}
        if task_number is not None and self.count() != task_number:
            # Tasks were deleted (or a sync was missed): drop ids Label Studio no longer has,
            # and fall back to a full read if the counts still disagree.
            live = set(ls.task_ids())
            stale = [i for (i,) in self.db.execute("SELECT id FROM tasks") if i not in live]
            self.db.executemany("DELETE FROM tasks WHERE id = ?", [(i,) for i in stale])
            info["deleted"] = len(stale)
            if self.count() != len(live):
                tasks = ls.tasks(progress=progress)
                self._save(tasks, _newest(tasks, None), replace_all=True)
                info.update(mode="full (counts disagreed)", read=len(tasks))
        return self.all(), info


def _slim(task: dict) -> dict:
    """Keep what training needs; drop predictions and the rest."""
    return {
        "id": task["id"],
        "data": task.get("data") or {},
        "annotations": [
            {k: a.get(k) for k in ("id", "result", "was_cancelled", "created_at", "updated_at")}
            for a in task.get("annotations") or [] if isinstance(a, dict)
        ],
        "updated_at": task.get("updated_at"),
    }


def _newest(tasks: list[dict], current: str | None) -> str | None:
    stamps = [str(t["updated_at"]) for t in tasks if t.get("updated_at")]
    if current:
        stamps.append(current)
    if not stamps:
        return current
    return max(stamps, key=lambda s: datetime.fromisoformat(s.replace("Z", "+00:00")))
