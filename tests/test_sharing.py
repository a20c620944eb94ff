"""Every model's static sharing declaration against the truth: which tasks' losses reach which
parameter elements, found by running each task's loss backward on its own (per-task autograd)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from mtrec.balancing import BALANCERS
from mtrec.balancing.base import StepContext
from mtrec.data.tables import TaskField
from mtrec.errors import MtrecError
from mtrec.models import MODELS, build_model
from mtrec.models.funnel import FunnelModel
from mtrec.train.trainer import seed_everything

# Variants beyond the defaults whose structure changes who reaches what.
VARIANTS = [(name, {}) for name in MODELS.names()] + [
    ("mmoe", {"bottom": "dcn_v2"}),
    ("ple", {"bottom": "deepfm", "num_levels": 3, "specific_experts": [1, 2, 1]}),
    ("ple", {"shared_experts": 0}),
    ("cgc", {"bottom": "dcn_v2", "cross_structure": "parallel"}),
    ("single_task", {"bottom": "deepfm"}),
    ("shared_bottom", {"bottom": "dcn_v2"}),
    ("adatt", {"num_levels": 1}),
    ("adatt", {"num_levels": 3, "shared_experts": 0, "specific_experts": 1}),
    ("ml_mmoe", {"num_levels": 3, "num_experts": 3}),
    ("metaheac", {"first_order": True}),
    ("metaheac", {"meta": False}),
    ("escm2_dr", {"ctcvr_weight": 0.0}),
    ("aitm", {"calibrator_weight": 0.0}),
    ("esm2", {"_funnel": "star"}),  # never_married and extra both observed on income: decomposed, latent action
    ("esm2", {"_funnel": "star", "action_task": "extra"}),  # extra is the observed action
    ("escm2_dr", {"_funnel": "star"}),
    ("asymmetric_sharing", {"reads": {"extra": "income"}}),  # never_married reads nobody
]


def three_task_layout(name: str, layout, shape: str = "chain"):
    """Census's two tasks plus a third binary one. Funnel models get the chain income -> never_married ->
    extra, or with ``shape="star"`` both never_married and extra observed on income."""
    funnel = issubclass(MODELS.get(name), FunnelModel)
    a, b = layout.tasks
    third = (b.name if shape == "chain" else a.name) if funnel else None
    tasks = [a, replace(b, space=a.name if funnel else None), TaskField("extra", "binary", space=third)]
    return replace(layout, tasks=tasks)


def batches(store, count: int = 6, size: int = 256):
    """Training batches with a third label column (a noisy copy of income, so every task has both classes)."""
    table = store.split("train")
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(count):
        batch = table.slice(i * size, (i + 1) * size)
        flip = torch.rand(len(batch), generator=gen) < 0.3
        extra = torch.where(flip, 1 - batch.labels[:, 0], batch.labels[:, 0])
        out.append(replace(batch, labels=torch.cat([batch.labels, extra[:, None]], dim=1)))
    return out


def reached_members(model, data) -> dict[str, torch.Tensor]:
    """Per parameter, ``[T, members]`` bool: some element of the member got a non-zero gradient from task t."""
    named = list(model.named_parameters())
    params = [p for _, p in named]
    out = {n: torch.zeros(model.num_tasks, len(model.sharing.of(p).owners), dtype=torch.bool) for n, p in named}
    model.train()
    for batch in data:
        losses = model.losses(model(batch), batch)
        for t in range(model.num_tasks):
            grads = torch.autograd.grad(losses[t], params, retain_graph=True, allow_unused=True)
            for (n, p), g in zip(named, grads):
                if g is None:
                    continue
                reach = model.sharing.of(p)
                ids = reach.member.expand(p.shape).reshape(-1)[(g != 0).reshape(-1)]
                out[n][t, ids.unique()] = True
    return out


@pytest.mark.parametrize(
    "name, options", VARIANTS, ids=[f"{n}{'-' + '-'.join(map(str, o)) if o else ''}" for n, o in VARIANTS]
)
def test_declared_sharing_is_what_per_task_autograd_finds(name: str, options: dict, census_store, one_thread) -> None:
    seed_everything(0)
    options = dict(options)
    shape = options.pop("_funnel", "chain")
    model = build_model(name, three_task_layout(name, census_store.layout, shape), options)
    if name == "aitm":
        # AITM's calibrator max(ŷ_child - ŷ_parent, 0) is silent wherever a child's head starts below its
        # parent's; raise each child's output bias so the relu is open on some samples
        with torch.no_grad():
            for t in model.funnel.linked:
                model.heads.out.bias[t] = model.heads.out.bias[model.funnel.parent[t]] + 3.0
    found = reached_members(model, batches(census_store))
    wrong = []
    for n, p in model.named_parameters():
        reach = model.sharing.of(p)
        for m, owners in enumerate(reach.owners):
            truth = set(torch.nonzero(found[n][:, m]).flatten().tolist())
            if truth != set(owners):
                wrong.append(f"{n}[member {m}]: declared {sorted(owners)}, reached by {sorted(truth)}")
    assert not wrong, "\n".join(wrong)


def test_ple_inner_task_experts_are_shared_and_the_last_levels_are_not(census_store) -> None:
    """The issue's rule, spelled out: PLE's inner-level task experts feed the inner shared gate (so every
    task), the last level's task experts only their own task; task gates are their task's."""
    model = build_model("ple", census_store.layout, {"num_levels": 2, "specific_experts": 2, "shared_experts": 2})
    inner, last = model.levels
    assert [set(o) for o in model.sharing.of(inner.experts.layers[0].weight).owners] == [{0, 1}] * 6
    assert [set(o) for o in model.sharing.of(last.experts.layers[0].weight).owners] == [
        {0},
        {0},
        {1},
        {1},
        {0, 1},
        {0, 1},
    ]
    assert [set(o) for o in model.sharing.of(last.gates.weight).owners] == [{0}, {1}]
    # an inner task gate feeds the next level's task experts and gate only: its task's; the shared gate every task
    assert [set(o) for o in model.sharing.of(inner.gates.weight).owners] == [{0}, {1}, {0, 1}]


def _expert_gradient_scale(balancer: str, census_store) -> tuple[dict, float, float]:
    """One PLE step under ``balancer``: (task weights, ratio of income's own last-level experts' gradient
    to income's own gradient there, the same for never_married)."""
    seed_everything(0)
    model = build_model("ple", census_store.layout)
    batch = census_store.split("train").slice(0, 512)
    bal = BALANCERS.get(balancer)(model.task_names)
    losses = model.losses(model(batch), batch)
    own = [
        torch.autograd.grad(losses[t], model.levels[-1].experts.layers[-1].weight, retain_graph=True)[0]
        for t in range(2)
    ]
    model.zero_grad()
    bal.backward(losses, StepContext(step=0, epoch=0, model=model))
    grad = model.levels[-1].experts.layers[-1].weight.grad  # [E, H1, H]; experts 0,1 income's, 2,3 never_married's
    ratio = [float(grad[2 * t : 2 * t + 2].norm() / own[t][2 * t : 2 * t + 2].norm()) for t in range(2)]
    return bal.weights(), ratio[0], ratio[1]


def test_mgda_on_ple_leaves_task_specific_experts_their_own_gradient(census_store) -> None:
    """Before the fix MGDA's weights (income 0.05, never_married 0.95) scaled income's own experts too."""
    weights, income, married = _expert_gradient_scale("mgda", census_store)
    assert abs(income - 1.0) < 1e-4 and abs(married - 1.0) < 1e-4, (weights, income, married)


def test_gradnorm_refuses_a_model_that_shares_only_embeddings(census_store) -> None:
    model = build_model("soft_sharing", census_store.layout)
    batch = census_store.split("train").slice(0, 64)
    bal = BALANCERS.get("gradnorm")(model.task_names)
    with pytest.raises(MtrecError, match="shared_bottom"):
        bal.backward(model.losses(model(batch), batch), StepContext(step=0, epoch=0, model=model))


@pytest.mark.parametrize("name", ["esmm", "ple", "cgc"])
def test_gradnorm_measures_norms_on_the_declared_shared_members(name: str, census_store) -> None:
    """GradNorm's norm of task t is taken over the declared last shared layer's shared elements: compare
    it with a norm computed here from autograd over exactly those elements."""
    from tests.test_models_core import layout_for

    seed_everything(0)
    model = build_model(name, layout_for(name, census_store.layout))
    batch = census_store.split("train").slice(0, 512)
    slices = model.last_shared_slices()
    assert slices, "these models declare a shared layer"
    bal = BALANCERS.get("gradnorm")(model.task_names)
    losses = model.losses(model(batch), batch)
    expected = []
    for t in range(2):
        grads = torch.autograd.grad(losses[t], [s.param for s in slices], retain_graph=True)
        expected.append(
            float(torch.sqrt(sum(((g[s.mask] if s.mask is not None else g) ** 2).sum() for g, s in zip(grads, slices))))
        )
    bal.backward(losses, StepContext(step=0, epoch=0, model=model))
    stats = bal.stats()
    for t, task in enumerate(model.task_names):
        assert stats[f"grad_norm/{task}"] == pytest.approx(expected[t] * stats[f"weight/{task}"], rel=1e-5)
