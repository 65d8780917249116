"""One retrain on the model side: a project's texts and labels in, trained heads and queue scores out.

This is the part of `fit` that a Label Studio user would call "the model": encode the
project's texts (through the encoding cache), train a classifier head on the labeled tasks
(optionally fine-tuning the top encoder layers with it), and score every task for the
labeling queue (`model.queue_scores`). It knows nothing of Label Studio, Redis or HTTP: the
backend reads the project, hands it over as `ProjectExamples`, and turns the
`TrainingResult` into predictions and a model version (`backend/ml_backend.py`,
`backend/publish.py`).

Image objects come in already encoded (`ObjectVectors`: the backend fetches and encodes
task images through `backend.images` with `model.image_encoder`), so the same heads and
orderings run over image vectors, text vectors, or both side by side.

The types are keyed by the name of the classification control (Label Studio's
`<Choices name="...">`): a project with several controls gets one head per control over
the one shared encoder (`model.heads`), each trained on the tasks that answer it, and one
queue ordering over all heads (`model.queue_scores.queue_scores_multi`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model.classifier import RETRAIN_HEAD_KIND
from model.encoding_cache import EncodingCache, encode_with_cache
from model.heads import (
    ControlHeads,
    ControlSpec,
    OutOfFold,
    answered,
    concat_inputs,
    encode_targets,
    labeled_tasks,
    train_heads,
)
from model.orderings import DEFAULT_ORDERING, get_ordering
from model.orderings.base import HeadView, decision_probabilities, jsonable
from model.queue_scores import disagreement, out_of_fold_folds, queue_scores_multi

# (stage, done, total): what a job shows as its progress.
Progress = Callable[[str, int, int], None]


def no_progress(stage: str, done: int, total: int) -> None:
    """A `Progress` that reports nothing."""


@dataclass(frozen=True)
class ControlLabels:
    """The answers to one classification control, one entry per task of the project.

    Single-choice: per task the chosen label or None. Multi-label (`multi_label=True`): per
    task the set (any iterable) of chosen labels, or None where the task does not answer.
    `inputs`: the text objects the control reads (`ProjectExamples.object_texts` keys); empty
    means the project's first object (`ProjectExamples.texts`).
    """

    choices: tuple[str, ...]  # the control's labels, in the label config's order
    labels: list  # per task: the answer its annotation gives, None if none answers
    multi_label: bool = False
    inputs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        given: set = set()
        for label in self.labels:
            if label is None:
                continue
            if self.multi_label and not isinstance(label, str):
                given.update(label)
            else:
                given.add(label)
        unknown = sorted(map(str, given - set(self.choices)))
        if unknown:
            raise ValueError(f"labels {unknown} are not among the control's choices {list(self.choices)}")

    @property
    def labeled_index(self) -> list[int]:
        """Positions of the tasks that answer this control."""
        return [i for i, label in enumerate(self.labels) if label is not None]

    def spec(self, name: str, inputs: list[str]) -> ControlSpec:
        return ControlSpec(name=name, labels=list(self.choices), multi_label=self.multi_label,
                           inputs=list(inputs))


@dataclass(frozen=True)
class ObjectVectors:
    """One object's vectors, computed before training (an `<Image>`: the image encoder's).

    `features` (n, dim) feed the heads; `all_layers` (n, width), every stage pooled side by
    side, serve the orderings that look at all layers (domain-likeness).
    """

    encoder_id: str  # the encoder that made them (recorded with the model version)
    features: np.ndarray
    all_layers: np.ndarray | None = None


@dataclass(frozen=True)
class ProjectExamples:
    """A project as the model sees it: every task's id and texts, and the labels per control.

    `texts` is the first text object's text per task; `object_texts` (object name -> one text
    per task) holds every object the controls read, when there are several (title + body).
    `object_vectors` (object name -> `ObjectVectors`) gives the vectors of objects that are
    not encoded as text (images); their `object_texts` entry is then only what the task
    shows (the image URL), for previews.
    """

    task_ids: list[int]
    texts: list[str]
    controls: Mapping[str, ControlLabels]  # control name (<Choices name>) -> its labels
    object_texts: Mapping[str, list[str]] | None = None
    object_vectors: Mapping[str, ObjectVectors] | None = None

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.task_ids):
            raise ValueError(f"{len(self.task_ids)} task ids but {len(self.texts)} texts")
        for name, texts in (self.object_texts or {}).items():
            if len(texts) != len(self.task_ids):
                raise ValueError(f"object {name!r} has {len(texts)} texts for {len(self.task_ids)} tasks")
        for name, given in (self.object_vectors or {}).items():
            if name not in self.objects:
                raise ValueError(f"vectors for object {name!r}, which is not among the objects {list(self.objects)}")
            if len(given.features) != len(self.task_ids):
                raise ValueError(f"object {name!r} has {len(given.features)} vectors for {len(self.task_ids)} tasks")
        for name, control in self.controls.items():
            if len(control.labels) != len(self.task_ids):
                raise ValueError(f"control {name!r} has {len(control.labels)} labels for "
                                 f"{len(self.task_ids)} tasks")
            missing = [o for o in control.inputs if o not in self.objects]
            if missing:
                raise ValueError(f"control {name!r} reads objects {missing} the examples do not hold")

    @property
    def objects(self) -> dict[str, list[str]]:
        """Object name -> texts, first object first (one object called "text" when only
        `texts` is given)."""
        return dict(self.object_texts) if self.object_texts else {"text": self.texts}

    @property
    def text_objects(self) -> dict[str, list[str]]:
        """The objects the text encoder reads: every object without given vectors."""
        given = self.object_vectors or {}
        return {name: texts for name, texts in self.objects.items() if name not in given}

    def inputs_of(self, control: ControlLabels) -> list[str]:
        """The objects a control reads (its own, else the first object)."""
        return list(control.inputs) or [next(iter(self.objects))]

    @property
    def labeled(self) -> int:
        """Tasks that answer at least one control."""
        return sum(1 for i in range(len(self.task_ids))
                   if any(c.labels[i] is not None for c in self.controls.values()))


@dataclass(frozen=True)
class OrderingChoice:
    """Which ordering builds the queue, its batch size and parameters (`model.orderings`)."""

    ordering: str = DEFAULT_ORDERING
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

    head: object  # model.classifier.ClassifierHead, or MultiLabelHead for a multi-label control
    # Per task: the label the head predicts (multi-label: the list of chosen labels); None
    # for every task when no task answers the control yet (its head is untrained).
    predicted: list
    mislabeling: np.ndarray  # per task, 0..1: how strongly an out-of-fold head disputes its label
    labeled: int  # tasks it was trained on
    label_counts: dict[str, int]  # training examples per label (multi-label: per choice chosen)
    training_accuracy: float  # on its own training examples (multi-label: exact-match)


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
    # Every head together, as a model version stores them (`ControlHeads.save`).
    control_heads: ControlHeads | None = None
    # Control name -> what its stopping signals need (`ControlStopping`).
    stopping_inputs: dict[str, ControlStopping] = field(default_factory=dict)

    @property
    def mislabeling(self) -> np.ndarray:
        """Per task: the strongest dispute of its label over all controls."""
        return np.max([h.mislabeling for h in self.heads.values()], axis=0)

    @property
    def mislabeled(self) -> int:
        """Labeled tasks whose label an out-of-fold head disputes."""
        return int((self.mislabeling > 0).sum())

    @property
    def labeled(self) -> int:
        """Tasks that answer at least one control (what the model version was trained on)."""
        return int(self.stopping_inputs[next(iter(self.stopping_inputs))].labeled_any) \
            if self.stopping_inputs else max(h.labeled for h in self.heads.values())

    def answers(self, i: int) -> dict:
        """Control name -> the predicted answer for the task at position i (None: no head)."""
        return {name: head.predicted[i] for name, head in self.heads.items()}

    def stopping(self, previous_signals: Mapping | None, previous_reference: Mapping | None,
                 spacing: int) -> tuple[dict, dict]:
        """(signals, reference) of this version (`model.stopping`): each control's point
        chained on its own history, several controls combined by `combine_controls` (the
        worst control decides). `previous_signals`/`previous_reference`: what the live
        version keeps (meta "stopping", its stop_set.json), or None."""
        from model import stopping

        signals, references = {}, {}
        several = len(self.stopping_inputs) > 1
        for name, inputs in self.stopping_inputs.items():
            if several:
                before = ((previous_signals or {}).get("controls") or {}).get(name)
                reference = ((previous_reference or {}).get("controls") or {}).get(name)
            else:
                # One control keeps the single-control format (no "controls" level).
                before = previous_signals if "history" in (previous_signals or {}) else None
                reference = previous_reference if "controls" not in (previous_reference or {}) else None
            now = stopping.stop_set_predictions(self.task_ids, inputs.predicted)
            point, references[name] = stopping.version_point(
                inputs.labeled, now, reference, inputs.pool_probabilities, inputs.y_true,
                inputs.y_out_of_fold, spacing=max(1, int(spacing)))
            signals[name] = stopping.next_signals(before, point)
        if not several:
            (only,) = signals
            return signals[only], references[only]
        first = references[next(iter(references))]
        # write_stop_set wants one reference at the top: the first control's, with all of them below.
        return stopping.combine_controls(signals), dict(first, controls=references)


@dataclass
class ControlStopping:
    """One control's numbers for `model.stopping.version_point`."""

    labeled: int  # tasks answering the control
    labeled_any: int  # tasks answering any control
    predicted: list  # per task, a hashable prediction (multi-label: the chosen labels joined)
    pool_probabilities: np.ndarray  # decisions on the unlabeled tasks (multi-label: one yes/no per choice)
    y_true: list  # per task answering the control, its answer (hashable)
    y_out_of_fold: list  # and the out-of-fold head's prediction (None where none exists)


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
    tuned_heads: ControlHeads | None = None,
) -> TrainingResult:
    """Train one head per control on the tasks that answer it and score every task for the queue.

    `encoder` is a `model.encoder.Encoder`; `cache` keeps its vectors across retrains, so
    only texts never seen before are encoded (each object's text of each task once; a
    control's head reads its objects' vectors side by side). Objects with
    `examples.object_vectors` (images) are not encoded here; when every object has them,
    `encoder` only names the device the heads train on and the id the result carries (pass
    the `model.image_encoder.ImageEncoder` that made them). `centroids`: the k-means
    centroids of the project's previous scoring under this encoder, if any (see
    `queue_scores.cluster_ids`); the ones used come back in `TrainingResult.centroids` (with
    `fine_tuning` they are ignored: the fine-tuned encoder's vectors live in another space).
    `fine_tuning` trains the top encoder layers with every head (on the sum of their losses)
    and encodes every text again with them (text only: refused with given vectors).
    `tuned_heads`: heads already trained together with a fine-tuned image network
    (`model.finetune.fine_tune_image_heads`) whose vectors `examples.object_vectors` are:
    they are kept, not trained again (as the text fine-tuning keeps its heads), and only
    the out-of-fold pass and the thresholds run here. The retrain's one out-of-fold pass
    (`model.heads.train_heads`) sets the multi-label thresholds and serves the mislabeling
    score, the ordering and the stopping signals.
    Raises ValueError when no task answers any control.
    """
    if not examples.controls:
        raise ValueError("the project has no classification control to train")
    if not examples.labeled:
        names = ", ".join(repr(n) for n in examples.controls)
        raise ValueError(f"no task answers the control(s) {names}: nothing to train on")
    given = dict(examples.object_vectors or {})
    if fine_tuning is not None and given:
        raise ValueError("fine-tuning trains the text encoder only here; objects that come with their own "
                         "vectors (images) are fine-tuned first (model.finetune.fine_tune_image_heads), "
                         "their heads passed as tuned_heads")
    laps = Laps()
    objects = examples.objects
    text_objects = examples.text_objects
    names = list(examples.controls)
    controls = [examples.controls[name] for name in names]
    specs = [c.spec(name, examples.inputs_of(c)) for name, c in zip(names, controls)]
    targets = [encode_targets(spec, c.labels) for spec, c in zip(specs, controls)]
    labeled = labeled_tasks(targets)
    folds = out_of_fold_folds(ordering.ordering, dict(ordering.params))
    encoder_dir = None
    if fine_tuning is not None:
        from model.finetune import fine_tune_heads

        encoder, heads = fine_tune_heads(
            encoder, {name: [texts[i] for i in labeled] for name, texts in objects.items()},
            specs, [t[labeled] for t in targets],
            top_layers=fine_tuning.layers, out_dir=fine_tuning.out_dir,
            cache_id=f"{encoder.id}+ft-{uuid.uuid4().hex[:12]}",
            progress=lambda done, total: progress("fine-tuning the encoder", done, total),
        )
        encoder_dir = fine_tuning.out_dir
        laps.lap("train")
        object_features, encoded = _encode_objects(
            encoder, cache, objects, lambda done, total: progress("encoding with the fine-tuned encoder", done, total))
        laps.lap("encode_fine_tuned")
        # A fine-tuned encoder is new every version: earlier centroids live in another space.
        centroids = None
        head_features = [concat_inputs(object_features, spec.inputs) for spec in specs]
        labeled_targets = [t[labeled] for t in targets]
        oof = heads.out_of_fold([x[labeled] for x in head_features], labeled_targets, folds=folds)
        heads.set_thresholds(oof, labeled_targets)
    else:
        progress("encoding", 0, sum(len(t) for t in text_objects.values()))
        object_features, encoded = _encode_objects(
            encoder, cache, text_objects, lambda done, total: progress("encoding", done, total))
        object_features.update({name: v.features for name, v in given.items()})
        laps.lap("encode")
        progress("training", 0, len(labeled))
        head_features = [concat_inputs(object_features, spec.inputs) for spec in specs]
        if tuned_heads is not None:
            heads = tuned_heads
            labeled_targets = [t[labeled] for t in targets]
            oof = heads.out_of_fold([x[labeled] for x in head_features], labeled_targets, folds=folds)
            heads.set_thresholds(oof, labeled_targets)
        else:
            heads, oof = train_heads(specs, head_features, targets, labeled, folds=folds,
                                     device=encoder.device, kind=RETRAIN_HEAD_KIND)
        laps.lap("train")

    progress("scoring", 0, len(examples.task_ids))
    task_features = concat_inputs(object_features, list(objects))
    all_layers = None
    if get_ordering(ordering.ordering).needs_all_layers:
        progress("encoding all layers", 0, len(examples.task_ids))
        all_layers, _ = _encode_objects(
            encoder, cache, text_objects, lambda done, total: progress("encoding all layers", done, total),
            all_layers=True)
        if given:
            missing = [name for name, v in given.items() if v.all_layers is None]
            if missing:
                raise ValueError(f"ordering {ordering.ordering!r} needs every layer's vectors; "
                                 f"objects {missing} came without all_layers")
            # Image stages have other widths than text layers: each object flattened, side by side.
            all_layers.update({name: v.all_layers for name, v in given.items()})
            all_layers = np.concatenate([all_layers[name].reshape(len(examples.task_ids), -1)
                                         for name in objects], axis=-1)
        else:
            all_layers = np.concatenate([all_layers[name] for name in objects], axis=-1)
    queue = queue_scores_multi(task_features, heads, head_features, targets, ordering=ordering.ordering,
                               batch_size=ordering.batch_size, params=dict(ordering.params),
                               all_layers=all_layers, centroids=centroids, out_of_fold=oof)
    trained, stopping_inputs = {}, {}
    for i, (spec, head) in enumerate(zip(specs, heads.heads)):
        trained[spec.name], stopping_inputs[spec.name] = _describe_head(
            spec, head, i, targets, labeled, queue, oof, heads, head_features[i])
    laps.lap("score")
    return TrainingResult(
        task_ids=list(examples.task_ids), heads=trained, scores=queue.scores, clusters=queue.clusters,
        ordering_info=jsonable(queue.info), centroids=queue.centroids, encoder_id=encoder.id,
        encoder_dir=encoder_dir, encoded=encoded, timings=laps.timings, control_heads=heads,
        stopping_inputs=stopping_inputs,
    )


def _encode_objects(encoder, cache: EncodingCache, objects: Mapping[str, list[str]],
                    progress: Callable[[int, int], None], all_layers: bool = False):
    """Object name -> vectors of its text per task, in one pass over every object's texts
    (a text two objects share, or two tasks, is encoded once). No objects: nothing encoded."""
    names = list(objects)
    if not names:
        return {}, 0
    n = len(objects[names[0]])
    every = [text for name in names for text in objects[name]]
    vectors, encoded = encode_with_cache(encoder, cache, every, progress=progress, all_layers=all_layers)
    if all_layers:
        vectors = vectors.reshape(len(every), encoder.num_layers + 1, encoder.dim)
    return {name: vectors[k * n:(k + 1) * n] for k, name in enumerate(names)}, encoded


def _prediction_key(spec: ControlSpec, value) -> str | None:
    """A hashable form of one prediction or answer (multi-label: the chosen labels, in
    config order, joined), for kappa and out-of-fold accuracy."""
    if value is None:
        return None
    if spec.multi_label:
        chosen = np.flatnonzero(np.asarray(value) == 1) if not isinstance(value, (list, tuple, set, frozenset)) \
            else [spec.labels.index(v) for v in value]
        return " | ".join(spec.labels[j] for j in sorted(chosen))
    return spec.labels[int(value)] if not isinstance(value, str) else value


def _describe_head(spec: ControlSpec, head, i: int, targets: list[np.ndarray], labeled: np.ndarray,
                   queue, oof: OutOfFold, heads: ControlHeads,
                   features: np.ndarray) -> tuple[TrainedHead, ControlStopping]:
    """One control's predictions, dispute score, counts and stopping inputs."""
    t = np.asarray(targets[i])
    rows = answered(t)
    n = len(t)
    predicted_index = queue.predictions[i]
    if spec.multi_label:
        predicted = [[spec.labels[j] for j in np.flatnonzero(row)] for row in predicted_index]
        counts = {label: int((t[rows, j] == 1).sum()) for j, label in enumerate(spec.labels)}
        hits = (predicted_index[rows] == (t[rows] == 1)).all(axis=1)
    else:
        predicted = [spec.labels[int(k)] for k in predicted_index]
        counts = {label: int((t[rows] == j).sum()) for j, label in enumerate(spec.labels)}
        hits = predicted_index[rows] == t[rows]
    keys = [_prediction_key(spec, row) for row in predicted_index]
    if not rows.any():
        predicted = [None] * n  # an untrained head: nothing worth pre-filling
    # This control's share of the dispute score (TrainingResult.mislabeling takes the max).
    mislabeling = np.zeros(n)
    one = ControlHeads([spec], [head])
    one_oof = OutOfFold([oof.probabilities[i]], [oof.hidden[i]], [oof.scored[i]], oof.folds, oof.seed)
    mislabeling[labeled] = disagreement(one, one_oof, [t[labeled]], [np.asarray(features)[labeled]])
    trained = TrainedHead(head=head, predicted=predicted, mislabeling=mislabeling, labeled=int(rows.sum()),
                          label_counts=counts,
                          training_accuracy=float(hits.mean()) if rows.any() else 0.0)
    # Stopping: the pool is the unlabeled tasks; a multi-label head is one yes/no decision per choice.
    unlabeled = np.setdiff1d(np.arange(n), labeled)
    view = HeadView(spec.multi_label, np.asarray(queue.probabilities[i], dtype=np.float64)[unlabeled],
                    getattr(head, "thresholds_", None))
    pool = np.concatenate(decision_probabilities([view])) if spec.multi_label and len(unlabeled) \
        else view.probabilities
    if spec.multi_label and not len(unlabeled):
        pool = np.zeros((0, 2))
    labeled_t = t[labeled]
    scored = oof.scored[i]
    oof_predicted = head.predict(oof.probabilities[i])
    y_true, y_oof = [], []
    for k in range(len(labeled)):
        if answered(labeled_t[k:k + 1])[0]:
            y_true.append(_prediction_key(spec, labeled_t[k]))
            y_oof.append(_prediction_key(spec, oof_predicted[k]) if scored[k] else None)
    inputs = ControlStopping(labeled=int(rows.sum()), labeled_any=len(labeled), predicted=keys,
                             pool_probabilities=pool, y_true=y_true, y_out_of_fold=y_oof)
    return trained, inputs
