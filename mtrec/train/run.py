"""A training run as files: train, save, reload, evaluate, predict.

A run directory holds everything needed to rebuild and use the model:

- ``config.json``: model name and options, feature layout, schema, training and balancer options,
  and all of it as ``run_config`` (a :class:`mtrec.config.RunConfig`: ``mtrec train --config`` reruns it);
- ``encoders.json``: the vocabularies and statistics fitted on train;
- ``model.safetensors``: the best weights (chosen on the validation split);
- ``history.json``: per-epoch training losses, validation metrics and balancer statistics;
- ``metrics.json``: ``{"model", "seed", "valid": {task: {metric: value}}, "test": {...}}``.

While training, the directory also holds ``incomplete.json`` (removed when the run is complete: a
run that has it was interrupted, or is still training) and ``checkpoint.pt`` (written atomically
after every epoch and every ``checkpoint_every`` steps; ``--resume`` continues from it, bit-identical
to an uninterrupted run; removed when the run is complete), and a lock file (``.lock``) held while a
process trains into it. ``config.json`` records the run format (:data:`RUN_FORMAT`).

Every file is written to a temporary name and renamed into place, ``metrics.json``
last, so an interrupted or failed run never leaves a partial ``metrics.json``.
"""

from __future__ import annotations

import fcntl
import gzip
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mtrec import __version__
from mtrec.balancing import build_balancer, validate_balancer_options
from mtrec.data.ingest import Encoders, encode, load_splits, oov_rates
from mtrec.data.store import load_store, table_from_arrays
from mtrec.data.stream import DEFAULT_CHUNK_ROWS, OovCounter, read_chunks, source_files
from mtrec.data.tables import FeatureLayout
from mtrec.diagnostics.monitor import ConflictMonitor
from mtrec.errors import MtrecError
from mtrec.files import write_atomic, write_json_atomic
from mtrec.fusion.calibration import Calibrators, calibration_report
from mtrec.fusion.spec import apply_fusion, fusion_for_run
from mtrec.metrics.core import check_select_by, evaluate_predictions, joint_scores, weighted_scores
from mtrec.models import MultiTaskModel, build_model, validate_model_options
from mtrec.schema import Schema, TaskSpec, schema_from_dict
from mtrec.train.distributed import Distributed, FollowerError, check_precision, resolve_device
from mtrec.train.tensorboard import TensorBoardLogger
from mtrec.train.trainer import FitResult, TrainConfig, Trainer, seed_everything

WEIGHTS = "model.safetensors"
CHECKPOINT = "checkpoint.pt"
INCOMPLETE = "incomplete.json"
LOCK = ".lock"
# The layout of a run directory (file names, config.json keys); config.json records it. Bump it when a
# change makes older runs unreadable, and say in load_run what to do with them.
RUN_FORMAT = 1
# What mtrec writes into a run directory (train, and the commands that add to a finished run): what
# --overwrite removes. Anything else in the directory is the user's and stays.
RUN_FILES = (
    "config.json",
    "encoders.json",
    WEIGHTS,
    "history.json",
    "metrics.json",
    CHECKPOINT,
    INCOMPLETE,
    "diagnostics.json",
    "calibration.json",
    "fusion.yaml",
    "fusion_study.db",
    "fusion_pareto.png",
    "model.onnx",
    "model.torchscript.pt",
    "model.context.onnx",
    "model.context.torchscript.pt",
    "relate.json",
    "tensorboard",
)
# memory a run may plan to use: this share of MemAvailable (the rest for data, activations, the OS)
MEMORY_MARGIN = 0.7
# bytes per parameter while training: the weights, their gradients, Adam's two moments, the best
# weights kept for early stopping, and the checkpoint's copy being serialised (float32 each)
BYTES_PER_PARAMETER = 4 * 6


@dataclass
class RunResult:
    metrics: dict
    fit: FitResult
    model: MultiTaskModel


def _save_weights(model: MultiTaskModel, path: Path) -> None:
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata={"mtrec": __version__}))


def memory_available() -> int | None:
    """``MemAvailable`` from /proc/meminfo in bytes (None where there is no such file)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def count_parameters(model_name: str, layout: FeatureLayout, model_options: dict | None) -> int:
    """Parameters of the model, counted on the meta device (shapes only, no memory allocated)."""
    try:
        with torch.device("meta"):
            model = build_model(model_name, layout, model_options)
        return sum(p.numel() for p in model.parameters())
    except MtrecError:
        raise
    except Exception:  # a model whose construction needs real tensors: its embedding tables, a lower bound
        return sum(f.vocab_size * f.embed_dim for f in layout.sparse) + sum(
            f.vocab_size * f.embed_dim for f in layout.sequences if f.shares is None
        )


def check_memory(model_name: str, layout: FeatureLayout, model_options: dict | None) -> int:
    """Refuse a model whose training state would not fit in the memory available (with a margin),
    before allocating it; returns the estimate in bytes."""
    params = count_parameters(model_name, layout, model_options)
    need = params * BYTES_PER_PARAMETER
    available = memory_available()
    if available is not None and need > MEMORY_MARGIN * available:
        gib = 1 << 30
        raise MtrecError(
            f"model '{model_name}' has {params:,} parameters: training needs about {need / gib:.1f} GiB "
            f"(weights, gradients, Adam's two moments, best weights and checkpoint, {BYTES_PER_PARAMETER} bytes "
            f"each), more than {MEMORY_MARGIN:.0%} of the {available / gib:.1f} GiB available; lower embed_dim "
            f"or the layer sizes (--model-args), or raise min_freq"
        )
    return need


class RunLock:
    """An exclusive ``flock`` on ``RUN/.lock`` while a process trains into ``RUN``: a second training
    into the same directory fails at once instead of both writing it. Released when the process ends,
    however it ends."""

    def __init__(self, run: Path) -> None:
        self.path = run / LOCK
        self.handle = open(self.path, "a+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            holder = self.handle.read().strip() or "?"
            self.handle.close()
            raise MtrecError(
                f"{run}: another training (pid {holder}) is writing this run directory; wait for it to end "
                f"or give another --out"
            ) from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(str(os.getpid()))
        self.handle.flush()

    def release(self) -> None:
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()


def _clear_run(out: Path) -> None:
    """Remove what mtrec wrote into ``out`` (``RUN_FILES``, TensorBoard events included); keep the rest."""
    for name in RUN_FILES:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def _run_state(out: Path) -> str:
    """``"empty"`` (no run files), ``"finished"``, or ``"interrupted"`` (files of a run that did not end)."""
    if (out / INCOMPLETE).is_file() or ((out / CHECKPOINT).is_file() and not (out / "metrics.json").is_file()):
        return "interrupted"
    if (out / "metrics.json").is_file() or (out / "config.json").is_file():
        return "finished"
    if any((out / name).exists() for name in RUN_FILES):
        return "interrupted"
    return "empty"


def _arguments(
    model_name: str,
    model_options: dict | None,
    balancer_name: str,
    balancer_options: dict | None,
    task_weights: Sequence[float] | None,
    train_config: TrainConfig,
    schema: Schema,
) -> dict:
    """What a resumed run must be given again, as recorded in its checkpoint (the schema with its
    data files' fingerprint: the same data, unchanged)."""
    train = train_config.model_dump(mode="json")
    train.pop("progress", None)
    return {
        "model": model_name,
        "model_args": dict(model_options or {}),
        "balancer": balancer_name,
        "balancer_args": dict(balancer_options or {}),
        "task_weights": None if task_weights is None else [float(w) for w in task_weights],
        **train,
        "schema": schema.fingerprint(),
    }


def _check_same_arguments(recorded: dict, given: dict, out: Path | None) -> None:
    diffs = [
        f"{key} {recorded.get(key)!r} in the run, {given.get(key)!r} now"
        for key in sorted(set(recorded) | set(given))
        if recorded.get(key) != given.get(key)
    ]
    if diffs:
        diffs = [d if not d.startswith("schema ") else "the schema or its data files changed" for d in diffs]
        raise MtrecError(
            f"--resume {out}: the run was started with other arguments ({'; '.join(diffs)}); "
            f"give the same ones, or train again with --overwrite"
        )


def _load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged file (the write is atomic, so only a disk problem or an edit)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MtrecError(f"{path}: cannot read the checkpoint ({first[:200]}); train again with --overwrite") from None


_checkpoints_written = 0


def _test_pause(when: str) -> None:
    """Test hook: ``MTREC_TEST_CHECKPOINT_PAUSE=N:before`` (or ``N:after``) stops the N-th checkpoint write
    of this process before (after) its rename and waits, so a test can kill the process right there."""
    spec = os.environ.get("MTREC_TEST_CHECKPOINT_PAUSE")
    if not spec:
        return
    number, _, point = spec.partition(":")
    if int(number) == _checkpoints_written and point == when:
        print(f"test hook: paused in checkpoint {_checkpoints_written} ({when} rename)", file=sys.stderr, flush=True)
        time.sleep(600)


def _write_checkpoint(path: Path, state: dict) -> None:
    """``torch.save`` to a temporary file renamed over ``path``: a kill at any point leaves the previous
    checkpoint whole."""
    global _checkpoints_written
    _checkpoints_written += 1

    def write(tmp: Path) -> None:
        torch.save(state, tmp)
        _test_pause("before")

    write_atomic(path, write)
    _test_pause("after")


@dataclass(frozen=True)
class _Job:
    """What one :func:`train_run` call trains and how, passed whole down its layers (the rank's part, the
    run directory's checks, the training itself)."""

    schema: Schema
    model_name: str
    train_config: TrainConfig
    model_options: dict | None
    balancer_name: str
    balancer_options: dict | None
    task_weights: Sequence[float] | None
    checkpoint_every: int
    threads: int | None
    device: torch.device
    distributed: Distributed | None


def train_run(
    schema: Schema,
    model_name: str,
    out: Path | None,
    train_config: TrainConfig,
    model_options: dict | None = None,
    balancer_name: str = "fixed",
    balancer_options: dict | None = None,
    task_weights: Sequence[float] | None = None,
    tensorboard: bool = True,
    *,
    overwrite: bool = False,
    resume: bool = False,
    checkpoint_every: int = 0,
    threads: int | None = None,
    echo: Callable[[str], None] | None = None,
) -> RunResult:
    """Train ``model_name`` on ``schema`` and, when ``out`` is given, write the run directory
    (with TensorBoard curves under ``out/tensorboard`` unless ``tensorboard`` is False).

    ``out`` is locked while training. A directory holding a run is refused unless ``overwrite`` (its
    run files are removed first) or, for an interrupted run, ``resume`` (continue from its checkpoint,
    with the same arguments and the thread count recorded there). ``echo`` gets progress lines."""
    # unknown names and bad options fail before any data is read
    validate_model_options(model_name, model_options)
    validate_balancer_options(balancer_name, schema.task_names, balancer_options, task_weights)
    if out is None and (resume or overwrite):
        raise MtrecError("--resume and --overwrite need a run directory (--out)")
    # under torchrun: one of WORLD_SIZE data-parallel processes (mtrec.train.distributed)
    distributed = Distributed.from_env(train_config.device)
    try:
        device = distributed.device if distributed is not None else resolve_device(train_config.device)
        check_precision(device, train_config.bf16)
        job = _Job(
            schema,
            model_name,
            train_config,
            model_options,
            balancer_name,
            balancer_options,
            task_weights,
            checkpoint_every,
            threads,
            device,
            distributed,
        )
        if distributed is not None and not distributed.is_main:
            # rank 0 checks the run directory and builds the store; this rank follows its verdict and
            # writes nothing (no run directory, no TensorBoard, no echo)
            try:
                return _train(job, None, False, distributed.hear(), None)
            except MtrecError as err:  # the same error as rank 0's, which prints it
                raise FollowerError(str(err)) from None
        return _train_main(job, out, tensorboard, overwrite=overwrite, resume=resume, echo=echo)
    finally:
        if distributed is not None:
            distributed.close()


def _train_main(
    job: _Job,
    out: Path | None,
    tensorboard: bool,
    *,
    overwrite: bool,
    resume: bool,
    echo: Callable[[str], None] | None,
) -> RunResult:
    """:func:`train_run` in a single process, or on rank 0 of a data-parallel run (which checks the run
    directory, builds the store and tells the other ranks to go, or why not)."""
    distributed = job.distributed
    told = False

    def go(checkpoint: dict | None) -> None:
        nonlocal told
        if distributed is not None:
            load_store(job.schema, echo=echo)  # built once, here, before the other ranks open it
            distributed.tell(checkpoint)
        told = True

    if out is None:
        try:
            go(None)
        except MtrecError as err:
            if distributed is not None and not told:
                distributed.tell(error=str(err))
            raise
        return _train(job, None, tensorboard, None, echo)
    try:
        return _train_out(job, out, tensorboard, overwrite=overwrite, resume=resume, echo=echo, go=go)
    except MtrecError as err:
        if distributed is not None and not told:
            distributed.tell(error=str(err))
        raise


def _train_out(
    job: _Job,
    out: Path,
    tensorboard: bool,
    *,
    overwrite: bool,
    resume: bool,
    echo: Callable[[str], None] | None,
    go: Callable[[dict | None], None],
) -> RunResult:
    """Train into the run directory ``out`` (locked while training); ``go(checkpoint)`` is called once the
    directory is checked, before training starts."""
    if overwrite and resume:
        raise MtrecError("--overwrite starts the run again and --resume continues it: give one of them")
    if out.exists() and not out.is_dir():
        raise MtrecError(f"--out {out}: is a file, not a directory; give a directory for the run")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise MtrecError(f"--out {out}: cannot create the run directory ({err.strerror})") from None
    lock = RunLock(out)
    try:
        for name in RUN_FILES:  # temporaries of atomic writes a kill interrupted (we hold the lock)
            for tmp in out.glob(f".{name}.*.tmp"):
                tmp.unlink(missing_ok=True)
        state = _run_state(out)
        checkpoint = None
        if resume:
            if state == "finished":
                raise MtrecError(
                    f"--resume {out}: the run is finished; nothing to resume (--overwrite trains it again)"
                )
            if not (out / CHECKPOINT).is_file():
                raise MtrecError(
                    f"--resume {out}: no {CHECKPOINT} here (the run stopped before its first checkpoint, "
                    "or was never started); train again with --overwrite"
                )
            checkpoint = _load_checkpoint(out / CHECKPOINT)
        elif state == "finished" and not overwrite:
            raise MtrecError(f"--out {out}: a finished run is here; give --overwrite to replace it, or another --out")
        elif state == "interrupted" and not overwrite:
            raise MtrecError(
                f"--out {out}: an interrupted run is here; --resume continues it, --overwrite starts again"
            )
        go(checkpoint)
        result = _train(job, out, tensorboard, checkpoint, echo, overwrite=overwrite)
    except MtrecError:
        if created:  # nothing of a run that failed on the user's input is left behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        lock.release()
    return result


def _train(
    job: _Job,
    out: Path | None,
    tensorboard: bool,
    checkpoint: dict | None,
    echo: Callable[[str], None] | None,
    overwrite: bool = False,
) -> RunResult:
    store = load_store(job.schema, echo=echo if job.distributed is None else None)
    train, valid, test = store.require("train"), store.split("valid"), store.split("test")
    if valid is None or len(valid) == 0:
        raise MtrecError(f"schema '{job.schema.name}': no validation rows; set valid_fraction > 0 or source.valid")
    check_memory(job.model_name, store.layout, job.model_options)
    check_select_by(job.train_config.select_by, store.layout, valid.user is not None)
    arguments = _arguments(
        job.model_name,
        job.model_options,
        job.balancer_name,
        job.balancer_options,
        job.task_weights,
        job.train_config,
        job.schema,
    )
    if job.distributed is not None:  # the global batch is world_size x batch_size: a resume needs the same count
        arguments["processes"] = job.distributed.world_size
    if checkpoint is not None:
        _check_same_arguments(checkpoint.get("arguments", {}), arguments, out)
        recorded = int(checkpoint["trainer"]["threads"])
        if job.threads is not None and job.threads != recorded:
            raise MtrecError(
                f"--resume {out}: the run trains on {recorded} thread(s) (--threads {job.threads} given); "
                f"a resumed run uses the recorded count to stay bit-identical: drop --threads"
            )
        torch.set_num_threads(recorded)
        if echo is not None:
            t = checkpoint["trainer"]
            echo(f"resuming from epoch {t['epoch']} step {t['batch']} (global step {t['step']})")
    if out is not None:
        if overwrite:
            _clear_run(out)
        if checkpoint is None:
            write_json_atomic(
                out / INCOMPLETE,
                {"pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "arguments": arguments},
            )
    seed_everything(job.train_config.seed)
    model = build_model(job.model_name, store.layout, job.model_options)
    balancer = build_balancer(job.balancer_name, store.layout.task_names, job.balancer_options, job.task_weights)
    loggers = [TensorBoardLogger(out / "tensorboard")] if out is not None and tensorboard else []
    callbacks: list = list(loggers)
    if job.train_config.monitor_every:  # data parallel: on every rank (rank 0 records it; the steps stay in step)
        writer = loggers[0].writer if loggers else None
        callbacks.append(ConflictMonitor(job.train_config.monitor_every, job.train_config.monitor_scope, writer=writer))
    save = None
    if out is not None:

        def save(state: dict) -> None:
            _write_checkpoint(out / CHECKPOINT, {"arguments": arguments, "trainer": state})

    trainer = Trainer(
        model,
        balancer,
        job.train_config,
        callbacks=callbacks,
        checkpoint=save,
        checkpoint_every=job.checkpoint_every,
        echo=echo,
        device=job.device,
        distributed=job.distributed,
    )
    try:
        fit = trainer.fit(train, valid, resume=None if checkpoint is None else checkpoint["trainer"])
    finally:
        for logger in loggers:
            logger.close()
    metrics = {
        "model": job.model_name,
        "seed": job.train_config.seed,
        "balancer": job.balancer_name,
        "best_epoch": fit.best_epoch,
        "valid": trainer.evaluate(valid),
        "test": trainer.evaluate(test) if test is not None and len(test) else {},
    }
    # the business score: per split, the tasks' schema weights over their AUC / uAUC / GAUC
    metrics["weighted"] = {
        split: weighted_scores(values, store.layout)
        for split, values in (("valid", metrics["valid"]), ("test", metrics["test"]))
        if isinstance(values, dict) and values
    }
    metrics["select_by"] = job.train_config.select_by
    model.cpu()  # the run's model is used and saved on the CPU, wherever it trained
    if out is not None:
        from mtrec.config import RunConfig

        config = {
            "run_format": RUN_FORMAT,
            "mtrec_version": __version__,
            "model": job.model_name,
            "model_options": model.config.model_dump(mode="json"),
            "layout": store.layout.to_dict(),
            "schema": store.schema,
            "train": job.train_config.model_dump(mode="json"),
            "balancer": {
                "name": job.balancer_name,
                "options": job.balancer_options or {},
                "task_weights": job.task_weights,
            },
            # how it was trained: processes (batch_size is per process) and device
            "training": {
                "processes": 1 if job.distributed is None else job.distributed.world_size,
                "backend": None if job.distributed is None else job.distributed.backend,
                "device": str(trainer.device),
            },
            # the whole run as a RunConfig, the recorded schema inline: `mtrec train --config RUN/config.json`
            # reruns it (mtrec.config.read_run_config)
            "run_config": RunConfig.model_validate(
                {
                    **job.train_config.model_dump(),
                    "schema": store.schema,
                    "model": job.model_name,
                    "model_args": job.model_options or {},
                    "balancer": job.balancer_name,
                    "balancer_args": job.balancer_options or {},
                    "task_weights": None if job.task_weights is None else [float(w) for w in job.task_weights],
                    "tensorboard": tensorboard,
                }
            ).to_json(),
        }
        write_json_atomic(out / "config.json", config)
        write_json_atomic(out / "encoders.json", store.encoders.to_dict())
        _save_weights(model, out / WEIGHTS)
        write_json_atomic(out / "history.json", fit.history)
        write_json_atomic(out / "metrics.json", metrics)
        (out / INCOMPLETE).unlink(missing_ok=True)  # the run is complete
        (out / CHECKPOINT).unlink(missing_ok=True)
    return RunResult(metrics=metrics, fit=fit, model=model)


@dataclass
class LoadedRun:
    model: MultiTaskModel
    schema: Schema
    encoders: Encoders
    config: dict


def load_run(run: Path) -> LoadedRun:
    """Rebuild the model of a run directory with its best weights; a run that is incomplete, of
    another format, or damaged is one :class:`MtrecError` saying which file and what to do."""
    if not run.is_dir():
        raise MtrecError(f"{run}: run directory not found")
    if (run / INCOMPLETE).is_file():
        raise MtrecError(
            f"{run}: incomplete run (its training was interrupted, or is still going); "
            f"continue it with `mtrec train ... --out {run} --resume` (the same arguments)"
        )
    for name in ("config.json", "encoders.json", WEIGHTS):
        if not (run / name).is_file():
            raise MtrecError(f"{run}: no {name} here; not a finished mtrec run (train with --out {run})")
    try:
        config = json.loads((run / "config.json").read_text())
        encoders = json.loads((run / "encoders.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MtrecError(
            f"{run}: config.json or encoders.json is not valid JSON ({err}); the run is damaged, train it again"
        ) from None
    fmt = config.get("run_format", RUN_FORMAT) if isinstance(config, dict) else None
    if fmt != RUN_FORMAT:
        raise MtrecError(
            f"{run}: written by mtrec {config.get('mtrec_version', '?') if isinstance(config, dict) else '?'} "
            f"in run format {fmt}; this mtrec ({__version__}) reads format {RUN_FORMAT}: train the run "
            f"again with this version, or use the version that wrote it"
        )
    try:
        layout = FeatureLayout.from_dict(config["layout"])
        model = build_model(config["model"], layout, config["model_options"])
        schema = schema_from_dict(config["schema"], str(run / "config.json"))
        loaded_encoders = Encoders.from_dict(encoders)
    except (KeyError, TypeError, AttributeError) as err:
        raise MtrecError(
            f"{run / 'config.json'}: missing or malformed entry ({type(err).__name__}: {err}); "
            f"the run is damaged, train it again"
        ) from None
    try:
        state = load_file(str(run / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as err:
        raise MtrecError(
            f"{run / WEIGHTS}: cannot read the weights ({err}); the file is damaged, train the run again"
        ) from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        detail = next((line.strip() for line in first if "size mismatch" in line), first[0] if first else "")
        raise MtrecError(f"{run / WEIGHTS}: weights of another model ({detail[:200]})") from None
    if missing or unexpected:
        raise MtrecError(
            f"{run / WEIGHTS}: weights of another model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.eval()
    return LoadedRun(model, schema, loaded_encoders, config)


def _matched(schema: Schema, run_schema: Schema, run: Path) -> Schema:
    """``schema`` read as the run's model expects: its tasks and features matched to the run's by name
    (never by position) and put in the run's order; features keep the run's encoding (log, fill,
    max_len, ...) and read the other schema's column. Any task or feature that does not match is one
    error naming them all."""
    problems = []
    for kind, ours, theirs in (
        ("tasks", run_schema.tasks, schema.tasks),
        ("features", run_schema.features, schema.features),
    ):
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
            if isinstance(a, TaskSpec) and isinstance(b, TaskSpec) and a.space != b.space:
                problems.append(f"task {name} has space {b.space} here but {a.space} in the run")
    if problems:
        raise MtrecError(
            f"schema '{schema.name}' does not match run {run} (tasks {', '.join(run_schema.task_names)}): "
            + "; ".join(problems)
        )
    other_features = {f.name: f for f in schema.features}
    other_tasks = {t.name: t for t in schema.tasks}
    return schema.model_copy(
        update={
            "features": [
                f.model_copy(update={"column": other_features[f.name].source_column}) for f in run_schema.features
            ],
            "tasks": [other_tasks[t.name] for t in run_schema.tasks],
        }
    )


def evaluate_run(run: Path, schema: Schema | None = None) -> dict:
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
        scores = loaded.model.predict_table(table)
        user = table.user.numpy() if table.user is not None else None
        out[split] = evaluate_predictions(table.labels.numpy(), scores, loaded.model.layout, user)
        calibration[split] = calibration_report(table.labels.numpy(), scores, loaded.model.layout, calibrators)
    out["oov_rate"] = oov
    out["calibration"] = calibration  # per split: ECE and reliability curve per binary task (and calibrated)
    # the business score, as in metrics.json
    out["weighted"] = {s: weighted_scores(out[s], loaded.model.layout) for s in ("valid", "test") if s in out}
    return out


def output_format(path: Path) -> str:
    """``"csv"``, ``"csv.gz"`` or ``"parquet"`` from the file name; anything else is an error."""
    name = path.name.lower()
    for suffix in ("csv.gz", "csv", "parquet"):
        if name.endswith("." + suffix):
            return suffix
    raise MtrecError(f"--output {path}: unknown file type; name it .csv, .csv.gz or .parquet")


def predict_file(
    run: Path,
    input_path: Path,
    output_path: Path,
    oov_rate: dict | None = None,
    fusion: Path | None = None,
    backend: str = "torch",
    keep: Sequence[str] = (),
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> int:
    """Score every row of ``input_path`` (a file or a directory of shards, read ``chunk_rows`` rows at a
    time, the output written as it goes: an input larger than memory is fine); write one column per task to ``output_path`` (CSV, gzipped
    CSV or Parquet by its suffix), plus ``<task>@all`` (the entire-space probability, e.g. pCTCVR) for
    every task with a space, and ``score`` (the fused score) when the run has a ``fusion.yaml`` or
    ``fusion`` names a spec; scores go through the run's calibrator if it has one. Returns rows;
    fills ``oov_rate`` (when given) with the out-of-vocabulary rate of each sparse and sequence feature.
    ``backend``: ``torch``, or ``onnx`` (ONNX Runtime on the run's ``model.onnx``, exported with its parity
    check on first use). ``keep``: input columns copied into the output, first, as they were read."""
    if backend not in ("torch", "onnx"):
        raise MtrecError(f"--backend: unknown backend '{backend}'; choose torch or onnx")
    kind = output_format(output_path)
    if output_path.resolve() == input_path.resolve() or (
        output_path.exists() and input_path.exists() and os.path.samefile(output_path, input_path)
    ):
        raise MtrecError(f"--output {output_path}: is the input file; write the scores to another file")
    loaded = load_run(run)
    schema = loaded.schema
    parquet = input_path.is_dir() and any(p.suffix == ".parquet" for p in input_path.iterdir())
    if (input_path.suffix == ".parquet" or parquet) and schema.format.type != "parquet":
        schema = schema.model_copy(update={"format": schema.format.model_copy(update={"type": "parquet"})})
    files = source_files(input_path, schema.format)  # one file, or a directory of shards
    calibrators = Calibrators.load(run)
    spec = fusion_for_run(run, loaded.model.layout, calibrators.method, fusion)  # before scoring: fail early
    side = None
    if schema.join:  # the log's side tables (user, item features), read from the run's schema paths
        from mtrec.data.sources import load_side_tables

        side = load_side_tables(schema)
    oov = OovCounter(schema)

    def scored(frame_in: pl.DataFrame, path: Path) -> pl.DataFrame:
        """One chunk of the input with its score columns (and the kept input columns first)."""
        if side is not None:
            from mtrec.data.sources import prepare_frame

            frame_in = prepare_frame(frame_in, schema, side, path, with_labels=False)
        if missing := [c for c in keep if c not in frame_in.columns]:
            raise MtrecError(f"--keep: column(s) {', '.join(missing)} not in {input_path}")
        arrays = encode(frame_in, schema, loaded.encoders, path, with_labels=False)
        oov.add(arrays)
        table = table_from_arrays(arrays)
        if backend == "onnx":
            from mtrec.serve.export import predict_onnx

            # calibrated, and fused: by the graph when it includes this calibrator / spec, else applied there
            scores, fused = predict_onnx(run, table, calibrators, spec)
        else:
            scores = calibrators.apply(loaded.model.predict_table(table))  # identity without calibration.json
            fused = apply_fusion(scores, spec) if spec is not None else None
        columns = {name: scores[:, t] for t, name in enumerate(loaded.model.task_names)}
        columns.update(joint_scores(scores, loaded.model.layout))  # e.g. purchase@all = pCTCVR
        if fused is not None:
            columns["score"] = fused  # the fused ranking score (fusion.yaml or --fusion)
        if clash := [c for c in keep if c in columns]:
            raise MtrecError(f"--keep: column(s) {', '.join(clash)} have the name of a score column")
        frame = pl.DataFrame(columns)
        if keep:
            frame = pl.concat([frame_in.select(list(keep)), frame], how="horizontal")
        return frame

    rows = 0

    def write(tmp: Path) -> None:
        """The input scored chunk by chunk (an input larger than memory is fine), appended to ``tmp``."""
        nonlocal rows
        with ExitStack() as stack:
            parquet_out: pq.ParquetWriter | None = None
            csv_out: Any = None  # a binary file, or a gzip stream over one
            for path in files:
                for chunk in read_chunks(path, schema.format, chunk_rows):
                    frame = scored(chunk, path)
                    if kind == "parquet":
                        table = frame.to_arrow()
                        if parquet_out is None:
                            parquet_out = stack.enter_context(pq.ParquetWriter(tmp, table.schema))
                        parquet_out.write_table(table.cast(parquet_out.schema))
                    else:
                        if csv_out is None:
                            opened = gzip.open(tmp, "wb") if kind == "csv.gz" else open(tmp, "wb")
                            csv_out = stack.enter_context(opened)
                        frame.write_csv(csv_out, include_header=rows == 0)
                    rows += frame.height

    write_atomic(output_path, write)
    if oov_rate is not None:
        oov_rate.update(oov.rates())
    return rows
