"""What every benchmark records next to its numbers: machine, load, CPU pressure, date, commit.

Each `bench/bench_*.py` prints a Markdown table (pasted as is into BENCHMARKS.md) and writes
`bench/results/<name>.json` with the same numbers plus this record. The one shared way to
take a measurement is `Run.measure()`: it stamps the row with the commit and the machine,
and samples the 1-minute load and the kernel's CPU pressure (`/proc/pressure/cpu`) before
and after, plus the share of the measurement's own wall time in which some runnable task
waited for a CPU. The machine is shared: a number taken at load 5 on 2 cores is not
comparable with one taken at load 0.5, which is why every figure in BENCHMARKS.md is a ratio
to a reference measured in the same run, next to the load.

`Run` refuses a working tree with uncommitted changes to tracked files, so the recorded
commit is the code that ran; `BENCH_ALLOW_DIRTY=1` runs anyway and records the commit as
`<sha>+uncommitted` (never paste such a number into BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
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


def cpu_pressure() -> dict | None:
    """The "some" line of /proc/pressure/cpu: the share (%) of the last 10 s and 60 s in
    which at least one runnable task waited for a CPU, and the cumulative stall in µs.
    None where the kernel has no pressure stall information."""
    try:
        for line in Path("/proc/pressure/cpu").read_text().splitlines():
            if line.startswith("some "):
                fields = dict(item.split("=", 1) for item in line.split()[1:])
                return {"some_avg10": float(fields["avg10"]), "some_avg60": float(fields["avg60"]),
                        "some_total_us": int(fields["total"])}
    except (OSError, KeyError, ValueError):
        pass
    return None


def conditions() -> dict:
    """Load and CPU pressure now, with a monotonic timestamp (for `pressure_during`)."""
    return {"load": load(), "cpu_pressure": cpu_pressure(), "at": time.monotonic()}


def pressure_during(before: dict, after: dict) -> float | None:
    """% of the wall time between two `conditions()` in which some task waited for a CPU.

    This is the measurement's own CPU pressure, where avg10 before and after are snapshots.
    """
    a, b = before.get("cpu_pressure"), after.get("cpu_pressure")
    elapsed_us = (after["at"] - before["at"]) * 1e6
    if not a or not b or elapsed_us <= 0:
        return None
    return round(100 * (b["some_total_us"] - a["some_total_us"]) / elapsed_us, 1)


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


def uncommitted_files() -> list[str]:
    """Tracked files that differ from HEAD (untracked files, such as results, do not count)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                             capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line[3:] for line in out.splitlines() if line.strip()]


def git_commit() -> str:
    """The short HEAD commit, with "+uncommitted" when tracked files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+uncommitted" if uncommitted_files() else "")


def require_clean_tree() -> None:
    """Stop unless the tracked files are committed (or BENCH_ALLOW_DIRTY=1 says to go on)."""
    dirty = uncommitted_files()
    if dirty and os.environ.get("BENCH_ALLOW_DIRTY") != "1":
        shown = ", ".join(dirty[:5]) + (f" and {len(dirty) - 5} more" if len(dirty) > 5 else "")
        raise SystemExit(f"bench: uncommitted changes in {shown}. Commit them first, so the "
                         "recorded commit is the code that ran; or set BENCH_ALLOW_DIRTY=1 to run "
                         "anyway, recorded as <commit>+uncommitted.")


class Run:
    """One benchmark run: collects sections of results and writes them with the context."""

    def __init__(self, name: str, argv: list[str] | None = None, out: Path | None = None):
        require_clean_tree()
        self.name = name
        self.out = Path(out) if out else RESULTS / f"{name}.json"
        self.started = time.time()
        self.measurements: list[dict] = []
        self.record: dict = {
            "benchmark": name,
            "command": " ".join([".venv/bin/python", f"bench/{name}.py",
                                 *(argv if argv is not None else sys.argv[1:])]),
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "commit": git_commit(),
            "machine": machine(),
            "uptime_start": uptime(),
            "load_start": load(),
        }
        self._stamp = {"commit": self.record["commit"], "host": platform.node(),
                       "cpus": self.record["machine"]["nproc"]}
        print(f"# {name}   {self.record['date_utc']}   commit {self.record['commit']}")
        m = self.record["machine"]
        print(f"# {m['nproc']} CPUs ({m['cpu_model']}), {m['mem_total_gb']} GB, torch {m['torch']} "
              f"with {m['torch_threads']} threads")
        print(f"# {self.record['uptime_start']}", flush=True)

    @contextlib.contextmanager
    def measure(self, **labels):
        """Time one measurement and record it with its context; yields the row to fill.

        The row gets `seconds` (unless the body set it), the commit, host and CPU count, the
        load and CPU pressure (avg10) before and after, and `cpu_pressure_during`, the % of
        the measurement's wall time in which some task waited for a CPU. Rows are kept in
        `run.measurements` and written under "measurements".
        """
        row = dict(labels)
        row["started_utc"] = time.strftime("%H:%M:%S", time.gmtime())  # to find it in server logs
        before = conditions()
        started = time.perf_counter()
        yield row
        seconds = time.perf_counter() - started
        after = conditions()
        row.setdefault("seconds", round(seconds, 3))
        row.update(self._stamp)
        row.update(load_before=before["load"], load_after=after["load"],
                   cpu_pressure_before=(before["cpu_pressure"] or {}).get("some_avg10"),
                   cpu_pressure_after=(after["cpu_pressure"] or {}).get("some_avg10"),
                   cpu_pressure_during=pressure_during(before, after))
        self.measurements.append(row)

    def __setitem__(self, key, value):
        self.record[key] = value

    def __getitem__(self, key):
        return self.record[key]

    def write(self) -> Path:
        self.record["uptime_end"] = uptime()
        self.record["load_end"] = load()
        self.record["duration_s"] = round(time.time() - self.started, 1)
        if self.measurements:
            self.record["measurements"] = self.measurements
        path = self.out
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.record, indent=2, default=_plain) + "\n")
        print(f"# {self.record['uptime_end']}")
        shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
        print(f"# wrote {shown} ({self.record['duration_s']} s)", flush=True)
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


def spread(values) -> dict:
    """Median, min, max and count of a non-empty sequence: how a figure is stated under noise."""
    import statistics

    values = [float(v) for v in values]
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3), "n": len(values)}


def spread_text(values, digits: int = 2) -> str:
    """ "1.14 (1.08–1.21, 5 rounds)": the median with the range over rounds."""
    s = spread(values)
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f}, {s['n']} rounds)"


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


def snapshot_main(argv: list[str]) -> int:
    """`python bench/run_record.py NAME PHASE` appends one JSON line to bench/results/NAME/run_record.jsonl
    (commit, machine, load and CPU pressure now): for scripts that are not Python, such as
    simulate_scenarios.sh, which calls it before and after each scenario."""
    if len(argv) != 2:
        raise SystemExit("usage: python bench/run_record.py NAME PHASE   (e.g. domain_shift start)")
    require_clean_tree()
    name, phase = argv
    now = conditions()
    line = {"benchmark": name, "phase": phase, "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "commit": git_commit(), "host": platform.node(), "machine": machine(), "load": now["load"],
            "cpu_pressure": now["cpu_pressure"], "uptime": uptime()}
    path = RESULTS / name / "run_record.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(json.dumps(line) + "\n")
    print(f"# {name} {phase}: commit {line['commit']}, load {line['load']}, "
          f"CPU pressure {(line['cpu_pressure'] or {}).get('some_avg10')}%", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(snapshot_main(sys.argv[1:]))
