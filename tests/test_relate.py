"""The MMoE paper's synthetic data, task relatedness probes, and the monitor seeing a set correlation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mtrec.cli import app
from mtrec.data.store import load_store
from mtrec.datasets import dataset_schema_path
from mtrec.datasets.synthetic import SyntheticArgs, generate
from mtrec.diagnostics.diagnose import monitor_summary
from mtrec.diagnostics.relate import label_correlation, train_alone
from mtrec.errors import MtrecError
from mtrec.schema import load_schema
from mtrec.train.run import train_run
from mtrec.train.trainer import TrainConfig


@pytest.mark.parametrize("p", [0.0, 0.5, 0.9, 1.0])
def test_synthetic_weight_vectors_have_the_set_cosine(p: float) -> None:
    x, y, w = generate(SyntheticArgs(correlation=p, rows=500, seed=3))
    cos = float(w[0] @ w[1] / np.linalg.norm(w[0]) / np.linalg.norm(w[1]))
    assert cos == pytest.approx(p, abs=1e-9)
    assert np.linalg.norm(w[0]) == pytest.approx(1.0) and x.shape == (500, 100) and y.shape == (500, 2)
    if p == 1.0:  # identical tasks: the labels differ by the noise only (std 0.1 each)
        assert np.std(y[:, 0] - y[:, 1]) == pytest.approx(0.1 * np.sqrt(2), rel=0.15)


def test_dataset_args_errors_list_the_valid_arguments(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--dataset",
            "synthetic",
            "--dataset-args",
            "corelation=0.5",
            "--model",
            "mmoe",
            "--out",
            str(tmp_path / "r"),
        ],
    )
    message = str(result.exception)  # main() turns an MtrecError into one error: line and exit 2
    assert isinstance(result.exception, MtrecError) and "corelation" in message and "correlation=0.5" in message
    result = CliRunner().invoke(
        app,
        ["train", "--dataset", "census", "--dataset-args", "rows=5", "--model", "mmoe", "--out", str(tmp_path / "r")],
    )
    assert isinstance(result.exception, MtrecError) and "takes no --dataset-args" in str(result.exception)


def _synthetic(p: float, seed: int, rows: int = 4000):
    return load_schema(dataset_schema_path("synthetic", {"correlation": p, "rows": rows, "seed": seed}))


def test_monitor_sees_identical_tasks_agree_and_orthogonal_ones_not(one_thread) -> None:
    """Every run on correlation 1.0 has a higher mean gradient cosine than every run on 0.0 (2 seeds each;
    the 5-seed figures are in BENCHMARKS.md)."""
    cos = {}
    for p in (0.0, 1.0):
        for seed in (0, 1):
            config = TrainConfig(epochs=6, batch_size=256, patience=6, seed=seed, monitor_every=4, progress=False)
            result = train_run(
                _synthetic(p, seed, rows=8000),
                "mmoe",
                None,
                config,
                model_options={"num_experts": 4, "expert_hidden": [64]},
            )
            cos.setdefault(p, []).append(monitor_summary(result.fit.history)["pairs"]["y1~y2"]["cos_mean"])
    assert min(cos[1.0]) > max(cos[0.0]) + 0.1, cos


def test_training_one_identical_task_lifts_the_others_probe_more_than_an_orthogonal_one(one_thread) -> None:
    gains = {}
    for p in (0.0, 1.0):
        store = load_store(_synthetic(p, 0, rows=8000))
        # the labels are non-linear in w.x (a linear probe on the untrained network explains ~0 of them);
        # six epochs of y1 build a representation from which y2 is readable only when y2 is the same task
        curves = train_alone(store, 0, epochs=6, seed=0, config=TrainConfig(batch_size=256))
        gains[p] = curves[-1][1] - curves[0][1]  # y2's probe R^2 after training y1 alone, minus before
    assert gains[1.0] > gains[0.0] + 0.1, gains


def test_relate_on_census_through_the_cli(census_schema_path: Path, census_store, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "relate",
            "--schema",
            str(census_schema_path),
            "--epochs",
            "1",
            "--seeds",
            "2",
            "--threads",
            "1",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    rel = json.loads((tmp_path / "relate.json").read_text())
    # the phi coefficient from the 2x2 table, written out
    y = census_store.split("train").labels.numpy()
    n11 = np.sum((y[:, 0] == 1) & (y[:, 1] == 1))
    n00 = np.sum((y[:, 0] == 0) & (y[:, 1] == 0))
    n10 = np.sum((y[:, 0] == 1) & (y[:, 1] == 0))
    n01 = np.sum((y[:, 0] == 0) & (y[:, 1] == 1))
    phi = (n11 * n00 - n10 * n01) / np.sqrt(float((n11 + n10) * (n01 + n00) * (n11 + n01) * (n10 + n00)))
    assert rel["label_correlation"][0][1] == pytest.approx(phi, abs=1e-6)
    assert label_correlation(census_store.split("train"), census_store.layout)[1, 0] == pytest.approx(phi, abs=1e-6)
    assert set(rel["transfer"]) == {"income", "never_married"}
    assert len(rel["transfer"]["income"]["never_married"]["probe"]) == 2  # before training, after epoch 1
    # the sharing verdict's figures from its per-seed validation AUCs, written out: mean difference, and the
    # larger seed standard deviation as the noise a change must exceed
    sb = rel["shared_bottom_vs_single_task"]
    for task in ("income", "never_married"):
        mine, base = sb["valid"]["shared_bottom"][task], sb["valid"]["single_task"][task]
        assert len(mine) == len(base) == 2
        assert sb["deltas"][task] == pytest.approx(np.mean(mine) - np.mean(base), abs=1e-12)
        noise = max(np.std(mine, ddof=1), np.std(base, ddof=1))
        d = np.mean(mine) - np.mean(base)
        assert sb["changed"][task] == ("better" if d > noise else "worse" if d < -noise else "noise")
    assert "income and never_married:" in result.output
