"""Offline objectives of a fused score, computed for all users at once (no Python loop over users).

- ``gauc``: ``sum_t importance_t * AUC_t`` where ``AUC_t`` is the AUC of the fused score against
  task t's labels, per user and averaged with impression weights (GAUC; users with one label
  class are skipped) when the schema has a user column, over all rows otherwise.
- ``ndcg@K``: mean over users of ``DCG@K / IDCG@K`` with linear gains, the relevance of a row
  being ``sum_t importance_t * label_t``; users without any relevant row are skipped.
- ``recall@K``: mean over users of the relevance in the top K over the user's total relevance.

Without a user column, ``ndcg@K`` and ``recall@K`` treat the whole split as one list, unless the rows
are dealt into lists of a fixed size (:func:`random_lists`, ``mtrec fuse --list-size``), the candidate
lists a ranking request brings. Rows with equal fused scores keep their order in the split.

Every value is assembled from per-unit parts (``sum numer / sum denom`` per component; a unit is
a user, or the whole split), which makes the paired bootstrap over users a matrix product.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import roc_auc_score

from mtrec.data.tables import FeatureLayout
from mtrec.errors import MtrecError
from mtrec.fusion.io import SplitPredictions
from mtrec.metrics.core import per_group_auc


@dataclass(frozen=True)
class Objective:
    kind: str  # "gauc", "ndcg" or "recall"
    k: int | None
    importance: dict[str, float]  # binary task name -> weight

    @property
    def label(self) -> str:
        return self.kind if self.k is None else f"{self.kind}@{self.k}"

    @classmethod
    def parse(cls, text: str, importance: dict[str, float], layout: FeatureLayout) -> Objective:
        """``gauc`` | ``ndcg@K`` | ``recall@K`` with importances of the run's binary tasks."""
        m = re.fullmatch(r"\s*(gauc|ndcg@(\d+)|recall@(\d+))\s*", text)
        if not m:
            raise MtrecError(f"--objective: '{text}' is not gauc, ndcg@K or recall@K (K a positive integer)")
        kind = m.group(1).split("@")[0]
        k = int(m.group(2) or m.group(3)) if kind != "gauc" else None
        if k is not None and k < 1:
            raise MtrecError(f"--objective: K must be at least 1 in '{text}'")
        check_binary_tasks(importance, layout, "--importance")
        if any(w < 0 for w in importance.values()) or not any(w > 0 for w in importance.values()):
            raise MtrecError("--importance: weights must be >= 0 with at least one > 0")
        return cls(kind, k, {n: float(w) for n, w in importance.items()})


def check_binary_tasks(values: dict[str, float], layout: FeatureLayout, flag: str) -> None:
    if not values:
        raise MtrecError(f"{flag}: give at least one task=value")
    types = {t.name: t.type for t in layout.tasks}
    for name in values:
        if name not in types:
            raise MtrecError(f"{flag}: '{name}' is not a task of the run (tasks: {', '.join(types)})")
        if types[name] != "binary":
            raise MtrecError(f"{flag}: task '{name}' is a regression task; objectives and floors use binary labels")


def dense_groups(user: np.ndarray | None, n: int) -> tuple[np.ndarray, int]:
    """Users as 0..U-1 (one group of every row without a user column)."""
    if user is None:
        return np.zeros(n, np.int64), 1
    keys, inverse = np.unique(user, return_inverse=True)
    return inverse.astype(np.int64), len(keys)


def random_lists(n: int, size: int, seed: int) -> np.ndarray:
    """``[n]`` list index of every row: the rows in a seeded random order, dealt into lists of ``size``
    (the last one shorter), for ranking objectives on data without a user column."""
    order = np.random.default_rng(seed).permutation(n)
    group = np.empty(n, np.int64)
    group[order] = np.arange(n) // size
    return group


def auc_parts(score: np.ndarray, y: np.ndarray, group: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Per group: ``(AUC * rows, rows)``, zeros for a group with one label class."""
    numer, denom = np.zeros(n_groups), np.zeros(n_groups)
    if n_groups == 1:
        if 0 < y.sum() < len(y):
            numer[0], denom[0] = roc_auc_score(y, score), 1.0
        return numer, denom
    auc, size, gid = per_group_auc(y, score, group)
    numer[gid], denom[gid] = auc * size, size
    return numer, denom


def _within_group_position(g_sorted: np.ndarray) -> np.ndarray:
    new = np.r_[True, g_sorted[1:] != g_sorted[:-1]]
    starts = np.flatnonzero(new)
    return np.arange(len(g_sorted)) - starts[np.cumsum(new) - 1]


def _top_k_sum(
    order_key: np.ndarray, rel: np.ndarray, group: np.ndarray, n_groups: int, k: int, discount: bool
) -> np.ndarray:
    """Per group: the (discounted) relevance of its K rows with the highest ``order_key``."""
    order = np.lexsort((-order_key, group), axis=0)  # stable: ties keep their row order
    pos = _within_group_position(group[order])
    gain = np.where(pos < k, rel[order], 0.0)
    if discount:
        gain = gain / np.log2(pos + 2.0)
    return np.bincount(group[order], weights=gain, minlength=n_groups)


def ranking_parts(
    kind: str, score: np.ndarray, rel: np.ndarray, group: np.ndarray, n_groups: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per group: ``(nDCG@K or recall@K, 1)``, zeros for a group without a relevant row."""
    if kind == "ndcg":
        got = _top_k_sum(score, rel, group, n_groups, k, discount=True)
        best = _top_k_sum(rel, rel, group, n_groups, k, discount=True)
    else:
        got = _top_k_sum(score, rel, group, n_groups, k, discount=False)
        best = np.bincount(group, weights=rel, minlength=n_groups)
    ok = best > 0
    numer = np.zeros(n_groups)
    numer[ok] = got[ok] / best[ok]
    return numer, ok.astype(np.float64)


@dataclass
class Evaluation:
    value: float
    task_auc: dict[str, float | None]  # every binary task: (G)AUC of the fused score
    parts: list[tuple[float, np.ndarray, np.ndarray]]  # (coef, numer [U], denom [U]) of the objective


def _ratio(numer: float, denom: float) -> float:
    return numer / denom if denom > 0 else float("nan")


def evaluate(objective: Objective, fused: np.ndarray, preds: SplitPredictions, all_tasks: bool = True) -> Evaluation:
    """The objective and every binary task's (G)AUC of ``fused`` on one split (only those the
    objective needs unless ``all_tasks``)."""
    layout = preds.layout
    group, n_groups = dense_groups(preds.user, len(fused))
    task_auc: dict[str, float | None] = {}
    auc_by_task: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for t, task in enumerate(layout.tasks):
        if task.type != "binary" or not (
            all_tasks or (objective.kind == "gauc" and objective.importance.get(task.name))
        ):
            continue
        numer, denom = auc_parts(fused, preds.labels[:, t], group, n_groups)
        auc_by_task[task.name] = (numer, denom)
        value = _ratio(numer.sum(), denom.sum())
        task_auc[task.name] = None if np.isnan(value) else float(value)
    if objective.kind == "gauc":
        parts = [(w, *auc_by_task[name]) for name, w in objective.importance.items() if w > 0]
    else:
        assert objective.k is not None  # parse: ndcg@K and recall@K always carry K
        rel = sum(w * preds.labels[:, layout.task_index(name)] for name, w in objective.importance.items())
        parts = [
            (1.0, *ranking_parts(objective.kind, fused, np.asarray(rel, np.float64), group, n_groups, objective.k))
        ]
    value = sum(c * _ratio(n.sum(), d.sum()) for c, n, d in parts)
    return Evaluation(float(value), task_auc, parts)


def paired_bootstrap(
    objective: Objective,
    fused_a: np.ndarray,
    fused_b: np.ndarray,
    preds: SplitPredictions,
    reps: int = 200,
    seed: int = 0,
) -> dict[str, float]:
    """Bootstrap of ``value(a) - value(b)`` resampling users (rows without a user column), both
    scores on the same resamples: ``{"diff", "std", "lo", "hi"}`` (95% percentile interval)."""
    rng = np.random.default_rng(seed)
    ea, eb = evaluate(objective, fused_a, preds), evaluate(objective, fused_b, preds)
    if preds.user is not None:
        n_units = len(ea.parts[0][1])
        counts = np.stack(
            [np.bincount(rng.integers(0, n_units, n_units), minlength=n_units) for _ in range(reps)]
        ).astype(np.float64)

        def boot(ev: Evaluation) -> np.ndarray:
            return sum(c * (counts @ n) / np.maximum(counts @ d, 1e-300) for c, n, d in ev.parts)

        diffs = boot(ea) - boot(eb)
    else:
        n = len(fused_a)
        diffs = np.empty(reps)
        for r in range(reps):  # a global AUC / one list does not decompose: resample rows
            idx = np.sort(rng.integers(0, n, n))
            sub = SplitPredictions(preds.scores[idx], preds.labels[idx], None, preds.layout)
            diffs[r] = (
                evaluate(objective, fused_a[idx], sub, False).value
                - evaluate(objective, fused_b[idx], sub, False).value
            )
    return {
        "diff": ea.value - eb.value,
        "std": float(np.std(diffs, ddof=1)),
        "lo": float(np.quantile(diffs, 0.025)),
        "hi": float(np.quantile(diffs, 0.975)),
    }
