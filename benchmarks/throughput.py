"""Training throughput of mtrec's ``mmoe`` against torch-rechub's ``MMOE``, and Census ingestion time.

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
batches through the same loop; ``torch.set_num_threads(2)``. Runs alternate
between the two sides (A B A B ...) so that load from other processes on a
shared machine falls on both; the table reports medians, the load average and
how many cores other processes kept busy meanwhile.

Ingestion: the full Census train + test into a fresh store, each run in a new
temporary ``MTREC_CACHE``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import re
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import cpu_model, load_average

from mtrec.balancing.fixed import Fixed
from mtrec.data.store import Store, load_store
from mtrec.data.tables import TensorTable
from mtrec.datasets import dataset_schema_path
from mtrec.models.base import build_model
from mtrec.schema import load_schema
from mtrec.train.trainer import TrainConfig, Trainer, seed_everything

REPO = Path(__file__).resolve().parents[1]
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
    """(busy CPU seconds of the whole machine from /proc/stat, CPU seconds of this process)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        busy = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # user .. steal
    except (OSError, ValueError, IndexError):
        busy = float("nan")
    return busy, own.ru_utime + own.ru_stime


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


def rechub_epoch(store: Store, seed: int, warmup: int, steps: int | None, workdir: str) -> tuple[float, int]:
    """Samples per second of one torch-rechub ``MTLTrainer`` epoch; also the parameter count."""
    from torch_rechub.basic.features import DenseFeature, SparseFeature
    from torch_rechub.models.multi_task import MMOE
    from torch_rechub.trainers import MTLTrainer
    from torch_rechub.utils.data import DataGenerator

    layout = store.layout
    train = timed_rows(store, steps)
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
        f"`torch.set_num_threads({THREADS})`, Python {platform.python_version()}.",
        f"Command: `{result['command']}` ({result['date']}).",
        f"Load average (1/5/15 min) before: {result['load_before']}; after: {result['load_after']}. "
        f"Other processes kept on average {result['others']:.2f} of the {result['nproc']} cores busy during the "
        f"measurement (machine busy time from /proc/stat minus this process's CPU time)"
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
        f"| ratio mtrec / torch-rechub | | | **{med_m / med_r:.1f}x** |",
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


def write_section(text: str, path: Path = REPO / "BENCHMARKS.md") -> None:
    """Replace only the body of this benchmark's section (re-read right before writing).

    Hand-written notes after the ``NOTES_MARK`` line of the section are kept.
    """
    content = path.read_text()
    start = content.index(SECTION) + len(SECTION)
    nxt = re.search(r"^## ", content[start:], flags=re.MULTILINE)
    end = start + nxt.start() if nxt else len(content)
    body = content[start:end]
    notes = body[body.index(NOTES_MARK) :].rstrip() + "\n\n" if NOTES_MARK in body else ""
    path.write_text(content[:start] + "\n\n" + text.rstrip() + "\n\n" + notes + content[end:].lstrip("\n"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per side (median reported)")
    parser.add_argument("--warmup", type=int, default=10, help="warm-up batches before each timed epoch")
    parser.add_argument("--steps", type=int, default=None, help="time this many batches instead of a full epoch")
    parser.add_argument("--ingest-runs", type=int, default=3, help="ingestion runs (0 to skip)")
    parser.add_argument("--write", action="store_true", help="update the section of BENCHMARKS.md")
    args = parser.parse_args(argv)

    torch.set_num_threads(THREADS)
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
    ingest = []
    for run in range(args.ingest_runs):
        ingest.append(ingest_seconds())
        print(f"ingest run {run + 1}: {ingest[-1]:.2f} s", flush=True)
    load_after = load_average()
    busy_end, own_end = cpu_seconds()
    # cores kept busy by other processes, on average over the whole measurement
    others = ((busy_end - busy_start) - (own_end - own_start)) / ((time.perf_counter() - wall_start) * os.cpu_count())
    others = max(others, 0.0) * os.cpu_count()
    result = {
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "command": " ".join(
            [".venv/bin/python", "benchmarks/throughput.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "date": time.strftime("%Y-%m-%d"),
        "load_before": load_before,
        "load_after": load_after,
        "others": others,
        "rows": len(timed_rows(store, args.steps)),
        "warmup": args.warmup,
        "full": args.steps is None,
        "runs": args.runs,
        "mtrec": mtrec_runs,
        "rechub": rechub_runs,
        "ingest": ingest,
        **params,
    }
    table = render(result)
    print()
    print(table)
    if args.write:
        write_section(table)
        print(f"\nwrote the section '{SECTION[3:]}' of BENCHMARKS.md")


if __name__ == "__main__":
    main()
