"""Before/after of a change to the orderings: bench_orderings.py of two checkouts, in turns.

    git worktree add --detach /tmp/before <commit>     # the code before the change
    .venv/bin/python bench/interleave_orderings.py /tmp/before --pairs 2 -- \\
        --pool 10000 --labeled-tweets 500 --labeled-movies 500 --repeats 2 --controls 3

Runs `bench/bench_orderings.py ARGS` of the other checkout, then of this one, `--pairs`
times (each a process of its own, so the two never share an interpreter), and prints per
ordering the median seconds of each side, **after / before of the same pair** (median and
range over pairs) and each side's ratio to its own run's reference (the head training of
the same rounds), which holds under load better than seconds do. Each run's JSON stays in
bench/results/interleave/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from run_record import REPO, Run, spread_text, table


def run_side(tree: Path, label: str, pair: int, args: list[str], out_dir: Path) -> dict:
    out = out_dir / f"{label}-{pair}.json"
    command = [sys.executable, str(tree / "bench" / "bench_orderings.py"), *args, "--out", str(out)]
    print(f"# pair {pair}, {label}: {' '.join(command)}", flush=True)
    subprocess.run(command, cwd=tree, check=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    return json.loads(out.read_text())


def medians(result: dict) -> tuple[dict[str, float], float]:
    """Median seconds per ordering, and the reference's, over one run's rounds."""
    times: dict[str, list[float]] = {}
    for m in result["measurements"]:
        times.setdefault(m["ordering"], []).append(m["seconds"])
    reference = next(v for k, v in times.items() if k.startswith("reference"))
    return {k: statistics.median(v) for k, v in times.items() if not k.startswith("reference")}, \
        statistics.median(reference)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", type=Path, help="checkout of the code before the change")
    parser.add_argument("--pairs", type=int, default=2)
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    bench_args = argv[split + 1:]  # after "--": bench_orderings.py's own arguments
    run = Run("interleave_orderings", out=REPO / "bench" / "results" / "interleave_orderings.json")
    out_dir = REPO / "bench" / "results" / "interleave"
    out_dir.mkdir(parents=True, exist_ok=True)
    sides: dict[str, list[dict]] = {"before": [], "after": []}
    for pair in range(1, args.pairs + 1):
        sides["before"].append(run_side(args.before.resolve(), "before", pair, bench_args, out_dir))
        sides["after"].append(run_side(REPO, "after", pair, bench_args, out_dir))
    rows = []
    names = list(medians(sides["after"][0])[0])
    for name in names:
        before = [medians(r)[0][name] for r in sides["before"]]
        after = [medians(r)[0][name] for r in sides["after"]]
        to_ref = {side: [medians(r)[0][name] / medians(r)[1] for r in runs] for side, runs in sides.items()}
        rows.append({"ordering": name, "before s (median of pairs)": round(statistics.median(before), 3),
                     "after s": round(statistics.median(after), 3),
                     "after / before": spread_text([a / b for a, b in zip(after, before)], 3),
                     "÷ reference, before": spread_text(to_ref["before"], 2),
                     "÷ reference, after": spread_text(to_ref["after"], 2)})
    loads = {side: [m[k] for r in runs for m in r["measurements"] for k in ("load_before", "load_after")]
             for side, runs in sides.items()}
    run["commits"] = {side: [r["commit"] for r in runs] for side, runs in sides.items()}
    run["bench_args"] = bench_args
    run["loads"] = {side: [min(v), max(v)] for side, v in loads.items()}
    run["rows"] = rows
    print()
    print(f"before: commit {run['commits']['before'][0]}, load {min(loads['before'])}–{max(loads['before'])}; "
          f"after: commit {run['commits']['after'][0]}, load {min(loads['after'])}–{max(loads['after'])}")
    print(table(rows))
    run.write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
