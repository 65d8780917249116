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
