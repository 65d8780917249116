"""The project pages: `/` lists the projects, `/projects/<id>` shows how one is learning.

Server-rendered HTML (Jinja templates in backend/templates, inline SVG charts from
backend/charts.py), no JavaScript and no external assets: it works behind the backend's
Basic auth (`authenticate` in backend/app.py guards these routes like every other) on a
machine without internet. While a job runs or waits, the page reloads itself every 15 s.

What it shows comes from what the backend already keeps: the versions in the `ModelStore`
(meta.json, with the stopping signals of `model.stopping` under "stopping"), each
version's `queue_preview.json` (backend/progress.py) and the job state of
`JobQueue.project_status`. Whatever is missing (a version trained before a signal
existed, Redis down) reads "not computed yet" or says so; the page never fails on it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime

from flask import Blueprint, render_template
from markupsafe import Markup

from backend.charts import Guide, LineChart, Series, label_mix_chart, line_chart
from backend.ml_backend import project_id_from_ls
from backend.model_store import ModelStore, version_number
from backend.progress import read_queue_preview
from backend.settings import Settings
from model.stopping import THRESHOLD

log = logging.getLogger(__name__)

NOT_COMPUTED = "not computed yet"
REFRESH_SECONDS = 15


def pages_blueprint(settings: Settings, store: ModelStore, queue: Callable,
                    label_studio_url: str | None = None) -> Blueprint:
    """The blueprint of `/` and `/projects/<id>`.

    `queue()` returns the `JobQueue` (or raises when Redis is unavailable);
    `label_studio_url` is Label Studio as the *browser* reaches it, for the links to tasks
    (default: LABEL_STUDIO_URL).
    """
    pages = Blueprint("pages", __name__, template_folder="templates")
    ls_url = (label_studio_url or settings.label_studio_url).rstrip("/")

    def job_states(project_ids: list[int] | None = None) -> tuple[dict[int, dict], str | None]:
        """Job state per project, and why there is none (Redis down) or None."""
        try:
            q = queue()
            ids = project_ids if project_ids is not None else sorted(set(q.project_ids()) | set(store.projects()))
            return {pid: q.project_status(pid) for pid in ids}, None
        except Exception as exc:  # the page still shows the models without the queue
            log.warning("project page: job queue unavailable: %s", exc)
            return {}, "The job queue (Redis) is not answering: job state is unknown for now."

    @pages.get("/")
    def index():
        states, queue_problem = job_states()
        ids = sorted(set(store.projects()) | set(states))
        rows = [project_row(store, pid, states.get(pid)) for pid in ids]
        return render_template("index.html", projects=rows, queue_problem=queue_problem,
                               refresh=REFRESH_SECONDS if any(r["busy"] for r in rows) else None)

    @pages.get("/projects/<int:project_id>")
    def project(project_id: int):
        project_id = project_id_from_ls(project_id)
        states, queue_problem = job_states([project_id])
        view = project_view(store, project_id, states.get(project_id), ls_url)
        known = bool(view["versions"]) or _has_jobs(states.get(project_id))
        refresh = REFRESH_SECONDS if view["job"]["busy"] else None
        return render_template("project.html", p=view, queue_problem=queue_problem,
                               refresh=refresh, known=known), 200 if known else 404

    @pages.app_template_filter("pct")
    def pct(value, digits: int = 1):
        return NOT_COMPUTED if value is None else f"{100 * float(value):.{digits}f}%"

    @pages.app_template_filter("num")
    def num(value, digits: int = 3):
        return NOT_COMPUTED if value is None else f"{float(value):.{digits}f}"

    return pages


def project_row(store: ModelStore, project_id: int, status: dict | None) -> dict:
    """One line of the project list."""
    versions = store.versions(project_id)
    current = store.current_version(project_id)
    meta = _meta(store, project_id, current) or {}
    stopping = _signals(meta.get("stopping")) or {}
    job = job_view(status)
    return {"id": project_id, "versions": len(versions), "current": current,
            "labeled": _count(meta.get("labeled")), "tasks": _count(meta.get("tasks")),
            "oof_accuracy": stopping.get("oof_accuracy"), "verdict": stopping.get("verdict"),
            "job": job, "busy": job["busy"]}


def project_view(store: ModelStore, project_id: int, status: dict | None, ls_url: str) -> dict:
    """Everything the project page shows, as plain values (None where not computed yet)."""
    current = store.current_version(project_id)
    versions = []
    for name in store.versions(project_id):
        meta = _meta(store, project_id, name) or {}
        signals = _signals(meta.get("stopping")) or {}
        versions.append({
            "name": name, "number": version_number(name), "live": name == current,
            "readable": bool(meta),
            "created_at": _text(meta.get("created_at")),
            "labeled": _count(meta.get("labeled")), "tasks": _count(meta.get("tasks")),
            "training_accuracy": _number(meta.get("training_accuracy")),
            "oof_accuracy": signals.get("oof_accuracy"), "kappa": signals.get("kappa"),
            "verdict": signals.get("verdict"),
            "ordering": _text(_dict(meta.get("ordering")).get("ordering")),
        })
    shown = current or (versions[-1]["name"] if versions else None)
    meta = _meta(store, project_id, shown) or {}
    stopping = _signals(meta.get("stopping"))
    preview = read_queue_preview(store, project_id, shown) or {}
    history = (stopping or {}).get("history") or []
    # Both charts share the labels axis, so a flattening curve lines up with the kappas.
    labels_seen = [p["labeled"] for p in history if isinstance(p.get("labeled"), (int, float))]
    labels_seen += [v["labeled"] for v in versions if isinstance(v["labeled"], (int, float))]
    x_range = (min(labels_seen), max(labels_seen)) if labels_seen else None
    return {
        "id": project_id,
        "current": current,
        "shown": shown,
        "versions": versions,
        "version_count": len(versions),
        "labeled": _count(meta.get("labeled")),
        "tasks": _count(meta.get("tasks")),
        "created_at": _text(meta.get("created_at")),
        "ordering": _text(_dict(meta.get("ordering")).get("ordering")),
        "stopping": stopping,
        "curve": learning_curve(history, versions, x_range),
        "kappa_chart": kappa_chart(history, stopping, x_range),
        "label_mix": label_mix(meta.get("label_counts"), preview.get("predicted_counts")),
        "next_tasks": next_tasks(preview.get("next"), f"{ls_url}/projects/{project_id}/data?task="),
        "preview_pool": _count(preview.get("pool")),
        "job": job_view(status),
        "ls_project_url": f"{ls_url}/projects/{project_id}/data",
    }


def learning_curve(history: list[dict], versions: list[dict],
                   x_range: tuple[float, float] | None = None) -> Markup | None:
    """Estimated accuracy against labels: out-of-fold (pessimistic) and the model's own
    estimate (optimistic) from the stopping history; before those exist, the training
    accuracy of the versions on disk, named for what it is."""
    oof = [(p["labeled"], p["oof_accuracy"]) for p in history
           if p.get("labeled") is not None and p.get("oof_accuracy") is not None]
    own = [(p["labeled"], 1 - p["predicted_incorrect"]) for p in history
           if p.get("labeled") is not None and p.get("predicted_incorrect") is not None]
    series = []
    if oof:
        series.append(Series("out-of-fold accuracy (leans low)", oof))
    if own:
        series.append(Series("model's own estimate (leans high)", own, dashed=True))
    if not series:
        trained = [(v["labeled"], v["training_accuracy"]) for v in versions
                   if v["labeled"] is not None and v["training_accuracy"] is not None]
        if not trained:
            return None
        series.append(Series("training accuracy (on its own labels: optimistic)", trained,
                             dashed=True, colour="#6b7280"))
    lowest = min(y for s in series for _, y in s.points)
    # Zoomed in so a flattening curve shows, but never above 50%: small wiggles stay small.
    y_low = min(0.5, max(0.0, math.floor(lowest * 10) / 10 - 0.1))
    return line_chart(LineChart(title="estimated accuracy against labels", x_label="labeled tasks",
                                y_label="accuracy", series=series, y_range=(y_low, 1.0),
                                x_range=x_range))


def kappa_chart(history: list[dict], stopping: dict | None,
                x_range: tuple[float, float] | None = None) -> Markup | None:
    """Kappa of each comparison of versions (`model.stopping.version_point`) against labels,
    with the threshold of the stopping criterion."""
    points = [(p["labeled"], p["kappa"]) for p in history
              if p.get("labeled") is not None and p.get("kappa") is not None]
    if not points:
        return None
    threshold = float((stopping or {}).get("threshold") or THRESHOLD)
    return line_chart(LineChart(
        title="agreement between versions", x_label="labeled tasks",
        # Zoomed in to the kappas (from 0.8 at most), so the gap to the threshold shows.
        y_label="kappa", y_percent=False, y_range=(min(0.8, math.floor(min(y for _, y in points) * 10) / 10), 1.0),
        x_range=x_range,
        series=[Series("kappa with the version a batch of labels earlier", points, colour="#7048e8")],
        guides=[Guide(threshold, f"stop at a mean of {threshold:g}")]))


def label_mix(label_counts: dict | None, predicted_counts: dict | None) -> dict:
    """Per label: tasks labeled by people and unlabeled tasks the model predicts as it."""
    labeled, predicted = _dict(label_counts), _dict(predicted_counts)
    names = list(dict.fromkeys([*labeled, *predicted]))
    rows = [(str(n), _count(labeled.get(n)) or 0, _count(predicted.get(n)) or 0) for n in names]
    return {"rows": rows, "chart": label_mix_chart(rows) if rows else None,
            "labeled_known": bool(labeled), "predicted_known": bool(predicted)}


def job_view(status: dict | None) -> dict:
    """The job state of `JobQueue.project_status` in the page's words."""
    status = status or {}
    running = status.get("running") or None
    last = status.get("last") if isinstance(status.get("last"), dict) else None
    last_encode = status.get("last_encode") if isinstance(status.get("last_encode"), dict) else None
    view = {"known": bool(status), "running": None, "waiting": status.get("waiting"),
            "last": None, "failure": None, "failed": int(status.get("failed") or 0),
            "succeeded": int(status.get("succeeded") or 0)}
    if running:
        progress = running.get("progress") or {}
        done, total = int(progress.get("done") or 0), int(progress.get("total") or 0)
        view["running"] = {
            "job_id": running.get("job_id"),
            "stage": progress.get("stage") or "starting",
            "done": done, "total": total,
            "fraction": min(done / total, 1.0) if total > 0 else None,
            "since": _ago(running.get("started_at")),
        }
    if last:
        view["last"] = {"status": last.get("status"), "model_version": last.get("model_version"),
                        "when": _ago(last.get("finished_at")), "duration": last.get("duration"),
                        "reason": last.get("reason")}
    # The newest failure of either kind of job, in the words the job wrote.
    failures = [(r.get("finished_at") or 0, kind, r) for kind, r in (("retrain", last), ("encoding", last_encode))
                if r and r.get("status") == "failed"]
    if failures:
        _, kind, failed = max(failures, key=lambda f: f[0])
        view["failure"] = {"kind": kind, "error": failed.get("error") or "no reason was recorded",
                           "when": _ago(failed.get("finished_at")), "job_id": failed.get("job_id")}
    view["busy"] = bool(view["running"] or view["waiting"])
    return view


def next_tasks(entries, link: str) -> list[dict]:
    """The queue preview's tasks with their Label Studio links (`link` + task id)."""
    rows = []
    for entry in entries if isinstance(entries, list) else []:
        task_id = _count(_dict(entry).get("task_id"))
        if task_id is None:
            continue
        rows.append({"task_id": task_id, "url": f"{link}{task_id}", "score": _number(entry.get("score")),
                     "predicted": _text(entry.get("predicted")), "text": _text(entry.get("text"))})
    return rows


# The files the page reads were written by some version of the retrain, possibly an older or
# a newer one: every value is checked for its type here, so the templates only ever see a
# number, a string or None.
SIGNAL_NUMBERS = ("kappa", "kappa_mean", "threshold", "uncertainty", "predicted_incorrect",
                  "oof_accuracy", "oof_macro_f1")


def _signals(raw) -> dict | None:
    """A version's stopping signals (meta "stopping"), or None when it has none."""
    raw = _dict(raw)
    verdict = _text(raw.get("verdict"))
    history = raw.get("history")
    if not isinstance(history, list):
        # Several controls (model.stopping.combine_controls): the curve follows the first.
        controls = [c for c in _dict(raw.get("controls")).values() if isinstance(c, dict)]
        history = controls[0].get("history") if controls else None
    if verdict is None:
        return None
    signals = {name: _number(raw.get(name)) for name in SIGNAL_NUMBERS}
    signals.update(
        verdict=verdict, stabilised=raw.get("stabilised") is True,
        reason=_text(raw.get("reason")) or "", caveat=_text(raw.get("caveat")),
        window=_count(raw.get("window")), oof_n=_count(raw.get("oof_n")),
        history=[{"labeled": _count(p.get("labeled")), "kappa": _number(p.get("kappa")),
                  "oof_accuracy": _number(p.get("oof_accuracy")),
                  "predicted_incorrect": _number(p.get("predicted_incorrect"))}
                 for p in (history if isinstance(history, list) else []) if isinstance(p, dict)])
    return signals


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _count(value) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def _text(value) -> str | None:
    return value if isinstance(value, str) and value else None


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def _has_jobs(status: dict | None) -> bool:
    return bool(status and (status.get("running") or status.get("waiting") or status.get("last")
                            or status.get("requested")))


def _meta(store: ModelStore, project_id: int, version: str | None) -> dict | None:
    if not version:
        return None
    try:
        meta = store.read_meta(project_id, version)
    except (OSError, ValueError):  # pruned between listing and reading, or unreadable
        return None
    return meta if isinstance(meta, dict) else None


def _ago(timestamp) -> dict | None:
    """A time as "3 min ago" with its UTC date for the tooltip."""
    try:
        moment = float(timestamp)
    except (TypeError, ValueError):
        return None
    if moment <= 0:
        return None
    seconds = max(0.0, time.time() - moment)
    if seconds < 60:
        words = f"{seconds:.0f} s ago"
    elif seconds < 3600:
        words = f"{seconds / 60:.0f} min ago"
    elif seconds < 86400:
        words = f"{seconds / 3600:.1f} h ago"
    else:
        words = f"{seconds / 86400:.0f} days ago"
    utc = datetime.fromtimestamp(moment, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return {"words": words, "utc": utc}
