"""The loss-weight schedule of the PLE paper (Tang, Liu, Zhao and Gong, "Progressive Layered
Extraction (PLE)", RecSys 2020, section 4.3).

Each task's weight starts at ``initial_t`` and is multiplied by an update ratio ``ratio_t`` at
every step (or epoch): ``w_t(k) = initial_t * ratio_t^k``. A ratio below 1 lets a task lead early
and fade later (or the reverse above 1). The defaults (``initial`` from ``--task-weights`` or 1,
``ratio`` 1) leave the weights constant; set them per task, e.g. ``ratio=[1.0,0.999]``.
``--task-weights`` are the initial weights when ``initial`` is not given; giving both is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import model_validator
from torch import Tensor

from mtrec.balancing.base import BALANCERS, Balancer, StepContext
from mtrec.balancing.options import TaskWeightsConfig, base_weights, per_task


def ple_weights(initial: Tensor, ratio: Tensor, k: int) -> Tensor:
    """``initial * ratio ** k`` ``[T]``."""
    return initial * ratio**k


@BALANCERS.register(
    "ple_schedule", "PLE paper's schedule: initial weight times an update ratio per step (Tang et al. 2020)"
)
class PLESchedule(Balancer):
    """Options ``initial`` and ``ratio`` (scalar or one per task) and ``per`` (``step``, default, or ``epoch``)."""

    class Config(TaskWeightsConfig):
        initial: per_task(ge=0.0) | None = None  # type: ignore[valid-type]  # default: --task-weights or 1
        ratio: per_task(gt=0.0) = 1.0  # type: ignore[valid-type]
        per: Literal["step", "epoch"] = "step"

        @model_validator(mode="after")
        def _one_start(self) -> PLESchedule.Config:
            if self.initial is not None and self.task_weights is not None:
                raise ValueError("initial and --task-weights both set the initial weights; give one")
            return self

    config: Config

    # buffers (register_buffer), declared for the type checker
    initial: Tensor
    ratio: Tensor
    w: Tensor

    def __init__(self, task_names: Sequence[str], task_weights: Sequence[float] | None = None, **options: Any) -> None:
        super().__init__(task_names, task_weights, **options)
        c = self.config
        start = base_weights(c, self.num_tasks) if c.initial is None else c.initial
        self.register_buffer("initial", torch.tensor(start, dtype=torch.float64))
        self.register_buffer("ratio", torch.tensor(c.ratio, dtype=torch.float64))
        self.per = c.per
        self.register_buffer("w", self.initial.clone())

    def combine(self, losses: Tensor, context: StepContext) -> Tensor:
        k = context.step if self.per == "step" else max(context.epoch - 1, 0)
        self.w.copy_(ple_weights(self.initial, self.ratio, k))
        return (self.w.to(losses.dtype) * losses).sum()

    def weights(self) -> dict[str, float]:
        return dict(zip(self.task_names, self.w.tolist()))
