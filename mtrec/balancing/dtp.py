"""Dynamic task prioritisation (Guo, Haque, Huang, Yeung and Fei-Fei, "Dynamic Task Prioritization
for Multitask Learning", ECCV 2018), task level.

Each task has a key performance indicator ``kappa_t`` in ``[0, 1]``, smoothed by an exponential
moving average ``kappa_bar_t <- alpha kappa_t + (1 - alpha) kappa_bar_t``, and a focal weight

    w_t = -(1 - kappa_bar_t)^gamma_t log(kappa_bar_t)

so tasks that are already good (high KPI) are down-weighted and difficult tasks come first.
The balancer only sees the batch losses, so the KPI here is ``kappa_t = exp(-L_t)``: for a
binary task the geometric mean of the probability given to the true labels, for a regression
task a decreasing function of its squared error.

``--task-weights`` are refused rather than dropped: the method's per-task knob is ``gamma`` (a
larger focusing exponent lowers the weight of a task once it does well), and a constant factor
on top of the focal weights would be a second, competing prioritisation that the paper does not
define.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import Tensor

from mtrec.balancing.base import BALANCERS, Balancer, StepContext
from mtrec.balancing.options import BalancerConfig, per_task


def dtp_weights(kpi: Tensor, gamma: Tensor) -> Tensor:
    """Focal task weights ``-(1 - kpi)^gamma log(kpi)`` ``[T]``."""
    kpi = kpi.clamp(1e-12, 1.0)
    return -((1 - kpi) ** gamma) * torch.log(kpi)


@BALANCERS.register("dtp", "dynamic task prioritisation: focal weight from a running per-task KPI (Guo et al. 2018)")
class DTP(Balancer):
    """DTP with focusing ``gamma`` (scalar or one per task, default 1) and KPI smoothing ``alpha`` (default 0.1)."""

    class Config(BalancerConfig):
        gamma: per_task(ge=0.0) = 1.0  # type: ignore[valid-type]
        alpha: float = Field(0.1, gt=0.0, le=1.0, allow_inf_nan=False)

        no_task_weights: ClassVar[str] = (
            "its per-task knob is gamma (e.g. gamma=[2,1]), which sets how fast a task that does well loses weight"
        )

    config: Config

    # buffers (register_buffer), declared for the type checker
    gamma: Tensor
    kpi: Tensor
    started: Tensor
    w: Tensor

    def __init__(self, task_names: Sequence[str], task_weights: Sequence[float] | None = None, **options: Any) -> None:
        super().__init__(task_names, task_weights, **options)
        self.register_buffer("gamma", torch.tensor(self.config.gamma))
        self.alpha = self.config.alpha
        self.register_buffer("kpi", torch.ones(self.num_tasks))
        self.register_buffer("started", torch.tensor(False))
        self.register_buffer("w", torch.zeros(self.num_tasks))

    def update(self, losses: Tensor) -> Tensor:
        """Fold a step's losses into the running KPI; return the new weights."""
        kpi = torch.exp(-losses.detach().to(self.kpi.dtype))
        if bool(self.started):
            self.kpi.mul_(1 - self.alpha).add_(self.alpha * kpi)
        else:
            self.kpi.copy_(kpi)
            self.started.fill_(True)
        self.w.copy_(dtp_weights(self.kpi, self.gamma))
        return self.w

    def combine(self, losses: Tensor, context: StepContext) -> Tensor:
        return (self.update(losses).to(losses.dtype) * losses).sum()

    def weights(self) -> dict[str, float]:
        return dict(zip(self.task_names, self.w.tolist()))

    def stats(self) -> dict[str, float]:
        out = super().stats()
        out.update({f"kpi/{k}": v for k, v in zip(self.task_names, self.kpi.tolist())})
        return out
