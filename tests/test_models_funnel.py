"""Funnel models (ESMM, ESM2, ESCM2, AITM) and MetaHeac; the Ali-CCP and AliExpress schemas;
task-space masking for every kind of loss."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import yaml
from sklearn.metrics import roc_auc_score

from mtrec.balancing import BALANCERS
from mtrec.data.store import Store, load_store
from mtrec.data.tables import TensorTable
from mtrec.errors import MtrecError
from mtrec.models import build_model
from mtrec.schema import load_schema
from mtrec.train.run import train_run
from mtrec.train.trainer import TrainConfig, Trainer, seed_everything
from tests.conftest import REPO, session_store
from tests.helpers import run_cli, train_steps

FUNNEL = ["esmm", "esm2", "escm2_ips", "escm2_dr", "aitm"]
ALL = FUNNEL + ["metaheac"]
SMALL = {"tower_hidden": [32, 16]}  # keeps the tests fast; the defaults are wider
OPTIONS = {name: dict(SMALL) for name in FUNNEL} | {"metaheac": {"tower_hidden": [16], "expert_hidden": [32], "num_experts": 4}}


def write_funnel(folder: Path, rows: int = 3000, seed: int = 0, stages: int = 2, chained: bool = True,
                 certain: float = 0.5) -> Path:
    """A CSV funnel impression -> click (-> cart) -> purchase and its schema; returns the schema path.

    Clicks depend on user and item; a purchase needs a click (and, when ``chained``, a cart).
    For a share ``certain`` of the items every click converts, so the true p(purchase) equals
    p(click) there: exactly where an unconstrained model overshoots p(click) half of the time.
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    user = rng.integers(0, 30, rows)
    item = rng.integers(0, 40, rows)
    price = rng.gamma(2.0, 10.0, rows).round(2)
    u_eff, i_eff = rng.normal(0, 1, 30), rng.normal(0, 1, 40)
    click = rng.random(rows) < 1 / (1 + np.exp(-(-0.5 + u_eff[user] + i_eff[item])))
    sure = item < int(40 * certain)
    cvr = np.where(sure, 1.0, 1 / (1 + np.exp(-(-1.0 + i_eff[item] - price / 20))))
    cart = click & (rng.random(rows) < 0.7)
    purchase = (cart if stages == 3 and chained else click) & (rng.random(rows) < cvr)
    cols = {"user": [f"u{x}" for x in user], "item": [f"i{x}" for x in item], "price": price,
            "click": click.astype(int), "purchase": purchase.astype(int)}
    if stages == 3:
        cols["cart"] = cart.astype(int)
    names = list(cols)
    lines = [",".join(names)] + [",".join(str(cols[n][r]) for n in names) for r in range(rows)]
    (folder / "funnel.csv").write_text("\n".join(lines) + "\n")
    tasks = [{"name": "click", "type": "binary", "label": "click"}]
    if stages == 3:
        tasks.append({"name": "cart", "type": "binary", "label": "cart", "space": "click"})
    tasks.append({"name": "purchase", "type": "binary", "label": "purchase",
                  "space": "cart" if stages == 3 and chained else "click"})
    schema = {
        "name": f"funnel{stages}{'c' if chained else 's'}",
        "source": {"train": "funnel.csv"},
        "split": {"valid": 0.2, "test": 0.2},
        "features": [
            {"name": "user", "type": "sparse", "embed_dim": 4},
            {"name": "item", "type": "sparse", "embed_dim": 4},
            {"name": "price", "type": "dense", "log": True},
        ],
        "tasks": tasks,
        "user": "user",
    }
    path = folder / "schema.yaml"
    path.write_text(yaml.safe_dump(schema, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def ali_ccp(tmp_path_factory: pytest.TempPathFactory) -> Store:
    return session_store(REPO / "configs" / "ali_ccp.yaml", tmp_path_factory)


@pytest.fixture(scope="module")
def census_funnel(census_schema_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Store:
    """Census with a funnel: never_married observed among the income > 50K positives."""
    data = yaml.safe_load(census_schema_path.read_text())
    data["name"] = "census_funnel"
    data["tasks"][1]["space"] = "income"
    data["source"] = {k: str(census_schema_path.parent / v) for k, v in data["source"].items()}
    path = tmp_path_factory.mktemp("census_funnel") / "schema.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return session_store(path, tmp_path_factory)


@pytest.fixture(scope="module")
def funnel2(tmp_path_factory: pytest.TempPathFactory) -> Store:
    return session_store(write_funnel(tmp_path_factory.mktemp("funnel2")), tmp_path_factory)


def _fit(model, store: Store, epochs: int = 1, batch_size: int = 512, lr: float = 3e-3) -> Trainer:
    trainer = Trainer(model, BALANCERS.get("fixed")(model.task_names),
                      TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, patience=epochs, progress=False))
    trainer.fit(store.split("train"), store.split("valid"))
    return trainer


# ---- every model, both data sets ------------------------------------------------------


@pytest.mark.parametrize("data", ["ali_ccp", "census_funnel"])
@pytest.mark.parametrize("name", ALL)
def test_trains_and_reports_in_space_and_joint_metrics(name: str, data: str, request) -> None:
    store: Store = request.getfixturevalue(data)
    seed_everything(0)
    model = build_model(name, store.layout, OPTIONS[name])
    trainer = _fit(model, store, batch_size=64 if data == "ali_ccp" else 512)
    child = store.layout.task_names[1]
    metrics = trainer.evaluate(store.split("test"))
    assert {store.layout.task_names[0], child, f"{child}@all"} <= set(metrics)
    assert all(np.isfinite(v) for m in metrics.values() for v in m.values() if v is not None)
    scores = trainer.predict(store.split("test"))
    assert np.isfinite(scores).all() and (scores >= 0).all() and (scores <= 1).all()
    if name in FUNNEL:  # entire-space probabilities: every step at most as likely as the one it needs
        model.eval()
        with torch.no_grad():
            out = model(store.split("test"))
        joint = model.predict_joint(out)
        assert (joint >= 0).all() and (joint <= 1).all()
        if name != "aitm":  # AITM's order is learned (calibrator), the others' holds by construction
            assert (joint[:, 1] <= joint[:, 0] + 1e-6).all()


@pytest.mark.parametrize("data", ["ali_ccp", "census_funnel"])
@pytest.mark.parametrize("name", ALL)
def test_loss_falls_and_every_parameter_learns(name: str, data: str, request) -> None:
    store: Store = request.getfixturevalue(data)
    seed_everything(0)
    model = build_model(name, store.layout, OPTIONS[name])
    batch = store.split("train").slice(0, 256)
    losses = train_steps(model, batch, steps=25, lr=3e-3)
    assert losses[-1] < 0.7 * losses[0]


def test_funnel_models_need_a_funnel(census_store) -> None:
    for name in FUNNEL:
        with pytest.raises(MtrecError, match=r"tasks\[\]\.space"):
            build_model(name, census_store.layout)
    bad = replace(census_store.layout, tasks=[replace(t, space=t.name) for t in census_store.layout.tasks])
    with pytest.raises(MtrecError, match=r"tasks\[0\]\.space"):
        build_model("esmm", bad)
    cycle = replace(census_store.layout, tasks=[
        replace(census_store.layout.tasks[0], space="never_married"), replace(census_store.layout.tasks[1], space="income")])
    with pytest.raises(MtrecError, match="cycle"):
        build_model("aitm", cycle)
    assert build_model("metaheac", census_store.layout).num_tasks == 2  # not a funnel model: any tasks


# ---- ESMM ----------------------------------------------------------------------------


def test_esmm_pctcvr_is_pctr_times_pcvr_and_never_above_pctr(funnel2: Store) -> None:
    seed_everything(0)
    model = build_model("esmm", funnel2.layout, SMALL)
    _fit(model, funnel2, epochs=2)
    model.eval()
    with torch.no_grad():
        out = model(funnel2.split("test"))
    p_ctr, p_cvr = torch.sigmoid(out.logits).unbind(1)
    p_ctcvr = model.predict_joint(out)[:, 1]
    assert torch.allclose(p_ctcvr, p_ctr * p_cvr, atol=1e-5)
    assert (p_ctcvr <= p_ctr).all()
    assert p_cvr.std() > 1e-3  # the CVR tower learned something, not a constant


# ---- ESM2 ----------------------------------------------------------------------------


def test_esm2_latent_observed_and_chained_actions(tmp_path_factory: pytest.TempPathFactory, funnel2: Store) -> None:
    # two tasks: latent action -> purchase's own tower (pD) plus pA and pO
    latent = build_model("esm2", funnel2.layout, SMALL)
    assert latent.towers.out.weight.shape[0] == 2 + 2
    chain = session_store(write_funnel(tmp_path_factory.mktemp("chain3"), stages=3, chained=True), tmp_path_factory)
    sibling = session_store(write_funnel(tmp_path_factory.mktemp("sib3"), stages=3, chained=False), tmp_path_factory)
    chained = build_model("esm2", chain.layout, SMALL)
    assert chained.towers.out.weight.shape[0] == 3  # click -> cart -> purchase: no extra tower
    observed = build_model("esm2", sibling.layout, SMALL | {"action_task": "cart"})
    assert observed.towers.out.weight.shape[0] == 3 + 1  # pA is the cart tower; pO extra
    with pytest.raises(MtrecError, match="action_task"):
        build_model("esm2", sibling.layout, {"action_task": "click"})
    for model, store in ((chained, chain), (observed, sibling)):
        seed_everything(0)
        trainer = _fit(model, store, epochs=3, batch_size=128)
        model.eval()
        with torch.no_grad():
            out = model(store.split("test"))
        joint = model.predict_joint(out)
        assert (joint[:, 1] <= joint[:, 0] + 1e-6).all() and (joint[:, 2] <= joint[:, 0] + 1e-6).all()
        metrics = trainer.evaluate(store.split("test"))
        assert metrics["click"]["auc"] > 0.58 and metrics["purchase@all"]["auc"] > 0.55  # it learns
        if model is chained:  # purchase@all multiplies the whole chain: pCTR * pCart|click * pBuy|cart
            labels = store.split("test").labels.numpy()
            scores = trainer.predict(store.split("test"))
            assert np.allclose(scores.prod(1), joint[:, 2].numpy(), atol=1e-5)
            assert metrics["purchase@all"]["auc"] == pytest.approx(roc_auc_score(labels.prod(1), scores.prod(1)))
    # the observed action really drives pCVR: pCVR = pA pD + (1 - pA) pO with pA the cart task's probability
    with torch.no_grad():
        out = observed(sibling.split("test").slice(0, 50))
        heads = observed.towers(observed.embedding(sibling.split("test").slice(0, 50)).squeeze(1))
    p = torch.sigmoid(heads)
    expected = p[:, 1] * p[:, 2] + (1 - p[:, 1]) * p[:, 3]
    assert torch.allclose(torch.sigmoid(out.logits[:, 2]), expected, atol=1e-5)


# ---- AITM ----------------------------------------------------------------------------


def test_aitm_calibrator_reduces_purchase_above_click(tmp_path_factory: pytest.TempPathFactory) -> None:
    # every click converts: the true p(purchase) equals p(click), so any overshoot of the purchase
    # tower is a violation of the funnel order, and an unconstrained model overshoots often
    store = session_store(write_funnel(tmp_path_factory.mktemp("sure"), certain=1.0), tmp_path_factory)
    shares: dict[float, list[float]] = {0.0: [], 1.0: []}
    for seed in (0, 1, 2):
        for weight in shares:
            seed_everything(seed)
            model = build_model("aitm", store.layout, SMALL | {"calibrator_weight": weight})
            _fit(model, store, epochs=6, batch_size=256)
            model.eval()
            with torch.no_grad():
                joint = model.predict_joint(model(store.split("test")))
            shares[weight].append(float((joint[:, 1] > joint[:, 0]).float().mean()))
    without, with_ = np.mean(shares[0.0]), np.mean(shares[1.0])
    assert without > 0.15, shares
    assert with_ < 0.2 * without, shares


def test_aitm_exposes_transfer_attention(funnel2: Store) -> None:
    model = build_model("aitm", funnel2.layout, SMALL)
    gates = model(funnel2.split("train").slice(0, 16), return_gates=True).gates
    assert list(gates) == ["purchase/transfer"]
    assert torch.allclose(gates["purchase/transfer"].sum(-1), torch.ones(16), atol=1e-6)


def test_metaheac_gates_and_meta_step(funnel2: Store) -> None:
    model = build_model("metaheac", funnel2.layout, OPTIONS["metaheac"])
    batch = funnel2.split("train").slice(0, 64)
    out = model(batch, return_gates=True)
    assert set(out.gates) == {"click/experts", "click/critics", "purchase/experts", "purchase/critics"}
    assert all(torch.allclose(g.sum(-1), torch.ones(64), atol=1e-5) for g in out.gates.values())
    # training: the query half under one inner step differs from the plain loss; eval: the plain loss
    meta = model.losses(out, batch)
    model.eval()
    plain = model.losses(model(batch), batch)
    query = batch.slice(32, 64)
    assert not torch.allclose(meta, plain) and not torch.allclose(meta, model.losses(model(query), query))


# ---- task-space masking --------------------------------------------------------------


def _train_steps(name: str, store: Store, labels: torch.Tensor, steps: int = 8) -> dict[str, torch.Tensor]:
    seed_everything(0)
    model = build_model(name, store.layout, OPTIONS.get(name, {}))
    table: TensorTable = replace(store.split("train"), labels=labels)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = table.take(torch.randperm(len(table), generator=gen)[:256])
        loss = model.losses(model(batch), batch).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ["shared_bottom", "mmoe", *ALL])
def test_labels_outside_the_space_change_nothing(name: str, funnel2: Store) -> None:
    labels = funnel2.split("train").labels
    outside = labels[:, 0] == 0  # not clicked: the purchase label is not observed there
    rng = torch.Generator().manual_seed(1)
    noisy = labels.clone()
    noisy[outside, 1] = torch.randint(0, 2, (int(outside.sum()),), generator=rng).float()
    assert (noisy[:, 1] != labels[:, 1]).sum() > 100
    clean, corrupted = _train_steps(name, funnel2, labels), _train_steps(name, funnel2, noisy)
    assert all(torch.equal(clean[k], corrupted[k]) for k in clean)
    # control: the same corruption inside the space does change the weights
    inside = labels.clone()
    flip = torch.nonzero(~outside).squeeze(1)[:50]
    inside[flip, 1] = 1 - inside[flip, 1]
    changed = _train_steps(name, funnel2, inside)
    assert any(not torch.equal(clean[k], changed[k]) for k in clean)


# ---- the data schemas, end to end ----------------------------------------------------


def test_ali_ccp_schema_trains_esmm_from_the_command_line(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run_cli("train", "--schema", str(REPO / "configs" / "ali_ccp.yaml"), "--model", "esmm",
                     "--out", str(out), "--epochs", "2", "--batch-size", "32", "--threads", "2", cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"click", "purchase", "purchase@all"} <= set(metrics["test"])
    assert metrics["test"]["click"]["uauc"] is not None  # 101 is the user column
    # predict: pCTR, pCVR (inside the click space) and pCTCVR = pCTR * pCVR for every row
    scored = tmp_path / "scores.csv"
    sample = REPO / "configs" / "samples" / "ali-ccp" / "ali_ccp_test_sample.csv"
    result = run_cli("predict", "--run", str(out), "--input", str(sample), "--output", str(scored), cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    scores = pl.read_csv(scored)
    assert scores.columns == ["click", "purchase", "purchase@all"] and scores.height == 50
    assert np.allclose(scores["purchase@all"], scores["click"] * scores["purchase"], rtol=1e-5)


def test_ali_ccp_and_aliexpress_schemas_encode_their_samples(ali_ccp: Store, tmp_path: Path, monkeypatch) -> None:
    assert {k: len(v) for k, v in ali_ccp.splits.items()} == {"train": 100, "valid": 50, "test": 50}
    assert len(ali_ccp.layout.sparse) == 23 and len(ali_ccp.layout.dense) == 8
    assert ali_ccp.layout.tasks[1].space == "click" and ali_ccp.split("train").user is not None
    monkeypatch.setenv("MTREC_CACHE", str(tmp_path / "cache"))
    schema = load_schema(REPO / "configs" / "aliexpress.yaml")
    result = train_run(schema, "aitm", None, TrainConfig(epochs=1, batch_size=32, progress=False), model_options=SMALL)
    store = load_store(schema)
    assert len(store.layout.sparse) == 16 and len(store.layout.dense) == 63
    assert "search_id" not in [f.name for f in store.layout.sparse] + store.layout.dense
    assert {"click", "conversion", "conversion@all"} <= set(result.metrics["test"])
