"""From Label Studio tasks to training examples: per task, the text of each object the config
reads and the answer to each control, from the task's newest annotation.

The newest non-cancelled annotation that answers at least one learnable control is the
task's truth; a control it leaves unanswered (a conditional question that was hidden, or one
the annotator skipped) is None for that task, and its head does not train on it. With one
control this is the newest annotation that chose one of its values, as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from backend.label_config import LabelConfig
from model.heads import ControlSpec, encode_targets


class MissingTextField(ValueError):
    """A task has no value for the data field the label config reads."""


def field_text(task: dict, data_key: str) -> str:
    """The task's `data[data_key]` as a string a tokenizer accepts."""
    data = task.get("data") if isinstance(task, dict) else None
    if not isinstance(data, dict) or data_key not in data:
        task_id = task.get("id") if isinstance(task, dict) else None
        raise MissingTextField(
            f"task {str(task_id)[:40]} has no data field '{data_key}' "
            f"(the label config reads ${data_key})"
        )
    value = data[data_key]
    text = value if isinstance(value, str) else str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # JSON may carry lone surrogates ("\ud800"), which no tokenizer accepts.
        text = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return text


def task_text(task: dict, config: LabelConfig) -> str:
    """The text of the first control's first object (the single-control view)."""
    return field_text(task, config.data_key)


def task_texts(task: dict, config: LabelConfig) -> dict[str, str]:
    """Object name -> text, for every object a learnable control reads (an `<Image>`'s: the
    URL or path of the task's image). A task without its image field gets "" there: a
    missing image is that task's error when images are fetched, not the whole project's."""
    return {obj.name: image_value(task, obj.data_key) if obj.is_image else field_text(task, obj.data_key)
            for obj in config.objects}


def image_value(task: dict, data_key: str) -> str:
    """The task's image reference (`data[data_key]`), or "" when it has none."""
    data = task.get("data") if isinstance(task, dict) else None
    value = data.get(data_key) if isinstance(data, dict) else None
    return value if isinstance(value, str) else ("" if value is None else str(value))


def _annotation_order(annotation: dict) -> tuple:
    # ISO timestamps compare correctly as strings; the id breaks ties.
    return (
        str(annotation.get("updated_at") or annotation.get("created_at") or ""),
        annotation.get("id") or 0,
    )


def _newest_first(task: dict) -> list[dict]:
    candidates = [
        a for a in task.get("annotations") or []
        if isinstance(a, dict) and not a.get("was_cancelled")
    ]
    return sorted(candidates, key=_annotation_order, reverse=True)


def latest_answers(task: dict, config: LabelConfig) -> dict:
    """Control name -> answer from the newest annotation that answers any control (a choice;
    a frozenset of choices for multi-label; None where unanswered). All None: unlabeled."""
    for annotation in _newest_first(task):
        answers = config.answers_in(annotation.get("result") or [])
        if any(answer is not None for answer in answers.values()):
            return answers
    return {control.name: None for control in config.controls}


def latest_label(task: dict, config: LabelConfig):
    """The first control's answer in the task's newest annotation that answers it, or None."""
    for annotation in _newest_first(task):
        choice = config.choice_of(annotation.get("result") or [])
        if choice is not None:
            return choice
    return None


@dataclass
class ProjectData:
    task_ids: list[int]
    texts: list[str]  # the first control's first object (the single-control view)
    labels: list  # the first control's answer per task; None: unanswered
    # Object name -> one text per task, for every object a learnable control reads.
    object_texts: dict[str, list[str]] | None = None
    # Per task, control name -> answer (None: unanswered), from one annotation.
    answers: list[dict] | None = None
    # Per task: it holds a submitted (not cancelled) annotation, whatever it answers.
    submitted: list[bool] | None = None

    @property
    def labeled_index(self) -> list[int]:
        """Tasks whose newest annotation answers at least one learnable control."""
        if self.answers is None:
            return [i for i, label in enumerate(self.labels) if label is not None]
        return [i for i, row in enumerate(self.answers) if any(a is not None for a in row.values())]

    @property
    def done_unanswered_index(self) -> list[int]:
        """Tasks Label Studio counts as done (a submitted annotation) whose annotations answer
        no learnable control, e.g. `result: []` after a pre-filled choice was clicked off."""
        labeled = set(self.labeled_index)
        return [i for i, done in enumerate(self.submitted or []) if done and i not in labeled]

    def subset(self, rows: list[int]) -> ProjectData:
        """The same project limited to the tasks at `rows` (e.g. those whose image could be read)."""
        pick = lambda values: None if values is None else [values[i] for i in rows]  # noqa: E731
        return ProjectData(
            task_ids=pick(self.task_ids), texts=pick(self.texts), labels=pick(self.labels),
            object_texts=None if self.object_texts is None else {k: pick(v) for k, v in self.object_texts.items()},
            answers=pick(self.answers), submitted=pick(self.submitted))

    def answered_index(self, control: str) -> list[int]:
        """Tasks whose annotation answers `control`: the ones its head trains on."""
        return [i for i, row in enumerate(self.answers or []) if row.get(control) is not None]


def project_data(tasks: list[dict], config: LabelConfig) -> ProjectData:
    """Texts and answers of every task, in the order given."""
    ids, texts, labels, answers, submitted = [], [], [], [], []
    object_texts: dict[str, list[str]] = {obj.name: [] for obj in config.objects}
    for task in tasks:
        ids.append(int(task["id"]))
        by_object = task_texts(task, config)
        for name, text in by_object.items():
            object_texts[name].append(text)
        texts.append(by_object[config.primary.to_names[0]])
        row = latest_answers(task, config)
        answers.append(row)
        labels.append(row[config.from_name])
        submitted.append(bool(_newest_first(task)))
    return ProjectData(ids, texts, labels, object_texts, answers, submitted)


def control_specs(config: LabelConfig) -> list[ControlSpec]:
    """The model's view of the learnable controls: one head each, in config order."""
    return [ControlSpec(name=c.name, labels=list(c.choices), multi_label=c.multi_label,
                        inputs=list(c.to_names)) for c in config.controls]


def control_targets(data: ProjectData, config: LabelConfig) -> list[np.ndarray]:
    """Per control, its target array over every task (`model.heads.encode_targets`)."""
    return [encode_targets(spec, [row[spec.name] for row in data.answers or []])
            for spec in control_specs(config)]
