"""Issue 3, point 3: POST /predict latency of the real service, cached and unseen texts.

Starts the real parts (redis-server, gunicorn with 2 sync workers) on a temporary DATA_DIR,
publishes a trained model version for project 1 with `ModelStore` (a `ClassifierHead` on
MiniLM encodings of airline tweets), pre-fills the encoding cache the service reads
(`settings.encoding_cache_path`) with the same encoder, then measures, from a client on the
same machine, one request at a time:

* the first calls (a gunicorn worker imports torch and loads the head on its first /predict,
  and the encoder on its first unseen text: once per process, never per request);
* 1 and 100 tasks whose texts are cached (targets: p50 < 20 ms and < 200 ms);
* 1 and 100 tasks with texts never seen before, each request new ones, so the encoder runs;
  next to the encoder's own time for the same batch sizes in this process, which is what an
  unseen request should cost on top of a cached one.

Evidence that no request reloads a model: the web log's "loaded encoder" lines (one per
worker) and the workers' RSS before and after the measured phases.

    .venv/bin/python bench/bench_predict.py [--single 200] [--hundred 100] [--unseen-single 50] [--unseen-hundred 20]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from run_record import Run, percentile, table  # also puts the repository on sys.path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import requests  # noqa: E402

from backend.label_config import parse_label_config  # noqa: E402
from backend.ml_backend import get_encoder  # noqa: E402
from backend.model_store import ModelStore  # noqa: E402
from backend.settings import Settings  # noqa: E402
from model.classifier import ClassifierHead, HeadConfig  # noqa: E402
from model.datasets import airline_tweets  # noqa: E402
from model.encoding_cache import EncodingCache, encode_with_cache  # noqa: E402
from tests.support.ls_project import CONFIG  # noqa: E402
from tests.support.services import Services  # noqa: E402

PROJECT = 1
LABEL_CONFIG = CONFIG


def publish_model(settings: Settings, texts: list[str], labels: list[str]) -> tuple[str, object]:
    """Encode (filling the service's cache), train a head, stage and activate it."""
    encoder = get_encoder(settings)
    cache = EncodingCache(settings.encoding_cache_path)
    started = time.perf_counter()
    features, encoded = encode_with_cache(encoder, cache, texts)
    print(f"# encoded {encoded} texts into {settings.encoding_cache_path} in "
          f"{time.perf_counter() - started:.1f} s", flush=True)
    config = parse_label_config(LABEL_CONFIG)
    classes = list(config.choices)
    y = np.array([classes.index(label) for label in labels])
    labeled = np.arange(min(500, len(texts)))
    head = ClassifierHead(HeadConfig(labels=classes, input_dim=features.shape[1])).fit(features[labeled], y[labeled])
    store = ModelStore(settings.models_dir)
    version = store.stage(PROJECT, head, {"label_config": config.to_dict(), "encoder": encoder.id,
                                          "labeled": len(labeled), "tasks": len(texts)})
    store.activate(PROJECT, version)
    return version, encoder


class Client:
    """POST /predict the way Label Studio does; returns (milliseconds, results)."""

    def __init__(self, url: str, version: str):
        self.url = url + "/predict"
        self.version = version
        self.session = requests.Session()
        self.next_id = 1

    def predict(self, texts: list[str], session: requests.Session | None = None) -> tuple[float, list]:
        tasks = []
        for text in texts:
            tasks.append({"id": self.next_id, "data": {"text": text}})
            self.next_id += 1
        payload = {"tasks": tasks, "project": f"{PROJECT}.1700000000", "label_config": LABEL_CONFIG,
                   "params": {"context": None}}
        started = time.perf_counter()
        response = (session or self.session).post(self.url, json=payload, timeout=120)
        ms = (time.perf_counter() - started) * 1000
        response.raise_for_status()
        results = response.json()["results"]
        assert len(results) == len(texts), (len(results), len(texts))
        assert all(r["model_version"] == self.version and r["result"] for r in results), results[:1]
        return ms, results

    def health(self) -> float:
        """Milliseconds of one GET /health (no model, no Redis): the HTTP floor."""
        started = time.perf_counter()
        self.session.get(self.url.removesuffix("/predict") + "/health", timeout=30).raise_for_status()
        return (time.perf_counter() - started) * 1000


def measure_case(run: Run, client: Client, name: str, tasks: int, requests_: int, texts,
                 target_p50: float | None) -> dict:
    """`requests_` POST /predict of `tasks` texts each (from `texts()`), each followed by a
    GET /health on the same connection: the reference, an HTTP round trip to the same
    server that does no work, measured in turns with the case itself."""
    latencies, health = [], []
    with run.measure(case=name, tasks=tasks) as measured:
        for _ in range(requests_):
            latencies.append(client.predict(texts())[0])
            health.append(client.health())
    p50 = percentile(latencies, 50)
    row = {"case": name, "tasks/request": tasks, "requests": len(latencies),
           "p50 ms": round(p50, 1), "p95 ms": round(percentile(latencies, 95), 1),
           "max ms": round(max(latencies), 1), "GET /health p50 ms": round(percentile(health, 50), 2),
           "p50 / health p50": round(p50 / percentile(health, 50), 1),
           "target p50": f"< {target_p50:g} ms" if target_p50 else "report",
           "met": ("yes" if p50 < target_p50 else f"NO (+{p50 - target_p50:.0f} ms)") if target_p50 else "-",
           "load": f"{measured['load_before']}–{measured['load_after']}",
           "CPU pressure %": measured["cpu_pressure_during"]}
    measured.update(row)
    print(table([row]), flush=True)
    return row


def worker_rss(services: Services) -> dict[int, float]:
    master = psutil.Process(services.web.pid)
    return {child.pid: round(child.memory_info().rss / 2**20, 1) for child in master.children()}


def encoder_loads(services: Services) -> list[str]:
    return re.findall(r"\[(\d+)\][^\n]*loaded encoder", services.log_tail("web.log", chars=10**7))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--single", type=int, default=200, help="requests of 1 cached task")
    parser.add_argument("--hundred", type=int, default=100, help="requests of 100 cached tasks")
    parser.add_argument("--unseen-single", type=int, default=50, help="requests of 1 unseen task")
    parser.add_argument("--unseen-hundred", type=int, default=20, help="requests of 100 unseen tasks")
    parser.add_argument("--cached-texts", type=int, default=2000)
    parser.add_argument("--web-workers", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the temporary DATA_DIR")
    args = parser.parse_args()
    # A SIGTERM unwinds the with-block below, which stops gunicorn and Redis.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    run = Run("bench_predict")
    data = airline_tweets()
    order = np.random.default_rng(0).permutation(len(data))
    cached = [data.texts[i] for i in order[:args.cached_texts]]
    cached_labels = [data.labels[i] for i in order[:args.cached_texts]]
    unseen = iter([data.texts[i] for i in order[args.cached_texts:]])
    needed = 5 + 40 + args.unseen_single + 100 * args.unseen_hundred
    if len(order) - args.cached_texts < needed:
        raise SystemExit(f"not enough distinct airline tweets for the unseen cases ({needed} needed)")

    data_dir = Path(tempfile.mkdtemp(prefix="atl-bench-predict-"))
    settings = Settings.from_env(data_dir=data_dir)
    version, encoder = publish_model(settings, cached, cached_labels)
    rng = np.random.default_rng(1)
    rows, first_calls = [], {}
    try:
        with Services(data_dir) as services:
            services.start_redis()
            services.start_web(workers=args.web_workers)
            client = Client(services.url, version)
            run["web"] = f"gunicorn --workers {args.web_workers} (sync), as make serve starts it"
            rss = {"after_start": worker_rss(services)}

            # The very first calls: whichever worker answers imports torch and loads the head.
            first_calls["cached_1_task_first_5_ms"] = [round(client.predict([cached[i]])[0], 1) for i in range(5)]
            print(f"# first 5 cached 1-task calls (ms): {first_calls['cached_1_task_first_5_ms']}", flush=True)
            # Concurrent calls reach every worker, so none is cold in the measured phases.
            sessions = [requests.Session() for _ in range(args.web_workers * 2)]
            with ThreadPoolExecutor(len(sessions)) as pool:
                for _ in range(5):
                    list(pool.map(lambda s: client.predict(list(rng.choice(cached, 100)), s), sessions))
            rss["after_cached_warmup"] = worker_rss(services)

            rows.append(measure_case(run, client, "cached", 1, args.single,
                                     lambda: [cached[int(rng.integers(len(cached)))]], 20))
            rows.append(measure_case(run, client, "cached", 100, args.hundred,
                                     lambda: list(rng.choice(cached, 100, replace=False)), 200))
            rss["after_cached"] = worker_rss(services)

            # Unseen texts: the first in each worker loads the encoder (once per process).
            first_calls["unseen_1_task_first_5_ms"] = [round(client.predict([next(unseen)])[0], 1) for _ in range(5)]
            print(f"# first 5 unseen 1-task calls (ms): {first_calls['unseen_1_task_first_5_ms']}", flush=True)
            deadline = time.monotonic() + 300
            warmups = 0
            while len(set(encoder_loads(services))) < args.web_workers and time.monotonic() < deadline:
                with ThreadPoolExecutor(len(sessions)) as pool:
                    list(pool.map(lambda s: client.predict([next(unseen)], s), sessions))
                warmups += len(sessions)
            first_calls["unseen_warmup_requests_until_every_worker_loaded_the_encoder"] = warmups
            rss["after_unseen_warmup"] = worker_rss(services)

            rows.append(measure_case(run, client, "unseen", 1, args.unseen_single, lambda: [next(unseen)], None))
            rows.append(measure_case(run, client, "unseen", 100, args.unseen_hundred,
                                     lambda: [next(unseen) for _ in range(100)], None))
            rss["after_unseen"] = worker_rss(services)

            # A cached call again: no slower after the unseen phase.
            rows.append(measure_case(run, client, "cached, after the unseen phase", 1, 50,
                                     lambda: [cached[int(rng.integers(len(cached)))]], 20))
            rss["end"] = worker_rss(services)
            loads = encoder_loads(services)
    finally:
        if not args.keep:
            shutil.rmtree(data_dir, ignore_errors=True)

    # The encoder's own time for the same batch sizes, in this process (no HTTP, no cache).
    spare = [next(unseen) for _ in range(20 * 1 + 5 * 100)]
    encoder.encode(spare[:3])  # warm-up
    encode_ms = {1: [], 100: []}
    with run.measure(case="encoder alone", tasks=1):
        for i in range(20):
            started = time.perf_counter()
            encoder.encode([spare[i]])
            encode_ms[1].append((time.perf_counter() - started) * 1000)
    with run.measure(case="encoder alone", tasks=100):
        for i in range(5):
            part = spare[20 + 100 * i: 20 + 100 * (i + 1)]
            started = time.perf_counter()
            encoder.encode(part)
            encode_ms[100].append((time.perf_counter() - started) * 1000)
    encoder_rows = [{"batch": n, "encoder p50 ms (this process)": round(statistics.median(v), 1)}
                    for n, v in encode_ms.items()]

    run["cases"] = rows
    run["first_calls"] = first_calls
    run["encoder_alone"] = encoder_rows
    run["worker_rss_mb"] = {k: {str(pid): mb for pid, mb in v.items()} for k, v in rss.items()}
    run["encoder_loads_in_web_log"] = {"lines": len(loads), "distinct_pids": len(set(loads))}
    run["model_version"] = version
    print()
    print(table(rows))
    print()
    print(table(encoder_rows))
    print(f"\nfirst calls: cached {first_calls['cached_1_task_first_5_ms']} ms, "
          f"unseen {first_calls['unseen_1_task_first_5_ms']} ms")
    print(f"'loaded encoder' in web.log: {len(loads)} lines from {len(set(loads))} worker pids "
          f"(over {sum(r['requests'] for r in rows)} measured requests)")
    for phase, pids in rss.items():
        print(f"worker RSS {phase}: {sorted(pids.values())} MB")
    run.write()


if __name__ == "__main__":
    main()
