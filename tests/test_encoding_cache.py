"""The encoding cache with the real encoder: encode once, re-encode only changed texts."""

import numpy as np

from model.encoder import Encoder
from model.encoding_cache import EncodingCache, encode_with_cache


def test_texts_are_encoded_once_and_changed_texts_again(tmp_path):
    encoder = Encoder("default", device="cpu", batch_size=8)
    cache = EncodingCache(tmp_path / "enc.sqlite3")
    texts = ["the flight was late", "great crew, thanks", "lost my bag again", "the flight was late"]
    first, encoded = encode_with_cache(encoder, cache, texts)
    assert encoded == 3  # the duplicate text is encoded once
    again, encoded = encode_with_cache(encoder, cache, texts)
    assert encoded == 0
    assert np.array_equal(first, again)
    # A task whose text was edited gets a fresh vector; the others come from the cache.
    edited = texts[:2] + ["found my bag, all good"] + texts[3:]
    vectors, encoded = encode_with_cache(encoder, cache, edited)
    assert encoded == 1
    assert np.array_equal(vectors[:2], first[:2])
    direct = encoder.encode(["found my bag, all good"])[0]
    assert np.allclose(vectors[2], direct, atol=2e-3)
    assert not np.allclose(vectors[2], first[2], atol=1e-2)


def test_batched_length_sorted_encoding_matches_one_at_a_time():
    encoder = Encoder("default", device="cpu", batch_size=4)
    texts = ["short", "a somewhat longer sentence about airline service", "mid length text here",
             "x", "another reasonably long sentence for padding checks"]
    batched = encoder.encode(texts)
    single = np.vstack([encoder.encode([t]) for t in texts])
    assert np.allclose(batched, single, atol=1e-4)


# Encodes many texts into a cache, printing how many are stored after each store.
_ENCODE_UNTIL_KILLED = """
import sys
from model.encoder import Encoder
from model.encoding_cache import EncodingCache, encode_with_cache
texts = [f"passenger review {i}: the flight from gate {i % 37} was " + "late " * (i % 9) for i in range({n})]
encoder = Encoder("default", device="cpu", batch_size=8)
print("loaded", flush=True)
encode_with_cache(encoder, EncodingCache(sys.argv[1]), texts,
                  progress=lambda done, total: print("stored", done, flush=True))
print("finished", flush=True)
"""


def test_an_encoding_killed_midway_keeps_what_it_had_encoded(tmp_path):
    """A worker SIGKILLed in the middle of encoding (a restart, a deploy): the vectors it had
    made are in the cache, intact, and the next run encodes only the rest."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    n = 4000
    path = tmp_path / "enc.sqlite3"
    repo = Path(__file__).resolve().parents[1]
    process = subprocess.Popen(
        [sys.executable, "-c", _ENCODE_UNTIL_KILLED.replace("{n}", str(n)), str(path)],
        cwd=repo, env=dict(os.environ, PYTHONPATH=str(repo), HF_HUB_OFFLINE="1"),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    reported = 0
    for line in process.stdout:
        if line.startswith("stored"):
            reported = int(line.split()[1])
            if reported >= 16:
                break
        assert not line.startswith("finished"), "encoded everything before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert reported > 0

    texts = [f"passenger review {i}: the flight from gate {i % 37} was " + "late " * (i % 9) for i in range(n)]
    encoder = Encoder("default", device="cpu", batch_size=8)
    cache = EncodingCache(path)
    kept = cache.count(encoder.id)
    assert reported <= kept < n  # everything reported stored survived the kill
    vectors, missing = cache.lookup(encoder.id, texts)
    assert len(missing) == n - kept
    cached = [i for i in range(n) if i not in set(missing)]
    sample = cached[:: max(1, len(cached) // 12)][:12]
    assert np.allclose(vectors[sample], encoder.encode([texts[i] for i in sample]), atol=2e-3)
    # A rerun over cached and new texts encodes only the new ones.
    again = [texts[i] for i in sample] + [texts[i] for i in missing[:5]]
    _, encoded = encode_with_cache(encoder, cache, again)
    assert encoded == 5


def test_large_lookups_are_remembered_in_the_process_and_stay_exact(tmp_path, monkeypatch):
    """A retrain-sized lookup is answered from the process's memo the next time, with the
    same float16 values SQLite holds; a text missing then is read from SQLite once stored,
    and another cache file or encoder id never sees the memo's vectors."""
    from model import encoding_cache

    monkeypatch.setattr(encoding_cache, "MEMO_MIN_TEXTS", 50)
    encoding_cache._memo.clear()
    rng = np.random.default_rng(0)
    texts = [f"task {i}" for i in range(120)]
    vectors = rng.normal(size=(120, 8)).astype(np.float16)
    cache = EncodingCache(tmp_path / "enc.sqlite3")
    cache.store("enc", texts[:100], vectors[:100])

    first, missing = cache.lookup("enc", texts)
    assert missing == list(range(100, 120))
    assert np.array_equal(first[:100], vectors[:100].astype(np.float32)) and not first[100:].any()
    store_id = (str(cache.path.resolve()), "enc")
    positions, _ = encoding_cache._memo.rows(store_id, [encoding_cache.text_key(t) for t in texts])
    assert (positions[:100] >= 0).all() and (positions[100:] == -1).all()

    # The memo answers: a row changed behind its back in SQLite would not show (a key's vector
    # never changes in real use), which proves the second answer did not come from SQLite.
    cache.store("enc", texts[:1], np.zeros((1, 8), dtype=np.float16))
    again, missing = cache.lookup("enc", texts)
    assert missing == list(range(100, 120)) and np.array_equal(again, first)

    # Stored later by another process: found, in order, duplicates and all.
    EncodingCache(tmp_path / "enc.sqlite3").store("enc", texts[100:], vectors[100:])
    later, missing = cache.lookup("enc", texts[::-1] + texts[:3])
    assert missing == []
    expected = np.concatenate([vectors[::-1], vectors[:3]]).astype(np.float32)
    # texts[0] appears twice (positions 119 and 120): its row was zeroed in SQLite above, the
    # memo still has the original.
    assert np.array_equal(later[[119, 120]], first[[0, 0]])
    assert np.array_equal(later, expected)

    # Another encoder id or another cache file: nothing from this memo.
    assert cache.lookup("other-encoder", texts) == (None, list(range(120)))
    assert EncodingCache(tmp_path / "other.sqlite3").lookup("enc", texts) == (None, list(range(120)))


def test_the_memo_starts_again_past_its_budget_and_small_lookups_add_nothing(tmp_path, monkeypatch):
    from model import encoding_cache

    monkeypatch.setattr(encoding_cache, "MEMO_MIN_TEXTS", 50)
    encoding_cache._memo.clear()
    texts = [f"task {i}" for i in range(160)]
    vectors = np.arange(160 * 8, dtype=np.float16).reshape(160, 8) / 1000
    cache = EncodingCache(tmp_path / "enc.sqlite3", memo_mb=(100 * 8 * 2 + 1) / 2**20)  # 100 vectors of 8 float16
    cache.store("enc", texts, vectors)
    keys = [encoding_cache.text_key(t) for t in texts]
    store_id = (str(cache.path.resolve()), "enc")

    cache.lookup("enc", texts[:20])  # below MEMO_MIN_TEXTS: read only
    assert (encoding_cache._memo.rows(store_id, keys)[0] == -1).all()
    cache.lookup("enc", texts[:80])
    assert (encoding_cache._memo.rows(store_id, keys[:80])[0] >= 0).all()
    # 80 + 80 more would pass the budget of 100: the memo is emptied, then holds the new 80.
    got, missing = cache.lookup("enc", texts[80:])
    assert missing == [] and np.array_equal(got, vectors[80:].astype(np.float32))
    positions = encoding_cache._memo.rows(store_id, keys)[0]
    assert (positions[:80] == -1).all() and (positions[80:] >= 0).all()
    # A lookup larger than the whole budget is answered and not remembered.
    encoding_cache._memo.clear()
    got, missing = cache.lookup("enc", texts)
    assert missing == [] and np.array_equal(got, vectors.astype(np.float32))
    assert (encoding_cache._memo.rows(store_id, keys)[0] == -1).all()
    # memo_mb=0 (ENCODING_MEMO_MB=0): nothing is remembered.
    EncodingCache(tmp_path / "enc.sqlite3", memo_mb=0).lookup("enc", texts[:80])
    assert (encoding_cache._memo.rows(store_id, keys)[0] == -1).all()
    encoding_cache._memo.clear()


def test_the_memo_stays_aligned_when_the_same_vectors_are_remembered_twice():
    """Two threads that read the same new texts at once both remember them; rows added
    after that must still line up with their keys."""
    from model.encoding_cache import _ProcessMemo

    memo, store = _ProcessMemo(), ("cache", "enc")
    vectors = np.arange(6 * 2, dtype=np.float16).reshape(6, 2)
    keys = [bytes([i]) for i in range(6)]
    memo.remember(store, keys[:3], vectors[:3], budget=10**6)
    memo.remember(store, keys[1:3], vectors[1:3], budget=10**6)  # again, as a second thread would
    memo.remember(store, keys[3:], vectors[3:], budget=10**6)
    positions, remembered = memo.rows(store, keys)
    assert np.array_equal(remembered[positions], vectors)
