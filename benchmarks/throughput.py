"""Training throughput of mtrec's ``mmoe`` against torch-rechub's ``MMOE`` (the training loop alone and
end to end), and Census ingestion time.

Run by hand (never by the tests), after ``make bench-deps``::

    .venv/bin/python benchmarks/throughput.py            # print the table
    .venv/bin/python benchmarks/throughput.py --write    # also update BENCHMARKS.md

Both sides train on the SAME encoded Census data: mtrec's store of the
embedded data set (full train split, the valid fraction carved off). The peer
is used the way its own Census example uses it: a dict of per-column numpy
arrays, ``DataGenerator(...).generate_dataloader(batch_size=...)`` (a
``DataLoader`` over per-row ``__getitem__``) and ``MTLTrainer``. Both models
have 8 experts with hidden sizes 128-64, towers of 64, embedding size 8 for
all 34 sparse fields plus the 7 dense values (input width 279), batch 1024,
Adam with lr 1e-3 and no weight decay, no dropout, and the same objective:
the mean of the two tasks' binary cross-entropies (torch-rechub divides the
sum by the number of tasks; mtrec gets task weights 0.5, 0.5). torch-rechub's
``MLP`` adds a BatchNorm after every linear layer; that is part of its model
and is kept.

What is timed: one training epoch of each library's own training loop
(``Trainer._train_epoch`` for mtrec, ``MTLTrainer.train_one_epoch`` for
torch-rechub, shuffling included, validation excluded) over the full train
split, or its first ``--steps`` batches, after a warm-up of ``--warmup``
batches through the same loop; ``torch.set_num_threads(2)`` and mtrec's allocator setting
(:func:`mtrec.threads.tune_allocator`, process-wide, so both sides get it; the OpenMP wait stays
libgomp's default here). Runs alternate
between the two sides (A B A B ...) so that load from other processes on a
shared machine falls on both; the table reports medians, the load average and
how many cores other processes kept busy meanwhile.

End to end (``--e2e-runs``): what a user waits for. Each side trains in a new
process, once for 1 epoch and once for 3: ``mtrec train`` with its defaults
(validation, a checkpoint and TensorBoard curves after every epoch, the
gradient conflict monitor), and torch-rechub's ``MTLTrainer.fit`` (validation
after every epoch) then its test evaluation, run by this script's hidden
``--rechub-fit``. An epoch's time is the difference of the two wall times over
2: start-up, data loading and the final evaluation cancel out. Same sizes,
seeds and thread count as above; runs alternate between the sides.

Ingestion: the full Census train + test into a fresh store, each run in a new
temporary ``MTREC_CACHE``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import load_average, publish, run_header

from mtrec.balancing.fixed import Fixed
from mtrec.data.store import Store, load_store
from mtrec.data.tables import TensorTable
from mtrec.datasets import dataset_schema_path
from mtrec.models.base import build_model
from mtrec.schema import load_schema
from mtrec.threads import tune_allocator
from mtrec.train.trainer import TrainConfig, Trainer, seed_everything

SECTION = "## Training throughput and ingestion (issue 2)"
NOTES_MARK = "<!-- notes below this line are kept by benchmarks/throughput.py --write -->"
NUM_EXPERTS = 8
EXPERT_HIDDEN = [128, 64]
TOWER_HIDDEN = [64]
BATCH = 1024
LR = 1e-3
THREADS = 2


# ---- machine -------------------------------------------------------------------------------
def cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine from /proc/stat, CPU seconds of this process and of the
    processes it started and waited for)."""
    self_, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        busy = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # user .. steal
    except (OSError, ValueError, IndexError):
        busy = float("nan")
    return busy, self_.ru_utime + self_.ru_stime + children.ru_utime + children.ru_stime


# ---- mtrec ---------------------------------------------------------------------------------
def timed_rows(store: Store, steps: int | None) -> TensorTable:
    """What one timed epoch covers: the whole train split, or its first ``steps`` batches."""
    train = store.splits["train"]
    return train if steps is None else train.slice(0, steps * BATCH)


def mtrec_epoch(store: Store, seed: int, warmup: int, steps: int | None) -> tuple[float, int]:
    """Samples per second of one mtrec training epoch; also the parameter count."""
    train = timed_rows(store, steps)
    seed_everything(seed)
    options = {"num_experts": NUM_EXPERTS, "expert_hidden": EXPERT_HIDDEN, "tower_hidden": TOWER_HIDDEN}
    model = build_model("mmoe", store.layout, options)
    balancer = Fixed(store.layout.task_names, task_weights=[0.5, 0.5])  # the mean of the two BCEs
    trainer = Trainer(model, balancer, TrainConfig(batch_size=BATCH, lr=LR, seed=seed, progress=False))
    generator = torch.Generator().manual_seed(seed)
    trainer._train_epoch(train.slice(0, warmup * BATCH), 0, generator)  # warm-up: same loop, few batches
    start = time.perf_counter()
    trainer._train_epoch(train, 1, generator)
    elapsed = time.perf_counter() - start
    return len(train) / elapsed, sum(p.numel() for p in model.parameters())


# ---- torch-rechub --------------------------------------------------------------------------
def rechub_inputs(store: Store, table: TensorTable) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The encoded columns as torch-rechub's examples hold them: name -> 1-d numpy array, labels [N, T]."""
    x = {f.name: np.ascontiguousarray(table.sparse[:, i].numpy()) for i, f in enumerate(store.layout.sparse)}
    x.update({name: np.ascontiguousarray(table.dense[:, i].numpy()) for i, name in enumerate(store.layout.dense)})
    return x, table.labels.numpy()


def rechub_model(store: Store, seed: int) -> tuple[torch.nn.Module, list[str]]:
    """torch-rechub's ``MMOE`` with the sizes of mtrec's (seeded as mtrec seeds), and its task types."""
    from torch_rechub.basic.features import DenseFeature, SparseFeature
    from torch_rechub.models.multi_task import MMOE

    layout = store.layout
    features = [SparseFeature(f.name, f.vocab_size, embed_dim=f.embed_dim) for f in layout.sparse]
    features += [DenseFeature(name) for name in layout.dense]
    task_types = ["classification"] * layout.num_tasks
    seed_everything(seed)
    model = MMOE(
        features,
        task_types,
        NUM_EXPERTS,
        expert_params={"dims": EXPERT_HIDDEN},
        tower_params_list=[{"dims": TOWER_HIDDEN} for _ in task_types],
    )
    return model, task_types


def rechub_epoch(store: Store, seed: int, warmup: int, steps: int | None, workdir: str) -> tuple[float, int]:
    """Samples per second of one torch-rechub ``MTLTrainer`` epoch; also the parameter count."""
    from torch_rechub.trainers import MTLTrainer
    from torch_rechub.utils.data import DataGenerator

    train = timed_rows(store, steps)
    model, task_types = rechub_model(store, seed)
    x, y = rechub_inputs(store, train)
    loader, _, _ = DataGenerator(x, y).generate_dataloader(x_val=x, y_val=y, x_test=x, y_test=y, batch_size=BATCH)
    xw, yw = rechub_inputs(store, train.slice(0, warmup * BATCH))
    warm_loader, _, _ = DataGenerator(xw, yw).generate_dataloader(
        x_val=xw, y_val=yw, x_test=xw, y_test=yw, batch_size=BATCH
    )
    trainer = MTLTrainer(
        model,
        task_types=task_types,
        optimizer_params={"lr": LR, "weight_decay": 0.0},
        n_epoch=1,
        device="cpu",
        model_path=workdir,
    )
    quiet = io.StringIO()  # its progress bar and per-epoch print still run, out of sight
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        trainer.train_one_epoch(warm_loader)
        start = time.perf_counter()
        trainer.train_one_epoch(loader)
        elapsed = time.perf_counter() - start
    return len(train) / elapsed, sum(p.numel() for p in model.parameters())


# ---- end to end: a whole training run, as a user starts it ------------------------------------
E2E_EPOCHS = (1, 3)  # epoch time = (wall of the 3-epoch run - wall of the 1-epoch run) / 2


def mtrec_command() -> list[str]:
    """The ``mtrec`` command of this environment (its console script; ``python -m mtrec.cli`` without one)."""
    script = Path(sys.executable).with_name("mtrec")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "mtrec.cli"]


def run_seconds(command: list[str]) -> float:
    """Wall time of ``command`` run to its end as a new process; its output is kept out of sight
    (shown, with the command, if it fails)."""
    start = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed (exit {done.returncode}):\n{done.stdout[-3000:]}")
    return elapsed


def mtrec_train_seconds(epochs: int, seed: int, workdir: str) -> float:
    """Wall time of ``mtrec train`` (Census ``mmoe``, the sizes above) for ``epochs`` epochs, in a new
    process, with the command's defaults otherwise: validation after every epoch, a checkpoint after
    every epoch, TensorBoard curves, the gradient conflict monitor, final valid and test metrics."""
    model_args = (
        f"num_experts={NUM_EXPERTS},expert_hidden=[{','.join(map(str, EXPERT_HIDDEN))}],"
        f"tower_hidden=[{','.join(map(str, TOWER_HIDDEN))}]"
    )
    out = Path(workdir) / f"mtrec-e{epochs}-s{seed}"
    return run_seconds(
        [
            *mtrec_command(),
            "train",
            "--dataset",
            "census",
            "--model",
            "mmoe",
            "--model-args",
            model_args,
            "--task-weights",
            "0.5,0.5",
            "--lr",
            f"{LR:g}",
            "--batch-size",
            str(BATCH),
            "--epochs",
            str(epochs),
            "--seed",
            str(seed),
            "--threads",
            str(THREADS),
            "--no-progress",
            "--out",
            str(out),
        ]
    )


def rechub_fit_seconds(epochs: int, seed: int, workdir: str) -> float:
    """Wall time of a new process that trains torch-rechub's ``MMOE`` with ``MTLTrainer.fit`` for ``epochs``
    epochs (validation after every epoch, the best weights kept and saved) and evaluates the test split:
    :func:`rechub_fit`, run by this script's ``--rechub-fit``."""
    return run_seconds(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--rechub-fit",
            str(epochs),
            "--seed",
            str(seed),
            "--workdir",
            workdir,
        ]
    )


def rechub_fit(epochs: int, seed: int, workdir: str) -> None:
    """What a torch-rechub user runs: the data as its examples hold it (train, valid and test splits of
    the same Census store), ``DataGenerator`` loaders, ``MTLTrainer(...).fit`` and a test evaluation."""
    from torch_rechub.trainers import MTLTrainer
    from torch_rechub.utils.data import DataGenerator

    torch.set_num_threads(THREADS)
    store = load_store(load_schema(dataset_schema_path("census")))
    model, task_types = rechub_model(store, seed)
    (x, y), (xv, yv), (xt, yt) = (rechub_inputs(store, store.split(name)) for name in ("train", "valid", "test"))
    train, valid, test = DataGenerator(x, y).generate_dataloader(
        x_val=xv, y_val=yv, x_test=xt, y_test=yt, batch_size=BATCH
    )
    trainer = MTLTrainer(
        model,
        task_types=task_types,
        optimizer_params={"lr": LR, "weight_decay": 0.0},
        n_epoch=epochs,
        device="cpu",
        model_path=workdir,
    )
    trainer.fit(train, valid, seed=seed)
    trainer.evaluate(trainer.model, test)


def e2e_epoch_seconds(seconds: dict[int, float]) -> float:
    """One epoch's share of a whole run: the difference of the longer and the shorter run per extra epoch
    (start-up, data loading, model building and the final evaluation cancel out)."""
    short, long = E2E_EPOCHS
    return (seconds[long] - seconds[short]) / (long - short)


# ---- ingestion -----------------------------------------------------------------------------
def ingest_seconds() -> float:
    """Wall time to ingest the full Census train + test into a store in a fresh cache."""
    schema_path = dataset_schema_path("census")
    old = os.environ.get("MTREC_CACHE")
    with tempfile.TemporaryDirectory(prefix="mtrec-bench-cache-") as cache:
        os.environ["MTREC_CACHE"] = cache
        try:
            start = time.perf_counter()
            load_store(load_schema(schema_path))
            return time.perf_counter() - start
        finally:
            if old is None:
                os.environ.pop("MTREC_CACHE", None)
            else:
                os.environ["MTREC_CACHE"] = old


# ---- report --------------------------------------------------------------------------------
def render(result: dict) -> str:
    m, r = result["mtrec"], result["rechub"]
    med_m, med_r = statistics.median(m), statistics.median(r)
    fmt = lambda xs: ", ".join(f"{v:,.0f}" for v in xs)  # noqa: E731
    lines = [
        f"Machine: {result['nproc']} CPU cores ({result['cpu']}), torch {result['torch']}, "
        f"`torch.set_num_threads({THREADS})`, glibc malloc tuned as mtrec does it (both sides of the loop), "
        f"Python {platform.python_version()}.",
        f"Command: `{result['command']}` ({result['date']}).",
        f"Load average (1/5/15 min) before: {result['load_before']}; after: {result['load_after']}. "
        f"Other processes kept on average {result['others']:.2f} of the {result['nproc']} cores busy during the "
        f"measurement (machine busy time from /proc/stat minus the CPU time of this process and of those it started)"
        + (
            ": the cores were shared, so both sides ran slower than on an idle machine."
            if result["others"] > 0.1
            else "."
        ),
        "",
        f"Model: MMoE, {NUM_EXPERTS} experts {'-'.join(map(str, EXPERT_HIDDEN))}, towers "
        f"{'-'.join(map(str, TOWER_HIDDEN))}, embedding 8 for 34 sparse fields + 7 dense (input 279), "
        f"batch {BATCH}, Adam lr {LR:g}, mean BCE of the two tasks. Timed: one training epoch over "
        f"{result['rows']:,} Census train rows ({'the full split' if result['full'] else 'the first batches'}) after a {result['warmup']}-batch warm-up, "
        f"{result['runs']} runs per side alternating mtrec / torch-rechub.",
        "",
        "| | parameters | samples/s per run | median samples/s |",
        "|---|---:|---|---:|",
        f"| mtrec `mmoe` (`Trainer`, index-slice batches) | {result['params_mtrec']:,} | {fmt(m)} | **{med_m:,.0f}** |",
        f"| torch-rechub 0.9.0 `MMOE` (`MTLTrainer`, `DataGenerator` loader) | {result['params_rechub']:,} "
        f"| {fmt(r)} | **{med_r:,.0f}** |",
        f"| ratio mtrec / torch-rechub | | | **{med_m / med_r:.2f}x** |",
        "",
    ]
    if result["e2e"]["mtrec"]:
        short, long = E2E_EPOCHS
        rows = result["e2e_rows"]
        sps = {side: [rows / e2e_epoch_seconds(w) for w in runs] for side, runs in result["e2e"].items()}
        med = {side: statistics.median(v) for side, v in sps.items()}
        walls = lambda runs, e: ", ".join(f"{w[e]:.1f}" for w in runs)  # noqa: E731
        lines += [
            f"End to end, as a user runs it: the wall time of a whole training run in a new process, once for "
            f"{short} and once for {long} epochs; an epoch's time is their difference over {long - short} "
            f"(start-up, data loading and the final evaluation cancel out; validation after every epoch stays "
            f"in), samples/s = {rows:,} train rows over it; {len(sps['mtrec'])} runs per side, seeds 0, 1, ..., "
            f"alternating mtrec / torch-rechub. mtrec: `mtrec train --dataset census --model mmoe --model-args "
            f"num_experts={NUM_EXPERTS},expert_hidden=[{','.join(map(str, EXPERT_HIDDEN))}],tower_hidden="
            f"[{','.join(map(str, TOWER_HIDDEN))}] --task-weights 0.5,0.5 --epochs N --threads {THREADS} "
            f"--no-progress --out DIR` with its other defaults (a checkpoint after every epoch, TensorBoard "
            f"curves, the gradient conflict monitor); torch-rechub: `MTLTrainer(n_epoch=N).fit(train, valid)` "
            f"on `DataGenerator` loaders of the same store's splits, then its test evaluation.",
            "",
            f"| end to end | wall {short} epoch (s) | wall {long} epochs (s) | samples/s per run | median samples/s |",
            "|---|---|---|---|---:|",
            f"| mtrec `mtrec train` | {walls(result['e2e']['mtrec'], short)} | {walls(result['e2e']['mtrec'], long)} "
            f"| {fmt(sps['mtrec'])} | **{med['mtrec']:,.0f}** |",
            f"| torch-rechub 0.9.0 `MTLTrainer.fit` | {walls(result['e2e']['rechub'], short)} | "
            f"{walls(result['e2e']['rechub'], long)} | {fmt(sps['rechub'])} | **{med['rechub']:,.0f}** |",
            f"| ratio mtrec / torch-rechub | | | | **{med['mtrec'] / med['rechub']:.2f}x** |",
            "",
        ]
    if result["ingest"]:
        ing = result["ingest"]
        lines += [
            f"Ingestion of the full Census train + test (199,523 + 99,762 rows, CSV.gz) into a fresh store: "
            f"runs {', '.join(f'{v:.2f}' for v in ing)} s, median **{statistics.median(ing):.2f} s**.",
            "",
        ]
    lines.append(
        "torch-rechub's parameter count includes the BatchNorm layers its `MLP` puts after every linear layer."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per side (median reported)")
    parser.add_argument("--warmup", type=int, default=10, help="warm-up batches before each timed epoch")
    parser.add_argument("--steps", type=int, default=None, help="time this many batches instead of a full epoch")
    parser.add_argument(
        "--e2e-runs", type=int, default=3, help="end-to-end runs per side, each a 1- and a 3-epoch run (0 to skip)"
    )
    parser.add_argument("--ingest-runs", type=int, default=3, help="ingestion runs (0 to skip)")
    parser.add_argument("--write", action="store_true", help="update the section of BENCHMARKS.md")
    # internal: the torch-rechub side of one end-to-end run, in its own process
    parser.add_argument("--rechub-fit", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rechub_fit:
        rechub_fit(args.rechub_fit, args.seed, args.workdir)
        return

    torch.set_num_threads(THREADS)
    tune_allocator()  # what every mtrec entry point does; process-wide, so the peer's loop gets it as well
    load_before = load_average()
    busy_start, own_start, wall_start = *cpu_seconds(), time.perf_counter()
    store = load_store(load_schema(dataset_schema_path("census")))
    mtrec_runs: list[float] = []
    rechub_runs: list[float] = []
    params = {}
    with tempfile.TemporaryDirectory(prefix="rechub-bench-") as workdir:
        for run in range(args.runs):
            sps, params["params_mtrec"] = mtrec_epoch(store, seed=run, warmup=args.warmup, steps=args.steps)
            mtrec_runs.append(sps)
            print(f"run {run + 1}: mtrec        {sps:10,.0f} samples/s   (load {load_average()})", flush=True)
            sps, params["params_rechub"] = rechub_epoch(
                store, seed=run, warmup=args.warmup, steps=args.steps, workdir=workdir
            )
            rechub_runs.append(sps)
            print(f"run {run + 1}: torch-rechub {sps:10,.0f} samples/s   (load {load_average()})", flush=True)
    e2e: dict[str, list[dict[int, float]]] = {"mtrec": [], "rechub": []}  # per run: epochs -> wall seconds
    with tempfile.TemporaryDirectory(prefix="e2e-bench-") as workdir:
        for run in range(args.e2e_runs):
            for side in e2e:
                e2e[side].append({})
            for epochs in E2E_EPOCHS:  # alternating sides, so that load from other processes falls on both
                e2e["mtrec"][-1][epochs] = mtrec_train_seconds(epochs, run, workdir)
                e2e["rechub"][-1][epochs] = rechub_fit_seconds(epochs, run, workdir)
            for side, name in (("mtrec", "mtrec train"), ("rechub", "MTLTrainer  ")):
                walls = e2e[side][-1]
                epoch = e2e_epoch_seconds(walls)
                print(
                    f"e2e run {run + 1}: {name} {', '.join(f'{e} epoch(s) {walls[e]:.1f} s' for e in E2E_EPOCHS)}: "
                    f"{epoch:.2f} s/epoch, {len(store.split('train')) / epoch:10,.0f} samples/s   "
                    f"(load {load_average()})",
                    flush=True,
                )
    ingest = []
    for run in range(args.ingest_runs):
        ingest.append(ingest_seconds())
        print(f"ingest run {run + 1}: {ingest[-1]:.2f} s", flush=True)
    header = run_header("benchmarks/throughput.py", argv, load_before, date=time.strftime("%Y-%m-%d"))
    busy_end, own_end = cpu_seconds()
    # cores kept busy by other processes, on average over the whole measurement
    others = ((busy_end - busy_start) - (own_end - own_start)) / ((time.perf_counter() - wall_start) * os.cpu_count())
    others = max(others, 0.0) * os.cpu_count()
    result = {
        **header,
        "others": others,
        "rows": len(timed_rows(store, args.steps)),
        "warmup": args.warmup,
        "full": args.steps is None,
        "runs": args.runs,
        "mtrec": mtrec_runs,
        "rechub": rechub_runs,
        "e2e": e2e,
        "e2e_rows": len(store.split("train")),
        "ingest": ingest,
        **params,
    }
    publish(render(result), args.write, SECTION, NOTES_MARK)


if __name__ == "__main__":
    main()
