"""Figures of the bench report, drawn with matplotlib's Agg canvas into PNG bytes.

No pyplot: figures are plain :class:`matplotlib.figure.Figure` objects rendered by the Agg backend,
so drawing a report neither needs a display nor changes the caller's matplotlib backend.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 90


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def pareto_plot(
    points: Mapping[str, Sequence[float]],
    dominated: Mapping[str, list[str]],
    axes: Sequence[str],
    higher_is_better: Sequence[bool],
) -> bytes:
    """Scatter of the rows on the first two task metrics: one colour and marker per row (legend), the
    front filled and joined, dominated rows hollow."""
    fig = Figure(figsize=(8.5, 5))
    ax = fig.add_subplot()
    front = [n for n in points if not dominated[n]]
    markers = "osD^vPX*<>"
    for i, (name, color) in enumerate(zip(points, _colors(len(points)))):
        p = points[name]
        on = name in front
        ax.scatter(
            p[0],
            p[1],
            s=60,
            marker=markers[i % len(markers)],
            facecolors=color if on else "none",
            edgecolors=color,
            linewidths=1.5,
            zorder=3,
            label=name + ("" if on else " (dominated)"),
        )
    if len(front) > 1:
        pts = sorted((points[n][0], points[n][1]) for n in front)
        ax.plot([x for x, _ in pts], [y for _, y in pts], color="#3a6ea5", lw=1, ls="--", zorder=2)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=7, frameon=False)
    arrows = ["higher is better" if h else "lower is better" for h in higher_is_better]
    ax.set_xlabel(f"{axes[0]} ({arrows[0]})")
    ax.set_ylabel(f"{axes[1]} ({arrows[1]})")
    ax.set_title("Pareto front (filled: on the front; hollow: dominated)", fontsize=10)
    ax.grid(alpha=0.3)
    return _png(fig)


def curves_plot(series: Mapping[str, Mapping[str, list[float | None]]], title: str, ylabel: str) -> bytes:
    """One panel per key of ``series`` (a task or a pair); in each, one line per row (model x balancer)
    over epochs (None: no value that epoch)."""
    panels = list(series)
    rows = sorted(
        {r for p in panels for r in series[p]},
        key=lambda r: list(series[panels[0]]).index(r) if r in series[panels[0]] else 1_000,
    )
    colors = dict(zip(rows, _colors(len(rows))))
    fig = Figure(figsize=(min(4.2 * len(panels), 13) + 2.6, 3.6))
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for row, values in series[panel].items():
            xs = [e + 1 for e, v in enumerate(values) if v is not None and math.isfinite(v)]
            ys = [v for v in values if v is not None and math.isfinite(v)]
            if xs:
                ax.plot(xs, ys, marker="o", ms=3, lw=1.2, color=colors[row], label=row)
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if i == 0:
            ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    handles, labels = [], []
    for ax in fig.axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _png(fig)


def gate_heatmaps(panels: Mapping[str, dict], title: str) -> bytes:
    """One heatmap per panel (a level or pool): rows = gates (tasks), columns = experts, mean gate weight."""
    names = list(panels)
    fig = Figure(figsize=(min(4.0 * len(names), 14), 0.5 * max(len(panels[n]["rows"]) for n in names) + 2.0))
    for i, name in enumerate(names):
        p = panels[name]
        mean = np.asarray(p["mean"], dtype=float)
        ax = fig.add_subplot(1, len(names), i + 1)
        im = ax.imshow(mean, cmap="viridis", vmin=0.0, vmax=max(float(mean.max()), 1e-9), aspect="auto")
        ax.set_yticks(range(len(p["rows"])), p["rows"], fontsize=8)
        ax.set_xticks(range(mean.shape[1]), [str(e) for e in range(mean.shape[1])], fontsize=7)
        ax.set_xlabel("expert")
        ax.set_title(name or "gates", fontsize=9)
        if mean.size <= 120:
            for (r, c), v in np.ndenumerate(mean):
                ax.text(
                    c,
                    r,
                    f"{v:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if v < 0.6 * mean.max() else "black",
                )
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _png(fig)


def across_datasets_plot(
    datasets: Sequence[str],
    series: Mapping[str, Mapping[str, list[tuple[float | None, float | None]]]],
    ylabels: Mapping[str, str],
) -> bytes:
    """Per task a panel: x = data sets (in grid order), one line per row with ± std error bars."""
    tasks = list(series)
    rows = list(dict.fromkeys(r for t in tasks for r in series[t]))
    colors = dict(zip(rows, _colors(len(rows))))
    fig = Figure(figsize=(min(5.0 * len(tasks), 14) + 2.6, 3.8))
    x = np.arange(len(datasets))
    for i, task in enumerate(tasks):
        ax = fig.add_subplot(1, len(tasks), i + 1)
        for row, values in series[task].items():
            mean = np.array([m if m is not None else np.nan for m, _ in values], dtype=float)
            std = np.array([s if s is not None else 0.0 for _, s in values], dtype=float)
            ax.errorbar(x, mean, yerr=std, marker="o", ms=3, lw=1.2, capsize=3, color=colors[row], label=row)
        ax.set_xticks(x, list(datasets), rotation=20, fontsize=7, ha="right")
        ax.set_title(task, fontsize=9)
        ax.set_ylabel(ylabels[task])
        ax.grid(alpha=0.3)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, frameon=False)
    fig.suptitle("Across data sets: mean ± std over seeds", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def matrix_plot(matrix: Sequence[Sequence[float]], labels: Sequence[str], title: str) -> bytes:
    """A labelled square matrix (e.g. label correlations), values written in the cells."""
    m = np.asarray(matrix, dtype=float)
    fig = Figure(figsize=(1.0 + 0.8 * len(labels), 0.8 + 0.7 * len(labels)))
    ax = fig.add_subplot()
    im = ax.imshow(m, cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(len(labels)), list(labels), rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), list(labels), fontsize=8)
    for (r, c), v in np.ndenumerate(m):
        ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(title, fontsize=10)
    return _png(fig)
