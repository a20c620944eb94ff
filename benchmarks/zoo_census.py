"""Census test AUC and forward latency of every implicit task-relation model (issue 3).

Run by hand (never by the tests); the full table trains 15 models x 3 seeds on the
whole Census train split and takes hours on 2 cores::

    .venv/bin/python benchmarks/zoo_census.py                     # print the table
    .venv/bin/python benchmarks/zoo_census.py --write             # also update BENCHMARKS.md
    .venv/bin/python benchmarks/zoo_census.py --models adatt --seeds 0 --epochs 1   # a quick check

Training and latency can be split, so that two single-thread training jobs share the 2 cores
and latency is still timed on quiet cores::

    .venv/bin/python benchmarks/zoo_census.py --threads 1 --no-latency --json runs.json
    .venv/bin/python benchmarks/zoo_census.py --from-json runs.json --write   # latency only, then the table

Protocol, the same for every model:

- data: the embedded Census data set (income > 50K and never married, as in the MMoE
  paper), its fixed validation fraction carved from train, the official test file;
- each model with its registered defaults (``mtrec models``; every ``Config`` documents
  them), fixed unit task weights, Adam lr 1e-3, batch 1024, at most ``--epochs`` epochs
  with early stopping on the mean validation AUC (patience 3): the weights of the best
  validation epoch are kept, so the model is chosen on validation and the test split is
  only read once, at the end;
- seeds 0, 1, 2 (seed everything: initialisation and shuffling); the table gives the
  mean and the sample standard deviation (n - 1) of the test AUC over the seeds;
- latency: ``model(batch)`` (embedding lookup included) in eval mode under
  ``torch.inference_mode`` for one batch of 512 test rows, on 2 threads, after
  ``--warmup`` calls; the median of ``--latency-runs`` timed calls, on a model built with
  seed 0 (trained or not: the work of a forward pass does not depend on the weights).

The machine is shared: the section records the load average before and after, so a
reader can tell whether timings were taken on busy cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from machine import load_average, publish, run_header

from mtrec.balancing import BALANCERS
from mtrec.data.store import Store, load_store
from mtrec.datasets import dataset_schema_path
from mtrec.diagnostics.verdict import compare_to_baseline
from mtrec.models import build_model
from mtrec.models.base import MultiTaskModel
from mtrec.schema import load_schema
from mtrec.train.trainer import TrainConfig, Trainer, seed_everything

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Census quality per model (issue 3)"
NOTES_MARK = "Reading (written by hand"  # the hand-written notes after the table, kept by --write
MODELS = [
    "single_task",
    "shared_bottom",
    "omoe",
    "mmoe",
    "cgc",
    "ple",
    "soft_sharing",
    "asymmetric_sharing",
    "customized_sharing",
    "cross_stitch",
    "sluice",
    "ml_mmoe",
    "snr_trans",
    "snr_aver",
    "adatt",
]
TASKS = ["income", "never_married"]
THREADS = 2
LATENCY_BATCH = 512


@torch.inference_mode()
def forward_latency_ms(model: MultiTaskModel, store: Store, warmup: int, runs: int) -> float:
    """Median wall time of one eval-mode forward pass over ``LATENCY_BATCH`` test rows, in ms."""
    model.eval()
    batch = store.split("test").slice(0, LATENCY_BATCH)
    for _ in range(warmup):
        model(batch)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        model(batch)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def run_one(
    name: str,
    seed: int,
    store: Store,
    config: TrainConfig,
    balancer: str = "fixed",
    balancer_options: dict | None = None,
) -> tuple[dict, MultiTaskModel]:
    """Train ``name`` with ``seed`` (best validation epoch kept) and evaluate it on test."""
    seed_everything(seed)
    model = build_model(name, store.layout)
    strategy = BALANCERS.get(balancer)(model.task_names, **(balancer_options or {}))
    trainer = Trainer(model, strategy, config.model_copy(update={"seed": seed}))
    start = time.perf_counter()
    fit = trainer.fit(store.split("train"), store.split("valid"))
    seconds = time.perf_counter() - start
    test = trainer.evaluate(store.split("test"))
    record = {
        "model": name,
        "balancer": balancer,
        "seed": seed,
        "best_epoch": fit.best_epoch,
        "epochs_run": len(fit.history),
        "valid_score": fit.best_score,
        "test_auc": {t: test[t]["auc"] for t in TASKS},
        "train_seconds": seconds,
        "params": sum(p.numel() for p in model.parameters()),
    }
    return record, model


def mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def render(result: dict) -> str:
    seeds = result["seeds"]
    lines = [
        f"Measured {result['date']} with `{result['command']}` on {result['cpu']} ({result['nproc']} cores, "
        f"{THREADS} torch threads), torch {result['torch']}. Load average (1/5/15 min) before: "
        f"{result['load_before']}, after: {result['load_after']}.",
        "",
        (
            f"Test AUC: mean ± sample std over seeds {', '.join(map(str, seeds))}"
            if len(seeds) > 1
            else f"Test AUC of seed {seeds[0]} only"
        )
        + "; each run keeps its best "
        f"validation epoch (mean validation AUC, patience {result['patience']}, at most {result['epochs']} epochs, "
        f"batch {result['batch_size']}, Adam lr {result['lr']}, unit task weights, every model at its registered "
        f"defaults; training on {result.get('train_threads', THREADS)} torch thread(s) per run). Latency: median of "
        f"{result['latency_runs']} eval forward passes of {LATENCY_BATCH} rows (embedding included) after "
        f"{result['warmup']} warm-up calls, on {THREADS} threads, measured after training "
        f"(load average then: {result.get('load_latency', result['load_after'])}).",
        "",
        "Verdict against `single_task` (the same protocol and seeds): a task's change counts only when it is "
        "larger than the larger seed standard deviation of the two models (`verdict_beyond_noise`).",
        "",
        "| model | params | income AUC | never_married AUC | mean AUC | verdict vs single_task | best epochs | forward 512 rows (ms) |",
        "|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    aucs = {name: task_aucs(result["runs"], name) for name in result["models"]}
    for name in result["models"]:
        runs = [r for r in result["runs"] if r["model"] == name]
        income, married = aucs[name]["income"], aucs[name]["never_married"]
        mean = [(a + b) / 2 for a, b in zip(income, married)]
        epochs = ", ".join(str(r["best_epoch"]) for r in runs)
        word = (
            "baseline"
            if name == "single_task" or "single_task" not in aucs
            else verdict_beyond_noise(aucs[name], aucs["single_task"])[1]
        )
        lines.append(
            f"| `{name}` | {runs[0]['params']:,} | {mean_std(income)} | {mean_std(married)} | {mean_std(mean)} "
            f"| {word} | {epochs} | {result['latency_ms'][name]:.2f} |"
        )
    return "\n".join(lines)


def task_aucs(runs: list[dict], model: str, balancer: str | None = None) -> dict[str, list[float]]:
    """``{task: [test AUC of every seed]}`` of one model (and balancer, when given)."""
    chosen = [r for r in runs if r["model"] == model and (balancer is None or r.get("balancer", "fixed") == balancer)]
    return {t: [r["test_auc"][t] for r in chosen] for t in TASKS}


def verdict_beyond_noise(row: dict[str, list[float]], base: dict[str, list[float]]) -> tuple[list[float], str]:
    """Per-task differences of the means from ``base``, and the verdict when a difference counts only
    beyond the larger seed standard deviation of the two (a change inside the seed noise is none)."""
    res = compare_to_baseline({"single_task": {t: base[t] for t in TASKS}, "model": {t: row[t] for t in TASKS}})[
        "model"
    ]
    return [res["deltas"][t] for t in TASKS], res["verdict"]


def train_all(
    models: list[str], seeds: list[int], store: Store, args: argparse.Namespace, argv: list[str] | None
) -> dict:
    """Train every model with every seed; the records and the settings, as one JSON-able dict."""
    torch.set_num_threads(args.threads)
    config = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, patience=args.patience, progress=False
    )
    load_before = load_average()
    runs = []
    for name in models:
        for seed in seeds:
            record, _ = run_one(name, seed, store, config)
            runs.append(record)
            auc = record["test_auc"]
            print(
                f"{name:20s} seed {seed}: income {auc['income']:.4f}  never_married {auc['never_married']:.4f}  "
                f"best epoch {record['best_epoch']}/{record['epochs_run']}  {record['train_seconds']:.0f} s  "
                f"(load {load_average()})",
                flush=True,
            )
    return {
        **run_header("benchmarks/zoo_census.py", argv, load_before, date=time.strftime("%Y-%m-%d")),
        "train_threads": args.threads,
        "models": models,
        "seeds": seeds,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "patience": args.patience,
        "runs": runs,
        "latency_ms": {},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated model names")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--epochs", type=int, default=TrainConfig.model_fields["epochs"].default)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.model_fields["batch_size"].default)
    parser.add_argument("--lr", type=float, default=TrainConfig.model_fields["lr"].default)
    parser.add_argument("--patience", type=int, default=TrainConfig.model_fields["patience"].default)
    parser.add_argument("--warmup", type=int, default=10, help="untimed forward passes before timing")
    parser.add_argument("--latency-runs", type=int, default=50, help="timed forward passes (median reported)")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch threads while training")
    parser.add_argument("--no-latency", action="store_true", help="train only; time the forward passes later")
    parser.add_argument(
        "--from-json",
        type=Path,
        nargs="+",
        default=None,
        help="skip training: read (and merge) the runs of these files",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write every run's record to this file")
    parser.add_argument("--write", action="store_true", help="update this section of BENCHMARKS.md")
    args = parser.parse_args(argv)
    if args.write and args.no_latency:
        parser.error("--write needs the latency column: drop --no-latency, or use --from-json later")

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    store = load_store(load_schema(dataset_schema_path("census")))
    if args.from_json is not None:
        parts = [json.loads(path.read_text()) for path in args.from_json]
        result = parts[0]
        for part in parts[1:]:  # e.g. two single-thread jobs that each trained half of the models
            result["models"] += [m for m in part["models"] if m not in result["models"]]
            result["runs"] += part["runs"]
            result["load_after"] += f"; {part['load_after']}"
            result["command"] += f"` and `{part['command']}"
        result["models"] = [m for m in MODELS if m in result["models"]] + [
            m for m in result["models"] if m not in MODELS
        ]
    else:
        result = train_all(models, seeds, store, args, argv)
        if args.json is not None:  # saved before timing, so a slow latency pass loses nothing
            args.json.write_text(json.dumps(result, indent=2))
    if not args.no_latency:
        torch.set_num_threads(THREADS)
        result["load_latency"] = load_average()
        for name in result["models"]:
            seed_everything(result["seeds"][0])
            result["latency_ms"][name] = forward_latency_ms(
                build_model(name, store.layout), store, args.warmup, args.latency_runs
            )
            print(f"{name:20s} forward {LATENCY_BATCH} rows: {result['latency_ms'][name]:.2f} ms", flush=True)
        result["warmup"], result["latency_runs"] = args.warmup, args.latency_runs
        result["load_latency"] += f" (before) / {load_average()} (after)"
    if args.no_latency:
        return
    table = render(result)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    publish(table, args.write, SECTION, NOTES_MARK)


if __name__ == "__main__":
    main()
