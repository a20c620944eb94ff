"""Dynamic weight averaging (Liu, Johns and Davison, "End-to-End Multi-Task Learning with
Attention", CVPR 2019).

A task whose loss fell little over the last epoch gets more weight in the next one:

    w_t = T exp(r_t / temperature) / sum_j exp(r_j / temperature),   r_t = L_t(e-1) / L_t(e-2)

with ``L_t(e)`` the mean training loss of task ``t`` in epoch ``e``; the first two epochs use
``w = 1``. Larger temperatures flatten the weights towards 1.

``--task-weights`` ``b_t`` are used: the combined loss is ``sum_t w_t b_t L_t``, i.e. DWA run on
the weighted losses ``b_t L_t``. That is exact, not an add-on: the loss ratio ``r_t`` is unchanged
when a task's loss is multiplied by a constant, so DWA's weights on ``b_t L_t`` are its weights on
``L_t``. In the first two epochs (no history yet) the weights are ``b``, as with ``fixed``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pydantic import Field
from torch import Tensor

from mtrec.balancing.base import BALANCERS, Balancer, StepContext
from mtrec.balancing.options import TaskWeightsConfig, base_weights


def dwa_weights(last: Tensor, before_last: Tensor, temperature: float) -> Tensor:
    """``[T]`` DWA weights from the mean losses of the last two epochs."""
    ratio = last / before_last.clamp_min(1e-12)
    return last.numel() * torch.softmax(ratio / temperature, dim=0)


@BALANCERS.register(
    "dwa", "dynamic weight averaging: weight by each task's loss ratio over the last two epochs (Liu et al. 2019)"
)
class DWA(Balancer):
    """DWA with ``temperature`` (default 2, the paper's value)."""

    class Config(TaskWeightsConfig):
        temperature: float = Field(2.0, gt=0.0, allow_inf_nan=False)

    config: Config

    # buffers (register_buffer), declared for the type checker
    base: Tensor
    history: Tensor
    epochs_seen: Tensor
    w: Tensor

    def __init__(self, task_names: Sequence[str], task_weights: Sequence[float] | None = None, **options: Any) -> None:
        super().__init__(task_names, task_weights, **options)
        self.temperature = self.config.temperature
        self.register_buffer("base", torch.tensor(base_weights(self.config, self.num_tasks)))  # --task-weights
        self.register_buffer("history", torch.zeros(2, self.num_tasks))  # [before last, last] epoch losses
        self.register_buffer("epochs_seen", torch.tensor(0))
        self.register_buffer("w", torch.ones(self.num_tasks))

    def on_epoch_end(self, epoch: int, train_losses: Tensor) -> None:
        self.history[0] = self.history[1].clone()
        self.history[1] = train_losses.detach().to(self.history.dtype)
        self.epochs_seen += 1
        if int(self.epochs_seen) >= 2:
            self.w.copy_(dwa_weights(self.history[1], self.history[0], self.temperature))

    def combine(self, losses: Tensor, context: StepContext) -> Tensor:
        return ((self.w * self.base).to(losses.dtype) * losses).sum()

    def weights(self) -> dict[str, float]:
        return dict(zip(self.task_names, (self.w * self.base).tolist()))
