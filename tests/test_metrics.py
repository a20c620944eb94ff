"""Metrics against their definitions, and verdicts."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from mtrec.data.tables import FeatureLayout, TaskField
from mtrec.diagnostics.verdict import verdict
from mtrec.metrics.core import binary_metrics, evaluate_predictions, grouped_auc


def _loop_uauc(y, p, g):
    aucs, sizes = [], []
    for u in np.unique(g):
        m = g == u
        if 0 < y[m].sum() < m.sum():
            aucs.append(roc_auc_score(y[m], p[m]))
            sizes.append(m.sum())
    return np.mean(aucs), np.average(aucs, weights=sizes)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_auc_equals_per_user_loop_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 3000
    g = rng.integers(0, 200, n)
    p = np.round(rng.random(n), 1)  # many ties inside users
    y = (rng.random(n) < 0.3 + 0.4 * p).astype(float)
    uauc, gauc = grouped_auc(y, p, g)
    ref_u, ref_g = _loop_uauc(y, p, g)
    assert uauc == pytest.approx(ref_u, abs=1e-12)
    assert gauc == pytest.approx(ref_g, abs=1e-12)


def test_grouped_auc_with_one_group_is_the_plain_auc() -> None:
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 2, 500).astype(float), rng.random(500)
    assert grouped_auc(y, p, np.zeros(500, int))[0] == pytest.approx(roc_auc_score(y, p))


def test_grouped_auc_skips_single_class_users() -> None:
    y = np.array([1, 0, 1, 1, 0, 0.0])
    p = np.array([0.9, 0.1, 0.2, 0.3, 0.8, 0.7])
    g = np.array([0, 0, 1, 1, 2, 2])
    assert grouped_auc(y, p, g) == (1.0, 1.0)


def test_single_class_auc_is_reported_as_none() -> None:
    assert binary_metrics(np.ones(10), np.linspace(0, 1, 10))["auc"] is None


def test_spaced_task_is_evaluated_inside_its_space_and_jointly() -> None:
    layout = FeatureLayout([], [], [], [TaskField("ctr", "binary"), TaskField("cvr", "binary", space="ctr")])
    rng = np.random.default_rng(0)
    click = rng.integers(0, 2, 400).astype(float)
    buy = click * rng.integers(0, 2, 400)
    scores = rng.random((400, 2))
    out = evaluate_predictions(np.stack([click, buy], 1), scores, layout)
    inside = click == 1
    assert out["cvr"]["auc"] == pytest.approx(roc_auc_score(buy[inside], scores[inside, 1]))
    assert out["cvr@all"]["auc"] == pytest.approx(roc_auc_score(buy, scores[:, 0] * scores[:, 1]))


@pytest.mark.parametrize(
    "deltas, word",
    [
        ([0.01, 0.02], "well-done"),
        ([0.01, 0.0], "not-bad"),
        ([0.01, -0.01], "seesaw"),
        ([-0.01, -0.02], "negative-transfer"),
        ([0.0, 0.0], "neutral"),
        ([0.01, 0.0, 0.02], "not-bad"),
    ],
)
def test_verdicts(deltas, word) -> None:
    assert verdict(deltas) == word
