"""Freshness: one new annotation to every task's new prediction in Label Studio, against
Label Studio's own bulk import of the same number of predictions, in one run.

Issue 3, point 1 and issue 18. A real Label Studio 1.23.2 (its own venv,
tests/support/label_studio.py), the backend under gunicorn, one rq worker, a project of N
text tasks whose encodings are cached, and a first model. Then R rounds, each with two
measurements taken in turns (backend first in odd rounds, reference first in even ones, so
a load spike from another process hits both about equally):

* **backend**: annotate one task through the API and wait until the project's
  `model_version` switched to the new version (the job switches it only after Label Studio
  accepted every prediction; the benchmark watches the backend's `/jobs` and then checks
  Label Studio): webhook, queue, reading Label Studio, training, scoring and the upload of
  N predictions, up to the switch the job stamps (`after_switch.switched_at`); the deletion
  of superseded predictions that follows is reported apart (`tidy_s`);
* **reference**: the bare upload of N predictions of the same shape (one per task, the
  project's Choices result, a float score, one model version) through the same request
  the backend sends (`backend.label_studio.import_predictions_json`: the import endpoint,
  the SDK's authenticated client, the list encoded by `json.dumps`) in chunks of the
  backend's PREDICTION_CHUNK, one after the other: what Label Studio itself needs to take
  in a model version, with nothing else. (Until commit b054054 both sides went through the
  SDK's `projects.import_predictions`, whose Python serialisation walk added 0.25 s per
  10,000 one-result predictions to each.)

The figure is **ratio = backend seconds / reference seconds of the same round**, reported
as the median and range over rounds; target <= 1.2 (issue 18). Absolute times are stated
next to their load and CPU pressure (`run_record.Run.measure`).

    .venv/bin/python bench/bench_freshness.py --tasks 10000 --rounds 5
    .venv/bin/python bench/bench_freshness.py --tasks 100000 --rounds 3

Tasks are distinct texts: airline tweets and movie snippets in a fixed shuffle. Above
2,000 base texts the project repeats them with a " (#k)" suffix, and the benchmark stores
the base text's vector for each copy in the backend's encoding cache before the import
(encoding 98,000 more texts would take hours on these 2 busy cores; freshness never encodes
a cached task, and its timings do not depend on the vectors' values). The base texts are encoded for real,
once, with the backend's own encoder; the cache is kept in `--work` between runs (one data
directory per size, the first copied from another size's).

Label Studio runs with its memory-efficient prediction import (the feature flag that
docker-compose.yml sets); `--ls-default-import` runs it without (every import request then
recounts every task of the project: minutes for 10,000). `LS_DATA_DIR` sets Label Studio's
data directory (default: `--work`/ls-data).

`--three-controls` (issue 13, point 6) adds a second project of the same N tasks under a
label config of three Choices controls (`bench/three_controls.py`: sentiment, length,
multi-label tone), in the same Label Studio and backend; its first labels and every
round's annotation answer all three. Each round then measures the three-control backend
too, in turns with the one-control one (one-control first in odd rounds, three-control
first in even ones), and reports **3-control / 1-control backend seconds of the same
round**, median and range; target <= 1.3. In two runs at load 13-17 the second round
stopped: Label Studio took over a minute to delete the three-control project's superseded
version (10,000 predictions), its SQLite stayed locked, and the next annotation got a 500;
`--keep-prediction-versions` (at least --rounds) keeps every version for the run.

    .venv/bin/python bench/bench_freshness.py --tasks 10000 --rounds 4 --three-controls
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import time
from pathlib import Path

import three_controls
from run_record import REPO, Run, spread, spread_text, table  # also puts the repository on sys.path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from backend.label_config import parse_label_config  # noqa: E402
from backend.label_studio import _sdk_request, import_predictions_json  # noqa: E402
from backend.model_store import version_number  # noqa: E402
from model.datasets import airline_tweets, movie_snippets  # noqa: E402
from tests.support.label_studio import LabelStudioServer  # noqa: E402
from tests.support.ls_project import CONFIG, jobs_of, wait_until_idle  # noqa: E402
from tests.support.services import Services  # noqa: E402

FLAG = "fflag_fix_back_4620_memory_efficient_predictions_import_08012025_short"
BASE_TEXTS = 2_000
TARGET_RATIO = 1.2
FIRST_LABELS = 40
THREE_CONTROLS_TARGET = 1.3


def project_texts(n: int) -> tuple[list[str], dict[str, str]]:
    """N distinct task texts and the true label of each (copies carry their base's label)."""
    pool = airline_tweets(("Positive", "Negative"))
    movies = movie_snippets()
    truth = dict(zip(pool.texts + movies.texts, pool.labels + movies.labels))
    # The corpora are sorted by label; a fixed shuffle gives every size both classes.
    base = sorted(truth)
    random.Random(0).shuffle(base)
    base = base[: min(n, BASE_TEXTS)]
    texts = list(base)
    copy = 1
    while len(texts) < n:
        texts.extend(f"{t} (#{copy})" for t in base[: n - len(texts)])
        copy += 1
    labels = {t: truth[t] for t in base}
    labels.update({t: labels[t.rsplit(" (#", 1)[0]] for t in texts[len(base):]})
    return texts, labels


def fresh_backend_data(run_dir: Path) -> None:
    """Remove everything of an earlier run but the encoding cache: Redis's saved queue, model
    versions and task copies would otherwise meet a new Label Studio's reused project ids."""
    import shutil

    if run_dir.exists():
        for path in run_dir.iterdir():
            if not path.name.startswith("encodings.sqlite3"):
                shutil.rmtree(path) if path.is_dir() else path.unlink()


def copy_encoding_cache(work: Path, run_dir: Path) -> None:
    """Start a size's empty cache from another size's (SQLite's backup API: safe while that
    one is in use), so the base texts are encoded once for all sizes."""
    import sqlite3

    target = run_dir / "encodings.sqlite3"
    others = sorted(p for p in work.glob("backend-data-*/encodings.sqlite3") if p != target)
    if target.exists() or not others:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    source, copy = sqlite3.connect(others[-1]), sqlite3.connect(target)
    with copy:
        source.backup(copy)
    source.close()
    copy.close()


def fill_encoding_cache(data_dir: Path, texts: list[str], base_count: int) -> dict:
    """Make the backend's cache hold every task's vector: base texts encoded for real (once),
    copies given their base text's vector. Returns what was done, for the record."""
    from backend.ml_backend import get_encoder
    from backend.settings import Settings
    from model.encoding_cache import EncodingCache, encode_with_cache

    settings = Settings.from_env(data_dir=data_dir)
    cache = EncodingCache(settings.encoding_cache_path)
    encoder = get_encoder(settings)
    base, copies = texts[:base_count], texts[base_count:]
    started = time.monotonic()
    vectors, encoded = encode_with_cache(encoder, cache, base)
    encode_s = time.monotonic() - started
    copied = 0
    if copies:
        _, missing = cache.lookup(encoder.id, copies)
        if missing:
            index = {t: i for i, t in enumerate(base)}
            todo = [copies[i] for i in missing]
            cache.store(encoder.id, todo, vectors[[index[t.rsplit(" (#", 1)[0]] for t in todo]])
            copied = len(todo)
    return {"encoder": encoder.id, "base_texts": len(base), "base_encoded_now": encoded,
            "base_encode_s": round(encode_s, 1), "copies": len(copies), "copies_stored_now": copied}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=None, help="PREDICTION_CHUNK (default: the backend's)")
    parser.add_argument("--ls-default-import", action="store_true",
                        help=f"run Label Studio without {FLAG}")
    parser.add_argument("--workers", type=int, default=1, help="rq worker processes")
    parser.add_argument("--fanout", type=int, default=None,
                        help="FANOUT_TASKS: publish through slice jobs of at most this many predictions")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "atl-backend" / "bench-freshness")
    parser.add_argument("--out", type=Path, default=None,
                        help="result JSON (default bench/results/bench_freshness-<tasks>.json, "
                             "bench_freshness-<tasks>-3-controls.json with --three-controls)")
    parser.add_argument("--keep-prediction-versions", type=int, default=None,
                        help="KEEP_PREDICTION_VERSIONS (default: the backend's): with at least --rounds, no "
                             "superseded version is deleted during the run")
    parser.add_argument("--three-controls", action="store_true",
                        help="also measure a project with three Choices controls, in turns with the "
                             "one-control project: ratio 3-control / 1-control per round")
    args = parser.parse_args()
    # A SIGTERM (e.g. from `timeout`) unwinds the with-blocks below, which stop Label Studio,
    # gunicorn, the workers and Redis, instead of leaving them running.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from label_studio_sdk.client import LabelStudio
    from label_studio_sdk.core.api_error import ApiError

    from backend.settings import Settings

    suffix = "-3-controls" if args.three_controls else ""
    run = Run("bench_freshness",
              out=args.out or REPO / "bench" / "results" / f"bench_freshness-{args.tasks}{suffix}.json")
    chunk = args.chunk or Settings.from_env().prediction_chunk
    texts, truth = project_texts(args.tasks)
    base_count = min(args.tasks, BASE_TEXTS)
    # One backend data dir per size, kept across runs for its encoding cache (everything
    # else is removed), so two sizes can run at once.
    run_dir = args.work / f"backend-data-{args.tasks}{'-ls-default-import' if args.ls_default_import else ''}"
    fresh_backend_data(run_dir)
    copy_encoding_cache(args.work, run_dir)
    ls_dir = Path(os.environ.get("LS_DATA_DIR") or args.work / "ls-data")
    started = time.monotonic()
    run["encoding_cache"] = fill_encoding_cache(run_dir, texts, base_count)
    print(f"# encoding cache ready in {time.monotonic() - started:.0f} s: {run['encoding_cache']}", flush=True)

    ls_env = {} if args.ls_default_import else {FLAG: "true"}
    extra = {"PREDICTION_CHUNK": str(chunk)}
    if args.fanout is not None:
        extra["FANOUT_TASKS"] = str(args.fanout)
    if args.keep_prediction_versions is not None:
        extra["KEEP_PREDICTION_VERSIONS"] = str(args.keep_prediction_versions)
    run["settings"] = {"tasks": args.tasks, "rounds": args.rounds, "prediction_chunk": chunk,
                       "ls_memory_efficient_import": not args.ls_default_import, "rq_workers": args.workers,
                       "fanout_tasks": args.fanout if args.fanout is not None else "default",
                       "ls_data_dir": str(ls_dir),
                       # --keep-prediction-versions (or KEEP_PREDICTION_VERSIONS in the environment)
                       # keeps Label Studio from deleting a version's predictions between rounds.
                       "keep_prediction_versions": (args.keep_prediction_versions if args.keep_prediction_versions
                                                    is not None else os.environ.get("KEEP_PREDICTION_VERSIONS",
                                                                                    "default"))}
    with LabelStudioServer(ls_dir, extra_env=ls_env) as ls, Services(run_dir, extra_env=extra) as services:
        services.start_redis()
        services.env.update(LABEL_STUDIO_URL=ls.url, LABEL_STUDIO_API_KEY=ls.api_key, RECONCILE_INTERVAL="0")
        services.start_web()
        for _ in range(args.workers):
            services.start_worker()
        client = LabelStudio(base_url=ls.url, api_key=ls.api_key, timeout=900)
        project = client.projects.create(title=f"freshness {args.tasks} {time.time():.0f}", label_config=CONFIG)
        client.ml.create(url=services.url, project=project.id, title="ATL", is_interactive=False)
        setup_started = time.monotonic()
        for start in range(0, len(texts), 5000):
            client.projects.import_tasks(id=project.id, request=[{"text": t} for t in texts[start:start + 5000]])
        run["import_tasks_s"] = round(time.monotonic() - setup_started, 1)
        print(f"# imported {len(texts)} tasks in {run['import_tasks_s']} s", flush=True)
        # TASKS_CREATED checks the cache in the background; wait until it saw every task.
        while True:
            encode = jobs_of(services, project.id)["last_encode"]
            if encode and encode.get("tasks") == len(texts) and encode.get("status") != "encoding":
                break
            time.sleep(2)
        print(f"# background encoding job: {encode.get('encoded')} encoded", flush=True)

        tasks = [(t.id, t.data["text"]) for t in client.tasks.list(project=project.id, include="id,data",
                                                                   page_size=5000)]
        by_label: dict[str, list[int]] = {"Positive": [], "Negative": []}
        text_of = dict(tasks)
        for task_id, text in tasks:
            by_label[truth[text]].append(task_id)
        order = [tid for pair in zip(by_label["Positive"], by_label["Negative"]) for tid in pair]

        def call(request):
            """`request(client)`, sent once more with a new client after a 401: the SDK
            refreshes its access token only before it sends, so a request that reaches a
            busy Label Studio just after the token expired is refused (seen at 100,000 tasks,
            load 8). Authentication comes first, so the refused request changed nothing."""
            nonlocal client
            try:
                return request(client)
            except ApiError as exc:
                if exc.status_code != 401:
                    raise
                run.record["token_401_retries"] = run.record.get("token_401_retries", 0) + 1
                client = LabelStudio(base_url=ls.url, api_key=ls.api_key, timeout=900)
                return request(client)

        def annotate(task_id: int) -> None:
            call(lambda c: c.annotations.create(id=task_id, result=[{
                "from_name": "sentiment", "to_name": "text", "type": "choices",
                "value": {"choices": [truth[text_of[task_id]]]}}]))

        for task_id in order[:FIRST_LABELS]:
            annotate(task_id)
        first = wait_for_newer(client, project.id, 0, timeout=3600)
        wait_until_idle(services, project.id, timeout=3600)
        run["first_model_s"] = round(time.monotonic() - setup_started, 1)
        print(f"# first model {first} ({run['first_model_s']} s after the import started)", flush=True)
        three = None
        if args.three_controls:
            three = ThreeControlProject(call, services, texts, truth)
            run["three_controls_first_model_s"] = three.set_up(client, f"freshness {args.tasks} three controls")
            print(f"# three-control project {three.id}: first model after "
                  f"{run['three_controls_first_model_s']} s", flush=True)

        # The reference payload, built before the clock starts: one prediction per task in
        # the project's result shape, as the backend sends them (backend/ml_backend.py).
        config = parse_label_config(CONFIG)
        rng = random.Random(0)
        payload = [{"task": task_id, "result": config.result_for(rng.choice(list(config.choices))),
                    "score": rng.random()} for task_id, _ in tasks]

        def reference_import(label: str) -> None:
            for start in range(0, len(payload), chunk):
                part = [dict(p, model_version=label) for p in payload[start:start + chunk]]
                call(lambda c, part=part: import_predictions_json(c, project.id, part))

        for r in range(1, args.rounds + 1):
            sides = ["backend", "reference"] if r % 2 else ["reference", "backend"]
            if three is not None:
                sides = ["backend", "backend-3", "reference"] if r % 2 else ["reference", "backend-3", "backend"]
            for side in sides:
                if side == "backend-3":
                    three.measure(run, r)
                    continue
                if side == "reference":
                    with run.measure(round=r, side="reference", predictions=len(payload)):
                        reference_import(f"bench-reference-{r}")
                    continue
                current = call(lambda c: c.projects.get(id=project.id)).model_version
                with run.measure(round=r, side="backend") as row:
                    annotated_at = time.time()
                    annotate(order[FIRST_LABELS + r - 1])
                    row["model_version"] = wait_for_switch(services, project.id, version_number(current),
                                                           timeout=3600)
                switched = call(lambda c: c.projects.get(id=project.id)).model_version
                if switched != row["model_version"]:
                    raise RuntimeError(f"the backend reports {row['model_version']} but Label Studio's "
                                       f"project is on {switched}")
                last = wait_until_idle(services, project.id, timeout=3600)["last"]
                # Freshness ends at the switch, which the job stamps; what the job does after
                # it (deleting superseded predictions) is timed apart, as tidy_s.
                after = last.get("after_switch") or {}
                if after.get("switched_at"):
                    row["job_finished_s"] = row["seconds"]
                    row["seconds"] = round(after["switched_at"] - annotated_at, 3)
                    row["tidy_s"] = after.get("seconds")
                row.update({"queue_wait_s": last.get("queue_wait"),
                            **{f"{k}_s": v for k, v in (last.get("timings") or {}).items()},
                            "publish_jobs": last.get("publish_jobs"), "publish": last.get("publish"),
                            "sync": last.get("sync")})
            pair = {m["side"]: m for m in run.measurements if m["round"] == r}
            print(f"# round {r}: backend {pair['backend']['seconds']:.1f} s, reference "
                  f"{pair['reference']['seconds']:.1f} s, ratio "
                  f"{pair['backend']['seconds'] / pair['reference']['seconds']:.3f}, load "
                  f"{pair['backend']['load_before']}–{pair['reference']['load_after']}", flush=True)

        # Every task carries a prediction of the final version. Reading every task with all
        # its predictions back takes longer than the rounds above 20,000 tasks; there the
        # count is Label Studio's own count of that version's predictions (its
        # /model-versions answer, which counts predictions, not tasks).
        final = client.projects.get(id=project.id).model_version
        if len(texts) <= 20000:
            run["tasks_with_final_version"] = sum(
                1 for t in client.tasks.list(project=project.id, fields="all", page_size=1000)
                if any(p.model_version == final for p in (t.predictions or [])))
        else:
            counts = call(lambda c: _sdk_request(c, "GET", f"api/projects/{project.id}/model-versions/"))
            run["tasks_with_final_version"] = f"{counts.get(final)} predictions of it (Label Studio's count)"
        if three is not None:
            three.count_final_predictions()

    rows = []
    ratios = []
    for r in range(1, args.rounds + 1):
        pair = {m["side"]: m for m in run.measurements if m["round"] == r}
        b, ref = pair["backend"], pair["reference"]
        ratios.append(b["seconds"] / ref["seconds"])
        rows.append({"round": r, "first": "backend" if r % 2 else "reference",
                     "backend s": b["seconds"], "reference s": ref["seconds"], "ratio": round(ratios[-1], 3),
                     "read LS": b.get("read_label_studio_s"), "of it, params wait": b.get("extra_params_wait_s"),
                     "train": b.get("train_s"),
                     "score": b.get("score_s"), "stage": b.get("stage_s"), "build": b.get("build_predictions_s"),
                     "upload": b.get("upload_s"), "switch, after": b.get("publish_s"),
                     "tidy": b.get("tidy_s"),
                     # The backend's fixed cost: everything of its time but the upload.
                     "not upload": round(b["seconds"] - b["upload_s"], 3) if b.get("upload_s") else None,
                     "load": f"{b['load_before']}–{b['load_after']} / {ref['load_before']}–{ref['load_after']}",
                     "CPU pressure % (during)": f"{b['cpu_pressure_during']} / {ref['cpu_pressure_during']}"})
    backend_s = [m["seconds"] for m in run.measurements if m["side"] == "backend"]
    reference_s = [m["seconds"] for m in run.measurements if m["side"] == "reference"]
    loads = [m[k] for m in run.measurements for k in ("load_before", "load_after")]
    run["summary"] = {
        "ratio_definition": "backend seconds (annotation -> model_version switched) / reference seconds "
                            "(bare chunked import of as many predictions), same round; median over rounds",
        "ratio": spread(ratios), "backend_s": spread(backend_s), "reference_s": spread(reference_s),
        "reference_ms_per_prediction": round(1000 * spread(reference_s)["median"] / len(payload), 3),
        "load": spread(loads), "target_ratio": TARGET_RATIO,
        "meets_target": spread(ratios)["median"] <= TARGET_RATIO,
    }
    run["rounds"] = rows
    if three is not None:
        run["three_controls"] = three.summary(run, args.rounds)
    print()
    print(table(rows))
    s = run["summary"]
    print(f"\n{args.tasks} tasks: ratio backend/reference {spread_text(ratios, 3)}; target <= {TARGET_RATIO}: "
          f"{'met' if s['meets_target'] else 'MISSED'}. backend {spread_text(backend_s, 1)} s, reference "
          f"{spread_text(reference_s, 1)} s ({s['reference_ms_per_prediction']} ms per prediction), load "
          f"{s['load']['min']}–{s['load']['max']}; tasks with a prediction of the final version: "
          f"{run['tasks_with_final_version']} / {len(texts)}")
    if three is not None:
        t = run["three_controls"]
        print()
        print(table(t["table"]))
        print(f"\n{args.tasks} tasks: 3-control / 1-control backend {t['ratio_text']}; target <= "
              f"{THREE_CONTROLS_TARGET}: {'met' if t['meets_target'] else 'MISSED'}. 3-control backend "
              f"{spread_text(t['seconds_list'], 1)} s; tasks of the three-control project with a "
              f"prediction of its final version filling all three controls: {t['tasks_fully_predicted']} "
              f"/ {len(texts)}")
    run.write()
    return 0


class ThreeControlProject:
    """`--three-controls`: the same tasks in a second project under `three_controls.CONFIG`,
    trained by the same backend and measured in turns with the one-control project."""

    def __init__(self, call, services, texts: list[str], truth: dict[str, str]):
        self.call, self.services, self.texts, self.truth = call, services, texts, truth
        self.config = parse_label_config(three_controls.CONFIG)
        self.id: int | None = None
        self.order: list[int] = []
        self.text_of: dict[int, str] = {}
        self.tasks_fully_predicted: int | None = None

    def result(self, text: str) -> list[dict]:
        """An annotation answering all three controls (a copy answers as its base text)."""
        base = text.rsplit(" (#", 1)[0]
        return self.config.results_for(three_controls.answers(base, self.truth[text]))

    def annotate(self, task_id: int) -> None:
        result = self.result(self.text_of[task_id])
        self.call(lambda c: c.annotations.create(id=task_id, result=result))

    def set_up(self, client, title: str) -> float:
        """Create the project, import the tasks, give it FIRST_LABELS answered tasks and wait
        for its first model. Returns the seconds that took."""
        started = time.monotonic()
        project = self.call(lambda c: c.projects.create(title=f"{title} {time.time():.0f}",
                                                        label_config=three_controls.CONFIG))
        self.id = project.id
        self.call(lambda c: c.ml.create(url=self.services.url, project=self.id, title="ATL", is_interactive=False))
        for start in range(0, len(self.texts), 5000):
            part = [{"text": t} for t in self.texts[start:start + 5000]]
            self.call(lambda c, part=part: c.projects.import_tasks(id=self.id, request=part))
        while True:  # the TASKS_CREATED job checks the encoding cache for every task
            encode = jobs_of(self.services, self.id)["last_encode"]
            if encode and encode.get("tasks") == len(self.texts) and encode.get("status") != "encoding":
                break
            time.sleep(2)
        tasks = self.call(lambda c: [(t.id, t.data["text"]) for t in c.tasks.list(
            project=self.id, include="id,data", page_size=5000)])
        self.text_of = dict(tasks)
        by_label: dict[str, list[int]] = {"Positive": [], "Negative": []}
        for task_id, text in tasks:
            by_label[self.truth[text]].append(task_id)
        self.order = [tid for pair in zip(by_label["Positive"], by_label["Negative"]) for tid in pair]
        for task_id in self.order[:FIRST_LABELS]:
            self.annotate(task_id)
        wait_for_newer(client, self.id, 0, timeout=3600)
        wait_until_idle(self.services, self.id, timeout=3600)
        return round(time.monotonic() - started, 1)

    def measure(self, run: Run, round_: int) -> None:
        """One round's three-control measurement, as the one-control backend side is taken:
        annotate one task (all three controls) until the project switched version."""
        current = self.call(lambda c: c.projects.get(id=self.id)).model_version
        with run.measure(round=round_, side="backend-3") as row:
            self.annotate(self.order[FIRST_LABELS + round_ - 1])
            row["model_version"] = wait_for_switch(self.services, self.id, version_number(current), timeout=3600)
        switched = self.call(lambda c: c.projects.get(id=self.id)).model_version
        if switched != row["model_version"]:
            raise RuntimeError(f"the backend reports {row['model_version']} for the three-control project "
                               f"but Label Studio's project is on {switched}")
        last = wait_until_idle(self.services, self.id, timeout=3600)["last"]
        row.update({**{f"{k}_s": v for k, v in (last.get("timings") or {}).items()},
                    "publish": last.get("publish")})
        print(f"# round {round_}: three-control backend {row['seconds']:.1f} s", flush=True)

    def count_final_predictions(self) -> None:
        """Tasks whose prediction of the project's final version holds a result for every control."""
        final = self.call(lambda c: c.projects.get(id=self.id)).model_version
        names = {c.name for c in self.config.controls}
        tasks = self.call(lambda c: list(c.tasks.list(project=self.id, fields="all", page_size=1000)))
        self.tasks_fully_predicted = sum(
            1 for t in tasks
            if any(p.model_version == final and names <= {_from_name(r) for r in (p.result or [])}
                   for p in (t.predictions or [])))

    def summary(self, run: Run, rounds: int) -> dict:
        """Per round 3-control / 1-control backend seconds, and their median and range."""
        rows, ratios = [], []
        for r in range(1, rounds + 1):
            pair = {m["side"]: m for m in run.measurements if m["round"] == r}
            one, three = pair["backend"], pair["backend-3"]
            ratios.append(three["seconds"] / one["seconds"])
            rows.append({"round": r, "first": "1 control" if r % 2 else "3 controls",
                         "1 control s": one["seconds"], "3 controls s": three["seconds"],
                         "ratio 3/1": round(ratios[-1], 3),
                         "train (1 / 3)": f"{one.get('train_s')} / {three.get('train_s')}",
                         "score (1 / 3)": f"{one.get('score_s')} / {three.get('score_s')}",
                         "publish (1 / 3)": f"{one.get('publish_s')} / {three.get('publish_s')}",
                         "load (1 / 3)": f"{one['load_before']}–{one['load_after']} / "
                                         f"{three['load_before']}–{three['load_after']}"})
        seconds = [m["seconds"] for m in run.measurements if m["side"] == "backend-3"]
        return {"ratio_definition": "three-control backend seconds / one-control backend seconds, same round",
                "project": self.id, "ratio": spread(ratios), "ratio_text": spread_text(ratios, 3),
                "seconds": spread(seconds), "seconds_list": seconds, "target_ratio": THREE_CONTROLS_TARGET,
                "meets_target": spread(ratios)["median"] <= THREE_CONTROLS_TARGET,
                "tasks_fully_predicted": self.tasks_fully_predicted, "table": rows}


def _from_name(region) -> str | None:
    return region.get("from_name") if isinstance(region, dict) else getattr(region, "from_name", None)


def wait_for_switch(services, project_id: int, newer_than: int, timeout: float) -> str:
    """Poll the backend's /jobs until its last finished job switched the project to a version
    newer than `newer_than`. The job records that only after Label Studio accepted every
    prediction and the project's model_version was set, so this is an upper bound of the
    switch, within the 0.1 s poll. Polling the backend rather than Label Studio keeps the
    measurement from loading Label Studio, which the reference does not have to share."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        last = jobs_of(services, project_id).get("last") or {}
        if last.get("status") == "finished" and version_number(last.get("model_version") or "") > newer_than:
            return last["model_version"]
        time.sleep(0.1)
    raise TimeoutError(f"no model version newer than {newer_than} within {timeout:.0f} s")


def wait_for_newer(client, project_id: int, newer_than: int, timeout: float) -> str:
    """Poll the project until its model_version is a backend version newer than `newer_than`."""
    from label_studio_sdk.core.api_error import ApiError

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            version = client.projects.get(id=project_id).model_version
        except ApiError as exc:  # a token that expired in flight (see `call` in main): poll again
            if exc.status_code != 401:
                raise
            version = None
        if version_number(version or "") > newer_than:
            return version
        time.sleep(0.25)
    raise TimeoutError(f"no model version newer than {newer_than} within {timeout:.0f} s")


if __name__ == "__main__":
    raise SystemExit(main())
