"""GradNorm (Chen et al., "GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep
Multitask Networks", ICML 2018).

Task weights ``w_t`` are learned so that the gradient norms of the weighted losses on the last
shared layer ``W``, ``G_t = ||grad_W w_t L_t||``, approach a common scale set by each task's
training rate:

    L_grad = sum_t | G_t - mean(G) * r_t^alpha |,   r_t = (L_t / L_t(0)) / mean_j (L_j / L_j(0))

with the target treated as a constant, so ``dL_grad/dw_t = sign(G_t - target_t) ||grad_W L_t||``.
Tasks that train slowly (large ``r_t``) get larger gradients; ``alpha`` sets how strongly. The
weights are renormalised to sum to ``T`` before every step, so each step uses weights summing to
``T``; they are stepped by the trainer's optimiser along with the model, as in the paper.

``W`` is the shared part of the last shared layer the model declares (``model.last_shared_slices()``:
MMoE's experts' output layer, the shared experts' members of PLE's last level, the CTR tower's output
unit in ESMM, ...), never the embeddings: the norms must be measured where every task's gradient
passes. A model that shares only its embedding tables is refused.
Cost: ``T`` backward passes down to ``W`` only, plus the ordinary backward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from mtrec.balancing.base import BALANCERS, Balancer, StepContext
from mtrec.balancing.options import TaskWeightsConfig, base_weights
from mtrec.errors import MtrecError


def models_with_shared_layer(layout) -> list[str]:
    """Registered models that declare a shared layer when built on ``layout`` (for an error message)."""
    from mtrec.models import MODELS, build_model

    names = []
    for name in MODELS.names():
        try:
            if build_model(name, layout).last_shared_slices():
                names.append(name)
        except MtrecError:  # e.g. a funnel model on a layout without a funnel
            continue
    return names


MIN_WEIGHT = 1e-4  # a weight is never allowed to reach zero (or go negative) between renormalisations


@BALANCERS.register(
    "gradnorm", "GradNorm: weights that equalise gradient norms on the last shared layer (Chen et al. 2018)"
)
class GradNorm(Balancer):
    """GradNorm with asymmetry ``alpha`` (default 1.5); initial weights from ``--task-weights``."""

    class Config(TaskWeightsConfig):
        alpha: float = Field(1.5, ge=0.0, allow_inf_nan=False)

    config: Config

    # buffers (register_buffer), declared for the type checker
    initial: Tensor
    started: Tensor

    def __init__(self, task_names: Sequence[str], task_weights: Sequence[float] | None = None, **options: Any) -> None:
        super().__init__(task_names, task_weights, **options)
        self.alpha = self.config.alpha
        start = torch.tensor(base_weights(self.config, self.num_tasks))  # the config refuses all zeros
        self.w = nn.Parameter(start * self.num_tasks / start.sum())
        self.register_buffer("initial", torch.zeros(self.num_tasks))
        self.register_buffer("started", torch.tensor(False))
        self._stats: dict[str, float] = {}

    def normalised(self) -> Tensor:
        w = self.w.detach().clamp_min(MIN_WEIGHT)
        return w * self.num_tasks / w.sum()

    def combine(self, losses: Tensor, context: StepContext) -> Tensor:
        return (self.normalised().to(losses.dtype) * losses).sum()

    def backward(self, losses: Tensor, context: StepContext, aux_loss: Tensor | None = None) -> Tensor:
        layer = [s for s in context.model.last_shared_slices() if s.param.requires_grad]
        if not layer:
            raise MtrecError(
                f"gradnorm measures gradient norms on the last shared layer; model "
                f"'{context.model.model_name()}' shares only its "
                f"embedding tables. Models with a shared layer: {', '.join(models_with_shared_layer(context.model.layout))}"
            )
        with torch.no_grad():
            self.w.copy_(self.normalised())
            if not bool(self.started):
                self.initial.copy_(losses.detach())
                self.started.fill_(True)
        norms = []
        for t in range(self.num_tasks):
            grads = torch.autograd.grad(losses[t], [s.param for s in layer], retain_graph=True, allow_unused=True)
            sq = sum(((s.take(g).float() ** 2).sum() for g, s in zip(grads, layer) if g is not None), torch.zeros(()))
            norms.append(sq.sqrt())
        norm = torch.stack(norms).to(self.w.dtype)  # [T] ||grad_W L_t||
        w = self.w.detach()
        G = w * norm  # [T] ||grad_W w_t L_t||
        ratio = losses.detach().to(w.dtype) / self.initial.clamp_min(1e-12)
        target = G.mean() * (ratio / ratio.mean()) ** self.alpha
        self.w.grad = torch.sign(G - target) * norm  # d L_grad / d w_t, target held constant
        total = (w.to(losses.dtype) * losses).sum()
        if aux_loss is not None:
            total = total + aux_loss
        total.backward()
        self._stats = {}
        for t, name in enumerate(self.task_names):
            self._stats[f"weight/{name}"] = float(w[t])
            self._stats[f"grad_norm/{name}"] = float(G[t])
            self._stats[f"target/{name}"] = float(target[t])
        return total.detach()

    def weights(self) -> dict[str, float]:
        return dict(zip(self.task_names, self.normalised().tolist()))

    def stats(self) -> dict[str, float]:
        return dict(self._stats) if self._stats else super().stats()
