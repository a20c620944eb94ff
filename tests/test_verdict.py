"""Verdicts against single-task baselines: metric directions, noise, and refusals."""

from __future__ import annotations

import statistics

import pytest

from mtrec.diagnostics.verdict import compare_to_baseline, verdict
from mtrec.errors import MtrecError


def test_a_change_inside_the_measured_seed_spread_is_noise_not_a_seesaw() -> None:
    """The demo's old case: mmoe income -0.00003 against a seed spread of ~0.0003 is no change."""
    res = compare_to_baseline(
        {
            "single_task": {"income": 0.95090, "never_married": 0.99460},
            "mmoe": {"income": 0.95087, "never_married": 0.99470},
        },
        noise={"income": 0.0006, "never_married": 0.0002},
    )
    assert res["mmoe"]["changed"] == {"income": "noise", "never_married": "noise"}
    assert res["mmoe"]["verdict"] == "neutral"
    # the same deltas with a (hypothetically) tiny noise are real changes, in opposite directions
    tight = compare_to_baseline(
        {
            "single_task": {"income": 0.95090, "never_married": 0.99460},
            "mmoe": {"income": 0.95087, "never_married": 0.99470},
        },
        noise={"income": 1e-6, "never_married": 1e-6},
    )
    assert tight["mmoe"]["verdict"] == "seesaw"


def test_seeds_give_the_noise_the_larger_seed_std_of_the_two() -> None:
    base = {"a": [0.90, 0.91, 0.92]}  # stdev 0.01
    res = compare_to_baseline({"single_task": base, "m": {"a": [0.925, 0.926, 0.927]}})
    assert res["m"]["noise"]["a"] == pytest.approx(statistics.stdev(base["a"]))
    assert res["m"]["deltas"]["a"] == pytest.approx(0.926 - 0.91)
    assert res["m"]["verdict"] == "well-done"  # 0.016 > 0.01
    res = compare_to_baseline({"single_task": base, "m": {"a": [0.915, 0.916, 0.917]}})
    assert res["m"]["verdict"] == "neutral"  # 0.006 < 0.01


def test_regression_metrics_are_better_when_lower() -> None:
    """MSE down is better: the same numbers read as AUC would give the opposite verdict."""
    results = {
        "single_task": {"click": [0.80, 0.80], "watch": [2.0, 2.0]},
        "mmoe": {"click": [0.80, 0.80], "watch": [1.5, 1.5]},
    }
    res = compare_to_baseline(results, metrics={"click": "auc", "watch": "mse"}, noise={"click": 0.01, "watch": 0.01})
    assert res["mmoe"]["changed"]["watch"] == "better" and res["mmoe"]["verdict"] == "not-bad"
    as_auc = compare_to_baseline(results, noise={"click": 0.01, "watch": 0.01})
    assert as_auc["mmoe"]["verdict"] == "negative-transfer"


def test_negative_transfer_is_none_better_at_least_one_worse() -> None:
    assert verdict([-0.01, 0.0], tolerance=0.001) == "negative-transfer"
    assert verdict([-0.01, -0.02], tolerance=0.001) == "negative-transfer"
    assert verdict([0.0004, -0.0003], tolerance=[0.001, 0.0001]) == "negative-transfer"  # per-task tolerance


def test_refusals_name_the_problem() -> None:
    with pytest.raises(MtrecError, match="one seed"):
        compare_to_baseline({"single_task": {"a": 0.9}, "m": {"a": 0.91}})
    with pytest.raises(MtrecError, match="no auc for task 'b'"):
        compare_to_baseline({"single_task": {"a": [0.9, 0.9], "b": [0.8, 0.8]}, "m": {"a": [0.9, 0.9]}})
    with pytest.raises(MtrecError, match="no direction"):
        compare_to_baseline({"single_task": {"a": [0.9, 0.9]}, "m": {"a": [0.9, 0.9]}}, metrics={"a": "ndcg"})
