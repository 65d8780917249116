"""The model as Label Studio sees it: `predict(tasks, context)` and `fit(event, data)`.

This keeps the shape of label-studio-ml-backend's `LabelStudioMLBase`, so a Label Studio
user finds the familiar two methods: `/predict` calls `predict`, a retraining job calls
`fit`. `fit` reads top to bottom along the data flow: read the truth from Label Studio (the
webhook body is only a hint), train and score on the model side
(`model.training.train_and_score`: a new head on cached encodings, a score for every
task), stage a new model version, and publish it (`backend.publish`), so the queue sorted
by prediction score shows the most useful task first.

Image classification (`<Image>` + `<Choices>`) runs the same loop: before training, each
task's image is fetched and encoded by the image encoder (`backend.images`, cached by
content), a task whose image cannot be used is left out (no prediction, counted and shown
in the job result) and the heads train on the image vectors. With FINE_TUNE_LAYERS > 0
the image network's top blocks train with the heads first (`_fine_tune_images`), and the
version keeps its own network, which /predict then uses.

Score convention: **lower = label sooner** (Label Studio serves ascending scores first).
With the plain ordering the score is the classifier's confidence in its predicted class.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from backend.images import (
    ERROR_EXAMPLES,
    ProjectImages,
    encode_project_images,
    fetch_task_images,
    fetcher_for,
)
from backend.job_results import EncodeResult, RetrainResult, Status
from backend.label_config import LabelConfig, UnsupportedConfig, parse_label_config
from backend.label_studio import LabelStudioProject
from backend.model_store import LoadedModel, ModelStore
from backend.progress import read_stop_set, write_queue_preview, write_stop_set
from backend.publish import UNTRAINED, predictions_for, publish_inline
from backend.settings import Settings
from backend.task_store import TaskStore
from backend.training_data import ProjectData, project_data, task_texts
from model.encoding_cache import EncodingCache, encode_with_cache
from model.heads import concat_inputs
from model.orderings import get_ordering
from model.queue_scores import LABELED_FLOOR
from model.training import (
    ControlLabels,
    FineTuning,
    Laps,
    OrderingChoice,
    Progress,
    ProjectExamples,
    no_progress,
    train_and_score,
)

log = logging.getLogger(__name__)

# Texts per encoding job when a large import fans out: small enough that the vectors a job
# hands back through Redis stay around 1 MB (float16, 384 dims).
ENCODE_SLICE = 2000
# fan_out(version, slices, result) of `fit`: queue the slices' uploads and the switch.
FanOut = Callable[[str, list[tuple[list[dict], list[dict]]], RetrainResult], None]

_encoders: dict[tuple, object] = {}
_image_encoders: dict[tuple, object] = {}
_encoders_lock = threading.Lock()


def get_encoder(settings: Settings, model: LoadedModel | None = None):
    """One encoder per process (and per fine-tuned model), loaded on first use.

    Never at import time nor per request: gunicorn workers and RQ workers keep it.
    """
    from model.encoder import Encoder

    fine_tuned = model.encoder_dir if model is not None else None
    name = str(fine_tuned) if fine_tuned else settings.encoder
    cache_key = (name, settings.device, settings.max_length, settings.encode_batch_size)
    with _encoders_lock:
        if cache_key not in _encoders:
            if fine_tuned:
                # Keep only the newest fine-tuned encoder per process: each is ~100 MB.
                for old in [k for k in _encoders if k[0] != settings.encoder]:
                    del _encoders[old]
            started = time.perf_counter()
            _encoders[cache_key] = Encoder(
                name, device=settings.device, max_length=settings.max_length,
                batch_size=settings.encode_batch_size,
                cache_id=model.meta["encoder"] if fine_tuned else None,
            )
            log.info("loaded encoder %s in %.1fs", _encoders[cache_key].id, time.perf_counter() - started)
        return _encoders[cache_key]


def get_image_encoder(settings: Settings, model: LoadedModel | None = None):
    """The image encoder of IMAGE_ENCODER, one per process, loaded on first use (as
    `get_encoder`); for a version with a fine-tuned image network, that network (loaded
    once per process, the newest one only: /predict of that version reuses it)."""
    from model.image_encoder import ImageEncoder

    tuned = model.image_encoder_dir if model is not None else None
    cache_key = (str(tuned) if tuned else settings.image_encoder, settings.device, settings.encode_batch_size)
    with _encoders_lock:
        if cache_key not in _image_encoders:
            started = time.perf_counter()
            if tuned:
                for old in [k for k in _image_encoders if k[0] != settings.image_encoder]:
                    del _image_encoders[old]
                _image_encoders[cache_key] = ImageEncoder.load_tuned(
                    tuned, cache_id=model.meta["image_encoder"], device=settings.device,
                    batch_size=settings.encode_batch_size)
            else:
                _image_encoders[cache_key] = ImageEncoder(settings.image_encoder, device=settings.device,
                                                          batch_size=settings.encode_batch_size)
            log.info("loaded image encoder %s in %.1fs", _image_encoders[cache_key].id,
                     time.perf_counter() - started)
        return _image_encoders[cache_key]


class BadRequest(ValueError):
    """Input the caller must fix; the web app answers 4xx with this message."""


class ConfigRefused(UnsupportedConfig):
    """The project's label config, as a retrain read it from Label Studio, has nothing this
    backend can learn. A retry cannot help: only a change of the config can."""

    def __init__(self, reason: str, label_config: str):
        super().__init__(
            f"The project's label config is not supported: {reason}. Change the labeling "
            f"interface in Label Studio (Settings > Labeling Interface); the backend retrains "
            f"by itself once the config changes.")
        self.label_config = label_config


class ActiveLearningBackend:
    def __init__(self, settings: Settings, project_id: int, store: ModelStore | None = None,
                 cache: EncodingCache | None = None):
        self.settings = settings
        self.project_id = int(project_id)
        self.store = store or ModelStore(settings.models_dir)
        self.cache = cache or EncodingCache(settings.encoding_cache_path, memo_mb=settings.encoding_memo_mb)

    # -- /predict ----------------------------------------------------------------------
    def predict(self, tasks: list[dict], context: dict | None = None) -> list[dict]:
        """One prediction per task, in order, with one result per control the model learns
        (multi-label: every choice at or above its threshold, at least the most likely one).
        Before the first retrain: for each task an empty list of predictions, which Label
        Studio stores nothing for."""
        if not tasks:
            return []
        model = self.store.load(self.project_id)
        if model is None:
            # Label Studio (ml/models.py, `_get_predictions_from_ml_backend`) takes each entry
            # as one prediction or a list of them and stores every dict that has a `result`,
            # even an empty one (a version card "untrained" full of empty predictions). An
            # empty list per task keeps the one-entry-per-task shape (no fall-back to one
            # request per task) and stores nothing, without an error in Label Studio's log.
            return [[] for _ in tasks]
        config = model.label_config
        try:
            texts = [task_texts(task, config) for task in tasks]
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        names = [obj.name for obj in config.text_objects]
        n = len(tasks)
        by_object = {}
        if names:
            vectors = self.features([row[name] for name in names for row in texts], model)
            by_object = {name: vectors[k * n:(k + 1) * n] for k, name in enumerate(names)}
        failed: set[int] = set()
        if config.image_objects:
            images = self.image_features(tasks, texts, config, model)
            by_object.update({name: enc.features for name, enc in images.encodings.items()})
            failed = set(images.failed)
        heads = model.heads
        # A version from before several controls names no inputs: it read the first object.
        probabilities = heads.predict_proba(
            [concat_inputs(by_object, spec.inputs or [config.primary.to_names[0]]) for spec in heads.specs])
        confidence = heads.confidence(probabilities)
        # A task whose image could not be used gets no prediction (an empty list: Label
        # Studio stores nothing), the others theirs.
        return [
            [] if i in failed else
            {"result": config.results_for(answers), "score": float(score), "model_version": model.version}
            for i, (answers, score) in enumerate(zip(heads.answers(probabilities), confidence))
        ]

    def image_features(self, tasks: list[dict], texts: list[dict], config: LabelConfig,
                       model: LoadedModel) -> ProjectImages:
        """Vectors of the tasks' images under the model's image encoder (cached ones are read
        back; a new image is fetched and encoded here)."""
        encoder = get_image_encoder(self.settings, model)
        trained_with = model.meta.get("image_encoder")
        if trained_with and trained_with != encoder.id:
            raise RuntimeError(
                f"model version {model.version} was trained with image encoder {trained_with}, this "
                f"process has {encoder.id}: give every process the IMAGE_ENCODER the model was trained "
                f"with, or retrain (Settings > Model > Start Training)")
        # A task id is only needed for cloud URIs (resolved per task); a missing one is that task's error.
        ids = [task["id"] if isinstance(task, dict) and type(task.get("id")) is int else None for task in tasks]
        values = {obj.name: [row[obj.name] for row in texts] for obj in config.image_objects}
        fetcher = fetcher_for(self.settings)
        try:
            return encode_project_images(encoder, self.cache, fetcher, ids, values)
        finally:
            fetcher.close()

    def features(self, texts: list[str], model: LoadedModel) -> np.ndarray:
        """Cached encodings under the model's encoder; only unseen texts run the encoder."""
        vectors, missing = self.cache.lookup(model.meta["encoder"], texts)
        if vectors is not None and not missing:
            return vectors
        vectors, _ = encode_with_cache(get_encoder(self.settings, model), self.cache, texts)
        return vectors

    # -- retraining --------------------------------------------------------------------
    def fit(self, event: str, data: dict | None = None, progress: Progress = no_progress,
            fan_out: FanOut | None = None) -> RetrainResult:
        """Retrain from Label Studio's current annotations and publish a new version.

        Along the data flow: read the project from Label Studio; train and score on the
        model side (`model.training.train_and_score`); stage the new version; publish it.
        `fan_out(version, slices, result)`, if given, takes over publishing when the project
        has more than FANOUT_TASKS tasks: the caller queues one upload job per slice and a
        job that switches the version afterwards (`backend.jobs`); `fit` then returns with
        status "publishing" and leaves the new version staged, not yet active.
        """
        laps = Laps()
        # 1. Read Label Studio: label config, tasks and annotations, the ordering to use.
        # The ML backend's extra params are read on a thread beside the project and its
        # tasks: Label Studio serves requests on threads, and this is one round trip less
        # between an annotation and its new predictions (0.1-0.2 s at 10,000 tasks).
        ls = LabelStudioProject(self.settings, self.project_id)
        ls.client  # noqa: B018  (the process's client, made here once rather than by two threads)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"extra-params-{self.project_id}") as pool:
            wanted = pool.submit(self._ordering_choice, ls)
            ls, project, config, tasks, sync = self._read_project(progress, ls)
            waited = time.perf_counter()
            choice = wanted.result()
            # How long the extra params kept the retrain waiting after the project was read
            # (Label Studio answers that list only after calling the backend's /health and
            # /setup): part of read_label_studio, shown apart.
            waited = round(time.perf_counter() - waited, 3)
        laps.lap("read_label_studio")
        laps.timings["extra_params_wait"] = waited
        skipped = RetrainResult(Status.SKIPPED, reason="the project has no usable annotations yet",
                                tasks=len(tasks.task_ids), timings=laps.timings,
                                ignored_controls=config.ignored_summary or None)
        if not tasks.labeled_index:
            return skipped

        # 2. The model: encode (cached; images fetched first, a broken one leaves its task
        # out), train one head per control, score every task.
        images, tasks, vectors = self._images_of(tasks, config, progress, ls)
        examples = project_examples(tasks, config, vectors)
        if images is not None:
            laps.lap("encode_images")
            skipped.image_errors, skipped.image_error_examples = _image_errors(images)
        if not examples.labeled:
            return skipped
        fine_tuning = self._fine_tuning()
        tuned = None
        if images is not None and fine_tuning is not None:
            # FINE_TUNE_LAYERS on a project that reads images: the image network's top blocks
            # train with the heads; a text beside the image keeps its frozen encoder.
            tuned = self._fine_tune_images(tasks, config, examples, fine_tuning, progress, ls, laps)
            fine_tuning = None
            if tuned is not None:
                images, tasks, examples = tuned.images, tasks.subset(tuned.keep), tuned.examples
                skipped.image_errors, skipped.image_error_examples = _merged_errors(
                    (skipped.image_errors, skipped.image_error_examples), _image_errors(images))
                if not examples.labeled:
                    shutil.rmtree(tuned.directory, ignore_errors=True)
                    return skipped
        if config.text_objects:
            encoder = get_encoder(self.settings)
        else:
            encoder = tuned.encoder if tuned is not None else get_image_encoder(self.settings)
        centroids = self.store.read_centroids(self.project_id, _feature_space(encoder.id, images))
        trained = train_and_score(
            examples, encoder, self.cache,
            OrderingChoice(choice["ordering"], choice["batch_size"], choice["params"]),
            fine_tuning=fine_tuning, centroids=centroids, progress=progress,
            tuned_heads=tuned.heads if tuned is not None else None)
        laps.include(trained.timings)
        heads = trained.heads
        first = heads[config.from_name]
        warnings = list(dict.fromkeys(choice.get("warnings", []) +
                                      list(trained.ordering_info.get("param_warnings") or [])))
        # Done in Label Studio but nothing to learn from (an empty submitted annotation): it
        # sorts after every unlabeled task, first among the done ones, where a reviewer sees it.
        trained.scores[tasks.done_unanswered_index] = LABELED_FLOOR

        # 3. Stage the new version: complete on disk, not served yet, with its stopping
        # signals (chained on the live version's) and its queue preview for the project page.
        if trained.centroids is not None and trained.centroids is not centroids:
            self.store.write_centroids(self.project_id, _feature_space(trained.encoder_id, images),
                                       trained.centroids)
        previous = self.store.current_version(self.project_id)
        try:
            previous_signals = self.store.read_meta(self.project_id, previous).get("stopping") if previous else None
        except (OSError, ValueError):  # a live version pruned or unreadable: the window restarts
            previous_signals = None
        signals, reference = trained.stopping(previous_signals, read_stop_set(self.store, self.project_id, previous),
                                              spacing=choice["batch_size"])
        training_accuracy = min(h.training_accuracy for h in heads.values() if h.labeled)
        meta = {
            "annotation_counts": annotation_counts(project),
            "label_config": config.to_dict(),
            "encoder": trained.encoder_id,
            "fine_tune_layers": self.settings.fine_tune_layers if images is None or tuned is not None else 0,
            "ordering": choice,
            "ordering_info": trained.ordering_info,
            "labeled": trained.labeled,
            "tasks": len(examples.task_ids),
            "label_counts": first.label_counts,
            "training_accuracy": training_accuracy,
            "controls": control_summary(heads),
            "mislabeled": trained.mislabeled,
            "stopping": signals,
            "event": event,
        }
        if images is not None:
            meta["image_encoder"] = images.encoder_id
        version = self.store.stage(self.project_id, trained.control_heads, meta, encoder_dir=trained.encoder_dir,
                                   image_encoder_dir=tuned.directory if tuned is not None else None)
        write_stop_set(self.store, self.project_id, version, reference)
        unlabeled = [i for i, score in enumerate(trained.scores) if score < LABELED_FLOOR]
        write_queue_preview(self.store, self.project_id, version,
                            [trained.task_ids[i] for i in unlabeled], [float(trained.scores[i]) for i in unlabeled],
                            [_label_text(first.predicted[i]) for i in unlabeled],
                            texts=[examples.texts[i] for i in unlabeled])
        laps.lap("stage")
        result = RetrainResult(
            Status.FINISHED, model_version=version, tasks=len(examples.task_ids), labeled=trained.labeled,
            encoded=trained.encoded + (images.encoded if images is not None else 0), sync=sync,
            training_accuracy=training_accuracy, image_errors=skipped.image_errors,
            image_error_examples=skipped.image_error_examples,
            ordering=choice, mislabeled=trained.mislabeled, timings=laps.timings,
            controls=control_summary(heads) if len(heads) > 1 else None,
            ignored_controls=config.ignored_summary or None, param_warnings=warnings or None,
            stopping=signals_summary(signals))

        # 4. Publish: predictions into Label Studio, then the switch to the new version.
        predictions = predictions_for(config, trained, version)
        laps.lap("build_predictions")
        limit = self.settings.fanout_tasks
        if fan_out is not None and 0 < limit < len(predictions):
            # A pool too large for one worker: each slice (bulk predictions, and a share of
            # the disputed ones sent one by one) is uploaded by its own RQ job, on whichever
            # workers are free; a last job switches the version once all are in.
            slices = predictions.slices(limit)
            result.status, result.publish_jobs = Status.PUBLISHING, len(slices)
            fan_out(version, slices, result)
            return result
        result.status, after = publish_inline(
            ls, self.store, version, predictions, self.settings,
            progress=lambda done, total: progress("uploading predictions", done, total),
            upload_done=lambda: laps.lap("upload"))
        result.after_switch = after.to_dict() if after is not None else None
        laps.lap("publish")  # after the upload: the switch and what follows it
        return result

    def _images_of(self, data: ProjectData, config: LabelConfig, progress: Progress, ls: LabelStudioProject):
        """(ProjectImages or None, the tasks whose images could be used, their image vectors):
        every `<Image>` object's image of every task fetched and encoded (cached)."""
        if not config.image_objects:
            return None, data, None
        fetcher = fetcher_for(self.settings, ls.client)
        try:
            images = encode_project_images(
                get_image_encoder(self.settings), self.cache, fetcher, data.task_ids,
                {obj.name: data.object_texts[obj.name] for obj in config.image_objects},
                progress=lambda done, total: progress("encoding images", done, total))
        finally:
            fetcher.close()
        failed = set(images.failed)
        keep = [i for i in range(len(data.task_ids)) if i not in failed]
        return images, data.subset(keep) if failed else data, images.object_vectors(keep)

    def _fine_tuning(self) -> FineTuning | None:
        """Where a fine-tuned encoder goes (FINE_TUNE_LAYERS > 0): a temporary directory in the
        project's model directory, which `ModelStore.stage` moves into the version."""
        if self.settings.fine_tune_layers <= 0:
            return None
        import tempfile
        from pathlib import Path

        project_dir = self.store.project_dir(self.project_id)
        project_dir.mkdir(parents=True, exist_ok=True)
        return FineTuning(self.settings.fine_tune_layers,
                          Path(tempfile.mkdtemp(prefix=".finetune-", dir=project_dir)))

    def _fine_tune_images(self, data: ProjectData, config: LabelConfig, examples: ProjectExamples,
                          fine_tuning: FineTuning, progress: Progress, ls: LabelStudioProject,
                          laps: Laps) -> TunedImages | None:
        """Fine-tune the image network's top blocks with the heads on the labeled tasks'
        images (`model.finetune.fine_tune_image_heads`), then encode every task's image with
        it under a cache id of its own. The files come from the bytes cache when it has them
        (`backend.images.CachingFetcher`). A labeled task whose file cannot be read now is
        left out of the fine-tuning; one whose image fails with the tuned network, out of
        the version (an image error, as before). None, with the encoder left frozen, when
        no labeled image can be read."""
        import uuid

        from model.encoding_cache import encode_with_cache
        from model.finetune import fine_tune_image_heads
        from model.heads import encode_targets, labeled_tasks

        base = get_image_encoder(self.settings)
        names = list(examples.controls)
        controls = [examples.controls[name] for name in names]
        specs = [c.spec(name, examples.inputs_of(c)) for name, c in zip(names, controls)]
        targets = [encode_targets(spec, c.labels) for spec, c in zip(specs, controls)]
        labeled = labeled_tasks(targets)
        image_names = [obj.name for obj in config.image_objects]
        fetcher = fetcher_for(self.settings, ls.client)
        try:
            progress("reading the labeled images", 0, len(labeled))
            ids = [data.task_ids[i] for i in labeled]
            files = {name: fetch_task_images(fetcher, ids, [data.object_texts[name][i] for i in labeled])
                     for name in image_names}
            usable = [k for k in range(len(labeled))
                      if not any(isinstance(files[name][k], Exception) for name in image_names)]
            if not usable:
                log.warning("project=%s FINE_TUNE_LAYERS=%d: no labeled image could be read; this version "
                            "keeps the image encoder frozen", self.project_id, fine_tuning.layers)
                shutil.rmtree(fine_tuning.out_dir, ignore_errors=True)
                return None
            rows = labeled[usable]
            fixed = {}
            text_names = [name for name in examples.text_objects if any(name in s.inputs for s in specs)]
            if text_names:
                text_encoder = get_encoder(self.settings)
                for name in text_names:
                    fixed[name], _ = encode_with_cache(text_encoder, self.cache,
                                                       [examples.objects[name][i] for i in rows])
            tuned, heads = fine_tune_image_heads(
                base, {name: [files[name][k] for k in usable] for name in image_names}, specs,
                [t[rows] for t in targets], fine_tuning.layers, fine_tuning.out_dir,
                cache_id=f"{base.id}+ft-{uuid.uuid4().hex[:12]}", fixed=fixed,
                progress=lambda done, total: progress("fine-tuning the image encoder", done, total))
            laps.lap("fine_tune_images")
            del files
            images = encode_project_images(
                tuned, self.cache, fetcher, data.task_ids, {name: data.object_texts[name] for name in image_names},
                progress=lambda done, total: progress("encoding images with the fine-tuned encoder", done, total))
            laps.lap("encode_fine_tuned_images")
        except BaseException:
            shutil.rmtree(fine_tuning.out_dir, ignore_errors=True)
            raise
        finally:
            fetcher.close()
        failed = set(images.failed)
        keep = [i for i in range(len(data.task_ids)) if i not in failed]
        examples = project_examples(data.subset(keep) if failed else data, config, images.object_vectors(keep))
        return TunedImages(tuned, heads, images, keep, examples, fine_tuning.out_dir)

    def _read_project(self, progress: Progress, ls: LabelStudioProject | None = None):
        """Label config and tasks from Label Studio (tasks through the local incremental copy)."""
        ls = ls or LabelStudioProject(self.settings, self.project_id)
        progress("reading Label Studio", 0, 0)
        project = ls.project(PROJECT_FIELDS)
        try:
            config = parse_label_config(project.get("label_config") or "")
        except UnsupportedConfig as exc:
            raise ConfigRefused(str(exc), project.get("label_config") or "") from None
        store = TaskStore(self.settings.data_dir, self.project_id)
        # Each page is retried by the client (backend/label_studio.py), not the whole sync.
        tasks, sync = store.sync(ls, project.get("task_number"),
                                 progress=lambda n: progress("reading tasks", n, 0))
        log.info("project=%s read %d changed tasks from Label Studio (%s sync), %d in all",
                 self.project_id, sync["read"], sync["mode"], len(tasks))
        return ls, project, config, project_data(tasks, config), sync

    def _ordering_choice(self, ls: LabelStudioProject) -> dict:
        """Ordering, batch size and parameters: the ML backend's extra params in Label Studio
        (JSON, e.g. {"ordering": "atlas", "batch_size": 50, "params": {...}}), else ORDERING
        and BATCH_SIZE from the environment. Each bad part falls back to its default on its
        own, with a warning under "warnings" (the job result's `param_warnings`): an unknown
        ordering, a bad batch size, params that are not an object; a bad value or unknown
        name among the params is skipped by the ordering itself (`Ordering.checked`), the
        others still apply."""
        choice = {"ordering": self.settings.ordering, "batch_size": self.settings.batch_size,
                  "params": {}, "source": "environment"}
        try:
            extra = ls.ml_extra_params()
        except Exception as exc:  # extra params are optional; training goes on without them
            log.warning("project=%s could not read the ML backend's extra params: %s", self.project_id, exc)
            extra = {}
        if not extra:
            return choice
        warnings: list[str] = []
        wanted = dict(choice, source="extra_params")
        ordering = extra.get("ordering", choice["ordering"])
        try:
            get_ordering(str(ordering))
            wanted["ordering"] = str(ordering)
        except ValueError as exc:
            warnings.append(f"extra params: {exc}; using {choice['ordering']!r}")
        batch_size = extra.get("batch_size", choice["batch_size"])
        if isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 1:
            wanted["batch_size"] = batch_size
        else:
            warnings.append(f"extra params: batch_size must be a positive integer, got {batch_size!r:.60}; "
                            f"using {choice['batch_size']}")
        params = extra.get("params") or {}
        if isinstance(params, dict):
            wanted["params"] = params
            # Checked now, so /jobs shows a warning even when no unlabeled task is left to order.
            warnings += get_ordering(wanted["ordering"]).checked(params)[1]
        else:
            warnings.append("extra params: params must be a JSON object; using none")
        for warning in warnings:
            log.warning("project=%s %s", self.project_id, warning)
        if warnings:
            wanted["warnings"] = warnings
        return wanted

    def encode_new_tasks(self, progress: Progress = no_progress,
                         fan_out: Callable[[str, list[list[str]], EncodeResult], None] | None = None
                         ) -> EncodeResult:
        """Encode tasks nobody labeled yet (TASKS_CREATED), so the next retrain finds them cached.

        With `fan_out(encoder_id, slices, result)` and more than FANOUT_TASKS texts to
        encode (a large import), the texts are handed out in slices of at most ENCODE_SLICE
        to whichever workers are free (`backend.jobs.encode_slice`); the result then has
        status "encoding".
        """
        started = time.perf_counter()
        ls, _, config, data, sync = self._read_project(progress)
        # Images first, in this job (their fetching is the slow part, and per-task errors are
        # reported here already); then every text object a control reads (title and body
        # both), one text per object and task.
        with_images = self._images_of(data, config, progress, ls)
        images = with_images[0]
        image_errors, error_examples = _image_errors(images) if images is not None else (None, None)
        image_encoded = images.encoded if images is not None else 0
        texts = [text for obj in config.text_objects for text in data.object_texts[obj.name]]
        if not texts:
            return EncodeResult(Status.FINISHED, tasks=len(data.task_ids), encoded=image_encoded, sync=sync,
                                image_errors=image_errors, image_error_examples=error_examples,
                                cold_start=self.cold_start(ls, config, data, progress, with_images),
                                duration=round(time.perf_counter() - started, 3))
        encoder = get_encoder(self.settings)
        limit = self.settings.fanout_tasks
        # Only a project with more texts than the limit can have more to encode: smaller ones
        # skip this lookup, which encode_with_cache below makes again.
        if fan_out is not None and 0 < limit < len(texts):
            _, missing = self.cache.lookup(encoder.id, texts)
            distinct = list(dict.fromkeys(texts[i] for i in missing))
            if len(distinct) > limit:
                size = min(limit, ENCODE_SLICE)
                slices = [distinct[i:i + size] for i in range(0, len(distinct), size)]
                result = EncodeResult(Status.ENCODING, tasks=len(data.task_ids), to_encode=len(distinct),
                                      encode_jobs=len(slices), sync=sync, encoder=encoder.id,
                                      image_errors=image_errors, image_error_examples=error_examples)
                fan_out(encoder.id, slices, result)
                result.duration = round(time.perf_counter() - started, 3)
                return result
        progress("encoding", 0, len(texts))
        _, encoded = encode_with_cache(encoder, self.cache, texts,
                                       progress=lambda done, total: progress("encoding", done, total))
        return EncodeResult(Status.FINISHED, tasks=len(data.task_ids), encoded=encoded + image_encoded, sync=sync,
                            image_errors=image_errors, image_error_examples=error_examples,
                            cold_start=self.cold_start(ls, config, data, progress, with_images),
                            duration=round(time.perf_counter() - started, 3))

    def cold_start(self, ls: LabelStudioProject | None = None, config: LabelConfig | None = None,
                   data: ProjectData | None = None, progress: Progress = no_progress, images=None) -> dict:
        """Once a project's tasks are encoded: publish the cold-start order (and zero-shot
        guess) when it has no model and no annotation (`backend.cold_start`). Reads the
        project unless given it. `images`: what `_images_of` returned for it in the same
        job (an image project's vectors; its broken tasks get no cold-start prediction).
        Never fails the encoding: an error is reported instead."""
        from backend import cold_start

        try:
            if data is None:
                ls, _, config, data, _ = self._read_project(progress)
            reason = cold_start.why_not(self.settings, self.store, self.project_id, data)
            if reason is not None:
                return {"skipped": reason}
            image_vectors = None
            if config.image_objects:
                if images is None:  # texts encoded in slices: the images are not at hand here
                    return {"skipped": "an image project's cold start is published by the job that encodes "
                                       "its images; this one encoded texts only"}
                _, data, vectors = images
                if not data.task_ids:
                    return {"skipped": "no task has an image that could be used"}
                image_vectors = {name: v.features for name, v in vectors.items()}
            progress("publishing the cold-start order", 0, len(data.task_ids))
            return cold_start.publish(self.settings, ls, self.store, self.cache,
                                      lambda: get_encoder(self.settings), config, data, image_vectors)
        except Exception as exc:  # the texts are cached either way; the first retrain orders the queue
            log.warning("project=%s cold start failed: %s", self.project_id, exc)
            return {"error": f"publishing the cold-start order failed: {exc}"}


def project_examples(data: ProjectData, config: LabelConfig,
                     object_vectors: dict | None = None) -> ProjectExamples:
    """The model's view of a project: every object's texts, every control's answers, and the
    vectors of the image objects (`ProjectImages.object_vectors`)."""
    controls = {c.name: ControlLabels(c.choices, [row[c.name] for row in data.answers], multi_label=c.multi_label,
                                      inputs=c.to_names)
                for c in config.controls}
    return ProjectExamples(data.task_ids, data.texts, controls, object_texts=data.object_texts,
                           object_vectors=object_vectors or None)


@dataclass
class TunedImages:
    """What `_fine_tune_images` made: the network and heads trained together, every task's
    image encoded with the network, the rows still usable and the examples over them."""

    encoder: object  # model.image_encoder.ImageEncoder, loaded from `directory`
    heads: object  # model.heads.ControlHeads
    images: ProjectImages
    keep: list[int]
    examples: ProjectExamples
    directory: Path  # the saved network, moved into the version by ModelStore.stage


def _merged_errors(first: tuple, second: tuple) -> tuple[int | None, list | None]:
    """Image errors of the frozen pass and of the fine-tuned one, counted together."""
    count = (first[0] or 0) + (second[0] or 0)
    examples = ((first[1] or []) + (second[1] or []))[:ERROR_EXAMPLES]
    return (count, examples) if count else (None, None)


def _image_errors(images: ProjectImages) -> tuple[int | None, list | None]:
    """(count, examples) of the tasks with a broken image, None when there is none."""
    count, examples = images.error_report()
    return (count, examples) if count else (None, None)


def _feature_space(encoder_id: str, images: ProjectImages | None) -> str:
    """What the task vectors the centroids live in are made by: the encoder, and the image
    encoder beside it for a project that reads images."""
    ids = [encoder_id] + ([images.encoder_id] if images is not None else [])
    return "+".join(dict.fromkeys(ids))


def control_summary(heads: dict) -> dict:
    """Per control: what its head trained on (meta.json, the job result)."""
    return {name: {"labeled": h.labeled, "label_counts": h.label_counts,
                   "training_accuracy": h.training_accuracy,
                   "multi_label": bool(getattr(h.head, "multi_label", False))}
            for name, h in heads.items()}


def signals_summary(signals: dict) -> dict:
    """The stopping signals for /jobs: everything but the per-version history (the project
    page draws that), for each control too."""
    summary = {k: v for k, v in signals.items() if k not in ("history", "controls")}
    if "controls" in signals:
        summary["controls"] = {name: {k: v for k, v in s.items() if k != "history"}
                               for name, s in signals["controls"].items()}
    return summary


def _label_text(predicted) -> str:
    """A predicted answer as the queue preview shows it (multi-label: the labels joined)."""
    if predicted is None:
        return "-"
    return predicted if isinstance(predicted, str) else ", ".join(predicted)


# Label Studio's annotation counters of a project: a cheap "did anything change" check.
ANNOTATION_COUNTERS = ("total_annotations_number", "skipped_annotations_number", "num_tasks_with_annotations")
# What a retrain reads of the project (`LabelStudioProject.project(fields)`): the label
# config, the task count the sync checks itself against, and the counters the version
# records; not the prediction counters, whose cost grows with every version kept.
PROJECT_FIELDS = ("id", "title", "label_config", "model_version", "task_number") + ANNOTATION_COUNTERS


def annotation_counts(project: dict) -> dict:
    """Label Studio's annotation counters of a project (`ANNOTATION_COUNTERS`)."""
    return {name: project.get(name) for name in ANNOTATION_COUNTERS}


def project_id_from_ls(value) -> int:
    """Label Studio sends `project` as "<id>.<created timestamp>" (or an int, or a dict)."""
    if isinstance(value, dict):
        value = value.get("id")
    if isinstance(value, bool) or value is None:
        raise BadRequest("missing 'project': expected a project id like \"12\" or \"12.1700000000\"")
    if isinstance(value, int):
        project_id = value
    else:
        head = str(value).split(".", 1)[0].strip()
        # ASCII only: str.isdigit() accepts digits int() rejects ("²"); and a bounded length,
        # since int() refuses strings of more than 4300 digits.
        if not (head.isascii() and head.isdigit()):
            raise BadRequest("'project' must be a project id like \"12\" or \"12.1700000000\", "
                             f"got {str(value)[:40]!r}")
        if len(head) > 20:
            raise BadRequest(f"'project' id out of range: {head[:40]}...")
        project_id = int(head)
    if project_id <= 0 or project_id > 2**53:
        raise BadRequest(f"'project' id out of range: {project_id}")
    return project_id


__all__ = ["ActiveLearningBackend", "BadRequest", "UNTRAINED", "get_encoder", "project_id_from_ls",
           "parse_label_config"]
