"""/metrics: Prometheus exposition through prometheus_client.

Two kinds of series, so that a scrape gives the same answer whichever gunicorn worker takes it:

* Measured in the web processes: the /predict latency histogram. Under gunicorn it runs in
  prometheus_client's multiprocess mode (`backend/gunicorn_config.py` sets
  PROMETHEUS_MULTIPROC_DIR): each worker writes to its own file and a scrape adds up the
  files of every worker, live or exited. No series carries a pid, so a restarted worker adds
  no label values. Without that variable (the Flask test client, a plain import) the
  histogram is an ordinary in-process one.
* State that lives in Redis or on disk (jobs per project and state, job outcomes, coalesced
  events, last retrain duration, model versions, whether Redis answers): `QueueCollector`
  reads it at scrape time. Copying it into per-process metrics would make each worker
  report its own stale copy.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from backend.model_store import ModelStore, version_number

log = logging.getLogger(__name__)

BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)

# registry=None: each app's registry (below) decides how it is collected.
PREDICT_LATENCY = Histogram("atl_predict_latency_seconds", "Latency of /predict", buckets=BUCKETS,
                            registry=None)


STOPPING_GAUGES = (
    ("atl_stopping_stabilised", "stabilised", "1 when the last version's predictions have stabilised"),
    ("atl_stopping_kappa", "kappa", "Kappa of the last comparison of versions on the stop set"),
    ("atl_pool_uncertainty", "uncertainty", "Mean normalised entropy of the unlabeled pool"),
    ("atl_pool_predicted_incorrect", "predicted_incorrect", "Share of the pool the model expects to get wrong"),
    ("atl_out_of_fold_accuracy", "oof_accuracy", "Out-of-fold accuracy on the labeled tasks"),
    ("atl_out_of_fold_macro_f1", "oof_macro_f1", "Out-of-fold macro-F1 on the labeled tasks"),
)


def observe_predict(seconds: float) -> None:
    PREDICT_LATENCY.observe(seconds)


def multiprocess_mode() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class QueueCollector(Collector):
    """The series whose truth is in Redis (queue state) or on disk (model versions).

    `queue` returns the app's JobQueue, or None while Redis is known to be unreachable; then
    only `atl_redis_up 0` and the model versions are reported.
    """

    def __init__(self, store: ModelStore, queue: Callable[[], object | None]):
        self.store = store
        self.queue = queue

    def collect(self) -> Iterator[Metric]:
        versions = GaugeMetricFamily("atl_model_version_number", "Number of the model version /predict serves",
                                     labels=["project", "model_version"])
        for project_id in self.store.projects():
            current = self.store.current_version(project_id)
            if current:
                versions.add_metric([str(project_id), current], version_number(current))
        yield versions

        statuses = self._statuses()
        up = GaugeMetricFamily("atl_redis_up", "1 when the job queue's Redis answers")
        up.add_metric([], 0 if statuses is None else 1)
        yield up
        statuses = statuses or []
        # Not "atl_jobs": the counter below is the family atl_jobs (its samples atl_jobs_total),
        # and prometheus_client and OpenMetrics refuse a gauge of the same name.
        current = GaugeMetricFamily("atl_jobs_current", "Retraining jobs per project now waiting or running",
                                    labels=["project", "state"])
        outcomes = CounterMetricFamily("atl_jobs", "Retraining jobs per project by outcome",
                                       labels=["project", "outcome"])
        coalesced = CounterMetricFamily("atl_events_coalesced",
                                        "Annotation events per project that joined a retrain already waiting",
                                        labels=["project"])
        duration = GaugeMetricFamily("atl_retrain_duration_seconds", "Duration of the last retrain per project",
                                     labels=["project"])
        for status in statuses:
            project = str(status["project_id"])
            current.add_metric([project, "queued"], 1 if status["waiting"] else 0)
            current.add_metric([project, "running"], 1 if status["running"] else 0)
            for outcome in ("requested", "succeeded", "failed"):
                outcomes.add_metric([project, outcome], status[outcome])
            coalesced.add_metric([project], status["coalesced"])
            last = status.get("last") or {}
            if "duration" in last:
                duration.add_metric([project], float(last["duration"]))
        yield from (current, outcomes, coalesced, duration)
        # The last version's stopping signals (model.stopping; several controls: the worst one's).
        for name, key, help_text in STOPPING_GAUGES:
            gauge = GaugeMetricFamily(name, help_text, labels=["project"])
            for status in statuses:
                value = ((status.get("last") or {}).get("stopping") or {}).get(key)
                if isinstance(value, (int, float)):  # bool counts: stabilised is 0 or 1
                    gauge.add_metric([str(status["project_id"])], float(value))
            yield gauge

    def _statuses(self) -> list[dict] | None:
        queue = self.queue()
        if queue is None:
            return None
        try:
            return [queue.project_status(project_id) for project_id in queue.project_ids()]
        except Exception as exc:  # Redis down or timing out: the scrape still answers
            log.debug("metrics: Redis unavailable: %s", exc)
            return None


def registry(store: ModelStore, queue: Callable[[], object | None]) -> CollectorRegistry:
    """What /metrics exposes: the /predict histogram (of all workers, under gunicorn) and
    the Redis and model-store series of `QueueCollector`."""
    registry = CollectorRegistry()
    if multiprocess_mode():
        MultiProcessCollector(registry)
    else:
        registry.register(PREDICT_LATENCY)
    registry.register(QueueCollector(store, queue))
    return registry
