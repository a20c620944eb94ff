"""A training run as files: train, save, reload, evaluate, predict.

A run directory holds everything needed to rebuild and use the model:

- ``config.json``: model name and options, feature layout, schema, training and balancer options;
- ``encoders.json``: the vocabularies and statistics fitted on train;
- ``model.safetensors``: the best weights (chosen on the validation split);
- ``history.json``: per-epoch training losses, validation metrics and balancer statistics;
- ``metrics.json``: ``{"model", "seed", "valid": {task: {metric: value}}, "test": {...}}``.

Every file is written to a temporary name and renamed into place, ``metrics.json``
last, so an interrupted or failed run never leaves a partial ``metrics.json``.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import polars as pl
import torch
from safetensors.torch import load_file, save_file

from mtrec import __version__
from mtrec.balancing import build_balancer, validate_balancer_options
from mtrec.data.ingest import Encoders, encode, encode_file, load_splits, oov_rates
from mtrec.data.store import load_store, table_from_arrays
from mtrec.data.tables import FeatureLayout, TensorTable
from mtrec.errors import MtrecError
from mtrec.files import write_atomic, write_json_atomic
from mtrec.fusion.calibration import Calibrators, calibration_report
from mtrec.fusion.spec import apply_fusion, fusion_for_run
from mtrec.metrics.core import evaluate_predictions, joint_scores
from mtrec.diagnostics.monitor import ConflictMonitor
from mtrec.train.tensorboard import TensorBoardLogger
from mtrec.models import MultiTaskModel, build_model, validate_model_options
from mtrec.schema import Schema, schema_from_dict
from mtrec.train.trainer import FitResult, TrainConfig, Trainer, seed_everything

WEIGHTS = "model.safetensors"


@dataclass
class RunResult:
    metrics: dict
    fit: FitResult
    model: MultiTaskModel


def _save_weights(model: MultiTaskModel, path: Path) -> None:
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata={"mtrec": __version__}))


def train_run(
    schema: Schema,
    model_name: str,
    out: Optional[Path],
    train_config: TrainConfig,
    model_options: Optional[dict] = None,
    balancer_name: str = "fixed",
    balancer_options: Optional[dict] = None,
    task_weights: Optional[Sequence[float]] = None,
    tensorboard: bool = True,
) -> RunResult:
    """Train ``model_name`` on ``schema`` and, when ``out`` is given, write the run directory
    (with TensorBoard curves under ``out/tensorboard`` unless ``tensorboard`` is False)."""
    # unknown names and bad options fail before any data is read
    validate_model_options(model_name, model_options)
    validate_balancer_options(balancer_name, schema.task_names, balancer_options, task_weights)
    store = load_store(schema)
    train, valid, test = store.split("train"), store.split("valid"), store.split("test")
    if valid is None or len(valid) == 0:
        raise MtrecError(f"schema '{schema.name}': no validation rows; set valid_fraction > 0 or source.valid")
    seed_everything(train_config.seed)
    model = build_model(model_name, store.layout, model_options)
    balancer = build_balancer(balancer_name, store.layout.task_names, balancer_options, task_weights)
    loggers = [TensorBoardLogger(out / "tensorboard")] if out is not None and tensorboard else []
    callbacks: list = list(loggers)
    if train_config.monitor_every:
        writer = loggers[0].writer if loggers else None
        callbacks.append(ConflictMonitor(train_config.monitor_every, writer=writer))
    trainer = Trainer(model, balancer, train_config, callbacks=callbacks)
    try:
        fit = trainer.fit(train, valid)
    finally:
        for logger in loggers:
            logger.close()
    metrics = {
        "model": model_name,
        "seed": train_config.seed,
        "balancer": balancer_name,
        "best_epoch": fit.best_epoch,
        "valid": trainer.evaluate(valid),
        "test": trainer.evaluate(test) if test is not None and len(test) else {},
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        config = {
            "mtrec_version": __version__,
            "model": model_name,
            "model_options": model.config.model_dump(mode="json"),
            "layout": store.layout.to_dict(),
            "schema": store.schema,
            "train": train_config.model_dump(mode="json"),
            "balancer": {"name": balancer_name, "options": balancer_options or {}, "task_weights": task_weights},
        }
        write_json_atomic(out / "config.json", config)
        write_json_atomic(out / "encoders.json", store.encoders.to_dict())
        _save_weights(model, out / WEIGHTS)
        write_json_atomic(out / "history.json", fit.history)
        write_json_atomic(out / "metrics.json", metrics)
    return RunResult(metrics=metrics, fit=fit, model=model)


@dataclass
class LoadedRun:
    model: MultiTaskModel
    schema: Schema
    encoders: Encoders
    config: dict


def load_run(run: Path) -> LoadedRun:
    """Rebuild the model of a run directory with its best weights."""
    if not run.is_dir():
        raise MtrecError(f"{run}: run directory not found")
    for name in ("config.json", "encoders.json", WEIGHTS):
        if not (run / name).is_file():
            raise MtrecError(f"{run}: no {name} here; not a finished mtrec run (train with --out {run})")
    config = json.loads((run / "config.json").read_text())
    layout = FeatureLayout.from_dict(config["layout"])
    model = build_model(config["model"], layout, config["model_options"])
    state = load_file(str(run / WEIGHTS))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise MtrecError(f"{run / WEIGHTS}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.eval()
    schema = schema_from_dict(config["schema"], str(run / "config.json"))
    return LoadedRun(model, schema, Encoders.from_dict(json.loads((run / "encoders.json").read_text())), config)


@torch.no_grad()
def predict_table(model: MultiTaskModel, table: TensorTable, batch_size: int = 16384) -> np.ndarray:
    model.eval()
    outs = [model.predict(model(table.slice(i, i + batch_size))) for i in range(0, len(table), batch_size)]
    return torch.cat(outs).numpy() if outs else np.zeros((0, model.num_tasks), np.float32)


def _matched(schema: Schema, run_schema: Schema, run: Path) -> Schema:
    """``schema`` read as the run's model expects: its tasks and features matched to the run's by name
    (never by position) and put in the run's order; features keep the run's encoding (log, fill,
    max_len, ...) and read the other schema's column. Any task or feature that does not match is one
    error naming them all."""
    problems = []
    for kind, ours, theirs in (("tasks", run_schema.tasks, schema.tasks), ("features", run_schema.features, schema.features)):
        mine = {x.name: x for x in ours}
        other = {x.name: x for x in theirs}
        if missing := [n for n in mine if n not in other]:
            problems.append(f"{kind} of the run missing from the schema: {', '.join(missing)}")
        if extra := [n for n in other if n not in mine]:
            problems.append(f"{kind} not in the run: {', '.join(extra)}")
        for name in (n for n in mine if n in other):
            a, b = mine[name], other[name]
            if a.type != b.type:
                problems.append(f"{kind[:-1]} {name} is {b.type} here but {a.type} in the run")
            if kind == "tasks" and a.space != b.space:
                problems.append(f"task {name} has space {b.space} here but {a.space} in the run")
    if problems:
        raise MtrecError(
            f"schema '{schema.name}' does not match run {run} (tasks {', '.join(run_schema.task_names)}): "
            + "; ".join(problems)
        )
    other_features = {f.name: f for f in schema.features}
    other_tasks = {t.name: t for t in schema.tasks}
    return schema.model_copy(update={
        "features": [f.model_copy(update={"column": other_features[f.name].source_column}) for f in run_schema.features],
        "tasks": [other_tasks[t.name] for t in run_schema.tasks],
    })


def evaluate_run(run: Path, schema: Optional[Schema] = None) -> dict:
    """Metrics of a run on the valid and test splits of ``schema`` (default: the run's own),
    encoded with the run's fitted encoders; ``oov_rate`` holds each split's out-of-vocabulary
    rate per sparse and sequence feature."""
    loaded = load_run(run)
    schema = loaded.schema if schema is None else _matched(schema, loaded.schema, run)
    out: dict = {"model": loaded.config["model"]}
    oov: dict = {}
    calibrators, calibration = Calibrators.load(run), {}
    for split, (frame, path) in load_splits(schema).items():
        if split == "train":
            continue
        arrays = encode(frame, schema, loaded.encoders, path)
        oov[split] = oov_rates(arrays, schema)
        table = table_from_arrays(arrays)
        scores = predict_table(loaded.model, table)
        user = table.user.numpy() if table.user is not None else None
        out[split] = evaluate_predictions(table.labels.numpy(), scores, loaded.model.layout, user)
        calibration[split] = calibration_report(table.labels.numpy(), scores, loaded.model.layout, calibrators)
    out["oov_rate"] = oov
    out["calibration"] = calibration  # per split: ECE and reliability curve per binary task (and calibrated)
    return out


def output_format(path: Path) -> str:
    """``"csv"``, ``"csv.gz"`` or ``"parquet"`` from the file name; anything else is an error."""
    name = path.name.lower()
    for suffix in ("csv.gz", "csv", "parquet"):
        if name.endswith("." + suffix):
            return suffix
    raise MtrecError(f"--output {path}: unknown file type; name it .csv, .csv.gz or .parquet")


def predict_file(
    run: Path, input_path: Path, output_path: Path, oov_rate: Optional[dict] = None, fusion: Optional[Path] = None,
    backend: str = "torch",
) -> int:
    """Score every row of ``input_path``; write one column per task to ``output_path`` (CSV, gzipped
    CSV or Parquet by its suffix), plus ``<task>@all`` (the entire-space probability, e.g. pCTCVR) for
    every task with a space, and ``score`` (the fused score) when the run has a ``fusion.yaml`` or
    ``fusion`` names a spec; scores go through the run's calibrator if it has one. Returns rows;
    fills ``oov_rate`` (when given) with the out-of-vocabulary rate of each sparse and sequence feature.
    ``backend``: ``torch``, or ``onnx`` (ONNX Runtime on the run's ``model.onnx``, exported with its parity
    check on first use)."""
    if backend not in ("torch", "onnx"):
        raise MtrecError(f"--backend: unknown backend '{backend}'; choose torch or onnx")
    kind = output_format(output_path)
    loaded = load_run(run)
    schema = loaded.schema
    if input_path.suffix == ".parquet" and schema.format.type != "parquet":
        schema = schema.model_copy(update={"format": schema.format.model_copy(update={"type": "parquet"})})
    arrays = encode_file(input_path, schema, loaded.encoders, with_labels=False)
    if oov_rate is not None:
        oov_rate.update(oov_rates(arrays, schema))
    table = table_from_arrays(arrays)
    calibrators = Calibrators.load(run)
    spec = fusion_for_run(run, loaded.model.layout, calibrators.method, fusion)  # before scoring: fail early
    if backend == "onnx":
        from mtrec.serve.export import predict_onnx

        raw = predict_onnx(run, table)
    else:
        raw = predict_table(loaded.model, table)
    scores = calibrators.apply(raw)  # identity without calibration.json
    columns = {name: scores[:, t] for t, name in enumerate(loaded.model.task_names)}
    columns.update(joint_scores(scores, loaded.model.layout))  # e.g. purchase@all = pCTCVR
    if spec is not None:
        columns["score"] = apply_fusion(scores, spec)  # the fused ranking score (fusion.yaml or --fusion)
    frame = pl.DataFrame(columns)
    def write(tmp: Path) -> None:
        if kind == "parquet":
            frame.write_parquet(tmp)
        elif kind == "csv.gz":
            with gzip.open(tmp, "wb") as fh:
                frame.write_csv(fh)
        else:
            frame.write_csv(tmp)

    write_atomic(output_path, write)
    return frame.height
