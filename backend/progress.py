"""What a model version keeps for the project page and the next version's stopping signals.

Two small JSON files beside a version's meta.json, written by the retrain after
`ModelStore.stage` and before `activate` (so they are in place when the version goes live):

* ``queue_preview.json`` (`write_queue_preview`): the next tasks of the queue (the lowest
  scores) with their score, predicted label and the start of their text, and how many
  unlabeled tasks the version predicts per label (the page's "label mix").
* ``stop_set.json`` (`write_stop_set`): the reference the next retrain compares its own
  stop-set predictions with (`model.stopping.version_point` returns it: this version's
  predictions when it is a comparison, else the earlier reference it handed on).

The stopping signals themselves are small and live in meta.json under "stopping"
(`model.stopping.stopping_signals`). Every reader here answers None for a file that is
missing or unreadable (versions trained before it existed): the page then says "not
computed yet".

The retrain, in order (one control; `predicted` per task as label names, `probabilities`
of the unlabeled tasks, `oof` the out-of-fold label of each labeled task or None)::

    previous = store.current_version(project_id)
    now = stopping.stop_set_predictions(task_ids, predicted)
    point, reference = stopping.version_point(labeled, now, read_stop_set(store, project_id, previous),
                                              probabilities[unlabeled], y_labeled, oof,
                                              spacing=batch_size)
    previous_signals = store.read_meta(project_id, previous).get("stopping") if previous else None
    meta["stopping"] = stopping.next_signals(previous_signals, point)
    version = store.stage(project_id, head, meta)
    write_stop_set(store, project_id, version, reference)
    write_queue_preview(store, project_id, version, unlabeled_ids, unlabeled_scores,
                        unlabeled_predicted, texts=unlabeled_texts)
    ... publish, then store.activate(project_id, version)
"""

from __future__ import annotations

import json
import os
import threading
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from backend.model_store import ModelStore

QUEUE_PREVIEW_FILE = "queue_preview.json"
STOP_SET_FILE = "stop_set.json"
PREVIEW_SIZE = 20
TEXT_CHARS = 140  # enough to recognise a task on the page


def write_queue_preview(store: ModelStore, project_id: int, version: str, task_ids: Sequence[int],
                        scores: Sequence[float], labels: Sequence[str],
                        texts: Sequence[str] | None = None, size: int = PREVIEW_SIZE) -> dict:
    """Keep the `size` lowest-scored tasks and the predicted label mix of a version.

    `task_ids`, `scores` (queue score, lower = label sooner), `labels` (the predicted label)
    and optionally `texts` are per **unlabeled** task of the project, in any order. Returns
    what was written.
    """
    n = len(task_ids)
    if len(scores) != n or len(labels) != n or (texts is not None and len(texts) != n):
        raise ValueError(f"write_queue_preview needs one score, label (and text) per task: "
                         f"{n} tasks, {len(scores)} scores, {len(labels)} labels")
    order = np.argsort(np.asarray(scores, dtype=np.float64), kind="stable")[:size]
    preview = {
        "model_version": version,
        "pool": n,
        "next": [{"task_id": int(task_ids[i]), "score": float(scores[i]), "predicted": str(labels[i]),
                  **({"text": _snippet(texts[i])} if texts is not None else {})}
                 for i in order],
        "predicted_counts": dict(Counter(str(label) for label in labels)),
    }
    _write_json(store, project_id, version, QUEUE_PREVIEW_FILE, preview)
    return preview


def read_queue_preview(store: ModelStore, project_id: int, version: str | None) -> dict | None:
    """A version's queue preview, or None when it has none."""
    return _read_json(store, project_id, version, QUEUE_PREVIEW_FILE)


def write_stop_set(store: ModelStore, project_id: int, version: str, reference: dict) -> None:
    """Keep the stop-set reference a version hands on (the second value `version_point` returns)."""
    if not {"task_ids", "predicted", "labeled"} <= set(reference):
        raise ValueError("write_stop_set takes the reference model.stopping.version_point returns")
    _write_json(store, project_id, version, STOP_SET_FILE, reference)


def read_stop_set(store: ModelStore, project_id: int, version: str | None) -> dict | None:
    """The stop-set reference of a version, or None (no version yet, or one trained before
    they were kept: the next version then restarts the window of the criterion)."""
    return _read_json(store, project_id, version, STOP_SET_FILE)


def _snippet(text) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= TEXT_CHARS else text[: TEXT_CHARS - 1].rstrip() + "…"


def _version_dir(store: ModelStore, project_id: int, version: str) -> Path:
    directory = store.project_dir(project_id) / version
    if not directory.is_dir():
        raise FileNotFoundError(f"model version {version} of project {project_id} does not exist: "
                                f"stage it (ModelStore.stage) before writing its files")
    return directory


def _write_json(store: ModelStore, project_id: int, version: str, name: str, data: dict) -> None:
    # Written whole under a temporary name and renamed, as everything in the store: the
    # page reading it at the same moment sees the old file or the new one.
    directory = _version_dir(store, project_id, version)
    tmp = directory / f".{name}.{os.getpid()}.{threading.get_ident()}"
    tmp.write_text(json.dumps(data))
    os.replace(tmp, directory / name)


def _read_json(store: ModelStore, project_id: int, version: str | None, name: str) -> dict | None:
    if not version:
        return None
    try:
        data = json.loads((store.project_dir(project_id) / version / name).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
