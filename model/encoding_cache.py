"""Encoding cache: each text is encoded once per encoder and kept on disk.

Keys are (encoder id, SHA-256 of the text), so a retrain after one new annotation reads
the project's vectors back instead of re-encoding them, and a task whose text changed gets
a new key and is encoded again. Vectors are stored as float16 (384 dims = 768 bytes a
task, ~77 MB for 100,000 tasks) in one SQLite file: web and worker processes can read it
concurrently and a crashed writer never leaves a torn vector behind.

The vectors of large lookups are also kept in the process (`_ProcessMemo`): a worker (RQ's
SimpleWorker runs every job in its own process) reads a project's whole set of vectors on
every retrain, which SQLite answers key by key (1.1-1.5 s for 100,000 on this machine) and
the memo in a fraction of that. A vector never changes under its key (encoder id + text
hash), so a remembered one is never stale; texts missing at the time are not remembered.
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


# Lookups of at least this many texts (a retrain's whole project) are remembered in the
# process, up to the cache's `memo_mb` of float16 vectors per process (the ENCODING_MEMO_MB
# setting; 0 turns the memo off). Small lookups (the web app's /predict) only read it, so a
# web process keeps nothing. Past the budget the memo starts again empty: 256 MB hold about
# 350,000 MiniLM vectors (384 float16 each), the tasks of a few large projects.
MEMO_MIN_TEXTS = 5000
DEFAULT_MEMO_MB = 256


class _ProcessMemo:
    """Per (cache file, encoder): key -> row of one growing float16 matrix. Thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._stores: dict[tuple[str, str], tuple[dict[bytes, int], list[np.ndarray]]] = {}
        self._bytes = 0

    def rows(self, store_id: tuple[str, str], keys: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray | None]:
        """(row per key, -1 where not remembered; the remembered vectors, or None)."""
        with self._lock:
            store = self._stores.get(store_id)
            if store is None:
                return np.full(len(keys), -1, dtype=np.int64), None
            index, blocks = store
            if len(blocks) > 1:  # one matrix, so a gather is one fancy-indexing step
                blocks[:] = [np.concatenate(blocks)]
            get = index.get
            return np.fromiter((get(k, -1) for k in keys), dtype=np.int64, count=len(keys)), blocks[0]

    def remember(self, store_id: tuple[str, str], keys: Sequence[bytes], vectors: np.ndarray,
                 budget: int) -> None:
        """Add `vectors` (float16, one row per key) under `keys`, which are not in the memo,
        emptying the memo first if it would pass `budget` bytes."""
        size = vectors.nbytes
        if not len(keys) or size > budget:
            return
        with self._lock:
            if self._bytes + size > budget:
                self._stores.clear()
                self._bytes = 0
            index, blocks = self._stores.setdefault(store_id, ({}, []))
            if blocks and blocks[0].shape[1] != vectors.shape[1]:
                return  # another width under the same encoder id: not ours to mix
            # Rows so far, not len(index): two threads that read the same new texts at once
            # both remember them, and the later rows then replace the earlier in the index.
            start = sum(len(block) for block in blocks)
            index.update((k, start + i) for i, k in enumerate(keys))
            blocks.append(vectors)
            self._bytes += size

    def clear(self) -> None:
        with self._lock:
            self._stores.clear()
            self._bytes = 0


_memo = _ProcessMemo()


def text_key(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:16]


class EncodingCache:
    """Float16 vectors keyed by (encoder id, text)."""

    def __init__(self, path: str | Path, memo_mb: float = DEFAULT_MEMO_MB):
        self.path = Path(path)
        self.memo_bytes = int(memo_mb * 1024 * 1024)
        self._memo_file = str(self.path.resolve())  # the memo's key: one per cache file
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
        store_id = (self._memo_file, encoder)
        positions, remembered = _memo.rows(store_id, keys)
        todo = list(dict.fromkeys(k for k, row in zip(keys, positions) if row < 0))
        found: dict[bytes, bytes] = {}
        db = self._connect()
        for start in range(0, len(todo), _CHUNK):
            chunk = todo[start : start + _CHUNK]
            marks = ",".join("?" * len(chunk))
            rows = db.execute(
                f"SELECT key, vector FROM encodings WHERE encoder = ? AND key IN ({marks})",
                [encoder, *chunk],
            )
            found.update(rows)
        if remembered is None and not found:
            return None, list(range(len(texts)))
        dim = remembered.shape[1] if remembered is not None else len(next(iter(found.values()))) // 2
        out = np.zeros((len(texts), dim), dtype=np.float32)
        hit = positions >= 0
        if remembered is not None and hit.any():
            out[hit] = remembered[positions[hit]]
        missing, read_rows = [], []
        for i in np.flatnonzero(~hit):
            (read_rows if keys[i] in found else missing).append(int(i))
        if read_rows:
            out[read_rows] = np.frombuffer(b"".join(found[keys[i]] for i in read_rows),
                                           dtype=np.float16).reshape(-1, dim)
        if found and len(texts) >= MEMO_MIN_TEXTS:  # each distinct key once
            _memo.remember(store_id, list(found),
                           np.frombuffer(b"".join(found.values()), dtype=np.float16).reshape(-1, dim),
                           self.memo_bytes)
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
