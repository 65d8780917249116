"""What the head costs a retrain: fit + the out-of-fold pass, per head kind and labeled-set size.

    .venv/bin/python bench/bench_head_fit.py [--labels 500,2000] [--repeats 3] [--data builtin:debian_use]

On cached MiniLM vectors of airline tweets (three classes), interleaved per repeat:
`model.heads.train_heads` (one single-choice control: the head's fit on every label, then
the retrain's 5-fold out-of-fold pass) for the linear head (the default: balanced classes,
C and a sharpening temperature chosen together by out-of-fold log loss, then fold copies
with them), the same with C by plain out-of-fold log loss (the default before 2026-12-03),
the linear head with its class weighting chosen with C (`class_weight="auto"`: two C
searches, balanced and unweighted), the linear head with C and any temperature
(`c_objective="scaled_log_loss"`) and the MLP (150 epochs), on one thread, as an RQ worker
runs it. With a multi-label `--data` (Debian's `use::` tags), the multi-label linear heads
instead: the per-choice weighting chosen out-of-fold (the default) against every choice
weighted and none, and the default with C by plain log loss. Prints a Markdown table (median and range
of the repeats) with the load.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.run_record import Run, spread_text, table  # noqa: E402

# What is timed: name -> HeadConfig fields.
# A multi-label control's heads (`--data builtin:debian_use`): the per-choice weighting chosen
# out-of-fold (the default, two fits per choice) against each fixed rule.
MULTI_LABEL_HEADS = {"linear, weighting chosen per choice": {"kind": "linear"},
                     "linear, every choice weighted": {"kind": "linear", "choice_weight": "balanced"},
                     "linear, unweighted": {"kind": "linear", "choice_weight": None},
                     "linear, weighting chosen, C by log loss": {"kind": "linear", "c_objective": "log_loss"}}
HEADS = {"linear": {"kind": "linear"}, "linear, C by log loss": {"kind": "linear", "c_objective": "log_loss"},
         "linear, weighting chosen": {"kind": "linear", "class_weight": "auto"},
         "linear, C and temperature by log loss": {"kind": "linear", "c_objective": "scaled_log_loss"},
         "mlp": {"kind": "mlp"}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--labels", default="500,2000")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--data", default="builtin:airline3",
                        help="the labeled data (default builtin:airline3); a multi-label one times MULTI_LABEL_HEADS")
    args = parser.parse_args(argv)
    sizes = [int(n) for n in args.labels.split(",")]

    import torch

    from model import simulate
    from model.heads import train_heads

    torch.set_num_threads(1)
    run = Run("bench_head_fit", argv=argv, out=args.out)
    config = simulate.SimulationConfig(data=args.data, orderings=[], seeds=[0], pool_size=max(sizes),
                                       test_size=10)
    table_ = simulate.table_from_config(config)
    plan = simulate.plan_seed(table_, config, 0)
    features, _, _ = simulate.encode_table(table_, [plan], config, all_layers=False)
    spec = table_.specs[0]
    heads_timed = MULTI_LABEL_HEADS if spec.multi_label else HEADS
    seconds: dict = {}
    for repeat in range(args.repeats):
        for n in sizes:
            rows = plan.pool[:n]
            x, y = np.asarray(features[rows], dtype=np.float32), np.asarray(table_.targets[0])[rows]
            for kind, settings in heads_timed.items():
                with run.measure(kind=kind, labels=n, repeat=repeat) as row:
                    started = time.perf_counter()
                    heads, _ = train_heads([spec], [x], [y], labeled=np.arange(n), **settings)
                    row["seconds"] = round(time.perf_counter() - started, 3)
                    row["chosen_C"] = heads.heads[0].C_
                    row["chosen_class_weight"] = heads.heads[0].class_weight_
                seconds.setdefault((kind, n), []).append(row["seconds"])
    rows = [{"head": kind, "labels": n, "fit + 5-fold pass, s": spread_text(values)}
            for (kind, n), values in sorted(seconds.items(),
                                            key=lambda item: (item[0][1], list(heads_timed).index(item[0][0])))]
    run["rows"] = rows
    run.write()
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
