"""Every registered model, through the common interface (registering a model enrols it here)."""

from __future__ import annotations

import pytest
import torch

from mtrec.balancing import BALANCERS
from mtrec.models import MODELS, build_model
from mtrec.train.trainer import TrainConfig, Trainer, seed_everything
from tests.helpers import train_steps


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
    assert torch.isfinite(probs).all()
    # at evaluation a row's scores do not depend on the other rows of its batch (nor on its position)
    model.eval()
    with torch.no_grad():
        whole = model.predict(model(batch))
        part = model.predict(model(census_store.split("train").slice(40, 50)))
    torch.testing.assert_close(part, whole[40:50], rtol=1e-5, atol=1e-6)
    assert whole.std(0).min() > 0  # not a constant: the rows are told apart


# funnel models and MetaHeac have this test in test_models_funnel.py, on both of its data sets
@pytest.mark.parametrize("name", [n for n in MODELS.names() if not is_funnel(n) and n != "metaheac"])
def test_loss_falls_and_every_parameter_learns(name: str, census_store) -> None:
    seed_everything(0)
    model = build_model(name, census_store.layout)
    batch = census_store.split("train").slice(0, 256)
    losses = train_steps(model, batch, steps=30, lr=3e-3)
    assert losses[-1] < 0.7 * losses[0]


# experts of the default CGC / PLE level for two tasks: [income income | never_married never_married | shared shared]
SEES = {"income": [0, 1, 4, 5], "never_married": [2, 3, 4, 5], "shared": [0, 1, 2, 3, 4, 5]}


def _constant_gates(layers, names: list[list[str]]) -> dict[str, torch.Tensor]:
    """Make every gate of every level ignore its input (zero weights) with bias ``log c`` for hand-picked
    ``c`` (different for every gate), so its softmax is ``c / sum(c)`` over the experts it may see.
    Returns those weights, written out, under the gate's exposed name."""
    expected = {}
    with torch.no_grad():
        for level, (layer, level_names) in enumerate(zip(layers, names)):
            layer.gates.weight.zero_()
            for g, name in enumerate(level_names):
                c = torch.arange(1.0, layer.num_experts + 1) + 3 * g + 10 * level
                layer.gates.bias[g] = c.log()
                task = name.split("/")[-1]
                seen = torch.zeros(layer.num_experts)
                seen[SEES[task] if task in SEES and layer.num_experts == 6 else slice(None)] = 1
                expected[name] = c * seen / (c * seen).sum()
    return expected


@pytest.mark.parametrize("name", ["mmoe", "omoe", "cgc", "ple"])
def test_gated_models_expose_the_gate_weights_they_mix_with(name: str, census_store) -> None:
    model = build_model(name, census_store.layout).eval()
    layers = [model.mixture] if name in ("mmoe", "omoe") else list(model.levels)
    names = {
        "mmoe": [["income", "never_married"]],
        "omoe": [["all"]],
        "cgc": [["income", "never_married"]],
        "ple": [["level0/income", "level0/never_married", "level0/shared"], ["level1/income", "level1/never_married"]],
    }[name]
    expected = _constant_gates(layers, names)
    batch = census_store.split("train").slice(0, 32)
    out = model(batch, return_gates=True)
    assert set(out.gates) == set(expected)
    for gate, w in expected.items():
        torch.testing.assert_close(out.gates[gate], w.expand(32, -1), rtol=1e-5, atol=1e-7)
    assert model(batch).gates == {}
    if name in ("mmoe", "omoe"):  # the towers read the experts mixed with exactly these weights
        with torch.no_grad():
            experts = model.mixture.experts(model.embedding(batch).squeeze(1))  # [E, B, H]
            mixed = torch.stack([torch.einsum("e,ebh->bh", expected[g], experts) for g in names[0]])
            logits = model.towers(mixed[0] if name == "omoe" else mixed)
        torch.testing.assert_close(out.logits, logits, rtol=1e-5, atol=1e-6)


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
    trainer = Trainer(
        model, BALANCERS.get("fixed")(model.task_names), TrainConfig(epochs=4, batch_size=256, patience=4)
    )
    fit = trainer.fit(census_store.split("train"), census_store.split("valid"))
    scores = [h["score"] for h in fit.history]
    assert fit.best_score == max(scores) and fit.best_epoch == scores.index(max(scores)) + 1
    from mtrec.metrics.core import mean_auc

    assert mean_auc(trainer.evaluate(census_store.split("valid")), model.layout) == pytest.approx(fit.best_score)


@pytest.mark.parametrize("name", ["mmoe", "ple", "ml_mmoe", "adatt", "shared_bottom"])
def test_memory_check_counts_the_whole_model_without_building_it(name: str, census_store) -> None:
    """The pre-training memory check counts parameters on the meta device; a model whose construction
    failed there used to fall back to the embedding tables alone (5,664 of mmoe's 371,362 on Census)."""
    from mtrec.train.run import count_parameters

    built = sum(p.numel() for p in build_model(name, census_store.layout).parameters())
    assert count_parameters(name, census_store.layout, None) == built


def test_an_undefined_selection_score_is_null_in_the_history(census_store) -> None:
    """Selecting by a metric the validation split cannot define (one label class) never wins and is
    recorded as null, so history.json stays strict JSON."""
    import json

    valid = census_store.split("valid")
    negatives = valid.take(torch.nonzero(valid.labels[:, 0] == 0).squeeze(1))  # income: one class only
    seed_everything(0)
    model = build_model("shared_bottom", census_store.layout)
    config = TrainConfig(epochs=1, batch_size=512, select_by="income.auc", progress=False)
    fit = Trainer(model, BALANCERS.get("fixed")(model.task_names), config).fit(
        census_store.split("train").slice(0, 2048), negatives
    )
    assert fit.history[0]["score"] is None
    json.dumps(fit.history, allow_nan=False)  # raises on -Infinity
