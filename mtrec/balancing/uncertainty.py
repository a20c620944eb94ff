"""Uncertainty weighting (Kendall, Gal and Cipolla, "Multi-Task Learning Using Uncertainty to Weigh
Losses for Scene Geometry and Semantics", CVPR 2018).

Each task gets a learnable homoscedastic noise ``sigma_t``, stored as ``s_t = log sigma_t^2`` (the
paper's numerically stable form). The combined loss is the negative log-likelihood

- regression (Gaussian likelihood, squared error):  ``L_t / (2 sigma_t^2) + log sigma_t = exp(-s_t) L_t / 2 + s_t / 2``
- classification (scaled softmax/sigmoid):           ``L_t / sigma_t^2 + log sigma_t = exp(-s_t) L_t + s_t / 2``

so noisy tasks are down-weighted, and at the optimum ``sigma_t^2`` equals the task's mean squared
error (regression) or twice its loss (classification). The form of each task follows its type
(``form=auto``), or is forced with ``form=regression|classification``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mtrec.balancing.base import BALANCERS, Balancer, StepContext
from mtrec.balancing.options import TaskWeightsConfig, base_weights
from mtrec.models.base import MultiTaskModel


@BALANCERS.register("uw", "uncertainty weighting: learnable log-variance per task (Kendall et al. 2018)")
class UncertaintyWeighting(Balancer):
    """Kendall et al.'s weighting; ``--task-weights`` multiply the task losses first."""

    class Config(TaskWeightsConfig):
        form: Literal["auto", "regression", "classification"] = "auto"

    config: Config

    # buffers (register_buffer), declared for the type checker
    base: Tensor
    factor: Tensor

    def __init__(self, task_names: Sequence[str], task_weights: Sequence[float] | None = None, **options: Any) -> None:
        super().__init__(task_names, task_weights, **options)
        self.form = self.config.form
        self.log_var = nn.Parameter(torch.zeros(self.num_tasks))  # s_t = log sigma_t^2
        self.register_buffer("base", torch.tensor(base_weights(self.config, self.num_tasks)))
        # 1 for the classification form, 1/2 for the regression form
        self.register_buffer("factor", torch.ones(self.num_tasks) * (0.5 if self.form == "regression" else 1.0))

    def combine(self, losses: Tensor, context: StepContext) -> Tensor:
        if self.form == "auto":
            if isinstance(context.model, MultiTaskModel):  # a bare network (tests) keeps the classification form
                binary = context.model.is_binary.to(self.factor.device)
                self.factor.copy_(torch.where(binary, 1.0, 0.5))
        precision = torch.exp(-self.log_var)
        return (self.factor * precision * self.base * losses).sum() + 0.5 * self.log_var.sum()

    def variances(self) -> dict[str, float]:
        """Learned ``sigma_t^2`` per task."""
        return dict(zip(self.task_names, self.log_var.detach().exp().tolist()))

    def weights(self) -> dict[str, float]:
        w = (self.factor * torch.exp(-self.log_var.detach()) * self.base).tolist()
        return dict(zip(self.task_names, w))

    def stats(self) -> dict[str, float]:
        out = {f"weight/{k}": v for k, v in self.weights().items()}
        out.update({f"sigma2/{k}": v for k, v in self.variances().items()})
        return out
