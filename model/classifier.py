"""The project's classifier: a small neural head trained on top of the encoder's vectors.

It has one real hidden layer, as in *Human-in-the-Loop Machine Learning*: the Active
Transfer Learning orderings train new heads on that **last hidden layer**, so it has to
carry task information rather than be the raw sentence embedding. Classes are weighted by
inverse frequency so an imbalanced project does not learn its class prior instead of its
task. Weights are stored as safetensors plus JSON, never pickle.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

WEIGHTS_FILE = "classifier.safetensors"


@contextlib.contextmanager
def one_thread():
    """Run the small head's maths on one thread.

    Its matrices are tiny: extra intra-op threads only add synchronisation, and on a busy
    machine (web workers, other jobs) OpenMP's spinning threads made a 50-example fit take
    20 s instead of 0.5 s. The encoder keeps all threads.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
CONFIG_FILE = "classifier.json"


def class_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """Inverse-frequency weights (mean 1 over the examples); 0 for an absent class."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(n_classes)
    weights[present] = len(y) / (present.sum() * counts[present])
    return weights


@dataclass
class HeadConfig:
    labels: list[str]
    input_dim: int
    hidden_dim: int = 128
    epochs: int = 150
    learning_rate: float = 3e-3
    weight_decay: float = 1e-3
    dropout: float = 0.1
    seed: int = 0
    extra: dict = field(default_factory=dict)


class ClassifierHead:
    """input → Linear → ReLU → (last hidden layer) → Linear → softmax."""

    def __init__(self, config: HeadConfig, device: str = "cpu"):
        import torch
        from torch import nn

        self.config = config
        self.device = device
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(config.seed)
        self.body = nn.Sequential(
            nn.Linear(config.input_dim, config.hidden_dim), nn.ReLU(), nn.Dropout(config.dropout)
        ).to(device)
        self.out = nn.Linear(config.hidden_dim, len(config.labels)).to(device)
        torch.random.set_rng_state(generator_state)

    @property
    def labels(self) -> list[str]:
        return self.config.labels

    def fit(self, features: np.ndarray, y: Sequence[int]) -> "ClassifierHead":
        """Full-batch training with class-weighted cross-entropy. `y` are label indices."""
        import torch
        from torch import nn

        y = np.asarray(y, dtype=np.int64)
        if len(y) == 0:
            raise ValueError("cannot train a classifier on zero labeled examples")
        x = torch.as_tensor(np.asarray(features, dtype=np.float32), device=self.device)
        t = torch.as_tensor(y, device=self.device)
        weights = torch.as_tensor(
            class_weights(y, len(self.labels)), dtype=torch.float32, device=self.device
        )
        loss_fn = nn.CrossEntropyLoss(weight=weights)
        params = list(self.body.parameters()) + list(self.out.parameters())
        optimiser = torch.optim.AdamW(
            params, lr=self.config.learning_rate, weight_decay=self.config.weight_decay
        )
        torch.manual_seed(self.config.seed)  # dropout masks are reproducible too
        self.body.train()
        with one_thread():
            for _ in range(self.config.epochs):
                optimiser.zero_grad()
                loss = loss_fn(self.out(self.body(x)), t)
                loss.backward()
                optimiser.step()
        self.body.eval()
        return self

    def _forward(self, features: np.ndarray, hidden_only: bool) -> np.ndarray:
        import torch

        outputs = []
        with torch.inference_mode(), one_thread():
            for start in range(0, len(features), 8192):
                x = torch.as_tensor(
                    np.asarray(features[start : start + 8192], dtype=np.float32),
                    device=self.device,
                )
                h = self.body(x)
                outputs.append((h if hidden_only else torch.softmax(self.out(h), -1)).cpu().numpy())
        if not outputs:
            width = self.config.hidden_dim if hidden_only else len(self.labels)
            return np.zeros((0, width), dtype=np.float32)
        return np.concatenate(outputs)

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Class probabilities, shape (n, n_classes)."""
        return self._forward(features, hidden_only=False)

    def hidden(self, features: np.ndarray) -> np.ndarray:
        """Activations of the last hidden layer, shape (n, hidden_dim)."""
        return self._forward(features, hidden_only=True)

    def save(self, directory: str | Path) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        tensors = {f"body.{k}": v for k, v in self.body.state_dict().items()}
        tensors.update({f"out.{k}": v for k, v in self.out.state_dict().items()})
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                  str(directory / WEIGHTS_FILE))
        (directory / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2))

    @classmethod
    def load(cls, directory: str | Path, device: str = "cpu") -> "ClassifierHead":
        from safetensors.torch import load_file

        directory = Path(directory)
        config = HeadConfig(**json.loads((directory / CONFIG_FILE).read_text()))
        head = cls(config, device=device)
        tensors = load_file(str(directory / WEIGHTS_FILE), device=device)
        head.body.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("body.")})
        head.out.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("out.")})
        head.body.eval()
        return head
