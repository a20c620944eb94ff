"""Staged multi-task training: tasks introduced one stage at a time, earlier ones kept.

ERNIE 2.0 (Sun et al., "ERNIE 2.0: A Continual Pre-training Framework for Language
Understanding", AAAI 2020) trains continually: each new stage adds tasks while still training
all the tasks of the earlier stages, so nothing learnt is forgotten. Here a stage is a set of
epochs during which only the tasks introduced so far contribute to the loss (the others get
weight 0).

Options: ``stages`` - stages separated by ``;``, tasks within a stage by ``+``, e.g.
``stages=income;never_married`` (income alone, then both); a stage need not repeat earlier
tasks, they are kept anyway. Default: one task per stage, in schema order. ``stage_epochs`` -
epochs per stage, one number for all or a list (the last stage runs until training ends).
``--task-weights`` weight the tasks of every stage (the tasks not yet introduced get 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import torch
from pydantic import BeforeValidator, Field, ValidationInfo, field_validator
from torch import Tensor

from mtrec.balancing.base import BALANCERS, Balancer, StepContext
from mtrec.balancing.options import TaskWeightsConfig, base_weights


def parse_stages(stages: object, task_names: Sequence[str]) -> list[list[str]]:
    """Stages as lists of newly introduced task names, checked against ``task_names``
    (``ValueError`` naming the problem otherwise)."""
    if stages is None:
        return [[name] for name in task_names]
    if isinstance(stages, str):
        raw = [[t.strip() for t in part.split("+") if t.strip()] for part in stages.split(";") if part.strip()]
    elif isinstance(stages, (list, tuple)):
        raw = [[t.strip() for t in s.split("+")] if isinstance(s, str) else [str(t) for t in s] for s in stages]
    else:
        raise ValueError(f"stages={stages!r}; write e.g. stages=income;income+never_married")
    if not raw:
        raise ValueError("stages is empty")
    for stage in raw:
        for name in stage:
            if name not in task_names:
                raise ValueError(f"stage task '{name}' is not a task; tasks: {', '.join(task_names)}")
    seen = {name for stage in raw for name in stage}
    missing = [name for name in task_names if name not in seen]
    if missing:
        raise ValueError(f"task(s) {', '.join(missing)} in no stage; add them to a stage")
    return raw


def _epochs_per_stage(value: Any, info: ValidationInfo) -> Any:
    """One number -> that many epochs for every stage but the last (which runs until the end)."""
    if isinstance(value, (list, tuple)):
        return list(value)
    stages = info.data.get("stages")
    return [value] * max(len(stages) - 1, 1) if stages else [value]


@BALANCERS.register(
    "staged", "staged continual multi-task training: tasks added stage by stage, earlier ones kept (ERNIE 2.0)"
)
class Staged(Balancer):
    """Loss mask by epoch: stage ``k`` trains every task introduced in stages ``1..k``."""

    class Config(TaskWeightsConfig):
        stages: Any = None  # "a;b+c", a list of stages (strings or lists of task names), or None: one task per stage
        stage_epochs: Annotated[list[Annotated[int, Field(ge=1)]], BeforeValidator(_epochs_per_stage)] = 1  # type: ignore[assignment]

        @field_validator("stages")
        @classmethod
        def _parse_stages(cls, stages: Any, info: ValidationInfo) -> list[list[str]]:
            return parse_stages(stages, (info.context or {}).get("task_names", []))

        @field_validator("stage_epochs")
        @classmethod
        def _one_per_stage(cls, epochs: list[int], info: ValidationInfo) -> list[int]:
            n = len(info.data.get("stages") or [])
            if n > 1 and len(epochs) not in (n - 1, n):
                raise ValueError(f"stage_epochs gives {len(epochs)} value(s) for {n} stages")
            return epochs

    config: Config

    # buffers (register_buffer), declared for the type checker
    starts: Tensor
    active: Tensor
    base: Tensor
    w: Tensor

    def __init__(self, task_names: Sequence[str], task_weights: Sequence[float] | None = None, **options: Any) -> None:
        super().__init__(task_names, task_weights, **options)
        introduced = self.config.stages
        epochs = self.config.stage_epochs
        n = len(introduced)
        starts = [1]
        for e in epochs[: n - 1]:
            starts.append(starts[-1] + e)
        active = torch.zeros(n, self.num_tasks)
        for k in range(n):
            for stage in introduced[: k + 1]:
                for name in stage:
                    active[k, self.task_names.index(name)] = 1.0
        self.stages = introduced
        self.register_buffer("starts", torch.tensor(starts))  # first epoch (1-based) of each stage
        self.register_buffer("active", active)  # [stages, T]
        self.register_buffer("base", torch.tensor(base_weights(self.config, self.num_tasks)))
        self.register_buffer("w", self.base * active[0])

    def stage_of(self, epoch: int) -> int:
        """Index of the stage that epoch ``epoch`` (1-based) belongs to."""
        return int((self.starts <= epoch).sum()) - 1 if epoch >= 1 else 0

    def combine(self, losses: Tensor, context: StepContext) -> Tensor:
        self.w.copy_(self.base * self.active[self.stage_of(context.epoch)])
        return (self.w.to(losses.dtype) * losses).sum()

    def weights(self) -> dict[str, float]:
        return dict(zip(self.task_names, self.w.tolist()))

    def stats(self) -> dict[str, float]:
        out = super().stats()
        out["stage"] = float(int((self.w > 0).sum()))  # tasks active in the current stage
        return out
