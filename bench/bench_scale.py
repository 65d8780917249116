"""Issue 3, point 5 without Label Studio: 100,000 tasks: cache size, full re-score, memory across retrains.

Encoding 100,000 texts for real takes over ten minutes on this 2-core machine, so the cache is
filled with RANDOM float16 vectors of dimension 384 (MiniLM's) under a fake encoder id. The
size of the cache and the time to read vectors back, score them and build predictions do not
depend on the vectors' values; the texts are real and distinct (airline tweets and movie
snippets, with a suffix per repetition), so keys and lookups are as in production.

Measured:

* the SQLite cache file after storing 100,000 vectors (target <= 100 MB), WAL checkpointed;
  and the same with the file created with 64 KiB pages, a candidate fix;
* a full re-score as `ActiveLearningBackend.fit` does it (target <= 30 s): lookup of the 100,000
  vectors from a freshly opened cache, `ClassifierHead.predict_proba`, argmax/max, and the
  100,000 prediction dicts; plus the JSON size of the largest upload chunk (PREDICTION_CHUNK);
* RSS of a separate process doing 20 retrain-like cycles (open the cache, look up 100,000
  vectors, fit a head on 2,000 labels, score 100,000, build the dicts), after each cycle, with
  glibc's memory in use and the count of Python objects: it must stay flat, as in an RQ
  SimpleWorker that runs every retrain in one process.

    .venv/bin/python bench/bench_scale.py [--tasks 100000] [--repeats 3] [--cycles 20]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from run_record import REPO, Run, conditions, pressure_during, spread, table  # also puts the repository on sys.path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import psutil  # noqa: E402

from backend.label_config import parse_label_config  # noqa: E402
from backend.settings import Settings  # noqa: E402
from model.classifier import ClassifierHead, HeadConfig  # noqa: E402
from model.datasets import airline_tweets, movie_snippets  # noqa: E402
from model.encoding_cache import EncodingCache  # noqa: E402

FAKE_ENCODER = "bench-random-float16-384d"
DIM = 384
LABELED = 2000
LABEL_CONFIG = ('<View><Text name="text" value="$text"/><Choices name="sentiment" toName="text">'
                '<Choice value="Positive"/><Choice value="Negative"/></Choices></View>')
MODEL_VERSION = "v0001-20260101-000000"
SIZE_COLUMNS = ["layout", "page size", "tasks", "cache MB (all files)", "vector bytes MB", "overhead", "target", "met",
                "store s", "load"]


def synthetic_texts(n: int) -> list[str]:
    """n distinct real-looking texts: the corpora, repeated with a numbered suffix."""
    base = list(dict.fromkeys(
        airline_tweets(classes=("Positive", "Negative", "Neutral")).texts + movie_snippets().texts))
    texts = [text if i < len(base) else f"{text} (#{i // len(base)})"
             for i, text in ((i, base[i % len(base)]) for i in range(n))]
    assert len(set(texts)) == n
    return texts


def fill_cache(run: Run, path: Path, texts: list[str], page_size: int | None) -> dict:
    """Store one random vector per text through EncodingCache; the files' size afterwards.

    `page_size` creates the file with that SQLite page size first (EncodingCache keeps it):
    the layout change this benchmark measures as a candidate fix, without touching model/.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if page_size:
        with sqlite3.connect(path) as db:
            db.execute(f"PRAGMA page_size={int(page_size)}")
            db.execute("VACUUM")  # writes the header, so the page size sticks
    cache = EncodingCache(path)
    rng = np.random.default_rng(0)
    with run.measure(measurement="store", page_size=page_size or "default") as measured:
        for start in range(0, len(texts), 10_000):
            part = texts[start:start + 10_000]
            cache.store(FAKE_ENCODER, part, rng.standard_normal((len(part), DIM)).astype(np.float16) * 0.1)
    store_s = measured["seconds"]
    assert cache.count(FAKE_ENCODER) == len(texts)
    del cache
    gc.collect()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        actual_page_size = db.execute("PRAGMA page_size").fetchone()[0]
    files = {p.name: p.stat().st_size for p in path.parent.iterdir() if p.name.startswith(path.name)}
    size_mb = sum(files.values()) / 1e6
    raw_mb = len(texts) * DIM * 2 / 1e6
    return {"layout": "EncodingCache as is" if page_size is None else f"same, file created with page_size={page_size}",
            "page size": actual_page_size, "tasks": len(texts), "cache MB (all files)": round(size_mb, 1),
            "vector bytes MB": round(raw_mb, 1), "overhead": f"{(size_mb / raw_mb - 1) * 100:.0f}%",
            "target": "<= 100 MB", "met": "yes" if size_mb <= 100 else f"NO (+{size_mb - 100:.1f} MB)",
            "store s": round(store_s, 1), "load": f"{measured['load_before']}–{measured['load_after']}",
            "files_bytes": files}


def rescore(cache_path: Path, texts: list[str], head: ClassifierHead, config) -> tuple[dict, list[dict]]:
    """What fit() does after training, minus the upload: timed parts and the predictions."""
    timings = {}
    clock = time.perf_counter()
    cache = EncodingCache(cache_path)  # a job opens the cache afresh
    features, missing = cache.lookup(FAKE_ENCODER, texts)
    assert features is not None and not missing, f"{len(missing)} vectors missing"
    timings["lookup_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    probabilities = head.predict_proba(features)
    predicted = probabilities.argmax(axis=1)
    scores = probabilities.max(axis=1)
    timings["predict_proba_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    labels = head.labels
    predictions = [
        {"task": task_id, "result": config.result_for(labels[int(predicted[i])]),
         "score": float(scores[i]), "model_version": MODEL_VERSION}
        for i, task_id in enumerate(range(1, len(texts) + 1))
    ]
    timings["build_predictions_s"] = time.perf_counter() - clock
    timings["total_s"] = sum(timings.values())
    return timings, predictions


def train_head(features: np.ndarray, seed: int) -> tuple[ClassifierHead, float]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, len(features))
    started = time.perf_counter()
    head = ClassifierHead(HeadConfig(labels=["Positive", "Negative"], input_dim=DIM, seed=seed)).fit(features, y)
    return head, time.perf_counter() - started


def malloc_in_use_mb() -> float | None:
    """Bytes glibc's malloc has handed out and not got back (mallinfo2), or None elsewhere.

    RSS also counts memory the allocator keeps after a free for reuse, which wobbles by tens
    of MB from cycle to cycle; memory in use is what a leak would make grow.
    """
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
    except (OSError, AttributeError):
        return None
    info = libc.mallinfo2()
    return round((info.uordblks + info.hblkhd) / 2**20, 1)


def rss_child(cache_path: Path, n: int, cycles: int) -> None:
    """Runs in its own process: retrain-like cycles, one JSON line per cycle on stdout."""
    texts = synthetic_texts(n)
    config = parse_label_config(LABEL_CONFIG)
    process = psutil.Process()
    print(json.dumps({"cycle": 0, "rss_mb": round(process.memory_info().rss / 2**20, 1)}), flush=True)
    for cycle in range(1, cycles + 1):
        before = conditions()
        started = time.perf_counter()
        # As fit() does: every vector from a freshly opened cache, a head on the labeled
        # ones, scores and prediction dicts for all.
        cache = EncodingCache(cache_path)
        features, missing = cache.lookup(FAKE_ENCODER, texts)
        assert not missing
        head, _ = train_head(features[:LABELED], seed=cycle)
        probabilities = head.predict_proba(features)
        predicted, scores = probabilities.argmax(axis=1), probabilities.max(axis=1)
        predictions = [
            {"task": i + 1, "result": config.result_for(head.labels[int(predicted[i])]),
             "score": float(scores[i]), "model_version": MODEL_VERSION}
            for i in range(len(texts))
        ]
        assert len(predictions) == len(texts)
        # No gc.collect(): an RQ SimpleWorker does not call it between jobs either.
        del cache, features, head, probabilities, predicted, scores, predictions
        print(json.dumps({
            "cycle": cycle,
            "seconds": round(time.perf_counter() - started, 2),
            "rss_mb": round(process.memory_info().rss / 2**20, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "malloc_in_use_mb": malloc_in_use_mb(),
            "python_objects": len(gc.get_objects()),
            **cycle_conditions(before, conditions()),
        }), flush=True)


def cycle_conditions(before: dict, after: dict) -> dict:
    """Load and CPU pressure of one cycle, the fields `Run.measure` gives a row."""
    return {"load_before": before["load"], "load_after": after["load"],
            "cpu_pressure_before": (before["cpu_pressure"] or {}).get("some_avg10"),
            "cpu_pressure_after": (after["cpu_pressure"] or {}).get("some_avg10"),
            "cpu_pressure_during": pressure_during(before, after)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3, help="full re-scores timed")
    parser.add_argument("--cycles", type=int, default=20, help="retrain-like cycles in the RSS process")
    parser.add_argument("--rss-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child, args.tasks, args.cycles)
        return

    run = Run("bench_scale")
    run["note"] = (f"vectors are RANDOM float16 ({DIM} dims) stored under the fake encoder id "
                   f"{FAKE_ENCODER!r}, not encodings; texts are real and distinct")
    print(f"# NOTE: {run['note']}", flush=True)
    texts = synthetic_texts(args.tasks)
    tmp = Path(tempfile.mkdtemp(prefix="atl-bench-scale-"))
    cache_path = tmp / Settings(data_dir=tmp).encoding_cache_path.name
    try:
        # -- size -------------------------------------------------------------------------
        size_rows = []
        for page_size in (None,):  # the 64 KiB pages measured as a fix here are EncodingCache's default now
            path = cache_path if page_size is None else tmp / f"page{page_size}" / cache_path.name
            row = fill_cache(run, path, texts, page_size)
            size_rows.append(row)
            print(table([row], SIZE_COLUMNS), flush=True)
        run["size"] = size_rows
        shutil.rmtree(tmp / "page65536", ignore_errors=True)

        # -- full re-score -------------------------------------------------------------
        config = parse_label_config(LABEL_CONFIG)
        features, _ = EncodingCache(cache_path).lookup(FAKE_ENCODER, texts[:LABELED])
        head, fit_s = train_head(features, seed=0)
        rescores = []
        for repeat in range(args.repeats):
            with run.measure(measurement="rescore", repeat=repeat + 1) as measured:
                timings, predictions = rescore(cache_path, texts, head, config)
            measured.update({k: round(v, 2) for k, v in timings.items()})
            rescores.append({"repeat": repeat + 1, **{k: round(v, 2) for k, v in timings.items()},
                             "load_before": measured["load_before"], "load_after": measured["load_after"],
                             "CPU pressure %": measured["cpu_pressure_during"]})
            print(table([rescores[-1]]), flush=True)
        chunk = Settings().prediction_chunk
        chunk_bytes = max(len(json.dumps(predictions[s:s + chunk])) for s in range(0, len(predictions), chunk))
        del predictions
        total = statistics.median(r["total_s"] for r in rescores)
        rescore_row = {
            "tasks": len(texts),
            **{f"{part} (median)": statistics.median(r[part] for r in rescores)
               for part in ("lookup_s", "predict_proba_s", "build_predictions_s", "total_s")},
            "total_s range": f"{min(r['total_s'] for r in rescores)}–{max(r['total_s'] for r in rescores)}",
            "target": "<= 30 s", "met": "yes" if total <= 30 else f"NO (+{total - 30:.1f} s)",
            "head fit on 2,000 s": round(fit_s, 2),
            f"largest upload chunk ({chunk} predictions)": f"{chunk_bytes / 1e3:.0f} kB",
            "load": "{min}–{max}".format(**spread([r[k] for r in rescores for k in ("load_before", "load_after")])),
        }
        run["rescore"] = rescore_row | {"repeats": rescores}

        # -- memory across retrains, in a fresh process ------------------------------------
        child = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--rss-child", str(cache_path),
             "--tasks", str(args.tasks), "--cycles", str(args.cycles)],
            capture_output=True, text=True, cwd=REPO, timeout=3600,
        )
        if child.returncode != 0:
            raise SystemExit(f"RSS process failed:\n{child.stderr[-3000:]}")
        cycles = [json.loads(line) for line in child.stdout.splitlines() if line.startswith("{")]
        run["rss_cycles"] = cycles
        after = [c for c in cycles if c["cycle"] >= 1]
        # The allocator's retained memory settles over the first cycles and then wobbles by
        # tens of MB; a leak keeps growing. So: over the second half of the cycles, the RSS
        # peak may not exceed the first half's by more than 5%, and memory in use (malloc)
        # may not trend up by more than 5% of RSS per 10 cycles.
        first, second = after[:len(after) // 2], after[len(after) // 2:]
        rss_first = max(c["rss_mb"] for c in first)
        rss_second = [c["rss_mb"] for c in second]
        in_use = [c["malloc_in_use_mb"] for c in second]
        slope = (float(np.polyfit([c["cycle"] for c in second], in_use, 1)[0])
                 if len(second) > 1 and None not in in_use else 0.0)
        growth_all = after[-1]["rss_mb"] - after[0]["rss_mb"]
        flat = (max(rss_second) <= 1.05 * rss_first
                and abs(slope) * 10 <= 0.05 * statistics.mean(rss_second))
        run["rss_summary"] = {
            "growth_cycle1_to_last_mb": round(growth_all, 1),
            "first_half_rss_max_mb": rss_first,
            "second_half_cycles": f"{second[0]['cycle']}-{second[-1]['cycle']}",
            "second_half_rss_range_mb": [min(rss_second), max(rss_second)],
            "second_half_malloc_in_use_slope_mb_per_cycle": round(slope, 2),
            "python_objects_range": [min(c["python_objects"] for c in after),
                                     max(c["python_objects"] for c in after)],
            "flat": flat,
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    print(f"NOTE: {run['note']}")
    print(table(size_rows, SIZE_COLUMNS))
    print()
    print(table([rescore_row]))
    print()
    print(table(cycles, ["cycle", "seconds", "rss_mb", "peak_rss_mb", "malloc_in_use_mb", "python_objects",
                         "load_before", "load_after", "cpu_pressure_during"]))
    summary = run["rss_summary"]
    print(f"\nRSS cycle 1 -> {after[-1]['cycle']}: {growth_all:+.1f} MB; first-half max {rss_first:.0f} MB, "
          f"cycles {summary['second_half_cycles']}: {min(rss_second):.0f}-{max(rss_second):.0f} MB; malloc in use "
          f"{slope:+.2f} MB/cycle; python objects {summary['python_objects_range']} -> "
          f"{'flat' if flat else 'NOT flat'}")
    run.write()


if __name__ == "__main__":
    main()
