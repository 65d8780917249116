"""Issue 17, point 3: each ordering against a reference ordering at every report point.

The simulator's `summary.md` pairs the orderings with least confidence on the AULC only; to
say whether margin is ahead *at 100 labels* (where the Fashion-MNIST peer run saw
BreakingTies ahead) the per-seed difference at each report point is needed too. Reads one
`results.json` of `model.simulate` and prints a Markdown table: per ordering its mean
accuracy at each report point and its AULC, and the paired difference from the reference in
the same seed (mean, 95 % t interval, the simulator's own `_t95`), and seeds won on AULC.

`--merge NAME=DIR2:ORDERING` adds ORDERING's runs of another simulator output (same
scenario and seeds, e.g. another `--initial-order`) as the ordering NAME, so two settings of
one ordering are paired per seed; it is refused unless both outputs hold the same random
control runs (the same pools, test sets and start). `--by-config` checks instead that the
settings that draw each seed's pool and test set are the same (data, sizes, seeds), for two
outputs that differ in `--initial` (so their controls start from other random sets).

Usage: python bench/paired_points.py [--reference least_confidence] [--metric accuracy]
       [--merge NAME=DIR2:ORDERING ...] DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# The peer bench's "mean [95 % t interval]" (the simulator's `_t95`), so both read alike.
from bench.peer_small_text import _interval as _paired  # noqa: E402
from model.simulate import aulc  # noqa: E402


def table(results: dict, reference: str, metric: str, points: list[int] | None = None) -> list[str]:
    points = points or results["report_at"]
    runs = results["runs"]
    seeds = sorted(set.intersection(*(set(runs[o]) for o in runs)), key=int)

    # AULC over the label counts every ordering's curve has (all of them, unless a merged
    # output starts from another --initial: then from the later start on).
    common = sorted(set.intersection(*(set(runs[o][s]["labels_used"]) for o in runs for s in seeds)))

    def at(ordering: str, seed: str) -> tuple[list[float], float]:
        run = runs[ordering][seed]
        x, y = run["labels_used"], run[metric]
        shared = [i for i, n in enumerate(x) if n in common]
        return [100 * y[x.index(p)] for p in points], aulc([x[i] for i in shared], [y[i] for i in shared])

    head = "| ordering | " + " | ".join(f"@{p}" for p in points) + " | AULC | " + \
        " | ".join(f"Δ@{p} [95% CI]" for p in points) + " | ΔAULC [95% CI] | seeds won |"
    lines = [f"{metric}, {len(seeds)} paired seeds, differences from {reference}", "", head,
             "|" + "---|" * (2 * len(points) + 4)]
    ref = {s: at(reference, s) for s in seeds}
    for ordering in results["orderings"]:
        mine = {s: at(ordering, s) for s in seeds}
        values = np.array([mine[s][0] for s in seeds])
        areas = np.array([mine[s][1] for s in seeds])
        cells = [f"{v:.1f}" for v in values.mean(axis=0)] + [f"{areas.mean():.2f}"]
        if ordering == reference:
            cells += ["—"] * (len(points) + 2)
        else:
            dpoints = values - np.array([ref[s][0] for s in seeds])
            darea = areas - np.array([ref[s][1] for s in seeds])
            cells += [_paired(dpoints[:, i]) for i in range(len(points))]
            cells += [_paired(darea), f"{int((darea > 0).sum())}/{len(seeds)}"]
        lines.append(f"| {ordering} | " + " | ".join(cells) + " |")
    return lines


# What `model.simulate.plan_seed` draws a seed's pool and test set from (not `initial`).
SPLIT_SETTINGS = ("data", "seed_data", "test", "test_size", "pool_size", "rare_class", "label_columns",
                  "multi_label")


def merge(results: dict, spec: str, by_config: bool = False) -> None:
    """Add `NAME=DIR:ORDERING` (see the module docstring) to `results` in place."""
    name, _, source = spec.partition("=")
    directory, _, ordering = source.rpartition(":")
    if not name or not directory or not ordering:
        raise SystemExit(f"--merge wants NAME=DIR:ORDERING, got {spec!r}")
    other = json.loads((Path(directory) / "results.json").read_text(encoding="utf-8"))
    if ordering not in other["runs"]:
        raise SystemExit(f"{directory} has no runs of {ordering!r} (it has {', '.join(other['runs'])})")
    if by_config:
        differ = [k for k in SPLIT_SETTINGS if results["config"].get(k) != other["config"].get(k)]
        if differ:
            raise SystemExit(f"{directory} draws its pools and test sets otherwise: {', '.join(differ)} differ")
    else:
        mine, theirs = results["runs"].get("random", {}), other["runs"].get("random", {})
        shared = set(mine) & set(theirs)
        if not shared or any(mine[s]["accuracy"] != theirs[s]["accuracy"] for s in shared):
            raise SystemExit(f"{directory}'s random runs are not this output's: not the same scenario and seeds")
    results["runs"][name] = other["runs"][ordering]
    results["orderings"] = [*results["orderings"], name]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", default="least_confidence")
    parser.add_argument("--metric", default="accuracy", choices=("accuracy", "macro_f1"))
    parser.add_argument("--merge", action="append", default=[], metavar="NAME=DIR:ORDERING",
                        help="pair another output's ordering with this one's, under NAME")
    parser.add_argument("--by-config", action="store_true",
                        help="--merge checks the pool and test settings instead of the random runs")
    parser.add_argument("--points", default=None, help="report points, e.g. 100,150,200 (default: the run's)")
    parser.add_argument("directory", type=Path)
    args = parser.parse_args(argv)
    results = json.loads((args.directory / "results.json").read_text(encoding="utf-8"))
    for spec in args.merge:
        merge(results, spec, by_config=args.by_config)
    points = [int(p) for p in args.points.split(",")] if args.points else None
    print("\n".join(table(results, args.reference, args.metric, points)))


if __name__ == "__main__":
    main()
