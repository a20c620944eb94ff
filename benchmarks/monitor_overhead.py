"""Overhead of the gradient conflict monitor on `mmoe` / Census: CPU time per training step with the
monitor at its default interval against the monitor off.

Both trainers run the real training loop (`Trainer._train_epoch`, balancer `fixed`) on blocks of
``--steps`` batches of 1,024 rows, in interleaved rounds (off, on, on, off, ...); the figure per round
is the process CPU time of a block divided by its steps (the monitor's cost falls on its sampled steps
only, so a per-step median would hide it), and the result is the median over rounds of the ratio
on / off. CPU time rather than wall time: wall time on a shared 2-core machine varies by more than
the 5% being measured. One torch thread by default, so CPU time is not inflated by spinning threads.

    .venv/bin/python benchmarks/monitor_overhead.py [--rounds 8 --steps 64 --threads 1 --every 8 --scope last]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model, load_average  # noqa: E402

from mtrec.balancing import BALANCERS  # noqa: E402
from mtrec.data.store import load_store  # noqa: E402
from mtrec.datasets import dataset_schema_path  # noqa: E402
from mtrec.diagnostics.monitor import DEFAULT_EVERY, DEFAULT_SCOPE, ConflictMonitor  # noqa: E402
from mtrec.models import build_model  # noqa: E402
from mtrec.schema import load_schema  # noqa: E402
from mtrec.train.trainer import TrainConfig, Trainer, seed_everything  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=64, help="batches per block")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--every", type=int, default=DEFAULT_EVERY)
    parser.add_argument("--scope", choices=["last", "all"], default=DEFAULT_SCOPE)
    parser.add_argument("--model", default="mmoe")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    store = load_store(load_schema(dataset_schema_path("census")))
    train = store.split("train")
    block = train.slice(0, args.steps * 1024)
    trainers = {}
    for mode in ("off", "on"):
        seed_everything(0)
        model = build_model(args.model, store.layout)
        callbacks = [ConflictMonitor(args.every, args.scope)] if mode == "on" else []
        trainers[mode] = Trainer(
            model, BALANCERS.get("fixed")(model.task_names), TrainConfig(progress=False), callbacks
        )
        for cb in callbacks:
            cb.on_fit_start(trainers[mode])
    gen = torch.Generator().manual_seed(0)
    for trainer in trainers.values():  # warm-up block each
        trainer._train_epoch(block, 0, gen)
    per_step: dict[str, list[float]] = {"off": [], "on": []}
    for r in range(args.rounds):
        for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
            start = time.process_time()
            trainers[mode]._train_epoch(block, r + 1, gen)
            per_step[mode].append((time.process_time() - start) / args.steps)
    ratios = [on / off for on, off in zip(per_step["on"], per_step["off"])]
    samples = len(range(0, args.steps, args.every))
    print(f"machine: {cpu_model()}; load {load_average()}; torch {torch.__version__}, {args.threads} thread(s)")
    print(
        f"{args.model} / Census, fixed, batch 1024, blocks of {args.steps} steps x {args.rounds} rounds "
        f"({args.steps * args.rounds} steps per mode), monitor every {args.every} at scope {args.scope} ({samples} samples a block)"
    )
    print(
        f"CPU ms/step, median over rounds: off {1e3 * statistics.median(per_step['off']):.2f}, "
        f"on {1e3 * statistics.median(per_step['on']):.2f}"
    )
    print(f"overhead: median ratio {statistics.median(ratios):.4f} (rounds: {', '.join(f'{x:.3f}' for x in ratios)})")


if __name__ == "__main__":
    main()
