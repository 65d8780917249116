"""The project's classifiers: small neural heads trained on top of the encoder's vectors.

Each has one real hidden layer, as in *Human-in-the-Loop Machine Learning*: the Active
Transfer Learning orderings train new heads on that **last hidden layer**, so it has to
carry task information rather than be the raw sentence embedding.

* `ClassifierHead`: single-choice, softmax over the choices; classes weighted by inverse
  frequency so an imbalanced project does not learn its class prior instead of its task.
* `MultiLabelHead`: multi-label (`<Choices choice="multiple">`), one sigmoid per choice,
  each choice's positives weighted against its negatives, and a per-choice decision
  threshold (`thresholds_`) chosen on out-of-fold probabilities (`choose_thresholds`).

Weights are stored as safetensors plus JSON, never pickle.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

# The small head's maths runs on one thread: why in model/threads.py.
from model.threads import one_thread

WEIGHTS_FILE = "classifier.safetensors"
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


class _TwoLayerHead:
    """input → Linear → ReLU → Dropout → (last hidden layer) → Linear; what both heads share."""

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

    def parameters(self) -> list:
        """The trainable tensors (for an optimiser that also tunes the encoder)."""
        return list(self.body.parameters()) + list(self.out.parameters())

    def _loss_function(self, targets: np.ndarray):
        raise NotImplementedError

    def _as_targets(self, y) -> np.ndarray:
        raise NotImplementedError

    def _activation(self, logits):
        raise NotImplementedError

    def fit(self, features: np.ndarray, y) -> _TwoLayerHead:
        """Full-batch training on (features, targets); see the subclass for the targets."""
        import torch

        y = self._as_targets(y)
        if len(y) == 0:
            raise ValueError("cannot train a classifier on zero labeled examples")
        x = torch.as_tensor(np.asarray(features, dtype=np.float32), device=self.device)
        t = torch.as_tensor(y, device=self.device)
        loss_fn = self._loss_function(y)
        optimiser = torch.optim.AdamW(
            self.parameters(), lr=self.config.learning_rate, weight_decay=self.config.weight_decay
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
                outputs.append((h if hidden_only else self._activation(self.out(h))).cpu().numpy())
        if not outputs:
            width = self.config.hidden_dim if hidden_only else len(self.labels)
            return np.zeros((0, width), dtype=np.float32)
        return np.concatenate(outputs)

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Probabilities, shape (n, n_choices)."""
        return self._forward(features, hidden_only=False)

    def hidden(self, features: np.ndarray) -> np.ndarray:
        """Activations of the last hidden layer, shape (n, hidden_dim)."""
        return self._forward(features, hidden_only=True)

    def tensors(self) -> dict:
        """The weights by name ("body.0.weight", "out.bias", ...), on the CPU."""
        tensors = {f"body.{k}": v for k, v in self.body.state_dict().items()}
        tensors.update({f"out.{k}": v for k, v in self.out.state_dict().items()})
        return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}

    def load_tensors(self, tensors: dict) -> None:
        """Weights from `tensors()`'s names."""
        self.body.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("body.")})
        self.out.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("out.")})
        self.body.eval()

    def config_dict(self) -> dict:
        """The head's settings (and fitted decision state) as plain JSON."""
        return asdict(self.config)

    @classmethod
    def from_config_dict(cls, data: dict, device: str = "cpu"):
        """An untrained head from `config_dict()`'s output (weights: `load_tensors`)."""
        return cls(HeadConfig(**data), device=device)

    def save(self, directory: str | Path) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        save_file(self.tensors(), str(directory / WEIGHTS_FILE))
        (directory / CONFIG_FILE).write_text(json.dumps(self.config_dict(), indent=2))

    @classmethod
    def load(cls, directory: str | Path, device: str = "cpu"):
        from safetensors.torch import load_file

        directory = Path(directory)
        head = cls.from_config_dict(json.loads((directory / CONFIG_FILE).read_text()), device=device)
        head.load_tensors(load_file(str(directory / WEIGHTS_FILE), device=device))
        return head


class ClassifierHead(_TwoLayerHead):
    """Single-choice: input → Linear → ReLU → (last hidden layer) → Linear → softmax.

    `fit(features, y)`: `y` are label indices; class-weighted cross-entropy.
    """

    multi_label = False

    def _as_targets(self, y) -> np.ndarray:
        return np.asarray(y, dtype=np.int64)

    def _loss_function(self, targets: np.ndarray):
        import torch
        from torch import nn

        weights = torch.as_tensor(
            class_weights(targets, len(self.labels)), dtype=torch.float32, device=self.device
        )
        return nn.CrossEntropyLoss(weight=weights)

    def _activation(self, logits):
        import torch

        return torch.softmax(logits, -1)

    def fit(self, features: np.ndarray, y: Sequence[int]) -> ClassifierHead:
        """Full-batch training with class-weighted cross-entropy. `y` are label indices."""
        return super().fit(features, y)

    def predict(self, probabilities: np.ndarray) -> np.ndarray:
        """The chosen label index per row of `predict_proba`'s output."""
        return np.asarray(probabilities).argmax(axis=1)


def positive_weights(targets: np.ndarray) -> np.ndarray:
    """Per choice, negatives / positives (1 where a choice has no positive or no negative),
    clipped to [0.1, 10]: each choice's rare side counts as much as its common side without
    a handful of positives taking over the loss."""
    targets = np.asarray(targets, dtype=np.float64)
    positives = targets.sum(axis=0)
    negatives = len(targets) - positives
    weights = np.ones(targets.shape[1])
    both = (positives > 0) & (negatives > 0)
    weights[both] = negatives[both] / positives[both]
    return np.clip(weights, 0.1, 10.0)


def choose_thresholds(probabilities: np.ndarray, targets: np.ndarray, min_positives: int = 3,
                      default: float = 0.5) -> np.ndarray:
    """Per choice, the decision threshold with the best F1 on (out-of-fold) probabilities.

    Candidates are 0.05, 0.10, ..., 0.95; a tie goes to the candidate closest to `default`.
    A choice with fewer than `min_positives` positives or negatives keeps `default`: a
    threshold fitted to two examples is noise.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    targets = np.asarray(targets).astype(bool)
    candidates = np.round(np.arange(0.05, 0.951, 0.05), 2)
    thresholds = np.full(targets.shape[1], float(default))
    for j in range(targets.shape[1]):
        truth = targets[:, j]
        if truth.sum() < min_positives or (~truth).sum() < min_positives:
            continue
        predicted = probabilities[:, j][:, None] >= candidates[None, :]  # (n, candidates)
        true_positive = (predicted & truth[:, None]).sum(axis=0)
        f1 = 2 * true_positive / np.maximum(predicted.sum(axis=0) + truth.sum(), 1)
        best = np.flatnonzero(f1 >= f1.max() - 1e-12)
        thresholds[j] = float(candidates[best[np.argmin(np.abs(candidates[best] - default))]])
    return thresholds


class MultiLabelHead(_TwoLayerHead):
    """Multi-label: input → Linear → ReLU → (last hidden layer) → Linear → one sigmoid per choice.

    `fit(features, y)`: `y` is a 0/1 matrix (n, n_choices); binary cross-entropy with each
    choice's positives weighted by `positive_weights`. `thresholds_` (one per choice, 0.5
    until `choose_thresholds` sets them from out-of-fold probabilities) decide the choices
    a prediction selects.
    """

    multi_label = True

    def __init__(self, config: HeadConfig, device: str = "cpu"):
        super().__init__(config, device=device)
        self.thresholds_ = np.full(len(config.labels), 0.5)

    def _as_targets(self, y) -> np.ndarray:
        y = np.asarray(y, dtype=np.float32)
        if y.ndim != 2 or y.shape[1] != len(self.labels):
            raise ValueError(f"multi-label targets must be a (n, {len(self.labels)}) 0/1 matrix, "
                             f"got shape {y.shape}")
        return y

    def _loss_function(self, targets: np.ndarray):
        import torch
        from torch import nn

        weights = torch.as_tensor(positive_weights(targets), dtype=torch.float32, device=self.device)
        return nn.BCEWithLogitsLoss(pos_weight=weights)

    def _activation(self, logits):
        import torch

        return torch.sigmoid(logits)

    def predict(self, probabilities: np.ndarray) -> np.ndarray:
        """Chosen choices per row (bool, (n, n_choices)): every choice at or above its
        threshold, and at least the most likely one (a Choices answer is never empty)."""
        probabilities = np.asarray(probabilities, dtype=np.float64)
        chosen = probabilities >= self.thresholds_[None, :]
        if len(probabilities):
            chosen[np.arange(len(chosen)), probabilities.argmax(axis=1)] = True
        return chosen

    def config_dict(self) -> dict:
        return {**super().config_dict(), "extra": {**self.config.extra, "thresholds": self.thresholds_.tolist()}}

    @classmethod
    def from_config_dict(cls, data: dict, device: str = "cpu") -> MultiLabelHead:
        head = super().from_config_dict(data, device=device)
        thresholds = head.config.extra.get("thresholds")
        if thresholds is not None:
            head.thresholds_ = np.asarray(thresholds, dtype=np.float64)
        return head
