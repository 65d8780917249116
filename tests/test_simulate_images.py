"""The simulator on labeled images: the Fashion-MNIST loader (IDX files as the Debian package
`dataset-fashion-mnist` installs them) on tiny fake files, and one small simulation that
encodes them with the service's image encoder through the content-keyed cache."""

import gzip
import io
import struct

import numpy as np
import pytest
from PIL import Image

import model.datasets as datasets
import model.image_encoder as image_encoder
from model.datasets import FASHION_MNIST_CLASSES, fashion_mnist, read_idx
from model.encoding_cache import EncodingCache
from model.image_encoder import content_cache_text, content_digest, image_encoder_id
from model.simulate import SimulationConfig, build_table, encode_images, load_source, plan_seed, simulate


def write_idx(path, array: np.ndarray) -> None:
    """An IDX file of unsigned bytes, gzipped, in the layout of the MNIST files."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def fake_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two classes a CNN tells apart: a bright left half (0, T-shirt/top) or top half (1, Trouser)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    pixels = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8)
    for image, label in zip(pixels, labels):
        if label == 0:
            image[:, :14] += 180
        else:
            image[:14, :] += 180
    return pixels, labels.astype(np.uint8)


@pytest.fixture
def fake_fashion(tmp_path, monkeypatch):
    root = tmp_path / "fashion-mnist"
    root.mkdir()
    for prefix, n, seed in (("train", 40, 1), ("t10k", 16, 2)):
        pixels, labels = fake_images(n, seed)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", pixels)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIR", root)
    return root


def test_loader_reads_the_idx_files_as_png_images(fake_fashion):
    pixels, labels = fake_images(40, 1)
    assert np.array_equal(read_idx(fake_fashion / "train-images-idx3-ubyte.gz"), pixels)
    data = fashion_mnist("train")
    assert len(data) == 40
    assert data.labels[:2] == [FASHION_MNIST_CLASSES[0], "Trouser"]
    for image, expected in zip(data.images, pixels):
        with Image.open(io.BytesIO(image)) as decoded:
            assert decoded.format == "PNG" and np.array_equal(np.asarray(decoded), expected)
    # A fixed subset, the same as sampling the whole set, and through builtin:NAME:N.
    subset = fashion_mnist("train", sample=10)
    assert subset.images == data.sample(10).images and subset.labels == data.sample(10).labels
    assert load_source("builtin:fashion_mnist:10").images == subset.images
    assert len(load_source("builtin:fashion_mnist_test")) == 16


def test_missing_or_broken_files_say_what_to_do(fake_fashion, tmp_path, monkeypatch):
    broken = tmp_path / "broken.gz"
    with gzip.open(broken, "wb") as handle:
        handle.write(bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 5, 28, 28) + b"\0" * 100)
    with pytest.raises(ValueError, match="truncated"):
        read_idx(broken)
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIR", tmp_path / "absent")
    with pytest.raises(SystemExit, match="apt-get install dataset-fashion-mnist"):
        load_source("builtin:fashion_mnist:100")
    with pytest.raises(SystemExit, match="unknown built-in dataset"):
        load_source("builtin:fashion_mnist:many")


def test_simulation_encodes_images_once_through_the_content_cache(fake_fashion, tmp_path, monkeypatch):
    cache_path = tmp_path / "enc.sqlite3"
    # domain_likeness: the ordering that reads every stage.
    config = SimulationConfig(
        data="builtin:fashion_mnist", test="builtin:fashion_mnist_test",
        orderings=["random", "domain_likeness"], seeds=[0, 1],
        initial=4, batch_size=4, budget=8, cache=str(cache_path))
    results = simulate(config, tmp_path / "out", progress=False)
    assert results["encoder_id"] == image_encoder_id("default")
    assert results["runs"]["domain_likeness"]["0"]["info"][0]["layers"] > 1280
    # Keyed as the service keys a project's images: encoder id + SHA-256 of the file.
    cache = EncodingCache(cache_path)
    images = load_source("builtin:fashion_mnist").images + load_source("builtin:fashion_mnist_test").images
    keys = [content_cache_text(content_digest(image)) for image in images]
    top, missing = cache.lookup(results["encoder_id"], keys)
    stages, missing_stages = cache.lookup(results["encoder_id"] + "/all-stages", keys)
    assert not missing and not missing_stages and top.shape == (56, 1280) and stages.shape[1] > 1280
    # The two classes are easy: with every pool label the head is right on the test set.
    assert results["aggregate"]["_ceiling"]["accuracy_mean"] >= 90
    assert results["aggregate"]["random"]["labels_used"] == [4, 8]

    # Encoding again finds every vector in the cache: it never even loads the encoder.
    def no_encoder(*args, **kwargs):
        raise AssertionError("the image encoder was loaded although every vector is cached")

    monkeypatch.setattr(image_encoder, "ImageEncoder", no_encoder)
    table = build_table(load_source(config.data), None, load_source(config.test))
    plans = [plan_seed(table, config, seed) for seed in config.seeds]
    features, layers, _ = encode_images(table, plans, config, all_layers=True, progress=False)
    assert np.array_equal(features, top) and np.array_equal(layers, stages)
