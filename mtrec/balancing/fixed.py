"""Fixed task weights: the plain weighted sum of task losses."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mtrec.balancing.base import BALANCERS, Balancer, StepContext
from mtrec.balancing.options import TaskWeightsConfig, base_weights


@BALANCERS.register("fixed", "fixed weights from --task-weights (default: all 1)")
class Fixed(Balancer):
    """L = sum_t w_t * L_t with constant w (``--task-weights``: finite, not negative, not all 0)."""

    class Config(TaskWeightsConfig):
        pass

    config: Config

    # buffers (register_buffer), declared for the type checker
    w: Tensor

    def __init__(self, task_names: Sequence[str], task_weights: Sequence[float] | None = None, **options: Any) -> None:
        super().__init__(task_names, task_weights, **options)
        self.register_buffer("w", torch.tensor(base_weights(self.config, self.num_tasks)))

    def combine(self, losses: Tensor, context: StepContext) -> Tensor:
        return (self.w * losses).sum()

    def weights(self) -> dict[str, float]:
        return dict(zip(self.task_names, self.w.tolist()))
