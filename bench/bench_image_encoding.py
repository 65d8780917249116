"""Issue 14, point 3: our image encoding path against a bare forward pass of the same network.

Both see the same images in the same batches, in one process:

* **ours**: `ImageEncoder.encode(list of JPEG byte strings)`: decoding, cropping and
  resizing in a thread pool, overlapped with the network, normalisation, pooling, numpy out.
* **bare**: the same network (EfficientNet-Lite0 with BatchNorm folded into the
  convolutions, channels-last, as `encode` runs it) called on the same batches, already
  decoded, resized and normalised before the clock starts (`torch.inference_mode`).

**Ratio** = ours images/s / bare images/s (1.0: decoding costs nothing; target >= 0.9). The
two alternate within the run (ours first in rounds 1, 3, 5..., bare first in the others) so a load
spike from another process hits both about equally; the headline is the median of the
per-round ratios, shown with their range over rounds. Also shown: decoding alone, one
thread, to see what the overlap hides. Each timed pass (every round of each path, the
decode-only pass and the cached re-read) is recorded through `Run.measure` with the commit,
the machine, and the load and CPU pressure before and after.

The images are crops of scikit-image's colour photos re-encoded as distinct JPEGs of
`--size` (default 640x480, a typical web photo), so nothing is cached between rounds.

    .venv/bin/python bench/bench_image_encoding.py [--images 96] [--rounds 9] [--batch-size 32]
    make bench BENCH=image_encoding      # at the Makefile's sizes
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import statistics
import time
from pathlib import Path

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from run_record import Run, spread, spread_text, table  # also puts the repository on sys.path

from backend.images import ImageFetcher, ImageIndex, content_cache_text, encode_task_images  # noqa: E402
from model.encoding_cache import EncodingCache  # noqa: E402
from model.image_encoder import ImageEncoder, decode_center_crop  # noqa: E402

PHOTOS = ["chelsea.png", "coffee.png", "rocket.jpg", "astronaut.png", "motorcycle_left.png",
          "motorcycle_right.png", "retina.jpg", "hubble_deep_field.jpg"]


def photo_jpegs(count: int, size: tuple[int, int], seed: int = 0) -> list[bytes]:
    """`count` distinct JPEGs of `size`: random crops of the sample photos, quality 90."""
    root = Path(importlib.util.find_spec("skimage").submodule_search_locations[0]) / "data"
    photos = [Image.open(root / name).convert("RGB") for name in PHOTOS]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        photo = photos[i % len(photos)]
        w, h = photo.size
        scale = rng.uniform(0.6, 1.0)
        cw, ch = int(w * scale), int(h * scale)
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = photo.crop((x, y, x + cw, y + ch)).resize(size, Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        crop.save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def cached_reread(encoder: ImageEncoder, count: int) -> dict:
    """A retrain of `count` images that were all seen before: no download, no network pass."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        cache = EncodingCache(Path(tmp) / "encodings.sqlite3")
        index = ImageIndex(cache.path)
        rng = np.random.default_rng(0)
        digests = [f"{i:064x}" for i in range(count)]
        texts = [content_cache_text(d) for d in digests]
        cache.store(encoder.id, texts, rng.random((count, encoder.dim), dtype=np.float32))
        cache.store(f"{encoder.id}/all-stages", texts, rng.random((count, sum(encoder.stage_dims)), dtype=np.float32))
        fetcher = ImageFetcher(label_studio_url="http://127.0.0.1:9")  # nothing listens there
        images = [(i, f"/data/upload/1/image-{i}.jpg") for i in range(count)]
        index.put([(fetcher.cache_key(v, t), d, None) for (t, v), d in zip(images, digests)])
        forwarded = encoder.stats["forwarded"]
        started = time.perf_counter()
        result = encode_task_images(encoder, cache, fetcher, images, index=index)
        seconds = time.perf_counter() - started
        assert not result.errors and result.features.shape == (count, encoder.dim)
        return {"cached_images": count, "cached_reread_s": round(seconds, 2),
                "cached_downloads": fetcher.stats["downloads"],
                "cached_forwarded": encoder.stats["forwarded"] - forwarded}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--cached", type=int, default=10_000, help="images in the cached re-read check")
    args = parser.parse_args()

    run = Run("bench_image_encoding")
    blobs = photo_jpegs(args.images, (args.width, args.height))
    encoder = ImageEncoder(device="cpu", batch_size=args.batch_size)
    network = encoder._inference  # the network `encode` runs: BatchNorm folded, channels-last

    with run.measure(path="decode only, 1 thread", images=len(blobs)) as decode_row:
        arrays = [decode_center_crop(b) for b in blobs]
    decode_seconds = decode_row["seconds"]
    # The bare pass's input: the same batches, decoded and normalised before the clock starts.
    batches = [encoder._to_tensor(arrays[s:s + args.batch_size]) for s in range(0, len(arrays), args.batch_size)]

    def bare() -> np.ndarray:
        with torch.inference_mode():
            return np.concatenate([network.features(x)[0].float().cpu().numpy() for x in batches])

    def ours() -> np.ndarray:
        return encoder.encode(blobs)

    # Warm-up: first calls allocate and pick kernels.
    encoder.encode(blobs[:args.batch_size])
    with torch.inference_mode():
        network.features(batches[0])

    rows, vectors = [], {}
    for round_ in range(args.rounds):
        order = ["ours", "bare"] if round_ % 2 == 0 else ["bare", "ours"]
        for which in order:
            with run.measure(round=round_ + 1, path=which, images=len(blobs)) as row:
                vectors[which] = (ours if which == "ours" else bare)()
            row["images_per_s"] = round(len(blobs) / row["seconds"], 1)
            rows.append({k: row[k] for k in ("round", "path", "seconds", "images_per_s", "load_before",
                                             "load_after", "cpu_pressure_during")})
            print(table([rows[-1]]) if len(rows) == 1 else table([rows[-1]]).splitlines()[-1], flush=True)

    per_round = []
    for round_ in range(1, args.rounds + 1):
        r = {row["path"]: row["images_per_s"] for row in rows if row["round"] == round_}
        per_round.append(r["ours"] / r["bare"])
    median = {w: statistics.median(row["images_per_s"] for row in rows if row["path"] == w) for w in ("ours", "bare")}
    ratio = statistics.median(per_round)
    loads = [row[k] for row in rows for k in ("load_before", "load_after")]
    summary = {
        "images": len(blobs),
        "image_size": f"{args.width}x{args.height} JPEG q90",
        "batch_size": args.batch_size,
        "decode_threads": encoder.decode_threads,
        "torch_threads": torch.get_num_threads(),
        "ours_median_images_per_s": round(median["ours"], 1),
        "bare_median_images_per_s": round(median["bare"], 1),
        "decode_only_one_thread_images_per_s": round(len(blobs) / decode_seconds, 1),
        "ratio_definition": "ours images/s / bare images/s, median of the per-round ratios",
        "ratio_median_of_rounds": round(ratio, 3),
        "ratio": spread(per_round),
        "ratio_per_round": [round(x, 3) for x in per_round],
        "ratio_of_medians": round(median["ours"] / median["bare"], 3),
        "target_ratio": 0.9,
        "meets_target": ratio >= 0.9,
        "max_abs_diff_ours_vs_bare": float(np.abs(vectors["ours"] - vectors["bare"]).max()),
        "ours_images_per_s": spread(row["images_per_s"] for row in rows if row["path"] == "ours"),
        "bare_images_per_s": spread(row["images_per_s"] for row in rows if row["path"] == "bare"),
        "load": spread(loads),
    }
    with run.measure(path="cached re-read", images=args.cached) as cached_row:
        cached_row.update(cached_reread(encoder, args.cached))
    summary.update({k: cached_row[k] for k in ("cached_images", "cached_reread_s", "cached_downloads",
                                               "cached_forwarded")})
    run["rounds"] = rows
    run["summary"] = summary
    print()
    print(table([
        {"path": "ours (ImageEncoder.encode on JPEG bytes)",
         "images/s, median (range)": spread_text([r["images_per_s"] for r in rows if r["path"] == "ours"], 1)},
        {"path": "bare (network.features on ready tensors)",
         "images/s, median (range)": spread_text([r["images_per_s"] for r in rows if r["path"] == "bare"], 1)},
        {"path": "decoding + resizing alone, 1 thread",
         "images/s, median (range)": f"{summary['decode_only_one_thread_images_per_s']} (once)"},
    ]))
    print(f"\nratio ours/bare (per round, ours images/s over bare images/s): {spread_text(per_round, 3)}; "
          f"per round {summary['ratio_per_round']}; ratio of medians {summary['ratio_of_medians']}; target >= 0.9: "
          f"{'met' if summary['meets_target'] else 'MISSED'}; load {summary['load']['min']}–{summary['load']['max']}; "
          f"{len(blobs)} distinct {summary['image_size']}, "
          f"batch {args.batch_size}, {encoder.decode_threads} decode threads, {torch.get_num_threads()} torch threads; "
          f"same vectors: max |ours - bare| {summary['max_abs_diff_ours_vs_bare']:.2e}")
    print(f"re-reading {summary['cached_images']} cached images (a retrain with nothing new): "
          f"{summary['cached_reread_s']} s, {summary['cached_downloads']} downloads, "
          f"{summary['cached_forwarded']} images through the network")
    run.write()


if __name__ == "__main__":
    main()
