"""Optional fine-tuning of the top N encoder layers together with the classifier head.

By default the encoder stays frozen and only the head is trained on cached vectors, which
keeps a retrain to seconds. With FINE_TUNE_LAYERS=N the top N transformer layers are trained
as well (the rest stay frozen), the adapted encoder is saved with the model version, and
every task is re-encoded with it once per version: better accuracy on a project far from
the encoder's pretraining data, at the cost of minutes per retrain on a CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from model.classifier import ClassifierHead, HeadConfig, class_weights
from model.encoder import Encoder


def _transformer_layers(model):
    """The list of transformer blocks of a BERT-like (or similar) encoder."""
    for path in ("encoder.layer", "transformer.layer", "layers", "encoder.layers"):
        node = model
        try:
            for part in path.split("."):
                node = getattr(node, part)
        except AttributeError:
            continue
        return node
    raise ValueError(f"don't know where the transformer layers of {type(model).__name__} are; "
                     "set FINE_TUNE_LAYERS=0 to keep the encoder frozen")


def fine_tune(
    encoder: Encoder,
    texts: Sequence[str],
    y: np.ndarray,
    labels: list[str],
    top_layers: int,
    out_dir: str | Path,
    cache_id: str,
    epochs: int = 2,
    batch_size: int = 16,
    learning_rate: float = 3e-5,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Encoder, ClassifierHead]:
    """Train the top `top_layers` layers and a head; save the encoder to `out_dir`.

    Returns the fine-tuned encoder (loaded from `out_dir`, its encodings cached under
    `cache_id`) and the trained head.
    """
    import copy

    import torch
    from torch import nn

    torch.manual_seed(seed)
    model = copy.deepcopy(encoder.model).train()
    layers = _transformer_layers(model)
    top_layers = max(1, min(int(top_layers), len(layers)))
    for parameter in model.parameters():
        parameter.requires_grad = False
    for layer in layers[-top_layers:]:
        for parameter in layer.parameters():
            parameter.requires_grad = True

    head = ClassifierHead(HeadConfig(labels=list(labels), input_dim=encoder.dim, seed=seed),
                          device=encoder.device)
    y = np.asarray(y, dtype=np.int64)
    weights = torch.as_tensor(class_weights(y, len(labels)), dtype=torch.float32, device=encoder.device)
    loss_fn = nn.CrossEntropyLoss(weight=weights)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW([
        {"params": trainable, "lr": learning_rate},
        {"params": list(head.body.parameters()) + list(head.out.parameters()), "lr": 1e-3},
    ])
    rng = np.random.default_rng(seed)
    steps = epochs * int(np.ceil(len(texts) / batch_size))
    step = 0
    head.body.train()
    for _ in range(epochs):
        order = rng.permutation(len(texts))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = encoder.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                      max_length=encoder.max_length, return_tensors="pt").to(encoder.device)
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            loss = loss_fn(head.out(head.body(pooled)), torch.as_tensor(y[idx], device=encoder.device))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            step += 1
            if progress is not None:
                progress(step, steps)
    head.body.eval()
    model.eval()

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    encoder.tokenizer.save_pretrained(out_dir)
    tuned = Encoder(str(out_dir), device=encoder.device, max_length=encoder.max_length,
                    batch_size=encoder.batch_size, cache_id=cache_id)
    return tuned, head
