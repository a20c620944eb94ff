"""Funnel models (ESMM, ESM2, ESCM2, AITM) and MetaHeac; the Ali-CCP and AliExpress schemas;
task-space masking for every kind of loss."""

from __future__ import annotations

import json
import math
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
from mtrec.models.aitm import AIT
from mtrec.models.base import ModelOutput
from mtrec.schema import load_schema
from mtrec.train.run import train_run
from mtrec.train.trainer import TrainConfig, Trainer, seed_everything
from tests.conftest import REPO, session_store
from tests.helpers import run_cli, train_steps

FUNNEL = ["esmm", "esm2", "escm2_ips", "escm2_dr", "aitm"]
ALL = FUNNEL + ["metaheac"]
SMALL = {"tower_hidden": [32, 16]}  # keeps the tests fast; the defaults are wider
OPTIONS = {name: dict(SMALL) for name in FUNNEL} | {
    "metaheac": {"tower_hidden": [16], "expert_hidden": [32], "num_experts": 4}
}


def write_funnel(
    folder: Path, rows: int = 3000, seed: int = 0, stages: int = 2, chained: bool = True, certain: float = 0.5
) -> Path:
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
    cols = {
        "user": [f"u{x}" for x in user],
        "item": [f"i{x}" for x in item],
        "price": price,
        "click": click.astype(int),
        "purchase": purchase.astype(int),
    }
    if stages == 3:
        cols["cart"] = cart.astype(int)
    names = list(cols)
    lines = [",".join(names)] + [",".join(str(cols[n][r]) for n in names) for r in range(rows)]
    (folder / "funnel.csv").write_text("\n".join(lines) + "\n")
    tasks = [{"name": "click", "type": "binary", "label": "click"}]
    if stages == 3:
        tasks.append({"name": "cart", "type": "binary", "label": "cart", "space": "click"})
    tasks.append(
        {
            "name": "purchase",
            "type": "binary",
            "label": "purchase",
            "space": "cart" if stages == 3 and chained else "click",
        }
    )
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
    trainer = Trainer(
        model,
        BALANCERS.get("fixed")(model.task_names),
        TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, patience=epochs, progress=False),
    )
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
    assert np.isfinite(scores).all() and scores.shape == (len(store.split("test")), 2)
    if name in FUNNEL:  # the entire-space probabilities (their formulas: the tests below)
        model.eval()
        with torch.no_grad():
            out = model(store.split("test"))
        assert torch.isfinite(model.predict_joint(out)).all()


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
    cycle = replace(
        census_store.layout,
        tasks=[
            replace(census_store.layout.tasks[0], space="never_married"),
            replace(census_store.layout.tasks[1], space="income"),
        ],
    )
    with pytest.raises(MtrecError, match="cycle"):
        build_model("aitm", cycle)
    assert build_model("metaheac", census_store.layout).num_tasks == 2  # not a funnel model: any tasks


# ---- ESMM ----------------------------------------------------------------------------


# six impressions by hand: in-space logits (CTR, CVR), click and purchase labels; row 2 carries a
# purchase label outside the click space (must count as a joint 0), row 5 a clicked row with pCTR ~ 0.018
HAND_LOGITS = torch.tensor([[2.0, 1.0], [-1.0, 0.3], [0.5, -2.0], [-3.0, 2.5], [1.5, -0.5], [-4.0, 4.0]])
HAND_LABELS = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [1.0, 0.0], [1.0, 1.0]])


def _hand_batch(store: Store) -> TensorTable:
    return replace(store.split("train").slice(0, 6), labels=HAND_LABELS.clone(), weight=None)


def _bce(p: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of probabilities ``p`` against (possibly soft) targets, written out."""
    return -(target * torch.log(p) + (1 - target) * torch.log(1 - p))


def _assert_same_losses_and_gradients(
    losses: torch.Tensor, expected: torch.Tensor, leaves: list, ref_leaves: list
) -> None:
    """Values, and the gradients of a mixture of the task losses with respect to every input."""
    torch.testing.assert_close(losses.double(), expected, rtol=1e-5, atol=1e-7)
    mix = torch.tensor([0.7, 1.3])
    grads = torch.autograd.grad((losses * mix).sum(), leaves)
    ref = torch.autograd.grad((expected * mix.double()).sum(), ref_leaves)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g.double().reshape(r.shape), r, rtol=1e-4, atol=1e-7)


def test_esmm_losses_are_the_entire_space_cross_entropies(funnel2: Store) -> None:
    """L = mean BCE(y, pCTR) and mean BCE(y z, pCTR pCVR) over all impressions (Ma et al. 2018, eq. 2),
    written out in float64; also the CTCVR logit, deep in both tails where a naive logit loses digits."""
    model = build_model("esmm", funnel2.layout, SMALL)
    logits = HAND_LOGITS.clone().requires_grad_(True)
    losses = model.losses(ModelOutput(logits=logits), _hand_batch(funnel2))
    ref = HAND_LOGITS.double().requires_grad_(True)
    p_ctr, p_cvr = torch.sigmoid(ref).unbind(1)
    y, z = HAND_LABELS.double().unbind(1)
    expected = torch.stack([_bce(p_ctr, y).mean(), _bce(p_ctr * p_cvr, y * z).mean()])
    _assert_same_losses_and_gradients(losses, expected, [logits], [ref])

    tails = torch.tensor([[9.0, 9.0], [-9.0, -9.0], [12.0, -1.0], [0.0, 0.0]])
    joint = model.predict_joint(ModelOutput(logits=tails, joint_logits=model.joint_logits_of(tails)))[:, 1]
    p = torch.sigmoid(tails.double()).prod(1)
    torch.testing.assert_close(joint.double(), p, rtol=1e-5, atol=0)
    log_odds = torch.log(p) - torch.log1p(-p)
    torch.testing.assert_close(model.joint_logits_of(tails)[:, 1].double(), log_odds, rtol=1e-5, atol=1e-5)


# ---- ESCM2 ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["escm2_ips", "escm2_dr"])
def test_escm2_losses_are_ctr_plus_weighted_ctcvr_and_counterfactual_risk(name: str, funnel2: Store) -> None:
    """Wang et al. 2022: L_CTR, and for the CVR task lambda_g L_CTCVR + lambda_c R, with over all
    impressions R_IPS = mean o e / ô and R_DR = mean [ê + o (e - ê) / ô] (plus the imputation tower's
    fit lambda_i mean o (e - ê)^2 / ô), ô = pCTR detached and clipped at propensity_min, ê the CVR
    cross-entropy against the imputed pseudo-label. Written out in float64: values and gradients."""
    cfg = {"counterfactual_weight": 0.7, "ctcvr_weight": 0.3, "imputation_weight": 2.0, "propensity_min": 0.1}
    model = build_model(name, funnel2.layout, SMALL | cfg)
    logits = HAND_LOGITS.clone().requires_grad_(True)
    imputation = torch.tensor([[0.2], [-1.0], [1.5], [0.0], [-2.0], [0.7]], requires_grad=True)
    dr = name == "escm2_dr"
    out = ModelOutput(logits=logits, extras={"imputation": imputation} if dr else {})
    losses = model.losses(out, _hand_batch(funnel2))

    ref = HAND_LOGITS.double().requires_grad_(True)
    ref_imp = imputation.detach().double().squeeze(1).requires_grad_(True)
    p_ctr, p_cvr = torch.sigmoid(ref).unbind(1)
    o, z = HAND_LABELS.double().unbind(1)  # o: clicked (the conversion label is observed)
    propensity = p_ctr.detach().clamp(min=0.1)
    assert propensity[5] == 0.1 and o[5] == 1  # the clip is exercised on a clicked row
    e = _bce(p_cvr, z)
    if not dr:
        cf = (0.7 * o * e / propensity).mean()
    else:
        r = torch.sigmoid(ref_imp)  # the imputation tower's pseudo-label
        e_hat = _bce(p_cvr, r.detach())
        risk = e_hat + o * (e - e_hat) / propensity
        fit = 2.0 * o * (e.detach() - _bce(p_cvr.detach(), r)) ** 2 / propensity
        cf = (0.7 * risk + fit).mean()
    l_ctr, l_ctcvr = _bce(p_ctr, o).mean(), _bce(p_ctr * p_cvr, o * z).mean()
    expected = torch.stack([l_ctr, 0.3 * l_ctcvr + cf])
    leaves, ref_leaves = ([logits, imputation], [ref, ref_imp]) if dr else ([logits], [ref])
    _assert_same_losses_and_gradients(losses, expected, leaves, ref_leaves)


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
            assert metrics["purchase@all"]["auc"] == pytest.approx(roc_auc_score(labels.prod(1), scores.prod(1)))
    # the observed action really drives pCVR: pCVR = pA pD + (1 - pA) pO with pA the cart task's probability
    with torch.no_grad():
        out = observed(sibling.split("test").slice(0, 50))
        heads = observed.towers(observed.embedding(sibling.split("test").slice(0, 50)).squeeze(1))
    p = torch.sigmoid(heads)
    expected = p[:, 1] * p[:, 2] + (1 - p[:, 1]) * p[:, 3]
    assert torch.allclose(torch.sigmoid(out.logits[:, 2]), expected, atol=1e-5)


def test_esm2_chained_losses_are_cross_entropies_of_the_chain_products(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """click -> cart -> purchase: task k's loss is mean BCE(y_1 ... y_k, p_1 ... p_k) over all impressions,
    written out in float64 (labels outside a task's space count as 0 through the product)."""
    chain = session_store(
        write_funnel(tmp_path_factory.mktemp("chain3_loss"), stages=3, chained=True), tmp_path_factory
    )
    assert chain.layout.task_names == ["click", "cart", "purchase"]
    model = build_model("esm2", chain.layout, SMALL)
    hand = torch.tensor(
        [[2.0, 1.0, -0.5], [-1.0, 0.3, 1.2], [0.5, -2.0, 0.1], [-3.0, 2.5, 2.0], [1.5, -0.5, -1.5], [0.2, 3.0, 0.4]]
    )
    labels = torch.tensor(
        [[1.0, 1.0, 1.0], [1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]
    )
    batch = replace(chain.split("train").slice(0, 6), labels=labels, weight=None)
    logits = hand.clone().requires_grad_(True)
    losses = model.losses(ModelOutput(logits=logits), batch)
    ref = hand.double().requires_grad_(True)
    p = torch.sigmoid(ref)
    y = labels.double()
    expected = torch.stack([_bce(p[:, : k + 1].prod(1), y[:, : k + 1].prod(1)).mean() for k in range(3)])
    torch.testing.assert_close(losses.double(), expected, rtol=1e-5, atol=1e-7)
    mix = torch.tensor([0.7, 1.3, 0.4])
    (g,) = torch.autograd.grad((losses * mix).sum(), [logits])
    (r,) = torch.autograd.grad((expected * mix.double()).sum(), [ref])
    torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-7)


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


def test_aitm_attention_weights_on_a_hand_sized_example() -> None:
    """w_u = softmax_u(<h2(u), h3(u)> / sqrt(k)) over u in (transferred p, own q), z = sum_u w_u h1(u),
    with k = 2 and hand-set projections: h2 = I, h3 = diag(1, 2), so the score of u is (u1^2 + 2 u2^2) / sqrt 2."""
    ait = AIT(2)
    with torch.no_grad():
        ait.h2.weight.copy_(torch.eye(2)), ait.h2.bias.zero_()
        ait.h3.weight.copy_(torch.diag(torch.tensor([1.0, 2.0]))), ait.h3.bias.zero_()
        ait.h1.weight.copy_(torch.tensor([[1.0, 2.0], [0.0, 1.0]])), ait.h1.bias.copy_(torch.tensor([0.5, -0.5]))
    p = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    q = torch.tensor([[0.0, 2.0], [3.0, 0.0]])
    z, w = ait(p, q)
    # row 0: scores 1 / sqrt 2 and 8 / sqrt 2; row 1: 0 and 9 / sqrt 2
    w_p = [1 / (1 + math.exp(7 / math.sqrt(2))), 1 / (1 + math.exp(9 / math.sqrt(2)))]
    torch.testing.assert_close(w, torch.tensor([[w_p[0], 1 - w_p[0]], [w_p[1], 1 - w_p[1]]]), rtol=1e-5, atol=1e-7)
    # h1(p0) = (1.5, -0.5), h1(q0) = (4.5, 1.5); h1(p1) = (0.5, -0.5), h1(q1) = (3.5, -0.5)
    expected = torch.tensor(
        [
            [w_p[0] * 1.5 + (1 - w_p[0]) * 4.5, w_p[0] * -0.5 + (1 - w_p[0]) * 1.5],
            [w_p[1] * 0.5 + (1 - w_p[1]) * 3.5, -0.5],
        ]
    )
    torch.testing.assert_close(z, expected, rtol=1e-5, atol=1e-6)


def test_aitm_exposes_the_attention_of_the_purchase_step_over_the_click_transfer(funnel2: Store) -> None:
    model = build_model("aitm", funnel2.layout, SMALL).eval()
    batch = funnel2.split("train").slice(0, 16)
    gates = model(batch, return_gates=True).gates
    assert list(gates) == ["purchase/transfer"]
    with torch.no_grad():  # purchase (task 1) attends over click's transferred z (task 0) and its own tower
        q = model.encoders(model.embedding(batch).squeeze(1))  # [T, B, k]
        _, w = model.ait["1"](model.transfer["1"](q[0]), q[1])
    torch.testing.assert_close(gates["purchase/transfer"], w)
    assert w[:, 0].std() > 0  # the weights vary by row: a real attention, not a constant split


def test_aitm_losses_are_entire_space_cross_entropies_plus_the_calibrator(funnel2: Store) -> None:
    """L_click = mean BCE(y, ŷ_1); L_purchase = mean BCE(y z, ŷ_2) + alpha mean max(ŷ_2 - ŷ_1, 0)."""
    model = build_model("aitm", funnel2.layout, SMALL | {"calibrator_weight": 0.6})
    joint = torch.tensor(
        [[2.0, 1.0], [-1.0, 0.3], [0.5, -2.0], [-3.0, -1.0], [1.5, -0.5], [-4.0, 4.0]], requires_grad=True
    )
    losses = model.losses(ModelOutput(logits=joint.detach(), joint_logits=joint), _hand_batch(funnel2))
    ref = joint.detach().double().requires_grad_(True)
    p1, p2 = torch.sigmoid(ref).unbind(1)
    y, z = HAND_LABELS.double().unbind(1)
    excess = torch.clamp(p2 - p1, min=0)
    assert (excess > 0).sum() == 3  # rows 1, 3 and 5 break the funnel order
    expected = torch.stack([_bce(p1, y).mean(), _bce(p2, y * z).mean() + 0.6 * excess.mean()])
    _assert_same_losses_and_gradients(losses, expected, [joint], [ref])


def test_metaheac_gates_and_meta_step(funnel2: Store) -> None:
    model = build_model("metaheac", funnel2.layout, OPTIONS["metaheac"])
    batch = funnel2.split("train").slice(0, 64)
    # gates softmax(W_x x + W_e e_t + b): with W_x = 0, b = log c and W_e e_t = t log d (hand-picked c, d),
    # task 0's gates are c / sum(c), task 1's c d / sum(c d), for the 4 experts then the 4 critics
    c, d = (
        torch.tensor([1.0, 2.0, 3.0, 4.0, 1.0, 1.0, 2.0, 5.0]),
        torch.tensor([4.0, 1.0, 1.0, 2.0, 3.0, 1.0, 1.0, 1.0]),
    )
    with torch.no_grad():
        model.gate_x.weight.zero_()
        model.gate_x.bias.copy_(c.log())
        model.gate_task.weight.zero_()
        model.gate_task.weight[:, 0] = d.log()
        model.task_embedding.zero_()
        model.task_embedding[1, 0] = 1.0
    out = model(batch, return_gates=True)
    assert set(out.gates) == {"click/experts", "click/critics", "purchase/experts", "purchase/critics"}
    for task, scale in (("click", torch.ones(8)), ("purchase", d)):
        for part, idx in (("experts", slice(0, 4)), ("critics", slice(4, 8))):
            w = (c * scale)[idx] / (c * scale)[idx].sum()
            torch.testing.assert_close(out.gates[f"{task}/{part}"], w.expand(64, -1), rtol=1e-5, atol=1e-7)
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
    result = run_cli(
        "train",
        "--schema",
        str(REPO / "configs" / "ali_ccp.yaml"),
        "--model",
        "esmm",
        "--out",
        str(out),
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--threads",
        "2",
        cache=tmp_path / "cache",
    )
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"click", "purchase", "purchase@all"} <= set(metrics["test"])
    assert metrics["test"]["click"]["uauc"] is not None  # 101 is the user column
    # predict: pCTR, pCVR (inside the click space) and pCTCVR = pCTR * pCVR for every row
    scored = tmp_path / "scores.csv"
    sample = REPO / "configs" / "samples" / "ali-ccp" / "ali_ccp_test_sample.csv"
    result = run_cli(
        "predict", "--run", str(out), "--input", str(sample), "--output", str(scored), cache=tmp_path / "cache"
    )
    assert result.returncode == 0, result.stderr
    scores = pl.read_csv(scored)
    assert scores.columns == ["click", "purchase", "purchase@all"] and scores.height == 50
    # a row scores the same alone in another file, in another order: rows stay aligned with their scores
    picked = tmp_path / "picked.csv"
    pick = [49, 3, 17, 0]
    pl.read_csv(sample)[pick].write_csv(picked)
    result = run_cli(
        "predict",
        "--run",
        str(out),
        "--input",
        str(picked),
        "--output",
        str(tmp_path / "picked_scores.csv"),
        cache=tmp_path / "cache",
    )
    assert result.returncode == 0, result.stderr
    again = pl.read_csv(tmp_path / "picked_scores.csv")
    np.testing.assert_allclose(again.to_numpy(), scores[pick].to_numpy(), rtol=1e-5, atol=1e-9)
    assert scores["purchase"].n_unique() > 10  # and the rows are told apart


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
