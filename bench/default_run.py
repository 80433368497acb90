"""Times a default run and samples its peak memory (driver, Ray and actors together).

    python bench/default_run.py [override ...]      # ETO's default, e.g. iterations=2
    python bench/default_run.py --resume RUN_DIR    # time the stages a resumed run still has to do
    python bench/default_run.py --experiment ste [override ...]   # STE's default (or --resume)

Runs ``experiments/<experiment>.py`` in a subprocess, sums the proportional set size (PSS:
shared pages split between processes) of its whole process tree every 2 s, and prints the wall
time, the peak, each stage's time from the run's metrics, and the ratios to the targets (ETO,
issue 2: 60 minutes, 8 GiB; STE, issue 12: 90 minutes).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil

TARGETS_S = {"eto": 3600.0, "ste": 5400.0}
TARGET_GIB = 8.0


def tree_pss(root: psutil.Process) -> dict[str, int]:
    """PSS in bytes of each process of the tree, by a readable label (Ray names its actors ``ray::Class``)."""
    parts: dict[str, int] = {}
    for proc in [root, *root.children(recursive=True)]:
        try:
            label = proc.name() if proc.name().startswith("ray::") else " ".join(proc.cmdline()[:2])[-40:]
            label = f"{label} [{proc.pid}]"
            parts[label] = proc.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return parts


def breakdown(parts: dict[str, int], top: int = 6) -> str:
    """The largest processes of one sample."""
    largest = sorted(parts.items(), key=lambda item: -item[1])[:top]
    return ", ".join(f"{label} {pss / 2**30:.2f}" for label, pss in largest)


def main() -> None:
    args = sys.argv[1:]
    experiment = "eto"
    if args[:1] == ["--experiment"]:
        experiment, args = args[1], args[2:]
    script = f"experiments/{experiment}.py"
    if args[:1] == ["--resume"]:
        run_dir = Path(args[1])
        cmd = [sys.executable, script, *args]
    else:
        given = [a.split("=", 1)[1] for a in args if a.startswith("run_dir=")]  # the last one wins, as in eto.py
        run_dir = Path(given[-1] if given else f"runs/bench-{experiment}-{time.strftime('%Y%m%d-%H%M%S')}")
        cmd = [sys.executable, script, f"run_dir={run_dir}", *args]
    started, started_at = time.perf_counter(), time.time()
    proc = subprocess.Popen(cmd)
    root, samples = psutil.Process(proc.pid), []
    while proc.poll() is None:
        parts = tree_pss(root)
        samples.append((time.time(), sum(parts.values()), parts))
        time.sleep(2)
    wall = time.perf_counter() - started
    peak = max((pss for _, pss, _ in samples), default=0)
    print(f"exit code {proc.returncode}; run directory {run_dir}")
    stage_start = started_at
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        timing = {k: round(v) for k, v in record.items() if k.startswith("timing/")}
        success = record.get("eval/successes", record.get("explore/successes"))
        during = [(pss, parts) for t, pss, parts in samples if stage_start <= t <= record["time"]]
        top = max(during, key=lambda sample: sample[0]) if during else None  # stages of an earlier process: none
        stage_peak = f"{top[0] / 2**30:.2f} GiB" if top else "-"
        print(f"  {record['stage']:<14} {timing} successes={success} peak={stage_peak}")
        if top:
            print(f"      at the peak (GiB): {breakdown(top[1])}")
        stage_start = max(stage_start, record["time"])
    target = TARGETS_S.get(experiment, TARGETS_S["ste"])
    print(f"wall time {wall / 60:.1f} min = {wall / target:.2f} x target ({target / 60:.0f} min)")
    print(f"peak PSS {peak / 2**30:.2f} GiB = {peak / 2**30 / TARGET_GIB:.2f} x target (8 GiB)")


if __name__ == "__main__":
    main()
