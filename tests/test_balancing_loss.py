"""Loss-level balancers against their definitions.

Learned methods (uncertainty weighting, GradNorm, FAMO) are trained on small synthetic
problems whose answer is known (noise levels, loss scales); scheduled ones (DWA, DTP, RLW,
PLE's schedule, staged) are fed hand-chosen losses and compared with their formula computed
by hand. Per-sample weights are checked on real Census data with its survey weight column.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from mtrec.balancing import BALANCERS, StepContext
from mtrec.data.store import load_store
from mtrec.errors import MtrecError
from mtrec.models import build_model
from mtrec.models.reach import SharedSlice
from mtrec.schema import load_schema
from mtrec.train.trainer import TrainConfig, Trainer, seed_everything
from tests.helpers import write_toy

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one thread is as fast

SMALL_MMOE = {"num_experts": 4, "expert_hidden": [32, 16], "tower_hidden": [16]}


class TwoHeads(nn.Module):
    """A shared layer and one linear head per task: the smallest real multi-task network."""

    def __init__(self, d: int = 6, h: int = 32, tasks: int = 2) -> None:
        super().__init__()
        self.trunk = nn.Linear(d, h)
        self.heads = nn.Linear(h, tasks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads(torch.tanh(self.trunk(x)))  # [N, T]

    def shared_slices(self) -> list[SharedSlice]:
        return [SharedSlice(p) for p in self.trunk.parameters()]

    def last_shared_slices(self) -> list[SharedSlice]:
        return self.shared_slices()


def _regression_data(n: int, scales: tuple[float, float], noise: tuple[float, float], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    signal = torch.stack([torch.tanh(x[:, 0] + 0.5 * x[:, 1]), torch.tanh(x[:, 2] - x[:, 0])], 1)  # [N, 2]
    y = (signal + torch.randn(n, 2, generator=g) * torch.tensor(noise)) * torch.tensor(scales)
    return x, y


def _train(balancer, net: TwoHeads, x, y, steps: int, lr: float, batch: int = 256, record=None):
    opt = torch.optim.Adam(list(net.parameters()) + list(balancer.parameters()), lr=lr)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        losses = ((net(x[idx]) - y[idx]) ** 2).mean(0)  # [T]
        opt.zero_grad(set_to_none=True)
        balancer.backward(losses, StepContext(step, 1, net))
        opt.step()
        if record is not None:
            record(step, balancer)
    return net


# ---- per-sample weights (fixed) ---------------------------------------------------------------


def test_sample_weight_column_weights_the_losses_and_changes_training(census_schema_path: Path, tmp_path: Path) -> None:
    data = yaml.safe_load(census_schema_path.read_text())
    data["source"] = {k: str(census_schema_path.parent / v) for k, v in data["source"].items()}
    data["sample_weight"] = "instance_weight"  # the survey's sampling weight
    path = tmp_path / "weighted.yaml"
    path.write_text(yaml.safe_dump(data))
    weighted = load_store(load_schema(path))
    plain = load_store(load_schema(census_schema_path))
    train_w, train_p = weighted.split("train"), plain.split("train")
    assert train_w.weight is not None and train_p.weight is None
    assert float(train_w.weight.std()) > 0

    seed_everything(0)
    model = build_model("mmoe", weighted.layout)
    batch = train_w.slice(0, 512)
    per = nn.functional.binary_cross_entropy_with_logits(model(batch).logits, batch.labels, reduction="none")
    assert torch.equal(batch.weight[:, 0], batch.weight[:, 1])  # the schema's column weighs every task alike
    expected = (per * batch.weight).sum(0) / batch.weight.sum(0)
    torch.testing.assert_close(model.losses(model(batch), batch), expected)

    params = []
    for store in (weighted, plain):
        seed_everything(0)
        model = build_model("mmoe", store.layout, SMALL_MMOE)
        trainer = Trainer(
            model,
            BALANCERS.get("fixed")(store.layout.task_names),
            TrainConfig(epochs=1, batch_size=256, progress=False),
        )
        trainer.fit(store.split("train").slice(0, 1024), store.split("valid"))
        params.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert not torch.allclose(params[0], params[1])  # same seed, same rows: only the weights differ


def test_task_sample_weight_on_positives_is_weighted_logistic_regression(tmp_path: Path) -> None:
    """YouTube's weighted logistic regression: a click weighs its watch time, a non-click weighs 1,
    and only the click task is weighted."""
    path = write_toy(tmp_path, rows=400)
    data = yaml.safe_load(path.read_text())
    data["tasks"][0].update(sample_weight="watch", sample_weight_on="positives")
    path.write_text(yaml.safe_dump(data))
    store = load_store(load_schema(path))
    train = store.split("train")
    click, watch = train.labels[:, 0], train.labels[:, 1]  # the regression label is the watch column itself
    assert click.min() == 0 and click.max() == 1
    torch.testing.assert_close(train.weight[:, 0], torch.where(click > 0.5, watch, torch.ones_like(watch)))
    assert torch.equal(train.weight[:, 1], torch.ones_like(watch))
    seed_everything(0)
    model = build_model("shared_bottom", store.layout)
    out = model(train)
    bce = nn.functional.binary_cross_entropy_with_logits(out.logits[:, 0], click, reduction="none")
    expected = (bce * train.weight[:, 0]).sum() / train.weight[:, 0].sum()
    torch.testing.assert_close(model.losses(out, train)[0], expected)

    data["tasks"][1].update(sample_weight="age", sample_weight_on="positives")  # a regression task has no positives
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(MtrecError, match="tasks.*sample_weight_on: positives needs a binary task"):
        load_schema(path)


# ---- uncertainty weighting ---------------------------------------------------------------------


def test_uw_learns_the_noise_variance_of_each_regression_task() -> None:
    torch.manual_seed(0)
    noise = (0.3, 1.5)  # true variances 0.09 and 2.25
    x, y = _regression_data(4000, (1.0, 1.0), noise)
    uw = BALANCERS.get("uw")(["quiet", "noisy"], form="regression")
    _train(uw, TwoHeads(), x, y, steps=300, lr=0.02)
    var = uw.variances()
    assert var["quiet"] < var["noisy"]
    assert var["quiet"] == pytest.approx(noise[0] ** 2, rel=0.25)
    assert var["noisy"] == pytest.approx(noise[1] ** 2, rel=0.25)
    # the regression form's objective, written out: sum_t L_t / (2 sigma_t^2) + log sigma_t
    losses = torch.tensor([0.3, 2.0])
    total = float(uw.combine(losses, StepContext(0, 1, nn.Linear(1, 1))).detach())
    sigma2 = [var["quiet"], var["noisy"]]
    expected = sum(li / (2 * s2) + 0.5 * math.log(s2) for li, s2 in zip([0.3, 2.0], sigma2))
    assert total == pytest.approx(expected, rel=1e-5)


def test_uw_uses_the_classification_form_for_binary_tasks(census_store) -> None:
    model = build_model("mmoe", census_store.layout)
    uw = BALANCERS.get("uw")(census_store.layout.task_names)
    with torch.no_grad():
        uw.log_var.copy_(torch.tensor([0.5, -0.3]))
    losses = torch.tensor([0.4, 0.7])
    total = uw.combine(losses, StepContext(0, 1, model)).detach()
    s = [0.5, -0.3]
    expected = sum(math.exp(-si) * li + 0.5 * si for si, li in zip(s, [0.4, 0.7]))  # L / sigma^2 + log sigma
    assert float(total) == pytest.approx(expected, rel=1e-6)


def test_balancer_parameters_get_no_weight_decay(census_store) -> None:
    """UW's log-variances are their own optimiser group without the model's weight decay: one Adam step
    from a known gradient moves them as Adam without decay does (written out), while the model's
    group keeps the decay."""
    model = build_model("mmoe", census_store.layout, SMALL_MMOE)
    uw = BALANCERS.get("uw")(census_store.layout.task_names)
    lr, decay = 0.1, 0.5
    trainer = Trainer(model, uw, TrainConfig(lr=lr, weight_decay=decay, progress=False))
    model_group, balancer_group = trainer.optimizer.param_groups
    assert [id(p) for p in balancer_group["params"]] == [id(uw.log_var)]
    assert balancer_group["weight_decay"] == 0.0 and model_group["weight_decay"] == decay
    assert {id(p) for p in model_group["params"]} == {id(p) for p in model.parameters()}
    start = torch.tensor([1.0, -1.0])
    grad = torch.tensor([0.01, 0.01])  # small beside decay * value: with decay the second would move up
    with torch.no_grad():
        uw.log_var.copy_(start)
    trainer.optimizer.zero_grad(set_to_none=True)
    uw.log_var.grad = grad.clone()
    trainer.optimizer.step()
    eps = model_group["eps"]
    # Adam's first step: m_hat = g, v_hat = g^2, so p - lr * g / (|g| + eps), with g the raw gradient
    expected = start - lr * grad / (grad.abs() + eps)
    with_decay = start - lr * (grad + decay * start) / ((grad + decay * start).abs() + eps)
    assert torch.allclose(uw.log_var.detach(), expected, atol=1e-6)
    assert not torch.allclose(uw.log_var.detach(), with_decay, atol=1e-3)


def test_a_balancer_without_parameters_leaves_one_group(census_store) -> None:
    model = build_model("mmoe", census_store.layout, SMALL_MMOE)
    trainer = Trainer(model, BALANCERS.get("fixed")(census_store.layout.task_names), TrainConfig(weight_decay=0.1))
    (group,) = trainer.optimizer.param_groups
    assert group["weight_decay"] == 0.1 and len(group["params"]) == len(list(model.parameters()))


# ---- GradNorm ----------------------------------------------------------------------------------


def test_gradnorm_brings_gradient_norms_to_their_targets() -> None:
    torch.manual_seed(0)
    x, y = _regression_data(4000, (1.0, 10.0), (0.1, 0.1))  # the second loss is 100x the first
    gn = BALANCERS.get("gradnorm")(["small", "large"], alpha=1.5)
    tail: list[tuple[torch.Tensor, torch.Tensor]] = []

    def record(step: int, bal) -> None:
        if step >= 350:
            s = bal.stats()
            tail.append(
                (
                    torch.tensor([s["grad_norm/small"], s["grad_norm/large"]]),
                    torch.tensor([s["target/small"], s["target/large"]]),
                )
            )

    _train(gn, TwoHeads(), x, y, steps=400, lr=0.01, record=record)
    norms = torch.stack([t[0] for t in tail]).mean(0)
    targets = torch.stack([t[1] for t in tail]).mean(0)
    assert torch.all((norms - targets).abs() <= 0.2 * targets), (norms, targets)
    w = gn.weights()
    assert w["small"] > 5 * w["large"]  # the 100x loss had to be turned down


def test_gradnorm_step_follows_its_formula() -> None:
    """Two steps on a fixed network: the logged norms ``G_t = w_t ||grad_W L_t||`` (autograd here), the
    targets ``mean(G) r_t^alpha`` with ``r_t`` the loss ratio to step 0 over its mean, and the weights'
    gradient ``sign(G_t - target_t) ||grad_W L_t||``, all written out."""
    torch.manual_seed(0)
    net = TwoHeads()
    x, y = _regression_data(128, (1.0, 3.0), (0.1, 0.1))
    gn = BALANCERS.get("gradnorm")(["a", "b"], alpha=1.5, task_weights=[1.5, 0.5])
    trunk = list(net.trunk.parameters())
    first = None
    for step, scale in enumerate((torch.tensor([1.0, 1.0]), torch.tensor([0.5, 0.9]))):
        losses = ((net(x) - y) ** 2).mean(0) * scale  # the second step: task a fell faster
        norms = torch.stack(
            [
                torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[t], trunk, retain_graph=True)]).norm()
                for t in range(2)
            ]
        )
        first = losses.detach() if first is None else first
        w = torch.tensor([1.5, 0.5])  # the weights sum to T = 2 already; GradNorm's own step is not taken here
        G = w * norms
        r = (losses.detach() / first) / (losses.detach() / first).mean()
        target = G.mean() * r**1.5
        gn.zero_grad()
        gn.backward(losses, StepContext(step, 1, net))
        s = gn.stats()
        assert [s["grad_norm/a"], s["grad_norm/b"]] == pytest.approx(G.tolist(), rel=1e-5)
        assert [s["target/a"], s["target/b"]] == pytest.approx(target.tolist(), rel=1e-5)
        torch.testing.assert_close(gn.w.grad.float(), torch.sign(G - target) * norms, rtol=1e-5, atol=1e-7)
    assert r[0] < 1 < r[1]  # the second step really exercised the ratio


# ---- schedules compared with their formula ----------------------------------------------------


def test_dwa_weights_follow_the_loss_ratio_formula() -> None:
    dwa = BALANCERS.get("dwa")(["a", "b", "c"], temperature=2.0)
    ctx = StepContext(0, 1, nn.Linear(1, 1))
    losses = torch.tensor([1.0, 1.0, 1.0])
    assert float(dwa.combine(losses, ctx)) == pytest.approx(3.0)  # epochs 1 and 2: weights 1
    dwa.on_epoch_end(1, torch.tensor([1.0, 2.0, 0.5]))
    assert list(dwa.weights().values()) == [1.0, 1.0, 1.0]
    dwa.on_epoch_end(2, torch.tensor([0.5, 1.8, 0.5]))
    r = [0.5 / 1.0, 1.8 / 2.0, 0.5 / 0.5]
    e = [math.exp(ri / 2.0) for ri in r]
    expected = [3 * ei / sum(e) for ei in e]
    assert list(dwa.weights().values()) == pytest.approx(expected, rel=1e-6)
    assert float(dwa.combine(torch.tensor([1.0, 2.0, 3.0]), ctx)) == pytest.approx(
        expected[0] + 2 * expected[1] + 3 * expected[2], rel=1e-6
    )


def test_dtp_weights_follow_the_focal_formula_on_a_running_kpi() -> None:
    dtp = BALANCERS.get("dtp")(["a", "b"], gamma=[2.0, 1.0], alpha=0.25)
    ctx = StepContext(0, 1, nn.Linear(1, 1))
    steps = [(0.7, 0.2), (0.5, 0.3), (0.2, 0.4)]
    kpi = None
    for la, lb in steps:
        dtp.combine(torch.tensor([la, lb]), ctx)
        k = [math.exp(-la), math.exp(-lb)]
        kpi = k if kpi is None else [0.25 * ki + 0.75 * kb for ki, kb in zip(k, kpi)]
    expected = [-((1 - kpi[0]) ** 2.0) * math.log(kpi[0]), -((1 - kpi[1]) ** 1.0) * math.log(kpi[1])]
    assert list(dtp.weights().values()) == pytest.approx(expected, rel=1e-5)
    assert dtp.stats()["kpi/a"] == pytest.approx(kpi[0], rel=1e-6)


def test_rlw_weights_are_a_softmax_of_normal_draws() -> None:
    rlw = BALANCERS.get("rlw")(["a", "b", "c"], seed=7)
    ctx = StepContext(0, 1, nn.Linear(1, 1))
    g = torch.Generator().manual_seed(7)
    seen = []
    for _ in range(3):
        rlw.combine(torch.ones(3), ctx)
        z = torch.randn(3, generator=g).tolist()
        e = [math.exp(v) for v in z]
        expected = [v / sum(e) for v in e]
        w = list(rlw.weights().values())
        assert w == pytest.approx(expected, rel=1e-6)
        seen.append(tuple(w))
    assert len(set(seen)) == 3  # fresh weights every step


def test_ple_schedule_is_initial_weight_times_ratio_to_the_step() -> None:
    ple = BALANCERS.get("ple_schedule")(["a", "b"], initial=[1.0, 0.5], ratio=[1.0, 0.9])
    for step in (0, 3, 10):
        total = ple.combine(torch.tensor([2.0, 4.0]), StepContext(step, 1, nn.Linear(1, 1)))
        assert list(ple.weights().values()) == pytest.approx([1.0, 0.5 * 0.9**step], rel=1e-9)
        assert float(total) == pytest.approx(2.0 + 4.0 * 0.5 * 0.9**step, rel=1e-6)
    per_epoch = BALANCERS.get("ple_schedule")(["a", "b"], ratio=0.5, per="epoch", task_weights=[2.0, 1.0])
    per_epoch.combine(torch.ones(2), StepContext(99, 3, nn.Linear(1, 1)))
    assert list(per_epoch.weights().values()) == pytest.approx([2.0 * 0.25, 0.25])


# ---- FAMO ---------------------------------------------------------------------------------------


def test_famo_update_ignores_loss_scales_and_favours_the_lagging_task() -> None:
    torch.manual_seed(0)
    net = TwoHeads()
    x, y = _regression_data(256, (1.0, 1.0), (0.1, 0.1))
    losses = ((net(x) - y) ** 2).mean(0)
    directions = []
    for scale in (1.0, 100.0):
        famo = BALANCERS.get("famo")(["a", "b"])
        scaled = losses * torch.tensor([scale, 1.0])
        total = famo.combine(scaled, StepContext(0, 1, net))
        grads = torch.autograd.grad(total, list(net.parameters()), retain_graph=True)
        directions.append(torch.cat([g.reshape(-1) for g in grads]))
        # first step, z uniform: the task gradients weighted by (1 / L_t) / sum_s (1 / L_s), written out
        inv = 1.0 / scaled.detach()
        w = inv / inv.sum()
        assert list(famo.weights().values()) == pytest.approx(w.tolist(), rel=1e-5)
        per_task = [
            torch.cat(
                [g.reshape(-1) for g in torch.autograd.grad(scaled[t], list(net.parameters()), retain_graph=True)]
            )
            for t in range(2)
        ]
        torch.testing.assert_close(directions[-1], w[0] * per_task[0] + w[1] * per_task[1], rtol=1e-4, atol=1e-7)
    # descending log-losses: multiplying a loss by 100 does not turn the update
    cos = torch.nn.functional.cosine_similarity(directions[0], directions[1], dim=0)
    assert float(cos) == pytest.approx(1.0, abs=1e-5)

    famo = BALANCERS.get("famo")(["fast", "slow"])
    ctx = StepContext(0, 1, net)
    for k in range(20):  # "fast" halves its loss at every step, "slow" barely moves
        famo.combine(torch.tensor([0.5**k, 1.0 - 0.001 * k]), ctx)
    z = famo.stats()
    assert z["z/slow"] > z["z/fast"] + 0.1


# ---- staged -------------------------------------------------------------------------------------


def test_staged_introduces_tasks_by_epoch_and_keeps_earlier_ones() -> None:
    names = ["a", "b", "c"]
    staged = BALANCERS.get("staged")(names, stages="b;a+c", stage_epochs=2)
    expected = {1: [0, 1, 0], 2: [0, 1, 0], 3: [1, 1, 1], 7: [1, 1, 1]}
    for epoch, mask in expected.items():
        total = staged.combine(torch.tensor([1.0, 2.0, 4.0]), StepContext(0, epoch, nn.Linear(1, 1)))
        assert list(staged.weights().values()) == mask
        assert float(total) == pytest.approx(sum(m * v for m, v in zip(mask, [1.0, 2.0, 4.0])))
    default = BALANCERS.get("staged")(names, stage_epochs=[1, 3])  # one task per stage
    masks = {
        e: (default.combine(torch.ones(3), StepContext(0, e, nn.Linear(1, 1))), list(default.weights().values()))[1]
        for e in (1, 2, 4, 5)
    }
    assert masks == {1: [1, 0, 0], 2: [1, 1, 0], 4: [1, 1, 0], 5: [1, 1, 1]}
    with pytest.raises(MtrecError, match="'z' is not a task"):
        BALANCERS.get("staged")(names, stages="a;z")
    with pytest.raises(MtrecError, match="c in no stage"):
        BALANCERS.get("staged")(names, stages="a;b")


def test_loss_balancers_reject_bad_options() -> None:
    with pytest.raises(MtrecError, match="no option temp"):
        BALANCERS.get("dwa")(["a", "b"], temp=2)
    with pytest.raises(MtrecError, match="ratio gives 3 value"):
        BALANCERS.get("ple_schedule")(["a", "b"], ratio=[1, 1, 1])
    with pytest.raises(MtrecError, match="not a number"):
        BALANCERS.get("gradnorm")(["a", "b"], alpha="high")
