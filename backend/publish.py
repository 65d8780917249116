"""Publishing a staged model version: its predictions into Label Studio, then the switch.

A version goes live in two steps, in this order: every task's prediction is uploaded, then
Label Studio's project `model_version` and /predict's CURRENT are switched to it
(`switch_version`). A failed upload therefore leaves the project on its previous version.
A small project does both inside the retrain job (`publish_inline`); a large one uploads
through slice jobs on any free worker and switches in `backend.jobs.finish_publish` once
all are in. Both switch through `switch_version`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from backend.job_results import Status
from backend.label_config import LabelConfig
from backend.label_studio import LabelStudioProject
from backend.model_store import ModelStore, version_number
from model.training import TrainingResult

# The bulk import keeps only these fields (Label Studio 1.23).
BULK_FIELDS = ("task", "result", "score", "model_version")


@dataclass
class Predictions:
    """A version's predictions, split by the way Label Studio can take them."""

    bulk: list[dict]  # the chunked bulk import: task, result, score, model_version
    one_by_one: list[dict]  # disputed labels: the single-prediction API keeps mislabeling, cluster

    def __len__(self) -> int:
        return len(self.bulk) + len(self.one_by_one)

    def slices(self, size: int) -> list[tuple[list[dict], list[dict]]]:
        """(bulk, one_by_one) parts of at most about `size` predictions, one per slice job;
        the disputed ones are shared out across the parts like the rest."""
        parts = -(-len(self) // size)
        return [(self.bulk[i::parts], self.one_by_one[i::parts]) for i in range(parts)]


def predictions_for(config: LabelConfig, trained: TrainingResult, version: str) -> Predictions:
    """One prediction per task in Label Studio's shape: one result per control (its
    predicted choice; multi-label: every chosen one), the queue score (lower = label
    sooner), the k-means cluster and, for disputed labels, mislabeling."""
    mislabeling = trained.mislabeling
    bulk, one_by_one = [], []
    for i, task_id in enumerate(trained.task_ids):
        prediction = {
            "task": task_id,
            "result": config.results_for(trained.answers(i)),
            "score": float(trained.scores[i]),
            "model_version": version,
        }
        if mislabeling[i] > 0:
            one_by_one.append(dict(prediction, cluster=int(trained.clusters[i]),
                                   mislabeling=float(mislabeling[i])))
        else:
            bulk.append(prediction)
    return Predictions(bulk, one_by_one)


def switch_version(ls: LabelStudioProject, store: ModelStore, version: str) -> Status:
    """Make `version` the project's live version, in Label Studio and for /predict.

    The caller holds the project's training lock, so no other switch interleaves. A version
    not newer than the live one is left alone and reported SUPERSEDED: two fan-outs can
    finish out of order, and the project must never go back to the older one.
    """
    current = store.current_version(ls.project_id)
    if current is not None and version_number(current) >= version_number(version):
        return Status.SUPERSEDED
    ls.set_model_version(version)
    store.activate(ls.project_id, version)
    return Status.FINISHED


def publish_inline(ls: LabelStudioProject, store: ModelStore, version: str, predictions: Predictions,
                   chunk: int, progress: Callable[[int, int], None] | None = None) -> Status:
    """Upload every prediction of `version` from this job, then switch to it (under the
    training lock the retrain holds)."""
    ls.publish_predictions(predictions.bulk, predictions.one_by_one, chunk, progress=progress)
    return switch_version(ls, store, version)
