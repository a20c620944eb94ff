"""The ``mtrec`` command line.

User mistakes (a missing file, an unknown name, a bad column) end with one
``error: ...`` line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import torch
import typer
import yaml

from mtrec.balancing import BALANCERS
from mtrec.datasets import DATASETS, dataset_schema_path
from mtrec.errors import MtrecError
from mtrec.models import MODELS
from mtrec.schema import Schema, load_schema
from mtrec.train.trainer import TrainConfig

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Multi-task ranking: train, evaluate and compare multi-task models.",
)


def parse_options(text: Optional[str], flag: str) -> dict:
    """``"a=1,b=[64,32],c=x"`` -> ``{"a": 1, "b": [64, 32], "c": "x"}`` (values parsed as YAML)."""
    if not text:
        return {}
    items, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "[{" 
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    items.append(current)
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise MtrecError(f"{flag}: '{item}' is not key=value")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise MtrecError(f"{flag}: cannot parse the value of '{key.strip()}': {value}") from None
    return out


def parse_weights(text: Optional[str]) -> Optional[list[float]]:
    if not text:
        return None
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise MtrecError(f"--task-weights: '{text}' is not a comma-separated list of numbers") from None


def resolve_schema(schema: Optional[Path], dataset: Optional[str]) -> Schema:
    if schema is not None and dataset is not None:
        raise MtrecError("give either --schema or --dataset, not both")
    if schema is None and dataset is None:
        raise MtrecError(f"give --schema FILE or --dataset NAME (embedded: {', '.join(sorted(DATASETS))})")
    return load_schema(schema if schema is not None else dataset_schema_path(dataset))


def _set_threads(threads: Optional[int]) -> None:
    if threads:
        torch.set_num_threads(threads)


def _metrics_table(metrics: dict) -> str:
    rows = ["split  task                 " + "  ".join(f"{m:>8}" for m in ("auc", "logloss", "uauc", "mse", "mae"))]
    for split in ("valid", "test"):
        for task, values in metrics.get(split, {}).items():
            cells = []
            for m in ("auc", "logloss", "uauc", "mse", "mae"):
                v = values.get(m)
                cells.append(f"{v:8.4f}" if isinstance(v, float) else f"{'-':>8}")
            rows.append(f"{split:<6} {task:<20} " + "  ".join(cells))
    return "\n".join(rows)


@app.command()
def train(
    model: str = typer.Option(..., help="registered model name (see `mtrec models`)"),
    out: Path = typer.Option(..., help="run directory to write"),
    schema: Optional[Path] = typer.Option(None, help="dataset schema file (YAML)"),
    dataset: Optional[str] = typer.Option(None, help="embedded dataset name, e.g. census"),
    model_args: Optional[str] = typer.Option(None, help="model options, e.g. num_experts=4,expert_hidden=[64,32]"),
    balancer: str = typer.Option("fixed", help="loss balancing strategy (see `mtrec balancers`)"),
    balancer_args: Optional[str] = typer.Option(None, help="balancer options k=v,..."),
    task_weights: Optional[str] = typer.Option(None, help="fixed task weights, comma-separated in task order"),
    epochs: int = typer.Option(TrainConfig.model_fields["epochs"].default, help="maximum epochs (early stopping may end sooner)"),
    batch_size: int = typer.Option(TrainConfig.model_fields["batch_size"].default),
    lr: float = typer.Option(TrainConfig.model_fields["lr"].default),
    weight_decay: float = typer.Option(TrainConfig.model_fields["weight_decay"].default),
    patience: int = typer.Option(TrainConfig.model_fields["patience"].default),
    seed: int = typer.Option(0),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (default: torch's choice)"),
    tensorboard: bool = typer.Option(True, help="write loss and balancer curves to OUT/tensorboard"),
) -> None:
    """Train a model; write metrics.json, model.safetensors, config.json and history.json to --out."""
    from mtrec.train.run import train_run

    _set_threads(threads)
    resolved = resolve_schema(schema, dataset)
    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, patience=patience, seed=seed)
    result = train_run(
        resolved,
        model,
        out,
        config,
        model_options=parse_options(model_args, "--model-args"),
        balancer_name=balancer,
        balancer_options=parse_options(balancer_args, "--balancer-args"),
        task_weights=parse_weights(task_weights),
        tensorboard=tensorboard,
    )
    typer.echo(_metrics_table(result.metrics))
    typer.echo(f"best epoch {result.fit.best_epoch}; run written to {out}")


@app.command()
def evaluate(
    run: Path = typer.Option(..., help="run directory written by `mtrec train`"),
    schema: Optional[Path] = typer.Option(None, help="evaluate on this schema's valid/test data instead of the run's"),
) -> None:
    """Print the run's metrics on the valid and test splits as JSON."""
    from mtrec.train.run import evaluate_run

    metrics = evaluate_run(run, load_schema(schema) if schema else None)
    typer.echo(json.dumps(metrics, indent=2))


@app.command()
def predict(
    run: Path = typer.Option(..., help="run directory written by `mtrec train`"),
    input: Path = typer.Option(..., help="CSV or Parquet file with the schema's feature columns"),
    output: Path = typer.Option(..., help="CSV to write: one score column per task"),
) -> None:
    """Score a file with a trained run."""
    from mtrec.train.run import predict_file

    rows = predict_file(run, input, output)
    typer.echo(f"wrote {rows} rows to {output}")


@app.command()
def models() -> None:
    """List the registered models."""
    for name, description in MODELS.describe().items():
        typer.echo(f"{name:<20} {description}")


@app.command()
def balancers() -> None:
    """List the registered loss-balancing strategies."""
    for name, description in BALANCERS.describe().items():
        typer.echo(f"{name:<20} {description}")


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="where the four runs are written"),
    seed: int = typer.Option(0),
    epochs: int = typer.Option(TrainConfig.model_fields["epochs"].default),
    threads: Optional[int] = typer.Option(None),
) -> None:
    """Census-Income: single_task, shared_bottom, mmoe and ple, compared against single-task."""
    from mtrec.diagnostics.demo import run_demo

    _set_threads(threads)
    typer.echo(run_demo(out, seed=seed, epochs=epochs))


def main() -> None:
    """Console entry point: user errors become one line and exit code 2."""
    try:
        app()
    except MtrecError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
