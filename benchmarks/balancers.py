"""Training-step time of every balancing strategy relative to ``fixed`` (run by hand, never by the tests).

One run measures, side by side, every registered mtrec balancer and LibMTL 1.1.5's PCGrad,
GradVac, MGDA, CAGrad, GradNorm, UW and DWA (plus its EW, equal weighting, as a check that
both harnesses cost the same) on the same network: ``mmoe`` with its default options on the
full Census-Income training split, batch 1024, once with the two Census tasks (income,
never married) and once with four (plus ``female`` from the ``sex`` column and
``householder`` from ``household_summary``; those columns then stop being features).

A step is what the trainer does per batch: forward, per-task losses, zero_grad, the balancer's
backward, the Adam step (and, for mtrec, the balancer's ``stats()``). Each method runs
``--steps`` timed steps after ``--warmup`` untimed ones; the methods are interleaved in
``--repeats`` rounds, and in every round each method's block of steps comes right after a
block of ``fixed`` (so a change in the machine's load hits both alike). The table shows the
median over rounds of the per-step time and of its ratio to the adjacent ``fixed`` block.

LibMTL is installed without its dependencies (``pip install --no-deps LibMTL==1.1.5``, so
pip never replaces torch). Its package ``__init__`` imports its ResNet models, which need an
old torchvision; only ``LibMTL.weighting`` is used here, so the script loads that subpackage
alone. Its methods are hosted the way LibMTL's trainer hosts them: the weighting class mixed
into an object that names the shared parameters (``model.shared_parameters()``), with
``rep_grad=False``, and the hyper-parameters of LibMTL's ``config.py`` (CAGrad ``calpha=0.5,
rescale=1``, MGDA ``mgda_gn='none'``, GradNorm ``alpha=1.5``, DWA ``T=2``) except GradVac's
``beta``, set to the paper's and mtrec's 0.01 instead of LibMTL's 0.5 (the cost is the same);
GradNorm and DWA run their adaptive branch (epoch > 1).

Usage: ``python benchmarks/balancers.py [--tasks 2 4] [--steps 20] [--repeats 3] [--threads 1]``
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml

from mtrec.balancing import BALANCERS, StepContext, gradient_balancer_names
from mtrec.data.store import load_store
from mtrec.datasets import dataset_schema_path
from mtrec.models import build_model
from mtrec.schema import load_schema
from mtrec.train.trainer import seed_everything

LIBMTL_METHODS = {  # LibMTL class name -> backward() keyword arguments
    "EW": {},
    "PCGrad": {},
    "GradVac": {"beta": 0.01},
    "MGDA": {"mgda_gn": "none"},
    "CAGrad": {"calpha": 0.5, "rescale": 1},
    "GradNorm": {"alpha": 1.5},
    "UW": {},
    "DWA": {"T": 2.0},
}
OURS_FOR = {
    "EW": "fixed",
    "PCGrad": "pcgrad",
    "GradVac": "gradvac",
    "MGDA": "mgda",
    "CAGrad": "cagrad",
    "GradNorm": "gradnorm",
    "UW": "uw",
    "DWA": "dwa",
}
EXTRA_TASKS = [  # four-task variant: two more Census labels, removed from the features
    {"name": "female", "type": "binary", "label": "sex", "positive": ["Female"]},
    {"name": "householder", "type": "binary", "label": "household_summary", "positive": ["Householder"]},
]
GRADIENT_METHODS = gradient_balancer_names()
VARIANTS = {  # extra rows: the methods on every shared parameter, embedding tables included, as LibMTL does
    "pcgrad (embeddings=balance)": ("pcgrad", {"embeddings": "balance"}),
    "mgda (embeddings=balance)": ("mgda", {"embeddings": "balance"}),
    # and each gradient method at the representation level (mmoe: the expert outputs every gate reads)
    **{f"{m} (level=repr)": (m, {"level": "repr"}) for m in GRADIENT_METHODS},
}
DROPPED_FEATURES = {"sex", "household_stat", "household_summary"}  # household_stat details household_summary


def census_schema(tasks: int, folder: Path) -> Path:
    """The embedded Census schema (2 tasks) or its 4-task variant, with absolute data paths."""
    path = dataset_schema_path("census")
    if tasks == 2:
        return path
    data = yaml.safe_load(path.read_text())
    data["name"] = "census4"
    data["source"] = {k: str(path.parent / v) for k, v in data["source"].items()}
    data["features"] = [f for f in data["features"] if f.get("column", f["name"]) not in DROPPED_FEATURES]
    data["tasks"] = data["tasks"] + EXTRA_TASKS
    out = folder / "census4.yaml"
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def load_libmtl_weighting() -> types.ModuleType | None:
    """``LibMTL.weighting`` without running ``LibMTL/__init__.py`` (which needs an old torchvision)."""
    spec = importlib.util.find_spec("LibMTL")
    if spec is None or not spec.submodule_search_locations:
        return None
    package = types.ModuleType("LibMTL")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules.setdefault("LibMTL", package)
    import LibMTL.weighting as weighting  # noqa: E402

    return weighting


def libmtl_host(weighting: types.ModuleType, cls_name: str, model: torch.nn.Module) -> torch.nn.Module:
    """A LibMTL weighting object bound to ``model`` as LibMTL's trainer binds it to its networks."""
    base = getattr(weighting, cls_name)
    shared = model.shared_parameters()
    T = model.num_tasks

    class Host(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.task_num, self.task_name = T, list(model.task_names)
            self.device, self.rep_grad = torch.device("cpu"), False
            self.epoch = 2  # past the warm-up epochs, so GradNorm and DWA run their adaptive branch
            self.train_loss_buffer = np.ones((T, 3)) * np.array([0.7, 0.6, 0.55])
            self.init_param()

        def get_share_params(self):
            return shared

        def zero_grad_share_params(self) -> None:
            for p in shared:
                if p.grad is not None:
                    p.grad.zero_()

    return Host()


def make_step(method: str, model, batches, libmtl) -> Callable[[int], None]:
    """A closure running training step ``i`` with ``method`` (``lib:Name`` for LibMTL)."""
    if method.startswith("lib:"):
        name = method[4:]
        host = libmtl_host(libmtl, name, model)
        kwargs = LIBMTL_METHODS[name]
        opt = torch.optim.Adam(list(model.parameters()) + list(host.parameters()), lr=1e-3)

        def step(i: int) -> None:
            batch = batches[i % len(batches)]
            out = model(batch)
            losses = model.losses(out, batch)
            opt.zero_grad(set_to_none=False)  # LibMTL writes into existing .grad tensors
            host.backward(losses, **kwargs)
            opt.step()

        return step
    name, options = VARIANTS.get(method, (method, {}))
    balancer = BALANCERS.get(name)(model.task_names, task_weights=None, **options)
    opt = torch.optim.Adam(list(model.parameters()) + list(balancer.parameters()), lr=1e-3)
    counter = [0]

    def step(i: int) -> None:
        batch = batches[i % len(batches)]
        out = model(batch)
        losses = model.losses(out, batch)
        opt.zero_grad(set_to_none=True)
        balancer.backward(losses, StepContext(step=counter[0], epoch=1, model=model, shared=out.shared), out.aux_loss)
        opt.step()
        balancer.stats()
        counter[0] += 1

    return step


def stepper(method: str, layout, batches, libmtl, warmup: int) -> Callable[[int], None]:
    """A freshly seeded ``mmoe`` with ``method``, already run for ``warmup`` untimed steps."""
    seed_everything(0)
    model = build_model("mmoe", layout)
    model.train()
    step = make_step(method, model, batches, libmtl)
    for i in range(warmup):
        step(i)
    return step


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK = CLOCKS["wall"]


def seconds_per_step(step: Callable[[int], None], steps: int) -> float:
    """Seconds per step on ``CLOCK``: wall time, or (``--clock cpu``) this process's CPU time, which
    other jobs on a shared machine do not inflate by taking the cores away (with one torch thread
    the two agree on an idle machine)."""
    start = CLOCK()
    for i in range(steps):
        step(i)
    return (CLOCK() - start) / steps


def run(tasks: int, args, libmtl) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        store = load_store(load_schema(census_schema(tasks, Path(tmp))))
    train = store.split("train")
    g = torch.Generator().manual_seed(0)
    batches = [train.take(torch.randint(0, len(train), (args.batch_size,), generator=g)) for _ in range(8)]
    methods = BALANCERS.names() + list(VARIANTS)
    if libmtl is not None:
        methods += [f"lib:{name}" for name in LIBMTL_METHODS]
    if args.only:
        methods = ["fixed"] + [m for m in methods if m in args.only and m != "fixed"]
    steppers: dict[str, Callable[[int], None]] = {}
    errors: dict[str, str] = {}
    for m in methods:
        try:
            steppers[m] = stepper(m, store.layout, batches, libmtl, args.warmup)
        except Exception as err:  # a peer that cannot host this network is reported, not fatal
            errors[m] = f"{type(err).__name__}: {err}".splitlines()[0][:120]
    times: dict[str, list[float]] = {m: [] for m in steppers}
    ratios: dict[str, list[float]] = {m: [] for m in steppers}
    load_before = os.getloadavg()
    for r in range(args.repeats):
        for m, step in steppers.items():
            # fixed right before each method: a change in the machine's load hits both alike
            fixed = seconds_per_step(steppers["fixed"], args.steps)
            t = fixed if m == "fixed" else seconds_per_step(step, args.steps)
            times[m].append(t)
            ratios[m].append(t / fixed)
            print(f"  [{tasks} tasks, round {r + 1}] {m:<16} {t * 1000:8.1f} ms/step  x{t / fixed:.2f}", flush=True)
    return {
        "tasks": store.layout.task_names,
        "ms": {m: statistics.median(v) * 1000 for m, v in times.items()},
        "ratio": {m: statistics.median(v) for m, v in ratios.items()},
        "errors": errors,
        "load": (load_before, os.getloadavg()),
    }


def table(results: dict[int, dict]) -> str:
    counts = sorted(results)
    head = (
        "| strategy | "
        + " | ".join(f"{t} tasks: ms/step | x fixed | LibMTL ms/step | LibMTL x fixed" for t in counts)
        + " |"
    )
    sep = "|---|" + "---:|---:|---:|---:|" * len(counts)
    lib_of = {v: k for k, v in OURS_FOR.items()}
    rows = [head, sep]
    for m in BALANCERS.names() + list(VARIANTS):
        if all(m not in results[t]["ms"] for t in counts):
            continue
        cells = []
        for t in counts:
            res = results[t]
            ours = f"{res['ms'][m]:.1f} | {res['ratio'][m]:.2f}" if m in res["ms"] else "failed | -"
            lib = lib_of.get(VARIANTS.get(m, (m,))[0])
            key = f"lib:{lib}" if lib else None
            if key is None:
                peer = "- | -"
            elif key in res["ms"]:
                peer = f"{res['ms'][key]:.1f} | {res['ratio'][key]:.2f}"
            elif key in res["errors"]:
                peer = "cannot host | -"
            else:
                peer = "not run | -"
            cells.append(f"{ours} | {peer}")
        rows.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 4], choices=[2, 4])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; 1 by default: on a CPU shared with other jobs, 2 threads spin and wait",
    )
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall time, or process CPU time (robust to other jobs taking the cores; use with --threads 1)",
    )
    parser.add_argument("--no-libmtl", action="store_true")
    parser.add_argument("--only", nargs="+", help="measure only these rows (and fixed), e.g. pcgrad lib:PCGrad")
    args = parser.parse_args()
    global CLOCK
    CLOCK = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    libmtl = None if args.no_libmtl else load_libmtl_weighting()
    if libmtl is None and not args.no_libmtl:
        print("LibMTL not installed (pip install --no-deps LibMTL==1.1.5): measuring mtrec only", flush=True)
    results = {t: run(t, args, libmtl) for t in args.tasks}
    print()
    print(
        f"torch {torch.__version__}, {args.threads} threads, {args.clock} clock, batch {args.batch_size}, {args.steps} steps x "
        f"{args.repeats} rounds (median), cpu count {os.cpu_count()}"
    )
    for t, res in results.items():
        (b1, b5, b15), (a1, a5, a15) = res["load"]
        print(
            f"{t} tasks ({', '.join(res['tasks'])}): load average before {b1:.2f}/{b5:.2f}/{b15:.2f}, "
            f"after {a1:.2f}/{a5:.2f}/{a15:.2f}"
        )
        for m, err in res["errors"].items():
            print(f"  {m} could not run: {err}")
        if "lib:EW" in res["ms"]:
            print(
                f"  harness check: LibMTL EW (its plain sum) took x{res['ratio']['lib:EW']:.2f} the time of mtrec fixed"
            )
    print()
    print(table(results))


if __name__ == "__main__":
    main()
