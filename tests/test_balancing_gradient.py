"""Gradient-level balancers against their definitions, and the plumbing that feeds them.

The methods are checked as pure functions of a task-gradient matrix ``G [T, P]`` (small random
problems whose answer is known or can be brute-forced); the plumbing is checked on a real
``mmoe`` / ``shared_bottom`` batch of Census against gradients computed independently.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from mtrec.balancing import BALANCERS, GradientBalancer, StepContext, gradient_balancer_names
from mtrec.balancing.aligned_mtl import aligned_matrix
from mtrec.balancing.cagrad import cagrad_coefficients
from mtrec.balancing.gradient import gram
from mtrec.balancing.gradvac import gradvac_adjust
from mtrec.balancing.imtl import imtl_weights
from mtrec.balancing.mgda import min_norm_weights
from mtrec.balancing.nash_mtl import nash_weights
from mtrec.balancing.pcgrad import pcgrad_adjust
from mtrec.errors import MtrecError
from mtrec.models import build_model
from mtrec.models.reach import SharedSlice
from mtrec.train.trainer import seed_everything

TASKS2 = ["a", "b"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one thread is as fast


def _random_G(T: int, P: int, seed: int) -> torch.Tensor:
    return torch.randn(T, P, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _no_losses(T: int) -> torch.Tensor:
    return torch.ones(T, dtype=torch.float64)


# ---- plumbing -------------------------------------------------------------------------------


class _PlainSum(GradientBalancer):
    """Coefficients all 1: must reproduce ordinary back-propagation of the summed losses."""

    def coefficients(self, M, losses):
        return np.ones(M.shape[0])


def _batch_losses(store, model_name: str):
    seed_everything(0)
    model = build_model(model_name, store.layout)
    batch = store.split("train").slice(0, 256)
    out = model(batch)
    return model, out, model.losses(out, batch)


def test_gradient_level_plumbing_reproduces_plain_backward(census_store) -> None:
    model, out, losses = _batch_losses(census_store, "mmoe")
    expected = torch.autograd.grad(losses.sum(), list(model.parameters()), retain_graph=True)
    _PlainSum(model.task_names).backward(losses, StepContext(0, 1, model, shared=out.shared))
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "model_name, level, embeddings",
    [("mmoe", "params", "sum"), ("mmoe", "params", "balance"), ("shared_bottom", "repr", "sum")],
)
def test_shared_get_the_combination_and_the_rest_the_plain_sum(
    census_store, model_name: str, level: str, embeddings: str
) -> None:
    model, out, losses = _batch_losses(census_store, model_name)
    tables = {id(p) for p in model.embedding.parameters()}
    shared, specific = model.shared_parameters(), model.task_specific_parameters()
    balanced = [p for p in shared if embeddings == "balance" or level == "repr" or id(p) not in tables]
    plain = [p for p in model.parameters() if all(p is not b for b in balanced)]
    per_task = [torch.autograd.grad(losses[t], balanced, retain_graph=True) for t in range(2)]
    summed = torch.autograd.grad(losses.sum(), plain, retain_graph=True)
    mgda = BALANCERS.get("mgda")(model.task_names, level=level, embeddings=embeddings)
    mgda.backward(losses, StepContext(0, 1, model, shared=out.shared))
    w = mgda.weights()
    assert sum(w.values()) == pytest.approx(1.0) and min(w.values()) >= 0
    assert 0.05 < w["income"] < 0.95  # a real mixture, so the check below can tell the two apart
    for i, p in enumerate(balanced):  # shared layers: the min-norm combination
        combo = w["income"] * per_task[0][i] + w["never_married"] * per_task[1][i]
        torch.testing.assert_close(p.grad, combo, rtol=1e-4, atol=1e-7)
    for p, g in zip(plain, summed):  # towers (and, unless balanced, embedding tables): the plain sum
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-7)
    assert len(plain) == len(specific) + (len(tables) if embeddings == "sum" and level == "params" else 0)
    if level == "params":  # the logged cosine is the one between the balanced gradients
        flat = [torch.cat([g.reshape(-1) for g in grads]) for grads in per_task]
        cos = torch.nn.functional.cosine_similarity(flat[0], flat[1], dim=0)
        assert mgda.stats()["cos/income~never_married"] == pytest.approx(float(cos), abs=1e-4)


@pytest.mark.parametrize("model_name", ["mmoe", "ple"])
def test_representation_level_on_expert_outputs(census_store, model_name: str) -> None:
    """Mixture models: the representation is the expert outputs every gate reads. The experts get the
    combination of the task gradients (coefficients: the min-norm point of the gradients at that
    representation), towers and gates the plain sum, and the tables, reached both through the experts
    and past them through the gates, the combination on the first path plus the plain sum on the other."""
    model, out, losses = _batch_losses(census_store, model_name)
    z = out.shared
    last = model.mixture if model_name == "mmoe" else model.levels[-1]
    assert z.shape[0] == last.num_experts  # [E, B, H]: the experts' outputs, not one mixture per task
    gz = [torch.autograd.grad(losses[t], z, retain_graph=True)[0] for t in range(2)]
    d = gz[0] - gz[1]  # two tasks: min-norm weight of task 0 in closed form
    c0 = float(((gz[1] * (gz[1] - gz[0])).sum() / (d * d).sum()).clamp(0, 1))
    experts = list(last.experts.parameters())
    per_task = [torch.autograd.grad(losses[t], experts, retain_graph=True) for t in range(2)]
    plain = list(model.towers.parameters()) + list(last.gates.parameters())
    summed = torch.autograd.grad(losses.sum(), plain, retain_graph=True)
    tables = list(model.embedding.parameters())
    tables_sum = torch.autograd.grad(losses.sum(), tables, retain_graph=True)
    # the path through z, moved from the plain sum (g0 + g1) to the combination (c0 g0 + (1 - c0) g1)
    moved = torch.autograd.grad(z, tables, grad_outputs=(c0 - 1) * gz[0] - c0 * gz[1], retain_graph=True)
    mgda = BALANCERS.get("mgda")(model.task_names, level="repr")
    mgda.backward(losses, StepContext(0, 1, model, shared=out.shared))
    w = mgda.weights()
    assert w["income"] == pytest.approx(c0, abs=1e-5) and 0.05 < c0 < 0.95
    for i, p in enumerate(experts):
        torch.testing.assert_close(p.grad, c0 * per_task[0][i] + (1 - c0) * per_task[1][i], rtol=1e-4, atol=1e-7)
    for p, g in zip(plain, summed):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-7)
    for p, g, m in zip(tables, tables_sum, moved):
        torch.testing.assert_close(p.grad, g + m, rtol=1e-4, atol=1e-7)
        assert m.abs().max() > 1e-6  # the path through the experts really was re-weighted


def test_representation_level_refuses_per_task_mixtures(census_store) -> None:
    model, out, losses = _batch_losses(census_store, "cross_stitch")  # its last layer: one network per task
    with pytest.raises(MtrecError, match="level=params"):
        BALANCERS.get("pcgrad")(model.task_names, level="repr").backward(
            losses, StepContext(0, 1, model, shared=out.shared)
        )


# ---- PCGrad ---------------------------------------------------------------------------------


def test_pcgrad_removes_conflicts_and_leaves_agreement_alone() -> None:
    for seed in range(20):
        G = _random_G(2, 6, seed)
        M = gram(G)
        A = pcgrad_adjust(M, [[1], [0]])
        adjusted = torch.from_numpy(A) @ G
        for i, j in ((0, 1), (1, 0)):
            dot = float(adjusted[i] @ G[j])
            assert dot >= -1e-10
            if M[i, j] < 0:
                assert dot == pytest.approx(0.0, abs=1e-10)  # projected onto g_j's normal plane
            else:
                torch.testing.assert_close(adjusted[i], G[i])
    # three tasks: after its last projection a gradient does not conflict with that task
    G = _random_G(3, 5, 7)
    A = pcgrad_adjust(gram(G), [[1, 2], [2, 0], [0, 1]])
    adjusted = torch.from_numpy(A) @ G
    assert (
        float(adjusted[0] @ G[2]) >= -1e-10
        and float(adjusted[1] @ G[0]) >= -1e-10
        and float(adjusted[2] @ G[1]) >= -1e-10
    )
    # no conflict at all: the sum of the gradients, unchanged
    G = torch.rand(3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    g = BALANCERS.get("pcgrad")(["a", "b", "c"]).aggregate(G, _no_losses(3))
    torch.testing.assert_close(g, G.sum(0))


# ---- MGDA -----------------------------------------------------------------------------------


def _simplex_grid(T: int, steps: int) -> np.ndarray:
    if T == 2:
        a = np.linspace(0, 1, steps + 1)
        return np.stack([a, 1 - a], 1)
    pts = [(i, j, steps - i - j) for i in range(steps + 1) for j in range(steps + 1 - i)]
    return np.array(pts, dtype=np.float64) / steps


@pytest.mark.parametrize("T, steps", [(2, 20000), (3, 300)])
def test_mgda_is_the_min_norm_point_of_the_hull(T: int, steps: int) -> None:
    grid = _simplex_grid(T, steps)  # [K, T]
    for seed in range(12):
        G = _random_G(T, 4, seed)
        if seed % 3 == 0:
            G[1] = G[0] * 3 + 0.1 * G[1]  # nearly parallel: the optimum sits on a vertex or an edge
        M = gram(G)
        a = min_norm_weights(M)
        assert a.min() >= 0 and a.sum() == pytest.approx(1.0)
        ours = float(a @ M @ a)
        norms = np.einsum("kt,ts,ks->k", grid, M, grid)  # squared norm of each grid combination
        best = int(np.argmin(norms))
        assert ours <= norms[best] + 1e-12  # never worse than any grid point
        assert ours == pytest.approx(norms[best], rel=2e-3, abs=1e-9)  # and the grid's best converges to it
        np.testing.assert_allclose(a, grid[best], atol=3.0 / steps + 1e-6)
        g = BALANCERS.get("mgda")([f"t{i}" for i in range(T)]).aggregate(G, _no_losses(T))
        assert float(g @ g) == pytest.approx(norms[best], rel=2e-3, abs=1e-9)  # the balancer's update: that point


def test_a_task_without_gradient_does_not_stall_mgda_or_imtl() -> None:
    """A spaced task with no sample in its space this batch has a zero gradient: it must not pull
    MGDA's min-norm point to zero nor make IMTL divide by zero; it gets weight 0."""
    G = _random_G(3, 6, 4)
    G[1] = 0
    for name in ("mgda", "imtl"):
        bal = BALANCERS.get(name)(["x", "y", "z"])
        g = bal.aggregate(G, _no_losses(3))
        w = bal.weights()
        assert w["y"] == 0 and torch.isfinite(g).all() and float(g.norm()) > 0
        expected = BALANCERS.get(name)(["x", "z"]).aggregate(G[[0, 2]], _no_losses(2))
        torch.testing.assert_close(g, expected)


# ---- GradVac, CAGrad, IMTL, Nash-MTL, Aligned-MTL -------------------------------------------


def test_gradvac_raises_a_pair_cosine_exactly_to_its_target() -> None:
    G = _random_G(2, 6, 3)
    M = gram(G)
    phi = M[0, 1] / np.sqrt(M[0, 0] * M[1, 1])
    target = min(phi + 0.4, 0.9)
    targets = np.array([[0.0, target], [target, 0.0]])
    A, new = gradvac_adjust(M, targets, [[1], [0]], beta=0.01)
    adjusted = torch.from_numpy(A) @ G
    for i, j in ((0, 1), (1, 0)):
        cos = float(adjusted[i] @ G[j] / (adjusted[i].norm() * G[j].norm()))
        assert cos == pytest.approx(target, abs=1e-9)
    assert new[0, 1] == pytest.approx(0.99 * target + 0.01 * phi)
    # a target below the current cosine leaves the gradients alone
    A, _ = gradvac_adjust(M, np.full((2, 2), phi - 0.2), [[1], [0]], beta=0.01)
    np.testing.assert_allclose(A, np.eye(2))


def test_cagrad_maximises_the_worst_task_improvement_in_its_ball() -> None:
    rng = np.random.default_rng(0)
    for seed in range(6):
        G = _random_G(3, 5, seed).numpy()
        M = G @ G.T
        c = 0.5
        coef, _ = cagrad_coefficients(M, c)
        d = coef @ G
        g0 = G.mean(0)
        radius = c * np.linalg.norm(g0)
        assert np.linalg.norm(d - g0) <= radius * (1 + 1e-6)
        worst = float(np.min(G @ d))
        # brute force: no update in the ball improves the worst task more
        u = rng.normal(size=(20000, 5))
        u *= (rng.random((20000, 1)) ** (1 / 5)) / np.linalg.norm(u, axis=1, keepdims=True)
        others = np.min((g0 + radius * u) @ G.T, axis=1)
        assert worst >= others.max() - 1e-6 * np.abs(others).max()
    coef, _ = cagrad_coefficients(M, 0.0)  # c = 0: plain averaging
    np.testing.assert_allclose(coef, np.full(3, 1 / 3))


@pytest.mark.parametrize("T", [2, 3, 4])
def test_imtl_projects_equally_on_every_task_direction(T: int) -> None:
    G = _random_G(T, 7, T) * torch.tensor([1.0, 10.0, 0.1, 3.0][:T], dtype=torch.float64)[:, None]
    a = imtl_weights(gram(G))
    g = BALANCERS.get("imtl")([f"t{i}" for i in range(T)]).aggregate(G, _no_losses(T))
    proj = (G / G.norm(dim=1, keepdim=True)) @ g  # g . u_t
    torch.testing.assert_close(proj, proj[0].expand(T), rtol=1e-8, atol=1e-10)
    # the definition as a T x T linear system, solved here: g . (u_0 - u_t) = 0 for t >= 1, sum a = 1
    Gn = G.numpy()
    U = Gn / np.linalg.norm(Gn, axis=1, keepdims=True)
    A = np.vstack([(Gn @ (U[0] - U[t]))[None, :] for t in range(1, T)] + [np.ones((1, T))])
    expected = np.linalg.solve(A, np.eye(T)[-1])
    np.testing.assert_allclose(a, expected, rtol=1e-8, atol=1e-10)


def test_nash_mtl_is_the_bargaining_solution_and_ignores_loss_scales() -> None:
    G = _random_G(3, 6, 5)
    a = nash_weights(gram(G))
    g = torch.from_numpy(a) @ G
    improvement = (G @ g).numpy()  # g_t . g
    np.testing.assert_allclose(a * improvement, np.ones(3), rtol=1e-5)  # a_t (g_t . g) = 1
    scaled = G * torch.tensor([100.0, 1.0, 0.01], dtype=torch.float64)[:, None]
    g_scaled = BALANCERS.get("nash_mtl")(["x", "y", "z"]).aggregate(scaled, _no_losses(3))
    torch.testing.assert_close(g_scaled, g, rtol=1e-4, atol=1e-8)


def _svd_alignment(G: np.ndarray) -> np.ndarray:
    """Aligned-MTL's aligned system from the SVD of ``G [T, P]`` (paper, eq. 8): with ``G = U S V^T``,
    ``sigma_min U V^T``, over the non-zero singular values only."""
    U, s, Vt = np.linalg.svd(G, full_matrices=False)
    keep = s > 1e-8 * s.max()
    return s[keep].min() * U[:, keep] @ Vt[keep]


def test_aligned_mtl_gives_an_orthogonal_equal_norm_system() -> None:
    G = _random_G(3, 6, 11) * torch.tensor([5.0, 1.0, 0.2], dtype=torch.float64)[:, None]
    Gn = G.numpy()
    aligned = _svd_alignment(Gn)
    sigma_min = np.linalg.svd(Gn, compute_uv=False).min()
    # the defining property: orthogonal aligned gradients, all of norm sigma_min (condition number 1)
    np.testing.assert_allclose(aligned @ aligned.T, sigma_min**2 * np.eye(3), rtol=1e-9, atol=1e-9)
    # B from the eigendecomposition of G G^T, written out: sqrt(lambda_min) V diag(lambda)^(-1/2) V^T
    lam, V = np.linalg.eigh(Gn @ Gn.T)
    formula = np.sqrt(lam.min()) * V @ np.diag(lam**-0.5) @ V.T
    B = aligned_matrix(gram(G))
    np.testing.assert_allclose(B, B.T, rtol=0, atol=1e-12)  # symmetric
    np.testing.assert_allclose(B, formula, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(B @ Gn, aligned, rtol=1e-9, atol=1e-10)
    # the update: the aligned gradients weighted by --task-weights (applied after the alignment)
    for weights in ([1.0, 1.0, 1.0], [2.0, 0.5, 1.0]):
        g = BALANCERS.get("aligned_mtl")(["x", "y", "z"], task_weights=weights).aggregate(G, _no_losses(3))
        np.testing.assert_allclose(g.numpy(), np.array(weights) @ aligned, rtol=1e-9, atol=1e-10)


def test_aligned_mtl_on_a_rank_deficient_system_uses_the_smallest_non_zero_singular_value() -> None:
    G = _random_G(3, 6, 12)
    G[2] = G[0] + 2 * G[1]  # rank 2: lambda_min is 0, which would zero the whole update
    aligned = _svd_alignment(G.numpy())
    assert np.linalg.matrix_rank(aligned) == 2
    g = BALANCERS.get("aligned_mtl")(["x", "y", "z"]).aggregate(G, _no_losses(3))
    assert float(g.norm()) > 0
    np.testing.assert_allclose(g.numpy(), aligned.sum(0), rtol=1e-8, atol=1e-10)


def test_gradient_balancers_reject_unknown_options() -> None:
    with pytest.raises(MtrecError, match="no option bogus"):
        BALANCERS.get("pcgrad")(TASKS2, bogus=1)
    with pytest.raises(MtrecError, match="level"):
        BALANCERS.get("mgda")(TASKS2, level="everything")


class _ThreeTasks(nn.Module):
    """A trunk every task reads, a middle layer whose units 4-7 only task 0 reads (a parameter with
    shared and task-specific elements), and one head per task."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(5, 8)
        self.mid = nn.Linear(8, 8)
        self.heads = nn.Linear(4, 3)
        self.extra = nn.Linear(4, 1)  # task 0's private path from units 4-7

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = torch.tanh(self.mid(torch.tanh(self.trunk(x))))
        out = self.heads(m[:, :4])
        return out + nn.functional.pad(self.extra(m[:, 4:]), (0, 2))  # [N, 3]

    def shared_slices(self) -> list[SharedSlice]:
        rows = torch.arange(8) < 4
        return [SharedSlice(p) for p in self.trunk.parameters()] + [
            SharedSlice(self.mid.weight, rows[:, None].expand(8, 8)),
            SharedSlice(self.mid.bias, rows),
        ]


GRADIENT_METHODS = gradient_balancer_names()


def test_every_gradient_method_is_enrolled() -> None:
    assert set(GRADIENT_METHODS) == {"pcgrad", "gradvac", "mgda", "cagrad", "imtl", "nash_mtl", "aligned_mtl"}


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_logged_weights_and_cosines_describe_the_update_written_to_the_parameters(name: str) -> None:
    """On a real network with a partly shared parameter: the shared elements get the logged weights'
    combination of the per-task gradients (taken here by autograd, one task at a time), everything else
    the plain sum; the logged cosines are those of the per-task gradients on the shared elements."""
    torch.manual_seed(0)
    net = _ThreeTasks()
    x = torch.randn(64, 5)
    y = torch.randn(64, 3) * torch.tensor([1.0, 5.0, 0.2])  # unequal scales: methods disagree with the sum
    losses = ((net(x) - y) ** 2).mean(0)
    params = list(net.parameters())
    per_task = [torch.autograd.grad(losses[t], params, retain_graph=True) for t in range(3)]
    summed = torch.autograd.grad(losses.sum(), params, retain_graph=True)
    bal = BALANCERS.get(name)(["x", "y", "z"])
    bal.backward(losses, StepContext(0, 1, net))
    w = list(bal.weights().values())
    shared = {
        id(net.trunk.weight): None,
        id(net.trunk.bias): None,
        id(net.mid.weight): (slice(0, 4),),
        id(net.mid.bias): (slice(0, 4),),
    }
    for i, p in enumerate(params):
        expected = summed[i].clone()
        if id(p) in shared:
            idx = shared[id(p)] or (...,)
            expected[idx] = sum(w[t] * per_task[t][i][idx] for t in range(3))
        torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-6)
    # the balanced part really differs from the plain sum, so the check above can tell them apart
    assert not torch.allclose(net.trunk.weight.grad, summed[0], rtol=1e-3, atol=1e-5)
    flat = [
        torch.cat(
            [
                g[i].reshape(-1) if shared[id(p)] is None else g[i][:4].reshape(-1)
                for i, p in enumerate(params)
                if id(p) in shared
            ]
        )
        for g in per_task
    ]
    assert bal.stats().keys() >= {"cos/x~y", "cos/x~z", "cos/y~z", "weight/x"}
    for a, b in itertools.combinations(range(3), 2):
        expected = float(flat[a] @ flat[b] / (flat[a].norm() * flat[b].norm()))
        assert bal.stats()[f"cos/{'xyz'[a]}~{'xyz'[b]}"] == pytest.approx(expected, abs=1e-5)
