"""One retrain on the model side: a project's texts and labels in, trained heads and queue scores out.

This is the part of `fit` that a Label Studio user would call "the model": encode the
project's texts (through the encoding cache), train a classifier head on the labeled tasks
(optionally fine-tuning the top encoder layers with it), and score every task for the
labeling queue (`model.queue_scores`). It knows nothing of Label Studio, Redis or HTTP: the
backend reads the project, hands it over as `ProjectExamples`, and turns the
`TrainingResult` into predictions and a model version (`backend/ml_backend.py`,
`backend/publish.py`).

The types are keyed by the name of the classification control (Label Studio's
`<Choices name="...">`), so a project with several controls can get one head per control,
each trained on the tasks that answer it. Today a project has exactly one control
(`backend/label_config.py` rejects others) and `train_and_score` accepts exactly one.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model.classifier import ClassifierHead, HeadConfig
from model.encoding_cache import EncodingCache, encode_with_cache
from model.orderings import get_ordering
from model.orderings.base import jsonable
from model.queue_scores import queue_scores

# (stage, done, total): what a job shows as its progress.
Progress = Callable[[str, int, int], None]


def no_progress(stage: str, done: int, total: int) -> None:
    """A `Progress` that reports nothing."""


@dataclass(frozen=True)
class ControlLabels:
    """The answers to one classification control, one entry per task of the project."""

    choices: tuple[str, ...]  # the control's labels, in the label config's order
    labels: list[str | None]  # per task: the label its annotation gives, None if none answers

    def __post_init__(self) -> None:
        unknown = sorted({label for label in self.labels if label is not None} - set(self.choices))
        if unknown:
            raise ValueError(f"labels {unknown} are not among the control's choices {list(self.choices)}")

    @property
    def labeled_index(self) -> list[int]:
        """Positions of the tasks that answer this control."""
        return [i for i, label in enumerate(self.labels) if label is not None]


@dataclass(frozen=True)
class ProjectExamples:
    """A project as the model sees it: every task's id and text, and the labels per control."""

    task_ids: list[int]
    texts: list[str]
    controls: Mapping[str, ControlLabels]  # control name (<Choices name>) -> its labels

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.task_ids):
            raise ValueError(f"{len(self.task_ids)} task ids but {len(self.texts)} texts")
        for name, control in self.controls.items():
            if len(control.labels) != len(self.task_ids):
                raise ValueError(f"control {name!r} has {len(control.labels)} labels for "
                                 f"{len(self.task_ids)} tasks")

    @property
    def labeled(self) -> int:
        """Tasks that answer at least one control."""
        return sum(1 for i in range(len(self.task_ids))
                   if any(c.labels[i] is not None for c in self.controls.values()))


@dataclass(frozen=True)
class OrderingChoice:
    """Which ordering builds the queue, its batch size and parameters (`model.orderings`)."""

    ordering: str = "least_confidence"
    batch_size: int = 50
    params: Mapping = field(default_factory=dict)


@dataclass(frozen=True)
class FineTuning:
    """Fine-tune the top `layers` encoder layers with the head (FINE_TUNE_LAYERS > 0)."""

    layers: int
    out_dir: Path  # where the fine-tuned encoder is saved; the caller moves it into the version


@dataclass
class TrainedHead:
    """One control's classifier and what it says about every task."""

    head: ClassifierHead
    predicted: list[str]  # per task: the label the head predicts
    mislabeling: np.ndarray  # per task, 0..1: how strongly an out-of-fold head disputes its label
    labeled: int  # tasks it was trained on
    label_counts: dict[str, int]  # training examples per label
    training_accuracy: float  # on its own training examples


@dataclass
class TrainingResult:
    """What one retrain produced, ready to be stored as a model version and published."""

    task_ids: list[int]  # the tasks, in the order of every per-task array below
    heads: dict[str, TrainedHead]  # control name -> its head
    scores: np.ndarray  # per task: queue score, lower = label sooner, within [0, 1]
    clusters: np.ndarray  # per task: k-means cluster id
    ordering_info: dict  # what the ordering reports (JSON-ready)
    centroids: np.ndarray | None  # the k-means centroids behind `clusters`, to reuse next time
    encoder_id: str  # the encodings' cache key: the base encoder's, or a fine-tuned copy's
    encoder_dir: Path | None  # the fine-tuned encoder, when there is one
    encoded: int  # texts that had to be encoded (not found in the cache)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage

    @property
    def mislabeling(self) -> np.ndarray:
        """Per task: the strongest dispute of its label over all controls."""
        return np.max([h.mislabeling for h in self.heads.values()], axis=0)

    @property
    def mislabeled(self) -> int:
        """Labeled tasks whose label an out-of-fold head disputes."""
        return int((self.mislabeling > 0).sum())


class Laps:
    """Seconds between successive `lap(name)` calls, collected under each name (job timings)."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._clock = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - self._clock, 3)
        self._clock = now

    def include(self, timings: dict[str, float]) -> None:
        """Take over the stages a callee timed itself, up to now."""
        self.timings.update(timings)
        self._clock = time.perf_counter()


def train_and_score(
    examples: ProjectExamples,
    encoder,
    cache: EncodingCache,
    ordering: OrderingChoice,
    fine_tuning: FineTuning | None = None,
    centroids: np.ndarray | None = None,
    progress: Progress = no_progress,
) -> TrainingResult:
    """Train the project's head on its labeled tasks and score every task for the queue.

    `encoder` is a `model.encoder.Encoder`; `cache` keeps its vectors across retrains, so
    only texts never seen before are encoded. `centroids`: the k-means centroids of the
    project's previous scoring under this encoder, if any (see `queue_scores.cluster_ids`);
    the ones used come back in `TrainingResult.centroids` (with `fine_tuning` they are
    ignored: the fine-tuned encoder's vectors live in another space). `fine_tuning` trains
    the top encoder layers with the head and encodes every text again with them.
    Raises ValueError when there is nothing to train on, or more than one control.
    """
    if len(examples.controls) != 1:
        raise ValueError(f"expected exactly one classification control, got {len(examples.controls)}: "
                         f"{sorted(examples.controls)}")
    (name, control), = examples.controls.items()
    labeled = control.labeled_index
    if not labeled:
        raise ValueError(f"no task answers the control {name!r}: nothing to train on")
    laps = Laps()
    texts = examples.texts
    choices = list(control.choices)
    y = np.array([choices.index(control.labels[i]) for i in labeled])
    encoder_dir = None
    if fine_tuning is not None:
        from model.finetune import fine_tune

        encoder, head = fine_tune(
            encoder, [texts[i] for i in labeled], y, choices,
            top_layers=fine_tuning.layers, out_dir=fine_tuning.out_dir,
            cache_id=f"{encoder.id}+ft-{uuid.uuid4().hex[:12]}",
            progress=lambda done, total: progress("fine-tuning the encoder", done, total),
        )
        encoder_dir = fine_tuning.out_dir
        laps.lap("train")
        features, encoded = encode_with_cache(
            encoder, cache, texts,
            progress=lambda done, total: progress("encoding with the fine-tuned encoder", done, total))
        laps.lap("encode_fine_tuned")
        # A fine-tuned encoder is new every version: earlier centroids live in another space.
        centroids = None
    else:
        progress("encoding", 0, len(texts))
        features, encoded = encode_with_cache(
            encoder, cache, texts, progress=lambda done, total: progress("encoding", done, total))
        laps.lap("encode")
        progress("training", 0, len(labeled))
        head = ClassifierHead(HeadConfig(labels=choices, input_dim=features.shape[1]),
                              device=encoder.device).fit(features[labeled], y)
        laps.lap("train")

    progress("scoring", 0, len(texts))
    all_layers = None
    if get_ordering(ordering.ordering).needs_all_layers:
        progress("encoding all layers", 0, len(texts))
        all_layers, _ = encode_with_cache(
            encoder, cache, texts, all_layers=True,
            progress=lambda done, total: progress("encoding all layers", done, total))
    label_index = [choices.index(label) if label is not None else None for label in control.labels]
    queue = queue_scores(features, label_index, head, ordering=ordering.ordering,
                         batch_size=ordering.batch_size, params=dict(ordering.params),
                         all_layers=all_layers, centroids=centroids)
    predicted = queue.predicted
    trained = TrainedHead(
        head=head,
        predicted=[choices[int(i)] for i in predicted],
        mislabeling=queue.mislabeling,
        labeled=len(labeled),
        label_counts={label: int((y == i).sum()) for i, label in enumerate(choices)},
        training_accuracy=float((predicted[labeled] == y).mean()),
    )
    laps.lap("score")
    return TrainingResult(
        task_ids=list(examples.task_ids), heads={name: trained}, scores=queue.scores, clusters=queue.clusters,
        ordering_info=jsonable(queue.info), centroids=queue.centroids, encoder_id=encoder.id,
        encoder_dir=encoder_dir, encoded=encoded, timings=laps.timings,
    )
