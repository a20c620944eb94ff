"""One training run as a config: data, model, balancer and training options in one validated object.

:class:`RunConfig` is what a ``mtrec bench`` grid cell is (and what ``mtrec train --config`` is meant
to read): the same options as the ``mtrec train`` flags, with the same names (``model_args`` is
``--model-args``, ``dataset_args`` is ``--dataset-args``) and every :class:`TrainConfig` field at
the top level. Unknown fields are errors that name the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from pydantic import ConfigDict, Field, ValidationError, model_validator

from mtrec.errors import MtrecError
from mtrec.schema import Schema, load_schema
from mtrec.train.options import TrainConfig

if TYPE_CHECKING:  # pragma: no cover
    from mtrec.train.run import RunResult


class RunConfig(TrainConfig):
    """Everything one ``mtrec train`` run takes: exactly one of ``dataset`` (an embedded data set, with
    ``dataset_args``) or ``schema`` (a schema file); the model and its options; the balancer, its
    options and the task weights; the training options of :class:`TrainConfig` (``seed`` included)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, protected_namespaces=())

    dataset: Optional[str] = None
    dataset_args: dict[str, Any] = Field(default_factory=dict)
    schema_file: Optional[Path] = Field(None, alias="schema")
    model: str
    model_args: dict[str, Any] = Field(default_factory=dict)
    balancer: str = "fixed"
    balancer_args: dict[str, Any] = Field(default_factory=dict)
    task_weights: Optional[list[float]] = None
    tensorboard: bool = True  # write OUT/tensorboard (per-step curves); bench grids usually turn it off

    @model_validator(mode="after")
    def _one_source(self) -> "RunConfig":
        if (self.dataset is None) == (self.schema_file is None):
            raise ValueError("give exactly one of 'dataset' (an embedded data set) or 'schema' (a schema file)")
        if self.dataset_args and self.dataset is None:
            raise ValueError("'dataset_args' goes with 'dataset' (a schema file has no arguments)")
        return self

    def train_config(self) -> TrainConfig:
        """The :class:`TrainConfig` part."""
        return TrainConfig(**{k: getattr(self, k) for k in TrainConfig.model_fields})

    def resolve_schema(self) -> Schema:
        """The data set's schema (an embedded one is generated first when it takes arguments)."""
        if self.schema_file is not None:
            return load_schema(self.schema_file)
        from mtrec.datasets import dataset_schema_path

        return load_schema(dataset_schema_path(self.dataset, self.dataset_args or None))

    def to_json(self) -> dict:
        """Plain JSON, with ``schema`` under its own name (readable back by :func:`run_config`)."""
        return self.model_dump(mode="json", by_alias=True)


def validation_message(err: ValidationError, where: str) -> str:
    """A pydantic error as one line naming each bad field (``where``: the file or flag it came from)."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        msg = "unknown field" if e["type"] == "extra_forbidden" else e["msg"]
        parts.append(f"{loc}: {msg}")
    return f"{where}: " + "; ".join(parts)


def run_config(data: Any, where: str = "run config") -> RunConfig:
    """Validate ``data`` (a mapping) as a :class:`RunConfig`; a mistake is a :class:`MtrecError` naming the field."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise MtrecError(validation_message(err, where)) from None


def train_from_config(config: RunConfig, out: Optional[Path], schema: Optional[Schema] = None) -> "RunResult":
    """Train the run ``config`` describes into ``out`` (``schema``: the already resolved schema, if at hand)."""
    from mtrec.train.run import train_run

    return train_run(
        schema if schema is not None else config.resolve_schema(),
        config.model,
        out,
        config.train_config(),
        model_options=config.model_args,
        balancer_name=config.balancer,
        balancer_options=config.balancer_args,
        task_weights=config.task_weights,
        tensorboard=config.tensorboard,
    )
