"""`mtrec bench GRID.yaml --out DIR`: a grid of training runs, resumable, with a report.

A grid file crosses data sets x models x balancers x seeds, with training options shared by every
cell::

    name: census_small                      # optional, the report's title
    dataset: census                          # or  schema: data/schema.yaml  (relative to this file)
    # datasets: [{dataset: synthetic, dataset_args: {correlation: 0.5}, label: p0.5}, {schema: x.yaml}]
    models: [single_task, {name: mmoe, args: {num_experts: 4}, label: mmoe4}]
    balancers: [fixed, {name: pcgrad, args: {level: repr}}, {name: fixed, task_weights: [1, 0.5], label: w]}
    seeds: [0, 1, 2]
    train: {epochs: 10, batch_size: 1024, lr: 0.001, patience: 3, monitor_every: 24}
    baseline: single_task                    # the model label the others are compared with

Every cell is a :class:`mtrec.config.RunConfig` trained by :func:`mtrec.train.run.train_run` into an
ordinary run directory ``DIR/cells/<dataset>__<model>__<balancer>__s<seed>``, then diagnosed
(``diagnostics.json``) and timed (``cell.json``). A cell is trained in ``DIR/cells/.partial/<name>``
and renamed into place only when complete, so a cell directory always holds a finished run and a
resumed grid never touches it again; whatever an interrupted grid left in ``.partial`` (or a cell
directory without ``metrics.json``) is removed and redone. Runs are seeded and bit-reproducible at a
fixed torch thread count, so ``DIR/bench.json`` records the thread count and a resume with another
one is refused: a resumed grid ends with the same results as an uninterrupted one.

Cells run in ``workers`` processes (spawned; one process runs them in the command's own process)
with ``threads`` torch threads each; by default ``workers x threads`` equals the CPU cores and never
exceeds them. A failing cell is recorded (``bench.json`` ``failed``, and the report) and the grid goes
on; a later ``mtrec bench`` on the same ``DIR`` retries it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mtrec.config import RunConfig, check_one_source, run_config, validation_message
from mtrec.errors import MtrecError
from mtrec.files import read_yaml, write_json_atomic
from mtrec.threads import available_cores, prepare_openmp
from mtrec.train.trainer import TrainConfig

CELLS = "cells"
PARTIAL = ".partial"
STATE = "bench.json"
CELL_INFO = "cell.json"


class DatasetEntry(BaseModel):
    """One data set of the grid: an embedded one (``dataset`` + ``dataset_args``) or a ``schema`` file."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    dataset: str | None = None
    dataset_args: dict[str, Any] = Field(default_factory=dict)
    schema_file: Path | None = Field(None, alias="schema")
    label: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> DatasetEntry:
        check_one_source(self.dataset, self.schema_file, self.dataset_args)
        return self

    def default_label(self) -> str:
        if self.label:
            return self.label
        if self.dataset is not None:
            args = ",".join(f"{k}={v}" for k, v in self.dataset_args.items())
            return f"{self.dataset}({args})" if args else self.dataset
        assert self.schema_file is not None  # check_one_source: a data set or a schema
        stem = self.schema_file.stem  # "data/schema.yaml" reads better as "data"
        folder = self.schema_file.resolve().parent.name
        return folder if stem == "schema" and folder else stem


class ModelEntry(BaseModel):
    """A model of the grid: a registered name and its options (``--model-args``)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    args: dict[str, Any] = Field(default_factory=dict)
    label: str | None = None


class BalancerEntry(BaseModel):
    """A balancer of the grid: a registered name, its options (``--balancer-args``) and task weights."""

    model_config = ConfigDict(extra="forbid")

    name: str
    args: dict[str, Any] = Field(default_factory=dict)
    task_weights: list[float] | None = None
    label: str | None = None


class SharedTrain(TrainConfig):
    """Training options every cell shares (the seed comes from the grid's ``seeds``)."""

    tensorboard: bool = False  # per-step TensorBoard files in every cell: off unless asked for
    progress: bool | None = False  # progress bars of parallel workers would interleave

    @model_validator(mode="after")
    def _no_seed(self) -> SharedTrain:
        if "seed" in self.model_fields_set:
            raise ValueError("the seed of each cell comes from the grid's 'seeds', not from 'train'")
        return self


def _name_only(value: Any) -> Any:
    return {"name": value} if isinstance(value, str) else value


class Grid(BaseModel):
    """A grid file (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    datasets: list[DatasetEntry] = Field(min_length=1)
    models: list[ModelEntry] = Field(min_length=1)
    balancers: list[BalancerEntry] = Field(default_factory=lambda: [BalancerEntry(name="fixed")], min_length=1)
    seeds: list[int] = Field(min_length=1)
    train: SharedTrain = Field(default_factory=SharedTrain)
    baseline: str = "single_task"

    @model_validator(mode="before")
    @classmethod
    def _single_dataset(cls, data: Any) -> Any:
        """``dataset``/``dataset_args``/``schema`` at the top level: a grid of one data set."""
        if not isinstance(data, dict):
            return data
        top = {k: data[k] for k in ("dataset", "dataset_args", "schema") if k in data}
        if not top:
            return data
        if "datasets" in data:
            raise ValueError(f"give either 'datasets' or {', '.join(repr(k) for k in top)} at the top level, not both")
        rest = {k: v for k, v in data.items() if k not in top}
        return {**rest, "datasets": [top]}

    @field_validator("models", "balancers", mode="before")
    @classmethod
    def _names(cls, value: Any) -> Any:
        return [_name_only(v) for v in value] if isinstance(value, list) else value

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError(f"seeds repeat: {value}")
        return value


@dataclass
class Cell:
    """One run of the grid."""

    name: str
    dataset: str  # labels, as the report shows them
    model: str
    balancer: str
    seed: int
    config: RunConfig


def _labels(entries: list, default: Callable[[Any], str], what: str) -> list[str]:
    labels = [e.label or default(e) for e in entries]
    seen: dict[str, int] = {}
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
    if dup := sorted(k for k, n in seen.items() if n > 1):
        raise MtrecError(f"{what}: label(s) {', '.join(dup)} used twice; give each entry its own 'label'")
    return labels


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]+", "-", text).strip("-") or "x"


def load_grid(path: Path) -> tuple[Grid, list[Cell]]:
    """Read and validate a grid file; return it and its cells in order (data set, model, balancer, seed)."""
    path = Path(path)
    data = read_yaml(path, "grid file")
    if not isinstance(data, dict):
        raise MtrecError(f"{path}: a grid file is a mapping (datasets, models, balancers, seeds, train)")
    try:
        grid = Grid.model_validate(data)
    except ValidationError as err:
        raise MtrecError(validation_message(err, str(path))) from None
    ds_labels = _labels(grid.datasets, DatasetEntry.default_label, f"{path}: datasets")
    model_labels = _labels(grid.models, lambda e: e.name, f"{path}: models")
    bal_labels = _labels(grid.balancers, lambda e: e.name, f"{path}: balancers")
    shared = grid.train.model_dump(exclude={"seed"})
    cells, names = [], set()
    for ds, ds_label in zip(grid.datasets, ds_labels):
        source: dict[str, Any]
        if ds.dataset is not None:
            source = {"dataset": ds.dataset, "dataset_args": ds.dataset_args}
        else:
            assert ds.schema_file is not None  # check_one_source: a data set or a schema
            source = {"schema": str((path.parent / ds.schema_file).resolve())}
        for model, model_label in zip(grid.models, model_labels):
            for bal, bal_label in zip(grid.balancers, bal_labels):
                for seed in grid.seeds:
                    name = "__".join(_slug(x) for x in (ds_label, model_label, bal_label)) + f"__s{seed}"
                    if name in names:
                        raise MtrecError(f"{path}: two cells are named {name}; give the entries distinct labels")
                    names.add(name)
                    config = run_config(
                        {
                            **source,
                            **shared,
                            "seed": seed,
                            "model": model.name,
                            "model_args": model.args,
                            "balancer": bal.name,
                            "balancer_args": bal.args,
                            "task_weights": bal.task_weights,
                        },
                        f"{path}: cell {name}",
                    )
                    cells.append(Cell(name, ds_label, model_label, bal_label, seed, config))
    return grid, cells


def default_parallelism(workers: int | None, threads: int | None, cores: int | None = None) -> tuple[int, int]:
    """``(workers, threads)``: by default ``workers x threads`` = the CPU cores; more is refused."""
    cores = cores or available_cores()
    for flag, value in (("--workers", workers), ("--threads", threads)):
        if value is not None and value < 1:
            raise MtrecError(f"{flag}: must be at least 1 (got {value})")
    if workers is None:
        threads = threads or 1
        workers = max(1, cores // threads)
    elif threads is None:
        threads = max(1, cores // workers)
    if workers * threads > cores:
        raise MtrecError(
            f"--workers {workers} x --threads {threads} = {workers * threads} is more than the {cores} CPU cores; "
            "oversubscribed workers only slow each other down"
        )
    return workers, threads


def _validate_cells(cells: list[Cell]) -> dict[str, dict]:
    """Resolve every data set once (building its encoded store, so workers never race to build it) and
    check every cell's model and balancer options; returns per data set label its train rows and tasks."""
    from mtrec.balancing import validate_balancer_options
    from mtrec.data.store import load_store
    from mtrec.models import validate_model_options

    datasets: dict[str, dict] = {}
    for cell in cells:
        if cell.dataset not in datasets:
            try:
                schema = cell.config.resolve_schema()
                store = load_store(schema)
            except MtrecError as err:
                raise MtrecError(f"dataset {cell.dataset}: {err}") from None
            train = store.split("train")
            datasets[cell.dataset] = {"train_rows": len(train) if train is not None else 0, "tasks": schema.task_names}
        try:
            validate_model_options(cell.config.model, cell.config.model_args)
            validate_balancer_options(
                cell.config.balancer,
                datasets[cell.dataset]["tasks"],
                cell.config.balancer_args,
                cell.config.task_weights,
            )
        except MtrecError as err:
            raise MtrecError(f"cell {cell.name}: {err}") from None
    return datasets


def _worker_init(threads: int) -> None:
    """A spawned worker's start: mtrec's thread policy with ``threads`` torch threads (the OpenMP wait
    setting came in the environment, before torch loaded)."""
    from mtrec.threads import apply_thread_policy

    apply_thread_policy(threads)


@contextlib.contextmanager
def worker_pool(workers: int, threads: int) -> Iterator[ProcessPoolExecutor]:
    """``workers`` spawned worker processes of ``threads`` torch threads each, under mtrec's thread policy
    (:mod:`mtrec.threads`): the OpenMP wait setting and the polars pool size go into the environment they
    inherit (both are read when the worker first imports torch / polars), the torch count is set on start."""
    import multiprocessing

    saved = os.environ.get("POLARS_MAX_THREADS")
    os.environ["POLARS_MAX_THREADS"] = str(threads)
    prepare_openmp()
    try:
        with ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init, initargs=(threads,)
        ) as pool:
            yield pool
    finally:
        if saved is None:
            os.environ.pop("POLARS_MAX_THREADS", None)
        else:
            os.environ["POLARS_MAX_THREADS"] = saved


def run_cell(spec: dict) -> dict:
    """Train, diagnose and time one cell in ``spec["partial"]``, then rename it to ``spec["final"]``.
    Never raises: a failure comes back as ``{"error": ...}`` (and its partial directory is removed)."""
    from mtrec.config import train_from_config

    partial, final = Path(spec["partial"]), Path(spec["final"])
    start = time.perf_counter()
    try:
        if partial.exists():
            shutil.rmtree(partial)
        config = run_config(spec["config"], f"cell {spec['name']}")
        result = train_from_config(config, partial)
        seconds = time.perf_counter() - start
        epochs = len(result.fit.history)
        info: dict[str, Any] = {
            "name": spec["name"],
            "config": spec["config"],
            "threads": spec["threads"],
            "seconds": seconds,
            "epochs": epochs,
            "train_rows": spec["train_rows"],
            "samples_per_second": spec["train_rows"] * epochs / seconds if seconds > 0 else None,
        }
        try:
            from mtrec.diagnostics.diagnose import diagnose_run

            diagnose_run(partial)
        except Exception as err:  # the run is good; only its diagnostics are missing
            info["diagnostics_error"] = f"{type(err).__name__}: {err}"
        write_json_atomic(partial / CELL_INFO, info)
        os.rename(partial, final)
        return {"name": spec["name"], "seconds": seconds}
    except Exception as err:
        shutil.rmtree(partial, ignore_errors=True)
        text = str(err) if isinstance(err, MtrecError) else f"{type(err).__name__}: {err}"
        detail = "" if isinstance(err, MtrecError) else traceback.format_exc(limit=6)
        return {"name": spec["name"], "error": text, "traceback": detail, "seconds": time.perf_counter() - start}


def _prepare(out: Path, cells: list[Cell], threads: int, grid_path: Path) -> list[Cell]:
    """Check ``out`` against an earlier start of the grid, clear what an interruption left, return
    the cells still to run."""
    cells_dir = out / CELLS
    state_path = out / STATE
    state: dict = {}
    if state_path.is_file():
        try:
            state = json.loads(state_path.read_text())
        except json.JSONDecodeError:
            raise MtrecError(f"{state_path}: not valid JSON; not a mtrec bench directory?") from None
        if state.get("threads") != threads:
            raise MtrecError(
                f"{out} was started with --threads {state.get('threads')}; resume with the same --threads "
                f"(runs are bit-reproducible only at a fixed thread count) or use another --out"
            )
    elif out.exists() and any(out.iterdir()):
        raise MtrecError(f"--out {out}: exists, is not empty and is not a mtrec bench directory")
    shutil.rmtree(cells_dir / PARTIAL, ignore_errors=True)  # cells an interruption caught mid-training
    todo = []
    for cell in cells:
        final = cells_dir / cell.name
        if (final / "metrics.json").is_file():
            info_path = final / CELL_INFO
            done = json.loads(info_path.read_text())["config"] if info_path.is_file() else None
            if done != cell.config.to_json():
                raise MtrecError(
                    f"cell {cell.name} in {out} was trained with other options than {grid_path} gives it now; "
                    f"use another --out, or delete {final} to redo it"
                )
            continue
        if final.exists():
            shutil.rmtree(final)  # not finished (no metrics.json): redo
        todo.append(cell)
    state.update({"grid": str(grid_path.resolve()), "threads": threads, "cells": [c.name for c in cells]})
    state.setdefault("failed", {})
    cells_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(state_path, state)
    return todo


def run_grid(
    grid_path: Path,
    out: Path,
    workers: int | None = None,
    threads: int | None = None,
    echo: Callable[[str], None] = print,
) -> dict:
    """Run (or resume) the grid of ``grid_path`` into ``out`` and write ``out/report.html`` and
    ``out/report.md``. Returns ``{"ran", "skipped", "failed", "report"}``."""
    grid_path, out = Path(grid_path), Path(out)
    grid, cells = load_grid(grid_path)
    workers, threads = default_parallelism(workers, threads)
    datasets = _validate_cells(cells)
    todo = _prepare(out, cells, threads, grid_path)
    state_path = out / STATE
    state = json.loads(state_path.read_text())
    failed: dict[str, dict] = {k: v for k, v in state.get("failed", {}).items() if k in {c.name for c in todo}}
    echo(
        f"{len(cells)} cells: {len(cells) - len(todo)} finished before, {len(todo)} to run "
        f"({min(workers, max(len(todo), 1))} worker(s) x {threads} thread(s))"
    )
    specs = [
        {
            "name": c.name,
            "config": c.config.to_json(),
            "threads": threads,
            "train_rows": datasets[c.dataset]["train_rows"],
            "partial": str(out / CELLS / PARTIAL / c.name),
            "final": str(out / CELLS / c.name),
        }
        for c in todo
    ]
    (out / CELLS / PARTIAL).mkdir(parents=True, exist_ok=True)
    done = 0

    def record(result: dict) -> None:
        nonlocal done
        done += 1
        name = result["name"]
        if "error" in result:
            failed[name] = {"error": result["error"], "traceback": result.get("traceback", "")}
            echo(f"[{done}/{len(specs)}] {name}: FAILED: {result['error']}")
        else:
            failed.pop(name, None)
            echo(f"[{done}/{len(specs)}] {name}: {result['seconds']:.1f}s")
        state["failed"] = failed
        write_json_atomic(state_path, state)

    n_workers = min(workers, len(specs))
    if n_workers <= 1:
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for spec in specs:
                record(run_cell(spec))
        finally:
            torch.set_num_threads(before)
    elif specs:
        with worker_pool(n_workers, threads) as pool:
            futures = {pool.submit(run_cell, spec): spec["name"] for spec in specs}
            for future in as_completed(futures):
                try:
                    result = future.result()
                except BrokenProcessPool as err:  # a worker died (killed, out of memory)
                    result = {"name": futures[future], "error": f"worker process died: {err}"}
                record(result)
    shutil.rmtree(out / CELLS / PARTIAL, ignore_errors=True)
    from mtrec.report import write_report

    report = write_report(out, grid, cells, failed)
    echo(f"report: {report['html']} and {report['md']}")
    return {"ran": len(specs), "skipped": len(cells) - len(specs), "failed": sorted(failed), "report": report}


__all__ = ["Cell", "Grid", "default_parallelism", "load_grid", "run_cell", "run_grid"]
