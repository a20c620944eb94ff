"""Every registered model, through the common interface (registering a model enrols it here)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import train_steps
from mtrec.balancing import BALANCERS
from mtrec.models import MODELS, build_model
from mtrec.train.trainer import Trainer, TrainConfig, seed_everything


def is_funnel(name: str) -> bool:
    from mtrec.models.funnel import FunnelModel

    return issubclass(MODELS.get(name), FunnelModel)


def layout_for(name: str, layout):
    """Funnel models refuse a schema without a funnel: give Census one (never_married observed on income)."""
    from dataclasses import replace

    if not is_funnel(name):
        return layout
    return replace(layout, tasks=[layout.tasks[0], replace(layout.tasks[1], space=layout.tasks[0].name)])


@pytest.mark.parametrize("name", MODELS.names())
def test_forward_shapes_and_probabilities(name: str, census_store) -> None:
    seed_everything(0)
    model = build_model(name, layout_for(name, census_store.layout))
    batch = census_store.split("train").slice(0, 64)
    out = model(batch)
    assert out.logits.shape == (64, census_store.layout.num_tasks)
    probs = model.predict(out)
    assert torch.isfinite(probs).all() and (probs >= 0).all() and (probs <= 1).all()


# funnel models and MetaHeac have this test in test_models_funnel.py, on both of its data sets
@pytest.mark.parametrize("name", [n for n in MODELS.names() if not is_funnel(n) and n != "metaheac"])
def test_loss_falls_and_every_parameter_learns(name: str, census_store) -> None:
    seed_everything(0)
    model = build_model(name, census_store.layout)
    batch = census_store.split("train").slice(0, 256)
    losses = train_steps(model, batch, steps=30, lr=3e-3)
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("name, gates", [("mmoe", 2), ("omoe", 1), ("cgc", 2), ("ple", 5)])
def test_gated_models_expose_gate_weights(name: str, gates: int, census_store) -> None:
    model = build_model(name, census_store.layout)
    out = model(census_store.split("train").slice(0, 32), return_gates=True)
    assert len(out.gates) == gates
    for w in out.gates.values():
        assert w.shape[0] == 32
        assert torch.allclose(w.sum(-1), torch.ones(32), atol=1e-5)
    assert model(census_store.split("train").slice(0, 32)).gates == {}


def test_ple_task_gates_see_only_their_own_and_shared_experts(census_store) -> None:
    model = build_model("ple", census_store.layout, {"specific_experts": [1, 3], "shared_experts": 2, "num_levels": 2})
    gates = model(census_store.split("train").slice(0, 16), return_gates=True).gates
    # experts: [t0] [t1 t1 t1] [s s]
    assert torch.all(gates["level1/income"][:, 1:4] == 0) and torch.all(gates["level1/income"][:, [0, 4, 5]] > 0)
    assert torch.all(gates["level1/never_married"][:, 0] == 0)
    assert torch.all(gates["level0/shared"] > 0)
    assert "level1/shared" not in gates


def test_single_task_shares_nothing(census_store) -> None:
    """Task 0's loss sends no gradient to anything task 1 uses."""
    model = build_model("single_task", census_store.layout)
    batch = census_store.split("train").slice(0, 64)
    model.losses(model(batch), batch)[0].backward()
    emb = model.embedding.tables["8"].weight.grad.view(-1, 2, 8)  # [rows, copies, d]
    assert emb[:, 0].abs().sum() > 0 and emb[:, 1].abs().sum() == 0
    assert model.nets.layers[0].weight.grad[1].abs().sum() == 0
    assert model.shared_parameters() == []


def test_unknown_model_option_is_a_user_error(census_store) -> None:
    from mtrec.errors import MtrecError

    with pytest.raises(MtrecError, match="num_expertz"):
        build_model("mmoe", census_store.layout, {"num_expertz": 3})


def test_fixed_weights_scale_the_task_losses(census_store) -> None:
    model = build_model("shared_bottom", census_store.layout)
    batch = census_store.split("train").slice(0, 64)
    losses = model.losses(model(batch), batch)
    fixed = BALANCERS.get("fixed")(census_store.layout.task_names, task_weights=[2.0, 0.0])
    assert fixed.combine(losses, None).item() == pytest.approx(2 * losses[0].item(), rel=1e-6)
    assert fixed.weights() == {"income": 2.0, "never_married": 0.0}


def test_trainer_keeps_the_best_validation_epoch(census_store) -> None:
    seed_everything(0)
    model = build_model("shared_bottom", census_store.layout)
    trainer = Trainer(model, BALANCERS.get("fixed")(model.task_names), TrainConfig(epochs=4, batch_size=256, patience=4))
    fit = trainer.fit(census_store.split("train"), census_store.split("valid"))
    scores = [h["score"] for h in fit.history]
    assert fit.best_score == max(scores) and fit.best_epoch == scores.index(max(scores)) + 1
    from mtrec.metrics.core import mean_auc

    assert mean_auc(trainer.evaluate(census_store.split("valid")), model.layout) == pytest.approx(fit.best_score)
