"""FAMO: fast adaptive multitask optimisation (Liu, Feng, Stone and Liu, NeurIPS 2023).

FAMO aims to decrease every task's *log* loss at the same rate using only loss values (no
per-task gradients, so ``O(1)`` extra cost). Task logits ``xi`` give weights ``z = softmax(xi)``;
the model descends

    sum_t z_t log(L_t - L_t*) / c,   c = sum_t z_t / (L_t - L_t*)   (c held constant),

i.e. the task gradients weighted by ``z_t / (c (L_t - L_t*))`` (these weights sum to 1). After the
step the logits move against the observed decrease of the log losses,
``delta_t = log(L_t - L_t*)_before - log(L_t - L_t*)_after``, along the softmax Jacobian:
``grad_xi = J_softmax(xi)^T delta = z * (delta - z . delta)``, plus weight decay ``gamma xi``,
with Adam (learning rate ``lr``), as in the paper's practical algorithm. Tasks whose loss fell
less than the others' gain weight.

The paper measures "after" on the same batch with an extra forward pass. This balancer only
sees one forward pass per step, so it uses the next batch's losses: free, but noisier (the
logits' Adam and small learning rate average the batch noise out).

``--task-weights`` are refused rather than dropped: FAMO descends the *log* losses, and
``log(w_t L_t) = log w_t + log L_t`` has the same gradient as ``log L_t``, so a constant factor on
a task's loss cannot shift the balance between tasks (it only rescales the whole update through
``c``); the task weights ``z`` are what FAMO learns.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import Tensor

from mtrec.balancing.base import BALANCERS, Balancer, StepContext
from mtrec.balancing.options import BalancerConfig, per_task

EPS = 1e-8
BETAS = (0.9, 0.999)  # Adam's defaults for the logits


def famo_logit_gradient(logits: Tensor, delta: Tensor) -> Tensor:
    """``J_softmax(logits)^T delta`` ``[T]``: the logits' gradient for an observed log-loss decrease ``delta``."""
    z = torch.softmax(logits, dim=0)
    return z * (delta - (z * delta).sum())


@BALANCERS.register("famo", "FAMO: balance the decrease rate of log losses from loss values alone (Liu et al. 2023)")
class FAMO(Balancer):
    """FAMO with logit learning rate ``lr`` (default 0.025), ``gamma`` (weight decay, default 0.001)
    and ``min_losses`` (lower bounds ``L*``, default 0)."""

    class Config(BalancerConfig):
        lr: float = Field(0.025, gt=0.0, allow_inf_nan=False)
        gamma: float = Field(1e-3, ge=0.0, allow_inf_nan=False)
        min_losses: per_task() = 0.0  # type: ignore[valid-type]

        no_task_weights: ClassVar[str] = (
            "it descends the log of each loss, where a constant factor cannot "
            "shift the balance between tasks; the task weights are what it learns"
        )

    config: Config

    # buffers (register_buffer), declared for the type checker
    min_losses: Tensor
    logits: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    previous: Tensor
    w: Tensor
    adam_steps: Tensor
    has_previous: Tensor

    def __init__(self, task_names: Sequence[str], task_weights: Sequence[float] | None = None, **options: Any) -> None:
        super().__init__(task_names, task_weights, **options)
        self.lr = self.config.lr
        self.gamma = self.config.gamma
        self.register_buffer("min_losses", torch.tensor(self.config.min_losses))
        T = self.num_tasks
        for name in ("logits", "exp_avg", "exp_avg_sq", "previous", "w"):
            self.register_buffer(name, torch.zeros(T))
        self.register_buffer("adam_steps", torch.tensor(0))
        self.register_buffer("has_previous", torch.tensor(False))
        self.w.fill_(1.0 / T)

    def log_gap(self, losses: Tensor) -> Tensor:
        return torch.log((losses - self.min_losses.to(losses.dtype)).clamp_min(0) + EPS)

    def update_logits(self, before: Tensor, after: Tensor) -> None:
        """One Adam step of the logits from the losses before and after a model update."""
        delta = self.log_gap(before) - self.log_gap(after)
        grad = famo_logit_gradient(self.logits, delta) + self.gamma * self.logits
        self.adam_steps += 1
        k = int(self.adam_steps)
        self.exp_avg.mul_(BETAS[0]).add_((1 - BETAS[0]) * grad)
        self.exp_avg_sq.mul_(BETAS[1]).add_((1 - BETAS[1]) * grad**2)
        m_hat = self.exp_avg / (1 - BETAS[0] ** k)
        v_hat = self.exp_avg_sq / (1 - BETAS[1] ** k)
        self.logits.sub_(self.lr * m_hat / (v_hat.sqrt() + EPS))

    def combine(self, losses: Tensor, context: StepContext) -> Tensor:
        current = losses.detach().to(self.previous.dtype)
        if bool(self.has_previous):
            self.update_logits(self.previous, current)
        z = torch.softmax(self.logits, dim=0).to(losses.dtype)
        gap = (losses - self.min_losses.to(losses.dtype)).clamp_min(0) + EPS  # [T]
        c = (z / gap.detach()).sum()
        self.w.copy_((z / (c * gap.detach())).detach())
        self.previous.copy_(current)
        self.has_previous.fill_(True)
        return (z / c * torch.log(gap)).sum()

    def weights(self) -> dict[str, float]:
        return dict(zip(self.task_names, self.w.tolist()))

    def stats(self) -> dict[str, float]:
        out = super().stats()
        z = torch.softmax(self.logits, dim=0).tolist()
        out.update({f"z/{k}": v for k, v in zip(self.task_names, z)})
        return out
