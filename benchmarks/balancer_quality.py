"""Census test AUC of ``mmoe`` and ``ple`` under every balancing strategy (issue 4), by hand.

Protocol: the one of ``benchmarks/zoo_census.py`` (embedded Census, validation split carved
from train, model chosen on the mean validation AUC with patience 3 and at most 30 epochs,
batch 1024, Adam lr 1e-3, every model and strategy at its registered defaults), with seeds
0, 1, 2. The baseline is ``single_task`` under ``fixed`` with the same seeds; each row's
verdict compares its mean test AUC per task with the baseline's.

Two verdicts are given: the raw one (any difference counts) and a noise-aware one, where a
task's change counts only when it exceeds the larger of the two rows' seed standard
deviations for that task.

The runs are independent, so several worker processes can share them, one torch thread
each (two single-thread jobs use 2 cores better than one two-thread job on these small
layers): a worker claims a run by creating its file in ``WORKDIR/claims`` (an atomic
``O_EXCL`` create, so workers may start at any time), and appends each finished run as one
JSON line to its own ``WORKDIR/runs-<pid>.jsonl``. Runs already recorded are skipped, so a
stopped measurement resumes (delete ``WORKDIR/claims`` first). The runs are ordered
seed-major (every row's seed 0 first), so a cut-short measurement still covers every row::

    .venv/bin/python benchmarks/balancer_quality.py --workdir runs/ &
    .venv/bin/python benchmarks/balancer_quality.py --workdir runs/ &
    .venv/bin/python benchmarks/balancer_quality.py --workdir runs/ --render --write
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from machine import cpu_model, load_average, publish
from zoo_census import NOTES_MARK, TASKS, mean_std, run_one, task_aucs, verdict_beyond_noise

from mtrec.balancing import BALANCERS
from mtrec.data.store import load_store
from mtrec.datasets import dataset_schema_path
from mtrec.diagnostics.verdict import verdict
from mtrec.schema import load_schema
from mtrec.train.trainer import TrainConfig

SECTION = "## Census quality per balancer (issue 4)"
MODELS = ["mmoe", "ple"]
BASELINE = ("single_task", "fixed")


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``pcgrad[level=repr]`` -> ``("pcgrad", {"level": "repr"})``: a balancer with options, as one row label."""
    name, _, rest = spec.partition("[")
    options = dict(kv.split("=", 1) for kv in rest.rstrip("]").split(";") if kv)
    return name, options


def jobs(models: list[str], balancers: list[str], seeds: list[int]) -> list[tuple[str, str, int]]:
    """Every (model, balancer, seed) run, seed-major, the single-task baseline first in each seed."""
    rows = [BASELINE] + [(m, b) for m in models for b in balancers]
    return [(m, b, s) for s in seeds for m, b in rows]


def load_runs(workdir: Path) -> list[dict]:
    runs = []
    for path in sorted(workdir.glob("runs-*.jsonl")):
        runs += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return runs


def claim(workdir: Path, job: tuple[str, str, int]) -> bool:
    """True if this process is the first to take ``job`` (atomic create)."""
    (workdir / "claims").mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(workdir / "claims" / "{}-{}-{}".format(*job), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def render(runs: list[dict], models: list[str], balancers: list[str], meta: str) -> str:
    base = task_aucs(runs, *BASELINE)
    lines = [
        meta,
        "",
        "| model | balancer | seeds | income AUC | never_married AUC | Δ income | Δ never_married | verdict | verdict beyond seed std |",
        "|---|---|---:|---:|---:|---:|---:|---|---|",
        f"| `{BASELINE[0]}` | `{BASELINE[1]}` | {len(base[TASKS[0]])} | {mean_std(base[TASKS[0]])} | "
        f"{mean_std(base[TASKS[1]])} | | | baseline | baseline |",
    ]
    counts: dict[str, dict[str, int]] = {}
    for model in models:
        for balancer in balancers:
            row = task_aucs(runs, model, balancer)
            if not row[TASKS[0]]:
                continue
            deltas, aware = verdict_beyond_noise(row, base)
            raw = verdict(deltas)
            counts.setdefault(model, {}).setdefault(aware, 0)
            counts[model][aware] += 1
            lines.append(
                f"| `{model}` | `{balancer}` | {len(row[TASKS[0]])} | {mean_std(row[TASKS[0]])} | "
                f"{mean_std(row[TASKS[1]])} | {deltas[0]:+.5f} | {deltas[1]:+.5f} | {raw} | {aware} |"
            )
    lines.append("")
    for model, c in counts.items():
        lines.append(
            f"Noise-aware verdicts for `{model}`: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())) + "."
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument(
        "--balancers",
        default=",".join(BALANCERS.names()),
        help="comma-separated; options in brackets, ';'-separated: pcgrad[level=repr]",
    )
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=TrainConfig.model_fields["epochs"].default)
    parser.add_argument("--patience", type=int, default=TrainConfig.model_fields["patience"].default)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--workdir", type=Path, required=True, help="claims and runs of every worker")
    parser.add_argument("--render", action="store_true", help="train nothing: print the table of the runs so far")
    parser.add_argument("--write", action="store_true", help="update this section of BENCHMARKS.md")
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    balancers = [b for b in args.balancers.split(",") if b]
    seeds = [int(s) for s in args.seeds.split(",")]

    if not args.render:
        torch.set_num_threads(args.threads)
        store = load_store(load_schema(dataset_schema_path("census")))
        config = TrainConfig(epochs=args.epochs, patience=args.patience, progress=False)
        done = {(r["model"], r["balancer"], r["seed"]) for r in load_runs(args.workdir)}
        out = args.workdir / f"runs-{os.getpid()}.jsonl"
        for model, balancer, seed in jobs(models, balancers, seeds):
            if (model, balancer, seed) in done or not claim(args.workdir, (model, balancer, seed)):
                continue
            name, options = parse_spec(balancer)
            record, _ = run_one(model, seed, store, config, balancer=name, balancer_options=options)
            record["balancer"] = balancer  # the row label, options included
            record.update(load=load_average(), threads=args.threads, date=time.strftime("%Y-%m-%d"))
            with out.open("a") as f:
                f.write(json.dumps(record) + "\n")
            auc = record["test_auc"]
            print(
                f"{model:12s} {balancer:13s} seed {seed}: income {auc['income']:.4f} never_married "
                f"{auc['never_married']:.4f} best epoch {record['best_epoch']}/{record['epochs_run']} "
                f"{record['train_seconds']:.0f} s (load {record['load']})",
                flush=True,
            )
        return

    runs = load_runs(args.workdir)
    loads = sorted(float(r["load"].split(" / ")[0]) for r in runs)
    seconds = sorted(r["train_seconds"] for r in runs)
    meta = (
        f"Measured {runs[0]['date']} with `.venv/bin/python benchmarks/balancer_quality.py --workdir DIR` "
        f"(two workers side by side, {runs[0]['threads']} torch thread each), rendered with "
        f"`{' '.join(['benchmarks/balancer_quality.py', *(argv if argv is not None else sys.argv[1:])])}`, "
        f"on {cpu_model()}, torch {torch.__version__}. {len(runs)} runs; training time per run "
        f"{seconds[0]:.0f}-{seconds[-1]:.0f} s (median {statistics.median(seconds):.0f} s); 1-minute load average "
        f"after each run {loads[0]:.1f}-{loads[-1]:.1f}.\n\n"
        "Protocol: embedded Census, validation split carved from train, each run keeps its best validation "
        "epoch (mean validation AUC, patience 3, at most 30 epochs), batch 1024, Adam lr 1e-3, unit task weights, "
        "every model and strategy at its registered defaults except the options a row names in brackets "
        "(`staged`: one task per stage, in schema order, one epoch per stage). Test AUC: mean ± sample std over the seeds. Δ: difference of the means from the "
        "`single_task` baseline. *verdict*: any difference counts; *verdict beyond seed std*: a task's change "
        "counts only when it is larger than the larger seed std of the two rows."
    )
    publish(render(runs, models, balancers, meta), args.write, SECTION, NOTES_MARK)


if __name__ == "__main__":
    main()
