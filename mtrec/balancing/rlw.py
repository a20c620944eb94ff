"""Random loss weighting (Lin et al., "Reasonable Effectiveness of Random Weighting: A Litmus Test
for Multi-Task Learning", TMLR 2022).

At every step the weights are drawn afresh, ``w = softmax(z)`` with ``z ~ N(0, I)``: a baseline
that adaptive methods should beat. The draws come from the balancer's own generator, seeded by
the run's seed, so they do not disturb the model's random stream.

``--task-weights`` are refused rather than dropped: RLW is the baseline of weights drawn with no
preference for any task, and fixed preferences are what ``fixed`` is for.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import Tensor

from mtrec.balancing.base import BALANCERS, Balancer, StepContext
from mtrec.balancing.options import BalancerConfig


def rlw_weights(z: Tensor) -> Tensor:
    """Weights ``softmax(z)`` ``[T]`` (they sum to 1)."""
    return torch.softmax(z, dim=0)


@BALANCERS.register("rlw", "random loss weighting: softmax of normal draws every step (Lin et al. 2022)")
class RLW(Balancer):
    """RLW; option ``seed`` (default: the run's seed)."""

    class Config(BalancerConfig):
        seed: int | None = Field(None, ge=0)  # None: the run's seed

        no_task_weights: ClassVar[str] = (
            "its weights are random draws with no preference for any task (use 'fixed' for fixed weights)"
        )

    config: Config

    # buffers (register_buffer), declared for the type checker
    w: Tensor

    def __init__(self, task_names: Sequence[str], task_weights: Sequence[float] | None = None, **options: Any) -> None:
        super().__init__(task_names, task_weights, **options)
        seed = self.config.seed
        self.generator = torch.Generator().manual_seed(torch.initial_seed() if seed is None else seed)
        self.register_buffer("w", torch.full((self.num_tasks,), 1.0 / self.num_tasks))

    def draw(self) -> Tensor:
        """Draw the next step's weights."""
        z = torch.randn(self.num_tasks, generator=self.generator)
        self.w.copy_(rlw_weights(z))
        return self.w

    def combine(self, losses: Tensor, context: StepContext) -> Tensor:
        return (self.draw().to(losses.device, losses.dtype) * losses).sum()

    def weights(self) -> dict[str, float]:
        return dict(zip(self.task_names, self.w.tolist()))
