"""One head per classification control, over one shared encoder (hard parameter sharing).

A Label Studio project may ask several questions per task (several `<Choices>`), each
single-choice or multi-label, each about one or more text fields. The model is the
multi-task one: every text field is encoded once by the shared encoder, and each control
gets its own small head (`model.classifier.ClassifierHead` for single-choice,
`MultiLabelHead` for multi-label) on the concatenated vectors of the fields it names. A
head trains only on the tasks whose annotation answers its control, so conditional
questions and partly answered tasks cost nothing.

Targets, per control, as plain arrays (`encode_targets`): single-choice, the label index
per task and -1 where unanswered; multi-label, a 0/1 matrix (n, n_choices) with rows of -1
where unanswered.

`ControlHeads.out_of_fold` is the retrain's **one out-of-fold pass**: each head is refitted
on k-1 folds of the tasks that answer its control and describes the held-out fold. Its
result (`OutOfFold`) sets the multi-label thresholds and is reused by the mislabeling score
and the orderings that mark labeled tasks Correct/Incorrect (`model.orderings.transfer`).

All heads of a model version are saved together: one safetensors file and one JSON file.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from model.classifier import ClassifierHead, HeadConfig, MultiLabelHead, choose_thresholds

HEADS_WEIGHTS_FILE = "heads.safetensors"
HEADS_CONFIG_FILE = "heads.json"


@dataclass
class ControlSpec:
    """What the model needs to know about one control (no Label Studio objects here)."""

    name: str  # the <Choices name="...">
    labels: list[str]  # its choices, in config order
    multi_label: bool = False
    inputs: list[str] = field(default_factory=list)  # text objects whose vectors it reads, in order


def concat_inputs(object_features: dict[str, np.ndarray], names: list[str]) -> np.ndarray:
    """The vectors of the named objects side by side, (n, len(names) * dim): a head on several
    fields sees which field said what."""
    if not names:
        raise ValueError("a control needs at least one input object")
    if len(names) == 1:
        return np.asarray(object_features[names[0]])
    return np.concatenate([np.asarray(object_features[name]) for name in names], axis=1)


def encode_targets(spec: ControlSpec, answers: list) -> np.ndarray:
    """One control's answers (a choice / a set of choices / None per task) as its target array."""
    index = {label: i for i, label in enumerate(spec.labels)}
    if not spec.multi_label:
        return np.array([index[a] if a is not None else -1 for a in answers], dtype=np.int64)
    targets = np.full((len(answers), len(spec.labels)), -1, dtype=np.int8)
    for row, answer in enumerate(answers):
        if answer is not None:
            targets[row] = 0
            targets[row, [index[a] for a in answer]] = 1
    return targets


def answered(targets: np.ndarray) -> np.ndarray:
    """Which tasks answer the control (bool per row of its target array)."""
    targets = np.asarray(targets)
    return targets >= 0 if targets.ndim == 1 else (targets >= 0).all(axis=1)


def labeled_tasks(targets: list[np.ndarray]) -> np.ndarray:
    """The tasks that answer at least one control, ascending: the labeled set of a retrain."""
    rows = np.zeros(len(targets[0]), dtype=bool)
    for t in targets:
        rows |= answered(t)
    return np.flatnonzero(rows)


def new_head(spec: ControlSpec, input_dim: int, device: str = "cpu", **settings):
    """An untrained head of the right kind for `spec` (settings: HeadConfig fields)."""
    config = HeadConfig(labels=list(spec.labels), input_dim=int(input_dim), **settings)
    return (MultiLabelHead if spec.multi_label else ClassifierHead)(config, device=device)


def fresh_copy(head):
    """An untrained copy of a head (same class, settings and seed; a fitted linear head's
    copy keeps the C it chose)."""
    if hasattr(head, "fresh_copy"):
        return head.fresh_copy()
    return type(head)(head.config, device=getattr(head, "device", "cpu"))


@dataclass
class OutOfFold:
    """Out-of-fold outputs of every head on the tasks given to `ControlHeads.out_of_fold`.

    Per control: `probabilities` (n, n_choices) and `hidden` (n, hidden_dim), from a fold
    head that did not train on the task; for a task that does not answer the control, from
    the final head, which never trained on it either. `scored` is True where the task
    answers the control (those rows can be compared with the human answer).
    """

    probabilities: list[np.ndarray]
    hidden: list[np.ndarray]
    scored: list[np.ndarray]
    folds: int
    seed: int


def _splitter(labels_for_split: np.ndarray, folds: int, seed: int):
    from sklearn.model_selection import KFold, StratifiedKFold

    counts = np.bincount(labels_for_split)
    counts = counts[counts > 0]
    if counts.max() >= folds:
        return StratifiedKFold(folds, shuffle=True, random_state=seed)
    return KFold(folds, shuffle=True, random_state=seed)


def out_of_fold_head(head, features: np.ndarray, targets: np.ndarray, folds: int, seed: int):
    """Out-of-fold (probabilities, hidden) of one head over the rows that answer it.

    Each fold trains a fresh copy of `head` on the other folds. Stratified (single-choice:
    by label; multi-label: by the most frequent chosen choice) and seeded, so every run
    marks the same tasks. Needs at least two rows.
    """
    targets = np.asarray(targets)
    n = len(targets)
    folds = int(max(2, min(folds, n)))
    if targets.ndim == 1:
        strata = targets.astype(np.int64)
    else:
        # Most common chosen choice of the row (or "none"): keeps rare choices in every fold.
        frequency = targets.sum(axis=0)
        strata = np.where(targets.any(axis=1), np.argmax(targets * (frequency + 1)[None, :], axis=1), -1) + 1
    splitter = _splitter(strata, folds, seed)
    probabilities = hidden = None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class")
        for train, held_out in splitter.split(np.zeros(n), strata):
            model = fresh_copy(head).fit(features[train], targets[train])
            fold_probabilities = model.predict_proba(features[held_out])
            fold_hidden = model.hidden(features[held_out])
            if probabilities is None:
                probabilities = np.zeros((n, fold_probabilities.shape[1]), dtype=np.float64)
                hidden = np.zeros((n, fold_hidden.shape[1]), dtype=np.float32)
            probabilities[held_out] = fold_probabilities
            hidden[held_out] = fold_hidden
    return probabilities, hidden


class ControlHeads:
    """The heads of one model version: `specs[i]` is answered by `heads[i]`.

    Every method takes and returns one array per control, in `specs` order: `features[i]`
    is control i's input (`concat_inputs` of its objects), `targets[i]` its target array.
    """

    def __init__(self, specs: list[ControlSpec], heads: list):
        if len(specs) != len(heads) or not specs:
            raise ValueError("one head per control, and at least one control")
        self.specs = list(specs)
        self.heads = list(heads)

    @classmethod
    def build(cls, specs: list[ControlSpec], input_dims: list[int], device: str = "cpu",
              **settings) -> ControlHeads:
        """Untrained heads for `specs` (settings: HeadConfig fields shared by all heads)."""
        return cls(specs, [new_head(s, d, device=device, **settings) for s, d in zip(specs, input_dims)])

    @classmethod
    def single(cls, head: ClassifierHead, name: str = "label") -> ControlHeads:
        """One single-choice control around an existing head (the single-control callers)."""
        return cls([ControlSpec(name=name, labels=list(head.labels))], [head])

    def __len__(self) -> int:
        return len(self.heads)

    @property
    def names(self) -> list[str]:
        return [spec.name for spec in self.specs]

    def fit(self, features: list[np.ndarray], targets: list[np.ndarray]) -> ControlHeads:
        """Train each head on the tasks that answer its control (a head with none stays
        untrained). A head whose C is chosen with the pool's importance weights
        (`HeadConfig.c_weighting="pool"`) also gets the tasks that do not answer it."""
        for head, x, t in zip(self.heads, features, targets):
            rows = answered(t)
            if rows.any():
                x = np.asarray(x)
                if getattr(getattr(head, "config", None), "c_weighting", "uniform") != "uniform":
                    head.fit(x[rows], np.asarray(t)[rows], pool=x[~rows])
                else:
                    head.fit(x[rows], np.asarray(t)[rows])
        return self

    def predict_proba(self, features: list[np.ndarray]) -> list[np.ndarray]:
        return [head.predict_proba(x) for head, x in zip(self.heads, features)]

    def hidden(self, features: list[np.ndarray]) -> list[np.ndarray]:
        return [head.hidden(x) for head, x in zip(self.heads, features)]

    def predict(self, probabilities: list[np.ndarray]) -> list[np.ndarray]:
        """Per control: the label index per task (single-choice) or the chosen choices (bool
        matrix, at least one per task; multi-label), from `predict_proba`'s output."""
        return [head.predict(p) for head, p in zip(self.heads, probabilities)]

    def answers(self, probabilities: list[np.ndarray]) -> list[dict]:
        """Per task, control name -> predicted answer (a label; a list of labels for
        multi-label), the form `LabelConfig.results_for` takes."""
        n = len(probabilities[0]) if probabilities else 0
        rows: list[dict] = [{} for _ in range(n)]
        for spec, predicted in zip(self.specs, self.predict(probabilities)):
            for i in range(n):
                if spec.multi_label:
                    rows[i][spec.name] = [spec.labels[j] for j in np.flatnonzero(predicted[i])]
                else:
                    rows[i][spec.name] = spec.labels[int(predicted[i])]
        return rows

    def confidence(self, probabilities: list[np.ndarray]) -> np.ndarray:
        """The model's confidence in its whole prediction, per task: the lowest over the
        controls of each head's confidence (single-choice: p_max; multi-label: the least
        certain choice's max(p, 1 - p)). With one single-choice control: p_max."""
        per_head = []
        for spec, p in zip(self.specs, probabilities):
            p = np.asarray(p, dtype=np.float64)
            per_head.append(np.maximum(p, 1 - p).min(axis=1) if spec.multi_label else p.max(axis=1))
        return np.min(per_head, axis=0)

    def out_of_fold(self, features: list[np.ndarray], targets: list[np.ndarray], folds: int = 5,
                    seed: int = 0) -> OutOfFold:
        """The retrain's one out-of-fold pass over the given tasks (usually the labeled ones)."""
        probabilities, hidden, scored = [], [], []
        for head, x, t in zip(self.heads, features, targets):
            x = np.asarray(x, dtype=np.float32)
            t = np.asarray(t)
            rows = answered(t)
            p = np.asarray(head.predict_proba(x), dtype=np.float64)
            h = np.asarray(head.hidden(x), dtype=np.float32)
            is_scored = np.zeros(len(t), dtype=bool)
            if rows.sum() >= 2:
                fold_p, fold_h = out_of_fold_head(head, x[rows], t[rows], folds, seed)
                p[rows], h[rows] = fold_p, fold_h
                is_scored = rows
            probabilities.append(p)
            hidden.append(h)
            scored.append(is_scored)
        return OutOfFold(probabilities, hidden, scored, folds=int(folds), seed=int(seed))

    def set_thresholds(self, out_of_fold: OutOfFold, targets: list[np.ndarray]) -> None:
        """Each multi-label head's per-choice thresholds, from out-of-fold probabilities, by its
        `threshold_objective`."""
        for head, p, rows, t in zip(self.heads, out_of_fold.probabilities, out_of_fold.scored, targets):
            if getattr(head, "multi_label", False):
                objective = getattr(head.config, "threshold_objective", "accuracy")
                head.thresholds_ = choose_thresholds(p[rows], np.asarray(t)[rows], objective=objective) \
                    if rows.any() else np.full(len(head.labels), 0.5)

    # -- storage ---------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """All heads in one safetensors file (tensors "<i>.body.0.weight", ...) and one JSON."""
        from safetensors.torch import save_file

        directory = Path(directory)
        tensors = {f"{i}.{k}": v for i, head in enumerate(self.heads) for k, v in head.tensors().items()}
        save_file(tensors, str(directory / HEADS_WEIGHTS_FILE))
        description = [{"control": asdict(spec), "head": head.config_dict()}
                       for spec, head in zip(self.specs, self.heads)]
        (directory / HEADS_CONFIG_FILE).write_text(json.dumps({"heads": description}, indent=2))

    @classmethod
    def load(cls, directory: str | Path, device: str = "cpu", single_name: str = "label") -> ControlHeads:
        """What `save` wrote. A version saved as one `ClassifierHead` (before several
        controls) loads as one control called `single_name` (pass the label config's
        `from_name`, which that version's files do not record)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / HEADS_CONFIG_FILE).exists():
            return cls.single(ClassifierHead.load(directory, device=device), name=single_name)
        description = json.loads((directory / HEADS_CONFIG_FILE).read_text())["heads"]
        tensors = load_file(str(directory / HEADS_WEIGHTS_FILE), device=device)
        specs, heads = [], []
        for i, entry in enumerate(description):
            spec = ControlSpec(**entry["control"])
            head = (MultiLabelHead if spec.multi_label else ClassifierHead).from_config_dict(
                entry["head"], device=device)
            prefix = f"{i}."
            head.load_tensors({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
            specs.append(spec)
            heads.append(head)
        return cls(specs, heads)


def train_heads(specs: list[ControlSpec], features: list[np.ndarray], targets: list[np.ndarray],
                labeled: np.ndarray, folds: int = 5, seed: int = 0, device: str = "cpu",
                **settings) -> tuple[ControlHeads, OutOfFold]:
    """The model step of a retrain: train one head per control and run the one out-of-fold
    pass over the `labeled` tasks (indices), which also sets the multi-label thresholds.

    Returns the heads and the `OutOfFold` of the labeled tasks, for `queue_scores_multi`.
    """
    labeled = np.asarray(labeled, dtype=np.int64)
    heads = ControlHeads.build(specs, [np.asarray(x).shape[1] for x in features], device=device,
                               seed=seed, **settings)
    heads.fit(features, targets)
    labeled_features = [np.asarray(x)[labeled] for x in features]
    labeled_targets = [np.asarray(t)[labeled] for t in targets]
    oof = heads.out_of_fold(labeled_features, labeled_targets, folds=folds, seed=seed)
    heads.set_thresholds(oof, labeled_targets)
    return heads, oof
