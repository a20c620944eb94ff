"""Batched layers equal the same computation member by member, the folded first layer equals the plain
one, and training is bit-reproducible for a fixed seed."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from mtrec.balancing.fixed import Fixed
from mtrec.models import build_model
from mtrec.nn.batched import BatchedLinear, BatchedMLP
from mtrec.nn.embedding import Embedded, FeatureEmbedding
from mtrec.nn.mixture import MixtureLayer
from mtrec.train.trainer import TrainConfig, Trainer, seed_everything

B, IN = 32, 12


def member_mlp(mlp: BatchedMLP, i: int) -> list[nn.Linear]:
    """Member ``i`` of a batched MLP as plain ``nn.Linear`` layers."""
    return [layer.member(i) for layer in mlp.layers]


def run_plain(layers: list[nn.Linear], x: torch.Tensor) -> torch.Tensor:
    for layer in layers:
        x = torch.relu(layer(x))
    return x


@pytest.mark.parametrize("shared_input", [True, False])
def test_batched_mlp_equals_member_by_member(shared_input: bool) -> None:
    torch.manual_seed(0)
    mlp = BatchedMLP(5, IN, [16, 8])
    x = torch.randn(B, IN) if shared_input else torch.randn(5, B, IN)
    out = mlp(x)  # [5, B, 8]
    assert out.shape == (5, B, 8)
    for i in range(5):
        expected = run_plain(member_mlp(mlp, i), x if shared_input else x[i])
        torch.testing.assert_close(out[i], expected, rtol=1e-5, atol=1e-6)


def test_batched_linear_members_are_independent() -> None:
    torch.manual_seed(0)
    lin = BatchedLinear(3, IN, 4)
    x = torch.randn(3, B, IN, requires_grad=True)
    lin(x)[1].sum().backward()  # only member 1's output
    assert lin.weight.grad[1].abs().sum() > 0
    assert lin.weight.grad[0].abs().sum() == 0 and lin.weight.grad[2].abs().sum() == 0
    assert x.grad[0].abs().sum() == 0 and x.grad[1].abs().sum() > 0


def expected_mixture(layer: MixtureLayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mixture computed expert by expert and gate by gate with plain layers."""
    groups = layer.expert_group.tolist()
    gate_groups = layer.gate_group.tolist()
    shared = x.dim() == 2
    experts = [run_plain(member_mlp(layer.experts, e), x if shared else x[groups[e]]) for e in range(layer.num_experts)]
    mixed, weights = [], []
    for g in range(layer.num_gates):
        gate_in = x if shared else x[gate_groups[g]]
        logits = layer.gates.member(g)(gate_in)  # [B, E]
        allowed = layer.allowed[g]
        w = torch.zeros_like(logits)
        w[:, allowed] = torch.softmax(logits[:, allowed], dim=-1)  # a gate mixes only the experts it may see
        weights.append(w)
        mixed.append(sum(w[:, e : e + 1] * experts[e] for e in range(layer.num_experts)))
    return torch.stack(mixed), torch.stack(weights)


@pytest.mark.parametrize(
    "specific, shared, task_gates, shared_gate, per_group_input",
    [
        ([0, 0], 4, True, False, False),  # MMoE: every gate sees all shared experts
        ([0, 0], 3, False, True, False),  # OMoE: one gate
        ([2, 1], 2, True, False, False),  # CGC: masked task gates
        ([2, 1], 2, True, True, True),  # inner PLE level: one input per group, plus a shared gate
    ],
)
def test_mixture_layer_equals_expert_by_expert(specific, shared, task_gates, shared_gate, per_group_input) -> None:
    torch.manual_seed(0)
    layer = MixtureLayer(IN, [16, 8], specific, shared, task_gates, shared_gate)
    x = torch.randn(len(specific) + 1, B, IN) if per_group_input else torch.randn(B, IN)
    mixed, weights = layer(x)
    want_mixed, want_weights = expected_mixture(layer, x)
    torch.testing.assert_close(weights, want_weights, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed, want_mixed, rtol=1e-5, atol=1e-6)
    if layer.masked:  # a masked gate gives exactly zero weight to experts it may not see
        assert (weights.masked_select(~layer.allowed.unsqueeze(1).expand_as(weights)) == 0).all()


# ---- the first layer folded into the embedding tables -----------------------------------------


def grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in module.named_parameters() if p.grad is not None}


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    """Equal up to float32 rounding of differently ordered sums: error within ``tol`` of the tensor's scale."""
    assert actual.shape == expected.shape
    scale = expected.abs().max().clamp_min(1e-12)
    assert (actual - expected).abs().max() <= tol * scale, float((actual - expected).abs().max() / scale)


@pytest.mark.parametrize("rows", [512, 40])  # every field folded; only the small-vocabulary fields folded
def test_folded_linear_equals_plain_product(rows: int, census_store) -> None:
    torch.manual_seed(0)
    emb = FeatureEmbedding(census_store.layout)
    batch = census_store.split("train").slice(0, rows)
    plan = emb._plan(rows, torch.device("cpu"))
    assert plan is not None  # something is folded at both sizes
    vocab = [f.vocab_size for f in census_store.layout.sparse]
    assert len(plan.sparse_cols) == sum(v <= rows / 2 for v in vocab)
    weight = torch.randn(emb.output_dim, 24, requires_grad=True)
    bias = torch.randn(24, requires_grad=True)
    upstream = torch.randn(rows, 24)
    results = []
    for folded in (False, True):
        emb.zero_grad(set_to_none=True)
        weight.grad = bias.grad = None
        x = emb(batch).squeeze(1)
        y = emb.linear(batch, x, weight, bias) if folded else torch.addmm(bias, x, weight)
        (y * upstream).sum().backward()
        results.append((y.detach(), weight.grad.clone(), bias.grad.clone(), grads(emb)))
    (y0, w0, b0, e0), (y1, w1, b1, e1) = results
    for actual, expected in [(y1, y0), (w1, w0), (b1, b0)]:
        assert_close_to_scale(actual, expected)
    assert e0.keys() == e1.keys() and e0
    for k in e0:
        assert_close_to_scale(e1[k], e0[k])


@pytest.mark.parametrize(
    "name, options",
    [
        ("mmoe", {"num_experts": 4, "expert_hidden": [16, 8]}),
        # PLE's first level: task-specific and shared experts, masked gates plus the shared gate
        ("ple", {"num_levels": 2, "specific_experts": [1, 2], "shared_experts": 2, "expert_hidden": [16, 8]}),
    ],
)
def test_mixture_with_embedded_input_equals_plain(name: str, options: dict, census_store) -> None:
    """The first mixture layer through the folded tables: same mixture, gates and gradients."""
    torch.manual_seed(0)
    model = build_model(name, census_store.layout, options)
    mixture = model.mixture if name == "mmoe" else model.levels[0]
    batch = census_store.split("train").slice(0, 256)
    folded_calls = []
    stacked = model.embedding.stacked_linear
    model.embedding.stacked_linear = lambda *args: folded_calls.append(1) or stacked(*args)  # counts, then runs it
    results = []
    for embedded in (None, Embedded(model.embedding, batch)):
        model.zero_grad(set_to_none=True)
        x = model.embedding(batch).squeeze(1)
        mixed, weights = mixture(x, embedded)
        (mixed.square().sum() + weights[0, :, 0].sum()).backward()
        results.append((mixed.detach(), weights.detach(), grads(model)))
    assert len(folded_calls) == 1  # the embedded pass really went through the folded tables
    model(batch)
    assert len(folded_calls) == 2  # and so does the model's own forward pass
    (m0, w0, g0), (m1, w1, g1) = results
    assert_close_to_scale(m1, m0)
    assert_close_to_scale(w1, w0)
    assert g0.keys() == g1.keys()
    for k in g0:
        assert_close_to_scale(g1[k], g0[k])


def test_summed_rows_backward_equals_embedding_bag_bit_for_bit(census_store) -> None:
    """The folded lookup-sum's own backward gives exactly the gradient of ``F.embedding_bag``'s backward
    (same sums in the same order), block by block when the table holds several blocks, and its double
    backward is right (with and without the in-place product of the unfolded columns)."""
    from mtrec.nn.embedding import _SumRows

    torch.manual_seed(0)
    emb = FeatureEmbedding(census_store.layout)
    batch = census_store.split("train").slice(0, 512)
    plan = emb._plan(512, torch.device("cpu"))
    ids = batch.sparse.index_select(1, plan.sparse_cols) + plan.prow_offsets  # [B, F], many repeated rows
    rows = plan.rows
    for blocks in (1, 3):
        table = torch.randn(blocks * rows, 24, requires_grad=True)
        upstream = torch.randn(blocks, 512, 24)
        expected_out, expected_grad = [], []
        for e, block in enumerate(table.detach().split(rows)):  # every block on its own, by embedding_bag
            block = block.clone().requires_grad_(True)
            out_e = torch.nn.functional.embedding_bag(ids, block, mode="sum")
            (out_e * upstream[e]).sum().backward()
            expected_out.append(out_e.detach())
            expected_grad.append(block.grad)
        out = _SumRows.apply(table, ids, blocks)
        (out * upstream).sum().backward()
        assert out.shape == (blocks, 512, 24)
        assert torch.equal(out, torch.stack(expected_out))
        assert torch.equal(table.grad, torch.cat(expected_grad))
        assert table.grad.abs().sum() > 0 and (table.grad == 0).all(1).any()  # real sums, and rows no sample holds
    small = torch.randn(2 * 7, 3, dtype=torch.double, requires_grad=True)
    small_ids = torch.tensor([[0, 3, 5], [1, 3, 6], [0, 4, 5], [0, 3, 5]])
    x = torch.randn(4, 2, dtype=torch.double, requires_grad=True)
    w = torch.randn(2, 2, 3, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: _SumRows.apply(t, small_ids, 2), (small,))
    assert torch.autograd.gradgradcheck(lambda t, x, w: _SumRows.apply(t, small_ids, 2, x, w), (small, x, w))


@pytest.mark.parametrize("rows", [512, 40])  # every field folded; only the small-vocabulary fields folded
@pytest.mark.parametrize("given_x", [True, False])  # the caller's x, or only what the fold still reads
def test_stacked_linear_equals_plain_products_in_float64(rows: int, given_x: bool, census_store) -> None:
    """Every member of stacks of maps (wide ones as blocks of the folded table, narrow ones sharing a
    block) equals ``x @ W_i + b_i`` with autograd, outputs and gradients (of the maps and the embedding
    tables), within float64 rounding: with every field folded, and with the large-vocabulary fields left to
    an ordinary product beside the dense values (at 40 rows only fields of at most 20 values fold)."""
    torch.manual_seed(0)
    emb = FeatureEmbedding(census_store.layout).double()
    batch = census_store.split("train").slice(0, rows)
    batch = dataclasses.replace(batch, dense=batch.dense.double())
    plan = emb._plan(rows, torch.device("cpu"))
    assert plan is not None and plan.rest_is_dense == (rows == 512)
    d = emb.output_dim
    stacks = [  # (weight [n, D, out], bias [n, out]): wide members (own blocks), narrow ones (one shared block)
        (torch.randn(3, d, 64, dtype=torch.double), torch.randn(3, 64, dtype=torch.double)),
        (torch.randn(2, d, 5, dtype=torch.double), torch.randn(2, 5, dtype=torch.double)),
    ]
    for w, b in stacks:
        w.requires_grad_(True)
        b.requires_grad_(True)
    upstream = [torch.randn(w.shape[0], rows, w.shape[2], dtype=torch.double) for w, _ in stacks]
    results = []
    for folded in (False, True):
        emb.zero_grad(set_to_none=True)
        for w, b in stacks:
            w.grad = b.grad = None
        x = emb(batch).squeeze(1)
        if folded:
            outs = emb.stacked_linear(batch, x if given_x else None, stacks)
        else:  # the independent computation: every member's product on its own
            outs = [torch.stack([x @ w[i] + b[i] for i in range(w.shape[0])]) for w, b in stacks]
        sum((out * u).sum() for out, u in zip(outs, upstream)).backward()
        grads_maps = [g.clone() for w, b in stacks for g in (w.grad, b.grad)]
        results.append(([out.detach() for out in outs], grads_maps, grads(emb)))
    (o0, m0, e0), (o1, m1, e1) = results
    for actual, expected in [*zip(o1, o0), *zip(m1, m0)]:
        assert_close_to_scale(actual, expected, tol=1e-12)
    assert o1[0].is_contiguous() and o1[0].shape == (3, rows, 64)  # wide members: [n, B, out], one block each
    assert e0.keys() == e1.keys() and e0
    for k in e0:
        assert_close_to_scale(e1[k], e0[k], tol=1e-12)


def test_inference_reuses_projected_tables_until_the_weights_change(census_store) -> None:
    """Without autograd the folded first layer projects its tables once and reuses them batch after batch;
    any change of the weights it reads (an in-place edit of the experts' weight, a gate bias or an
    embedding table, an optimiser step, a loaded state) projects them again: every output equals the
    forward pass with autograd on, which always projects afresh."""
    torch.manual_seed(0)
    model = build_model("mmoe", census_store.layout, {"num_experts": 4, "expert_hidden": [16, 8]}).eval()
    emb = model.embedding
    train = census_store.split("train")
    batches = [train.slice(0, 512), train.slice(512, 1024), train.slice(1024, 1536)]
    assert emb._plan(512, torch.device("cpu")) is emb._plan(700, torch.device("cpu"))  # same fields: one plan
    projections = []
    project = emb._project
    emb._project = lambda *args, **kw: projections.append(1) or project(*args, **kw)  # counts, then runs it

    def check(batch, projected: int) -> None:
        """The no-grad output of ``batch`` after ``projected`` new projections equals the autograd one."""
        projections.clear()
        with torch.no_grad():
            got = model(batch).logits
        assert len(projections) == projected
        assert_close_to_scale(got, model(batch).logits.detach(), tol=1e-6)  # autograd on: projected afresh

    check(batches[0], 2)  # the experts' map and the gates' map
    check(batches[1], 0)  # both reused
    first = model.mixture.experts.layers[0]
    with torch.no_grad():
        first.weight.add_(0.05)
    check(batches[2], 1)  # the experts' map only
    with torch.no_grad():
        model.mixture.gates.bias.sub_(0.3)
    check(batches[0], 1)  # the gates' map only
    with torch.no_grad():
        next(iter(emb.tables.values())).weight.mul_(1.5)
    check(batches[1], 2)  # both read the tables
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    model.train()
    model(batches[2]).logits.square().mean().backward()
    optimizer.step()
    model.eval()
    check(batches[0], 2)
    other = build_model("mmoe", census_store.layout, {"num_experts": 4, "expert_hidden": [16, 8]})
    model.load_state_dict(other.state_dict())
    check(batches[1], 2)
    with torch.no_grad():
        assert_close_to_scale(model(batches[1]).logits, other.eval()(batches[1]).logits, tol=1e-6)


@pytest.mark.parametrize("rows", [512, 40])  # every field folded; only the small-vocabulary fields folded
def test_model_embeds_only_what_its_folded_first_layer_reads(rows: int, census_store) -> None:
    """``mmoe`` lets its first layer look up only what it reads: at 512 rows every Census field folds and
    the embedding's own forward is never called; the outputs and gradients are those of the explicit input."""
    torch.manual_seed(0)
    model = build_model("mmoe", census_store.layout, {"num_experts": 4, "expert_hidden": [16, 8]})
    batch = census_store.split("train").slice(0, rows)
    calls = []
    model.embedding.register_forward_hook(lambda *args: calls.append(1))
    model.zero_grad(set_to_none=True)
    out = model(batch)
    out.logits.sum().backward()
    lazy = (out.logits.detach(), grads(model))
    assert len(calls) == (0 if rows == 512 else 1)
    model.zero_grad(set_to_none=True)
    x = model.embedding(batch).squeeze(1)
    mixed, _, _ = model.mixture.mix(x, Embedded(model.embedding, batch))
    logits = model.towers(mixed)
    logits.sum().backward()
    assert torch.equal(logits.detach(), lazy[0])
    explicit = grads(model)
    assert explicit.keys() == lazy[1].keys()
    for k in explicit:
        assert torch.equal(explicit[k], lazy[1][k]), k


# ---- reproducibility --------------------------------------------------------------------------


def train_once(census_store, seed: int) -> dict[str, torch.Tensor]:
    seed_everything(seed)
    layout = census_store.layout
    model = build_model("mmoe", layout, {"num_experts": 4, "expert_hidden": [32, 16], "tower_hidden": [8]})
    trainer = Trainer(model, Fixed(layout.task_names), TrainConfig(epochs=1, batch_size=64, seed=seed, progress=False))
    trainer.fit(census_store.split("train").slice(0, 384), census_store.split("valid").slice(0, 128))  # 6 steps
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_training_is_bit_reproducible_for_a_seed(census_store) -> None:
    first, second = train_once(census_store, 0), train_once(census_store, 0)
    assert first.keys() == second.keys()
    for k in first:
        assert torch.equal(first[k], second[k]), k
    other = train_once(census_store, 1)
    assert any(not torch.equal(first[k], other[k]) for k in first)
