"""Gradient-level balancing: per-task gradients of the shared parameters, combined into one.

Every method here (PCGrad, GradVac, MGDA, CAGrad, IMTL, Nash-MTL, Aligned-MTL) returns a
combination ``g = c @ G`` of the rows of the task-gradient matrix ``G [T, P]``, and finds
its coefficients ``c`` from the Gram matrix ``M = G G^T [T, T]`` alone. So the work on
``P``-sized vectors is two matrix products (the Gram matrix and ``c @ G``); the solvers
(projections, min-norm points, bargaining) run on ``T x T`` float64 arrays, which costs
microseconds whatever the model's size.

Where the per-task gradients come from (option ``level``):

- ``params`` (default): ``torch.autograd.grad`` of each task loss with respect to the model's
  shared parameter elements (``model.shared_slices()``: the elements its static sharing
  declaration says several tasks reach, e.g. MMoE's experts but not its per-task gates, PLE's
  shared experts but not the last level's task experts) and nothing else; task-specific
  parameters and members receive the gradient of the plain sum of the task losses, which is
  their own task's gradient since no other loss reaches them.
- ``repr``: gradients with respect to the shared representation ``output.shared`` (the
  "upper bound" of Sener and Koltun, 2018): ``T`` cheap backward passes from the losses down to
  that representation (towers, mixing), the combination found on those, then **one** ordinary
  backward pass with two roots, the summed losses and the representation with the extra gradient
  ``combined - summed``: the layers below it get the combination, the towers their own task's
  gradient, and paths that bypass it (MMoE's gates reading the embedding) the plain sum. Mixture
  models (``mmoe``, ``cgc``, ``ple``, ``ml_mmoe``) expose the expert outputs their gates mix
  (``[E, B, H]``), which every task reads; ``shared_bottom`` and ``omoe`` the one shared vector.
  Models whose ``shared`` holds one network per task (``cross_stitch``, ``sluice``, ``adatt``)
  give gradients that never overlap there, and are refused. The logged cosines are then those
  between representation gradients (every sample's side by side, not summed over the batch):
  a different quantity from the parameter-level cosine, which is the one to read for conflicts.

Embedding tables (option ``embeddings``, level ``params``). In a recommender the shared
embedding tables can hold millions of rows, so a ``[T, rows x dim]`` gradient matrix for them
is out of the question; and the tables sit below the first shared layer, so a task's
gradient on them costs a pass of input gradients through every shared layer. By default
(``sum``) ``G`` holds the dense shared layers only and the tables, like the towers, receive the
plain sum of the task gradients (the conflicts are measured and resolved on the dense trunk,
which is where the methods' papers apply them too). ``embeddings=balance`` puts the tables'
gradients in ``G`` as well: the method on every shared parameter, at the full cost.

Cost (level ``params``): one ordinary backward pass of the summed losses gives every
parameter its plain-sum gradient, then ``T - 1`` passes give the first ``T - 1`` rows of ``G``
restricted to the balanced parameters, and the last row is the sum minus those (the
gradient is linear in the losses). With the tables left out, those passes stop at the first
shared layer's weights. On ``mmoe`` / Census this is 1.5-1.8x the step time of ``fixed`` for
two tasks (level with LibMTL, whose methods run ``T`` full passes) and 2.6-2.8x for four (LibMTL
2.9-6.8x). Level ``repr`` costs 1.2x for two tasks and 1.4x for four; see BENCHMARKS.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from mtrec.balancing.base import Balancer, StepContext
from mtrec.balancing.options import BalancerConfig, TaskWeightsConfig, base_weights
from mtrec.errors import MtrecError
from mtrec.models.reach import SharedSlice

if TYPE_CHECKING:
    from mtrec.models.base import MultiTaskModel

EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)


def dense_shared_slices(model: MultiTaskModel) -> list[SharedSlice]:
    """The model's shared elements without its embedding tables (unless the tables are all it shares):
    where the methods' ``G`` lives by default (``embeddings=sum``) and the conflict monitor looks."""
    shared = model.shared_slices()
    ids = {id(p) for m in model.modules() if isinstance(m, EMBEDDINGS) for p in m.parameters()}
    dense = [s for s in shared if id(s.param) not in ids]
    return dense or shared


def on_live_tasks(M: np.ndarray, solve) -> np.ndarray:
    """Coefficients from ``solve`` on the tasks whose gradient is not zero; 0 for the others.

    A task with no sample in its space this batch has a zero gradient: it is indifferent to the
    update, and left in, it would make MGDA's min-norm point zero and IMTL's directions undefined.
    """
    live = np.diag(M) > 0
    c = np.zeros(M.shape[0])
    if live.any():
        c[live] = solve(M[np.ix_(live, live)])
    return c


def gram(G: Tensor) -> np.ndarray:
    """``M = G G^T`` as a float64 array ``[T, T]``."""
    return (G @ G.T).double().cpu().numpy()


def cosines(M: np.ndarray) -> np.ndarray:
    """Pairwise cosine ``[T, T]`` between task gradients, from their Gram matrix (0 for a zero gradient)."""
    norms = np.sqrt(np.clip(np.diag(M), 0.0, None))
    denom = np.outer(norms, norms)
    return np.divide(M, denom, out=np.zeros_like(M), where=denom > 0)


class GradientOptions(BalancerConfig):
    """Where the task gradients come from (see the module docstring)."""

    level: Literal["params", "repr"] = "params"
    embeddings: Literal["sum", "balance"] = "sum"


class GradientConfig(GradientOptions, TaskWeightsConfig):
    """The gradient options plus ``--task-weights``, which scale the task losses before their
    gradients are taken (unless the method says otherwise)."""


class GradientBalancer(Balancer):
    """Base class: computes ``G [T, P]``, asks :meth:`coefficients` for ``c``, writes ``c @ G`` back.

    Subclasses implement :meth:`coefficients` (``M [T, T]``, losses ``[T]`` -> ``c [T]``) and add
    their own options to ``Config`` (a :class:`GradientConfig`, or a :class:`GradientOptions` for a
    method on which ``--task-weights`` have no effect); :meth:`aggregate` is the pure
    ``(G, losses) -> g`` the definition tests exercise.
    """

    Config = GradientConfig
    config: GradientOptions

    # buffers (register_buffer), declared for the type checker
    base: Tensor

    def __init__(self, task_names: Sequence[str], task_weights: Sequence[float] | None = None, **options: Any) -> None:
        super().__init__(task_names, task_weights, **options)
        self.level = self.config.level
        self.embeddings = self.config.embeddings
        self.register_buffer("base", torch.tensor(base_weights(self.config, self.num_tasks), dtype=torch.float64))
        self._checked_repr = False
        self._stats: dict[str, float] = {}
        self._last_c = np.ones(self.num_tasks)
        self._last_gram: np.ndarray | None = None

    @property
    def reduces_own_gradients(self) -> bool:
        """Under data parallelism, whether this balancer all-reduces the gradients itself (``level=params``:
        they come from ``torch.autograd.grad``, which DistributedDataParallel's hooks do not see)."""
        return self.level == "params"

    # ---- the method ---------------------------------------------------------------------
    def coefficients(self, M: np.ndarray, losses: np.ndarray) -> np.ndarray:  # pragma: no cover
        """``c [T]`` such that the update is ``sum_t c_t g_t``; ``M`` is the Gram matrix of the task gradients."""
        raise NotImplementedError

    @property
    def builds_shared_gram(self) -> bool:
        """Whether each step's ``G`` holds the task gradients on the shared dense elements, as the
        conflict monitor measures them (then it reads :meth:`shared_gram` instead of recomputing)."""
        return self.level == "params" and self.embeddings == "sum"

    def shared_gram(self) -> np.ndarray | None:
        """The last step's Gram matrix of the (unweighted) task gradients: ``--task-weights`` divided out."""
        if self._last_gram is None:
            return None
        base = self.base.double().cpu().numpy()
        scale = np.where(base > 0, 1.0 / np.where(base > 0, base, 1.0), 0.0)
        return self._last_gram * np.outer(scale, scale)

    def aggregate(self, G: Tensor, losses: Tensor, M: np.ndarray | None = None) -> Tensor:
        """The combined gradient ``g [P]`` of the task gradients ``G [T, P]`` (also records stats); ``M``:
        their Gram matrix when already known (under data parallelism, the all-reduced one)."""
        M = gram(G) if M is None else M
        self._last_gram = M
        c = self.coefficients(M, losses.detach().double().cpu().numpy())
        self._record(M, c)
        return torch.as_tensor(c, dtype=G.dtype, device=G.device) @ G  # [P]

    # ---- plumbing -----------------------------------------------------------------------
    def task_losses(self, losses: Tensor) -> Tensor:
        """The losses whose gradients are balanced: ``--task-weights`` times the task losses
        (a hook: IMTL's hybrid form scales them further)."""
        if bool((self.base == 1).all()):
            return losses
        return losses * self.base.to(losses.dtype)

    def combine(self, losses: Tensor, context: StepContext) -> Tensor:
        """The scalar these coefficients would back-propagate (for callers that want a number)."""
        return (torch.as_tensor(self._last_c, dtype=losses.dtype, device=losses.device) * losses).sum()

    def backward(self, losses: Tensor, context: StepContext, aux_loss: Tensor | None = None) -> Tensor:
        model = context.model
        shared = [s for s in model.shared_slices() if s.param.requires_grad]
        if not shared:
            raise MtrecError(
                f"balancer '{self.registered_name}' combines gradients of shared parameters; "
                f"model '{model.model_name()}' shares none"
            )
        task = self.task_losses(losses)
        if self.level == "repr":
            self._backward_repr(task, losses, context, aux_loss)  # the regulariser rides the one pass, as is
        else:
            self._backward_params(task, losses, model, shared)
            if aux_loss is not None and aux_loss.requires_grad:
                self._add_aux(model, aux_loss)  # the model's regulariser is not a task: added as is
        return self.combine(losses.detach(), context)

    def _backward_params(self, task: Tensor, losses: Tensor, model: MultiTaskModel, shared: list[SharedSlice]) -> None:
        if self.embeddings == "sum":  # when only tables are shared, they are what gets balanced
            shared = [s for s in dense_shared_slices(model) if s.param.requires_grad]
        balanced = {id(s.param) for s in shared}
        # everything else gets the plain sum of the task gradients: task-specific parameters (and the
        # task-specific members of a stack that also holds shared ones) their own task's gradient
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in balanced]
        params = [s.param for s in shared]
        # one ordinary backward pass: the plain-sum gradient of everything
        summed = torch.autograd.grad(task.sum(), params + rest, retain_graph=True, allow_unused=True)
        sizes = [s.numel() for s in shared]
        G = torch.zeros(self.num_tasks, sum(sizes), dtype=params[0].dtype, device=params[0].device)  # [T, P]
        self._flatten_into(G[-1], summed[: len(shared)], shared)
        for t in range(self.num_tasks - 1):
            grads = torch.autograd.grad(task[t], params, retain_graph=True, allow_unused=True)
            self._flatten_into(G[t], grads, shared)
        if self.num_tasks > 1:
            G[-1] -= G[:-1].sum(0)  # the last task's gradient: the sum minus the others'
        if self.distributed is not None:  # data parallel: the global batch's gradients, on every rank
            self.distributed.mean_([G, *summed])
        g = self.aggregate(G, losses)  # [P]
        offset = 0
        for s, full, n in zip(shared, summed, sizes):
            grad = torch.zeros_like(s.param) if full is None else full
            s.put(grad, g[offset : offset + n])  # the shared elements get the combination
            s.param.grad = grad
            offset += n
        for p, grad in zip(rest, summed[len(shared) :]):
            p.grad = grad

    def _add_aux(self, model: nn.Module, aux_loss: Tensor) -> None:
        """Add the regulariser's gradient (averaged over the ranks under data parallelism)."""
        if self.distributed is None:
            aux_loss.backward()
            return
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(aux_loss, params, allow_unused=True)
        reached = [(p, g) for p, g in zip(params, grads) if g is not None]
        self.distributed.mean_([g for _, g in reached])
        for p, g in reached:
            p.grad = g if p.grad is None else p.grad + g

    @staticmethod
    def _flatten_into(row: Tensor, grads: Sequence[Tensor | None], slices: Sequence[SharedSlice]) -> None:
        offset = 0
        for g, s in zip(grads, slices):
            n = s.numel()
            if g is not None:
                row[offset : offset + n] = s.take(g)
            offset += n

    def _backward_repr(self, task: Tensor, losses: Tensor, context: StepContext, aux_loss: Tensor | None) -> None:
        z = context.shared
        if z is None or not z.requires_grad:
            raise MtrecError(
                f"balancer '{self.registered_name}' with level=repr needs the model's shared representation "
                "(ModelOutput.shared); this model exposes none: use level=params"
            )
        # T passes from the losses down to z only (towers, mixing): cheap
        rows = []
        for t in range(self.num_tasks):
            (gz,) = torch.autograd.grad(task[t], z, retain_graph=True, allow_unused=True)
            rows.append(torch.zeros_like(z).reshape(-1) if gz is None else gz.reshape(-1))
        G = torch.stack(rows)  # [T, numel(z)]
        M = gram(G)
        if self.distributed is not None:
            # data parallel: the ranks' columns of G are different samples, each rank's gradient carrying
            # world_size times its share (DDP averages the final pass), so the global Gram is their sum / W^2
            W = self.distributed.world_size
            M = self.distributed.sum_(torch.from_numpy(M).to(G.device)).cpu().numpy() / (W * W)
        if not self._checked_repr:
            self._check_overlap(M)
        gz = self.aggregate(G, losses, M)  # [numel(z)]
        # One ordinary backward pass from two roots: the summed losses give every parameter its plain-sum
        # gradient, and z an extra (combined - summed) so that z passes down the combination instead. So
        # the layers below z get the combined gradient, the towers (above z) their own task's, and the
        # paths that bypass z (MMoE's gates reading the embedding) the plain sum, as towers do.
        root = task.sum() if aux_loss is None or not aux_loss.requires_grad else task.sum() + aux_loss
        torch.autograd.backward([root, z], [torch.ones_like(root), (gz - G.sum(0)).view_as(z)])

    def _check_overlap(self, M: np.ndarray) -> None:
        """Refuse a representation read in disjoint slices by the tasks (one mixture per task): their
        gradients never meet, so there is nothing to balance there."""
        live = np.flatnonzero(np.diag(M) > 0)
        if len(live) < 2:
            return  # undecided until two tasks have a gradient
        sub = M[np.ix_(live, live)]
        if np.all(sub[~np.eye(len(live), dtype=bool)] == 0):  # exact zeros between non-zero gradients
            raise MtrecError(
                f"balancer '{self.registered_name}' with level=repr: every task reads its own slice of "
                "this model's shared representation (one mixture per task), so their gradients never "
                "meet; use level=params"
            )
        self._checked_repr = True

    def _record(self, M: np.ndarray, c: np.ndarray) -> None:
        self._last_c = c
        cos = cosines(M)
        stats = {f"weight/{name}": float(c[t]) for t, name in enumerate(self.task_names)}
        for t, name in enumerate(self.task_names):
            stats[f"grad_norm/{name}"] = float(np.sqrt(max(M[t, t], 0.0)))
        for a in range(self.num_tasks):
            for b in range(a + 1, self.num_tasks):
                stats[f"cos/{self.task_names[a]}~{self.task_names[b]}"] = float(cos[a, b])
        self._stats = stats

    def weights(self) -> dict[str, float]:
        return {name: float(self._last_c[t]) for t, name in enumerate(self.task_names)}

    def stats(self) -> dict[str, float]:
        return dict(self._stats) if self._stats else {f"weight/{k}": v for k, v in self.weights().items()}
