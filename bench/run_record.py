"""What every benchmark records next to its numbers: machine, load, date, commit; and its output.

Each `bench/bench_*.py` prints a Markdown table (pasted as is into BENCHMARKS.md) and writes
`bench/results/<name>.json` with the same numbers plus this record. The machine is shared,
so the 1-minute load average is sampled before and after every measurement: a number taken
at load 5 on 2 cores is not comparable with one taken at load 0.5.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"

if str(REPO) not in sys.path:  # `python bench/bench_x.py` from anywhere imports backend/ and model/
    sys.path.insert(0, str(REPO))


def load() -> float:
    """The 1-minute load average, as `uptime` shows it."""
    return round(os.getloadavg()[0], 2)


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def machine() -> dict:
    cpu_model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
                break
    except OSError:
        pass
    try:
        import torch

        torch_threads = torch.get_num_threads()
        torch_version = torch.__version__
    except ImportError:  # pragma: no cover
        torch_threads = torch_version = None
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "mem_total_gb": mem_gb,
        "python": platform.python_version(),
        "torch": torch_version,
        "torch_threads": torch_threads,
    }


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return head + ("+uncommitted" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Run:
    """One benchmark run: collects sections of results and writes them with the context."""

    def __init__(self, name: str, argv: list[str] | None = None):
        self.name = name
        self.started = time.time()
        self.record: dict = {
            "benchmark": name,
            "command": " ".join([".venv/bin/python", f"bench/{name}.py", *(argv if argv is not None else sys.argv[1:])]),
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "commit": git_commit(),
            "machine": machine(),
            "uptime_start": uptime(),
            "load_start": load(),
        }
        print(f"# {name}   {self.record['date_utc']}   commit {self.record['commit']}")
        m = self.record["machine"]
        print(f"# {m['nproc']} CPUs ({m['cpu_model']}), {m['mem_total_gb']} GB, torch {m['torch']} "
              f"with {m['torch_threads']} threads")
        print(f"# {self.record['uptime_start']}", flush=True)

    def __setitem__(self, key, value):
        self.record[key] = value

    def __getitem__(self, key):
        return self.record[key]

    def write(self) -> Path:
        self.record["uptime_end"] = uptime()
        self.record["load_end"] = load()
        self.record["duration_s"] = round(time.time() - self.started, 1)
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"{self.name}.json"
        path.write_text(json.dumps(self.record, indent=2, default=_plain) + "\n")
        print(f"# {self.record['uptime_end']}")
        print(f"# wrote {path.relative_to(REPO)} ({self.record['duration_s']} s)", flush=True)
        return path


def _plain(value):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value)}")


def percentile(values, q: float) -> float:
    """Linear-interpolated percentile (numpy's default), of a non-empty sequence."""
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), q))


def table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A Markdown pipe table; floats get 3 significant decimals at most."""
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)
