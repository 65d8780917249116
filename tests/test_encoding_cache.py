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
