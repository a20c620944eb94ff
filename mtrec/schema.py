"""Dataset schema: where the data lives, how to read it, its features and tasks.

A schema is a YAML (or JSON) file validated with pydantic. Paths in ``source``
are relative to the schema file unless absolute. Every validation problem is
reported as one :class:`~mtrec.errors.MtrecError` line naming the file and the
field.
"""

from __future__ import annotations

import hashlib
import json
import math
import types
import typing
from pathlib import Path
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mtrec.errors import MtrecError
from mtrec.files import read_yaml

Scalar = str | int | float | bool


class _Strict(BaseModel):
    # Unknown keys are typos more often than not: reject them.
    model_config = ConfigDict(extra="forbid")


class SourceSpec(_Strict):
    """Data files. ``test``/``valid`` are optional; missing splits are carved from ``train``."""

    train: str
    valid: str | None = None
    test: str | None = None


class FormatSpec(_Strict):
    """How to read the files. A multi-character delimiter such as ``", "`` is
    read as its first character with surrounding blanks stripped from every value."""

    type: Literal["csv", "parquet"] = "csv"
    header: bool = True
    delimiter: str = ","
    names: list[str] | None = None  # column names when there is no header
    null_values: list[str] = Field(default_factory=list)  # strings read as missing

    @model_validator(mode="after")
    def _names_when_headerless(self) -> FormatSpec:
        if self.type == "csv" and not self.header and not self.names:
            raise ValueError("format.names is required when format.header is false")
        if not self.delimiter:
            raise ValueError("format.delimiter must not be empty")
        return self


class SplitSpec(_Strict):
    """Random fractions carved from ``train`` (seeded by ``split_seed``)."""

    valid: float = Field(0.1, ge=0.0, lt=1.0)
    test: float = Field(0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _leaves_train(self) -> SplitSpec:
        if self.valid + self.test >= 1.0:
            raise ValueError("split.valid + split.test must leave some training data")
        return self


class FeatureSpec(_Strict):
    """One input feature.

    - ``sparse``: categorical; vocabulary from train with ``min_freq``; ids 0 (padding)
      and 1 (out of vocabulary) are reserved.
    - ``dense``: numeric; standardised with train mean/std (after ``log1p`` when ``log``);
      a missing value is an error unless ``fill`` is given.
    - ``sequence``: ``separator``-delimited categorical ids, padded to ``max_len`` and
      masked; ``vocab`` names a sparse feature whose vocabulary and embedding it shares.
    """

    name: str
    type: Literal["sparse", "dense", "sequence"]
    column: str | None = None  # source column; defaults to ``name``
    embed_dim: int = Field(8, ge=1)
    min_freq: int = Field(1, ge=1)
    fill: Scalar | None = None
    log: bool = False
    separator: str = "|"
    max_len: int = Field(20, ge=1)
    vocab: str | None = None

    @model_validator(mode="after")
    def _fill_is_a_number(self) -> FeatureSpec:
        # checked here, not at prediction time: a fill the encoder cannot use is a schema mistake
        if self.fill is not None:
            if self.type != "dense":
                raise ValueError(
                    f"feature {self.name}: 'fill' only applies to dense features (a missing "
                    f"{self.type} value is its own token)"
                )
            if isinstance(self.fill, bool) or not isinstance(self.fill, (int, float)) or not math.isfinite(self.fill):
                raise ValueError(f"feature {self.name}: fill {self.fill!r} is not a finite number")
        return self

    @property
    def source_column(self) -> str:
        return self.column or self.name


class TaskSpec(_Strict):
    """One prediction target.

    A binary label is a 0/1 column, or any column plus the ``positive`` values
    (and, when ``strict`` with a ``negative`` list, every other value is an error).
    ``weight`` is the task's weight in the business score.
    """

    name: str
    type: Literal["binary", "regression"] = "binary"
    label: str
    positive: list[Scalar] | None = None
    negative: list[Scalar] | None = None
    strict: bool = True
    weight: float = 1.0
    space: str | None = None  # task whose positives define where this label is observed
    # this task's per-sample loss weight: a numeric column, on every sample or on positives only
    # (YouTube's weighted logistic regression: watch time weighs the clicks, negatives weigh 1)
    sample_weight: str | None = None
    sample_weight_on: Literal["all", "positives"] = "all"
    # regression only: train on the label standardised with its train mean/std (the default), so a
    # label on a large scale does not swamp the other tasks' gradients; metrics and predictions stay
    # in the label's units either way
    standardize: bool | None = None

    @model_validator(mode="after")
    def _positive_only_for_binary(self) -> TaskSpec:
        if self.type == "regression" and (self.positive or self.negative):
            raise ValueError(f"task {self.name}: positive/negative only apply to binary tasks")
        if self.type != "regression" and self.standardize is not None:
            raise ValueError(f"task {self.name}: standardize only applies to regression tasks")
        if self.sample_weight_on == "positives" and (self.type != "binary" or not self.sample_weight):
            raise ValueError(
                f"task {self.name}: sample_weight_on: positives needs a binary task with a sample_weight column"
            )
        return self

    @property
    def standardized(self) -> bool:
        """Whether training sees this task's label standardised (regression tasks, unless turned off)."""
        return self.type == "regression" and self.standardize is not False


class Schema(_Strict):
    """A whole dataset description (see the module docstring)."""

    name: str = "dataset"
    source: SourceSpec
    format: FormatSpec = Field(default_factory=FormatSpec)
    valid_fraction: float | None = Field(None, ge=0.0, lt=1.0)
    split: SplitSpec | None = None
    split_seed: int = 2024  # fixed so the valid split, and thus model selection, never moves
    features: list[FeatureSpec]
    tasks: list[TaskSpec]
    user: str | None = None
    sample_weight: str | None = None
    # Where relative source paths are resolved; set by load_schema, not by the file.
    base_dir: str | None = Field(None, exclude=True)

    @field_validator("tasks")
    @classmethod
    def _has_tasks(cls, tasks: list[TaskSpec]) -> list[TaskSpec]:
        if not tasks:
            raise ValueError("the schema names no task; add at least one under 'tasks'")
        return tasks

    @field_validator("features")
    @classmethod
    def _has_features(cls, features: list[FeatureSpec]) -> list[FeatureSpec]:
        if not features:
            raise ValueError("the schema names no feature; add at least one under 'features'")
        return features

    @model_validator(mode="after")
    def _consistent(self) -> Schema:
        for kind, names in (("feature", [f.name for f in self.features]), ("task", [t.name for t in self.tasks])):
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"duplicate {kind} name(s): {', '.join(dupes)}")
        sparse = {f.name: f for f in self.features if f.type == "sparse"}
        for f in self.features:
            if f.vocab is not None:
                if f.type != "sequence":
                    raise ValueError(f"feature {f.name}: 'vocab' only applies to sequence features")
                if f.vocab not in sparse:
                    raise ValueError(f"feature {f.name}: vocab '{f.vocab}' is not a sparse feature")
                if sparse[f.vocab].embed_dim != f.embed_dim:
                    raise ValueError(f"feature {f.name}: embed_dim must equal that of '{f.vocab}'")
        task_names = [t.name for t in self.tasks]
        for t in self.tasks:
            if t.space is not None and t.space not in task_names:
                raise ValueError(f"task {t.name}: space '{t.space}' is not a task")
        self.space_order()  # a cycle of spaces is an error
        label_cols = {t.label for t in self.tasks}
        leaks = sorted(label_cols & {f.source_column for f in self.features})
        if leaks:
            raise ValueError(f"label column(s) also used as features: {', '.join(leaks)}")
        if self.split is not None and self.valid_fraction is not None:
            raise ValueError(
                "split and valid_fraction are both set; give the validation share in one of them (split.valid)"
            )
        if self.split is not None and self.source.test is not None and self.split.test > 0:
            raise ValueError("split.test > 0 while source.test is given; use one or the other")
        return self

    # ---- derived views ---------------------------------------------------------------
    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def space_order(self) -> list[TaskSpec]:
        """The tasks with every task after the task that defines its space (labels are read in this
        order, since where a label is observed depends on its space's label); a cycle is an error."""
        by_name = {t.name: t for t in self.tasks}
        order: list[TaskSpec] = []
        done: set[str] = set()
        for task in self.tasks:
            chain, t = [], task
            while t is not None and t.name not in done:
                if t.name in chain:
                    cycle = " -> ".join(chain[chain.index(t.name) :] + [t.name])
                    raise ValueError(f"the tasks' spaces form a cycle ({cycle}); check tasks[].space")
                chain.append(t.name)
                t = by_name.get(t.space) if t.space else None
            order.extend(by_name[n] for n in reversed(chain))
            done.update(chain)
        return order

    def features_of(self, kind: str) -> list[FeatureSpec]:
        return [f for f in self.features if f.type == kind]

    @property
    def valid_share(self) -> float:
        if self.split is not None:
            return self.split.valid
        return 0.1 if self.valid_fraction is None else self.valid_fraction

    @property
    def test_share(self) -> float:
        return self.split.test if self.split is not None else 0.0

    def resolve(self, path: str) -> Path:
        p = Path(path)
        if not p.is_absolute() and self.base_dir is not None:
            p = Path(self.base_dir) / p
        return p

    def source_paths(self) -> dict[str, Path]:
        out = {"train": self.resolve(self.source.train)}
        for split in ("valid", "test"):
            value = getattr(self.source, split)
            if value is not None:
                out[split] = self.resolve(value)
        return out

    def fingerprint(self) -> str:
        """Hash of the schema and of each source file's path, size and mtime."""
        h = hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode())
        for split, path in sorted(self.source_paths().items()):
            if not path.is_file():
                raise MtrecError(f"{path}: data file not found (source.{split} of schema '{self.name}')")
            st = path.stat()
            h.update(f"{split}:{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()

    def to_dict(self) -> dict:
        """JSON-ready dict with source paths made absolute (so a run dir is self-contained)."""
        data = self.model_dump(mode="json")
        data["source"] = {k: str(v.resolve()) for k, v in self.source_paths().items()}
        return data


def _one_line(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def schema_from_dict(data: object, origin: str, base_dir: Path | None = None) -> Schema:
    """Validate a parsed schema; ``origin`` names the file in error messages."""
    if not isinstance(data, dict):
        raise MtrecError(f"{origin}: a schema must be a mapping with 'source', 'features' and 'tasks'")
    try:
        schema = Schema.model_validate(data)
    except ValidationError as err:
        raise MtrecError(f"{origin}: {_one_line(err)}") from None
    schema.base_dir = str(base_dir) if base_dir is not None else None
    return schema


def load_schema(path: str | Path) -> Schema:
    """Read and validate a YAML/JSON schema file."""
    p = Path(path)
    data = read_yaml(p, "schema file")
    return schema_from_dict(data, str(p), base_dir=p.resolve().parent)


# ---- the reference table of every schema key (README.md holds its output; a test keeps them equal) ----

KEY_DOCS: dict[str, str] = {
    "name": "name of the data set (store and run names)",
    "source": "the data files",
    "source.train": "training file (CSV, CSV.gz or Parquet), relative to the schema file or absolute",
    "source.valid": "validation file; without it the validation rows are carved from train",
    "source.test": "test file; without it, `split.test` carves one from train (or there is none)",
    "format": "how the files are read",
    "format.type": "`csv` (plain or gzipped) or `parquet`",
    "format.header": "whether the first CSV line names the columns",
    "format.delimiter": 'CSV delimiter; a multi-character one (`", "`) is its first character with blanks stripped',
    "format.names": "column names of a CSV without header (required then)",
    "format.null_values": "strings read as missing",
    "valid_fraction": "share of train carved out as validation (default 0.1); not with `split`",
    "split": "shares carved from train: `valid` and `test`; not with `valid_fraction`",
    "split.valid": "validation share",
    "split.test": "test share (not with `source.test`)",
    "split_seed": "seed of the carving (fixed, so the validation rows never move)",
    "features": "the input features (at least one)",
    "features[].name": "feature name (unique)",
    "features[].type": "`sparse` (categorical id), `dense` (number) or `sequence` (separated ids)",
    "features[].column": "source column (default: the name)",
    "features[].embed_dim": "embedding size (sparse, sequence)",
    "features[].min_freq": "ids seen fewer times in train are out of vocabulary (sparse, sequence)",
    "features[].fill": "value of a missing dense cell (a finite number; without it a missing value is an error)",
    "features[].log": "`sign(x) log1p(|x|)` before standardising (dense)",
    "features[].separator": "separator of a sequence cell",
    "features[].max_len": "tokens kept per sequence (first ones; padded and masked)",
    "features[].vocab": "sparse feature whose vocabulary and embedding a sequence shares",
    "tasks": "the prediction targets (at least one)",
    "tasks[].name": "task name (unique)",
    "tasks[].type": "`binary` or `regression`",
    "tasks[].label": "label column",
    "tasks[].positive": "values meaning 1 (binary; default: the column is 0/1)",
    "tasks[].negative": "values meaning 0 (with `strict`, any other value is an error)",
    "tasks[].strict": "refuse label values that are neither positive nor negative (or not 0/1)",
    "tasks[].weight": "the task's weight in the business score",
    "tasks[].space": "task whose positives are where this label is observed (CVR on clicks)",
    "tasks[].sample_weight": "numeric column weighing this task's loss per sample",
    "tasks[].sample_weight_on": "`all` samples or `positives` only (binary)",
    "tasks[].standardize": "regression: train on the label standardised with train statistics (default true)",
    "user": "user id column: enables uAUC / GAUC and per-user objectives",
    "sample_weight": "numeric column weighing every task's loss per sample",
}


def _type_name(annotation: object) -> str:
    """A readable type for the reference table."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Union or origin is types.UnionType:
        args = tuple(a for a in args if a is not type(None))  # Optional: the default column says so
        if set(args) == {str, int, float, bool}:
            return "scalar"
        return " or ".join(_type_name(a) for a in args)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    return getattr(annotation, "__name__", str(annotation))


def _rows(model: type[BaseModel], prefix: str) -> list[tuple[str, object]]:
    out = []
    for name, info in model.model_fields.items():
        if info.exclude:
            continue
        key = f"{prefix}{name}"
        out.append((key, info))
        nested = info.annotation
        if typing.get_origin(nested) in (Union, types.UnionType):  # Optional[X] -> X
            nested = next(a for a in typing.get_args(nested) if a is not type(None))
        args = typing.get_args(nested) if typing.get_origin(nested) is list else ()
        target = args[0] if args else nested
        if isinstance(target, type) and issubclass(target, BaseModel):
            out.extend(_rows(target, f"{key}[]." if args else f"{key}."))
    return out


def schema_reference() -> str:
    """The Markdown table of every schema key (type, default, meaning), generated from the pydantic
    models and :data:`KEY_DOCS`; a key without a description is an error, so the table cannot drift."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, info in _rows(Schema, ""):
        if key not in KEY_DOCS:
            raise KeyError(f"schema key {key} has no description in KEY_DOCS")
        if info.is_required():
            default = "required"
        else:
            value = info.get_default(call_default_factory=True)
            default = "" if value is None or isinstance(value, BaseModel) else f"`{json.dumps(value)}`"
        cells = (
            f"`{key}`",
            _type_name(info.annotation),
            default.replace("|", "\\|"),
            KEY_DOCS[key].replace("|", "\\|"),
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m mtrec.schema: print the reference table (README.md holds it)
    print(schema_reference(), end="")
