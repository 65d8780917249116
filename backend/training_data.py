"""From Label Studio tasks to training examples: one label per task, the newest annotation wins."""

from __future__ import annotations

from dataclasses import dataclass

from backend.label_config import LabelConfig


class MissingTextField(ValueError):
    """A task has no value for the data field the label config reads."""


def task_text(task: dict, config: LabelConfig) -> str:
    data = task.get("data") if isinstance(task, dict) else None
    if not isinstance(data, dict) or config.data_key not in data:
        task_id = task.get("id") if isinstance(task, dict) else None
        raise MissingTextField(
            f"task {str(task_id)[:40]} has no data field '{config.data_key}' "
            f"(the label config reads ${config.data_key})"
        )
    value = data[config.data_key]
    text = value if isinstance(value, str) else str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # JSON may carry lone surrogates ("\ud800"), which no tokenizer accepts.
        text = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return text


def _annotation_order(annotation: dict) -> tuple:
    # ISO timestamps compare correctly as strings; the id breaks ties.
    return (
        str(annotation.get("updated_at") or annotation.get("created_at") or ""),
        annotation.get("id") or 0,
    )


def latest_label(task: dict, config: LabelConfig) -> str | None:
    """The choice of the task's newest non-cancelled annotation, or None."""
    candidates = [
        a for a in task.get("annotations") or []
        if isinstance(a, dict) and not a.get("was_cancelled")
    ]
    for annotation in sorted(candidates, key=_annotation_order, reverse=True):
        choice = config.choice_of(annotation.get("result") or [])
        if choice is not None:
            return choice
    return None


@dataclass
class ProjectData:
    task_ids: list[int]
    texts: list[str]
    labels: list[str | None]  # None: unlabeled

    @property
    def labeled_index(self) -> list[int]:
        return [i for i, label in enumerate(self.labels) if label is not None]


def project_data(tasks: list[dict], config: LabelConfig) -> ProjectData:
    ids, texts, labels = [], [], []
    for task in tasks:
        ids.append(int(task["id"]))
        texts.append(task_text(task, config))
        labels.append(latest_label(task, config))
    return ProjectData(ids, texts, labels)
