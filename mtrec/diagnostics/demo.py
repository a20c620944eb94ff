"""The Census demo: four models, one seed, test AUC per task and verdicts against single-task."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from mtrec.datasets import dataset_schema_path
from mtrec.diagnostics.verdict import compare_to_baseline
from mtrec.schema import load_schema
from mtrec.train.trainer import TrainConfig

DEMO_MODELS = ("single_task", "shared_bottom", "mmoe", "ple")


BASELINE_SEEDS = 3  # single_task runs this many seeds: their spread is the noise a change must exceed
NOISE_FACTOR = 2.0  # a one-seed change counts beyond this many baseline seed standard deviations


def run_demo(out: Path, seed: int = 0, epochs: int = 30, progress: bool | None = None) -> str:
    """Train the demo models on the embedded Census data; return the report as Markdown.

    ``single_task`` runs ``BASELINE_SEEDS`` seeds (``seed``, ``seed + 1``, ...): the spread of its test
    AUC over them is the seed-to-seed noise measured on this data, and a model's change counts only
    beyond ``NOISE_FACTOR`` times it (the other models run seed ``seed`` only, to keep the demo short).
    """
    from mtrec.train.run import train_run

    schema = load_schema(dataset_schema_path("census"))
    tasks = schema.task_names
    test_auc: dict[str, list[dict[str, float]]] = {}
    seconds: dict[str, float] = {}
    best_epoch: dict[str, int] = {}
    for model in DEMO_MODELS:
        seeds = [seed + i for i in range(BASELINE_SEEDS)] if model == "single_task" else [seed]
        for s in seeds:
            start = time.perf_counter()
            where = out / model if s == seed else out / f"{model}-seed{s}"
            result = train_run(schema, model, where, TrainConfig(seed=s, epochs=epochs, progress=progress))
            if s == seed:
                seconds[model] = time.perf_counter() - start
                best_epoch[model] = result.fit.best_epoch
            test_auc.setdefault(model, []).append({t: result.metrics["test"][t]["auc"] for t in tasks})
            print(
                f"{model} (seed {s}): "
                + ", ".join(f"{t} {test_auc[model][-1][t]:.4f}" for t in tasks)
                + f" ({time.perf_counter() - start:.0f}s)",
                flush=True,
            )
    spread = {t: statistics.stdev(r[t] for r in test_auc["single_task"]) for t in tasks}
    noise = {t: NOISE_FACTOR * spread[t] for t in tasks}
    per_seed = {m: {t: [r[t] for r in runs] for t in tasks} for m, runs in test_auc.items()}
    verdicts = compare_to_baseline(per_seed, noise=noise)
    mean = {m: {t: statistics.mean(v) for t, v in r.items()} for m, r in per_seed.items()}
    head = "| model | " + " | ".join(f"{t} AUC" for t in tasks) + " | " + " | ".join(f"Δ {t}" for t in tasks)
    lines = [
        f"Census-Income (KDD), test split, model chosen on the validation split; single_task over seeds "
        f"{seed}-{seed + BASELINE_SEEDS - 1} (mean), the other models seed {seed}.",
        "",
        head + " | verdict | best epoch | seconds |",
        "|---" * (2 * len(tasks) + 4) + "|",
    ]
    for model in DEMO_MODELS:
        aucs = " | ".join(f"{mean[model][t]:.4f}" for t in tasks)
        if model in verdicts:
            v = verdicts[model]
            deltas = " | ".join(
                f"{v['deltas'][t]:+.5f}{'' if v['changed'][t] != 'noise' else ' (noise)'}" for t in tasks
            )
            word = v["verdict"]
        else:
            deltas, word = " | ".join("baseline" for _ in tasks), "-"
        lines.append(f"| {model} | {aucs} | {deltas} | {word} | {best_epoch[model]} | {seconds[model]:.0f} |")
    lines += [
        "",
        "Noise: the seed-to-seed standard deviation of single_task's test AUC over its "
        f"{BASELINE_SEEDS} seeds, "
        + ", ".join(f"{t} {spread[t]:.5f}" for t in tasks)
        + f"; a change counts only beyond {NOISE_FACTOR:g} times it ("
        + ", ".join(f"{t} {noise[t]:.5f}" for t in tasks)
        + "), smaller ones are marked (noise).",
        "Verdicts against single_task: well-done (every task better), not-bad (none worse, at least one better),",
        "seesaw (some better, some worse), negative-transfer (none better, at least one worse; all worse is",
        "its usual case), neutral (no change beyond the noise).",
    ]
    return "\n".join(lines)
