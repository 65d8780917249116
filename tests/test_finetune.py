"""FINE_TUNE_LAYERS: the top encoder layers train, the rest stay frozen, the result reloads."""

import numpy as np
import torch

from model.datasets import movie_snippets
from model.encoder import Encoder
from model.finetune import fine_tune


def test_fine_tuning_top_layer_changes_only_that_layer_and_reloads(tmp_path):
    data = movie_snippets().sample(48, seed=1)
    labels = ["Positive", "Negative"]
    y = np.array([labels.index(label) for label in data.labels])
    base = Encoder("default", device="cpu", batch_size=16)
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    tuned, head = fine_tune(base, data.texts, y, labels, top_layers=1, out_dir=tmp_path / "enc",
                            cache_id="test-ft", epochs=1)
    after = tuned.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    last = base.num_layers - 1
    assert changed, "fine-tuning changed nothing"
    assert all(k.startswith(f"encoder.layer.{last}.") for k in changed), sorted(changed)[:5]
    # The base encoder object itself is untouched (the service keeps using it).
    assert all(torch.equal(before[k], v) for k, v in base.model.state_dict().items())
    assert tuned.id == "test-ft"
    assert (tmp_path / "enc" / "model.safetensors").exists()
    vectors = tuned.encode(data.texts[:4])
    assert vectors.shape == (4, base.dim)
    assert head.predict_proba(vectors).shape == (4, 2)
