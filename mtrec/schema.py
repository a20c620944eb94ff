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
from pydantic.fields import FieldInfo

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
    """How train, valid and test are carved from ``train``: random fractions (seeded by ``split_seed``);
    ``by``: ranges ``[FROM, TO]`` (both ends inclusive) of a sortable column such as a date, the rest is
    train; ``by_user``: fractions of the users (each user's rows all in one split, by a hash of the user id
    and ``split_seed``, so every chunk of a file gets the same assignment)."""

    by: str | None = None
    by_user: str | None = None
    valid: float | list[Scalar] = 0.1
    test: float | list[Scalar] = 0.0

    @model_validator(mode="after")
    def _leaves_train(self) -> SplitSpec:
        if self.by is not None and self.by_user is not None:
            raise ValueError("split.by and split.by_user are both set; split by one of them")
        if self.by is not None:
            for key in ("valid", "test"):
                value = getattr(self, key)
                if key == "test" and not isinstance(value, list) and value == 0:
                    continue  # no test range
                if not isinstance(value, list) or len(value) != 2 or any(isinstance(v, bool) for v in value):
                    raise ValueError(f"split.{key}: with split.by, give a range [FROM, TO] of column '{self.by}'")
                low, high = value
                if _comparable(low, high) and low > high:
                    raise ValueError(f"split.{key}: range [{low}, {high}] is empty (FROM > TO)")
            if isinstance(self.test, list):
                (v0, v1), (t0, t1) = self.valid, self.test  # type: ignore[misc]
                if all(_comparable(a, b) for a, b in ((v0, t1), (t0, v1))) and v0 <= t1 and t0 <= v1:  # type: ignore[operator]
                    raise ValueError(f"split.valid {self.valid} and split.test {self.test} overlap")
            return self
        for key in ("valid", "test"):
            value = getattr(self, key)
            if isinstance(value, list) or isinstance(value, bool) or not 0.0 <= value < 1.0:
                raise ValueError(f"split.{key}: {value!r} is not a share in [0, 1) (ranges need split.by)")
        if self.valid + self.test >= 1.0:  # type: ignore[operator]
            raise ValueError("split.valid + split.test must leave some training data")
        return self

    @property
    def by_range(self) -> bool:
        """Whether the split takes ranges of a column (``by``)."""
        return self.by is not None


def _comparable(a: object, b: object) -> bool:
    """Both numbers, or both strings: bounds that can be ordered."""
    number = (int, float)
    return (isinstance(a, number) and isinstance(b, number)) or (isinstance(a, str) and isinstance(b, str))


class JoinSpec(_Strict):
    """A side table (user or item features) joined to every row of the log on a key column, before
    encoding (a ``.parquet`` file, else a CSV with a header line and commas). A log key absent from the table is counted and handled by ``missing``: ``error`` (the
    default), ``drop`` the row, or ``fill`` (keep it, its side columns blank: a sparse feature reads the
    blank as its own token, a dense one needs its ``fill``)."""

    source: str
    on: str
    missing: Literal["fill", "drop", "error"] = "error"
    columns: list[str] | None = None  # the table's columns to take (default: all but the key)

    @model_validator(mode="before")
    @classmethod
    def _yaml_on(cls, data: object) -> object:
        # YAML 1.1 (PyYAML) reads an unquoted `on:` key as the boolean true
        if isinstance(data, dict) and True in data and "on" not in data:
            data = {("on" if k is True else k): v for k, v in data.items()}
        return data


class LabelSpec(_Strict):
    """A label derived from columns: ``column`` (divided by ``divide_by`` when given), then, for a
    binary task, compared with exactly one of ``ge``/``gt``/``le``/``lt``/``eq``; for a regression task,
    optionally transformed (``log1p``: the label is ``log(1 + value)``, metrics in those units)."""

    column: str
    divide_by: str | None = None
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    eq: float | None = None
    transform: Literal["log1p"] | None = None

    @property
    def comparison(self) -> tuple[str, float] | None:
        """``(operator, threshold)``, or None for a regression label."""
        given = [(op, getattr(self, op)) for op in ("ge", "gt", "le", "lt", "eq") if getattr(self, op) is not None]
        return given[0] if given else None

    @model_validator(mode="after")
    def _one_comparison(self) -> LabelSpec:
        given = [op for op in ("ge", "gt", "le", "lt", "eq") if getattr(self, op) is not None]
        if len(given) > 1:
            raise ValueError(f"label: give one comparison, not {' and '.join(given)}")
        if given and self.transform is not None:
            raise ValueError("label: a transform applies to regression labels, a comparison to binary ones")
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
    label: str | LabelSpec  # a column, or a label derived from columns
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
        if isinstance(self.label, LabelSpec):
            comparison = self.label.comparison
            if self.type == "binary" and comparison is None:
                raise ValueError(
                    f"task {self.name}: label: a derived binary label needs a comparison (ge, gt, le, lt or eq)"
                )
            if self.type == "regression" and comparison is not None:
                raise ValueError(f"task {self.name}: label: {comparison[0]} makes a binary label; set type: binary")
            if self.positive is not None or self.negative is not None:
                raise ValueError(f"task {self.name}: positive/negative apply to a label column, not a derived label")
        if self.weight < 0 or not math.isfinite(self.weight):
            raise ValueError(f"task {self.name}: weight {self.weight} is not a finite weight >= 0")
        if self.type != "regression" and self.standardize is not None:
            raise ValueError(f"task {self.name}: standardize only applies to regression tasks")
        if self.sample_weight_on == "positives" and (self.type != "binary" or not self.sample_weight):
            raise ValueError(
                f"task {self.name}: sample_weight_on: positives needs a binary task with a sample_weight column"
            )
        return self

    @property
    def label_column(self) -> str:
        """The column the label is read from: the label column, or the column :func:`derive_labels`
        (mtrec.data.sources) writes a derived label into."""
        return self.label if isinstance(self.label, str) else f"label.{self.name}"

    @property
    def label_sources(self) -> list[str]:
        """The source columns of the label."""
        if isinstance(self.label, str):
            return [self.label]
        return [self.label.column] + ([self.label.divide_by] if self.label.divide_by else [])

    @property
    def standardized(self) -> bool:
        """Whether training sees this task's label standardised (regression tasks, unless turned off)."""
        return self.type == "regression" and self.standardize is not False


class Schema(_Strict):
    """A whole dataset description (see the module docstring)."""

    name: str = "dataset"
    data_dir: str | None = None  # folder of the relative data paths, relative to the schema file
    source: SourceSpec
    join: list[JoinSpec] = Field(default_factory=list)
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
        # a derived label's numerator is the label; its denominator (a video's duration) may be a feature
        label_cols = {t.label if isinstance(t.label, str) else t.label.column for t in self.tasks}
        leaks = sorted(label_cols & {f.source_column for f in self.features})
        if leaks:
            raise ValueError(f"label column(s) also used as features: {', '.join(leaks)}")
        if self.split is not None and self.valid_fraction is not None:
            raise ValueError(
                "split and valid_fraction are both set; give the validation share in one of them (split.valid)"
            )
        split = self.split
        if split is not None and self.source.test is not None and (isinstance(split.test, list) or split.test > 0):
            raise ValueError("split.test is set while source.test is given; use one or the other")
        if split is not None and (split.by or split.by_user) and self.source.valid is not None:
            kind = "split.by" if split.by else "split.by_user"
            raise ValueError(f"{kind} carves the validation rows from train, but source.valid is given; drop one")
        for j in self.join:
            if j.columns is not None and j.on in j.columns:
                raise ValueError(f"join {j.source}: columns lists the key '{j.on}' (it is joined on, not taken)")
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
            chain: list[str] = []
            t: TaskSpec | None = task
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
        """The random validation share (0 when ``split.by`` takes a range instead)."""
        if self.split is not None:
            return self.split.valid if isinstance(self.split.valid, float | int) else 0.0
        return 0.1 if self.valid_fraction is None else self.valid_fraction

    @property
    def test_share(self) -> float:
        """The random test share (0 when ``split.by`` takes a range instead)."""
        if self.split is None:
            return 0.0
        return self.split.test if isinstance(self.split.test, float | int) else 0.0

    @property
    def carves_by_column(self) -> bool:
        """Whether the splits come from a column (``split.by`` ranges or ``split.by_user``), not at random."""
        return self.split is not None and (self.split.by is not None or self.split.by_user is not None)

    def data_root(self) -> Path | None:
        """The folder relative data paths resolve under: ``data_dir`` (relative to the schema file's
        folder; ``--data-dir`` replaces it), else the schema file's folder."""
        if self.data_dir is None:
            return Path(self.base_dir) if self.base_dir is not None else None
        root = Path(self.data_dir)
        if not root.is_absolute() and self.base_dir is not None:
            root = Path(self.base_dir) / root
        return root

    def resolve(self, path: str) -> Path:
        p = Path(path)
        root = self.data_root()
        if not p.is_absolute() and root is not None:
            p = root / p
        return p

    def join_paths(self) -> list[Path]:
        """The side tables' files, in ``join`` order."""
        return [self.resolve(j.source) for j in self.join]

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
            if path.is_dir():  # a directory of shards: every shard's name, size and mtime
                from mtrec.data.stream import source_files

                for shard in source_files(path, self.format):
                    st = shard.stat()
                    h.update(f"{split}:{shard.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
                continue
            if not path.is_file():
                raise MtrecError(f"{path}: data file not found (source.{split} of schema '{self.name}')")
            st = path.stat()
            h.update(f"{split}:{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
        for i, path in enumerate(self.join_paths()):
            if not path.is_file():
                raise MtrecError(f"{path}: side table not found (join[{i}].source of schema '{self.name}')")
            st = path.stat()
            h.update(f"join{i}:{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()

    def to_dict(self) -> dict:
        """JSON-ready dict with source paths made absolute (so a run dir is self-contained)."""
        data = self.model_dump(mode="json")
        data["source"] = {k: str(v.resolve()) for k, v in self.source_paths().items()}
        for entry, path in zip(data.get("join", []), self.join_paths()):
            entry["source"] = str(path.resolve())
        data["data_dir"] = None  # every path is absolute now
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


def load_schema(path: str | Path, data_dir: str | Path | None = None) -> Schema:
    """Read and validate a YAML/JSON schema file; ``data_dir`` (``--data-dir``) replaces the folder its
    relative data paths (``source``, ``join``) resolve under."""
    p = Path(path)
    data = read_yaml(p, "schema file")
    schema = schema_from_dict(data, str(p), base_dir=p.resolve().parent)
    return with_data_dir(schema, data_dir) if data_dir is not None else schema


def with_data_dir(schema: Schema, data_dir: str | Path, flag: str = "--data-dir") -> Schema:
    """``schema`` reading its relative data paths under ``data_dir`` (which must be a folder)."""
    folder = Path(data_dir)
    if not folder.is_dir():
        raise MtrecError(f"{flag} {folder}: not a folder (the data files of schema '{schema.name}' are read from it)")
    schema.data_dir = str(folder.resolve())
    return schema


# ---- the reference table of every schema key (README.md holds its output; a test keeps them equal) ----

KEY_DOCS: dict[str, str] = {
    "name": "name of the data set (store and run names)",
    "data_dir": "folder relative `source` and `join` paths resolve under, relative to the schema file "
    "(default: the schema file's folder); `--data-dir DIR` replaces it",
    "source": "the data files",
    "source.train": "training file (CSV, CSV.gz, Parquet) or directory of shards; relative to `data_dir` (default: the schema's folder) or absolute",
    "source.valid": "validation file; without it the validation rows are carved from train",
    "source.test": "test file; without it, `split.test` carves one from train (or there is none)",
    "join": "side tables joined to the log on a key, before encoding (user, item features)",
    "join[].source": "the side table's file (CSV with a header, or `.parquet`)",
    "join[].on": "key column, in the log and in the side table (one row per key in the table)",
    "join[].missing": "a log key absent from the table: `error`, `drop` the row, or `fill` (side columns blank); counted and reported",
    "join[].columns": "the table's columns to take (default: all but the key; a name the log has too is an error)",
    "format": "how the files are read",
    "format.type": "`csv` (plain or gzipped) or `parquet`",
    "format.header": "whether the first CSV line names the columns",
    "format.delimiter": 'CSV delimiter; a multi-character one (`", "`) is its first character with blanks stripped',
    "format.names": "column names of a CSV without header (required then)",
    "format.null_values": "strings read as missing",
    "valid_fraction": "share of train carved out as validation (default 0.1); not with `split`",
    "split": "how valid and test are carved from train: random shares, ranges of a column (`by`) or "
    "shares of the users (`by_user`); not with `valid_fraction`",
    "split.by": "a sortable column (a date): `valid` and `test` are ranges `[FROM, TO]` of it, both ends "
    "inclusive (numbers compare as numbers); the other rows are train",
    "split.by_user": "user id column: `valid` and `test` are shares of the users (by a hash of the id and "
    "`split_seed`), each user's rows in one split",
    "split.valid": "validation share, or with `by` a range `[FROM, TO]`",
    "split.test": "test share, or with `by` a range `[FROM, TO]` (not with `source.test`)",
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
    "tasks[].label": "label column, or a label derived from columns (a mapping)",
    "tasks[].label.column": "the column the label is computed from",
    "tasks[].label.divide_by": "a column dividing it (play time / duration); a zero or blank divisor is an error",
    "tasks[].label.ge": "binary: the label is 1 where the value is >= this",
    "tasks[].label.gt": "binary: 1 where the value is > this",
    "tasks[].label.le": "binary: 1 where the value is <= this",
    "tasks[].label.lt": "binary: 1 where the value is < this",
    "tasks[].label.eq": "binary: 1 where the value equals this",
    "tasks[].label.transform": "regression: `log1p` makes the label log(1 + value) (metrics in its units)",
    "tasks[].positive": "values meaning 1 (binary; default: the column is 0/1)",
    "tasks[].negative": "values meaning 0 (with `strict`, any other value is an error)",
    "tasks[].strict": "refuse label values that are neither positive nor negative (or not 0/1)",
    "tasks[].weight": "the task's weight in the business score (`weighted` in metrics.json, `--select-by weighted_uauc`)",
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


def _rows(model: type[BaseModel], prefix: str) -> list[tuple[str, FieldInfo]]:
    out: list[tuple[str, FieldInfo]] = []
    for name, info in model.model_fields.items():
        if info.exclude:
            continue
        key = f"{prefix}{name}"
        out.append((key, info))
        nested = info.annotation
        if typing.get_origin(nested) in (Union, types.UnionType):  # Optional[X] -> X; str | Model -> Model
            args_ = [a for a in typing.get_args(nested) if a is not type(None)]
            nested = next((a for a in args_ if isinstance(a, type) and issubclass(a, BaseModel)), args_[0])
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
