"""One training run as a config: data, model, balancer and training options in one validated object.

:class:`RunConfig` is what a ``mtrec bench`` grid cell is and what ``mtrec train --config FILE`` reads
(:func:`build_run_config`; a finished run's ``config.json`` records one as ``run_config``): the same options as the ``mtrec train`` flags, with the same names (``model_args`` is
``--model-args``, ``dataset_args`` is ``--dataset-args``) and every :class:`TrainConfig` field at
the top level. Unknown fields are errors that name the field. The fields' defaults and descriptions
are the ``mtrec train`` flags' defaults and help text (defined here only).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from mtrec.errors import MtrecError
from mtrec.files import read_yaml
from mtrec.schema import Schema, load_schema, schema_from_dict
from mtrec.train.options import TrainConfig

if TYPE_CHECKING:  # pragma: no cover
    from mtrec.train.run import RunResult


def check_one_source(dataset: str | None, schema: Any, dataset_args: dict) -> None:
    """A run or a grid's data set reads exactly one of an embedded data set (with its arguments) or a schema."""
    if (dataset is None) == (schema is None):
        raise ValueError("give exactly one of 'dataset' (an embedded data set) or 'schema' (a schema file)")
    if dataset_args and dataset is None:
        raise ValueError("'dataset_args' goes with 'dataset' (a schema file has no arguments)")


class RunConfig(TrainConfig):
    """Everything one ``mtrec train`` run takes: exactly one of ``dataset`` (an embedded data set, with
    ``dataset_args``) or ``schema`` (a schema file); the model and its options; the balancer, its
    options and the task weights; the training options of :class:`TrainConfig` (``seed`` included)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, protected_namespaces=())

    dataset: str | None = Field(None, description="embedded data set name, e.g. census (or give 'schema')")
    dataset_args: dict[str, Any] = Field(
        default_factory=dict, description="arguments of the embedded data set, e.g. correlation=0.5,rows=20000,seed=0"
    )
    # a schema file, or the schema itself inline (a finished run's config.json records it inline)
    schema_file: Path | dict[str, Any] | None = Field(
        None, alias="schema", description="data set schema file (YAML), or the schema inline in a config file"
    )
    data_dir: Path | None = Field(
        None,
        description="folder the schema's relative data paths (source, join) resolve under (default: the "
        "schema's own data_dir, a small sample)",
    )
    model: str = Field(description="registered model name (see `mtrec models`)")
    model_args: dict[str, Any] = Field(
        default_factory=dict, description="model options, e.g. num_experts=4,expert_hidden=[64,32]"
    )
    balancer: str = Field("fixed", description="loss balancing strategy (see `mtrec balancers`)")
    balancer_args: dict[str, Any] = Field(default_factory=dict, description="balancer options k=v,...")
    task_weights: list[float] | None = Field(
        None, description="task weights in task order (refused by balancers that have no use for them)"
    )
    # bench grids usually turn the per-step curves off
    tensorboard: bool = Field(True, description="write loss and balancer curves to OUT/tensorboard")
    # where a relative schema path (or an inline schema's relative data paths) is resolved: the config
    # file's folder; None: the working directory
    _base_dir: Path | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _one_source(self) -> RunConfig:
        check_one_source(self.dataset, self.schema_file, self.dataset_args)
        if self.data_dir is not None and not isinstance(self.schema_file, Path):
            raise ValueError(
                "'data_dir' (--data-dir) goes with a schema file (it is where the schema's data files are)"
            )
        return self

    def train_config(self) -> TrainConfig:
        """The :class:`TrainConfig` part."""
        return TrainConfig(**{k: getattr(self, k) for k in TrainConfig.model_fields})

    def resolve_schema(self) -> Schema:
        """The data set's schema (an embedded one is generated first when it takes arguments)."""
        if isinstance(self.schema_file, dict):
            return schema_from_dict(self.schema_file, "run config: schema", base_dir=self._base_dir or Path.cwd())
        if self.schema_file is not None:
            path = self.schema_file
            data_dir = self.data_dir
            if data_dir is not None and not data_dir.is_absolute() and self._base_dir is not None:
                data_dir = self._base_dir / data_dir  # relative to the config file, as the schema path is
            return load_schema(
                path if path.is_absolute() or self._base_dir is None else self._base_dir / path, data_dir=data_dir
            )
        from mtrec.datasets import dataset_schema_path

        assert self.dataset is not None  # check_one_source: a data set when there is no schema
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


def read_run_config(path: Path) -> dict:
    """The mapping a run config file holds: YAML, or JSON when named ``.json``. A finished run's
    ``config.json`` gives the run config it records (``run_config``), so rerunning it reproduces the run."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        if not path.is_file():
            raise MtrecError(f"{path}: run config file not found")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise MtrecError(f"{path}: not valid JSON ({err})") from None
    else:
        data = read_yaml(path, "run config file")
    if not isinstance(data, dict):
        raise MtrecError(f"{path}: a run config is a mapping (model, schema or dataset, training options, ...)")
    if "run_format" in data:  # a run directory's config.json
        if not isinstance(data.get("run_config"), dict):
            raise MtrecError(
                f"{path}: this run's config.json records no run_config (written by mtrec "
                f"{data.get('mtrec_version', '?')}); train it again, or write a run config file"
            )
        data = data["run_config"]
    return data


def field_flag(field: str) -> str:
    """The ``mtrec train`` flag of a :class:`RunConfig` field (``schema_file`` -> ``--schema``)."""
    info = RunConfig.model_fields.get(field)
    name = info.alias if info is not None and info.alias else field
    return "--" + name.replace("_", "-")


def build_run_config(file: Path | None, overrides: dict[str, Any]) -> RunConfig:
    """The :class:`RunConfig` of ``file`` (a run config file, or None) with ``overrides`` (field name or
    alias -> value, e.g. the flags given on the command line) replacing its values. A data source given in
    ``overrides`` (``schema`` or ``dataset``) replaces the file's whole source. A mistake is one
    :class:`MtrecError` naming the flag (for an override) or the file and field."""
    data: dict[str, Any] = dict(read_run_config(file)) if file is not None else {}
    own_source = not ({"schema", "dataset"} & set(overrides))
    if not own_source:
        for key in ("schema", "dataset", "dataset_args"):
            data.pop(key, None)
    data.update(overrides)
    try:
        config = RunConfig.model_validate(data)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            key = str(e["loc"][0]) if e["loc"] else ""
            msg = e["msg"].removeprefix("Value error, ")
            if key in overrides:
                problems.append(f"{field_flag(key)}: {overrides[key]!r} is not allowed ({msg.lower()})")
            elif e["type"] == "missing" and file is None:
                problems.append(f"{field_flag(key)}: missing (give it, or a --config file that sets '{key}')")
            elif file is not None:
                loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
                problems.append(f"{file}: {loc}: {'unknown field' if e['type'] == 'extra_forbidden' else msg}")
            else:
                problems.append(msg)
        raise MtrecError("; ".join(problems)) from None
    if file is not None and own_source:
        config._base_dir = Path(file).resolve().parent  # a relative schema path is relative to the file
    return config


def train_from_config(
    config: RunConfig, out: Path | None, schema: Schema | None = None, **run_options: Any
) -> RunResult:
    """Train the run ``config`` describes into ``out`` (``schema``: the already resolved schema, if at hand;
    ``run_options``: what is not part of the run itself, e.g. ``overwrite``, ``resume``, ``threads``)."""
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
        **run_options,
    )
