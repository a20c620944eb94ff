"""Pluggable bottoms (mlp, dcn_v2, deepfm, din) in shared_bottom, mmoe, ple and single_task,
and sequence features end to end: schema, store, target attention, prediction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import yaml
from pydantic import ValidationError

from mtrec.data.store import Store, load_store
from mtrec.errors import MtrecError
from mtrec.models import build_model
from mtrec.nn.bottoms import (
    BatchedCrossNetwork,
    BatchedDCNv2,
    BottomOptions,
    FMTerm,
    TargetAttention,
    embedded_fields,
)
from mtrec.nn.embedding import FeatureEmbedding
from mtrec.schema import load_schema
from mtrec.train.run import predict_file, train_run
from mtrec.train.trainer import TrainConfig, seed_everything
from tests.helpers import train_steps


def write_behaviour(folder: Path, rows: int = 800, seed: int = 0) -> Path:
    """Impressions with a behaviour sequence over the item vocabulary; returns the schema path.

    A click is likely when the shown item is in the user's history (what target attention
    can see and a mean of the history cannot); ``like`` follows clicks, ``dwell`` is a time.
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    user = rng.integers(0, 20, rows)
    item = rng.integers(0, 30, rows)
    history = [rng.choice(30, size=rng.integers(0, 6), replace=False) for _ in range(rows)]
    seen = np.array([item[r] in history[r] for r in range(rows)])
    tags = ["|".join(rng.choice(list("abcde"), rng.integers(0, 3))) for _ in range(rows)]
    price = rng.gamma(2.0, 10.0, rows).round(2)
    click = rng.random(rows) < 1 / (1 + np.exp(-(2.5 * seen - 1.0 + (item % 3 == 0))))
    like = click & (rng.random(rows) < 0.5 + 0.3 * (user % 2))
    dwell = np.round(click * rng.gamma(2.0, 0.5, rows) + price / 100, 3)  # minutes
    frame = pl.DataFrame(
        {
            "user": [f"u{u}" for u in user],
            "item": [f"i{i}" for i in item],
            "history": ["|".join(f"i{i}" for i in h) for h in history],
            "tags": tags,
            "price": price,
            "click": click.astype(int),
            "like": like.astype(int),
            "dwell": dwell,
        }
    )
    frame.write_csv(folder / "behaviour.csv")
    schema = {
        "name": "behaviour",
        "source": {"train": "behaviour.csv"},
        "split": {"valid": 0.2, "test": 0.2},
        "features": [
            {"name": "user", "type": "sparse", "embed_dim": 4},
            {"name": "item", "type": "sparse", "embed_dim": 8},
            {"name": "history", "type": "sequence", "vocab": "item", "embed_dim": 8, "max_len": 5},
            {"name": "tags", "type": "sequence", "embed_dim": 4, "max_len": 3},
            {"name": "price", "type": "dense", "log": True},
        ],
        "tasks": [
            {"name": "click", "type": "binary", "label": "click"},
            {"name": "like", "type": "binary", "label": "like", "space": "click"},
            {"name": "dwell", "type": "regression", "label": "dwell"},
        ],
        "user": "user",
    }
    path = folder / "schema.yaml"
    path.write_text(yaml.safe_dump(schema, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def behaviour(tmp_path_factory: pytest.TempPathFactory) -> Store:
    mp = pytest.MonkeyPatch()
    mp.setenv("MTREC_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    try:
        return load_store(load_schema(write_behaviour(tmp_path_factory.mktemp("behaviour"))))
    finally:
        mp.undo()


BOTTOMS = {
    "mlp": {},
    "dcn_v2": {"bottom": "dcn_v2"},
    "dcn_v2_parallel_lowrank": {"bottom": "dcn_v2", "cross_structure": "parallel", "cross_rank": 4},
    "deepfm": {"bottom": "deepfm"},
    "din": {"bottom": "din"},
}
SIZES = {
    "shared_bottom": {"bottom_hidden": [32], "tower_hidden": [16]},
    "single_task": {"bottom_hidden": [32], "tower_hidden": [16]},
    "mmoe": {"num_experts": 3, "expert_hidden": [32], "tower_hidden": [16]},
    "ple": {"specific_experts": 1, "shared_experts": 1, "expert_hidden": [32], "tower_hidden": [16]},
}


@pytest.mark.parametrize("bottom", list(BOTTOMS))
@pytest.mark.parametrize("name", list(SIZES))
def test_every_bottom_learns_in_every_model(name: str, bottom: str, behaviour: Store) -> None:
    seed_everything(0)
    model = build_model(name, behaviour.layout, SIZES[name] | BOTTOMS[bottom])
    batch = behaviour.split("train").slice(0, 128)
    losses = train_steps(model, batch, steps=30, lr=1e-2)
    assert losses[-1] < 0.7 * losses[0]
    model.eval()
    with torch.no_grad():
        scores = model.predict(model(behaviour.split("test")))
        part = model.predict(model(behaviour.split("test").slice(10, 20)))
    assert torch.isfinite(scores).all()
    torch.testing.assert_close(part, scores[10:20], rtol=1e-5, atol=1e-6)  # a row's scores ignore the other rows


def test_embedded_fields_match_the_embedding(behaviour: Store) -> None:
    """Changing one feature of a row changes exactly that feature's columns of the embedded vector."""
    layout = behaviour.layout
    emb = FeatureEmbedding(layout)
    batch = behaviour.split("train").slice(0, 4)
    base = emb(batch)[:, 0]  # [4, D]
    fields = embedded_fields(layout)
    assert fields[-1].stop == emb.output_dim
    for f in fields:
        if f.kind == "sparse":
            col = [s.name for s in layout.sparse].index(f.name)
            changed = batch.take(torch.arange(4))
            changed.sparse[:, col] = (changed.sparse[:, col] + 1) % layout.sparse[col].vocab_size
        elif f.kind == "sequence":
            changed = batch.take(torch.arange(4))
            changed.sequences[f.name][:, 0] = 1 + changed.sequences[f.name][:, 0] % 3  # non-padding, different
        else:
            changed = batch.take(torch.arange(4))
            changed.dense[:, layout.dense.index(f.name)] += 1.0
        diff = (emb(changed)[:, 0] - base).abs().sum(0) > 0  # [D]
        cols = torch.nonzero(diff).squeeze(1).tolist()
        assert cols and set(cols) <= set(range(f.start, f.stop)), f


def test_cross_network_follows_the_dcn_v2_formula() -> None:
    torch.manual_seed(0)
    x0 = torch.randn(3, 5, 6)  # [n, B, D]
    for rank in (None, 2):
        net = BatchedCrossNetwork(3, 6, layers=2, rank=rank)
        with torch.no_grad():
            net.bias.normal_()
        out = net(x0)
        for member in range(3):
            x = x0[member]
            for layer in range(2):
                w = net.weight[layer, member] if rank is None else net.u[layer, member] @ net.v[layer, member]
                x = x0[member] * (x @ w + net.bias[layer, member]) + x  # x_{l+1} = x0 * (W x_l + b) + x_l
            assert torch.allclose(out[member], x, atol=1e-5)
    parallel = BatchedDCNv2(3, 6, [4], layers=1, structure="parallel")
    assert parallel(x0[0]).shape == (3, 5, 6 + 4) and parallel.out_dim == 10


def test_fm_term_is_first_order_plus_pairwise_interactions(behaviour: Store) -> None:
    layout = behaviour.layout
    emb = FeatureEmbedding(layout)
    fm = FMTerm(layout, copies=1)
    with torch.no_grad():
        fm.dense_weight.normal_()
    batch = behaviour.split("train").slice(0, 6)
    x = emb(batch)  # [6, 1, D]
    out = fm(x, batch)[:, 0]  # [6, 1 + 4 + 8]
    fields = [f for f in embedded_fields(layout) if f.kind != "dense"]
    for d, part in ((4, out[:, 1:5]), (8, out[:, 5:13])):
        vecs = [x[:, 0, f.start : f.stop] for f in fields if f.width == d]
        pairwise = sum((vecs[i] * vecs[j]).sum(-1) for i in range(len(vecs)) for j in range(i + 1, len(vecs)))
        assert torch.allclose(part.sum(-1), pairwise, atol=1e-6)  # sum_{i<j} <v_i, v_j> within a size
    scalars = fm.first_order(batch)[:, 0]  # [6, F + dense]
    expected = scalars[:, :4].sum(-1) + (batch.dense * fm.dense_weight[0]).sum(-1)
    assert torch.allclose(out[:, 0], expected, atol=1e-6)


def test_din_attention_pools_the_history_against_the_target(behaviour: Store) -> None:
    layout = behaviour.layout
    seed_everything(0)
    emb = FeatureEmbedding(layout)
    din = TargetAttention(layout, copies=1, hidden=[8])
    batch = behaviour.split("train").slice(0, 32)
    x = emb(batch)
    out = din(x, batch, emb)
    slot = next(f for f in embedded_fields(layout) if f.name == "history")
    outside = torch.ones(x.shape[-1], dtype=torch.bool)
    outside[slot.start : slot.stop] = False
    assert torch.equal(out[..., outside], x[..., outside])  # only the history slot is rewritten
    empty = (batch.sequences["history"] == 0).all(1)
    assert empty.any() and (out[empty][..., slot.start : slot.stop] == 0).all()  # no history, no interest
    # sum pooling: the order of the history does not matter
    shuffled = batch.take(torch.arange(32))
    shuffled.sequences["history"] = shuffled.sequences["history"].flip(1)
    assert torch.allclose(din(emb(shuffled), shuffled, emb), out, atol=1e-6)
    # the pooled interest depends on the target item, the mean of the history does not
    other = batch.take(torch.arange(32))
    item_col = [s.name for s in layout.sparse].index("item")
    other.sparse[:, item_col] = (other.sparse[:, item_col] + 1) % layout.sparse[item_col].vocab_size
    x_other = emb(other)
    assert torch.equal(x_other[..., slot.start : slot.stop], x[..., slot.start : slot.stop])
    moved = (din(x_other, other, emb) - out)[~empty][..., slot.start : slot.stop].abs().sum(-1)
    assert (moved > 0).all()


def test_din_and_deepfm_need_the_right_features(census_store) -> None:
    with pytest.raises(MtrecError, match=r"features\[\]\.vocab"):
        build_model("shared_bottom", census_store.layout, {"bottom": "din"})
    with pytest.raises(MtrecError, match="bottom"):
        build_model("mmoe", census_store.layout, {"bottom": "dcn_v3"})


def test_dcn_v2_experts_stay_one_batched_stack(behaviour: Store) -> None:
    mmoe = build_model("mmoe", behaviour.layout, SIZES["mmoe"] | BOTTOMS["dcn_v2"])
    experts = mmoe.mixture.experts
    d = mmoe.embedding.output_dim
    assert isinstance(experts, BatchedDCNv2) and experts.cross.weight.shape == (2, 3, d, d)
    ple = build_model("ple", behaviour.layout, SIZES["ple"] | BOTTOMS["dcn_v2"] | {"num_levels": 2})
    assert isinstance(ple.levels[0].experts, BatchedDCNv2) and ple.levels[0].experts.n == ple.levels[0].num_experts
    assert not isinstance(ple.levels[1].experts, BatchedDCNv2)  # upper levels read experts, not features
    single = build_model("single_task", behaviour.layout, SIZES["single_task"] | BOTTOMS["dcn_v2"])
    assert single.nets.n == 3


@pytest.mark.parametrize("bottom", ["deepfm", "din", "dcn_v2"])
def test_single_task_bottoms_share_nothing(bottom: str, behaviour: Store) -> None:
    """Task 0's loss reaches no parameter slice that task 1 or 2 uses."""
    model = build_model("single_task", behaviour.layout, SIZES["single_task"] | BOTTOMS[bottom])
    batch = behaviour.split("train").slice(0, 64)
    model.losses(model(batch), batch)[0].backward()
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        if name.startswith("embedding.") or name.startswith("bottom_input.fm.first_order."):
            d = p.shape[1] // 3
            grad = p.grad.view(p.shape[0], 3, d)  # [rows, copies, d]
            assert grad[:, 1:].abs().sum() == 0 and grad[:, 0].abs().sum() > 0, name
        elif (
            name == "bottom_input.fm.dense_weight"
            or ".layers." in name
            or name.startswith(("bottom_input.din", "nets."))
        ):
            member = 1 if name.startswith("nets.cross.") else 0  # cross weights are [layers, n, ...]
            grad = p.grad.movedim(member, 0)
            assert grad[1:].abs().sum() == 0, name


def test_sequence_features_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Schema with a history sharing the item vocabulary -> store -> DIN model -> run -> predictions."""
    monkeypatch.setenv("MTREC_CACHE", str(tmp_path / "cache"))
    schema = load_schema(write_behaviour(tmp_path / "data", rows=600))
    out = tmp_path / "run"
    result = train_run(
        schema,
        "mmoe",
        out,
        TrainConfig(epochs=2, batch_size=64, progress=False),
        model_options=SIZES["mmoe"] | BOTTOMS["din"],
    )
    assert result.metrics["test"]["click"]["auc"] > 0.55  # the history of the shown item carries the click signal
    assert {"like", "like@all", "dwell"} <= set(result.metrics["test"])
    predicted = tmp_path / "scores.csv"
    rows = predict_file(out, tmp_path / "data" / "behaviour.csv", predicted)
    scores = pl.read_csv(predicted)
    assert rows == 600 and scores.columns == ["click", "like", "dwell", "like@all"]  # like lives on clicks
    # a row scores the same alone in another file, in another order: rows stay aligned with their scores
    source = pl.read_csv(tmp_path / "data" / "behaviour.csv")
    pick = [599, 7, 300, 42, 0, 123]
    source[pick].write_csv(tmp_path / "picked.csv")
    assert predict_file(out, tmp_path / "picked.csv", tmp_path / "picked_scores.csv") == len(pick)
    picked = pl.read_csv(tmp_path / "picked_scores.csv")
    np.testing.assert_allclose(picked.to_numpy(), scores[pick].to_numpy(), rtol=1e-5, atol=1e-7)
    assert scores["click"].n_unique() > 100  # and the rows are told apart


def test_bottom_options_are_validated() -> None:
    assert BottomOptions().bottom == "mlp"
    with pytest.raises(ValidationError):
        BottomOptions(cross_layers=0)
