"""Prometheus text exposition for /metrics: queue state per project, model versions, latency.

Job counts live in Redis (shared by every process); the /predict latency histogram is kept
per web process, so each gunicorn worker reports its own (labelled with its pid).
"""

from __future__ import annotations

import os
import threading

BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
_lock = threading.Lock()
_predict_counts = [0] * (len(BUCKETS) + 1)
_predict_sum = 0.0


def observe_predict(seconds: float) -> None:
    global _predict_sum
    with _lock:
        for i, bound in enumerate(BUCKETS):
            if seconds <= bound:
                _predict_counts[i] += 1
                break
        else:
            _predict_counts[-1] += 1
        _predict_sum += seconds


def render(store, queue) -> str:
    lines = []

    def metric(name: str, kind: str, help_text: str):
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")

    pid = os.getpid()
    metric("atl_predict_latency_seconds", "histogram", "Latency of /predict in this web process")
    with _lock:
        cumulative = 0
        for bound, count in zip(BUCKETS, _predict_counts):
            cumulative += count
            lines.append(f'atl_predict_latency_seconds_bucket{{process="{pid}",le="{bound}"}} {cumulative}')
        cumulative += _predict_counts[-1]
        lines.append(f'atl_predict_latency_seconds_bucket{{process="{pid}",le="+Inf"}} {cumulative}')
        lines.append(f'atl_predict_latency_seconds_sum{{process="{pid}"}} {_predict_sum:.6f}')
        lines.append(f'atl_predict_latency_seconds_count{{process="{pid}"}} {cumulative}')

    metric("atl_model_version_number", "gauge", "Number of the model version /predict serves")
    from backend.model_store import version_number

    for project_id in store.projects():
        current = store.current_version(project_id)
        if current:
            lines.append(
                f'atl_model_version_number{{project="{project_id}",model_version="{current}"}} '
                f"{version_number(current)}"
            )

    metric("atl_redis_up", "gauge", "1 when the job queue's Redis answers")
    statuses = []
    if queue is not None:
        try:
            statuses = [queue.project_status(pid) for pid in queue.project_ids()]
            lines.append("atl_redis_up 1")
        except Exception:
            lines.append("atl_redis_up 0")
    else:
        lines.append("atl_redis_up 0")
    metric("atl_jobs", "gauge", "Retraining jobs per project and state")
    for s in statuses:
        p = s["project_id"]
        lines.append(f'atl_jobs{{project="{p}",state="queued"}} {1 if s["waiting"] else 0}')
        lines.append(f'atl_jobs{{project="{p}",state="running"}} {1 if s["running"] else 0}')
    metric("atl_jobs_total", "counter", "Retraining jobs per project by outcome")
    for s in statuses:
        p = s["project_id"]
        for outcome in ("requested", "succeeded", "failed"):
            lines.append(f'atl_jobs_total{{project="{p}",outcome="{outcome}"}} {s[outcome]}')
    metric("atl_events_coalesced_total", "counter",
           "Annotation events per project that joined a retrain already waiting")
    for s in statuses:
        lines.append(f'atl_events_coalesced_total{{project="{s["project_id"]}"}} {s["coalesced"]}')
    metric("atl_retrain_duration_seconds", "gauge", "Duration of the last retrain per project")
    for s in statuses:
        last = s.get("last") or {}
        if "duration" in last:
            lines.append(f'atl_retrain_duration_seconds{{project="{s["project_id"]}"}} {float(last["duration"]):.3f}')
    # The last version's stopping signals (model.stopping; several controls: the worst one's).
    for name, key, help_text in (
        ("atl_stopping_stabilised", "stabilised", "1 when the last version's predictions have stabilised"),
        ("atl_stopping_kappa", "kappa", "Kappa of the last comparison of versions on the stop set"),
        ("atl_pool_uncertainty", "uncertainty", "Mean normalised entropy of the unlabeled pool"),
        ("atl_pool_predicted_incorrect", "predicted_incorrect", "Share of the pool the model expects to get wrong"),
        ("atl_out_of_fold_accuracy", "oof_accuracy", "Out-of-fold accuracy on the labeled tasks"),
        ("atl_out_of_fold_macro_f1", "oof_macro_f1", "Out-of-fold macro-F1 on the labeled tasks"),
    ):
        values = [(s["project_id"], ((s.get("last") or {}).get("stopping") or {}).get(key)) for s in statuses]
        values = [(p, float(v)) for p, v in values if isinstance(v, (int, float))]
        if values:
            metric(name, "gauge", help_text)
            lines.extend(f'{name}{{project="{p}"}} {v:.4f}' for p, v in values)
    return "\n".join(lines) + "\n"
