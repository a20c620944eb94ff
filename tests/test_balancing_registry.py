"""Every registered balancer trains ``mmoe`` on real Census rows and logs the weights it used
(registering a strategy enrols it here), and the CLI passes ``--balancer-args`` through."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mtrec.balancing import BALANCERS, GradientBalancer, gradient_balancer_names
from mtrec.cli import app
from mtrec.models import build_model
from mtrec.train.tensorboard import read_scalars
from mtrec.train.trainer import TrainConfig, Trainer, seed_everything
from tests.helpers import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one thread is as fast

GRADIENT = gradient_balancer_names()


def _record_cosines(balancer, model, level: str) -> list[float]:
    """Wrap a gradient balancer's ``backward`` so that every step first computes, by autograd and
    independently of the balancer, the cosine between the two tasks' gradients where it balances them:
    MMoE's expert parameters (level params; the tables get the plain sum by default), or the expert
    outputs ``output.shared`` (level repr). Returns the list it fills."""
    seen: list[float] = []
    if not isinstance(balancer, GradientBalancer):
        return seen
    original = balancer.backward

    def backward(losses, context, aux_loss=None):
        wrt = list(model.mixture.experts.parameters()) if level == "params" else [context.shared]
        g = [
            torch.cat([d.reshape(-1) for d in torch.autograd.grad(losses[t], wrt, retain_graph=True)]) for t in range(2)
        ]
        seen.append(float(g[0] @ g[1] / (g[0].norm() * g[1].norm())))
        return original(losses, context, aux_loss)

    balancer.backward = backward
    return seen


@pytest.mark.parametrize(
    "name, options", [(n, {}) for n in BALANCERS.names()] + [(n, {"level": "repr"}) for n in GRADIENT]
)
def test_every_balancer_trains_mmoe_and_logs_its_weights(name: str, options: dict, census_store) -> None:
    """Every strategy (and every gradient method at the representation level, MMoE's expert outputs)."""
    seed_everything(0)
    tasks = census_store.layout.task_names
    model = build_model(
        "mmoe", census_store.layout, {"num_experts": 4, "expert_hidden": [32, 16], "tower_hidden": [16]}
    )
    balancer = BALANCERS.get(name)(tasks, task_weights=None, **options)
    start = model.towers.out.weight.detach().clone()
    train = census_store.split("train").slice(0, 2048)
    cosines = _record_cosines(balancer, model, options.get("level", "params"))
    trainer = Trainer(model, balancer, TrainConfig(epochs=1, batch_size=256, progress=False))
    fit = trainer.fit(train, census_store.split("valid"))
    record = fit.history[0]
    assert all(math.isfinite(v) for v in record["train_loss"].values())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    logged = record["balancer"]  # per-epoch means of the per-step stats
    for task in tasks:
        assert math.isfinite(logged[f"weight/{task}"]) and logged[f"weight/{task}"] >= 0
    assert set(record["weights"]) == set(tasks)
    if issubclass(BALANCERS.get(name), GradientBalancer):  # the epoch mean of the cosines computed here
        assert len(cosines) == 8
        assert logged["cos/income~never_married"] == pytest.approx(sum(cosines) / len(cosines), abs=1e-4)
    towers = model.towers.out.weight.detach()
    for t, task in enumerate(tasks):  # a task with weight moved its tower; a masked one did not
        moved = not torch.equal(towers[t], start[t])
        assert moved == (logged[f"weight/{task}"] > 0), (task, logged)


def test_cli_passes_balancer_args_and_writes_the_weights_to_history(census_schema_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run_cli(
        "train",
        "--schema",
        str(census_schema_path),
        "--model",
        "mmoe",
        "--epochs",
        "2",
        "--model-args",
        "num_experts=4,expert_hidden=[32,16]",
        "--batch-size",
        "512",
        "--patience",
        "5",
        "--threads",
        "1",
        "--balancer",
        "staged",
        "--balancer-args",
        "stages=never_married;income,stage_epochs=1",
        "--out",
        str(out),
        cache=tmp_path / "cache",
    )
    assert proc.returncode == 0, proc.stderr
    history = json.loads((out / "history.json").read_text())
    assert [h["weights"] for h in history] == [
        {"income": 0.0, "never_married": 1.0},
        {"income": 1.0, "never_married": 1.0},
    ]
    assert json.loads((out / "config.json").read_text())["balancer"]["options"]["stages"] == "never_married;income"


@pytest.mark.parametrize("name", BALANCERS.names())
def test_every_balancer_trains_mmoe_for_an_epoch_through_the_cli(
    name: str, census_schema_path: Path, tmp_path: Path
) -> None:
    """``mtrec train --balancer NAME`` (the real command, run in-process) on 4,000 Census rows: finite
    metrics, and the per-task weights it used (and gradient cosines) in the run's history.json."""
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--schema",
            str(census_schema_path),
            "--model",
            "mmoe",
            "--epochs",
            "1",
            "--batch-size",
            "256",
            "--model-args",
            "num_experts=4,expert_hidden=[32,16]",
            "--threads",
            "1",
            "--balancer",
            name,
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(math.isfinite(v) for task in metrics["test"].values() for v in task.values() if v is not None)
    (record,) = json.loads((out / "history.json").read_text())  # one epoch
    assert all(math.isfinite(v) for v in record["train_loss"].values())
    tasks = ["income", "never_married"]
    assert set(record["weights"]) == set(tasks)
    assert all(math.isfinite(record["balancer"][f"weight/{t}"]) for t in tasks)
    if issubclass(BALANCERS.get(name), GradientBalancer):  # its value is checked in the test above
        assert math.isfinite(record["balancer"]["cos/income~never_married"])
    # the same curves per step in TensorBoard's event file (~14 steps, written every 10th)
    curves = read_scalars(out / "tensorboard")
    for tag in ["train/loss/income", "train/loss/never_married", "balancer/weight/income", "valid/score"]:
        assert curves.get(tag) and all(math.isfinite(v) for _, v in curves[tag]), (tag, sorted(curves))
    assert [step for step, _ in curves["train/loss/income"]] == [10]
    assert curves["valid/score"][0][1] == pytest.approx(record["score"], abs=1e-6)
    if issubclass(BALANCERS.get(name), GradientBalancer):
        assert math.isfinite(curves["balancer/cos/income_vs_never_married"][0][1])
