"""Does the conflict monitor see task relatedness where it is known? The MMoE paper's synthetic data
(`--dataset synthetic`) at two correlations, several seeds (a seed is a data set and a training run):
the run's mean cosine between the two tasks' gradients on the shared layers, per correlation.

    .venv/bin/python benchmarks/synthetic_monitor.py [--model mmoe --seeds 5 --rows 20000 --epochs 5 --scope last]

Prints per correlation the mean +- sample std over seeds of the run-mean cosine, and the gap between the
highest and the lowest correlation in units of the larger of their seed standard deviations.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model, load_average  # noqa: E402

from mtrec.datasets import dataset_schema_path  # noqa: E402
from mtrec.diagnostics.diagnose import monitor_summary  # noqa: E402
from mtrec.schema import load_schema  # noqa: E402
from mtrec.train.run import train_run  # noqa: E402
from mtrec.train.trainer import TrainConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mmoe")
    parser.add_argument("--correlations", default="0.0,1.0")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--scope", choices=["last", "all"], default="last")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model-args", default="")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    options = {}
    for item in filter(None, args.model_args.split(";")):
        key, value = item.split("=", 1)
        options[key] = eval(value, {})  # a benchmark's own command line, e.g. num_experts=8
    cos: dict[float, list[float]] = {}
    for p in (float(x) for x in args.correlations.split(",")):
        for seed in range(args.seeds):
            schema = load_schema(dataset_schema_path("synthetic", {"correlation": p, "rows": args.rows, "seed": seed}))
            config = TrainConfig(
                epochs=args.epochs,
                patience=args.epochs,
                seed=seed,
                monitor_every=args.every,
                monitor_scope=args.scope,
                progress=False,
            )
            result = train_run(schema, args.model, None, config, model_options=options)
            summary = monitor_summary(result.fit.history)
            value = summary["pairs"]["y1~y2"]["cos_mean"]
            cos.setdefault(p, []).append(value)
            print(
                f"correlation {p:g} seed {seed}: mean cosine {value:+.4f} over {summary['samples']} samples; "
                f"test mse {result.metrics['test']['y1']['mse']:.3f} / {result.metrics['test']['y2']['mse']:.3f}",
                flush=True,
            )
    print(
        f"machine: {cpu_model()}; load {load_average()}; {args.threads} thread(s); model {args.model} {options}; "
        f"rows {args.rows}, epochs {args.epochs}, monitor every {args.every} at scope {args.scope}"
    )
    for p, values in cos.items():
        print(
            f"correlation {p:g}: mean cosine {statistics.mean(values):+.4f} +- {statistics.stdev(values):.4f} (seeds {len(values)})"
        )
    lo, hi = min(cos), max(cos)
    gap = statistics.mean(cos[hi]) - statistics.mean(cos[lo])
    noise = max(statistics.stdev(cos[hi]), statistics.stdev(cos[lo]))
    print(f"gap correlation {hi:g} - {lo:g}: {gap:+.4f} = {gap / noise:.1f} x the larger seed std ({noise:.4f})")


if __name__ == "__main__":
    main()
