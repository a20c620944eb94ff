"""Gate utilisation and `mtrec diagnose` on a real trained run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mtrec.cli import app
from mtrec.diagnostics.gates import gate_utilisation
from mtrec.models import build_model
from mtrec.train.trainer import seed_everything


@pytest.fixture(scope="module")
def ple_run(census_schema_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("diag") / "ple"
    cache = {"MTREC_CACHE": str(tmp_path_factory.getbasetemp() / "cache")}  # the session's isolated cache
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--schema",
            str(census_schema_path),
            "--model",
            "ple",
            "--epochs",
            "2",
            "--batch-size",
            "256",
            "--model-args",
            "expert_hidden=[16],tower_hidden=[8]",
            "--threads",
            "1",
            "--patience",
            "5",
            "--monitor-every",
            "4",
            "--no-tensorboard",
            "--out",
            str(out),
        ],
        env=cache,
    )
    assert result.exit_code == 0, result.output
    return out


def test_diagnose_reports_the_monitor_and_the_gates(ple_run: Path) -> None:
    result = CliRunner().invoke(app, ["diagnose", "--run", str(ple_run)])
    assert result.exit_code == 0, result.output
    diag = json.loads((ple_run / "diagnostics.json").read_text())
    history = json.loads((ple_run / "history.json").read_text())
    # the pair's cosine over the run: the sample-weighted mean of the per-epoch means, written out here
    per_epoch = [(h["monitor"]["samples"], h["monitor"]["pairs"]["income~never_married"]["cos_mean"]) for h in history]
    expected = sum(n * c for n, c in per_epoch) / sum(n for n, _ in per_epoch)
    assert diag["monitor"]["pairs"]["income~never_married"]["cos_mean"] == pytest.approx(expected)
    assert diag["monitor"]["samples"] == sum(n for n, _ in per_epoch)
    # PLE, 2 levels x (2 + 2 specific, 2 shared) experts: the last level's task gates never touch the
    # other task's specific experts
    last = diag["gates"]["level1"]
    assert last["rows"] == ["income", "never_married"]
    mean = np.array(last["mean"])
    assert (mean[0, 2:4] == 0).all() and (mean[1, 0:2] == 0).all() and (mean[:, 4:] > 0).all()
    assert set(diag["gates"]) == {"level0", "level1"}
    assert "income~never_married" in result.output and "normalised entropy" in result.output
    assert (ple_run / "diagnostics.json").stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_collapsed_and_monopolised_experts_are_found(census_store) -> None:
    """Gate biases set by hand (weights zero, so every sample's gate is the softmax of the biases): expert
    1 closed to every gate (collapsed); shared expert 4 favoured by income and closed for never_married
    (monopolised by income)."""
    seed_everything(0)
    model = build_model("cgc", census_store.layout, {"expert_hidden": [16]})  # experts: 0,1 income; 2,3 nm; 4,5 shared
    gates = model.levels[0].gates
    with torch.no_grad():
        gates.weight.zero_()
        gates.bias.zero_()
        gates.bias[:, 1] = -30.0  # expert 1 (income's second) unused by every gate
        gates.bias[0, 4] = 2.0  # income's gate favours shared expert 4
        gates.bias[1, 4] = -30.0  # never_married's gate never uses it
    util = gate_utilisation(model, census_store.split("valid"))[""]
    assert util["collapsed"] == [1]
    assert [(m["expert"], m["by"]) for m in util["monopolised"]] == [(4, "income")]

    def entropy(logits: list[float]) -> float:  # normalised by log of the experts the gate may use
        w = np.exp(logits) / np.exp(logits).sum()
        return float(-(w * np.log(w)).sum() / np.log(len(w)))

    assert util["entropy"]["income"] == pytest.approx(entropy([0.0, -30.0, 2.0, 0.0]), abs=1e-5)  # experts 0, 1, 4, 5
    assert util["entropy"]["never_married"] == pytest.approx(entropy([0.0, 0.0, -30.0, 0.0]), abs=1e-5)  # 2, 3, 4, 5
    assert np.array(util["mean"])[0, 4] == pytest.approx(np.exp(2) / (np.exp(2) + 2 + np.exp(-30)), abs=1e-5)
