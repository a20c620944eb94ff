"""The ``mtrec`` command line.

User mistakes (a missing file, an unknown name, a bad column) end with one
``error: ...`` line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer
import yaml

from mtrec import __version__
from mtrec.config import RunConfig, build_run_config
from mtrec.datasets import DATASETS, dataset_schema_path
from mtrec.errors import MtrecError
from mtrec.serve import SPIN_MODES
from mtrec.threads import prepare_openmp
from mtrec.train.options import TrainConfig

if TYPE_CHECKING:  # pragma: no cover
    from mtrec.schema import Schema
    from mtrec.threads import ThreadPolicy

# Start-up: `mtrec --help`, `mtrec COMMAND --help` and argument errors must not pay for torch or polars
# (about 2-4 s). Module-level imports here stay light (typer, yaml, pydantic configs); each command
# imports what it runs inside its body. tests/test_startup.py checks it; benchmarks/startup.py times it.

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Multi-task ranking: train, evaluate and compare multi-task models.",
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"mtrec {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", is_eager=True, callback=_print_version, help="print the version and exit"
    ),
) -> None:
    """Multi-task ranking: train, evaluate and compare multi-task models."""


def parse_options(text: str | None, flag: str) -> dict:
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


def parse_weights(text: str | None) -> list[float] | None:
    if not text:
        return None
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise MtrecError(f"--task-weights: '{text}' is not a comma-separated list of numbers") from None


def resolve_schema(
    schema: Path | None, dataset: str | None, dataset_args: str | None = None, data_dir: Path | None = None
) -> Schema:
    if data_dir is not None and schema is None:
        raise MtrecError("--data-dir goes with --schema (it is where the schema's data files are)")
    if schema is not None and dataset is not None:
        raise MtrecError("give either --schema or --dataset, not both")
    if schema is None and dataset is None:
        raise MtrecError(f"give --schema FILE or --dataset NAME (embedded: {', '.join(sorted(DATASETS))})")
    if dataset_args and dataset is None:
        raise MtrecError("--dataset-args goes with --dataset (a schema file has no arguments)")
    from mtrec.schema import load_schema

    if schema is not None:
        return load_schema(schema, data_dir=data_dir)
    assert dataset is not None  # one of the two was checked above
    return load_schema(dataset_schema_path(dataset, parse_options(dataset_args, "--dataset-args")))


def _set_threads(threads: int | None) -> ThreadPolicy:
    """Apply mtrec's thread policy (:mod:`mtrec.threads`) in this process; ``--threads`` sets the count."""
    if threads is not None and threads < 1:
        raise MtrecError(f"--threads: {threads} is not a thread count (at least 1)")
    from mtrec.threads import apply_thread_policy

    return apply_thread_policy(threads)


def train_config(flags: dict[str, object], **fixed: object) -> TrainConfig:
    """A :class:`TrainConfig` from command-line values (``flags``: field -> value); a value out of range
    is one error naming its flag and the allowed range, checked before any data is read."""
    from pydantic import ValidationError

    try:
        return TrainConfig(**flags, **fixed)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            field = str(e["loc"][0]) if e["loc"] else ""
            flag = f"--{field.replace('_', '-')}" if field in flags else field
            value = flags.get(field, e.get("input"))
            problems.append(f"{flag}: {value!r} is not allowed ({e['msg'].removeprefix('Value error, ').lower()})")
        raise MtrecError("; ".join(problems)) from None


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


def _help(field: str, extra: str = "") -> str:
    """Help text of a ``mtrec train`` flag, from the :class:`RunConfig` field it sets (its description and
    default live there only)."""
    info = RunConfig.model_fields[field]
    default = info.get_default(call_default_factory=True)
    shown = f" [default: {default}]" if default not in (None, {}, []) else ""
    return f"{info.description}{extra}{shown}"


@app.command()
def train(
    ctx: typer.Context,
    config: Path | None = typer.Option(
        None,
        help="run config file (YAML, or JSON; a finished run's config.json reruns that run); flags given "
        "here override its values",
    ),
    out: Path | None = typer.Option(None, help="run directory to write (required)"),
    model: str | None = typer.Option(None, help=_help("model")),
    schema: Path | None = typer.Option(None, help=_help("schema_file")),
    data_dir: Path | None = typer.Option(None, help=_help("data_dir")),
    dataset: str | None = typer.Option(None, help=_help("dataset")),
    dataset_args: str | None = typer.Option(None, help=_help("dataset_args")),
    model_args: str | None = typer.Option(None, help=_help("model_args", " (replaces the config file's)")),
    balancer: str | None = typer.Option(None, help=_help("balancer")),
    balancer_args: str | None = typer.Option(None, help=_help("balancer_args")),
    task_weights: str | None = typer.Option(None, help=_help("task_weights", ", comma-separated")),
    epochs: int | None = typer.Option(None, help=_help("epochs")),
    batch_size: int | None = typer.Option(None, help=_help("batch_size")),
    lr: float | None = typer.Option(None, help=_help("lr")),
    weight_decay: float | None = typer.Option(None, help=_help("weight_decay")),
    patience: int | None = typer.Option(None, help=_help("patience")),
    seed: int | None = typer.Option(None, help=_help("seed")),
    eval_batch_size: int | None = typer.Option(None, help=_help("eval_batch_size")),
    progress: bool | None = typer.Option(None, "--progress/--no-progress", help=_help("progress")),
    select_by: str | None = typer.Option(None, help=_help("select_by")),
    monitor_every: int | None = typer.Option(None, help=_help("monitor_every")),
    monitor_scope: str | None = typer.Option(None, help=_help("monitor_scope")),
    tensorboard: bool | None = typer.Option(None, "--tensorboard/--no-tensorboard", help=_help("tensorboard")),
    device: str | None = typer.Option(None, help=_help("device")),
    bf16: bool | None = typer.Option(None, "--bf16/--no-bf16", help=_help("bf16")),
    threads: int | None = typer.Option(
        None, help="torch CPU threads per process (default: OMP_NUM_THREADS, else cores / processes)"
    ),
    nproc_per_node: int | None = typer.Option(
        None,
        help="train data-parallel on N processes of this machine: launches `torchrun --nproc-per-node N "
        "-m mtrec train` with the other arguments (--batch-size is then per process)",
    ),
    overwrite: bool = typer.Option(False, help="replace the run already in --out (its files are removed first)"),
    resume: bool = typer.Option(
        False, help="continue the interrupted run in --out from its checkpoint (same arguments)"
    ),
    checkpoint_every: int = typer.Option(
        0, help="also checkpoint every N steps within an epoch (0: after each epoch only)"
    ),
) -> None:
    """Train a model; write metrics.json, model.safetensors, config.json and history.json to --out
    (checkpoint.pt after every epoch while training: --resume continues an interrupted run).
    Options come from --config FILE, then from the flags given, then from the defaults."""
    if checkpoint_every < 0:
        raise MtrecError(f"--checkpoint-every: {checkpoint_every} is negative (0: after each epoch only)")
    given = {name: value for name, value in ctx.params.items() if value is not None}
    parsers = {
        "dataset_args": lambda v: parse_options(v, "--dataset-args"),
        "model_args": lambda v: parse_options(v, "--model-args"),
        "balancer_args": lambda v: parse_options(v, "--balancer-args"),
        "task_weights": parse_weights,
        "data_dir": lambda v: v.absolute(),  # a flag's path is relative to the working directory
    }
    overrides = {
        name: parsers.get(name, lambda v: v)(value)
        for name, value in given.items()
        if name in RunConfig.model_fields or name == "schema"
    }
    run = build_run_config(config, overrides)  # checked before any data is read
    if out is None:
        raise MtrecError("--out: missing; give the run directory to write")
    if nproc_per_node is not None:
        if nproc_per_node < 1:
            raise MtrecError(f"--nproc-per-node: {nproc_per_node} is not a process count (at least 1)")
        if os.environ.get("WORLD_SIZE", "1") not in ("", "1"):
            raise MtrecError(
                f"--nproc-per-node: this process is already one of the {os.environ['WORLD_SIZE']} processes "
                "torchrun started; drop --nproc-per-node"
            )
        if nproc_per_node > 1:
            from mtrec.train.distributed import launch

            code = launch(nproc_per_node, ["train", *_given_arguments(ctx, skip={"nproc_per_node"})], typer.echo)
            if code:
                raise typer.Exit(code)
            return
    policy = _set_threads(threads)
    if os.environ.get("RANK", "0") in ("", "0"):  # the same on every rank of a data-parallel run
        typer.echo(policy.describe())
    resolved = run.resolve_schema()
    from mtrec.config import train_from_config  # torch: only once the arguments are known to be good

    result = train_from_config(
        run,
        out,
        resolved,
        overwrite=overwrite,
        resume=resume,
        checkpoint_every=checkpoint_every,
        threads=threads,
        echo=typer.echo,
    )
    if os.environ.get("RANK", "0") not in ("", "0"):
        return  # a data-parallel run: rank 0 reports
    typer.echo(_metrics_table(result.metrics))
    typer.echo(f"best epoch {result.fit.best_epoch}; run written to {out}")


def _given_arguments(ctx: typer.Context, skip: set[str]) -> list[str]:
    """The options given on the command line (not their defaults), as arguments again: what
    ``--nproc-per-node`` passes on to the processes it launches."""
    argv: list[str] = []
    for param in ctx.command.params:
        name = param.name
        source = ctx.get_parameter_source(name) if name is not None else None
        if name is None or name in skip or source is None or source.name != "COMMANDLINE":
            continue
        value = ctx.params[name]
        if getattr(param, "is_flag", False):
            secondary = getattr(param, "secondary_opts", [])
            if value:
                argv.append(param.opts[0])
            elif secondary:
                argv.append(secondary[0])
        else:
            argv += [param.opts[0], str(value)]
    return argv


@app.command()
def relate(
    schema: Path | None = typer.Option(None, help="dataset schema file (YAML)"),
    data_dir: Path | None = typer.Option(None, help=_help("data_dir")),
    dataset: str | None = typer.Option(None, help="embedded dataset name, e.g. census"),
    dataset_args: str | None = typer.Option(None, help="arguments of the embedded dataset"),
    epochs: int = typer.Option(3, min=1, help="epochs of every probe training"),
    seeds: int = typer.Option(2, min=2, help="seeds of the shared_bottom vs single_task comparison"),
    out: Path | None = typer.Option(None, help="directory to write relate.json into"),
    threads: int | None = typer.Option(None, min=1, help="torch CPU threads"),
) -> None:
    """Are these tasks related? Label correlation, train-one-watch-the-other probes, shared-bottom vs single-task."""
    from mtrec.diagnostics.relate import relate as run_relate
    from mtrec.files import write_json_atomic

    _set_threads(threads)
    result = run_relate(resolve_schema(schema, dataset, dataset_args, data_dir), epochs=epochs, seeds=seeds)
    for line in result["findings"]:
        typer.echo(line)
    if out is not None:
        write_json_atomic(out / "relate.json", result)
        typer.echo(f"written to {out / 'relate.json'}")


@app.command()
def diagnose(run: Path = typer.Option(..., help="run directory written by `mtrec train`")) -> None:
    """What the gradient conflict monitor and the gates say about a finished run; writes RUN/diagnostics.json."""
    from mtrec.diagnostics.diagnose import diagnose_run

    result = diagnose_run(run)
    for line in result["findings"]:
        typer.echo(line)
    typer.echo(f"written to {run / 'diagnostics.json'}")


@app.command()
def bench(
    grid: Path = typer.Argument(..., help="grid file (YAML): datasets x models x balancers x seeds + train options"),
    out: Path = typer.Option(..., help="bench directory: cells/<cell>/ run directories, report.html, report.md"),
    workers: int | None = typer.Option(None, help="worker processes (default: CPU cores / --threads)"),
    threads: int | None = typer.Option(
        None, help="torch threads per worker (default: CPU cores / --workers); a resumed grid must use the same"
    ),
) -> None:
    """Train every cell of a grid (resuming an interrupted one: finished cells are kept) and write
    OUT/report.html (self-contained) and OUT/report.md."""
    from mtrec.bench import run_grid

    result = run_grid(grid, out, workers=workers, threads=threads, echo=typer.echo)
    if result["failed"]:
        typer.echo(f"{len(result['failed'])} cell(s) failed (see the report): {', '.join(result['failed'])}", err=True)


OOV_WARNING = 0.05  # share of out-of-vocabulary ids above which predict/evaluate warn


def _warn_oov(rates: dict[str, float], where: str) -> None:
    """One ``warning:`` line on stderr per feature whose out-of-vocabulary rate exceeds OOV_WARNING:
    ids the model never saw (a new id space, or ids written in another form) all get one embedding."""
    for name, rate in rates.items():
        if rate > OOV_WARNING:
            typer.echo(
                f"warning: feature {name}: {rate:.1%} of the ids in {where} are out of vocabulary "
                f"(not seen in training; above {OOV_WARNING:.0%})",
                err=True,
            )


@app.command()
def evaluate(
    run: Path = typer.Option(..., help="run directory written by `mtrec train`"),
    schema: Path | None = typer.Option(None, help="evaluate on this schema's valid/test data instead of the run's"),
    data_dir: Path | None = typer.Option(None, help=_help("data_dir")),
) -> None:
    """Print the run's metrics on the valid and test splits as JSON."""
    from mtrec.schema import load_schema
    from mtrec.train.run import evaluate_run

    if data_dir is not None and schema is None:
        raise MtrecError("--data-dir goes with --schema (it is where the schema's data files are)")
    metrics = evaluate_run(run, load_schema(schema, data_dir=data_dir) if schema else None)
    for split, rates in metrics.get("oov_rate", {}).items():
        _warn_oov(rates, f"the {split} split")
    typer.echo(json.dumps(metrics, indent=2))


@app.command()
def predict(
    run: Path = typer.Option(..., help="run directory written by `mtrec train`"),
    input: Path = typer.Option(..., help="CSV or Parquet file with the schema's feature columns"),
    output: Path = typer.Option(..., help="file to write, .csv, .csv.gz or .parquet: one score column per task"),
    fusion: Path | None = typer.Option(None, help="fusion spec to apply (default: the run's fusion.yaml, if any)"),
    backend: str = typer.Option(
        "torch",
        help="torch, or onnx: ONNX Runtime on RUN/model.onnx (exported on first use; the calibrator and "
        "fusion it includes are used when they are the ones to apply, never twice)",
    ),
    threads: int | None = typer.Option(None, help="CPU threads (default: torch's choice)"),
    keep: str | None = typer.Option(
        None, help="comma-separated input columns copied into the output (e.g. ids), before the scores"
    ),
) -> None:
    """Score a file with a trained run (calibrated when the run has a calibrator; a fused `score`
    column when it has a fusion.yaml or --fusion is given)."""
    from mtrec.train.run import predict_file

    _set_threads(threads)
    kept = [c.strip() for c in keep.split(",")] if keep else []
    if any(not c for c in kept):
        raise MtrecError(f"--keep: '{keep}' has an empty column name")
    oov: dict[str, float] = {}
    rows = predict_file(run, input, output, oov_rate=oov, fusion=fusion, backend=backend, keep=kept)
    _warn_oov(oov, str(input))
    if oov:
        typer.echo("out-of-vocabulary rate: " + ", ".join(f"{name} {rate:.1%}" for name, rate in oov.items()))
    typer.echo(f"wrote {rows} rows to {output}")


@app.command()
def export(
    run: Path = typer.Option(..., help="run directory written by `mtrec train`"),
    format: str = typer.Option("onnx", "--format", help="onnx or torchscript"),
    out: Path | None = typer.Option(
        None,
        help="file to write (default: RUN/model.onnx or RUN/model.torchscript.pt; RUN/model.context.onnx "
        "or RUN/model.context.torchscript.pt with --context-features, the graph the service uses)",
    ),
    context_features: str | None = typer.Option(
        None, help="comma-separated features given once per request (batch-1 inputs broadcast inside the graph)"
    ),
    no_calibration: bool = typer.Option(
        False,
        "--no-calibration",
        help="leave the run's calibrator out (included by default when the run has calibration.json)",
    ),
    fusion: bool = typer.Option(False, "--fusion", help="include the run's fusion.yaml: a fused `score` output"),
    fusion_file: Path | None = typer.Option(None, help="include this fusion spec instead: a fused `score` output"),
    threads: int | None = typer.Option(None, help="CPU threads (default: torch's choice)"),
) -> None:
    """Export the run's model (encoded inputs in, per-task logits and scores out; calibrated scores and
    a fused score when included) after a parity check against PyTorch on the run's validation rows."""
    if fusion and fusion_file is not None:
        raise MtrecError("--fusion and --fusion-file: give one (--fusion takes the run's fusion.yaml)")
    from mtrec.serve.export import export_run

    _set_threads(threads)
    context = [c.strip() for c in context_features.split(",") if c.strip()] if context_features else []
    spec = fusion_file if fusion_file is not None else (True if fusion else None)
    path, report = export_run(run, format, out, context, calibration=False if no_calibration else None, fusion=spec)
    typer.echo(f"wrote {path} ({format}); {report.summary()}")


def parse_task_values(text: str | None, flag: str) -> dict[str, float]:
    """``"click=1,like=0.5"`` -> ``{"click": 1.0, "like": 0.5}``."""
    out: dict[str, float] = {}
    for key, value in parse_options(text, flag).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MtrecError(f"{flag}: the value of '{key}' is not a number: {value!r}")
        out[key] = float(value)
    return out


@app.command()
def calibrate(
    run: Path = typer.Option(..., help="run directory written by `mtrec train`"),
    method: str = typer.Option(..., help="temperature | platt | isotonic"),
    bins: int = typer.Option(15, min=2, help="equal-width bins of the expected calibration error"),
) -> None:
    """Fit a post-hoc calibrator per binary task on the validation split; save it as
    RUN/calibration.json (then applied by predict); print the ECE before and after."""
    from mtrec.fusion.calibration import METHODS, Calibrators, calibration_report
    from mtrec.fusion.io import run_predictions

    if method not in METHODS:
        raise MtrecError(f"--method: unknown calibration method '{method}' (choose from {', '.join(METHODS)})")
    preds = run_predictions(run, ("valid", "test"), calibrated=False)
    if "valid" not in preds or len(preds["valid"].labels) == 0:
        raise MtrecError(f"{run}: the run's schema has no validation rows to fit a calibrator on")
    valid = preds["valid"]
    calibrators = Calibrators.fit(method, valid.scores, valid.labels, valid.layout)  # type: ignore[arg-type]  # checked above
    path = calibrators.save(run)
    typer.echo(f"{'split':<6} {'task':<20} {'ECE':>8} {'ECE ' + method:>20}")
    for split, p in preds.items():
        for task, entry in calibration_report(p.labels, p.scores, p.layout, calibrators, bins)["tasks"].items():
            typer.echo(f"{split:<6} {task:<20} {entry['ece']:8.4f} {entry['ece_calibrated']:20.4f}")
    typer.echo(f"calibrator ({method}, fitted on valid) written to {path}")


@app.command()
def fuse(
    run: Path = typer.Option(..., help="run directory written by `mtrec train`"),
    objective: str = typer.Option(..., help="gauc | ndcg@K | recall@K"),
    importance: str = typer.Option(..., help="task=weight,... : how much each binary task counts in the objective"),
    floor: str | None = typer.Option(
        None, help="task=x,... : keep out trials whose fused-score AUC for a task is below x"
    ),
    trials: int = typer.Option(..., help="Optuna trials to run (added to the stored study)"),
    seed: int = typer.Option(0, help="TPE sampler seed"),
    formula: str = typer.Option("weighted_sum", help="weighted_sum | weighted_product"),
    normalize: str | None = typer.Option(None, help="weighted_sum per-task normalisation: none | rank (default) | z"),
    regression_transform: str = typer.Option("percentile", help="regression tasks enter as: log1p | percentile"),
    list_size: int | None = typer.Option(
        None, help="data without a user column: ndcg@K / recall@K per list of N random rows (a request's candidates)"
    ),
) -> None:
    """Search fusion weights on the validation split (Optuna TPE, resumable study in RUN);
    write RUN/fusion.yaml and RUN/fusion_pareto.png; print the test-split figures."""
    if normalize is not None and formula == "weighted_product":
        raise MtrecError("--normalize applies to --formula weighted_sum only (the product works on probabilities)")
    normalize = normalize or ("rank" if formula == "weighted_sum" else "none")
    choices = {
        "--formula": (formula, ("weighted_sum", "weighted_product")),
        "--normalize": (normalize, ("none", "rank", "z")),
        "--regression-transform": (regression_transform, ("log1p", "percentile")),
    }
    for flag, (value, allowed) in choices.items():
        if value not in allowed:
            raise MtrecError(f"{flag}: '{value}' is not one of {', '.join(allowed)}")
    from mtrec.fusion.search import fuse_run, report

    result = fuse_run(
        run,
        objective,
        parse_task_values(importance, "--importance"),
        parse_task_values(floor, "--floor"),
        trials,
        seed=seed,
        formula=formula,
        normalize=normalize,
        regression_transform=regression_transform,
        list_size=list_size,
    )
    typer.echo(report(result, objective))


@app.command()
def serve(
    run: Path = typer.Option(..., help="run directory written by `mtrec train`"),
    fusion: Path | None = typer.Option(
        None, help="fusion spec to rank by (default: the run's fusion.yaml, if any; else the first task)"
    ),
    backend: str = typer.Option("torch", help="torch, or onnx: ONNX Runtime on RUN/model.onnx (exported on first use)"),
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(8000, help="TCP port"),
    workers: int = typer.Option(1, help="worker processes"),
    threads: int | None = typer.Option(
        None, help="torch threads per worker (default: CPU cores / workers, at least 1)"
    ),
    max_candidates: int = typer.Option(1000, help="most candidates in one request (more is a 422)"),
    max_body_mb: float = typer.Option(8.0, help="largest request body in MiB (more is a 413)"),
    timeout_ms: float = typer.Option(1000.0, help="a /rank request waiting or running longer gets a 503"),
    log_level: str = typer.Option("warning", help="uvicorn log level"),
    ort_spin: str | None = typer.Option(
        None,
        help="--backend onnx: how ONNX Runtime's threads wait between operators and runs. auto (default): spin, "
        "and sleep after a request no other waits behind; on: always spin (ONNX Runtime's default); off: "
        "never spin (steadier beside other busy processes, slower on quiet cores)",
    ),
) -> None:
    """Serve the run's ranking over HTTP (FastAPI + uvicorn): POST /rank, GET /health, /model, /metrics,
    POST /reload."""
    checks = {
        "--backend": (backend in ("torch", "onnx"), f"unknown backend '{backend}'; choose torch or onnx"),
        "--port": (1 <= port <= 65535, f"{port} is not a TCP port (1-65535)"),
        "--workers": (workers >= 1, "must be at least 1"),
        "--threads": (threads is None or threads >= 1, "must be at least 1"),
        "--max-candidates": (max_candidates >= 1, "must be at least 1"),
        "--max-body-mb": (max_body_mb > 0, "must be positive"),
        "--timeout-ms": (timeout_ms > 0, "must be positive"),
        "--ort-spin": (
            ort_spin is None or (backend == "onnx" and ort_spin in SPIN_MODES),
            f"'{ort_spin}' is not one of {', '.join(SPIN_MODES)}"
            if backend == "onnx"
            else "only for --backend onnx (ONNX Runtime's threads)",
        ),
        "--log-level": (
            log_level in ("critical", "error", "warning", "info", "debug", "trace"),
            f"unknown level '{log_level}'",
        ),
    }
    for flag, (ok, why) in checks.items():
        if not ok:
            raise MtrecError(f"{flag}: {why}")
    from mtrec.serve.service import ServeSettings, default_threads
    from mtrec.serve.service import serve as run_service

    settings = ServeSettings(
        run=run,
        fusion=fusion,
        backend=backend,
        threads=threads or default_threads(workers),
        max_candidates=max_candidates,
        max_body_bytes=int(max_body_mb * (1 << 20)),
        timeout_s=timeout_ms / 1000.0,
        ort_spin=ort_spin or "auto",  # checked against SPIN_MODES above (pydantic checks it again)
    )
    run_service(settings, host, port, workers, log_level)


@app.command()
def models() -> None:
    """List the registered models."""
    from mtrec.models import MODELS

    for name, description in MODELS.describe().items():
        typer.echo(f"{name:<20} {description}")


@app.command()
def balancers() -> None:
    """List the registered loss-balancing strategies."""
    from mtrec.balancing import BALANCERS

    for name, description in BALANCERS.describe().items():
        typer.echo(f"{name:<20} {description}")


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="where the four runs are written"),
    seed: int = typer.Option(0),
    epochs: int = typer.Option(TrainConfig.model_fields["epochs"].default),
    threads: int | None = typer.Option(None),
) -> None:
    """Census-Income: single_task, shared_bottom, mmoe and ple, compared against single-task."""
    from mtrec.diagnostics.demo import run_demo

    _set_threads(threads)
    typer.echo(run_demo(out, seed=seed, epochs=epochs))


def main() -> None:
    """Console entry point: user errors become one line and exit code 2."""
    # The OpenMP wait setting is read once, when torch loads: it goes into the environment first (this
    # process, and every worker, rank or server process it starts, inherit it). See mtrec/threads.py.
    prepare_openmp()
    try:
        app()
    except MtrecError as err:
        if not getattr(err, "silent", False):  # a data-parallel rank's copy of rank 0's error is not repeated
            typer.echo(f"error: {err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
