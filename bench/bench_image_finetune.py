"""Issue 14, point 1: what FINE_TUNE_LAYERS costs a retrain of an image project on this machine.

One process, the model side of a retrain on real labeled images (Fashion-MNIST PNGs, the
Debian package `dataset-fashion-mnist`), `--labeled` of them labeled out of `--tasks`:

* **frozen** (`FINE_TUNE_LAYERS=0`): heads trained on the cached vectors of every task
  (`train_and_score`), what a retrain costs once the images are encoded.
* **fine-tuned** (`FINE_TUNE_LAYERS=N`): the top N blocks trained with the heads on the
  labeled images (`fine_tune_image_heads`, 2 epochs of batches of 16, decoded per batch),
  then every task's image encoded again with the tuned network under the version's own
  cache id (`encode_task_images`, the service's path), then the heads' out-of-fold pass and
  the scoring (`train_and_score` with the tuned heads).

The images are handed over as `data:` URIs (no network): downloads and the on-disk bytes
cache are not timed. Accuracy of the predicted class on the unlabeled tasks is shown beside
the seconds. Each stage is recorded through `Run.measure` with the load before and after.

    .venv/bin/python bench/bench_image_finetune.py [--labeled 100] [--tasks 1000] [--layers 1]
"""

from __future__ import annotations

import argparse
import base64
import tempfile
from pathlib import Path

import numpy as np
import torch
from run_record import Run, table  # also puts the repository on sys.path

from backend.images import ImageFetcher, encode_task_images  # noqa: E402
from model.datasets import fashion_mnist  # noqa: E402
from model.encoding_cache import EncodingCache  # noqa: E402
from model.finetune import fine_tune_image_heads  # noqa: E402
from model.heads import encode_targets, labeled_tasks  # noqa: E402
from model.image_encoder import ImageEncoder  # noqa: E402
from model.training import ControlLabels, ObjectVectors, OrderingChoice, ProjectExamples, train_and_score  # noqa: E402


def examples_of(labels: list, shown: list, choices: tuple, encodings) -> ProjectExamples:
    controls = {"kind": ControlLabels(choices, shown, inputs=("image",))}
    vectors = {"image": ObjectVectors("bench", encodings.features, encodings.stages)}
    return ProjectExamples(list(range(1, len(labels) + 1)), [""] * len(labels), controls,
                           object_texts={"image": [""] * len(labels)}, object_vectors=vectors)


def accuracy(trained, truth: list, labeled: set) -> float:
    rows = [i for i in range(len(truth)) if i not in labeled]
    return float(np.mean([trained.heads["kind"].predicted[i] == truth[i] for i in rows]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--labeled", type=int, default=100)
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32, help="encoding batch (ENCODE_BATCH_SIZE)")
    args = parser.parse_args()

    run = Run("bench_image_finetune")
    data = fashion_mnist("train", sample=args.tasks)
    choices = tuple(sorted(set(data.labels)))
    uris = ["data:image/png;base64," + base64.b64encode(b).decode() for b in data.images]
    labeled = set(range(0, len(uris), max(1, len(uris) // args.labeled)))
    labeled = set(sorted(labeled)[: args.labeled])
    shown = [data.labels[i] if i in labeled else None for i in range(len(uris))]
    encoder = ImageEncoder(device="cpu", batch_size=args.batch_size)
    fetcher = ImageFetcher()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = EncodingCache(Path(tmp) / "encodings.sqlite3")
        images = list(enumerate(uris, start=1))
        with run.measure(stage="encode every task (frozen, first time)", tasks=len(uris)) as row:
            frozen = encode_task_images(encoder, cache, fetcher, images)
        rows.append(row)
        with run.measure(stage="frozen retrain (heads on cached vectors)", labeled=len(labeled)) as row:
            again = encode_task_images(encoder, cache, fetcher, images)
            trained = train_and_score(examples_of(data.labels, shown, choices, again), encoder, cache,
                                      OrderingChoice())
        row["accuracy_unlabeled"] = round(accuracy(trained, data.labels, labeled), 3)
        rows.append(row)
        assert not frozen.errors

        examples = examples_of(data.labels, shown, choices, frozen)
        spec = examples.controls["kind"].spec("kind", ["image"])
        targets = [encode_targets(spec, shown)]
        train_rows = labeled_tasks(targets)
        with run.measure(stage=f"fine-tune top {args.layers} block(s) with the head", labeled=len(labeled)) as tune:
            tuned, heads = fine_tune_image_heads(encoder, {"image": [data.images[i] for i in train_rows]},
                                                 [spec], [targets[0][train_rows]], args.layers,
                                                 Path(tmp) / "tuned", cache_id=f"{encoder.id}+ft-bench")
        rows.append(tune)
        with run.measure(stage="re-encode every task with the tuned network", tasks=len(uris)) as encode:
            retuned = encode_task_images(tuned, cache, fetcher, images)
        rows.append(encode)
        with run.measure(stage="out-of-fold pass and scoring (tuned heads)", labeled=len(labeled)) as score:
            trained = train_and_score(examples_of(data.labels, shown, choices, retuned), tuned, cache,
                                      OrderingChoice(), tuned_heads=heads)
        score["accuracy_unlabeled"] = round(accuracy(trained, data.labels, labeled), 3)
        rows.append(score)
    total = tune["seconds"] + encode["seconds"] + score["seconds"]
    run["rows"] = rows
    run["summary"] = {"tasks": len(uris), "labeled": len(labeled), "layers": args.layers,
                      "fine_tuned_retrain_s": round(total, 1), "frozen_retrain_s": rows[1]["seconds"],
                      "torch_threads": torch.get_num_threads()}
    print(table([{k: r.get(k) for k in ("stage", "seconds", "accuracy_unlabeled", "load_before", "load_after")}
                 for r in rows]))
    print(f"\nfine-tuned retrain (model side): {total:.1f} s for {len(labeled)} labeled of {len(uris)} tasks, "
          f"top {args.layers} block(s); frozen: {rows[1]['seconds']:.1f} s; {torch.get_num_threads()} torch threads")
    run.write()


if __name__ == "__main__":
    main()
