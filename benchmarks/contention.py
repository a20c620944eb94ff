"""Training beside a competing CPU-bound process: torch's defaults against mtrec's thread policy (issue 12 §2).

Run by hand (never by the tests), holding the machine's heavy-job lock for the whole measurement (its own
competitor is part of it; another job beside it would spoil the figures)::

    flock /tmp/mtrec-heavy.lock .venv/bin/python benchmarks/contention.py            # print the table
    flock /tmp/mtrec-heavy.lock .venv/bin/python benchmarks/contention.py --write    # also update BENCHMARKS.md

Each measurement is a fresh process (the OpenMP wait setting is read when torch loads) that trains the
registered ``mmoe`` (default options) on the embedded Census data as ``mtrec train`` does (``Trainer``,
batch 1024, Adam): ``--warmup`` steps, then ``--steps`` timed steps; its step time is the timed block's wall
time divided by the steps (the mean: the slow steps a descheduled thread causes are what an epoch pays).

- **old**: torch's defaults: no OpenMP wait variable (libgomp spins ~300,000 rounds before sleeping), one
  torch thread per core.
- **new**: :func:`mtrec.threads.apply_thread_policy` called before torch is imported, as every mtrec
  entry point does (``GOMP_SPINCOUNT=1000``, the cores' thread count).

Each is measured on quiet cores and beside a competitor this script starts: one plain Python busy loop
(``while True: pass``), started before the measuring process and killed after it. A round measures the four
cells in a rotated order; the table gives medians over the rounds. CPU-normalised: at the start of every
round (competitor off) a fixed single-thread reference loop is timed; each step time of the round is
multiplied by (median reference / this round's reference), so a round on a slower-running machine (frequency,
steal, a stray process) does not count as slower training.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from machine import load_average, publish, run_header

SECTION = "## A shared machine: training beside a busy process (issue 12 §2)"
NOTES_MARK = "<!-- notes below this line are kept by benchmarks/contention.py --write -->"
POLICIES = ("old", "new")
LOADS = ("quiet", "busy")
WAIT_VARIABLES = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "OMP_NUM_THREADS", "KMP_BLOCKTIME")


# ---- the measuring process -----------------------------------------------------------------------
def child(policy: str, steps: int, warmup: int) -> dict:
    """Step time of default ``mmoe`` on Census in this (fresh) process under ``policy``."""
    if policy == "new":
        from mtrec.threads import apply_thread_policy

        apply_thread_policy()  # before torch is imported, as mtrec's entry points do
    import resource

    import torch

    from mtrec.balancing.fixed import Fixed
    from mtrec.data.store import load_store
    from mtrec.datasets import dataset_schema_path
    from mtrec.models.base import build_model
    from mtrec.schema import load_schema
    from mtrec.threads import current_policy
    from mtrec.train.trainer import TrainConfig, Trainer, seed_everything

    store = load_store(load_schema(dataset_schema_path("census")))
    seed_everything(0)
    model = build_model("mmoe", store.layout, {})
    config = TrainConfig(progress=False, seed=0)
    trainer = Trainer(model, Fixed(store.layout.task_names), config)
    generator = torch.Generator().manual_seed(0)
    train = store.splits["train"]
    trainer._train_epoch(train.slice(0, warmup * config.batch_size), 0, generator)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu0, start = usage.ru_utime + usage.ru_stime, time.perf_counter()
    trainer._train_epoch(train.slice(0, steps * config.batch_size), 1, generator)
    wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    state = current_policy()
    return {
        "step_ms": 1000 * wall / steps,
        "cpu_ms": 1000 * (usage.ru_utime + usage.ru_stime - cpu0) / steps,
        "threads": state.threads,
        "runtime": state.runtime,
        "wait": state.wait if policy == "new" else "torch's default",
    }


# ---- the driver ----------------------------------------------------------------------------------
def reference_seconds(n: int = 3_000_000) -> float:
    """Wall time of a fixed single-thread loop: how fast one core runs right now."""
    start = time.perf_counter()
    total = 0
    for i in range(n):
        total += i & 7
    return time.perf_counter() - start


def measure(policy: str, load: str, steps: int, warmup: int, spin: int | None = None) -> dict:
    """One measuring process, with a busy-loop competitor beside it when ``load == "busy"``; ``spin``: the
    new policy with this ``GOMP_SPINCOUNT`` instead of mtrec's (the policy keeps a value the user set)."""
    env = {k: v for k, v in os.environ.items() if k not in WAIT_VARIABLES}
    if policy == "new" and spin is not None:
        env["GOMP_SPINCOUNT"] = str(spin)
    competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load == "busy" else None
    try:
        done = subprocess.run(
            [sys.executable, __file__, "--child", policy, "--steps", str(steps), "--warmup", str(warmup)],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    if done.returncode != 0:
        raise SystemExit(f"measuring process failed ({policy}, {load}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def render(result: dict) -> str:
    cells = result["cells"]
    med = {key: statistics.median(v["norm"]) for key, v in cells.items()}
    raw = {key: statistics.median(v["raw"]) for key, v in cells.items()}
    cpu = {key: statistics.median(v["cpu"]) for key, v in cells.items()}
    ratio = {p: statistics.median(cells[f"{p}/busy"]["ratio"]) for p in POLICIES}
    fmt = lambda xs: ", ".join(f"{x:.1f}" for x in xs)  # noqa: E731
    info = result["info"]
    lines = [
        f"Machine: {result['nproc']} CPU cores ({result['cpu']}), torch {result['torch']}, Python "
        f"{platform.python_version()}; OpenMP runtime {info['new']['runtime']}.",
        f"Command: `{result['command']}` ({result['date']}), {result['rounds']} interleaved rounds, each "
        f"{result['warmup']} warm-up + {result['steps']} timed steps of `mmoe` (default options) on Census, batch "
        f"1024, per cell. Load average (1/5/15 min) before: {result['load_before']}; after: {result['load_after']}.",
        "",
        f"- **old**: torch's defaults ({info['old']['threads']} threads, libgomp's default wait: ~300,000 spins).",
        f"- **new**: mtrec's thread policy ({info['new']['threads']} threads, {info['new']['wait']}).",
        "- busy: beside one plain Python busy loop (`while True: pass`) started by the script.",
        "",
        "| policy | cores | step ms (CPU-normalised), per round | median | raw median | CPU ms / step | busy / quiet |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for p in POLICIES:
        for load in LOADS:
            key = f"{p}/{load}"
            ratio_cell = f"**{ratio[p]:.2f}x**" if load == "busy" else ""
            lines.append(
                f"| {p} | {load} | {fmt(cells[key]['norm'])} | **{med[key]:.1f}** | {raw[key]:.1f} | "
                f"{cpu[key]:.1f} | {ratio_cell} |"
            )
    quiet_change = med["new/quiet"] / med["old/quiet"] - 1
    lines += [
        "",
        f"new against old: quiet **{quiet_change:+.1%}** step time; beside the busy loop "
        f"**{med['old/busy'] / med['new/busy']:.2f}x** faster. busy / quiet is the median over rounds of "
        "each round's ratio. The reference loop took "
        f"{fmt(1000 * x for x in result['reference'])} ms per round.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (medians reported)")
    parser.add_argument("--steps", type=int, default=60, help="timed training steps per cell")
    parser.add_argument("--warmup", type=int, default=5, help="warm-up steps per cell")
    parser.add_argument("--write", action="store_true", help="update the section of BENCHMARKS.md")
    parser.add_argument("--spin", type=int, default=None, help="try the new policy with this GOMP_SPINCOUNT")
    parser.add_argument("--child", choices=POLICIES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.warmup)))
        return

    load_before = load_average()
    order = [(p, load) for p in POLICIES for load in LOADS]
    cells: dict[str, dict[str, list[float]]] = {f"{p}/{load}": {"raw": [], "cpu": []} for p, load in order}
    references: list[float] = []
    info: dict[str, dict] = {}
    per_round: list[dict[str, float]] = []
    for r in range(args.rounds):
        references.append(reference_seconds())
        times = {}
        for p, load in order[r % len(order) :] + order[: r % len(order)]:  # rotated: no cell always first
            out = measure(p, load, args.steps, args.warmup, args.spin)
            info[p] = out
            times[f"{p}/{load}"] = out["step_ms"]
            cells[f"{p}/{load}"]["cpu"].append(out["cpu_ms"])
            print(
                f"round {r + 1}: {p:3} {load:5} {out['step_ms']:7.1f} ms/step  cpu {out['cpu_ms']:6.1f} ms  "
                f"({out['threads']} threads, {out['wait']}; load {load_average()})",
                flush=True,
            )
        per_round.append(times)
    ref_median = statistics.median(references)
    for key, cell in cells.items():
        cell["raw"] = [t[key] for t in per_round]
        cell["norm"] = [t[key] * ref_median / ref for t, ref in zip(per_round, references)]
    for p in POLICIES:
        cells[f"{p}/busy"]["ratio"] = [t[f"{p}/busy"] / t[f"{p}/quiet"] for t in per_round]
    result = {
        **run_header(
            "benchmarks/contention.py",
            argv,
            load_before,
            date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            launcher="flock /tmp/mtrec-heavy.lock .venv/bin/python",
        ),
        "rounds": args.rounds,
        "steps": args.steps,
        "warmup": args.warmup,
        "cells": cells,
        "reference": references,
        "info": info,
    }
    publish(render(result), args.write, SECTION, NOTES_MARK)


if __name__ == "__main__":
    main()
