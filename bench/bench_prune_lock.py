"""How long Label Studio's delete of one prediction version blocks annotators, per version size.

The backend deletes a superseded model version in one request (`DELETE
/api/projects/<id>/model-versions/`, `backend.publish.remove_superseded`). Label Studio runs it
in one transaction with a count and a task save per prediction (its `pre_delete` signal), so on
its default SQLite database the write lock is held for the whole delete. This benchmark
measures, per size N: a project of N text tasks gets N predictions of a version "old" (bulk
import) and N of "live"; then "old" is deleted while an annotator thread submits an annotation
every 0.2 s, and it records the delete's seconds, how many annotations failed ("database is
locked" answers 500) and the slowest one that succeeded. It is what `PRUNE_MAX_PREDICTIONS`
(backend/settings.py) is chosen from.

    .venv/bin/python bench/bench_prune_lock.py --sizes 1000 2000 5000 10000

Label Studio 1.23.2 in its own venv with SQLite, as `docker-compose.yml` runs it; writes
bench/results/bench_prune_lock.json, prints a Markdown table.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

from run_record import Run, table  # also puts the repository on sys.path

from model.datasets import airline_tweets  # noqa: E402
from tests.support.label_studio import LabelStudioServer  # noqa: E402
from tests.support.ls_project import CONFIG  # noqa: E402


def prediction(task_id: int, version: str) -> dict:
    return {"task": task_id, "model_version": version, "score": 0.5,
            "result": [{"from_name": "sentiment", "to_name": "text", "type": "choices",
                        "value": {"choices": ["Positive"]}}]}


def annotate_meanwhile(client, task_ids: list[int], stop: threading.Event, outcome: dict) -> None:
    """Submit an annotation every 0.2 s until `stop`, as an annotator at work would."""
    for task_id in task_ids:
        if stop.is_set():
            return
        started = time.perf_counter()
        try:
            client.annotations.create(id=task_id, result=[
                {"from_name": "sentiment", "to_name": "text", "type": "choices",
                 "value": {"choices": ["Negative"]}}])
            outcome["ok"] += 1
            outcome["slowest_ok_s"] = max(outcome["slowest_ok_s"], time.perf_counter() - started)
        except Exception as exc:  # a 500 "database is locked" is what is counted here
            outcome["failed"] += 1
            outcome.setdefault("errors", []).append(str(exc)[:120])
        time.sleep(0.2)


def main() -> None:
    from label_studio_sdk.client import LabelStudio

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000, 5000, 10000])
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "atl-backend" / "bench-prune")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    run = Run("bench_prune_lock", out=args.out)
    texts = airline_tweets(("Positive", "Negative")).texts
    rows = []
    with LabelStudioServer(args.work / "ls-data") as ls:
        client = LabelStudio(base_url=ls.url, api_key=ls.api_key, timeout=900)
        for n in args.sizes:
            project = client.projects.create(title=f"prune {n} {time.time():.0f}", label_config=CONFIG)
            for start in range(0, n, 5000):
                client.projects.import_tasks(id=project.id, request=[
                    {"text": texts[i % len(texts)]} for i in range(start, min(n, start + 5000))])
            ids = sorted(t.id for t in client.tasks.list(project=project.id, page_size=1000, fields="task_only"))
            for version in ("old", "live"):
                for start in range(0, n, 1000):
                    client.projects.import_predictions(
                        id=project.id, request=[prediction(i, version) for i in ids[start:start + 1000]])
            outcome = {"ok": 0, "failed": 0, "slowest_ok_s": 0.0}
            stop = threading.Event()
            annotator = threading.Thread(target=annotate_meanwhile, args=(client, ids, stop, outcome))
            with run.measure(predictions=n) as row:
                annotator.start()
                time.sleep(0.5)  # the annotator is at work before the delete starts
                started = time.perf_counter()
                client._client_wrapper.httpx_client.request(  # no SDK method for this endpoint
                    f"api/projects/{project.id}/model-versions/", method="DELETE", json={"model_version": "old"})
                row["delete_s"] = round(time.perf_counter() - started, 2)
                time.sleep(0.5)
                stop.set()
                annotator.join()
                row.update(annotations_ok=outcome["ok"], annotations_failed=outcome["failed"],
                           slowest_ok_s=round(outcome["slowest_ok_s"], 2), errors=outcome.get("errors", [])[:3])
            rows.append(row)
            print(f"# {n} predictions: delete {row['delete_s']} s, annotations {outcome['ok']} ok / "
                  f"{outcome['failed']} failed, slowest ok {row['slowest_ok_s']} s, load {row['load_before']}",
                  flush=True)
    print(table([{"predictions": r["predictions"], "delete s": r["delete_s"], "annotations ok": r["annotations_ok"],
                  "failed": r["annotations_failed"], "slowest ok s": r["slowest_ok_s"],
                  "load": f"{r['load_before']}–{r['load_after']}"} for r in rows]))
    run.write()


if __name__ == "__main__":
    main()
