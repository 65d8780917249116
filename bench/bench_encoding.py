"""Issue 3, point 2: our Encoder.encode against a bare `transformers` forward pass, in one run.

Both encode the same texts with the same weights, batch size and max_length:

* **ours**: `model.encoder.Encoder.encode` (length-sorted batches, `torch.inference_mode`);
* **bare**: what the sentence-transformers model card shows: `AutoTokenizer` + `AutoModel`,
  batches in the given (unsorted) order under `torch.no_grad()`, mean pooling over the
  attention mask.

The two take turns within one process (ours first in odd rounds, bare first in even ones),
so a load spike from another process on this shared machine hits both about equally.

**The ratio** (the one figure this benchmark reports): in each round, ours texts/s divided
by bare texts/s (= bare seconds / ours seconds); the headline is the median of the
per-round ratios, shown with their range over rounds. Above 1, ours is faster; target >= 0.9.
It also checks that both produce the same vectors, and counts the padded tokens each one
pushes through the model.

    .venv/bin/python bench/bench_encoding.py [--texts 1000] [--rounds 8] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import os

from run_record import Run, spread, spread_text, table  # also puts the repository on sys.path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

from model.datasets import airline_tweets  # noqa: E402
from model.encoder import Encoder  # noqa: E402


class BareEncoder:
    """The baseline: a plain forward pass with mean pooling, batches in input order."""

    def __init__(self, path: str, batch_size: int, max_length: int):
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.batch_size = batch_size
        self.max_length = max_length

    def encode(self, texts: list[str]) -> np.ndarray:
        out = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(texts[start:start + self.batch_size], padding=True,
                                       truncation=True, max_length=self.max_length, return_tensors="pt")
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                out.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)).numpy())
        return np.concatenate(out)


def padded_tokens(tokenizer, texts: list[str], batch_size: int, max_length: int, sort: str) -> tuple[int, int]:
    """(tokens the model sees including padding, real tokens) for this batching.

    `sort`: "none" (input order), "chars" (what Encoder does) or "tokens" (by token count).
    """
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
    keys = {"none": np.arange(len(texts)), "chars": [len(t) for t in texts], "tokens": lengths}[sort]
    order = np.argsort(keys, kind="stable")
    total = 0
    for start in range(0, len(texts), batch_size):
        batch = [lengths[i] for i in order[start:start + batch_size]]
        total += max(batch) * len(batch)
    return total, sum(lengths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args()

    run = Run("bench_encoding")
    texts = airline_tweets().sample(args.texts, seed=0).texts
    ours = Encoder("default", device="cpu", max_length=args.max_length, batch_size=args.batch_size)
    bare = BareEncoder(ours.path, args.batch_size, args.max_length)
    sorted_tokens, real_tokens = padded_tokens(ours.tokenizer, texts, args.batch_size, args.max_length, "chars")
    unsorted_tokens, _ = padded_tokens(ours.tokenizer, texts, args.batch_size, args.max_length, "none")
    token_sorted_tokens, _ = padded_tokens(ours.tokenizer, texts, args.batch_size, args.max_length, "tokens")

    # Warm-up: first calls allocate and pick kernels.
    ours.encode(texts[:args.batch_size])
    bare.encode(texts[:args.batch_size])

    rows, vectors = [], {}
    for round_ in range(1, args.rounds + 1):
        order = ["ours", "bare"] if round_ % 2 else ["bare", "ours"]
        for which in order:
            with run.measure(round=round_, encoder=which) as row:
                vectors[which] = (ours if which == "ours" else bare).encode(texts)
            row["texts_per_s"] = round(len(texts) / row["seconds"], 1)
            rows.append({k: row[k] for k in ("round", "encoder", "seconds", "texts_per_s", "load_before",
                                             "load_after", "cpu_pressure_during")})
            print(table([rows[-1]]) if len(rows) == 1 else table([rows[-1]]).splitlines()[-1], flush=True)

    # The one ratio: per round, ours texts/s over bare texts/s (both encoded the same texts).
    per_round = []
    for round_ in range(1, args.rounds + 1):
        r = {row["encoder"]: row["seconds"] for row in rows if row["round"] == round_}
        per_round.append(r["bare"] / r["ours"])
    ratio = spread(per_round)
    cosine = np.sum(vectors["ours"] * vectors["bare"], 1) / (
        np.linalg.norm(vectors["ours"], axis=1) * np.linalg.norm(vectors["bare"], axis=1))
    summary = {
        "texts": len(texts),
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "ratio_definition": "per round: ours texts/s / bare texts/s (= bare s / ours s); median over rounds",
        "ratio": ratio,
        "ratio_per_round": [round(x, 3) for x in per_round],
        "ours_texts_per_s": spread(row["texts_per_s"] for row in rows if row["encoder"] == "ours"),
        "bare_texts_per_s": spread(row["texts_per_s"] for row in rows if row["encoder"] == "bare"),
        "load": spread([row[k] for row in rows for k in ("load_before", "load_after")]),
        "target_ratio": 0.9,
        "meets_target": ratio["median"] >= 0.9,
        "tokens_real": real_tokens,
        "tokens_with_padding_sorted": sorted_tokens,
        "tokens_with_padding_unsorted": unsorted_tokens,
        "tokens_with_padding_if_sorted_by_token_count": token_sorted_tokens,
        "min_cosine_ours_vs_bare": round(float(cosine.min()), 6),
        "max_abs_diff_ours_vs_bare": float(np.abs(vectors["ours"] - vectors["bare"]).max()),
    }
    run["rounds"] = rows
    run["summary"] = summary
    print()
    print(table([
        {"encoder": "ours (Encoder.encode: length-sorted, inference_mode)",
         "texts/s, median (range)": spread_text([r["texts_per_s"] for r in rows if r["encoder"] == "ours"], 1),
         "tokens incl. padding": sorted_tokens},
        {"encoder": "bare transformers (input order, no_grad)",
         "texts/s, median (range)": spread_text([r["texts_per_s"] for r in rows if r["encoder"] == "bare"], 1),
         "tokens incl. padding": unsorted_tokens},
    ]))
    print(f"\nratio ours/bare (per round, ours texts/s over bare texts/s): {spread_text(per_round, 3)}; "
          f"per round {summary['ratio_per_round']}; target >= 0.9: {'met' if summary['meets_target'] else 'MISSED'}; "
          f"load {summary['load']['min']}–{summary['load']['max']}; "
          f"{len(texts)} airline tweets, batch {args.batch_size}, max_length {args.max_length}, "
          f"{real_tokens} real tokens ({token_sorted_tokens} with padding if batches were sorted by token count); "
          f"same vectors: min cosine {summary['min_cosine_ours_vs_bare']}")
    run.write()


if __name__ == "__main__":
    main()
