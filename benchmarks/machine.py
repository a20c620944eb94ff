"""What the benchmark scripts record about the machine they ran on, and how they write their figures."""

from __future__ import annotations

import os
import platform
import re
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, so a reader can tell whether timings met busy cores."""
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def run_header(
    script: str, argv: list[str] | None, load_before: str, date: str, launcher: str = ".venv/bin/python"
) -> dict:
    """The fields every report starts with: the machine (``nproc``, ``cpu``, ``torch``), the ``command`` that
    ran (``launcher script`` and its arguments, ``sys.argv[1:]`` when ``argv`` is None), the ``date`` (each
    script keeps its own format), and the load averages before the measurement and now (``load_after``)."""
    import torch  # here, not at the top: a script's parent process may keep torch unloaded until the report

    return {
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "command": " ".join([launcher, script, *(argv if argv is not None else sys.argv[1:])]),
        "date": date,
        "load_before": load_before,
        "load_after": load_average(),
    }


def publish(table: str, write: bool, section: str, notes_mark: str, path: Path = BENCHMARKS) -> None:
    """Print the rendered ``table`` after a blank line and, with ``write``, put it in its ``section`` of
    BENCHMARKS.md (:func:`write_section`) and say so."""
    print()
    print(table)
    if write:
        write_section(section, notes_mark, table, path)
        print(f"\nwrote the section '{section[3:]}' of BENCHMARKS.md")


def write_section(section: str, notes_mark: str, text: str, path: Path = BENCHMARKS) -> None:
    """Replace the body of the ``section`` heading of BENCHMARKS.md with ``text`` (append the section when it is
    missing), keeping the hand-written notes after the ``notes_mark`` line; the file is re-read right before
    writing and replaced atomically."""
    content = path.read_text()
    if section not in content:
        content = content.rstrip("\n") + f"\n\n{section}\n\n{notes_mark}\n"
    start = content.index(section) + len(section)
    nxt = re.search(r"^## ", content[start:], flags=re.MULTILINE)
    end = start + nxt.start() if nxt else len(content)
    body = content[start:end]
    notes = body[body.index(notes_mark) :].rstrip() + "\n\n" if notes_mark in body else ""
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(content[:start] + "\n\n" + text.rstrip() + "\n\n" + notes + content[end:].lstrip("\n"))
    tmp.replace(path)
