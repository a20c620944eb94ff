"""The gradient conflict monitor against per-task autograd, and through `mtrec train`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mtrec.balancing import BALANCERS
from mtrec.balancing.base import StepContext
from mtrec.cli import app
from mtrec.diagnostics.monitor import ConflictMonitor
from mtrec.errors import MtrecError
from mtrec.models import build_model
from mtrec.train.tensorboard import read_scalars
from mtrec.train.trainer import TrainConfig, Trainer, seed_everything


def _hand_shared_dense(model, name: str, scope: str = "all") -> list[tuple[torch.nn.Parameter, slice]]:
    """The shared dense elements, written out by hand per model (not from the sharing declaration)."""
    if name == "mmoe":  # every expert; the gates are per task
        if scope == "last":  # the experts' second (last) layer
            experts = model.mixture.experts.layers[1]
            return [(experts.weight, slice(None)), (experts.bias, slice(None))]
        return [(p, slice(None)) for p in model.mixture.experts.parameters()]
    if scope == "last":  # the last level's shared experts (6 experts: 2 + 2 task-specific, then 2 shared), last layer
        experts = model.levels[1].experts.layers[1]
        return [(experts.weight, slice(4, 6)), (experts.bias, slice(4, 6))]
    inner, last = model.levels  # ple, 2 tasks x 2 specific + 2 shared experts per level
    out = [(p, slice(None)) for p in inner.experts.parameters()]  # every inner expert feeds the shared gate
    out.append((inner.gates.weight, slice(2, 3)))  # the inner shared gate (gates: task 0, task 1, shared)
    out.append((inner.gates.bias, slice(2, 3)))
    out += [(p, slice(4, 6)) for p in last.experts.parameters()]  # the last level's shared experts
    return out


def _cosine_by_hand(model, name: str, losses: torch.Tensor, scope: str = "all") -> tuple[float, float]:
    parts = _hand_shared_dense(model, name, scope)
    flat = []
    for t in range(2):
        grads = torch.autograd.grad(losses[t], [p for p, _ in parts], retain_graph=True, allow_unused=True)
        flat.append(torch.cat([g[s].reshape(-1) for g, (_, s) in zip(grads, parts)]))
    cos = float(torch.nn.functional.cosine_similarity(flat[0], flat[1], dim=0))
    return cos, float(flat[0].norm() / flat[1].norm())


@pytest.mark.parametrize(
    "name, balancer, scope",
    [
        ("mmoe", "fixed", "all"),
        ("ple", "fixed", "all"),
        ("ple", "mgda", "all"),
        ("mmoe", "uw", "all"),
        ("mmoe", "fixed", "last"),
        ("ple", "mgda", "last"),
    ],
)
def test_sampled_cosine_and_norm_ratio_match_autograd(
    name: str, balancer: str, scope: str, census_store, one_thread
) -> None:
    """At ``all`` a gradient balancer's own Gram matrix is read (mgda); otherwise the monitor takes its own
    passes, on the scope's elements (``last``: the last shared layer, written out by hand per model)."""
    seed_everything(0)
    model = build_model(name, census_store.layout)
    bal = BALANCERS.get(balancer)(model.task_names)
    monitor = ConflictMonitor(every=1, scope=scope)
    trainer = Trainer(model, bal, TrainConfig(progress=False), callbacks=[monitor])
    batch = census_store.split("train").slice(0, 512)
    out = model(batch)
    losses = model.losses(out, batch)
    cos, ratio = _cosine_by_hand(model, name, losses, scope)
    monitor.on_losses(trainer, 0, losses, out)
    bal.backward(losses, StepContext(0, 1, model, shared=out.shared), out.aux_loss)
    monitor.on_batch_end(trainer, 1, losses.detach())
    summary = monitor.summary(model.task_names)
    pair = summary["pairs"]["income~never_married"]
    assert pair["cos_mean"] == pytest.approx(cos, abs=1e-5)
    assert pair["norm_ratio"] == pytest.approx(ratio, rel=1e-4)
    assert pair["conflict_share"] == (1.0 if cos < 0 else 0.0)
    assert summary["tasks"]["income"]["velocity"] == pytest.approx(1.0)  # the first sample is the reference


def test_train_writes_the_monitor_to_history_and_tensorboard(census_schema_path: Path, tmp_path: Path) -> None:
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
            "2",
            "--batch-size",
            "256",
            "--model-args",
            "num_experts=4,expert_hidden=[32,16]",
            "--threads",
            "1",
            "--patience",
            "5",
            "--monitor-every",
            "3",
            "--monitor-scope",
            "all",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    history = json.loads((out / "history.json").read_text())
    steps = -(-3600 // 256)  # 3,600 training rows of the 4,000-row slice (valid_fraction 0.1)
    first, second = (h["monitor"] for h in history)
    assert first["samples"] == len(range(0, steps, 3))  # steps 0, 3, 6, ... of epoch 1
    assert first["scope"] == "all"
    assert first["samples"] + second["samples"] == len(range(0, 2 * steps, 3))
    velocity = second["tasks"]["income"]["velocity"]
    assert 0 < velocity < 1  # the income loss fell from its first sample
    scalars = read_scalars(out / "tensorboard")
    cos = [v for _, v in scalars["monitor/cos/income_vs_never_married"]]
    assert len(cos) == first["samples"] + second["samples"]
    assert np.mean(cos[: first["samples"]]) == pytest.approx(
        first["pairs"]["income~never_married"]["cos_mean"], abs=1e-5
    )


def test_monitor_off(census_schema_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--schema",
            str(census_schema_path),
            "--model",
            "shared_bottom",
            "--epochs",
            "1",
            "--threads",
            "1",
            "--monitor-every",
            "0",
            "--no-tensorboard",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "monitor" not in json.loads((out / "history.json").read_text())[0]


def test_monitor_scope_is_checked(census_schema_path: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["train", "--schema", str(census_schema_path), "--monitor-scope", "middle", "--out", str(tmp_path / "r")],
    )
    assert isinstance(result.exception, MtrecError)  # main() turns it into one error line and exit code 2
    assert "--monitor-scope: 'middle' is not allowed" in str(result.exception)
    assert not (tmp_path / "r").exists()
