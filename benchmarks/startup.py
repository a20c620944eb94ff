"""Start-up time of the ``mtrec`` command line: ``mtrec --help`` and ``mtrec train --help``.

Run by hand (never by the tests)::

    .venv/bin/python benchmarks/startup.py            # 7 runs of each command, medians printed
    .venv/bin/python benchmarks/startup.py --runs 15

Each figure is the wall time of a fresh process (``subprocess.run`` of the installed ``mtrec``
console script, or ``python -m mtrec.cli`` when it is not installed), from start to exit, the median
of ``--runs`` runs; the commands alternate so that load from other processes falls on all of them.
``python -c pass`` is the interpreter's own start-up, for reference; ``mtrec models`` imports every
model (so torch), to show what help used to cost. The target (issue 12) is under 0.5 s for help.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def mtrec_command() -> list[str]:
    """The ``mtrec`` console script next to this interpreter, else ``python -m mtrec.cli``."""
    script = Path(sys.executable).parent / "mtrec"
    if script.exists():
        return [str(script)]
    found = shutil.which("mtrec")
    return [found] if found else [sys.executable, "-m", "mtrec.cli"]


def wall_time(command: list[str]) -> float:
    """Seconds from start to exit of one fresh process running ``command`` (its output discarded)."""
    start = time.perf_counter()
    subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="runs of each command (the median is reported)")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")

    mtrec = mtrec_command()
    cases = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "mtrec --help": [*mtrec, "--help"],
        "mtrec train --help": [*mtrec, "train", "--help"],
        "mtrec models": [*mtrec, "models"],
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for command in cases.values():  # one untimed warm-up each: the file cache, .pyc files
        wall_time(command)
    for _ in range(args.runs):
        for name, command in cases.items():
            times[name].append(wall_time(command))

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"start-up, median of {args.runs} runs (wall time of a fresh process); "
        f"{os.cpu_count()} CPUs, load average {load:.2f}"
    )
    print(f"{'command':<22} {'median s':>9} {'min s':>7} {'max s':>7}")
    for name, values in times.items():
        print(f"{name:<22} {statistics.median(values):9.3f} {min(values):7.3f} {max(values):7.3f}")


if __name__ == "__main__":
    main()
