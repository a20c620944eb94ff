"""Larger than memory: ingestion and one ``mmoe`` epoch on a generated log of 20M rows x 30 columns.

Run by hand (never by the tests)::

    .venv/bin/python benchmarks/scale.py                         # 20M rows under /tmp/mtrec-scale
    .venv/bin/python benchmarks/scale.py --rows 2000000 --dir /tmp/scale-small --json figures.json

Steps, each in a fresh child process whose peak memory is sampled every 20 ms by a thread reading
``/proc/self/status`` (``VmRSS``: all resident pages; ``RssAnon``: anonymous pages only, i.e. not the file
pages of the memory-mapped store or of the page cache):

1. **generate** (skipped when the shards are there): a log imitating an interaction log, written as
   Parquet shards: ``user_id`` (1M users, skewed), ``item_id`` (200k items, skewed), 14 more integer
   categorical columns (cardinalities 2 to 50k), 2 text categorical columns, 8 dense columns, 4 labels
   (click, like, follow, and a watch-time regression): 30 columns. Nothing here is real data.
2. **disk**: the write bandwidth of the store's disk, a ``dd``-like write of ``--disk-gib`` GiB in 16 MiB
   blocks followed by ``fsync``.
3. **polars**: a plain in-memory ``pl.read_parquet`` of the shards (the reference for the ratio).
4. **ingest**: ``load_store`` of a schema whose source is the shard directory, into a fresh cache (chunked
   ingestion into the memory-mapped store); rows/s = rows of the log / seconds.
5. **train**: ``mtrec train --model mmoe --epochs 1`` on that store (one epoch over the train split, then
   the validation and test evaluation, uAUC included), timed as a whole and per epoch (from its log line).
6. **gauc** (``--steps gauc``, not in the default steps): ``grouped_auc`` over 10M random rows of 1M users.

A step given more than once (``--steps ingest,ingest,ingest``) is reported by its median run (by seconds), every
run's seconds and peak memory kept beside it.

Targets (issue 13): ingestion >= 1M rows/s, peak RssAnon <= 4 GiB in both ingestion and training.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SPARSE_INT = {  # name -> cardinality (besides user_id and item_id)
    "author_id": 50_000,
    "music_id": 20_000,
    "tag_1": 5_000,
    "tag_2": 2_000,
    "city": 1_000,
    "device": 500,
    "channel": 100,
    "hour": 24,
    "weekday": 7,
    "age_bucket": 8,
    "gender": 3,
    "net": 5,
    "is_new": 2,
    "os_version": 60,
}
SPARSE_TEXT = {"province": 34, "page": 12}
DENSE = [f"d{i}" for i in range(8)]
LABELS = ["click", "like", "follow", "watch_time"]


def generate(folder: Path, rows: int, shards: int, seed: int = 0) -> None:
    """Write ``rows`` rows as ``shards`` Parquet files ``part-XXXX.parquet`` in ``folder``."""
    import polars as pl

    folder.mkdir(parents=True, exist_ok=True)
    per = -(-rows // shards)
    for s in range(shards):
        n = min(per, rows - s * per)
        if n <= 0:
            break
        rng = np.random.default_rng([seed, s])
        # skewed ids: a Zipf head, and a uniform tail for 70% (users) / 50% (items) of the rows
        head = np.minimum(rng.zipf(1.2, n), 1_000_000) - 1
        user = np.where(rng.random(n) < 0.7, rng.integers(0, 1_000_000, n), head * 7919 % 1_000_000)
        head = np.minimum(rng.zipf(1.3, n), 200_000) - 1
        item = np.where(rng.random(n) < 0.5, rng.integers(0, 200_000, n), head * 7919 % 200_000)
        cols: dict[str, np.ndarray] = {"user_id": user.astype(np.int64), "item_id": item.astype(np.int64)}
        for name, card in SPARSE_INT.items():
            cols[name] = rng.integers(0, card, n, dtype=np.int64)
        for name, card in SPARSE_TEXT.items():
            words = np.array([f"{name}_{i}" for i in range(card)])
            cols[name] = words[rng.integers(0, card, n)]
        dense = rng.standard_normal((n, len(DENSE))).astype(np.float32)
        for i, name in enumerate(DENSE):
            cols[name] = dense[:, i] * (i + 1) + i
        logit = 0.6 * dense[:, 0] - 0.4 * dense[:, 1] + 0.3 * (cols["hour"] > 18) - 1.5
        click = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int8)
        cols["click"] = click
        cols["like"] = (click * (rng.random(n) < 0.2 + 0.1 * (dense[:, 2] > 0))).astype(np.int8)
        cols["follow"] = (click * (rng.random(n) < 0.05)).astype(np.int8)
        cols["watch_time"] = np.round(rng.gamma(2.0, 10.0, n) * (1 + click), 2).astype(np.float32)
        frame = pl.DataFrame(cols)
        frame.write_parquet(folder / f".part-{s:04d}.parquet.tmp")
        os.replace(folder / f".part-{s:04d}.parquet.tmp", folder / f"part-{s:04d}.parquet")


def write_schema(path: Path, data: Path) -> Path:
    """The schema of the generated log (random split: 10% valid, 10% test; uAUC per user_id)."""
    import yaml

    features = [{"name": "user_id", "type": "sparse", "embed_dim": 8}, {"name": "item_id", "type": "sparse"}]
    features += [{"name": c, "type": "sparse"} for c in [*SPARSE_INT, *SPARSE_TEXT]]
    features += [{"name": c, "type": "dense"} for c in DENSE]
    tasks: list[dict[str, object]] = [{"name": t, "type": "binary", "label": t} for t in LABELS[:3]]
    tasks.append({"name": "watch_time", "type": "regression", "label": "watch_time", "standardize": True})
    schema = {
        "name": "scale",
        "source": {"train": str(data)},
        "format": {"type": "parquet"},
        "split": {"valid": 0.1, "test": 0.1},
        "user": "user_id",
        "features": features,
        "tasks": tasks,
    }
    path.write_text(yaml.safe_dump(schema, sort_keys=False))
    return path


class PeakMemory:
    """Peak ``VmRSS`` and ``RssAnon`` of this process, sampled by a daemon thread."""

    def __init__(self, every: float = 0.02) -> None:
        self.every = every
        self.peak = {"VmRSS": 0, "RssAnon": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in self.peak:
                self.peak[key] = max(self.peak[key], int(value.split()[0]) * 1024)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.every)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def step(name: str, args: argparse.Namespace) -> dict:
    """Run one measured step in this (child) process; returns its figures."""
    data, work = Path(args.dir) / "data", Path(args.dir)
    out: dict = {}
    if name in ("ingest", "train"):  # imports (torch) before the clock starts
        os.environ["MTREC_CACHE"] = str(work / "cache")
        import mtrec.cli  # noqa: F401
        import mtrec.data.store  # noqa: F401
    with PeakMemory() as mem:
        start = time.perf_counter()
        if name == "disk":
            block = os.urandom(16 << 20)
            target = work / "disk.bin"
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                for _ in range(int(args.disk_gib * 64)):
                    os.write(fd, block)
                os.fsync(fd)
            finally:
                os.close(fd)
                target.unlink()
            out["bytes"] = int(args.disk_gib * (1 << 30))
        elif name == "gauc":  # uAUC / GAUC over 10M rows of 1M users (float32 scores, ties), timed alone
            from mtrec.metrics.core import grouped_auc

            rng = np.random.default_rng(0)
            n = 10_000_000
            user = rng.integers(0, 1_000_000, n)
            y = (rng.random(n) < 0.3).astype(np.float32)
            p = (rng.random(n).astype(np.float32) * 0.5 + y * 0.2).astype(np.float32)
            p[::7] = np.round(p[::7], 2)
            runs = []
            for _ in range(3):  # the first one also pays the first touch of its temporaries' pages
                start = time.perf_counter()
                out["uauc"], out["gauc"] = grouped_auc(y, p, user)
                runs.append(time.perf_counter() - start)
            out["runs"] = runs
            out["seconds"] = sorted(runs)[1]  # the median run
        elif name == "polars":
            import polars as pl

            frame = pl.read_parquet(data)
            out["rows"], out["columns"] = frame.height, frame.width
            out["bytes_in_memory"] = int(frame.estimated_size())
        elif name == "ingest":
            from mtrec.data.store import load_store
            from mtrec.schema import load_schema

            store = load_store(load_schema(work / "scale.yaml"), rebuild=True)
            out["rows"] = {split: len(t) for split, t in store.splits.items()}
            out["store_bytes"] = sum(p.stat().st_size for p in store.path.iterdir())
        elif name == "train":
            from mtrec.cli import main

            argv = [
                "train",
                "--schema",
                str(work / "scale.yaml"),
                "--model",
                "mmoe",
                "--epochs",
                "1",
                "--batch-size",
                str(args.batch_size),
                "--threads",
                str(args.threads),
                "--out",
                str(work / "run"),
                "--overwrite",
                "--no-tensorboard",
                "--no-progress",
            ]
            code = 0
            sys.argv = ["mtrec", *argv]
            try:
                main()
            except SystemExit as exit_:
                code = int(exit_.code or 0)
            out["exit_code"] = code
        out.setdefault("seconds", time.perf_counter() - start)
    out.update({k.lower(): v for k, v in mem.peak.items()})
    return out


def run_child(name: str, args: argparse.Namespace) -> dict:
    """``step(name)`` in a fresh interpreter (its own peak memory); its output is echoed."""
    command = [sys.executable, __file__, "--child", name, "--dir", args.dir, "--disk-gib", str(args.disk_gib)]
    command += ["--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    proc = subprocess.run(command, capture_output=True, text=True)
    sys.stderr.write(proc.stderr[-4000:])
    lines = proc.stdout.splitlines()
    for line in lines[:-1]:
        print(f"  [{name}] {line}", flush=True)
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"step {name} failed ({proc.returncode})")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000_000)
    parser.add_argument("--shards", type=int, default=20)
    parser.add_argument("--dir", default="/tmp/mtrec-scale", help="data, cache and run go here")
    parser.add_argument("--disk-gib", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", default="disk,polars,ingest,train")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = step(args.child, args)
        print(json.dumps(result))
        return
    from machine import cpu_model, load_average

    work = Path(args.dir)
    data = work / "data"
    existing = sorted(data.glob("part-*.parquet")) if data.is_dir() else []
    if not existing:
        start = time.perf_counter()
        generate(data, args.rows, args.shards)
        print(f"generated {args.rows:,} rows in {args.shards} shards in {time.perf_counter() - start:.1f} s")
    write_schema(work / "scale.yaml", data)
    figures: dict = {
        "machine": f"{os.cpu_count()} cores ({cpu_model()})",
        "load_before": load_average(),
        "data_bytes": sum(p.stat().st_size for p in data.glob("part-*.parquet")),
    }
    runs: dict[str, list[dict]] = {}
    for name in [s for s in args.steps.split(",") if s]:
        runs.setdefault(name, []).append(run_child(name, args))
        print(name, json.dumps(runs[name][-1]), flush=True)
    for name, done in runs.items():  # a step given more than once: its median run (by seconds), all runs kept
        figures[name] = dict(sorted(done, key=lambda r: r["seconds"])[(len(done) - 1) // 2])
        if len(done) > 1:
            figures[name]["repeats"] = [{k: r[k] for k in ("seconds", "vmrss", "rssanon")} for r in done]
    figures["load_after"] = load_average()
    gib = 1 << 30
    if "ingest" in figures:
        rows = sum(figures["ingest"]["rows"].values())
        figures["ingest"]["rows_per_s"] = rows / figures["ingest"]["seconds"]
        print(
            f"ingestion: {rows:,} rows in {figures['ingest']['seconds']:.1f} s = "
            f"{figures['ingest']['rows_per_s'] / 1e6:.2f}M rows/s; peak RSS {figures['ingest']['vmrss'] / gib:.2f} GiB, "
            f"RssAnon {figures['ingest']['rssanon'] / gib:.2f} GiB; store {figures['ingest']['store_bytes'] / gib:.2f} GiB"
        )
        if "repeats" in figures["ingest"]:
            each = ", ".join(f"{r['seconds']:.1f}" for r in figures["ingest"]["repeats"])
            print(f"  median of {len(figures['ingest']['repeats'])} ingestion runs ({each} s)")
    if "disk" in figures:
        figures["disk"]["mb_per_s"] = figures["disk"]["bytes"] / figures["disk"]["seconds"] / 1e6
        print(f"disk write (fsync): {figures['disk']['mb_per_s']:.0f} MB/s")
    if "polars" in figures:
        p = figures["polars"]
        print(
            f"pl.read_parquet: {p['seconds']:.1f} s, peak RSS {p['vmrss'] / gib:.2f} GiB, "
            f"RssAnon {p['rssanon'] / gib:.2f} GiB"
        )
        if "ingest" in figures:
            i = figures["ingest"]
            figures["ratio"] = {
                "seconds": i["seconds"] / p["seconds"],
                "rssanon": i["rssanon"] / p["rssanon"],
                "vmrss": i["vmrss"] / p["vmrss"],
            }
            print("ingestion / in-memory polars read:", json.dumps(figures["ratio"]))
    if "train" in figures:
        log = (work / "run" / "history.json").read_text() if (work / "run" / "history.json").exists() else ""
        if log:
            history = json.loads(log)
            figures["train"]["history"] = history
        t = figures["train"]
        print(
            f"train (1 epoch + evaluation): {t['seconds']:.1f} s, peak RSS {t['vmrss'] / gib:.2f} GiB, "
            f"RssAnon {t['rssanon'] / gib:.2f} GiB"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2, default=str))


if __name__ == "__main__":
    main()
