"""FINE_TUNE_LAYERS on images: the top blocks train with the heads, nothing below them moves,
the training loss falls, and the saved network reloads with the same predictions."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from model.finetune import fine_tune_image_heads
from model.heads import ControlSpec, encode_targets
from model.image_encoder import TUNED_WEIGHTS, ImageEncoder
from tests.test_image_encoder import sample_photo

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg")
TEXTURES = ("brick.png", "grass.png", "gravel.png", "chessboard_RGB.png")


def jpeg_variants(name: str) -> list[bytes]:
    """Two small JPEG files of one sample image: the whole and mirrored (at most 160 px)."""
    from PIL import Image, ImageOps

    image = Image.open(io.BytesIO(sample_photo(name))).convert("RGB")
    image.thumbnail((160, 160))
    files = []
    for picture in (image, ImageOps.mirror(image)):
        out = io.BytesIO()
        picture.save(out, "JPEG", quality=90)
        files.append(out.getvalue())
    return files


@pytest.fixture(scope="module")
def labeled():
    images, labels = [], []
    for label, names in (("Photo", PHOTOS), ("Texture", TEXTURES)):
        for name in names:
            for data in jpeg_variants(name):
                images.append(data)
                labels.append(label)
    spec = ControlSpec(name="kind", labels=["Photo", "Texture"], inputs=["image"])
    return images, spec, encode_targets(spec, labels)


@pytest.fixture(scope="module")
def base():
    return ImageEncoder(device="cpu", batch_size=8)


@pytest.fixture(scope="module")
def tuned(base, labeled, tmp_path_factory):
    images, spec, y = labeled
    out = tmp_path_factory.mktemp("tuned")
    history: list[float] = []
    steps = []
    encoder, heads = fine_tune_image_heads(
        base, {"image": images}, [spec], [y], top_layers=1, out_dir=out, cache_id="lite0+ft-test",
        epochs=4, batch_size=8, learning_rate=1e-3, progress=lambda done, total: steps.append((done, total)),
        history=history)
    return encoder, heads, out, history, steps


def test_only_the_top_block_and_the_head_conv_change(base, tuned):
    encoder, _, out, _, _ = tuned
    assert (out / TUNED_WEIGHTS).is_file()
    before, after = base.network.state_dict(), encoder.network.state_dict()
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("_blocks.15.") for k in changed), sorted(changed)
    allowed = ("_blocks.15.", "_conv_head.", "_bn1.")
    assert all(k.startswith(allowed) for k in changed), sorted(changed)
    # BatchNorm stayed in eval mode: its ImageNet statistics are untouched.
    assert not any(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in changed)
    assert encoder.id == "lite0+ft-test" and not any(p.requires_grad for p in encoder.network.parameters())


def test_the_training_loss_falls_and_progress_counts_steps(tuned):
    _, _, _, history, steps = tuned
    assert len(history) == 4
    assert history[-1] < 0.7 * history[0], history
    assert steps[-1] == (8, 8) and [d for d, _ in steps] == list(range(1, 9))


def test_the_saved_network_predicts_as_the_trained_one(base, labeled, tuned):
    images, _, _ = labeled
    encoder, heads, out, _, _ = tuned
    again = ImageEncoder.load_tuned(out, cache_id="lite0+ft-test", device="cpu", batch_size=4)
    first, stages = encoder.encode_both(images)
    second, stages_again = again.encode_both(images)
    np.testing.assert_allclose(first, second, rtol=0, atol=1e-5)
    np.testing.assert_allclose(stages, stages_again, rtol=0, atol=1e-5)
    # The tuned features differ from the frozen network's (the top block moved) ...
    assert np.abs(first - base.encode(images)).max() > 1e-3
    # ... and the jointly trained head separates the two kinds on them.
    predicted = heads.heads[0].predict(heads.heads[0].predict_proba(first))
    assert (np.asarray(predicted) == labeled[2]).mean() >= 0.9
