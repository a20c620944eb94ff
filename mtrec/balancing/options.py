"""The pieces every balancer's pydantic ``Config`` is built from.

Options arrive from ``--balancer-args`` (values parsed as YAML) and ``--task-weights``; they are
validated against the task names (passed as pydantic's validation context), so a per-task option
is a list of the right length, or a scalar meaning the same value for every task, or a mapping
``{task: value}`` naming every task. Numbers must be finite.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator


class BalancerConfig(BaseModel):
    """Options common to all balancers (none); each balancer's ``Config`` adds its own.

    A balancer that has no use for ``--task-weights`` says why in ``no_task_weights``: the text
    ends the error a user gets for giving them.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    no_task_weights: ClassVar[str] = "this method has no use for them"


def _task_names(info: ValidationInfo) -> list[str]:
    names = (info.context or {}).get("task_names")
    if names is None:  # a programming error: configs are validated through validate_balancer_options
        raise ValueError(f"{info.field_name}: the task names are needed to check a per-task option")
    return list(names)


def _expand_per_task(value: Any, info: ValidationInfo) -> Any:
    """A scalar -> one copy per task; a mapping -> a list in task order; a list -> checked for length."""
    names = _task_names(info)
    field = info.field_name
    if isinstance(value, dict):
        unknown = [str(k) for k in value if k not in names]
        if unknown:
            raise ValueError(f"{field} names {', '.join(unknown)}, not a task; tasks: {', '.join(names)}")
        missing = [n for n in names if n not in value]
        if missing:
            raise ValueError(f"{field} gives no value for task(s) {', '.join(missing)}; tasks: {', '.join(names)}")
        return [value[n] for n in names]
    if isinstance(value, (list, tuple)):
        if len(value) != len(names):
            raise ValueError(f"{field} gives {len(value)} value(s) for {len(names)} tasks ({', '.join(names)})")
        return list(value)
    return [value] * len(names)


def per_task(**bounds: float) -> Any:
    """Type of a per-task number option: finite floats within ``bounds`` (``ge``, ``gt``, ``le``, ``lt``),
    one per task in task order."""
    return Annotated[list[Annotated[float, Field(allow_inf_nan=False, **bounds)]], BeforeValidator(_expand_per_task)]


class TaskWeightsConfig(BalancerConfig):
    """Adds ``task_weights`` (``--task-weights``): finite, non-negative, one per task, not all zero."""

    task_weights: per_task(ge=0.0) | None = None  # type: ignore[valid-type]

    @field_validator("task_weights")
    @classmethod
    def _not_all_zero(cls, weights: list[float] | None) -> list[float] | None:
        if weights is not None and not any(w > 0 for w in weights):
            raise ValueError("task_weights are all 0: no task would train")
        return weights


def base_weights(config: BalancerConfig, num_tasks: int) -> list[float]:
    """The config's ``task_weights``, or 1 for every task when it has none."""
    weights = getattr(config, "task_weights", None)
    return list(weights) if weights is not None else [1.0] * num_tasks
