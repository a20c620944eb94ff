"""Task relatedness probes: do these tasks belong in one model? (`mtrec relate`)

Three views, as practitioners check before sharing a network between tasks:

1. **Label correlation**: Pearson correlation of the tasks' labels on the training split (the phi
   coefficient for two binary tasks), over the rows where both are observed.
2. **Train A alone, watch B**: for every ordered pair, a ``shared_bottom`` network is trained on task A
   only (every other task weighted 0, so B's tower never moves); before training and after every
   epoch a linear probe for B (logistic regression, or ridge for a regression task) is refitted on the
   shared representation of training rows and scored on validation rows (AUC, or R^2). The probe's gain
   over its value on the untrained network is what training A did for the representation B reads;
   training B itself gives the ceiling (the diagonal).
3. **Shared-bottom against single-task**: both trained on all tasks for a few epochs over several
   seeds; the verdict (:func:`mtrec.diagnostics.verdict.compare_to_baseline`, seed noise) says whether
   hard sharing helped, hurt, or did nothing measurable.

A recommendation per pair comes out of them in plain words, with the numbers behind it.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import r2_score, roc_auc_score

from mtrec.balancing import build_balancer
from mtrec.data.store import Store, load_store
from mtrec.data.tables import TensorTable
from mtrec.diagnostics.verdict import compare_to_baseline
from mtrec.errors import MtrecError
from mtrec.models import build_model
from mtrec.schema import Schema
from mtrec.train.trainer import Callback, TrainConfig, Trainer, seed_everything

PROBE_ROWS = 20000  # training rows the probes are fitted on (a random subset, fixed per run)
TRANSFER = 0.01  # probe gain (AUC or R^2) above which training A counts as helping B
MODEL = {"bottom_hidden": [128, 64], "tower_hidden": [32]}


def label_correlation(table: TensorTable, layout) -> np.ndarray:
    """``[T, T]`` Pearson correlation of the labels over rows where both tasks are observed."""
    labels = table.labels.numpy().astype(np.float64)
    names = layout.task_names
    observed = np.ones_like(labels, dtype=bool)
    for t, task in enumerate(layout.tasks):
        if task.space is not None:
            observed[:, t] = labels[:, names.index(task.space)] > 0.5
    n = len(names)
    out = np.eye(n)
    for a in range(n):
        for b in range(a + 1, n):
            both = observed[:, a] & observed[:, b]
            x, y = labels[both, a], labels[both, b]
            c = float(np.corrcoef(x, y)[0, 1]) if both.sum() > 2 and x.std() > 0 and y.std() > 0 else float("nan")
            out[a, b] = out[b, a] = c
    return out


def _observed(table: TensorTable, layout, t: int) -> np.ndarray:
    task = layout.tasks[t]
    if task.space is None:
        return np.ones(len(table), dtype=bool)
    return table.labels[:, layout.task_index(task.space)].numpy() > 0.5


@torch.no_grad()
def representation(model, table: TensorTable, batch_size: int = 8192) -> np.ndarray:
    """The shared representation ``[N, H]`` the towers read (``ModelOutput.shared``)."""
    was = model.training
    model.eval()
    out = [model(table.slice(i, i + batch_size)).shared for i in range(0, len(table), batch_size)]
    model.train(was)
    return torch.cat(out).numpy()


def probe_score(
    rep_fit: np.ndarray, rep_score: np.ndarray, fit: TensorTable, score: TensorTable, layout, t: int, seed: int
) -> float | None:
    """A linear probe for task ``t`` fitted on the representation ``rep_fit`` of ``fit``'s rows, scored on
    ``rep_score`` of ``score``'s rows (AUC or R^2)."""
    a, b = _observed(fit, layout, t), _observed(score, layout, t)
    xa, xb = rep_fit[a], rep_score[b]
    ya, yb = fit.labels[:, t].numpy()[a], score.labels[:, t].numpy()[b]
    if layout.tasks[t].type == "binary":
        if len(np.unique(ya)) < 2 or len(np.unique(yb)) < 2:
            return None
        probe = LogisticRegression(max_iter=300, random_state=seed).fit(xa, ya)
        return float(roc_auc_score(yb, probe.decision_function(xb)))
    return float(r2_score(yb, Ridge(alpha=1.0).fit(xa, ya).predict(xb)))


class _Probes(Callback):
    """Refits every task's probe on the untrained network and after every epoch."""

    def __init__(self, fit: TensorTable, score: TensorTable, layout, seed: int) -> None:
        self.fit, self.score, self.layout, self.seed = fit, score, layout, seed
        self.curves: list[list[float | None]] = []  # [epochs + 1][T]

    def _measure(self, model) -> None:
        rep_fit, rep_score = representation(model, self.fit), representation(model, self.score)  # once for every task
        self.curves.append(
            [
                probe_score(rep_fit, rep_score, self.fit, self.score, self.layout, t, self.seed)
                for t in range(self.layout.num_tasks)
            ]
        )

    def on_fit_start(self, trainer: Trainer) -> None:
        self._measure(trainer.model)

    def on_epoch_end(self, trainer: Trainer, epoch: int, record: dict) -> None:
        self._measure(trainer.model)


def _split(store: Store, name: str) -> TensorTable:
    """The store's ``name`` split; relatedness is measured on train and valid rows, so a missing one is an error."""
    table = store.split(name)
    if table is None:
        raise MtrecError(f"relate needs a {name} split; the data has none (schema: valid_share, or a {name} file)")
    return table


def train_alone(store: Store, a: int, epochs: int, seed: int, config: TrainConfig) -> list[list[float | None]]:
    """Train ``shared_bottom`` on task ``a`` only; every task's probe curve ``[epochs + 1][T]``."""
    layout = store.layout
    train, valid = _split(store, "train"), _split(store, "valid")
    gen = torch.Generator().manual_seed(seed)
    fit = (
        train.slice(0, len(train))
        if len(train) <= PROBE_ROWS
        else train.take(torch.randperm(len(train), generator=gen)[:PROBE_ROWS])
    )
    seed_everything(seed)
    model = build_model("shared_bottom", layout, MODEL)
    weights = [1.0 if t == a else 0.0 for t in range(layout.num_tasks)]
    balancer = build_balancer("fixed", layout.task_names, {}, weights)
    probes = _Probes(fit, valid, layout, seed)
    cfg = config.model_copy(
        update={"epochs": epochs, "patience": epochs, "seed": seed, "monitor_every": 0, "progress": False}
    )
    Trainer(model, balancer, cfg, callbacks=[probes]).fit(train, valid)
    return probes.curves


def sharing_verdict(store: Store, epochs: int, seeds: int, config: TrainConfig) -> dict:
    """``shared_bottom`` against ``single_task`` on every task, ``seeds`` seeds each."""
    layout = store.layout
    metric = {t.name: ("auc" if t.type == "binary" else "mse") for t in layout.tasks}
    results: dict[str, dict[str, list[float]]] = {}
    for name in ("single_task", "shared_bottom"):
        for seed in range(seeds):
            seed_everything(seed)
            model = build_model(
                name, layout, {"bottom_hidden": MODEL["bottom_hidden"], "tower_hidden": MODEL["tower_hidden"]}
            )
            cfg = config.model_copy(update={"epochs": epochs, "seed": seed, "monitor_every": 0, "progress": False})
            trainer = Trainer(model, build_balancer("fixed", layout.task_names, {}, None), cfg)
            trainer.fit(_split(store, "train"), _split(store, "valid"))
            scores = trainer.evaluate(_split(store, "valid"))
            for t in layout.task_names:
                results.setdefault(name, {}).setdefault(t, []).append(scores[t][metric[t]])
    verdict = compare_to_baseline(results, metrics=metric)["shared_bottom"]
    return {"metric": metric, "valid": results, **verdict}


def relate(schema: Schema, epochs: int = 3, seeds: int = 2, config: TrainConfig | None = None) -> dict:
    """Every probe of the module docstring on ``schema``; a JSON-able dict with ``findings``."""
    config = config or TrainConfig()
    store = load_store(schema)
    layout = store.layout
    if layout.num_tasks < 2:
        raise MtrecError(f"schema '{schema.name}' has one task; relatedness needs two or more")
    if seeds < 2:
        raise MtrecError("relate needs --seeds 2 or more: the shared-bottom verdict judges changes against seed noise")
    names = layout.task_names
    corr = label_correlation(_split(store, "train"), layout)
    curves = {names[a]: train_alone(store, a, epochs, seed=0, config=config) for a in range(len(names))}
    transfer: dict[str, dict[str, dict]] = {}
    for _a, name_a in enumerate(names):
        for b, name_b in enumerate(names):
            series = [row[b] for row in curves[name_a]]
            start, end = series[0], series[-1]
            gain = None if start is None or end is None else end - start
            transfer.setdefault(name_a, {})[name_b] = {"probe": series, "gain": gain}
    verdict = sharing_verdict(store, epochs, seeds, config)
    out = {
        "schema": schema.name,
        "tasks": names,
        "label_correlation": corr.round(6).tolist(),
        "transfer": transfer,
        "probe_metric": {t.name: ("auc" if t.type == "binary" else "r2") for t in layout.tasks},
        "shared_bottom_vs_single_task": verdict,
        "settings": {"epochs": epochs, "seeds": seeds, "probe_rows": PROBE_ROWS, "model": MODEL},
    }
    out["findings"] = findings(out)
    return out


def findings(result: dict) -> list[str]:
    """One plain-language recommendation per pair, with the numbers behind it."""
    names = result["tasks"]
    verdict = result["shared_bottom_vs_single_task"]
    lines = []
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            x, y = names[a], names[b]
            corr = result["label_correlation"][a][b]
            g_xy = result["transfer"][x][y]["gain"]
            g_yx = result["transfer"][y][x]["gain"]
            helps = [g for g in (g_xy, g_yx) if g is not None]
            changes = [verdict["changed"][x], verdict["changed"][y]]
            if "worse" in changes:
                word = (
                    "conflicting: hard sharing hurt "
                    + " and ".join(t for t, c in zip((x, y), changes) if c == "worse")
                    + "; prefer gated models (mmoe, ple) or separate models"
                )
            elif helps and max(helps) > TRANSFER:
                word = "related, MTL safe" + (" and helpful" if "better" in changes else "")
            else:
                word = "weakly related: MTL neither helps nor hurts measurably; share for cost, not for quality"
            lines.append(
                f"{x} and {y}: {word} (label correlation {corr:+.2f}; training {x} alone moves {y}'s probe by "
                f"{_fmt(g_xy)}, training {y} alone moves {x}'s by {_fmt(g_yx)}; shared_bottom vs single_task: "
                f"{verdict['verdict']}, {x} {changes[0]}, {y} {changes[1]})"
            )
    return lines


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.3f}"
