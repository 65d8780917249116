"""Encoding cache: each text is encoded once per encoder and kept on disk.

Keys are (encoder id, SHA-256 of the text), so a retrain after one new annotation reads
the project's vectors back instead of re-encoding them, and a task whose text changed gets
a new key and is encoded again. Vectors are stored as float16 (384 dims = 768 bytes a
task, ~77 MB for 100,000 tasks) in one SQLite file: web and worker processes can read it
concurrently and a crashed writer never leaves a torn vector behind.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

_CHUNK = 900  # stays under SQLite's limit on bound parameters per statement
# Fresh vectors are written to the cache at least this often while encoding: a killed
# process loses at most this much work, at the cost of one small transaction a second.
FLUSH_SECONDS = 1.0


def text_key(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:16]


class EncodingCache:
    """Float16 vectors keyed by (encoder id, text)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._connect() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS encodings ("
                " encoder TEXT NOT NULL, key BLOB NOT NULL, dim INTEGER NOT NULL,"
                " vector BLOB NOT NULL, PRIMARY KEY (encoder, key)) WITHOUT ROWID"
            )

    def _connect(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            # Large pages: 100,000 float16 vectors take 92 MB instead of 121 MB with the
            # default 4 KiB pages (bench/bench_scale.py). Applies when the file is created.
            db.execute("PRAGMA page_size=65536")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    def lookup(self, encoder: str, texts: Sequence[str]) -> tuple[np.ndarray | None, list[int]]:
        """Return (vectors, missing): rows for texts not in the cache are zeros.

        `vectors` is None when nothing at all is cached for these texts.
        """
        keys = [text_key(t) for t in texts]
        found: dict[bytes, bytes] = {}
        db = self._connect()
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), _CHUNK):
            chunk = unique[start : start + _CHUNK]
            marks = ",".join("?" * len(chunk))
            rows = db.execute(
                f"SELECT key, vector FROM encodings WHERE encoder = ? AND key IN ({marks})",
                [encoder, *chunk],
            )
            found.update(rows)
        missing = [i for i, k in enumerate(keys) if k not in found]
        if not found:
            return None, missing
        dim = len(next(iter(found.values()))) // 2
        out = np.zeros((len(texts), dim), dtype=np.float32)
        for i, k in enumerate(keys):
            blob = found.get(k)
            if blob is not None:
                out[i] = np.frombuffer(blob, dtype=np.float16)
        return out, missing

    def store(self, encoder: str, texts: Sequence[str], vectors: np.ndarray) -> None:
        self.store_keys(encoder, [text_key(t) for t in texts], vectors)

    def store_keys(self, encoder: str, keys: Sequence[bytes], vectors: np.ndarray) -> None:
        """Store vectors under precomputed `text_key`s (encodings made by another worker)."""
        vectors = np.asarray(vectors, dtype=np.float16)
        rows = [(encoder, key, vectors.shape[1], vectors[i].tobytes()) for i, key in enumerate(keys)]
        db = self._connect()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(
                "INSERT OR REPLACE INTO encodings (encoder, key, dim, vector) VALUES (?,?,?,?)",
                rows,
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def count(self, encoder: str | None = None) -> int:
        db = self._connect()
        if encoder is None:
            return db.execute("SELECT COUNT(*) FROM encodings").fetchone()[0]
        return db.execute("SELECT COUNT(*) FROM encodings WHERE encoder = ?", [encoder]).fetchone()[0]


def encode_with_cache(
    encoder,
    cache: EncodingCache,
    texts: Sequence[str],
    progress: Callable[[int, int], None] | None = None,
    all_layers: bool = False,
) -> tuple[np.ndarray, int]:
    """Vectors for `texts`, encoding (and storing) only those not cached yet.

    With `all_layers`, the pooled output of every encoder layer (embedding layer included),
    shape (n, layers + 1, dim), cached under its own key. Returns (vectors float32, number
    of texts that had to be encoded).
    """
    if all_layers:
        key, width = f"{encoder.id}/all-layers", (encoder.num_layers + 1) * encoder.dim
        run = lambda part: encoder.encode_all_layers(part).reshape(len(part), width)  # noqa: E731
    else:
        key, width, run = encoder.id, encoder.dim, encoder.encode
    vectors, missing = cache.lookup(key, texts)
    if vectors is None:
        vectors = np.zeros((len(texts), width), dtype=np.float32)
    encoded_count = 0
    if missing:
        # Each distinct missing text once, longest-first order across all of them so every
        # encoder batch holds texts of similar length (little padding). Vectors go into the
        # cache as they come, at least every FLUSH_SECONDS: a worker killed mid-way (a
        # restart, a deploy) keeps what it had encoded, and the next run encodes the rest.
        distinct = sorted(dict.fromkeys(texts[i] for i in missing), key=len, reverse=True)
        position = {t: j for j, t in enumerate(distinct)}
        encoded = np.zeros((len(distinct), width), dtype=np.float32)
        stored, last_store = 0, time.monotonic()
        for start in range(0, len(distinct), encoder.batch_size):
            end = min(start + encoder.batch_size, len(distinct))
            encoded[start:end] = run(distinct[start:end])
            if end == len(distinct) or time.monotonic() - last_store >= FLUSH_SECONDS:
                cache.store(key, distinct[stored:end], encoded[stored:end])
                stored, last_store = end, time.monotonic()
                if progress is not None:
                    progress(end, len(distinct))
        # Round through float16 so fresh and cached vectors are identical.
        encoded = encoded.astype(np.float16).astype(np.float32)
        for i in missing:
            vectors[i] = encoded[position[texts[i]]]
        encoded_count = len(distinct)
    if all_layers:
        vectors = vectors.reshape(len(texts), encoder.num_layers + 1, encoder.dim)
    return vectors, encoded_count
