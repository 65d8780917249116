"""The queue before the first annotation: cold-start predictions (issue 15, point 3).

When a project's tasks have been encoded (at connection, `/setup`, or after an import,
`TASKS_CREATED`) and it has no model and no annotation yet, the encoding job publishes one
prediction per task under the version `cold-start-<n>` and points the project's
`model_version` at it, so "Label All Tasks" (uncertainty sampling, lowest score first)
serves the order of `model.cold_start` instead of id order:

* the score is the task's rank in the order (scaled into [0, 0.9), as a retrain's
  unlabeled tasks), lowest = served first;
* the result pre-fills each control whose choice names are words with the zero-shot guess
  (multi-label: the one likeliest choice; there is no threshold to learn yet); with no such
  control the predictions carry scores only (an empty result).

Image projects get the same order over their image vectors (the image encoder's, which the
encoding job has just computed and cached), with no guess: a choice name goes through the
text encoder, whose vectors cannot be compared with an image network's. A task whose image
could not be fetched or decoded gets no cold-start prediction (as it gets none from a
retrain); /jobs reports it under `image_errors`.

The order itself is `COLD_START_ORDER` (BENCHMARKS.md, "Issue 15, point 3"). Another import
before the first annotation publishes `cold-start-<n+1>` for every task and deletes the
older cold-start predictions; the first real model version supersedes them all
(`backend.publish.remove_superseded` deletes every cold-start version once it is live).
`/predict` keeps answering nothing until that first model: the cold start lives only in
Label Studio and in `cold_start.json` in the project's model directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable

import numpy as np

from backend.label_config import LabelConfig
from backend.label_studio import LabelStudioProject
from backend.model_store import ModelStore
from backend.settings import Settings
from backend.training_data import ProjectData
from model import cold_start
from model.encoding_cache import EncodingCache, encode_with_cache
from model.queue_scores import LABELED_FLOOR

log = logging.getLogger(__name__)

PREFIX = "cold-start-"
STATE_FILE = "cold_start.json"


def is_cold_start_version(version: str) -> bool:
    """A model version name this module publishes."""
    return version.startswith(PREFIX) and version[len(PREFIX):].isdigit()


def _state(store: ModelStore, project_id: int) -> dict:
    try:
        return json.loads((store.project_dir(project_id) / STATE_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _write_state(store: ModelStore, project_id: int, state: dict) -> None:
    directory = store.project_dir(project_id)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{STATE_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps(state))
    os.replace(tmp, directory / STATE_FILE)


def why_not(settings: Settings, store: ModelStore, project_id: int, data: ProjectData) -> str | None:
    """Why no cold start is published now, or None when it should be."""
    if not settings.cold_start:
        return "COLD_START is off"
    if store.current_version(project_id) is not None:
        return "the project has a model"
    if any(data.submitted or []) or data.labeled_index:
        return "the project has annotations; the retrain orders the queue"
    if not data.task_ids:
        return "the project has no tasks"
    return None


def plan(config: LabelConfig, data: ProjectData, object_vectors: dict[str, np.ndarray],
         name_vectors: dict[str, np.ndarray], order: str, seed: int = 0) -> tuple[np.ndarray, dict]:
    """(rank per task, control name -> guessed choice index per task) for `order`.

    `object_vectors`: each object's vectors (n_tasks, dim), text or image; `name_vectors`: for each
    control whose names are words, its choices' vectors (`cold_start.name_vectors`).
    """
    n = len(data.task_ids)
    names = [obj.name for obj in config.objects]
    features = np.concatenate([cold_start.normalise(object_vectors[name]) for name in names], axis=1)
    guesses = {}
    probabilities = {}
    for control in config.controls:
        if control.name not in name_vectors:
            continue
        # A control reading several fields: the mean direction of its fields' vectors.
        text = sum(cold_start.normalise(object_vectors[name]) for name in control.to_names)
        probabilities[control.name] = cold_start.zero_shot(text, name_vectors[control.name])
        guesses[control.name] = probabilities[control.name].argmax(axis=1)
    # The guess that steers the order: the first control that has one (as the class guard
    # follows the first control).
    steer = next((probabilities[c.name] for c in config.controls if c.name in probabilities), None)
    if order == "random":
        ranking = np.random.default_rng(seed).permutation(n)
    elif order == "zero_shot" and steer is not None:
        ranking = cold_start.zero_shot_order(steer)
    elif order == "zero_shot_kmeans" and steer is not None:
        ranking = cold_start.representative_order(features, seed=seed, guess=steer.argmax(axis=1)).order
    else:  # kmeans, or a zero-shot order with no names to guess from
        ranking = cold_start.representative_order(features, seed=seed).order
    ranks = np.empty(n, dtype=np.int64)
    ranks[ranking] = np.arange(n)
    return ranks, guesses


def guessable(config: LabelConfig) -> list:
    """The controls a zero-shot guess can pre-fill: choice names that are words, read from
    text objects only (an image's vector and a name's text vector are not comparable)."""
    texts = {obj.name for obj in config.text_objects}
    return [c for c in config.controls
            if cold_start.names_are_words(c.choices) and set(c.to_names) <= texts]


def publish(settings: Settings, ls: LabelStudioProject, store: ModelStore, cache: EncodingCache,
            load_encoder: Callable[[], object], config: LabelConfig, data: ProjectData,
            image_vectors: dict[str, np.ndarray] | None = None) -> dict:
    """Publish the cold-start predictions of a project whose tasks are encoded (the caller
    holds the project's training lock and has checked `why_not`). Returns what was done,
    for the encoding job's result.

    `image_vectors`: each `<Image>` object's vectors, one row per task of `data` (the tasks
    whose images could be used). `load_encoder` gives the text encoder, asked for only
    when there are texts or choice names to encode (an image project does not load it)."""
    from backend.publish import first_sampling, remove_superseded

    ids_hash = hashlib.sha256(json.dumps(sorted(data.task_ids)).encode()).hexdigest()[:16]
    previous = _state(store, ls.project_id)
    if previous.get("tasks_hash") == ids_hash and previous.get("order") == settings.cold_start_order:
        return {"skipped": "already published for these tasks", "model_version": previous.get("model_version")}
    started = time.perf_counter()
    images = {obj.name for obj in config.image_objects}
    object_texts = data.object_texts or {config.objects[0].name: data.texts}
    object_vectors = dict(image_vectors or {})
    if images - set(object_vectors):
        raise ValueError(f"no vectors for the image objects {sorted(images - set(object_vectors))}")
    worded = guessable(config)
    texts = {name: t for name, t in object_texts.items() if name not in images}
    encoder = load_encoder() if texts or worded else None
    for name, object_text in texts.items():
        object_vectors[name] = encode_with_cache(encoder, cache, object_text)[0]
    name_vectors = {}
    for control in worded:
        encoded, _ = encode_with_cache(encoder, cache, cold_start.sentences_for(control.choices))
        name_vectors[control.name] = cold_start.name_vectors(encoded, len(control.choices))
    ranks, guesses = plan(config, data, object_vectors, name_vectors, settings.cold_start_order,
                         seed=ls.project_id)
    # The tasks were read before they were encoded; an annotation made meanwhile has queued a
    # retrain, whose version would replace this one at once: publish nothing then.
    if (ls.project(("id", "total_annotations_number")).get("total_annotations_number") or 0) > 0:
        return {"skipped": "annotations arrived while the tasks were encoded; the retrain orders the queue"}
    number = int(previous.get("number", 0)) + 1
    version = f"{PREFIX}{number}"
    n = len(data.task_ids)
    bulk = []
    for i, task_id in enumerate(data.task_ids):
        answers = {c.name: c.choices[int(guesses[c.name][i])] for c in worded}
        bulk.append({"task": task_id, "result": config.results_for(answers),
                     "score": float(LABELED_FLOOR * ranks[i] / n), "model_version": version})
    ls.publish_predictions(bulk, [], settings.prediction_chunk)
    ls.set_model_version(version)
    outcome = {"model_version": version, "tasks": n, "order": settings.cold_start_order,
               "prefilled_controls": [c.name for c in worded]}
    if settings.uncertainty_sampling:
        try:
            outcome["sampling"] = first_sampling(ls, store, version)
        except Exception as exc:  # the order is published; Label All Tasks may not follow it yet
            outcome["errors"] = [f"setting the project's sampling failed: {exc}"]
    # Older cold starts go once this one is in (a task never loses its last prediction).
    try:
        outcome["removed"], _, too_large = remove_superseded(ls, version, n, 0, settings.prune_max_predictions)
        if too_large:
            outcome["too_large"] = too_large
    except RuntimeError as exc:  # Label Studio does not hold all of this one yet: keep the older
        log.info("project=%s %s", ls.project_id, exc)
    _write_state(store, ls.project_id, {"number": number, "model_version": version, "tasks": n,
                                        "tasks_hash": ids_hash, "order": settings.cold_start_order,
                                        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    outcome["seconds"] = round(time.perf_counter() - started, 3)
    log.info("project=%s cold start %s published for %d tasks (%s order; pre-filled: %s)", ls.project_id,
             version, n, settings.cold_start_order, ", ".join(outcome["prefilled_controls"]) or "none")
    return outcome
