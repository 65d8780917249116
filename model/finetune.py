"""Optional fine-tuning of the top N encoder layers together with the classifier heads.

By default the encoder stays frozen and only the head is trained on cached vectors, which
keeps a retrain to seconds. With FINE_TUNE_LAYERS=N the top N transformer layers are trained
as well (the rest stay frozen), the adapted encoder is saved with the model version, and
every task is re-encoded with it once per version: better accuracy on a project far from
the encoder's pretraining data, at the cost of minutes per retrain on a CPU.

Images the same way (`fine_tune_image_heads`): the top N blocks of the image network train
with the heads on the labeled images, BatchNorm frozen; the network is saved as
safetensors. Text and images share one loop (`train_jointly`: one head per control, the
sum of their losses, hard parameter sharing); each side only says how a batch of its
inputs becomes pooled vectors with gradients."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from model.classifier import ClassifierHead
from model.encoder import Encoder
from model.heads import ControlHeads, ControlSpec, answered


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
    """Train the top `top_layers` layers and one single-choice head; save the encoder to
    `out_dir`. Returns the fine-tuned encoder (loaded from `out_dir`, its encodings cached
    under `cache_id`) and the trained head. One control of `fine_tune_heads`."""
    spec = ControlSpec(name="label", labels=list(labels), inputs=["text"])
    tuned, heads = fine_tune_heads(encoder, {"text": list(texts)}, [spec], [np.asarray(y, dtype=np.int64)],
                                   top_layers, out_dir, cache_id, epochs=epochs, batch_size=batch_size,
                                   learning_rate=learning_rate, seed=seed, progress=progress)
    return tuned, heads.heads[0]


def fine_tune_heads(
    encoder: Encoder,
    object_texts: dict[str, Sequence[str]],
    specs: list[ControlSpec],
    targets: list[np.ndarray],
    top_layers: int,
    out_dir: str | Path,
    cache_id: str,
    epochs: int = 2,
    batch_size: int = 16,
    learning_rate: float = 3e-5,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Encoder, ControlHeads]:
    """Train the top `top_layers` encoder layers and one head per control on the **sum of
    the heads' losses** (hard parameter sharing); save the encoder to `out_dir`.

    `object_texts`: object name -> one text per training task; `targets[i]`: control i's
    target array over the same tasks (`model.heads.encode_targets`, -1 where unanswered: a
    head's loss counts only the tasks that answer it). Each head reads the pooled vectors of
    its `spec.inputs` side by side, as it will at prediction time. Returns the fine-tuned
    encoder (loaded from `out_dir`, its encodings cached under `cache_id`) and the heads.
    """
    import copy

    import torch

    torch.manual_seed(seed)
    model = copy.deepcopy(encoder.model).train()
    layers = _transformer_layers(model)
    top_layers = max(1, min(int(top_layers), len(layers)))
    for parameter in model.parameters():
        parameter.requires_grad = False
    for layer in layers[-top_layers:]:
        for parameter in layer.parameters():
            parameter.requires_grad = True

    def batch_inputs(idx):
        return {name: _pooled(model, encoder, [texts[i] for i in idx]) for name, texts in object_texts.items()}

    heads = train_jointly(batch_inputs, [p for p in model.parameters() if p.requires_grad], specs,
                          {name: encoder.dim for name in object_texts}, targets, encoder.device,
                          epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, seed=seed,
                          progress=progress)
    model.eval()

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    encoder.tokenizer.save_pretrained(out_dir)
    tuned = Encoder(str(out_dir), device=encoder.device, max_length=encoder.max_length,
                    batch_size=encoder.batch_size, cache_id=cache_id)
    return tuned, heads


def train_jointly(
    batch_inputs: Callable[[np.ndarray], dict],
    trainable: list,
    specs: list[ControlSpec],
    input_dims: dict[str, int],
    targets: list[np.ndarray],
    device: str,
    epochs: int = 2,
    batch_size: int = 16,
    learning_rate: float = 3e-5,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    history: list[float] | None = None,
) -> ControlHeads:
    """The loop every fine-tuning shares: one head per control and the encoder's `trainable`
    parameters, trained together on the **sum of the heads' losses** (hard parameter sharing).

    `batch_inputs(idx)`: object name -> pooled vectors (a tensor, with gradients where they
    come from the trained encoder) of the training tasks at positions `idx`; `input_dims`
    their widths. `targets[i]`: control i's targets over the training tasks (-1 where
    unanswered: a head's loss counts only the tasks that answer it). `history`, if given,
    receives each epoch's mean loss. Returns the heads, in eval mode.
    """
    import torch

    torch.manual_seed(seed)
    heads = ControlHeads.build(specs, [sum(input_dims[name] for name in spec.inputs) for spec in specs],
                               device=device, seed=seed)
    targets = [np.asarray(t) for t in targets]
    rows = [answered(t) for t in targets]
    # Each head's loss (class or positive weights) from the tasks that answer it.
    losses = [head._loss_function(head._as_targets(t[r])) if r.any() else None
              for head, t, r in zip(heads.heads, targets, rows)]
    optimiser = torch.optim.AdamW([
        {"params": list(trainable), "lr": learning_rate},
        {"params": [p for head in heads.heads for p in head.parameters()], "lr": 1e-3},
    ])
    n = len(targets[0])
    rng = np.random.default_rng(seed)
    steps = epochs * int(np.ceil(n / batch_size))
    step = 0
    for head in heads.heads:
        head.body.train()
    for _ in range(epochs):
        order = rng.permutation(n)
        epoch_loss, batches = 0.0, 0
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            pooled = batch_inputs(idx)
            loss = 0.0
            for head, spec, t, r, loss_fn in zip(heads.heads, specs, targets, rows, losses):
                keep = r[idx]
                if loss_fn is None or not keep.any():
                    continue
                x = torch.cat([pooled[name] for name in spec.inputs], dim=1)[torch.as_tensor(keep)]
                wanted = torch.as_tensor(head._as_targets(t[idx][keep]), device=device)
                loss = loss + loss_fn(head.out(head.body(x)), wanted)
            step += 1
            if not isinstance(loss, float):  # else no task of this batch answers any control
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                epoch_loss, batches = epoch_loss + float(loss.detach()), batches + 1
            if progress is not None:
                progress(step, steps)
        if history is not None and batches:
            history.append(epoch_loss / batches)
    for head in heads.heads:
        head.body.eval()
    return heads


def _pooled(model, encoder: Encoder, texts: list[str]):
    """Mean-pooled last hidden state of a batch of texts, with gradients."""
    batch = encoder.tokenizer(texts, padding=True, truncation=True, max_length=encoder.max_length,
                              return_tensors="pt").to(encoder.device)
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def fine_tune_image_heads(
    encoder,
    object_images: dict[str, Sequence[bytes]],
    specs: list[ControlSpec],
    targets: list[np.ndarray],
    top_layers: int,
    out_dir: str | Path,
    cache_id: str,
    fixed: dict[str, np.ndarray] | None = None,
    epochs: int = 2,
    batch_size: int = 16,
    learning_rate: float = 1e-4,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    history: list[float] | None = None,
):
    """The image counterpart of `fine_tune_heads`: the top `top_layers` blocks of a fresh
    copy of `encoder`'s network (a `model.image_encoder.ImageEncoder`) train with one head
    per control on the sum of their losses; the network is saved to `out_dir` (safetensors).

    `object_images`: image object name -> one image file (bytes) per training task, each
    decoded again per batch (no augmentation: the evaluation crop). `fixed`: object name ->
    vectors of the other objects the heads read (a text beside the image), used as they
    are. BatchNorm keeps its ImageNet statistics (the network stays in eval mode). Returns
    the tuned encoder (loaded back from `out_dir`, its encodings cached under `cache_id`)
    and the heads.
    """
    import torch

    from model.image_encoder import ImageEncoder

    tuned = ImageEncoder(encoder.name, device=encoder.device, batch_size=encoder.batch_size,
                         cache_id=cache_id, decode_threads=encoder.decode_threads,
                         max_pixels=encoder.max_pixels)
    trainable = tuned.fine_tune(max(1, int(top_layers)))
    constant = {name: torch.as_tensor(np.asarray(v, dtype=np.float32), device=encoder.device)
                for name, v in (fixed or {}).items()}

    def batch_inputs(idx):
        pooled = {name: tuned.forward_features(tuned.pixels([images[i] for i in idx]))
                  for name, images in object_images.items()}
        pooled.update({name: v[torch.as_tensor(idx, device=v.device)] for name, v in constant.items()})
        return pooled

    dims = {name: tuned.dim for name in object_images}
    dims.update({name: int(v.shape[1]) for name, v in constant.items()})
    heads = train_jointly(batch_inputs, trainable, specs, dims, targets, encoder.device, epochs=epochs,
                          batch_size=batch_size, learning_rate=learning_rate, seed=seed,
                          progress=progress, history=history)
    tuned.save_tuned(out_dir, top_layers)
    return ImageEncoder.load_tuned(out_dir, device=encoder.device, batch_size=encoder.batch_size,
                                   cache_id=cache_id, decode_threads=encoder.decode_threads,
                                   max_pixels=encoder.max_pixels), heads
