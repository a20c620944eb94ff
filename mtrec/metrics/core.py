"""Metrics for every task of a split, computed on whole arrays.

AUC, logloss, MSE and MAE come from scikit-learn. The grouped AUC (uAUC and
its impression-weighted form GAUC) is computed for all users at once from
within-user ranks, with no Python loop over users; users whose samples carry
one label class only are skipped, as usual.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import log_loss, mean_absolute_error, mean_squared_error, roc_auc_score

from mtrec.data.tables import FeatureLayout

EPS = 1e-7


# the direction of every metric mtrec reports: whether a larger value is the better one
HIGHER_IS_BETTER: dict[str, bool] = {
    "auc": True,
    "gauc": True,
    "uauc": True,
    "logloss": False,
    "mse": False,
    "mae": False,
}


def _clean(value: float) -> float | None:
    """JSON has no NaN: an undefined metric (one class only) is reported as null."""
    return None if value is None or not math.isfinite(value) else float(value)


def binary_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float | None]:
    """AUC and logloss of probabilities ``p`` against 0/1 labels ``y``."""
    if len(y) == 0:
        return {"auc": None, "logloss": None}
    auc = roc_auc_score(y, p) if 0 < y.sum() < len(y) else float("nan")
    loss = log_loss(y, np.clip(p, EPS, 1 - EPS), labels=[0, 1])
    return {"auc": _clean(auc), "logloss": _clean(loss)}


def regression_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float | None]:
    if len(y) == 0:
        return {"mse": None, "mae": None}
    return {"mse": _clean(mean_squared_error(y, p)), "mae": _clean(mean_absolute_error(y, p))}


def grouped_auc(y: np.ndarray, p: np.ndarray, group: np.ndarray) -> tuple[float | None, float | None]:
    """(uAUC, GAUC): per-group AUC averaged plainly, and weighted by group size."""
    auc, size, _ = per_group_auc(y, p, group)
    if len(auc) == 0:
        return None, None
    return _clean(auc.mean()), _clean((auc * size).sum() / size.sum())


def per_group_auc(y: np.ndarray, p: np.ndarray, group: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(auc, size, gid)`` of every group holding both label classes: its AUC, its number of rows,
    and its index among the sorted distinct groups (``np.unique(group)[gid]`` is its key).

    Ranks are taken inside each group (ties get their average rank); a group's
    AUC is the Mann-Whitney statistic ``(sum of positive ranks - P(P+1)/2) / (P N)``.
    """
    n = len(y)
    if n == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0, np.int64)
    order = np.lexsort((p, group))  # by group, then score
    g, s, lab = group[order], p[order], y[order].astype(np.float64)
    new_group = np.r_[True, g[1:] != g[:-1]]
    gid = np.cumsum(new_group) - 1  # dense group index per sorted row
    starts = np.flatnonzero(new_group)
    rank = np.arange(n) - starts[gid] + 1.0  # 1-based rank within the group
    new_tie = new_group | np.r_[True, s[1:] != s[:-1]]
    tid = np.cumsum(new_tie) - 1
    avg_rank = (np.bincount(tid, weights=rank) / np.bincount(tid))[tid]
    size = np.bincount(gid).astype(np.float64)
    pos = np.bincount(gid, weights=lab)
    neg = size - pos
    pos_rank_sum = np.bincount(gid, weights=avg_rank * lab)
    ok = (pos > 0) & (neg > 0)
    auc = (pos_rank_sum[ok] - pos[ok] * (pos[ok] + 1) / 2) / (pos[ok] * neg[ok])
    return auc, size[ok], np.flatnonzero(ok)


def evaluate_predictions(
    labels: np.ndarray, scores: np.ndarray, layout: FeatureLayout, user: np.ndarray | None = None
) -> dict[str, dict[str, float | None]]:
    """``{task: {metric: value}}`` for scores ``[N, T]`` against labels ``[N, T]``.

    A task with a sample space is evaluated inside it under its own name (CVR on
    clicked impressions) and on every sample with the joint probability under
    ``<task>@all`` (CTCVR; along a longer chain, the product over every ancestor).
    """
    out: dict[str, dict[str, float | None]] = {}
    names = layout.task_names
    for t, task in enumerate(layout.tasks):
        y, p = labels[:, t], scores[:, t]
        inside = np.ones(len(y), dtype=bool)
        if task.space is not None:
            parent = names.index(task.space)
            inside = labels[:, parent] > 0.5
        if task.type == "binary":
            out[task.name] = binary_metrics(y[inside], p[inside])
            if user is not None:
                out[task.name]["uauc"], out[task.name]["gauc"] = grouped_auc(y[inside], p[inside], user[inside])
        else:
            out[task.name] = regression_metrics(y[inside], p[inside])
        if task.space is not None and task.type == "binary":
            chain = [t, *ancestors(layout, t)]
            out[f"{task.name}@all"] = binary_metrics(labels[:, chain].prod(axis=1), scores[:, chain].prod(axis=1))
    return out


def ancestors(layout: FeatureLayout, t: int) -> list[int]:
    """Indices of the tasks whose spaces contain task ``t``: its space's task, that task's space's, ..."""
    names, chain = layout.task_names, []
    up = layout.tasks[t].space
    while up is not None and names.index(up) not in chain and names.index(up) != t:
        chain.append(names.index(up))
        up = layout.tasks[chain[-1]].space
    return chain


def joint_scores(scores: np.ndarray, layout: FeatureLayout) -> dict[str, np.ndarray]:
    """``{"<task>@all": p}`` for every binary task with a space: its probability on every sample
    (pCTCVR = pCTR * pCVR; along a longer funnel, the product over every ancestor)."""
    return {
        f"{task.name}@all": scores[:, [t, *ancestors(layout, t)]].prod(axis=1)
        for t, task in enumerate(layout.tasks)
        if task.space is not None and task.type == "binary"
    }


def mean_auc(metrics: dict[str, dict[str, float | None]], layout: FeatureLayout) -> float:
    """Model-selection score: mean AUC over binary tasks (minus mean MSE when none is binary)."""
    aucs = [metrics[t.name]["auc"] for t in layout.tasks if t.type == "binary"]
    aucs = [a for a in aucs if a is not None]
    if aucs:
        return float(np.mean(aucs))
    return -float(np.mean([metrics[t.name]["mse"] for t in layout.tasks]))
