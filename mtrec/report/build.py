"""The bench report: what a grid's cells say, as tables and figures (see :func:`write_report`)."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtrec import __version__
from mtrec.errors import MtrecError
from mtrec.metrics.core import HIGHER_IS_BETTER
from mtrec.report import plots
from mtrec.report.document import Bullets, Document, Heading, Image, Para, Pre, Table, write_document
from mtrec.report.stats import CONFIDENCE, dominated_by, paired_t_interval

if TYPE_CHECKING:  # pragma: no cover
    from mtrec.bench import Cell, Grid

RELATE = "relate.json"


@dataclass
class CellData:
    cell: Cell
    metrics: dict | None
    info: dict | None
    history: list | None
    diagnostics: dict | None
    error: str | None


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (json.JSONDecodeError, OSError):
        return None


def _collect(out: Path, cells: list[Cell], failed: dict[str, dict]) -> list[CellData]:
    data = []
    for c in cells:
        d = out / "cells" / c.name
        data.append(
            CellData(
                c,
                _read(d / "metrics.json"),
                _read(d / "cell.json"),
                _read(d / "history.json"),
                _read(d / "diagnostics.json"),
                failed.get(c.name, {}).get("error"),
            )
        )
    return data


def _fmt(v: float | None, digits: int = 4) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def _signed(v: float | None, digits: int = 4) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:+.{digits}f}"


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def _mean_std_text(values: list[float]) -> str:
    m, s = _mean_std(values)
    if m is None:
        return "—"
    return f"{m:.4f} ± {s:.4f}" if s is not None else f"{m:.4f}"


def _primary_metric(values: dict) -> str:
    for m in ("auc", "mse"):
        if m in values:
            return m
    return next(iter(values))


def _by_epoch(runs: list[list[float | None]]) -> list[float | None]:
    """Per epoch, the mean over the runs that have a value there (early stopping ends runs at different epochs)."""
    length = max((len(r) for r in runs), default=0)
    out = []
    for e in range(length):
        vals = [v for r in runs if e < len(r) and (v := r[e]) is not None and math.isfinite(v)]
        out.append(statistics.mean(vals) if vals else None)
    return out


class _Dataset:
    """The finished cells of one data set, grouped into rows (model x balancer) over seeds."""

    def __init__(self, label: str, data: list[CellData], n_balancers: int, baseline: str) -> None:
        self.label = label
        self.data = data
        self.finished = [d for d in data if d.metrics is not None]
        self.split = "test" if self.finished and all((d.metrics or {}).get("test") for d in self.finished) else "valid"
        first = (self.finished[0].metrics or {})[self.split] if self.finished else {}
        self.tasks = list(first)
        self.metric = {t: _primary_metric(v) for t, v in first.items()}
        self.rows: dict[tuple[str, str], list[CellData]] = {}
        for d in data:
            self.rows.setdefault((d.cell.model, d.cell.balancer), [])
            if d.metrics is not None:
                self.rows[(d.cell.model, d.cell.balancer)].append(d)
        self.n_balancers = n_balancers
        self.baseline = baseline

    def row_label(self, key: tuple[str, str]) -> str:
        return key[0] if self.n_balancers == 1 else f"{key[0]} / {key[1]}"

    def value(self, d: CellData, task: str) -> float | None:
        v = (d.metrics or {}).get(self.split, {}).get(task, {}).get(self.metric[task])
        return float(v) if v is not None else None

    def values(self, key: tuple[str, str], task: str) -> dict[int, float]:
        """seed -> value."""
        out = {}
        for d in self.rows[key]:
            v = self.value(d, task)
            if v is not None:
                out[d.cell.seed] = v
        return out

    def baseline_row(self, key: tuple[str, str]) -> tuple[str, str] | None:
        """The baseline model's row with the same balancer, else its first row with results."""
        if (self.baseline, key[1]) in self.rows and self.rows[(self.baseline, key[1])]:
            return (self.baseline, key[1])
        for k, v in self.rows.items():
            if k[0] == self.baseline and v:
                return k
        return None

    def higher(self, task: str) -> bool:
        return HIGHER_IS_BETTER.get(self.metric[task], True)


def _results_section(ds: _Dataset, idx: int, doc: Document) -> None:
    from mtrec.diagnostics.verdict import compare_to_baseline

    tasks = ds.tasks
    has_base = any(k[0] == ds.baseline and v for k, v in ds.rows.items())
    means = {k: [(_mean_std(list(ds.values(k, t).values()))[0]) for t in tasks] for k, v in ds.rows.items() if v}
    complete = {k: known for k, m in means.items() if len(known := [x for x in m if x is not None]) == len(m)}
    dominated = dominated_by(complete, [ds.higher(t) for t in tasks]) if len(tasks) >= 1 else {}
    headers = ["model", "balancer", "seeds"] + [f"{t} {ds.metric[t]}" for t in tasks]
    if has_base:
        headers += [f"Δ {t} [{CONFIDENCE:.0%} CI]" for t in tasks] + ["verdict"]
    headers += ["Pareto"]
    rows = []
    for key, runs in ds.rows.items():
        row = [key[0], key[1], str(len(runs))] + [_mean_std_text(list(ds.values(key, t).values())) for t in tasks]
        if has_base:
            base = ds.baseline_row(key)
            if key[0] == ds.baseline or base is None or not runs:
                word = "baseline" if key[0] == ds.baseline and runs else "—"
                row += [word for _ in tasks] + ["—"]
            else:
                for t in tasks:
                    mine, theirs = ds.values(key, t), ds.values(base, t)
                    seeds = sorted(set(mine) & set(theirs))
                    ci = paired_t_interval([mine[s] for s in seeds], [theirs[s] for s in seeds])
                    if ci.n == 0:
                        row.append("—")
                    elif ci.low is None:
                        row.append(f"{_signed(ci.mean)} (1 pair, no interval)")
                    else:
                        word = ""
                        if ci.excludes_zero:
                            word = " better" if (ci.mean > 0) == ds.higher(t) else " worse"
                        row.append(f"{_signed(ci.mean)} [{_signed(ci.low)}, {_signed(ci.high)}]{word}")
                try:
                    v = compare_to_baseline(
                        {
                            "__baseline__": {t: list(ds.values(base, t).values()) for t in tasks},
                            "row": {t: list(ds.values(key, t).values()) for t in tasks},
                        },
                        baseline="__baseline__",
                        metrics=ds.metric,
                    )["row"]
                    changed = ", ".join(f"{t} {v['changed'][t]}" for t in tasks)
                    row.append(f"{v['verdict']} ({changed})")
                except MtrecError as err:
                    row.append(f"n/a: {err}" if "one seed" not in str(err) else "n/a (one seed)")
        if key in dominated:
            by = [ds.row_label(k) for k in dominated[key]]
            more = f" and {len(by) - 3} more" if len(by) > 3 else ""
            row.append("front" if not by else "dominated by " + "; ".join(by[:3]) + more)
        else:
            row.append("—")
        rows.append(row)
    directions = ", ".join(f"{t}: {ds.metric[t]} ({'higher' if ds.higher(t) else 'lower'} is better)" for t in tasks)
    doc.add(
        Table(
            headers,
            rows,
            id=f"results-{idx}",
            caption=f"{ds.label}: {ds.split} split, mean ± std over seeds; {directions}",
        )
    )
    if has_base:
        doc.add(
            Para(
                f"Δ: mean over seeds of the paired difference between the row and the {ds.baseline} row of the same "
                f"balancer (else {ds.baseline}'s first balancer) at the same seed, in the metric's units; in brackets "
                f"the {CONFIDENCE:.0%} paired t-interval over seeds, Δ ± t(0.975, n−1)·s/√n with s the standard "
                "deviation of the n paired differences (seeds are the replicates; with 3-5 seeds a rank test could "
                "not reach significance). 'better'/'worse': the interval excludes 0. Verdict (compare_to_baseline): a "
                "task changed when its mean moved by more than the larger seed standard deviation of the two rows; "
                "well-done = every task better, not-bad = none worse and one better, seesaw = some better and some "
                "worse, negative-transfer = none better and one worse, neutral = no change beyond the noise."
            )
        )
    else:
        doc.add(Para(f"No {ds.baseline} cells in this grid: no changes or verdicts against single-task."))
    if len(tasks) >= 2 and len(complete) >= 2:
        labels = {ds.row_label(k): m for k, m in complete.items()}
        dom = {ds.row_label(k): [ds.row_label(x) for x in v] for k, v in dominated.items()}
        axes = [f"{t} {ds.metric[t]}" for t in tasks[:2]]
        png = plots.pareto_plot(
            {k: m[:2] for k, m in labels.items()},
            _dominance_2d(labels, ds, tasks),
            axes,
            [ds.higher(t) for t in tasks[:2]],
        )
        doc.add(Heading(3, "Pareto front"))
        if len(tasks) > 2:
            doc.add(Para(f"The plot shows the first two tasks; the table's Pareto column uses all {len(tasks)}."))
        doc.add(Image(f"pareto-{idx}", png, f"Pareto front of {ds.label}"))
        front = [k for k, v in dom.items() if not v]
        doc.add(
            Para(
                "On the front: "
                + ", ".join(front)
                + ". Dominated: "
                + (", ".join(k for k, v in dom.items() if v) or "none")
                + "."
            )
        )


def _dominance_2d(labels: dict[str, list[float]], ds: _Dataset, tasks: list[str]) -> dict[str, list[str]]:
    return dominated_by({k: m[:2] for k, m in labels.items()}, [ds.higher(t) for t in tasks[:2]])


def _curves_section(ds: _Dataset, idx: int, doc: Document) -> None:
    losses: dict[str, dict[str, list]] = {t: {} for t in ds.tasks if "@" not in t}
    weights: dict[str, dict[str, list]] = {t: {} for t in losses}
    cosines: dict[str, dict[str, list]] = {}
    for key, runs in ds.rows.items():
        hist = [d.history for d in runs if d.history]
        if not hist:
            continue
        label = ds.row_label(key)
        for t in losses:
            losses[t][label] = _by_epoch([[h.get("train_loss", {}).get(t) for h in run] for run in hist])
            weights[t][label] = _by_epoch(
                [[h.get("balancer", {}).get(f"weight/{t}", h.get("weights", {}).get(t)) for h in run] for run in hist]
            )
        for run in hist:
            for h in run:
                for pair in h.get("monitor", {}).get("pairs") or {}:
                    cosines.setdefault(pair, {})
        for pair in cosines:
            cosines[pair][label] = _by_epoch(
                [
                    [((h.get("monitor", {}).get("pairs") or {}).get(pair) or {}).get("cos_mean") for h in run]
                    for run in hist
                ]
            )
    doc.add(Heading(3, "Training curves"))
    doc.add(Para("Per epoch, mean over seeds (a run stopped early drops out of later epochs)."))
    if any(losses[t] for t in losses):
        doc.add(Image(f"losses-{idx}", plots.curves_plot(losses, "training loss per task", "loss"), "task losses"))
    if any(any(v is not None for v in vals) for t in weights for vals in weights[t].values()):
        doc.add(
            Image(
                f"weights-{idx}",
                plots.curves_plot(weights, "balancer weights (epoch means)", "weight"),
                "balancer weights",
            )
        )
    live = {p: rows for p, rows in cosines.items() if any(any(v is not None for v in vals) for vals in rows.values())}
    if live:
        doc.add(
            Image(
                f"cosines-{idx}",
                plots.curves_plot(
                    live, "gradient cosine between tasks on the shared parameters (conflict monitor)", "mean cosine"
                ),
                "gradient cosines",
            )
        )
    else:
        doc.add(Para("No gradient cosines: the conflict monitor was off (monitor_every 0) or nothing is shared."))


def _gates_section(ds: _Dataset, idx: int, doc: Document) -> None:
    blocks: list = []
    for key, runs in ds.rows.items():
        panels_by_seed = [d.diagnostics["gates"] for d in runs if d.diagnostics and d.diagnostics.get("gates")]
        if not panels_by_seed:
            continue
        merged: dict[str, dict] = {}
        for name, p in panels_by_seed[0].items():
            mats = [s[name]["mean"] for s in panels_by_seed if name in s and len(s[name]["mean"]) == len(p["mean"])]
            n = len(mats)
            mean = [[sum(m[r][c] for m in mats) / n for c in range(len(p["mean"][r]))] for r in range(len(p["mean"]))]
            entropy = {
                row: statistics.mean(s[name]["entropy"][row] for s in panels_by_seed if name in s) for row in p["rows"]
            }
            collapsed = sorted({e for s in panels_by_seed if name in s for e in s[name]["collapsed"]})
            merged[name] = {"rows": p["rows"], "mean": mean, "entropy": entropy, "collapsed": collapsed}
        label = ds.row_label(key)
        blocks.append(
            Image(
                f"gates-{idx}-{_slug(label)}",
                plots.gate_heatmaps(
                    merged,
                    f"{label}: mean gate weight on the validation split (mean over {len(panels_by_seed)} seed(s))",
                ),
                f"gates of {label}",
            )
        )
        notes = []
        for name, p in merged.items():
            ent = ", ".join(f"{r} {v:.2f}" for r, v in p["entropy"].items())
            notes.append(
                f"{name or 'gates'}: normalised entropy {ent}"
                + (f"; expert(s) {', '.join(map(str, p['collapsed']))} unused in some seed" if p["collapsed"] else "")
            )
        blocks.append(Bullets(notes))
    if blocks:
        doc.add(Heading(3, "Gate utilisation"))
        doc.add(
            Para(
                "Rows: the gates (one per task, per level for PLE); columns: experts; values: mean gate weight over "
                "the validation split. Entropy 1 = even mixing, 0 = one expert takes everything."
            )
        )
        doc.add(*blocks)


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text)


def _timing_section(ds: _Dataset, idx: int, doc: Document) -> None:
    rows = []
    for key, runs in ds.rows.items():
        infos = [d.info for d in runs if d.info]
        if not infos:
            continue
        secs = [i["seconds"] for i in infos]
        rate = [i["samples_per_second"] for i in infos if i.get("samples_per_second")]
        rows.append(
            [
                key[0],
                key[1],
                str(len(infos)),
                _mean_std_text(secs).replace("± ", "± "),
                f"{statistics.mean(i['epochs'] for i in infos):.1f}",
                f"{statistics.mean(rate):,.0f}" if rate else "—",
                str(infos[0].get("threads", "—")),
            ]
        )
    if rows:
        doc.add(Heading(3, "Timing"))
        doc.add(
            Table(
                ["model", "balancer", "runs", "seconds per run", "epochs", "training samples / s", "threads"],
                rows,
                id=f"timing-{idx}",
                caption="Seconds per run: the whole run (ingestion from the cache, training, per-epoch "
                "validation, test evaluation), without diagnostics. Samples / s: training rows x "
                "epochs over those seconds.",
            )
        )


def _cells_section(ds: _Dataset, idx: int, doc: Document) -> None:
    headers = (
        ["cell", "model", "balancer", "seed", "status"]
        + [f"{t} {ds.metric[t]}" for t in ds.tasks]
        + ["best epoch", "seconds"]
    )
    rows = []
    for d in ds.data:
        if d.metrics is not None:
            status = "done"
            vals = [_fmt(ds.value(d, t), 6) for t in ds.tasks]
            best = str(d.metrics.get("best_epoch", "—"))
            secs = f"{d.info['seconds']:.1f}" if d.info else "—"
        else:
            status = "failed" if d.error else "not run"
            vals, best, secs = ["—"] * len(ds.tasks), "—", "—"
        rows.append([d.cell.name, d.cell.model, d.cell.balancer, str(d.cell.seed), status] + vals + [best, secs])
    doc.add(Heading(3, "Cells"))
    doc.add(
        Table(
            headers,
            rows,
            id=f"cells-{idx}",
            caption=f"every cell of {ds.label}, {ds.split} split (DIR/cells/<cell>/metrics.json)",
        )
    )


def _across_section(sets: list[_Dataset], doc: Document) -> None:
    tasks = sets[0].tasks
    if len(sets) < 2 or any(s.tasks != tasks or s.metric != sets[0].metric for s in sets) or not tasks:
        return
    keys = list(dict.fromkeys(k for s in sets for k in s.rows))
    series: dict[str, dict[str, list[tuple[float | None, float | None]]]] = {t: {} for t in tasks}
    table_rows = []
    for key in keys:
        label = sets[0].row_label(key)
        for t in tasks:
            series[t][label] = [
                _mean_std(list(s.values(key, t).values())) if key in s.rows else (None, None) for s in sets
            ]
        for t in tasks:
            table_rows.append(
                [label, f"{t} {sets[0].metric[t]}"]
                + [_mean_std_text(list(s.values(key, t).values())) if key in s.rows else "—" for s in sets]
            )
    doc.add(Heading(2, "Across data sets", anchor="across"))
    doc.add(
        Image(
            "across",
            plots.across_datasets_plot([s.label for s in sets], series, {t: sets[0].metric[t] for t in tasks}),
            "across data sets",
        )
    )
    doc.add(
        Table(
            ["row", "task"] + [s.label for s in sets],
            table_rows,
            id="across",
            caption="mean ± std over seeds per data set",
        )
    )


def _relate_section(out: Path, doc: Document) -> None:
    """Optional: the task relatedness probes (``mtrec relate``), when ``DIR/relate.json`` is there."""
    doc.add(Heading(2, "Task relatedness (optional: DIR/relate.json)", anchor="relate"))
    path = out / RELATE
    if not path.is_file():
        doc.add(
            Para(
                f"No {RELATE} in this directory. Save the output of the relatedness probes (mtrec relate) as "
                f"{path} and run the same mtrec bench command again: finished cells are kept and the report "
                "is redrawn with this section."
            )
        )
        return
    data = _read(path)
    if not isinstance(data, dict):
        doc.add(Para(f"{path}: not a JSON object; shown as it is."))
        doc.add(Pre(path.read_text()[:20000]))
        return
    for key in ("recommendations", "recommendation", "findings"):
        value = data.get(key)
        if isinstance(value, str):
            doc.add(Para(value))
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            doc.add(Bullets(value))
    corr = data.get("label_correlation")
    if isinstance(corr, dict) and isinstance(corr.get("tasks"), list) and isinstance(corr.get("matrix"), list):
        try:
            doc.add(
                Image(
                    "relate-correlation",
                    plots.matrix_plot(corr["matrix"], corr["tasks"], "label correlation"),
                    "label correlation",
                )
            )
        except (TypeError, ValueError):
            pass
    doc.add(Para("Everything in relate.json:"))
    doc.add(Pre(json.dumps(data, indent=2)[:20000]))


def build_document(out: Path, grid: Grid, cells: list[Cell], failed: dict[str, dict]) -> Document:
    """The report of the grid's cells as found in ``out`` (finished, failed or not run)."""
    data = _collect(out, cells, failed)
    title = f"mtrec bench: {grid.name or out.resolve().name}"
    doc = Document(title)
    n_done = sum(d.metrics is not None for d in data)
    n_failed = sum(d.metrics is None and d.error is not None for d in data)
    threads = {t for d in data if d.info and (t := d.info.get("threads")) is not None}
    doc.add(
        Para(
            f"{len(cells)} cells ({n_done} finished, {n_failed} failed, {len(cells) - n_done - n_failed} not run): "
            f"{len(grid.datasets)} data set(s) x {len(grid.models)} model(s) x {len(grid.balancers)} balancer(s) x "
            f"{len(grid.seeds)} seed(s) {grid.seeds}; torch threads per cell: {', '.join(map(str, sorted(threads))) or '—'}; "
            f"mtrec {__version__}. Shared training options: "
            + ", ".join(f"{k}={v}" for k, v in grid.train.model_dump().items() if k != "seed")
            + "."
        )
    )
    labels = list(dict.fromkeys(c.dataset for c in cells))
    sets = [
        _Dataset(label, [d for d in data if d.cell.dataset == label], len(grid.balancers), grid.baseline)
        for label in labels
    ]
    for idx, ds in enumerate(sets):
        doc.add(Heading(2, f"Data set: {ds.label}", anchor=f"dataset-{idx}"))
        if not ds.finished:
            doc.add(Para("No finished cell for this data set."))
        else:
            _results_section(ds, idx, doc)
            _curves_section(ds, idx, doc)
            _gates_section(ds, idx, doc)
            _timing_section(ds, idx, doc)
        _cells_section(ds, idx, doc)
    _across_section([s for s in sets if s.finished], doc)
    _relate_section(out, doc)
    failures = [d for d in data if d.metrics is None and d.error]
    if failures:
        doc.add(Heading(2, "Failed cells", anchor="failed"))
        doc.add(
            Table(
                ["cell", "error"],
                [[d.cell.name, d.error or ""] for d in failures],
                id="failed",
                caption="run the same mtrec bench command again to retry them",
            )
        )
    return doc


def write_report(out: Path, grid: Grid, cells: list[Cell], failed: dict[str, dict]) -> dict[str, Path]:
    """Write ``out/report.html`` (self-contained) and ``out/report.md`` (+ ``out/report_files/*.png``)."""
    return write_document(build_document(Path(out), grid, cells, failed), Path(out))
