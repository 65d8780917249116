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


CONFIG = """<View>
  <Image name="image" value="$image"/>
  <Choices name="kind" toName="image" choice="single-radio">
    <Choice value="Photo"/><Choice value="Texture"/>
  </Choices>
</View>"""


def test_the_backend_tunes_stages_and_serves_the_tuned_network(tmp_path):
    """The backend's part of a retrain with FINE_TUNE_LAYERS=1, on images served by a real
    HTTP server: the tuned network and heads are staged with the version, /predict of that
    version answers with the tuned network (loaded once), and a broken image stays one
    task's error. (The whole retrain against Label Studio: tests/test_e2e_images.py.)"""
    from types import SimpleNamespace

    from backend.label_config import parse_label_config
    from backend.ml_backend import ActiveLearningBackend, get_image_encoder, project_examples
    from backend.settings import Settings
    from backend.training_data import project_data
    from model.training import Laps, OrderingChoice, train_and_score
    from tests.test_images import Site

    site = Site()
    try:
        tasks = []
        for label, names in (("Photo", PHOTOS), ("Texture", TEXTURES)):
            for name in names:
                for k, data in enumerate(jpeg_variants(name)):
                    path = f"/{name}-{k}.jpg"
                    site.routes[path] = (200, {"Content-Type": "image/jpeg"}, data)
                    answer = [{"from_name": "kind", "to_name": "image", "type": "choices",
                               "value": {"choices": [label]}}] if k == 0 else []
                    tasks.append({"id": len(tasks) + 1, "data": {"image": site.url + path},
                                  "annotations": [{"id": len(tasks) + 1, "result": answer}] if answer else []})
        tasks.append({"id": 99, "data": {"image": site.url + "/gone.jpg"}, "annotations": []})
        settings = Settings(data_dir=tmp_path, fine_tune_layers=1, device="cpu", encode_batch_size=8)
        backend = ActiveLearningBackend(settings, project_id=7)
        config = parse_label_config(CONFIG)
        stages = []
        progress = lambda stage, done, total: stages.append(stage)  # noqa: E731
        no_label_studio = SimpleNamespace(client=None)  # these images are not Label Studio's
        images, data, vectors = backend._images_of(project_data(tasks, config), config, progress, no_label_studio)
        assert images.failed == [len(tasks) - 1] and len(data.task_ids) == len(tasks) - 1
        examples = project_examples(data, config, vectors)
        fine_tuning = backend._fine_tuning()
        laps = Laps()
        tuned = backend._fine_tune_images(data, config, examples, fine_tuning, progress, no_label_studio, laps)
        assert {"fine-tuning the image encoder", "encoding images with the fine-tuned encoder"} <= set(stages)
        assert set(laps.timings) == {"fine_tune_images", "encode_fine_tuned_images"}
        base = get_image_encoder(settings)
        assert tuned.encoder.id.startswith(base.id + "+ft-") and tuned.images.encoder_id == tuned.encoder.id
        # Every image came from the bytes cache the first pass filled, none downloaded twice.
        downloads = [path for path, _ in site.requests]
        assert len(downloads) == len(set(downloads)) == len(tasks)

        trained = train_and_score(tuned.examples, tuned.encoder, backend.cache, OrderingChoice(batch_size=4),
                                  tuned_heads=tuned.heads)
        assert trained.control_heads is tuned.heads and trained.encoder_id == tuned.encoder.id
        meta = {"label_config": config.to_dict(), "encoder": trained.encoder_id,
                "image_encoder": tuned.images.encoder_id, "fine_tune_layers": 1}
        version = backend.store.stage(7, trained.control_heads, meta, image_encoder_dir=tuned.directory)
        backend.store.activate(7, version)
        model = backend.store.load(7)
        assert (model.image_encoder_dir / TUNED_WEIGHTS).is_file() and not tuned.directory.exists()

        answers = backend.predict(tasks)
        assert answers[-1] == []  # the broken image: no prediction
        expected = trained.heads["kind"].predicted
        assert [a["result"][0]["value"]["choices"][0] for a in answers[:-1]] == expected
        assert sum(p == t for p, t in zip(expected, [lbl for lbl in ("Photo", "Texture")
                                                       for _ in range(len(PHOTOS) * 2)])) >= 14
        # Loaded once per process: a second request reuses the tuned network.
        assert get_image_encoder(settings, model) is get_image_encoder(settings, backend.store.load(7))
        assert get_image_encoder(settings, model).id == tuned.encoder.id
    finally:
        site.close()


def test_a_text_beside_the_image_goes_in_as_fixed_vectors(base, labeled, tmp_path):
    """A control reading an image and a caption: the image network tunes, the caption's
    (frozen) vectors reach the head as they are, side by side with the image's."""
    images, _, y = labeled
    spec = ControlSpec(name="kind", labels=["Photo", "Texture"], inputs=["image", "caption"])
    captions = np.random.default_rng(0).normal(size=(len(images), 8)).astype(np.float32)
    encoder, heads = fine_tune_image_heads(base, {"image": images[:6]}, [spec], [y[:6]], top_layers=1,
                                           out_dir=tmp_path / "tuned", cache_id="lite0+ft-caption",
                                           fixed={"caption": captions[:6]}, epochs=1, batch_size=4)
    features = np.concatenate([encoder.encode(images[:6]), captions[:6]], axis=1)
    assert heads.heads[0].predict_proba(features).shape == (6, 2)
    with pytest.raises(RuntimeError):  # the head reads 1280 + 8 inputs, not the image's alone
        heads.heads[0].predict_proba(encoder.encode(images[:6]))
