"""Offline active-learning simulator: what each ordering saves, on labeled data you already have.

    python -m model.simulate --data FILE --out DIR [options]

It replays the labeling loop of the service on a labeled dataset: start from an initial
labeled set, train the project's classifier head, let an ordering pick the next batch from
the pool, "label" it with the known answers, retrain, and measure accuracy and macro-F1 on a
held-out test set after every batch, until the label budget is spent. It runs **the same
model code as the service**: `model.encoder.Encoder` + `model.encoding_cache` (every text is
encoded once and the vectors are reused across orderings and seeds), `ClassifierHead` with
the service's `HeadConfig` (class-weighted, for every ordering alike), and the orderings of
`model.orderings.get_ordering`.

Inputs (`--data`, `--seed-data`, `--test`): CSV or JSONL with `text` and `label` columns, a
Label Studio JSON export, or a built-in corpus (`builtin:airline` = airline tweets
Positive/Negative, `builtin:airline3` = with Neutral, `builtin:movies` = Rotten Tomatoes
snippets; see `model.datasets`), or labeled images: `builtin:fashion_mnist` (and
`builtin:fashion_mnist_test`, Zalando's test split; Debian package `dataset-fashion-mnist`),
encoded with the service's `model.image_encoder.ImageEncoder` and cached by image content
as the service caches a project's images. `builtin:NAME:N` keeps a fixed subset of N.

Honest statistics (issue 6): seeds are paired (in one seed every ordering starts from the
same initial labeled set and is scored on the same test set, with the same head
initialisation), the x axis counts only labels bought from the pool (a `--seed-data`
set is free: it is the data the team already has), and `summary.md` reports each
ordering's difference from random per seed, not only the means.

Outputs in DIR: `results.json`, `learning_curves.png`, `summary.md`, and `runs.jsonl`
(one line per finished run, so `--resume` can continue an interrupted simulation). Each
line records a hash of the `model/` source that produced it; `--resume` refuses a
`runs.jsonl` written by other code, so a summary never mixes runs of two versions.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from model.datasets import (
    LabeledImages,
    LabeledTexts,
    airline_tweets,
    fashion_mnist,
    load_labeled_file,
    movie_snippets,
)

DEFAULT_CACHE = Path("~/.cache/atl-backend/encodings.sqlite3")
MODEL_DIR = Path(__file__).resolve().parent
CEILING = "__ceiling__"  # key of the all-pool-labels run in runs.jsonl

def _sampled(data, n: int | None):
    return data if n is None else data.sample(n)


# name -> (what it is, loader taking the sample size or None)
BUILTIN = {
    "airline": ("airline tweets, Positive/Negative",
                lambda n: _sampled(airline_tweets(("Positive", "Negative")), n)),
    "airline3": ("airline tweets, Positive/Negative/Neutral",
                 lambda n: _sampled(airline_tweets(("Positive", "Negative", "Neutral")), n)),
    "movies": ("Rotten Tomatoes critic snippets, Positive (fresh)/Negative (rotten)",
               lambda n: _sampled(movie_snippets(), n)),
    "fashion_mnist": ("Fashion-MNIST training images (60,000, 10 classes of clothes)",
                      lambda n: fashion_mnist("train", sample=n)),
    "fashion_mnist_test": ("Fashion-MNIST test images (10,000)", lambda n: fashion_mnist("test", sample=n)),
}


def load_source(spec: str) -> LabeledTexts | LabeledImages:
    """A labeled file (CSV, JSONL, Label Studio JSON export) or `builtin:NAME[:N]`.

    `:N` keeps a fixed random subset of N examples (the same every time), e.g.
    `builtin:fashion_mnist:2000`: the seeds then draw their pools from those N, so only
    they are encoded.
    """
    if spec.startswith("builtin:"):
        name, _, count = spec.split(":", 1)[1].partition(":")
        if name not in BUILTIN or (count and not count.isdigit()):
            raise SystemExit(
                f"unknown built-in dataset {spec!r}; choose one of: "
                + ", ".join(f"builtin:{k}" for k in BUILTIN) + " (optionally :N for a subset of N)"
            )
        try:
            return BUILTIN[name][1](int(count) if count else None)
        except FileNotFoundError as exc:
            raise SystemExit(f"{spec}: {exc}") from None
    path = Path(spec).expanduser()
    if not path.exists():
        raise SystemExit(f"{spec}: no such file (or use builtin:{'|'.join(BUILTIN)})")
    try:
        return load_labeled_file(path)
    except (ValueError, KeyError, json.JSONDecodeError) as exc:
        raise SystemExit(f"{spec}: cannot read labeled data: {exc}") from None


# -- configuration and paired splits ------------------------------------------------------


@dataclass
class SimulationConfig:
    data: str
    orderings: list[str]
    seeds: list[int]
    initial: int = 50
    batch_size: int = 50
    budget: int = 500
    pool_size: int | None = None
    test_size: float = 0.25
    seed_data: str | None = None
    test: str | None = None
    ordering_params: dict = field(default_factory=dict)
    encoder: str = "default"
    image_encoder: str = "default"  # for image data (IMAGE_ENCODER)
    cache: str = str(DEFAULT_CACHE)
    workers: int = 1
    threads: int = 1

    def run_key(self, ordering: str) -> str:
        """What a finished run depends on; `--resume` reuses runs with the same key."""
        relevant = {
            k: getattr(self, k)
            for k in ("data", "initial", "batch_size", "budget", "pool_size", "test_size",
                      "seed_data", "test", "encoder", "image_encoder")
        }
        relevant["params"] = self.ordering_params.get(ordering, {})
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def code_hash() -> str:
    """SHA-256 (16 hex digits) of every `model/` source file, path and content.

    A run's result depends on the simulator, the encoder, the head, the orderings and the
    data loaders, all of which live in `model/`; the hash changes when any of them does.
    """
    digest = hashlib.sha256()
    for path in sorted(MODEL_DIR.rglob("*.py")):
        digest.update(path.relative_to(MODEL_DIR).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def check_resumable(rows: list[dict], code: str, log_path: Path) -> None:
    """Stop if any finished run in `log_path` was made by other code than `code`."""
    other = [row for row in rows if row.get("code") != code]
    if other:
        seen = sorted({str(row.get("code") or "not recorded") for row in other})
        raise SystemExit(
            f"--resume: {len(other)} of the {len(rows)} runs in {log_path} were made by other code "
            f"(model/ code hash {', '.join(seen)}; this code is {code}). Mixing them would compare "
            "two versions of the orderings. Resume with the code that made them, or run without "
            "--resume (which starts over and replaces the file), or use another --out.")


@dataclass
class SeedPlan:
    """One seed's paired setup: the same for every ordering.

    Indices are rows of the text table; `initial` are positions in `pool` that start labeled
    (and count as labels used); `seed_rows` start labeled for free (from `--seed-data`).
    """

    seed: int
    pool: np.ndarray
    test: np.ndarray
    initial: np.ndarray
    seed_rows: np.ndarray


@dataclass
class TextTable:
    """Every example of the data, seed data and test data, one row each."""

    texts: list  # the texts, or for image data the image files (bytes)
    y: np.ndarray  # label index per row
    labels: list[str]
    data_rows: np.ndarray
    seed_rows: np.ndarray
    test_rows: np.ndarray
    images: bool = False  # rows are image files, encoded with the image encoder


def build_table(data, seed_data=None, test=None) -> TextTable:
    """One table of `data`, `seed_data` and `test` (all `LabeledTexts` or all `LabeledImages`)."""
    parts = [data] + [p for p in (seed_data, test) if p is not None]
    images = isinstance(data, LabeledImages)
    if any(isinstance(p, LabeledImages) != images for p in parts):
        raise SystemExit("--data, --seed-data and --test must all be texts or all be images")
    labels = sorted(set(data.labels) | set(seed_data.labels if seed_data else []))
    if len(labels) < 2:
        raise SystemExit(f"the data has {len(labels)} class(es); a classifier needs at least two")
    if test is not None:
        unknown = sorted(set(test.labels) - set(labels))
        if unknown:
            raise SystemExit(f"--test has labels the training data never shows: {unknown}")
    texts = [t for p in parts for t in (p.images if images else p.texts)]
    index = {label: i for i, label in enumerate(labels)}
    y = np.array([index[label] for p in parts for label in p.labels], dtype=np.int64)
    n_data, n_seed = len(data), len(seed_data) if seed_data else 0
    n_test = len(test) if test else 0
    return TextTable(
        texts, y, labels,
        data_rows=np.arange(n_data),
        seed_rows=np.arange(n_data, n_data + n_seed),
        test_rows=np.arange(n_data + n_seed, n_data + n_seed + n_test),
        images=images,
    )


def plan_seed(table: TextTable, config: SimulationConfig, seed: int) -> SeedPlan:
    """Draw one seed's test set, pool and initial labeled set."""
    rng = np.random.default_rng([seed, 6])
    rows = rng.permutation(table.data_rows)
    if len(table.test_rows):
        test = table.test_rows
    else:
        n_test = int(round(config.test_size * len(rows))) if config.test_size < 1 else int(config.test_size)
        test, rows = rows[:n_test], rows[n_test:]
    pool = rows if config.pool_size is None else rows[: config.pool_size]
    if len(table.seed_rows):
        seed_rows = rng.permutation(table.seed_rows)[: config.initial]
        initial = np.zeros(0, dtype=np.int64)
    else:
        seed_rows = np.zeros(0, dtype=np.int64)
        initial = np.arange(min(config.initial, len(pool)))
        initial = _cover_classes(initial, table.y[pool], rng)
    return SeedPlan(seed, np.asarray(pool), np.asarray(test), initial, seed_rows)


def _cover_classes(initial: np.ndarray, pool_y: np.ndarray, rng) -> np.ndarray:
    """Swap random members of the initial set for one example of each class it misses.

    A project starts with at least one example per class; without that some classes have no
    weight in the head and the first rounds measure an accident of the draw.
    """
    initial = initial.copy()
    missing = [c for c in np.unique(pool_y) if c not in set(pool_y[initial])]
    if not missing or len(initial) < len(np.unique(pool_y)):
        return initial
    outside = np.setdiff1d(np.arange(len(pool_y)), initial)
    counts = np.bincount(pool_y[initial])
    for c in missing:
        candidate = rng.choice(outside[pool_y[outside] == c])
        # Replace a member of the most common class so no other class goes missing.
        common = np.flatnonzero(pool_y[initial] == counts.argmax())
        slot = rng.choice(common)
        counts[pool_y[initial[slot]]] -= 1
        initial[slot] = candidate
    return initial


def check_plans(config: SimulationConfig, plans: list[SeedPlan]) -> None:
    """Errors the user can fix, before anything expensive runs."""
    plan = plans[0]
    if config.batch_size < 1 or config.budget < 1:
        raise SystemExit("--batch-size and --budget must be positive")
    if config.budget > len(plan.pool):
        raise SystemExit(
            f"--budget {config.budget} is larger than the pool ({len(plan.pool)} tasks); "
            "lower --budget or --test-size, or raise --pool-size"
        )
    if not len(plan.seed_rows) and config.initial > config.budget:
        raise SystemExit(f"--initial {config.initial} is above --budget {config.budget}")
    if not len(plan.seed_rows) and config.initial < 1:
        raise SystemExit("--initial must be at least 1 without --seed-data")
    if len(plan.test) == 0:
        raise SystemExit("the test set is empty: raise --test-size or pass --test FILE")


def label_grid(config: SimulationConfig, plan: SeedPlan) -> list[int]:
    """Labels used after each training round (pool labels only)."""
    start = len(plan.initial)
    grid = list(range(start, config.budget, config.batch_size)) + [config.budget]
    return sorted(set(grid))


# -- features -----------------------------------------------------------------------------


def encode_table(table: TextTable, plans: list[SeedPlan], config: SimulationConfig,
                 all_layers: bool, progress: bool = True) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Vectors for every row a seed uses, from the encoding cache (encoding what is missing).

    Returns (features (n_rows, dim), all-layers features (n_rows, layers, dim) or None, the
    encoder id). Rows no seed uses stay zero. Image rows go to `encode_images`.
    """
    if table.images:
        return encode_images(table, plans, config, all_layers, progress)
    from model.encoder import encoder_id
    from model.encoding_cache import EncodingCache, encode_with_cache

    cache = EncodingCache(Path(config.cache).expanduser())
    needed = np.unique(np.concatenate([np.concatenate([p.pool, p.test, p.seed_rows]) for p in plans]))
    trained_on = np.unique(np.concatenate([np.concatenate([p.pool, p.seed_rows]) for p in plans]))
    texts = [table.texts[i] for i in needed]
    enc_id = encoder_id(config.encoder)
    all_layers_key = f"{enc_id}/all-layers"
    encoder = None

    def loaded_encoder():
        nonlocal encoder
        if encoder is None:
            from model.encoder import Encoder

            encoder = Encoder(config.encoder)
        return encoder

    def bar(description: str, total: int):
        from tqdm import tqdm

        return tqdm(total=total, desc=description, unit="text", disable=not progress or not total,
                    leave=False)

    layers = None
    if all_layers:
        # Only pool and initial-set rows: the orderings never see the test set.
        al_texts = [table.texts[i] for i in trained_on]
        al_missing = cache.lookup(all_layers_key, al_texts)[1]
        if al_missing:
            with bar("encoding all layers", len(set(al_texts[i] for i in al_missing))) as pbar:
                vectors, _ = encode_with_cache(loaded_encoder(), cache, al_texts, all_layers=True,
                                               progress=lambda done, total: pbar.update(done - pbar.n))
        else:
            vectors, _ = cache.lookup(all_layers_key, al_texts)
            vectors = vectors.reshape(len(al_texts), *_layer_shape(config.encoder))
        # The pooled last layer is the sentence embedding: fill those cache entries from it
        # instead of running the encoder a second time over the same texts.
        last_missing = cache.lookup(enc_id, al_texts)[1]
        if last_missing:
            cache.store(enc_id, [al_texts[i] for i in last_missing], vectors[last_missing, -1, :])
        layers = np.zeros((len(table.texts),) + vectors.shape[1:], dtype=np.float32)
        layers[trained_on] = vectors

    cached, missing = cache.lookup(enc_id, texts)
    if missing:
        with bar("encoding", len(set(texts[i] for i in missing))) as pbar:
            cached, _ = encode_with_cache(loaded_encoder(), cache, texts,
                                          progress=lambda done, total: pbar.update(done - pbar.n))
    features = np.zeros((len(table.texts), cached.shape[1]), dtype=np.float32)
    features[needed] = cached
    return features, layers, enc_id


def encode_images(table: TextTable, plans: list[SeedPlan], config: SimulationConfig,
                  all_layers: bool, progress: bool = True, chunk: int = 256):
    """`encode_table` for image rows: the service's `ImageEncoder` and cache keys.

    Vectors are cached by encoder id and image content (`content_cache_text`), top features
    and every stage from one pass, exactly as `backend.images` stores a project's images, so
    the service and the simulator share them. All-layers features are the stages side by
    side, (n_rows, width), the shape domain-likeness gets in the service.
    """
    from tqdm import tqdm

    from model.encoding_cache import EncodingCache
    from model.image_encoder import ImageEncoder, content_cache_text, content_digest, image_encoder_id

    cache = EncodingCache(Path(config.cache).expanduser())
    needed = np.unique(np.concatenate([np.concatenate([p.pool, p.test, p.seed_rows]) for p in plans]))
    keys = [content_cache_text(content_digest(table.texts[i])) for i in needed]
    enc_id = image_encoder_id(config.image_encoder)
    stage_key = f"{enc_id}/all-stages"
    missing = sorted(set(cache.lookup(enc_id, keys)[1]) | set(cache.lookup(stage_key, keys)[1]))
    first, queued = [], set()  # one row per distinct content
    for j in missing:
        if keys[j] not in queued:
            queued.add(keys[j])
            first.append(j)
    if first:
        encoder = ImageEncoder(config.image_encoder)
        with tqdm(total=len(first), desc="encoding images", unit="image", disable=not progress,
                  leave=False) as bar:
            # In chunks, each stored at once: an interrupted run keeps what it encoded.
            for start in range(0, len(first), chunk):
                part = first[start : start + chunk]
                top, stages = encoder.encode_both([table.texts[needed[j]] for j in part], stages=True)
                texts = [keys[j] for j in part]
                cache.store(enc_id, texts, top)
                cache.store(stage_key, texts, stages)
                bar.update(len(part))
    # Read back through the cache's float16, as the service does: fresh and cached agree.
    top, _ = cache.lookup(enc_id, keys)
    features = np.zeros((len(table.texts), top.shape[1]), dtype=np.float32)
    features[needed] = top
    layers = None
    if all_layers:
        stages, _ = cache.lookup(stage_key, keys)
        layers = np.zeros((len(table.texts), stages.shape[1]), dtype=np.float32)
        layers[needed] = stages
    return features, layers, enc_id


def _layer_shape(name: str) -> tuple[int, int]:
    """(layers + 1, dim) of an encoder, from its config alone (no weights loaded)."""
    from transformers import AutoConfig

    from model.encoder import resolve_encoder

    config = AutoConfig.from_pretrained(resolve_encoder(name))
    return int(config.num_hidden_layers) + 1, int(config.hidden_size)


# -- one run: one ordering, one seed ------------------------------------------------------

_CONTEXT: dict = {}  # features and labels of the text table, set once per process


def _set_context(features, layers, y, labels, threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, threads))
    _CONTEXT.update(features=features, layers=layers, y=y, labels=labels)


def _init_worker(paths: dict, labels: list[str], threads: int) -> None:
    """Process-pool initializer: map the table's arrays from disk (shared, read-only)."""
    load = lambda key: np.load(paths[key], mmap_mode="r") if paths.get(key) else None  # noqa: E731
    _set_context(load("features"), load("layers"), np.load(paths["y"]), labels, threads)


def _head(input_dim: int, seed: int):
    from model.classifier import ClassifierHead, HeadConfig

    # The service's head: HeadConfig defaults; only the initialisation seed follows the
    # simulation seed (the same for every ordering of that seed).
    return ClassifierHead(HeadConfig(labels=list(_CONTEXT["labels"]), input_dim=input_dim, seed=seed))


def _evaluate(head, test_rows: np.ndarray) -> tuple[float, float]:
    from sklearn.metrics import f1_score

    features, y = _CONTEXT["features"], _CONTEXT["y"]
    predicted = head.predict_proba(features[test_rows]).argmax(axis=1)
    truth = y[test_rows]
    accuracy = float((predicted == truth).mean())
    macro_f1 = float(f1_score(truth, predicted, average="macro",
                              labels=np.arange(len(_CONTEXT["labels"])), zero_division=0))
    return accuracy, macro_f1


def run_ordering(plan: SeedPlan, name: str, config: SimulationConfig) -> dict:
    """Replay the labeling loop for one ordering on one seed's paired setup."""
    from model.orderings import OrderingInput, get_ordering
    from model.orderings.base import jsonable

    features, layers, y = _CONTEXT["features"], _CONTEXT["layers"], _CONTEXT["y"]
    ordering = get_ordering(name, **config.ordering_params.get(name, {}))
    labeled = [int(i) for i in plan.initial]  # positions in the pool
    is_labeled = np.zeros(len(plan.pool), dtype=bool)
    is_labeled[labeled] = True
    grid = label_grid(config, plan)
    out = {"labels_used": [], "accuracy": [], "macro_f1": [], "batch_label_counts": [],
           "info": [], "seconds_train": 0.0, "seconds_ordering": 0.0, "filled_by_simulator": 0}
    train_rows = head = None  # trained at the end of each round, used by the next one's ordering
    for round_number, target in enumerate(grid):
        if round_number:
            unlabeled = np.flatnonzero(~is_labeled)
            need = target - len(labeled)
            inputs = OrderingInput(
                features_labeled=features[train_rows],
                labels=y[train_rows],
                features_unlabeled=features[plan.pool[unlabeled]],
                classifier=head,
                all_layers_labeled=None if layers is None or not ordering.needs_all_layers else layers[train_rows],
                all_layers_unlabeled=(None if layers is None or not ordering.needs_all_layers
                                      else layers[plan.pool[unlabeled]]),
                batch_size=need,
                seed=plan.seed * 1000 + round_number,
                probabilities_unlabeled=head.predict_proba(features[plan.pool[unlabeled]]),
            )
            started = time.perf_counter()
            result = ordering.score(inputs)
            out["seconds_ordering"] += time.perf_counter() - started
            picked, filled = _exact_batch(result, need)
            out["filled_by_simulator"] += filled
            out["info"].append(jsonable(result.info))
            chosen = unlabeled[picked]
            is_labeled[chosen] = True
            labeled.extend(int(i) for i in chosen)
            out["batch_label_counts"].append(
                np.bincount(y[plan.pool[chosen]], minlength=len(_CONTEXT["labels"])).tolist())
        train_rows = np.concatenate([plan.seed_rows, plan.pool[np.asarray(labeled, dtype=np.int64)]])
        started = time.perf_counter()
        head = _head(features.shape[1], plan.seed).fit(features[train_rows], y[train_rows])
        out["seconds_train"] += time.perf_counter() - started
        accuracy, macro_f1 = _evaluate(head, plan.test)
        out["labels_used"].append(len(labeled))
        out["accuracy"].append(accuracy)
        out["macro_f1"].append(macro_f1)
    out["picked"] = [int(plan.pool[i]) for i in labeled[len(plan.initial):]]
    return out


def _exact_batch(result, need: int) -> tuple[np.ndarray, int]:
    """The `need` tasks Label Studio would serve first: the ordering's top, made exact.

    An ordering that returns duplicates or too few tasks is completed from its own score
    order, and the simulator counts how many it had to fill (reported, never silent).
    """
    top = [int(i) for i in np.asarray(result.top(need)).ravel()]
    picked = list(dict.fromkeys(i for i in top if 0 <= i < len(result.scores)))[:need]
    filled = 0
    if len(picked) < need:
        chosen = set(picked)
        for i in np.argsort(result.scores, kind="stable"):
            if len(picked) == need:
                break
            if int(i) not in chosen:
                picked.append(int(i))
                chosen.add(int(i))
                filled += 1
    return np.asarray(picked, dtype=np.int64), filled


def run_ceiling(plan: SeedPlan, config: SimulationConfig) -> dict:
    """Accuracy with every pool label (plus the seed set): what labeling everything buys."""
    features, y = _CONTEXT["features"], _CONTEXT["y"]
    rows = np.concatenate([plan.seed_rows, plan.pool])
    head = _head(features.shape[1], plan.seed).fit(features[rows], y[rows])
    accuracy, macro_f1 = _evaluate(head, plan.test)
    return {"labels_used": len(plan.pool), "accuracy": accuracy, "macro_f1": macro_f1}


def _job(kind: str, plan: SeedPlan, name: str, config: SimulationConfig) -> tuple[str, int, dict, float]:
    started = time.perf_counter()
    result = run_ceiling(plan, config) if kind == "ceiling" else run_ordering(plan, name, config)
    return name, plan.seed, result, time.perf_counter() - started


def _finite(value):
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# -- statistics -----------------------------------------------------------------------------


def aulc(x: list[int], accuracy: list[float]) -> float:
    """Area under the learning curve, normalised by the x range: mean accuracy in points."""
    x, a = np.asarray(x, dtype=float), np.asarray(accuracy, dtype=float) * 100
    if len(x) < 2 or x[-1] == x[0]:
        return float(a.mean())
    return float(np.sum((a[1:] + a[:-1]) / 2 * np.diff(x)) / (x[-1] - x[0]))


def _t95(n: int) -> float:
    if n < 2:
        return float("nan")
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1))


def aggregate(runs: dict[str, dict[int, dict]], ceiling: dict[int, dict], seeds: list[int]) -> dict:
    """Means, spreads and paired differences from random over seeds."""
    summary: dict = {}
    random_aulc = None
    if "random" in runs:
        random_aulc = {s: aulc(r["labels_used"], r["accuracy"]) for s, r in runs["random"].items()}
    for name, per_seed in runs.items():
        done = [s for s in seeds if s in per_seed]
        if not done:
            continue
        x = per_seed[done[0]]["labels_used"]
        acc = np.array([per_seed[s]["accuracy"] for s in done]) * 100
        f1 = np.array([per_seed[s]["macro_f1"] for s in done]) * 100
        aulcs = np.array([aulc(x, per_seed[s]["accuracy"]) for s in done])
        f1_aulcs = np.array([aulc(x, per_seed[s]["macro_f1"]) for s in done])
        first_counts = per_seed[done[0]]["batch_label_counts"]
        bought = np.zeros(len(first_counts[0])) if first_counts else None
        for s in done:
            for counts in per_seed[s]["batch_label_counts"]:
                bought = bought + np.asarray(counts)
        entry = {
            "seeds": done,
            "labels_used": x,
            "accuracy_mean": acc.mean(0).tolist(),
            "accuracy_std": acc.std(0, ddof=1).tolist() if len(done) > 1 else [0.0] * len(x),
            "macro_f1_mean": f1.mean(0).tolist(),
            "macro_f1_std": f1.std(0, ddof=1).tolist() if len(done) > 1 else [0.0] * len(x),
            "aulc_mean": float(aulcs.mean()),
            "aulc_std": float(aulcs.std(ddof=1)) if len(done) > 1 else 0.0,
            "macro_f1_aulc_mean": float(f1_aulcs.mean()),
            "bought_label_share": (bought / bought.sum()).tolist() if bought is not None and bought.sum() else None,
            "seconds_ordering_per_run": float(np.mean([per_seed[s]["seconds_ordering"] for s in done])),
            "seconds_train_per_run": float(np.mean([per_seed[s]["seconds_train"] for s in done])),
            "filled_by_simulator": int(sum(per_seed[s]["filled_by_simulator"] for s in done)),
        }
        if random_aulc is not None:
            paired = [s for s in done if s in random_aulc]
            diffs = np.array([aulc(x, per_seed[s]["accuracy"]) - random_aulc[s] for s in paired])
            diff_curves = np.array([np.subtract(per_seed[s]["accuracy"], runs["random"][s]["accuracy"])
                                    for s in paired]) * 100
            n = len(diffs)
            sd = float(diffs.std(ddof=1)) if n > 1 else float("nan")
            half = _t95(n) * sd / math.sqrt(n) if n > 1 else float("nan")
            entry.update({
                "aulc_diff_vs_random_mean": float(diffs.mean()) if n else float("nan"),
                "aulc_diff_vs_random_std": sd,
                "aulc_diff_vs_random_ci95": [float(diffs.mean() - half), float(diffs.mean() + half)],
                "seeds_beating_random": int((diffs > 0).sum()),
                "seeds_paired_with_random": n,
                "accuracy_diff_vs_random_mean": diff_curves.mean(0).tolist(),
                "accuracy_diff_vs_random_ci95_half": (
                    (_t95(n) * diff_curves.std(0, ddof=1) / math.sqrt(n)).tolist() if n > 1 else [0.0] * len(x)),
            })
        summary[name] = entry
    if "random" in summary:
        target = summary["random"]["accuracy_mean"][-1]
        summary["_random_full_budget_accuracy"] = target
        for name, entry in summary.items():
            if name.startswith("_"):
                continue
            reached = [lx for lx, a in zip(entry["labels_used"], entry["accuracy_mean"]) if a >= target]
            entry["labels_to_reach_random_full_budget"] = reached[0] if reached else None
    if ceiling:
        values = [ceiling[s] for s in seeds if s in ceiling]
        acc = np.array([v["accuracy"] for v in values]) * 100
        f1 = np.array([v["macro_f1"] for v in values]) * 100
        summary["_ceiling"] = {
            "labels_used": values[0]["labels_used"],
            "accuracy_mean": float(acc.mean()), "accuracy_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
            "macro_f1_mean": float(f1.mean()), "macro_f1_std": float(f1.std(ddof=1)) if len(f1) > 1 else 0.0,
        }
    return summary


# -- reports --------------------------------------------------------------------------------


def report_points(grid: list[int], wanted: list[int] | None) -> list[int]:
    """Budgets for the summary's columns: the asked ones on the grid, else ~4 spread out."""
    if wanted:
        return [b for b in wanted if b in grid] or [grid[-1]]
    inner = grid[1:] if len(grid) > 1 else grid
    picks = np.linspace(0, len(inner) - 1, num=min(4, len(inner))).round().astype(int)
    return sorted({inner[i] for i in picks})


def write_summary(path: Path, results: dict, report_at: list[int] | None) -> None:
    agg, meta = results["aggregate"], results["config"]
    names = [n for n in results["orderings"] if n in agg]
    if not names:
        path.write_text("# Simulation summary\n\nNo run finished.\n")
        return
    grid = agg[names[0]]["labels_used"]
    points = report_points(grid, report_at)
    has_random = "random" in agg
    lines = [
        "# Simulation summary",
        "",
        f"- data: `{meta['data']}`"
        + (f", initial labeled set from `{meta['seed_data']}` ({meta['initial']} examples, not counted as labels used)"
           if meta.get("seed_data") else f", initial labeled set: {meta['initial']} random pool tasks")
        + (f", test: `{meta['test']}`" if meta.get("test") else ""),
        f"- classes: {', '.join(results['labels'])}; pool {results['pool_size']} tasks "
        f"({_shares(results['pool_label_share'], results['labels'])}), test {results['test_size']} tasks",
        f"- batches of {meta['batch_size']} up to {meta['budget']} pool labels; "
        f"{len(meta['seeds'])} paired seed{'s' if len(meta['seeds']) != 1 else ''}; "
        "every ordering trains the service's class-weighted head",
        f"- encoder `{results['encoder_id']}`; {results['seconds_total']:.0f} s in all",
        "",
        "## Accuracy (%), mean over seeds",
        "",
    ]
    header = ["ordering"] + [f"@{p}" for p in points] + ["AULC"]
    if has_random:
        header += ["ΔAULC vs random (± sd) [95% CI]", "seeds won", f"labels to reach random@{grid[-1]}"]
    header += ["labels bought"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        entry = agg[name]
        cells = [name] + [f"{entry['accuracy_mean'][grid.index(p)]:.1f}" for p in points]
        cells.append(f"{entry['aulc_mean']:.2f} ± {entry['aulc_std']:.2f}")
        if has_random:
            if name == "random" or entry.get("aulc_diff_vs_random_mean") is None:
                cells += ["—", "—"]
            else:
                lo, hi = entry["aulc_diff_vs_random_ci95"]
                ci = f" [{lo:+.2f}, {hi:+.2f}]" if lo is not None else ""
                sd = entry["aulc_diff_vs_random_std"]
                spread = f" ± {sd:.2f}" if sd is not None else " (one seed: no spread)"
                cells.append(f"{entry['aulc_diff_vs_random_mean']:+.2f}{spread}{ci}")
                cells.append(f"{entry['seeds_beating_random']}/{entry['seeds_paired_with_random']}")
            reach = entry.get("labels_to_reach_random_full_budget")
            cells.append(str(reach) if reach is not None else f"not within {grid[-1]}")
        cells.append(_shares(entry["bought_label_share"], results["labels"]) if entry["bought_label_share"] else "—")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Macro-F1 (%), mean over seeds", ""]
    header = ["ordering"] + [f"@{p}" for p in points] + ["AULC"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        entry = agg[name]
        cells = [name] + [f"{entry['macro_f1_mean'][grid.index(p)]:.1f}" for p in points]
        cells.append(f"{entry['macro_f1_aulc_mean']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if "_ceiling" in agg:
        c = agg["_ceiling"]
        lines.append(
            f"**Ceiling** (head trained on all {c['labels_used']} pool labels"
            + (" plus the initial set" if meta.get("seed_data") else "")
            + f"): accuracy {c['accuracy_mean']:.1f} ± {c['accuracy_std']:.1f}, "
            f"macro-F1 {c['macro_f1_mean']:.1f} ± {c['macro_f1_std']:.1f}."
        )
    if grid[0] != grid[-1]:
        start = agg[names[0]]["accuracy_mean"][0]
        lines.append(f"**Start** (initial labeled set only, {grid[0]} pool labels): accuracy {start:.1f}.")
    lines += [
        "",
        "How to read it: AULC is the mean accuracy over the learning curve "
        f"({grid[0]}–{grid[-1]} labels, trapezoids), in points. ΔAULC is each ordering's AULC "
        "minus random's **in the same seed** (same initial set, test set and head "
        "initialisation), averaged over seeds; an interval that contains 0 means the ordering is "
        "not distinguishable from random at this number of seeds. *Seeds won*: seeds where "
        "the ordering's AULC is above random's. *Labels to reach*: the first budget where the "
        "mean accuracy reaches random's mean accuracy at the full budget. *Labels bought*: "
        "class mix of the labels the ordering picked beyond the initial set.",
        "",
        "Seconds per run (one ordering, one seed): "
        + ", ".join(f"{n} {agg[n]['seconds_ordering_per_run']:.1f} ordering + "
                    f"{agg[n]['seconds_train_per_run']:.1f} training" for n in names) + ".",
    ]
    same = [" = ".join(g) for g in identical_groups(results) if len(g) > 1]
    if same:
        lines.append(f"Identical runs (same labels bought, same scores, in every seed): {'; '.join(same)}.")
    filled = {n: agg[n]["filled_by_simulator"] for n in names if agg[n]["filled_by_simulator"]}
    if filled:
        lines.append(f"Batches the simulator had to complete (ordering returned fewer distinct tasks): {filled}.")
    path.write_text("\n".join(lines) + "\n")


def identical_groups(results: dict) -> list[list[str]]:
    """Orderings whose runs bought the same labels and scored the same in every seed (e.g.
    least confidence, margin and entropy with two classes): one line on the plot, noted in
    the summary."""
    def picks(name: str) -> dict:
        # The order within a batch does not change what the head learns.
        return {seed: (sorted(run["picked"]), run["accuracy"], run["macro_f1"])
                for seed, run in results["runs"].get(name, {}).items()}

    groups: list[list[str]] = []
    for name in results["orderings"]:
        if not picks(name):
            continue
        for group in groups:
            if picks(group[0]) == picks(name):
                group.append(name)
                break
        else:
            groups.append([name])
    return groups


def _shares(share: list[float], labels: list[str]) -> str:
    return " / ".join(f"{label} {100 * s:.0f}%" for label, s in zip(labels, share))


def plot_curves(path: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = results["aggregate"]
    groups = [g for g in identical_groups(results) if g[0] in agg]
    names = [g[0] for g in groups]
    legend = {g[0]: " = ".join(g) for g in groups}
    has_random = "random" in agg
    n_seeds = len(results["config"]["seeds"])
    panels = 3 if has_random else 2
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.8), constrained_layout=True)
    colors = plt.get_cmap("tab10")
    others = [n for n in names if n != "random"]
    style = {"random": dict(color="black", linestyle="--", linewidth=2.2, zorder=5)}
    for i, n in enumerate(others):
        style[n] = dict(color=colors(i % 10), linewidth=1.8)
    for ax, metric, title in ((axes[0], "accuracy", "Accuracy"), (axes[1], "macro_f1", "Macro-F1")):
        for n in names:
            e = agg[n]
            x = np.asarray(e["labels_used"])
            mean, std = np.asarray(e[f"{metric}_mean"]), np.asarray(e[f"{metric}_std"])
            ax.plot(x, mean, label=legend[n], marker="o", markersize=3, **style[n])
            ax.fill_between(x, mean - std, mean + std, color=style[n]["color"], alpha=0.12, linewidth=0)
        if "_ceiling" in agg:
            c = agg["_ceiling"][f"{metric}_mean"]
            ax.axhline(c, color="grey", linestyle=":", linewidth=1.5,
                       label=f"ceiling: all {agg['_ceiling']['labels_used']} pool labels")
        ax.set_title(f"{title} (%): mean over {n_seeds} seeds, band ± 1 sd")
        ax.set_xlabel("labels used (pool)")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=9)
    if has_random:
        ax = axes[2]
        ax.axhline(0, color="black", linestyle="--", linewidth=2)
        for n in others:
            e = agg[n]
            x = np.asarray(e["labels_used"])
            mean = np.asarray(e["accuracy_diff_vs_random_mean"])
            half = np.asarray(e["accuracy_diff_vs_random_ci95_half"])
            ax.plot(x, mean, label=legend[n], marker="o", markersize=3, **style[n])
            ax.fill_between(x, mean - half, mean + half, color=style[n]["color"], alpha=0.12, linewidth=0)
        ax.set_title("Accuracy minus random, same seed (points), band = 95% CI")
        ax.set_xlabel("labels used (pool)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{results['config']['data']}: {results['pool_size']}-task pool, "
                 f"batches of {results['config']['batch_size']}", fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- driver -----------------------------------------------------------------------------------


def simulate(config: SimulationConfig, out_dir: Path, report_at: list[int] | None = None,
             resume: bool = False, progress: bool = True) -> dict:
    """Run every (ordering, seed) pair plus the ceilings and write the three outputs."""
    from tqdm import tqdm

    from model.orderings import ORDERINGS

    started = time.perf_counter()
    unknown = [n for n in config.orderings if n not in ORDERINGS]
    if unknown:
        raise SystemExit(f"unknown ordering(s) {unknown}; available: {', '.join(ORDERINGS)}")
    for name, params in config.ordering_params.items():
        if name not in ORDERINGS:
            raise SystemExit(f"--ordering-params names unknown ordering {name!r}")
        try:
            ORDERINGS[name](**params)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None

    data = load_source(config.data)
    seed_data = load_source(config.seed_data) if config.seed_data else None
    test = load_source(config.test) if config.test else None
    table = build_table(data, seed_data, test)
    plans = [plan_seed(table, config, s) for s in config.seeds]
    check_plans(config, plans)

    needs_layers = any(ORDERINGS[n].needs_all_layers for n in config.orderings)
    t_encode = time.perf_counter()
    features, layers, enc_id = encode_table(table, plans, config, needs_layers, progress)
    seconds_encoding = time.perf_counter() - t_encode

    out_dir.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict[int, dict]] = {n: {} for n in config.orderings}
    ceiling: dict[int, dict] = {}
    seconds: dict[str, list[float]] = {n: [] for n in config.orderings + [CEILING]}
    log_path = out_dir / "runs.jsonl"
    keys = {n: config.run_key(n) for n in config.orderings}
    keys[CEILING] = config.run_key(CEILING)
    code = code_hash()
    if resume and log_path.exists():
        rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
        check_resumable(rows, code, log_path)
        for row in rows:
            name, seed = row["ordering"], int(row["seed"])
            if keys.get(name) != row["key"] or seed not in config.seeds:
                continue
            (ceiling if name == CEILING else runs[name])[seed] = row["result"]
    elif log_path.exists():
        log_path.unlink()

    jobs = [("ceiling", p, CEILING) for p in plans if p.seed not in ceiling]
    # Seed-major order: the first seeds complete for every ordering first.
    jobs += [("run", p, n) for p in plans for n in config.orderings if p.seed not in runs[n]]
    bar = tqdm(total=len(jobs), desc="simulating", unit="run", disable=not progress)

    def record(name, seed, result, took):
        (ceiling if name == CEILING else runs[name])[seed] = result
        seconds[name].append(took)
        with log_path.open("a") as handle:
            handle.write(json.dumps({"ordering": name, "seed": seed, "key": keys[name], "code": code,
                                     "seconds": took, "result": result}) + "\n")
        bar.set_postfix_str(f"{'ceiling' if name == CEILING else name} seed {seed}", refresh=False)
        bar.update(1)

    try:
        if config.workers <= 1:
            _set_context(features, layers, table.y, table.labels, config.threads)
            for kind, plan, name in jobs:
                record(*_job(kind, plan, name, config))
        else:
            _run_parallel(jobs, config, features, layers, table, record)
    finally:
        bar.close()

    results = {
        "config": asdict(config),
        "code": code,
        "encoder_id": enc_id,
        "labels": table.labels,
        "orderings": config.orderings,
        "pool_size": int(len(plans[0].pool)),
        "test_size": int(len(plans[0].test)),
        "pool_label_share": (np.bincount(table.y[plans[0].pool], minlength=len(table.labels))
                             / len(plans[0].pool)).tolist(),
        "seeds": {str(p.seed): {"initial_label_counts": np.bincount(
            table.y[np.concatenate([p.seed_rows, p.pool[p.initial]])], minlength=len(table.labels)).tolist()}
            for p in plans},
        "runs": {n: {str(s): runs[n][s] for s in config.seeds if s in runs[n]} for n in config.orderings},
        "ceiling": {str(s): ceiling[s] for s in config.seeds if s in ceiling},
        "aggregate": aggregate(runs, ceiling, config.seeds),
        "seconds_encoding": seconds_encoding,
        "seconds_per_run": {n: float(np.mean(v)) for n, v in seconds.items() if v},
        "seconds_total": time.perf_counter() - started,
    }
    results = _finite(results)  # strict JSON: an undefined spread (one seed) is null
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, allow_nan=False))
    write_summary(out_dir / "summary.md", results, report_at)
    plot_curves(out_dir / "learning_curves.png", results)
    return results


def _run_parallel(jobs, config, features, layers, table, record) -> None:
    """A process pool; the table's arrays go to the workers once, memory-mapped from disk."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with tempfile.TemporaryDirectory(prefix="atl-simulate-") as tmp:
        paths = {"features": os.path.join(tmp, "features.npy"), "y": os.path.join(tmp, "y.npy")}
        np.save(paths["features"], features)
        np.save(paths["y"], table.y)
        if layers is not None:
            paths["layers"] = os.path.join(tmp, "layers.npy")
            np.save(paths["layers"], layers)
        # spawn, not fork: a forked child of a process that already ran torch's thread pool
        # can hang in OpenMP.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=config.workers, mp_context=context,
                                 initializer=_init_worker,
                                 initargs=(paths, table.labels, config.threads)) as pool:
            futures = [pool.submit(_job, kind, plan, name, config) for kind, plan, name in jobs]
            try:
                for future in as_completed(futures):
                    record(*future.result())
            except BaseException:
                for future in futures:
                    future.cancel()
                raise


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.replace(",", " ").split()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m model.simulate",
        description="Replay active learning on labeled data and compare orderings against random.",
        epilog="FILE: CSV or JSONL with 'text' and 'label' columns, a Label Studio JSON export, "
               "or builtin:airline | builtin:airline3 | builtin:movies (texts) | builtin:fashion_mnist | "
               "builtin:fashion_mnist_test (images; Debian package dataset-fashion-mnist); "
               "builtin:NAME:N keeps a fixed subset of N.",
    )
    parser.add_argument("--data", required=True, help="labeled pool (and test set unless --test)")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--orderings", default="all",
                        help="comma-separated names, or 'all' (default); random is always added")
    parser.add_argument("--seeds", default="5",
                        help="number of paired seeds (0..N-1), or a list like '3,7,9' (default 5)")
    parser.add_argument("--initial", type=int, default=50,
                        help="initial labeled set: random pool tasks (counted as labels used), or "
                             "examples from --seed-data (not counted) (default 50)")
    parser.add_argument("--batch-size", type=int, default=50, help="labels per round (default 50)")
    parser.add_argument("--budget", type=int, default=500, help="pool labels to spend (default 500)")
    parser.add_argument("--pool-size", type=int, default=None,
                        help="tasks in the pool, drawn per seed (default: all not held out)")
    parser.add_argument("--test-size", type=float, default=0.25,
                        help="held-out test set: a fraction (<1) or a count (default 0.25); ignored with --test")
    parser.add_argument("--seed-data", default=None, help="draw the initial labeled set from this data instead")
    parser.add_argument("--test", default=None, help="test on this data instead of a held-out split")
    parser.add_argument("--ordering-params", default="{}",
                        help='JSON: per-ordering parameters, e.g. \'{"atlas": {"per_round": 10}}\'')
    parser.add_argument("--report-at", type=_int_list, default=None,
                        help="budgets for the summary's columns, e.g. 100,200,300,500")
    parser.add_argument("--encoder", default=os.environ.get("ENCODER", "default"),
                        help="encoder name or path (default: $ENCODER or the offline MiniLM)")
    parser.add_argument("--image-encoder", default=os.environ.get("IMAGE_ENCODER", "default"),
                        help="image encoder for image data (default: $IMAGE_ENCODER or EfficientNet-Lite0)")
    parser.add_argument("--cache", default=str(DEFAULT_CACHE), help=f"encoding cache (default {DEFAULT_CACHE})")
    parser.add_argument("--workers", type=int, default=1,
                        help="parallel processes, one run each (default 1; 2 on a 2-core machine)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the finished runs in OUT/runs.jsonl with the same settings; "
                             "refused if they were made by other model/ code")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> SimulationConfig:
    from model.orderings import ORDERINGS

    if args.orderings.strip() in ("", "all"):
        orderings = list(ORDERINGS)
    else:
        orderings = [n.strip() for n in args.orderings.split(",") if n.strip()]
    if "random" not in orderings:
        orderings.insert(0, "random")  # the control every other ordering is measured against
    seeds_text = args.seeds.strip()
    seeds = list(range(int(seeds_text))) if seeds_text.isdigit() else _int_list(seeds_text)
    try:
        params = json.loads(args.ordering_params)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"--ordering-params is not valid JSON: {exc}") from None
    if not isinstance(params, dict) or not all(isinstance(v, dict) for v in params.values()):
        raise SystemExit('--ordering-params must map ordering names to objects, e.g. {"atlas": {"per_round": 10}}')
    return SimulationConfig(
        data=args.data, orderings=orderings, seeds=seeds, initial=args.initial,
        batch_size=args.batch_size, budget=args.budget, pool_size=args.pool_size,
        test_size=args.test_size, seed_data=args.seed_data, test=args.test,
        ordering_params=params, encoder=args.encoder, image_encoder=args.image_encoder, cache=args.cache,
        workers=args.workers, threads=args.threads,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = config_from_args(args)
    results = simulate(config, args.out, report_at=args.report_at, resume=args.resume,
                       progress=not args.quiet)
    print((args.out / "summary.md").read_text())
    print(f"wrote {args.out / 'results.json'}, {args.out / 'learning_curves.png'}, "
          f"{args.out / 'summary.md'} in {results['seconds_total']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
