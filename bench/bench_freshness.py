"""Freshness: from one new annotation to every task's new prediction in Label Studio.

Issue 3, point 1. A real Label Studio 1.23.2 (its own venv, tests/support/label_studio.py),
the backend under gunicorn, one rq worker. A project of N text tasks (airline tweets and
movie snippets) whose encodings are cached (TASKS_CREATED encodes them in the background),
a first model, then R rounds of: annotate one task, time until the project's model_version
switched to the new version (the job switches it only after every prediction was uploaded).
The parts come from the job's own timings.

    .venv/bin/python bench/bench_freshness.py --tasks 10000 --rounds 3
    .venv/bin/python bench/bench_freshness.py --tasks 10000 --ls-memory-efficient-import

`--ls-memory-efficient-import` starts Label Studio with its feature flag
fflag_fix_back_4620_memory_efficient_predictions_import_08012025_short=true: without it,
every prediction-import request recounts the counters of every task of the project.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from backend.model_store import version_number  # noqa: E402
from model.datasets import airline_tweets, movie_snippets  # noqa: E402
from tests.support.label_studio import LabelStudioServer  # noqa: E402
from tests.support.ls_project import CONFIG, jobs_of, wait_until_idle  # noqa: E402
from tests.support.services import Services  # noqa: E402

FLAG = "fflag_fix_back_4620_memory_efficient_predictions_import_08012025_short"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=None, help="PREDICTION_CHUNK (default: the backend's)")
    parser.add_argument("--ls-memory-efficient-import", action="store_true")
    parser.add_argument("--workers", type=int, default=1, help="rq worker processes")
    parser.add_argument("--fanout", type=int, default=None,
                        help="FANOUT_TASKS: publish through slice jobs of at most this many predictions")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "atl-backend" / "bench-freshness")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "freshness.json")
    args = parser.parse_args()

    from label_studio_sdk.client import LabelStudio

    pool = airline_tweets(("Positive", "Negative"))
    movies = movie_snippets()
    texts = (pool.texts + movies.texts)[: args.tasks]
    truth = dict(zip(pool.texts + movies.texts, pool.labels + movies.labels))
    ls_env = {FLAG: "true"} if args.ls_memory_efficient_import else {}
    # One backend data dir across runs: the encoding cache is reused (projects get new ids).
    run_dir = args.work / "backend-data"
    extra = {"PREDICTION_CHUNK": str(args.chunk)} if args.chunk else {}
    if args.fanout is not None:
        extra["FANOUT_TASKS"] = str(args.fanout)
    with LabelStudioServer(args.work / "ls-data", extra_env=ls_env) as ls, \
            Services(run_dir, extra_env=extra) as services:
        services.start_redis()
        services.env.update(LABEL_STUDIO_URL=ls.url, LABEL_STUDIO_API_KEY=ls.api_key, RECONCILE_INTERVAL="0")
        services.start_web()
        for _ in range(args.workers):
            services.start_worker()
        client = LabelStudio(base_url=ls.url, api_key=ls.api_key, timeout=600)
        project = client.projects.create(title=f"freshness {args.tasks}", label_config=CONFIG)
        client.ml.create(url=services.url, project=project.id, title="ATL", is_interactive=False)
        started = time.monotonic()
        for start in range(0, len(texts), 5000):
            client.projects.import_tasks(id=project.id, request=[{"text": t} for t in texts[start:start + 5000]])
        print(f"imported {len(texts)} tasks in {time.monotonic() - started:.1f}s", flush=True)
        # TASKS_CREATED encodes them in the background; wait for the cache to hold them all.
        while True:
            encode = jobs_of(services, project.id)["last_encode"]
            if encode and encode["tasks"] == len(texts):
                break
            time.sleep(2)
        print(f"background encoding done ({encode['encoded']} encoded, {encode['duration']:.0f}s)", flush=True)

        tasks = [t.model_dump(mode="json") for t in client.tasks.list(project=project.id, include="id,data",
                                                                      page_size=10000)]
        by_label: dict[str, list[int]] = {"Positive": [], "Negative": []}
        for task in tasks:
            by_label[truth[task["data"]["text"]]].append(task["id"])
        order = [tid for pair in zip(by_label["Positive"], by_label["Negative"]) for tid in pair]

        def annotate(task_id: int) -> None:
            text = next(t["data"]["text"] for t in tasks if t["id"] == task_id)
            client.annotations.create(id=task_id, result=[{
                "from_name": "sentiment", "to_name": "text", "type": "choices",
                "value": {"choices": [truth[text]]}}])

        for task_id in order[:40]:
            annotate(task_id)
        first = wait_for_newer(client, project.id, 0, timeout=1800)
        wait_until_idle(services, project.id, timeout=1800)
        print(f"first model {first}", flush=True)

        rounds = []
        for r in range(args.rounds):
            current = client.projects.get(id=project.id).model_version
            t0 = time.monotonic()
            annotate(order[40 + r])
            version = wait_for_newer(client, project.id, version_number(current), timeout=1800)
            elapsed = time.monotonic() - t0
            last = wait_until_idle(services, project.id, timeout=1800)["last"]
            row = {"round": r + 1, "model_version": version, "webhook_to_switched_s": round(elapsed, 2),
                   "queue_wait_s": last.get("queue_wait"), **{f"{k}_s": v for k, v in last["timings"].items()},
                   "sync": last.get("sync"), "encoded": last.get("encoded"), "publish": last.get("publish")}
            rounds.append(row)
            print(json.dumps(row), flush=True)

        # Every task carries a prediction of the final version.
        final = client.projects.get(id=project.id).model_version
        counted = sum(1 for t in client.tasks.list(project=project.id, fields="all", page_size=1000)
                      if any(p.model_version == final for p in (t.predictions or [])))

    result = {
        "tasks": len(texts), "ls_memory_efficient_import": args.ls_memory_efficient_import,
        "prediction_chunk": args.chunk or "default", "workers": args.workers,
        "fanout_tasks": args.fanout if args.fanout is not None else "default", "rounds": rounds,
        "tasks_with_final_version": counted,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load": os.getloadavg()},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print()
    print(f"| round | webhook → switched (s) | queue wait | read LS | encode | train | score | publish (upload + switch) |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rounds:
        print(f"| {row['round']} | {row['webhook_to_switched_s']} | {row['queue_wait_s']} | "
              f"{row.get('read_label_studio_s')} | {row.get('encode_s')} | {row.get('train_s')} | "
              f"{row.get('score_s')} | {row.get('publish_s')} |")
    print(f"\ntasks with a prediction of the final version: {counted} / {len(texts)}; wrote {args.out}")
    return 0


def wait_for_newer(client, project_id: int, newer_than: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        version = client.projects.get(id=project_id).model_version
        if version_number(version or "") > newer_than:
            return version
        time.sleep(0.25)
    raise TimeoutError(f"no model version newer than {newer_than}")


if __name__ == "__main__":
    sys.exit(main())
