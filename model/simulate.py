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
snippets, `builtin:debian_use` and `builtin:debian_role_language` = Debian package
descriptions with their Debtags; see `model.datasets`).

**Several controls, multi-label** (issue 13): a `labels` column (several values per row), or
several label columns (`--label-columns topic,urgency`, `--multi-label` for the multi-label
ones), are the controls of one project. Then every round trains the retrain's own heads
(`model.heads.train_heads`: one head per control, the out-of-fold pass that sets the
multi-label thresholds, with the same number of folds for every ordering so the seeds stay
paired) and hands them, with that pass, to the ordering as the service does
(`model.queue_scores.queue_scores_multi`). Each control is scored on the test set
(single-choice: accuracy and macro-F1; multi-label: exact-match accuracy, i.e. the predicted
set is the true set, and macro-F1 over its choices), and **overall**: a test task counts as
right when every control it answers is right (what an annotator reviewing the pre-filled
task needs to change nothing), and the overall macro-F1 is the mean of the controls'.
With one single-choice column everything is as before: the overall figures are that
column's, and the head is the single `ClassifierHead`.

Labeled images: `builtin:fashion_mnist` (and
`builtin:fashion_mnist_test`, Zalando's test split; Debian package `dataset-fashion-mnist`),
encoded with the service's `model.image_encoder.ImageEncoder` and cached by image content
as the service caches a project's images. `builtin:NAME:N` keeps a fixed subset of N.

Honest statistics (issue 6): seeds are paired (in one seed every ordering starts from the
same initial labeled set and is scored on the same test set, with the same head
initialisation; with `--initial-order kmeans` every ordering but the control starts from
the service's k-means cold start instead, the same set for each of them), the x axis
counts only labels bought from the pool (a `--seed-data` set is free: it is the data the
team already has), and `summary.md` reports each ordering's difference from random per
seed, not only the means.

Random is the control: it runs without the class guard (`CONTROL_PARAMS`), a team
labeling in a uniformly random order.

Outputs in DIR: `results.json`, `learning_curves.png`, `summary.md`, `runs.jsonl`
(one line per finished run, so `--resume` can continue an interrupted simulation), and
`invocations.json` (the time of each invocation, summed in the summary after `--resume`).
`--replot` redraws the plot and the summary from `results.json` alone. Each
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
    AnnotatedTexts,
    LabelColumn,
    LabeledImages,
    airline_tweets,
    debian_packages,
    fashion_mnist,
    load_annotated_file,
    movie_snippets,
)

DEFAULT_CACHE = Path("~/.cache/atl-backend/encodings.sqlite3")
MODEL_DIR = Path(__file__).resolve().parent
CEILING = "__ceiling__"  # key of the all-pool-labels run in runs.jsonl
CONTROL_PARAMS = {"class_guard": False}  # random's defaults here (SimulationConfig)
INVOCATIONS = "invocations.json"  # the time of each invocation into one DIR (--resume)

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
    "debian_use": (
        "Debian package descriptions, multi-label: what the package is used for (Debtags use::, 10 tags)",
        lambda n: _sampled(debian_packages(multi=("use",), top=10), n),
    ),
    "debian_role_language": (
        "Debian package descriptions, two controls: role (single-choice, 4 tags) and "
        "implemented-in (multi-label, 6 languages)",
        lambda n: _sampled(debian_packages(single=("role",), multi=("implemented-in",),
                                           top={"role": 4, "implemented-in": 6}), n),
    ),
    # Issue 17: a many-class single-choice text question, where margin and least confidence
    # can rank differently (on two classes they cannot, on airline3's three they tie).
    "debian_works_with": (
        "Debian package descriptions, single-choice: what the package works with (Debtags works-with::, "
        "8 tags)",
        lambda n: _sampled(debian_packages(single=("works-with",), multi=(), top={"works-with": 8}), n),
    ),
    # Issue 17, point 1: checks of a head rule on data it was not chosen on, the same
    # question with three classes, and a five-class question.
    "debian_works_with3": (
        "Debian package descriptions, single-choice: works-with::, its 3 most common tags",
        lambda n: _sampled(debian_packages(single=("works-with",), multi=(), top={"works-with": 3}), n),
    ),
    "debian_uitoolkit": (
        "Debian package descriptions, single-choice: the user-interface toolkit (Debtags uitoolkit::, 5 tags)",
        lambda n: _sampled(debian_packages(single=("uitoolkit",), multi=(), top={"uitoolkit": 5}), n),
    ),
    "fashion_mnist": ("Fashion-MNIST training images (60,000, 10 classes of clothes)",
                      lambda n: fashion_mnist("train", sample=n)),
    "fashion_mnist_test": ("Fashion-MNIST test images (10,000)", lambda n: fashion_mnist("test", sample=n)),
}


def load_source(spec: str, label_columns: list[str] | None = None,
                multi_label: list[str] | tuple = ()) -> AnnotatedTexts | LabeledImages:
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
            data = BUILTIN[name][1](int(count) if count else None)
        except FileNotFoundError as exc:
            raise SystemExit(f"{spec}: {exc}") from None
        if isinstance(data, LabeledImages):
            return data
        data = data.as_annotated() if hasattr(data, "as_annotated") else data
        if label_columns:
            data = AnnotatedTexts(data.texts, [data.column(c) for c in label_columns], data.source)
        return data
    path = Path(spec).expanduser()
    if not path.exists():
        raise SystemExit(f"{spec}: no such file (or use builtin:{'|'.join(BUILTIN)})")
    try:
        return load_annotated_file(path, label_columns, multi_label)
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
    label_columns: list[str] | None = None  # None: `label` (or `labels`), or the built-in's columns
    multi_label: list[str] = field(default_factory=list)
    rare_class: str | None = None  # "LABEL:SHARE": thin that class of --data (thin_class)
    # How the orderings other than the control get their initial pool labels: "random" (the
    # paired random set, every ordering alike) or "kmeans", the service's cold start
    # (COLD_START_ORDER's default; `model.cold_start.representative_order`), which is how a
    # project connected before its first annotation starts. The control always starts
    # from the random set: it is a team labeling without the backend.
    initial_order: str = "random"

    def __post_init__(self) -> None:
        # The control is a team labeling in a uniformly random order, with no help from the
        # model (BENCHMARKS.md): random's class guard is off unless asked for explicitly.
        self.ordering_params = dict(self.ordering_params)
        self.ordering_params["random"] = {**CONTROL_PARAMS, **self.ordering_params.get("random", {})}

    def run_key(self, ordering: str) -> str:
        """What a finished run depends on; `--resume` reuses runs with the same key."""
        relevant = {
            k: getattr(self, k)
            for k in ("data", "initial", "batch_size", "budget", "pool_size", "test_size",
                      "seed_data", "test", "encoder", "label_columns", "multi_label", "image_encoder")
        }
        if self.rare_class:  # only when set, so the keys of earlier runs stay valid
            relevant["rare_class"] = self.rare_class
        if self.initial_order != "random" and ordering != "random":
            relevant["initial_order"] = self.initial_order
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


def thin_class(data: AnnotatedTexts, rare: str) -> AnnotatedTexts:
    """`data` with the class LABEL of its first column kept on a fixed random subset, so
    that it is SHARE of the rows (`rare` = "LABEL:SHARE", e.g. "Positive:0.05").

    A rarer minority class (issue 17): where the rows of a class are few, uncertainty is
    a poor guide to them and active transfer learning is meant to help. The subset is the
    same for every seed and run (seeded by the label), so the pool and test set of each
    seed are drawn from the same thinned data.
    """
    label, _, share_text = rare.rpartition(":")
    try:
        share = float(share_text)
    except ValueError:
        share = -1.0
    if isinstance(data, LabeledImages) or not label or not 0.0 < share < 1.0:
        raise SystemExit(f"--rare-class {rare!r}: give LABEL:SHARE with 0 < SHARE < 1 "
                         "(e.g. Positive:0.05), for text data")
    answers = np.array([str(a) for a in data.columns[0].answers], dtype=object)
    members = np.flatnonzero(answers == label)
    others = np.flatnonzero(answers != label)
    if not len(members):
        raise SystemExit(f"--rare-class: no row of {data.columns[0].name!r} is {label!r}; "
                         f"its labels are {data.columns[0].choices()}")
    keep = int(round(share / (1.0 - share) * len(others)))
    if keep >= len(members):
        raise SystemExit(f"--rare-class {rare!r}: {label!r} is already only "
                         f"{len(members) / len(answers):.1%} of the rows; ask for a smaller share")
    rng = np.random.default_rng(int(hashlib.sha256(label.encode()).hexdigest()[:8], 16))
    kept = rng.permutation(members)[: max(keep, 1)]
    return data.subset(np.sort(np.concatenate([others, kept])))


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
    """Every text of the run (data, then seed data, then test) and each control's targets."""

    texts: list[str]
    specs: list  # model.heads.ControlSpec per label column
    targets: list[np.ndarray]  # per control, over all rows (model.heads.encode_targets)
    data_rows: np.ndarray
    seed_rows: np.ndarray
    test_rows: np.ndarray
    source: str = ""
    images: bool = False  # rows are image files (bytes), encoded with the image encoder

    @property
    def labels(self) -> list[str]:
        """The first control's choices."""
        return list(self.specs[0].labels)

    @property
    def y(self) -> np.ndarray:
        """The first control's targets."""
        return self.targets[0]

    @property
    def one_single_choice(self) -> bool:
        """One single-choice control: the original simulator (one `ClassifierHead`)."""
        return len(self.specs) == 1 and not self.specs[0].multi_label


def build_table(data, seed_data=None, test=None) -> TextTable:
    """One table of `data`, `seed_data` and `test`: all `AnnotatedTexts`, or all
    `LabeledImages` (image files with one single-choice label, a control named "label")."""
    from model.heads import ControlSpec, encode_targets

    images = isinstance(data, LabeledImages)
    if any(isinstance(p, LabeledImages) != images for p in (seed_data, test) if p is not None):
        raise SystemExit("--data, --seed-data and --test must all be texts or all be images")
    if images:
        data, seed_data, test = (None if p is None else AnnotatedTexts(p.images, [LabelColumn("label", p.labels)])
                                 for p in (data, seed_data, test))
    names = [c.name for c in data.columns]
    parts = [data] + [p for p in (seed_data, test) if p is not None]
    for part, flag in ((seed_data, "--seed-data"), (test, "--test")):
        if part is not None and [c.name for c in part.columns] != names:
            raise SystemExit(f"{flag} has the label columns {[c.name for c in part.columns]}, the data "
                             f"has {names}: give both the same columns (--label-columns)")
    specs = []
    for i, column in enumerate(data.columns):
        multi = any(p.columns[i].multi_label for p in parts)
        known = [p.columns[i] for p in (data, seed_data) if p is not None]
        labels = sorted(set().union(*(set(c.choices()) for c in known)))
        if len(labels) < 2:
            raise SystemExit(f"the column {column.name!r} has {len(labels)} class(es); "
                             "a classifier needs at least two")
        if test is not None:
            unknown = sorted(set(test.columns[i].choices()) - set(labels))
            if unknown:
                raise SystemExit(f"--test has labels the training data never shows in {column.name!r}: {unknown}")
        specs.append(ControlSpec(name=column.name, labels=labels, multi_label=multi, inputs=["text"]))
    texts = [t for p in parts for t in p.texts]
    targets = []
    for i, spec in enumerate(specs):
        answers = [a for p in parts for a in p.columns[i].answers]
        if spec.multi_label:  # a single value in a multi-label column is a set of one
            answers = [a if a is None or isinstance(a, (tuple, list, set)) else (a,) for a in answers]
        targets.append(encode_targets(spec, answers))
    n_data, n_seed = len(data), len(seed_data) if seed_data else 0
    n_test = len(test) if test else 0
    return TextTable(
        texts, specs, targets,
        data_rows=np.arange(n_data),
        seed_rows=np.arange(n_data, n_data + n_seed),
        test_rows=np.arange(n_data + n_seed, n_data + n_seed + n_test),
        source=data.source,
        images=images,
    )


def table_from_config(config: SimulationConfig) -> TextTable:
    """The table of `config`'s data (its rare class thinned), seed data and test data; the
    seed and test data answer the data's questions."""
    columns, multi = config.label_columns, config.multi_label
    data = load_source(config.data, columns, multi)
    if config.rare_class:
        data = thin_class(data, config.rare_class)
    if columns is None and not isinstance(data, LabeledImages):
        columns = [c.name for c in data.columns]
    seed_data = load_source(config.seed_data, columns, multi) if config.seed_data else None
    test = load_source(config.test, columns, multi) if config.test else None
    return build_table(data, seed_data, test)


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
        if table.one_single_choice:
            initial = _cover_classes(initial, table.y[pool], rng)
        else:
            initial = cover_choices(initial, choice_matrix(table.specs, [t[pool] for t in table.targets]), rng)
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


def choice_matrix(specs: list, targets: list[np.ndarray]) -> np.ndarray:
    """(n, total choices) bool: whether each row's answer uses each choice of each control
    (single-choice: its label; multi-label: every chosen choice; unanswered: none)."""
    blocks = []
    for spec, t in zip(specs, targets):
        t = np.asarray(t)
        if spec.multi_label:
            blocks.append(t == 1)
        else:
            blocks.append(t[:, None] == np.arange(len(spec.labels))[None, :])
    return np.concatenate(blocks, axis=1)


def cover_choices(initial: np.ndarray, uses: np.ndarray, rng) -> np.ndarray:
    """`_cover_classes` for several controls and multi-label ones: swap members of the
    initial set for pool rows that use each choice it misses (`uses` from `choice_matrix`),
    replacing only members whose every choice some other member also uses. A choice that
    cannot be covered that way stays missing."""
    initial = np.asarray(initial).copy()
    present = uses.any(axis=0)
    for choice in np.flatnonzero(present & ~uses[initial].any(axis=0)):
        counts = uses[initial].sum(axis=0)
        if counts[choice]:
            continue  # covered by an earlier swap
        removable = [s for s in range(len(initial)) if not (uses[initial[s]] & (counts == 1)).any()]
        outside = np.setdiff1d(np.arange(len(uses)), initial)
        candidates = outside[uses[outside, choice]]
        if not removable or not len(candidates):
            continue
        initial[rng.choice(removable)] = rng.choice(candidates)
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
        # One pass gives the top features and every stage (domain-likeness's features), both
        # cached: a second run, with or without domain-likeness, encodes nothing.
        with tqdm(total=len(first), desc="encoding images (features and stages)", unit="image",
                  disable=not progress, leave=False) as bar:
            # In chunks, each stored at once: an interrupted run keeps what it encoded. The bar
            # moves after every encoder batch within a chunk.
            for start in range(0, len(first), chunk):
                part = first[start : start + chunk]
                top, stages = encoder.encode_both([table.texts[needed[j]] for j in part], stages=True,
                                                  progress=lambda done, _total, at=start: bar.update(at + done - bar.n))
                texts = [keys[j] for j in part]
                cache.store(enc_id, texts, top)
                cache.store(stage_key, texts, stages)
                bar.update(start + len(part) - bar.n)
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

_CONTEXT: dict = {}  # features, targets and controls of the text table, set once per process


def _set_context(features, layers, targets, specs, threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, threads))
    _CONTEXT.update(features=features, layers=layers, targets=list(targets), specs=list(specs),
                    y=targets[0], labels=list(specs[0].labels))


def _init_worker(paths: dict, specs: list, threads: int) -> None:
    """Process-pool initializer: map the table's arrays from disk (shared, read-only)."""
    load = lambda key: np.load(paths[key], mmap_mode="r") if paths.get(key) else None  # noqa: E731
    targets = [np.load(paths[f"targets{i}"]) for i in range(len(specs))]
    _set_context(load("features"), load("layers"), targets, specs, threads)


def _one_single_choice() -> bool:
    specs = _CONTEXT["specs"]
    return len(specs) == 1 and not specs[0].multi_label


def _head(input_dim: int, seed: int, settings: dict):
    from model.classifier import ClassifierHead, HeadConfig

    # The service's head: HeadConfig defaults; only the initialisation seed follows the
    # simulation seed (the same for every ordering of that seed). `head_settings` (other
    # HeadConfig fields) is for benches that compare heads on the simulator's splits.
    return ClassifierHead(HeadConfig(labels=list(_CONTEXT["labels"]), input_dim=input_dim, seed=seed,
                                     **settings))


def _retrain_head_settings() -> dict:
    """The service's retrain head (`RETRAIN_HEAD_KIND`), for every ordering alike;
    `head_settings` in the context (HeadConfig fields) is for benches that compare heads on
    the simulator's splits."""
    from model.classifier import RETRAIN_HEAD_KIND

    return {"kind": RETRAIN_HEAD_KIND, **_CONTEXT.get("head_settings", {})}


def train_round(rows: np.ndarray, seed: int, head_settings: dict | None = None,
                pool_rows: np.ndarray | None = None):
    """(heads, out-of-fold pass or None) trained on the table rows `rows`; `pool_rows`, the
    pool's unlabeled rows, reach a head that chooses its C with their importance weights
    (`c_weighting="pool"`), as the service's heads get the project's unlabeled tasks.

    One single-choice control: the single `ClassifierHead` as before (an ordering that needs
    an out-of-fold pass runs its own). Otherwise the retrain's own step,
    `model.heads.train_heads`, with `MISLABELING_FOLDS` folds for every ordering: the
    service would use the ordering's own `folds` there, but then the multi-label thresholds,
    and so every score, would differ between orderings before they picked anything, and
    the seeds would not be paired. An ordering with other `folds` runs its own pass.
    """
    from model.heads import ControlHeads, train_heads
    from model.queue_scores import MISLABELING_FOLDS

    features, targets, specs = _CONTEXT["features"], _CONTEXT["targets"], _CONTEXT["specs"]
    x = np.asarray(features[rows], dtype=np.float32)
    wants_pool = (head_settings or {}).get("c_weighting", "uniform") != "uniform" and pool_rows is not None
    if _one_single_choice():
        pool = np.asarray(features[pool_rows], dtype=np.float32) if wants_pool else None
        head = _head(features.shape[1], seed, head_settings or {}).fit(x, targets[0][rows], pool=pool)
        return ControlHeads.single(head, specs[0].name), None
    task_targets = [np.asarray(t[rows]) for t in targets]
    if wants_pool:  # the unlabeled rows answer no control: `answered` leaves them out of every fit
        x = np.concatenate([x, np.asarray(features[pool_rows], dtype=np.float32)])
        task_targets = [np.concatenate([t, np.full((len(pool_rows),) + t.shape[1:], -1, dtype=t.dtype)])
                        for t in task_targets]
    return train_heads(specs, [x] * len(specs), task_targets,
                       labeled=np.arange(len(rows)), folds=MISLABELING_FOLDS, seed=seed,
                       **(head_settings or {}))


def score_controls(specs: list, predicted: list[np.ndarray], truth: list[np.ndarray]) -> dict:
    """Test-set scores per control and overall, on plain arrays.

    `predicted[i]`: control i's predictions (`ControlHeads.predict`: label indices, or a
    bool matrix for multi-label); `truth[i]`: its targets (`encode_targets`, -1 where a task
    does not answer). Per control, on the tasks that answer it: single-choice accuracy and
    macro-F1 over its labels; multi-label exact-match accuracy (the predicted set is the
    true set) and macro-F1 over its choices. Overall: the share of tasks (answering at least
    one control) where every answered control is right, and the mean of the macro-F1s.
    """
    from sklearn.metrics import f1_score

    from model.heads import answered

    per_control, all_right, any_answer = {}, None, None
    for spec, p, t in zip(specs, predicted, truth):
        p, t = np.asarray(p), np.asarray(t)
        rows = answered(t)
        if spec.multi_label:
            right = (p.astype(bool) == (t == 1)).all(axis=1)
            f1 = f1_score((t[rows] == 1).astype(int), p[rows].astype(int), average="macro", zero_division=0)
        else:
            right = p == t
            f1 = f1_score(t[rows], p[rows], average="macro", labels=np.arange(len(spec.labels)), zero_division=0)
        per_control[spec.name] = {"accuracy": float(right[rows].mean()) if rows.any() else float("nan"),
                                  "macro_f1": float(f1)}
        all_right = (right | ~rows) if all_right is None else all_right & (right | ~rows)
        any_answer = rows if any_answer is None else any_answer | rows
    return {"accuracy": float(all_right[any_answer].mean()) if any_answer.any() else float("nan"),
            "macro_f1": float(np.mean([c["macro_f1"] for c in per_control.values()])),
            "per_control": per_control}


def _evaluate(heads, test_rows: np.ndarray) -> dict:
    x = np.asarray(_CONTEXT["features"][test_rows], dtype=np.float32)
    predicted = heads.predict(heads.predict_proba([x] * len(heads)))
    return score_controls(_CONTEXT["specs"], predicted, [np.asarray(t[test_rows]) for t in _CONTEXT["targets"]])


def bought_counts(spec, targets: np.ndarray) -> list[int]:
    """How many of the given rows use each choice of a control (a class count for single-choice)."""
    targets = np.asarray(targets)
    if spec.multi_label:
        return (targets == 1).sum(axis=0).astype(int).tolist()
    return np.bincount(targets[targets >= 0], minlength=len(spec.labels)).astype(int).tolist()


INITIAL_ORDERS = ("random", "kmeans")
# This process's cold-start orders, by seed and pool: every ordering of a seed starts from
# the same one, so its k-means runs once per seed, not once per ordering.
_COLD_START_ORDERS: dict[tuple[int, str], np.ndarray] = {}


def initial_positions(plan: SeedPlan, name: str, config: SimulationConfig, features: np.ndarray) -> np.ndarray:
    """The pool positions an ordering's loop starts labeled: the plan's random set, or with
    `initial_order="kmeans"` (every ordering but the control) as many tasks from the head
    of the service's cold-start order over the pool's vectors. No class is swapped in: the
    service does not know the labels either (a class the first picks miss is bought later)."""
    if config.initial_order == "random" or name == "random" or not len(plan.initial):
        return plan.initial
    if config.initial_order != "kmeans":
        raise SystemExit(f"--initial-order must be one of {', '.join(INITIAL_ORDERS)}, got {config.initial_order!r}")
    key = (plan.seed, hashlib.sha256(np.asarray(plan.pool, dtype=np.int64).tobytes()).hexdigest())
    if key not in _COLD_START_ORDERS:
        from model.cold_start import representative_order

        pool_x = np.asarray(features[plan.pool], dtype=np.float32)
        _COLD_START_ORDERS[key] = representative_order(pool_x, seed=plan.seed).order
    return np.asarray(_COLD_START_ORDERS[key][: len(plan.initial)], dtype=np.int64)


def run_ordering(plan: SeedPlan, name: str, config: SimulationConfig) -> dict:
    """Replay the labeling loop for one ordering on one seed's paired setup."""
    from model.orderings import OrderingInput, get_ordering
    from model.orderings.base import jsonable
    from model.queue_scores import MISLABELING_FOLDS, out_of_fold_folds

    features, layers, targets, specs = _CONTEXT["features"], _CONTEXT["layers"], _CONTEXT["targets"], _CONTEXT["specs"]
    single = _one_single_choice()
    params = config.ordering_params.get(name, {})
    ordering = get_ordering(name, **params)
    head_settings = _retrain_head_settings()
    # The heads' pass serves the ordering only where it asks for the same number of folds.
    shares_pass = out_of_fold_folds(name, params) == MISLABELING_FOLDS
    labeled = [int(i) for i in initial_positions(plan, name, config, features)]  # positions in the pool
    is_labeled = np.zeros(len(plan.pool), dtype=bool)
    is_labeled[labeled] = True
    grid = label_grid(config, plan)
    out = {"labels_used": [], "accuracy": [], "macro_f1": [], "batch_label_counts": [],
           "info": [], "seconds_train": 0.0, "seconds_ordering": 0.0, "filled_by_simulator": 0}
    if not single:
        out["per_control"] = {s.name: {"accuracy": [], "macro_f1": [], "batch_label_counts": []} for s in specs}
    train_rows = heads = oof = None  # trained at the end of each round, used by the next one's ordering
    for round_number, target in enumerate(grid):
        if round_number:
            unlabeled = np.flatnonzero(~is_labeled)
            need = target - len(labeled)
            pool_x = np.asarray(features[plan.pool[unlabeled]], dtype=np.float32)
            train_x = np.asarray(features[train_rows], dtype=np.float32)
            probabilities = heads.predict_proba([pool_x] * len(heads))
            wants_layers = layers is not None and ordering.needs_all_layers
            inputs = OrderingInput(
                features_labeled=train_x,
                labels=targets[0][train_rows],
                features_unlabeled=pool_x,
                classifier=heads.heads[0],
                all_layers_labeled=layers[train_rows] if wants_layers else None,
                all_layers_unlabeled=layers[plan.pool[unlabeled]] if wants_layers else None,
                batch_size=need,
                seed=plan.seed * 1000 + round_number,
                probabilities_unlabeled=probabilities[0],
            )
            if not single:
                # What queue_scores_multi hands an ordering: every head, its inputs and
                # answers, and the retrain's one out-of-fold pass.
                inputs.heads = heads
                inputs.head_features_labeled = [train_x] * len(heads)
                inputs.head_features_unlabeled = [pool_x] * len(heads)
                inputs.targets = [np.asarray(t[train_rows]) for t in targets]
                inputs.head_probabilities_unlabeled = probabilities
                inputs.out_of_fold = oof if shares_pass else None
            started = time.perf_counter()
            result = ordering.score(inputs)
            out["seconds_ordering"] += time.perf_counter() - started
            picked, filled = _exact_batch(result, need)
            out["filled_by_simulator"] += filled
            out.setdefault("rounds_diagnostics", []).append(round_diagnostics(inputs, result, picked, need, config))
            out["info"].append(jsonable(result.info))
            chosen = unlabeled[picked]
            is_labeled[chosen] = True
            labeled.extend(int(i) for i in chosen)
            out["batch_label_counts"].append(bought_counts(specs[0], targets[0][plan.pool[chosen]]))
            if not single:
                for spec, t in zip(specs, targets):
                    out["per_control"][spec.name]["batch_label_counts"].append(
                        bought_counts(spec, t[plan.pool[chosen]]))
        train_rows = np.concatenate([plan.seed_rows, plan.pool[np.asarray(labeled, dtype=np.int64)]])
        started = time.perf_counter()
        heads, oof = train_round(train_rows, plan.seed, head_settings, pool_rows=plan.pool[~is_labeled])
        out["seconds_train"] += time.perf_counter() - started
        scores = _evaluate(heads, plan.test)
        out["labels_used"].append(len(labeled))
        out["accuracy"].append(scores["accuracy"])
        out["macro_f1"].append(scores["macro_f1"])
        if not single:
            for control, values in scores["per_control"].items():
                out["per_control"][control]["accuracy"].append(values["accuracy"])
                out["per_control"][control]["macro_f1"].append(values["macro_f1"])
    out["picked"] = [int(plan.pool[i]) for i in labeled[len(plan.initial):]]
    if config.initial_order != "random" and name != "random":
        out["initial"] = [int(plan.pool[i]) for i in labeled[:len(plan.initial)]]
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


# -- does an ordering act? (issue 17, point 3) -----------------------------------------------


def batch_overlap(picked, reference) -> float:
    """Share of `picked` that is also in `reference` (1.0 for two empty batches)."""
    picked = {int(i) for i in np.asarray(picked).ravel()}
    if not picked:
        return 1.0
    return len(picked & {int(i) for i in np.asarray(reference).ravel()}) / len(picked)


def round_diagnostics(inputs, result, picked: np.ndarray, need: int, config: SimulationConfig) -> dict:
    """Whether the ordering fell back this round, and how much of its batch least
    confidence would have picked from the same round state (same heads, same scores).

    Least confidence is pure arithmetic on the probabilities already computed, so scoring it
    again here costs next to nothing (and is not counted in the ordering's seconds).
    """
    from model.orderings import get_ordering

    least = get_ordering("least_confidence", **config.ordering_params.get("least_confidence", {}))
    least_picked, _ = _exact_batch(least.score(inputs), need)
    return {"fell_back": bool(result.info.get("fallback")),
            "least_confidence_overlap": batch_overlap(picked, least_picked)}


def aggregate_diagnostics(runs: dict[str, dict[int, dict]], seeds: list[int]) -> dict:
    """Per ordering: rounds fallen back / rounds (and in the first round, over seeds), and the
    mean share of its batches that least confidence picked too (all rounds; first round)."""
    out = {}
    for name, per_seed in runs.items():
        rounds = [per_seed[s].get("rounds_diagnostics") for s in seeds if s in per_seed]
        rounds = [r for r in rounds if r]
        if not rounds:
            continue
        flat = [d for r in rounds for d in r]
        out[name] = {
            "rounds": len(flat),
            "rounds_fallen_back": int(sum(d["fell_back"] for d in flat)),
            "seeds": len(rounds),
            "first_round_fallen_back": int(sum(r[0]["fell_back"] for r in rounds)),
            "least_confidence_overlap_mean": float(np.mean([d["least_confidence_overlap"] for d in flat])),
            "first_round_least_confidence_overlap_mean": float(
                np.mean([r[0]["least_confidence_overlap"] for r in rounds])),
        }
    return out


def paired_versus(runs: dict[str, dict[int, dict]], seeds: list[int], reference: str = "least_confidence") -> dict:
    """Per ordering: its AULC (accuracy and macro-F1) minus `reference`'s in the same seed,
    mean, 95 % t-interval and seeds won: does it beat least confidence beyond noise?"""
    out = {}
    if reference not in runs:
        return out
    for name, per_seed in runs.items():
        paired = [s for s in seeds if s in per_seed and s in runs[reference]]
        if name == reference or not paired:
            continue
        entry = {"seeds": len(paired)}
        for key in ("accuracy", "macro_f1"):
            diffs = np.array([aulc(per_seed[s]["labels_used"], per_seed[s][key])
                              - aulc(runs[reference][s]["labels_used"], runs[reference][s][key]) for s in paired])
            half = _t95(len(diffs)) * float(diffs.std(ddof=1)) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
            entry[f"{key}_aulc_diff_mean"] = float(diffs.mean())
            entry[f"{key}_aulc_diff_ci95"] = [float(diffs.mean() - half), float(diffs.mean() + half)]
            entry[f"{key}_seeds_won"] = int((diffs > 0).sum())
        out[name] = entry
    return out


def diagnostics_lines(results: dict) -> list[str]:
    """The summary's table of fallbacks and overlap with least confidence's picks."""
    diagnostics = results.get("ordering_diagnostics") or {}
    names = [n for n in results["orderings"] if n in diagnostics]
    if not names:
        return []
    lines = ["", "## Does the ordering act? Fallbacks and overlap with least confidence", "",
             "| ordering | rounds fallen back | first round fallen back (seeds) | batch overlap with "
             "least confidence | first round overlap |", "|---|---|---|---|---|"]
    for name in names:
        d = diagnostics[name]
        lines.append(f"| {name} | {d['rounds_fallen_back']}/{d['rounds']} | {d['first_round_fallen_back']}/"
                     f"{d['seeds']} | {100 * d['least_confidence_overlap_mean']:.0f}% | "
                     f"{100 * d['first_round_least_confidence_overlap_mean']:.0f}% |")
    lines += ["", "*Fallen back*: rounds where the ordering served least confidence's scores (info "
              "`fallback`). *Overlap*: share of the ordering's batch that least confidence picks from "
              "the same round state (same heads, same labeled set), mean over rounds and seeds."]
    versus = results.get("versus_least_confidence") or {}
    if versus:
        lines += ["", "## Paired difference from least confidence (AULC, points)", "",
                  "| ordering | ΔAULC accuracy [95% CI] | seeds won | ΔAULC macro-F1 [95% CI] | seeds won |",
                  "|---|---|---|---|---|"]
        for name in [n for n in results["orderings"] if n in versus]:
            v = versus[name]
            cells = [name]
            for key in ("accuracy", "macro_f1"):
                lo, hi = v[f"{key}_aulc_diff_ci95"]
                ci = f" [{lo:+.2f}, {hi:+.2f}]" if lo is not None else ""
                cells += [f"{v[f'{key}_aulc_diff_mean']:+.2f}{ci}", f"{v[f'{key}_seeds_won']}/{v['seeds']}"]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def run_ceiling(plan: SeedPlan, config: SimulationConfig) -> dict:
    """Accuracy with every pool label (plus the seed set): what labeling everything buys."""
    rows = np.concatenate([plan.seed_rows, plan.pool])
    heads, _ = train_round(rows, plan.seed, _retrain_head_settings())
    scores = _evaluate(heads, plan.test)
    result = {"labels_used": len(plan.pool), "accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"]}
    if not _one_single_choice():
        result["per_control"] = scores["per_control"]
    return result


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
    random_aulc = random_f1_aulc = None
    if "random" in runs:
        random_aulc = {s: aulc(r["labels_used"], r["accuracy"]) for s, r in runs["random"].items()}
        random_f1_aulc = {s: aulc(r["labels_used"], r["macro_f1"]) for s, r in runs["random"].items()}
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
            f1_diffs = np.array([aulc(x, per_seed[s]["macro_f1"]) - random_f1_aulc[s] for s in paired])
            f1_half = _t95(n) * float(f1_diffs.std(ddof=1)) / math.sqrt(n) if n > 1 else float("nan")
            entry.update({
                "aulc_diff_vs_random_mean": float(diffs.mean()) if n else float("nan"),
                "aulc_diff_vs_random_std": sd,
                "aulc_diff_vs_random_ci95": [float(diffs.mean() - half), float(diffs.mean() + half)],
                "seeds_beating_random": int((diffs > 0).sum()),
                "macro_f1_aulc_diff_vs_random_mean": float(f1_diffs.mean()) if n else float("nan"),
                "macro_f1_aulc_diff_vs_random_ci95": [float(f1_diffs.mean() - f1_half),
                                                      float(f1_diffs.mean() + f1_half)],
                "macro_f1_seeds_beating_random": int((f1_diffs > 0).sum()),
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


def aggregate_controls(runs: dict[str, dict[int, dict]], ceiling: dict[int, dict], seeds: list[int],
                       controls: list[str]) -> dict:
    """`aggregate` of each control's own curves (runs with several controls), by control name."""
    def view(result: dict, control: str) -> dict:
        own = result["per_control"][control]
        return {**result, **{k: own[k] for k in ("accuracy", "macro_f1", "batch_label_counts") if k in own}}

    return {control: aggregate({n: {s: view(r, control) for s, r in per_seed.items()} for n, per_seed in runs.items()},
                               {s: view(r, control) for s, r in ceiling.items()}, seeds)
            for control in controls}


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
           if meta.get("seed_data") else f", initial labeled set: {meta['initial']} random pool tasks"
           + ("; every ordering but random starts from the head of the service's k-means cold start instead"
              if meta.get("initial_order") == "kmeans" else ""))
        + (f", test: `{meta['test']}`" if meta.get("test") else ""),
    ]
    several = bool(results.get("aggregate_per_control"))
    if several:
        lines.append(f"- source: {results['data_source']}" if results.get("data_source") else "- source: —")
        lines.append(f"- pool {results['pool_size']} tasks, test {results['test_size']} tasks; controls (share of "
                     "pool tasks with each choice):")
        for control in results["controls"]:
            kind = "multi-label" if control["multi_label"] else "single-choice"
            lines.append(f"  - `{control['name']}` ({kind}): {_shares(control['pool_label_share'], control['labels'])}")
    else:
        lines.append(f"- classes: {', '.join(results['labels'])}; pool {results['pool_size']} tasks "
                     f"({_shares(results['pool_label_share'], results['labels'])}), test {results['test_size']} tasks")
    lines += [
        f"- batches of {meta['batch_size']} up to {meta['budget']} pool labels; "
        f"{len(meta['seeds'])} paired seed{'s' if len(meta['seeds']) != 1 else ''}; "
        + ("every ordering trains the retrain's heads (model.heads.train_heads: one per control, "
           "multi-label thresholds out of fold)" if several
           else "every ordering trains the service's class-weighted head"),
        f"- encoder `{results['encoder_id']}`; {_time_spent(results)}",
        "",
    ]
    if several:
        lines += ["**Overall**: a test task counts as right when every control it answers is right (for a "
                  "multi-label control: the predicted set is exactly the true set); overall macro-F1 is the "
                  "mean of the controls' macro-F1. Per-control tables follow the overall ones.", ""]
    lines += [
        "## " + ("Overall accuracy: every control right" if several else "Accuracy") + " (%), mean over seeds",
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
    lines += ["", "## " + ("Overall macro-F1: mean over the controls" if several else "Macro-F1")
              + " (%), mean over seeds", ""]
    lines += _f1_table(agg, names, points, grid, has_random and several)
    lines.append("")
    for control in results["controls"] if several else []:
        cagg = results["aggregate_per_control"][control["name"]]
        kind = "exact-match accuracy" if control["multi_label"] else "accuracy"
        lines += [f"## Control `{control['name']}` ({'multi-label' if control['multi_label'] else 'single-choice'})"
                  f": {kind} and macro-F1 (%), mean over seeds", ""]
        header = (["ordering"] + [f"{kind[:5]}@{p}" for p in points] + ["AULC"]
                  + (["ΔAULC vs random [95% CI]", "seeds won"] if has_random else [])
                  + ["macro-F1 AULC"] + (["Δ macro-F1 AULC [95% CI]", "seeds won (F1)"] if has_random else [])
                  + ["labels bought"])
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for name in names:
            entry = cagg[name]
            cells = [name] + [f"{entry['accuracy_mean'][grid.index(p)]:.1f}" for p in points]
            cells.append(f"{entry['aulc_mean']:.2f} ± {entry['aulc_std']:.2f}")
            if has_random:
                cells += _diff_cells(entry, name, "aulc_diff_vs_random", "seeds_beating_random")
            cells.append(f"{entry['macro_f1_aulc_mean']:.2f}")
            if has_random:
                cells += _diff_cells(entry, name, "macro_f1_aulc_diff_vs_random", "macro_f1_seeds_beating_random")
            bought = entry["bought_label_share"]
            cells.append(_shares(bought, control["labels"]) if bought else "—")
            lines.append("| " + " | ".join(cells) + " |")
        if "_ceiling" in cagg:
            c = cagg["_ceiling"]
            lines.append("")
            lines.append(f"Ceiling (all {c['labels_used']} pool labels): {kind} {c['accuracy_mean']:.1f}, "
                         f"macro-F1 {c['macro_f1_mean']:.1f}.")
        lines.append("")
    if "_ceiling" in agg:
        c = agg["_ceiling"]
        lines.append(
            f"**Ceiling** (head trained on all {c['labels_used']} pool labels"
            + (" plus the initial set" if meta.get("seed_data") else "")
            + f"): accuracy {c['accuracy_mean']:.1f} ± {c['accuracy_std']:.1f}, "
            f"macro-F1 {c['macro_f1_mean']:.1f} ± {c['macro_f1_std']:.1f}."
        )
    cold_start = meta.get("initial_order") == "kmeans" and not meta.get("seed_data")
    if grid[0] != grid[-1]:
        start = agg[names[0]]["accuracy_mean"][0]
        line = f"**Start** (initial labeled set only, {grid[0]} pool labels): accuracy {start:.1f}"
        others = [n for n in names if n != "random"]
        if cold_start and others:
            line += f" (random's set); {agg[others[0]]['accuracy_mean'][0]:.1f} (the k-means cold start's)"
        lines.append(line + ".")
    same = ("same test set and head initialisation; every ordering but random starts from the k-means "
            "cold start, random from the random set" if cold_start
            else "same initial set, test set and head initialisation")
    lines += [
        "",
        "How to read it: AULC is the mean accuracy over the learning curve "
        f"({grid[0]}–{grid[-1]} labels, trapezoids), in points. ΔAULC is each ordering's AULC "
        f"minus random's **in the same seed** ({same}), averaged over seeds; an interval that "
        "contains 0 means the ordering is not distinguishable from random at this number of "
        "seeds. *Seeds won*: seeds where the ordering's AULC is above random's. *Labels to "
        "reach*: the first budget where the mean accuracy reaches random's mean accuracy at "
        "the full budget. *Labels bought*: class mix of the labels the ordering picked beyond "
        "the initial set.",
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
    lines += diagnostics_lines(results)
    path.write_text("\n".join(lines) + "\n")


def _time_spent(results: dict) -> str:
    """'812 s in all' or, after --resume, '812 s in all over 3 invocations (500 + 300 + 12 s)'."""
    total = results["seconds_total"]
    invocations = results.get("invocations") or []
    if len(invocations) < 2:
        return f"{total:.0f} s in all"
    parts = " + ".join(f"{i['seconds']:.0f}" for i in invocations)
    return f"{total:.0f} s in all over {len(invocations)} invocations ({parts} s)"


def _diff_cells(entry: dict, name: str, key: str, won: str) -> list[str]:
    """'+1.23 [+0.10, +2.40]' and 'k/n' for a paired difference from random, or dashes."""
    if name == "random" or entry.get(f"{key}_mean") is None:
        return ["—", "—"]
    lo, hi = entry[f"{key}_ci95"]
    ci = f" [{lo:+.2f}, {hi:+.2f}]" if lo is not None else ""
    return [f"{entry[f'{key}_mean']:+.2f}{ci}", f"{entry[won]}/{entry['seeds_paired_with_random']}"]


def _f1_table(agg: dict, names: list[str], points: list[int], grid: list[int], with_diff: bool) -> list[str]:
    header = ["ordering"] + [f"@{p}" for p in points] + ["AULC"]
    if with_diff:
        header += ["Δ AULC vs random [95% CI]", "seeds won"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        entry = agg[name]
        cells = [name] + [f"{entry['macro_f1_mean'][grid.index(p)]:.1f}" for p in points]
        cells.append(f"{entry['macro_f1_aulc_mean']:.2f}")
        if with_diff:
            cells += _diff_cells(entry, name, "macro_f1_aulc_diff_vs_random", "macro_f1_seeds_beating_random")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def identical_groups(results: dict) -> list[list[str]]:
    """Orderings whose runs bought the same labels and scored the same in every seed (e.g.
    least confidence and entropy with two classes, and margin with `diverse_batch` off): one
    line on the plot, noted in the summary."""
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


def plot_curves(path: Path, results: dict):
    """Write `learning_curves.png` from `results` (results.json) and return the figure's axes.

    Every ordering is drawn so that it stays visible where it overlaps another: its own
    colour, line style and hollow marker, random (the control) on top in black; each panel
    has its own legend. The paired-difference panel draws each ordering's 95 % interval as
    an error bar, shifted a little sideways per ordering, so four or more stay apart.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = results["aggregate"]
    groups = [g for g in identical_groups(results) if g[0] in agg]
    names = [g[0] for g in groups]
    legend = {g[0]: " = ".join(g) for g in groups}
    has_random = "random" in agg
    others = [n for n in names if n != "random"]
    colors = plt.get_cmap("tab10")
    dashes = ["-", "--", "-.", ":"]
    markers = ["o", "s", "^", "D", "v", "P", "X", "*"]
    style = {"random": dict(color="black", linestyle="-", linewidth=2.4, marker="o", zorder=10)}
    for i, n in enumerate(others):
        # Later orderings thinner and above: a line hidden under another still shows its edges.
        style[n] = dict(color=colors(i % 10), linestyle=dashes[i % len(dashes)], marker=markers[i % len(markers)],
                        linewidth=max(2.2 - 0.25 * i, 1.0), zorder=3 + i)
    panels = 3 if has_random else 2
    fig, axes = plt.subplots(1, panels, figsize=(6.2 * panels, 5.2), constrained_layout=True)
    for ax, metric, title in ((axes[0], "accuracy", "Accuracy (%)"), (axes[1], "macro_f1", "Macro-F1 (%)")):
        for n in names:
            e = agg[n]
            x = np.asarray(e["labels_used"])
            mean, std = np.asarray(e[f"{metric}_mean"], dtype=float), np.asarray(e[f"{metric}_std"], dtype=float)
            ax.plot(x, mean, label=legend[n], markersize=5, markerfacecolor="none", **style[n])
            ax.fill_between(x, mean - std, mean + std, color=style[n]["color"], alpha=0.08, linewidth=0)
        if "_ceiling" in agg:
            ax.axhline(agg["_ceiling"][f"{metric}_mean"], color="grey", linestyle=(0, (1, 2)), linewidth=1.5,
                       label=f"all {agg['_ceiling']['labels_used']} pool labels")
        ax.set_title(f"{title}, mean ± 1 sd")
        _finish_panel(ax)
    if has_random:
        ax = axes[2]
        ax.axhline(0, color="black", linewidth=2.4, label="random", zorder=10)
        xs = np.asarray(agg["random"]["labels_used"], dtype=float)
        step = float(np.min(np.diff(xs))) if len(xs) > 1 else 1.0
        width = 0.5 * step / max(len(others), 1)  # the orderings share half a batch sideways
        for i, n in enumerate(others):
            e = agg[n]
            if e.get("accuracy_diff_vs_random_mean") is None:
                continue
            x = np.asarray(e["labels_used"], dtype=float) + (i - (len(others) - 1) / 2) * width
            mean = np.asarray(e["accuracy_diff_vs_random_mean"], dtype=float)
            half = np.asarray(e["accuracy_diff_vs_random_ci95_half"], dtype=float)
            ax.errorbar(x, mean, yerr=np.nan_to_num(half), label=legend[n], capsize=2, elinewidth=1,
                        markersize=5, markerfacecolor="none", **style[n])
        ax.set_title("Accuracy − random, same seed (points), 95% CI")
        _finish_panel(ax)
    n_seeds = len(results["config"]["seeds"])
    fig.suptitle(f"{results['config']['data']}: {results['pool_size']}-task pool, {n_seeds} paired "
                 f"seed{'s' if n_seeds != 1 else ''}", fontsize=12)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return list(axes)


def _finish_panel(ax) -> None:
    ax.set_xlabel("labels used (pool)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8, framealpha=0.85)


def replot(out_dir: Path, report_at: list[int] | None = None) -> dict:
    """Rewrite `learning_curves.png` and `summary.md` from `out_dir/results.json`, without
    running anything (`--replot`)."""
    path = out_dir / "results.json"
    if not path.exists():
        raise SystemExit(f"--replot: {path} does not exist; run the simulation into {out_dir} first")
    results = json.loads(path.read_text())
    write_summary(out_dir / "summary.md", results, report_at or results.get("report_at"))
    plot_curves(out_dir / "learning_curves.png", results)
    return results


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

    table = table_from_config(config)
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
    invocations = previous_invocations(out_dir) if resume else []
    this = {"started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": 0.0,
            "runs": 0, "seconds_encoding": seconds_encoding}

    def save_invocations() -> None:
        # Rewritten after every run: an interrupted invocation still counts up to its last run.
        this["seconds"] = time.perf_counter() - started
        write_invocations(out_dir, invocations + [this])

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
        this["runs"] += 1
        save_invocations()
        bar.set_postfix_str(f"{'ceiling' if name == CEILING else name} seed {seed}", refresh=False)
        bar.update(1)

    try:
        if config.workers <= 1:
            _set_context(features, layers, table.targets, table.specs, config.threads)
            for kind, plan, name in jobs:
                record(*_job(kind, plan, name, config))
        else:
            _run_parallel(jobs, config, features, layers, table, record)
    finally:
        bar.close()

    def share(spec, t) -> list[float]:
        return (np.asarray(bought_counts(spec, t)) / max(len(t), 1)).tolist()

    save_invocations()
    pool0 = plans[0].pool
    results = {
        "config": asdict(config),
        "code": code,
        "encoder_id": enc_id,
        "data_source": table.source,
        "labels": table.labels,
        "controls": [{"name": spec.name, "labels": list(spec.labels), "multi_label": bool(spec.multi_label),
                      "pool_label_share": share(spec, t[pool0])} for spec, t in zip(table.specs, table.targets)],
        "orderings": config.orderings,
        "pool_size": int(len(pool0)),
        "test_size": int(len(plans[0].test)),
        "pool_label_share": share(table.specs[0], table.y[pool0]),
        "seeds": {str(p.seed): {"initial_label_counts": bought_counts(
            table.specs[0], table.y[np.concatenate([p.seed_rows, p.pool[p.initial]])])} for p in plans},
        "runs": {n: {str(s): runs[n][s] for s in config.seeds if s in runs[n]} for n in config.orderings},
        "ceiling": {str(s): ceiling[s] for s in config.seeds if s in ceiling},
        "aggregate": aggregate(runs, ceiling, config.seeds),
        "ordering_diagnostics": aggregate_diagnostics(runs, config.seeds),
        "versus_least_confidence": paired_versus(runs, config.seeds),
        "aggregate_per_control": ({} if table.one_single_choice else aggregate_controls(
            runs, ceiling, config.seeds, [spec.name for spec in table.specs])),
        "seconds_encoding": seconds_encoding,
        "seconds_per_run": {n: float(np.mean(v)) for n, v in seconds.items() if v},
        # Every invocation into this DIR (several with --resume), and their sum.
        "invocations": invocations + [this],
        "report_at": report_at,  # the summary's columns, kept for --replot
        "seconds_this_invocation": this["seconds"],
        "seconds_total": float(sum(i["seconds"] for i in invocations + [this])),
    }
    results = _finite(results)  # strict JSON: an undefined spread (one seed) is null
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, allow_nan=False))
    write_summary(out_dir / "summary.md", results, report_at)
    plot_curves(out_dir / "learning_curves.png", results)
    return results


def previous_invocations(out_dir: Path) -> list[dict]:
    """The invocations recorded in `out_dir` (empty if none): what `--resume` adds to."""
    path = out_dir / INVOCATIONS
    try:
        recorded = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    return [i for i in recorded if isinstance(i, dict) and isinstance(i.get("seconds"), (int, float))]


def write_invocations(out_dir: Path, invocations: list[dict]) -> None:
    """Replace `out_dir`'s invocation record atomically (a kill never leaves half a file)."""
    path = out_dir / INVOCATIONS
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(invocations, indent=1))
    os.replace(tmp, path)


def _run_parallel(jobs, config, features, layers, table, record) -> None:
    """A process pool; the table's arrays go to the workers once, memory-mapped from disk."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with tempfile.TemporaryDirectory(prefix="atl-simulate-") as tmp:
        paths = {"features": os.path.join(tmp, "features.npy")}
        np.save(paths["features"], features)
        for i, targets in enumerate(table.targets):
            paths[f"targets{i}"] = os.path.join(tmp, f"targets{i}.npy")
            np.save(paths[f"targets{i}"], targets)
        if layers is not None:
            paths["layers"] = os.path.join(tmp, "layers.npy")
            np.save(paths["layers"], layers)
        # spawn, not fork: a forked child of a process that already ran torch's thread pool
        # can hang in OpenMP.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=config.workers, mp_context=context,
                                 initializer=_init_worker,
                                 initargs=(paths, table.specs, config.threads)) as pool:
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
        epilog="FILE: CSV or JSONL with a 'text' column and a 'label' column (or 'labels', several "
               "values per row separated by '|', or the columns --label-columns names), a Label Studio "
               "JSON export, or builtin:" + " | builtin:".join(BUILTIN) + " (fashion_mnist*: images, from "
               "the Debian package dataset-fashion-mnist); builtin:NAME:N keeps a fixed subset of N.",
    )
    parser.add_argument("--data", help="labeled pool (and test set unless --test); required unless --replot")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--orderings", default="all",
                        help="comma-separated names, or 'all' (default); random is always added")
    parser.add_argument("--seeds", default="5",
                        help="number of paired seeds (0..N-1), or a list like '3,7,9' (default 5)")
    parser.add_argument("--initial", type=int, default=50,
                        help="initial labeled set: random pool tasks (counted as labels used), or "
                             "examples from --seed-data (not counted) (default 50)")
    parser.add_argument("--initial-order", choices=INITIAL_ORDERS, default="random",
                        help="how every ordering but the random control picks the --initial pool labels: "
                             "the same random set (default), or kmeans, the service's cold start "
                             "(COLD_START_ORDER's default) for a project before its first annotation")
    parser.add_argument("--batch-size", type=int, default=50, help="labels per round (default 50)")
    parser.add_argument("--budget", type=int, default=500, help="pool labels to spend (default 500)")
    parser.add_argument("--pool-size", type=int, default=None,
                        help="tasks in the pool, drawn per seed (default: all not held out)")
    parser.add_argument("--test-size", type=float, default=0.25,
                        help="held-out test set: a fraction (<1) or a count (default 0.25); ignored with --test")
    parser.add_argument("--label-columns", default=None,
                        help="comma-separated label columns (or Label Studio control names), one control "
                             "each (default: 'label', else 'labels', or a built-in corpus's own columns)")
    parser.add_argument("--multi-label", default="",
                        help="comma-separated label columns that are multi-label (several values per row; "
                             "a column called 'labels' always is)")
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
    parser.add_argument("--replot", action="store_true",
                        help="only redraw OUT/learning_curves.png and OUT/summary.md from OUT/results.json")
    parser.add_argument("--rare-class", default=None, metavar="LABEL:SHARE",
                        help="keep only enough rows of class LABEL (first label column of --data) "
                             "that it is SHARE of the data, e.g. Positive:0.05: a rarer minority class")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if not args.replot and not args.data:
        parser.error("--data is required (unless --replot)")
    return args


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
        label_columns=_names(args.label_columns) or None, multi_label=_names(args.multi_label),
        rare_class=args.rare_class, initial_order=args.initial_order,
    )


def _names(text: str | None) -> list[str]:
    return [n.strip() for n in (text or "").split(",") if n.strip()]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot:
        replot(args.out, args.report_at)
        print(f"redrew {args.out / 'learning_curves.png'} and {args.out / 'summary.md'} "
              f"from {args.out / 'results.json'}")
        return 0
    config = config_from_args(args)
    results = simulate(config, args.out, report_at=args.report_at, resume=args.resume,
                       progress=not args.quiet)
    print((args.out / "summary.md").read_text())
    spent = f"{results['seconds_this_invocation']:.0f} s"
    if len(results["invocations"]) > 1:
        spent += f" ({_time_spent(results)})"
    print(f"wrote {args.out / 'results.json'}, {args.out / 'learning_curves.png'}, "
          f"{args.out / 'summary.md'} in {spent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
