"""Columnar ingestion: read CSV/Parquet with polars, fit encoders on train, encode.

Encoders (vocabularies and numeric statistics) are fitted on the training
split only and stored as JSON beside the arrays, so prediction on new files
encodes exactly as training did. Every check of the input raises one
:class:`MtrecError` naming the file and the column.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from dataclasses import field as dataclass_field
from pathlib import Path

import numpy as np
import polars as pl

from mtrec.data.tables import FeatureLayout, SequenceField, SparseField, TaskField
from mtrec.errors import MtrecError
from mtrec.schema import FeatureSpec, Schema, TaskSpec

PAD, OOV = 0, 1  # reserved ids of every vocabulary
NULL_TOKEN = "<null>"
# an integral number written as a float ("617.0", what pandas writes for an integer column with gaps)
# is the same id as "617": ids are read in this form at fit and at encode time alike
INTEGRAL_FLOAT = r"^(-?\d+)\.0*$"


def read_frame(path: Path, schema: Schema) -> pl.DataFrame:
    """Read one data file; CSV columns come in as strings and are cast per feature later."""
    fmt = schema.format
    if not path.is_file():
        raise MtrecError(f"{path}: data file not found")
    if path.stat().st_size == 0:
        raise MtrecError(f"{path}: the file is empty")
    try:
        if fmt.type == "parquet":
            frame = pl.read_parquet(path)
        else:
            frame = pl.read_csv(
                path,
                has_header=fmt.header,
                separator=fmt.delimiter[0],
                new_columns=fmt.names,
                infer_schema=False,  # everything as text; each column is cast and checked below
                null_values=fmt.null_values or None,
                quote_char='"',
            )
            if len(fmt.delimiter) > 1 or fmt.delimiter[0] != fmt.delimiter:
                frame = frame.with_columns(pl.all().str.strip_chars())
    except pl.exceptions.NoDataError:
        raise MtrecError(f"{path}: the file is empty") from None
    except (pl.exceptions.ComputeError, pl.exceptions.ShapeError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MtrecError(f"{path}: cannot read as {fmt.type} ({first})") from None
    if frame.height == 0:
        raise MtrecError(f"{path}: the file has no data rows")
    if fmt.names and len(frame.columns) != len(fmt.names):
        raise MtrecError(f"{path}: {len(frame.columns)} columns, but format.names lists {len(fmt.names)}")
    return frame


def _sample_weights(frame: pl.DataFrame, schema: Schema, labels: np.ndarray, path: Path) -> np.ndarray | None:
    """Per-sample, per-task loss weights ``[N, T]`` (the schema's ``sample_weight`` column times each
    task's own), or None when the schema weighs nothing."""
    columns = [(schema.sample_weight, "sample_weight", None)] + [
        (t.sample_weight, f"task {t.name} sample_weight", t) for t in schema.tasks
    ]
    if not any(column for column, _, _ in columns):
        return None
    weight = np.ones(labels.shape, dtype=np.float32)
    for column, field, task in columns:
        if not column:
            continue
        w = _as_float(frame, column, path, field)
        if np.isnan(w).any() or (w < 0).any():
            raise MtrecError(f"{path}: column '{column}' ({field}) has missing or negative values")
        if task is None:
            weight *= w[:, None].astype(np.float32)
            continue
        t = schema.tasks.index(task)
        if task.sample_weight_on == "positives":
            w = np.where(labels[:, t] > 0.5, w, 1.0)
        weight[:, t] *= w.astype(np.float32)
    return weight


def required_columns(schema: Schema, with_labels: bool = True) -> dict[str, str]:
    """Source column -> the schema field that needs it (for error messages)."""
    need = {f.source_column: f"feature {f.name}" for f in schema.features}
    if with_labels:
        for t in schema.tasks:
            need.setdefault(t.label, f"task {t.name}")
        if schema.sample_weight:
            need.setdefault(schema.sample_weight, "sample_weight")
        for t in schema.tasks:
            if t.sample_weight:
                need.setdefault(t.sample_weight, f"task {t.name} sample_weight")
    if schema.user:
        need.setdefault(schema.user, "user")
    return need


def check_columns(frame: pl.DataFrame, path: Path, schema: Schema, with_labels: bool = True) -> None:
    for column, owner in required_columns(schema, with_labels).items():
        if column not in frame.columns:
            shown = ", ".join(frame.columns[:12]) + (", ..." if len(frame.columns) > 12 else "")
            raise MtrecError(f"{path}: column '{column}' ({owner}) not found; the file has: {shown}")


def canonical_ids(text: pl.Series) -> pl.Series:
    """Ids as text with integral floats written as integers (``"617.0"`` -> ``"617"``)."""
    return text.str.replace(INTEGRAL_FLOAT, "${1}")


def _as_text(frame: pl.DataFrame, column: str) -> pl.Series:
    return canonical_ids(frame.get_column(column).cast(pl.String)).fill_null(NULL_TOKEN)


def _as_float(frame: pl.DataFrame, column: str, path: Path, owner: str) -> np.ndarray:
    """Cast to float64; a value that is not a number is an error naming it."""
    raw = frame.get_column(column)
    values = raw.cast(pl.Float64, strict=False)
    bad = values.is_null() & raw.is_not_null()
    if bad.any():
        example = raw.filter(bad)[0]
        raise MtrecError(f"{path}: column '{column}' ({owner}) has a non-numeric value '{example}'")
    return values.to_numpy().astype(np.float64, copy=False)


@dataclass
class Encoders:
    """Fitted on train: token lists per vocabulary owner, (mean, std) per dense feature, and
    (mean, std) of each standardised regression label (over the train rows inside its space)."""

    vocabs: dict[str, list[str]]
    stats: dict[str, list[float]]
    labels: dict[str, list[float]] = dataclass_field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Encoders:
        return cls(
            vocabs={k: list(v) for k, v in data["vocabs"].items()},
            stats=dict(data["stats"]),
            labels={k: list(v) for k, v in data.get("labels", {}).items()},  # absent before store version 3
        )


def _vocab_owner(f: FeatureSpec) -> str:
    return f.vocab or f.name


def _sequence_tokens(frame: pl.DataFrame, f: FeatureSpec) -> pl.Series:
    """Per row, the list of the first ``max_len`` tokens (a missing cell is an empty list)."""
    column = frame.get_column(f.source_column).cast(pl.String).fill_null("")
    return (
        column.str.split(f.separator).list.head(f.max_len).list.eval(pl.element().str.replace(INTEGRAL_FLOAT, "${1}"))
    )


def _dense_values(frame: pl.DataFrame, f: FeatureSpec, path: Path) -> np.ndarray:
    values = _as_float(frame, f.source_column, path, f"feature {f.name}")
    infinite = np.isinf(values)
    if infinite.any():
        raise MtrecError(
            f"{path}: column '{f.source_column}' (feature {f.name}) has {int(infinite.sum())} infinite value(s) "
            f"({values[infinite][0]}); replace them, or leave the cells blank and set 'fill:'"
        )
    missing = np.isnan(values)
    if missing.any():
        if f.fill is None:
            raise MtrecError(
                f"{path}: column '{f.source_column}' (feature {f.name}) has {int(missing.sum())} missing/NaN "
                f"value(s); set 'fill:' for this feature in the schema"
            )
        values = np.where(missing, float(f.fill), values)
    if f.log:
        values = np.sign(values) * np.log1p(np.abs(values))
    return values


def fit_encoders(frame: pl.DataFrame, schema: Schema, path: Path) -> Encoders:
    """Vocabularies (by frequency, ties by token, min_freq applied) and dense statistics."""
    vocabs: dict[str, list[str]] = {}
    for f in schema.features:
        if f.type == "dense" or f.vocab is not None:
            continue
        if f.type == "sparse":
            tokens = _as_text(frame, f.source_column)
        else:
            tokens = _sequence_tokens(frame, f).explode().drop_nulls()
            tokens = tokens.filter(tokens != "")
        counts = tokens.value_counts(name="n").filter(pl.col("n") >= f.min_freq)
        counts = counts.sort(["n", counts.columns[0]], descending=[True, False])
        vocabs[f.name] = counts.get_column(counts.columns[0]).to_list()
    # a sequence sharing a sparse feature's vocabulary also adds nothing of its own
    stats = {}
    for f in schema.features_of("dense"):
        values = _dense_values(frame, f, path)
        std = float(values.std())
        stats[f.name] = [float(values.mean()), std if std > 0 else 1.0]
    return Encoders(vocabs=vocabs, stats=stats, labels=_label_stats(frame, schema, path))


def _label_stats(frame: pl.DataFrame, schema: Schema, path: Path) -> dict[str, list[float]]:
    """``{task: [mean, std]}`` of every standardised regression label, over the rows inside its space."""
    wanted = [t for t in schema.tasks if t.standardized]
    if not wanted:
        return {}
    labels = read_labels(frame, schema, path)
    out = {}
    for t in wanted:
        values = labels[:, schema.tasks.index(t)].astype(np.float64)
        if t.space is not None:
            values = values[labels[:, schema.task_names.index(t.space)] > 0.5]
        std = float(values.std()) if values.size else 0.0
        out[t.name] = [float(values.mean()) if values.size else 0.0, std if std > 0 else 1.0]
    return out


_TABLES: dict[int, tuple[list[str], pl.DataFrame]] = {}  # id(vocab) -> (vocab, its token -> id table)


def _vocab_table(vocab: list[str]) -> pl.DataFrame:
    """The token -> id table of a fitted vocabulary, built once per vocabulary object (building it costs
    about as much as looking a whole column up: predict and every service request reuse it)."""
    hit = _TABLES.get(id(vocab))
    if hit is not None and hit[0] is vocab:
        return hit[1]
    # vocabularies fitted before ids were canonical may hold "617.0": read them the same way (first wins)
    table = pl.DataFrame(
        {"token": canonical_ids(pl.Series(vocab, dtype=pl.String)), "id": np.arange(2, len(vocab) + 2)}
    )
    table = table.unique("token", keep="first", maintain_order=True)
    if len(_TABLES) >= 256:
        _TABLES.clear()
    _TABLES[id(vocab)] = (vocab, table)  # the vocabulary is kept alive with it, so its id stays its own
    return table


def _lookup(tokens: pl.Series, vocab: list[str]) -> np.ndarray:
    table = _vocab_table(vocab)
    ids = tokens.replace_strict(table["token"], table["id"], default=OOV, return_dtype=pl.Int64)
    return ids.to_numpy()


def oov_rates(arrays: dict[str, np.ndarray], schema: Schema) -> dict[str, float]:
    """Share of out-of-vocabulary ids per sparse feature (of rows) and sequence feature (of tokens)."""
    rates = {}
    for j, f in enumerate(schema.features_of("sparse")):
        column = arrays["sparse"][:, j]
        rates[f.name] = float((column == OOV).mean()) if column.size else 0.0
    for f in schema.features_of("sequence"):
        ids = arrays[f"seq.{f.name}"]
        tokens = int((ids != PAD).sum())
        rates[f.name] = float((ids == OOV).sum() / tokens) if tokens else 0.0
    return rates


def _encode_sequence(frame: pl.DataFrame, f: FeatureSpec, vocab: list[str]) -> np.ndarray:
    lists = _sequence_tokens(frame, f)
    lengths = lists.list.len().to_numpy().astype(np.int64)
    flat = lists.explode()
    flat_ids = _lookup(flat.fill_null(""), vocab)
    # explode turns an empty list into one null row: drop those to line up with lengths
    keep = np.repeat(lengths > 0, np.maximum(lengths, 1))
    flat_ids = flat_ids[keep]
    flat_tokens = flat.to_numpy()[keep]
    flat_ids = np.where(flat_tokens == "", PAD, flat_ids)
    out = np.zeros((frame.height, f.max_len), dtype=np.int64)
    rows = np.repeat(np.arange(frame.height), lengths)
    cols = np.arange(len(rows)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    out[rows, cols] = flat_ids
    return out


def _binary_labels(frame: pl.DataFrame, t: TaskSpec, path: Path) -> np.ndarray:
    """0/1 labels as float64, NaN where the cell is blank (the caller decides whether that is allowed)."""
    raw = frame.get_column(t.label)
    where = f"{path}: column '{t.label}' (task {t.name})"
    blank = raw.is_null().to_numpy()
    if t.positive is not None:
        text = raw.cast(pl.String)
        positive = text.is_in([str(v) for v in t.positive]).fill_null(False)
        if t.strict and t.negative is not None:
            known = positive | text.is_in([str(v) for v in t.negative]).fill_null(False) | raw.is_null()
            if not known.all():
                example = text.filter(~known)[0]
                raise MtrecError(f"{where}: value '{example}' is neither in 'positive' nor in 'negative'")
        return np.where(blank, np.nan, positive.to_numpy().astype(np.float64))
    values = _as_float(frame, t.label, path, f"task {t.name}")
    outside = (values != 0) & (values != 1) & ~np.isnan(values)
    if outside.any():
        if t.strict:
            raise MtrecError(
                f"{where}: value '{values[outside][0]:g}' is not 0/1; give 'positive:' values or set strict: false"
            )
        values = np.where(np.isnan(values), np.nan, (values > 0).astype(np.float64))
    return values


def _regression_labels(frame: pl.DataFrame, t: TaskSpec, path: Path) -> np.ndarray:
    """Values as float64, NaN where blank or NaN; infinities are an error."""
    values = _as_float(frame, t.label, path, f"task {t.name}")
    if np.isinf(values).any():
        raise MtrecError(
            f"{path}: column '{t.label}' (task {t.name}) has {int(np.isinf(values).sum())} infinite label(s)"
        )
    return values


def read_labels(frame: pl.DataFrame, schema: Schema, path: Path) -> np.ndarray:
    """Labels ``[N, T]`` in the tasks' units. A blank label is unobserved: allowed outside its task's
    space (where the space's label is 0; stored as 0, and masked out of losses and metrics by the space),
    an error elsewhere, naming the file, the column and the count."""
    index = {t.name: i for i, t in enumerate(schema.tasks)}
    labels = np.zeros((frame.height, len(schema.tasks)), dtype=np.float32)
    text = [t.label for t in schema.tasks if frame.schema[t.label] == pl.String]
    if text:  # a quoted empty or blank cell is as blank as an empty one
        frame = frame.with_columns(
            pl.when(pl.col(c).str.strip_chars() == "").then(None).otherwise(pl.col(c)).alias(c) for c in set(text)
        )
    for t in schema.space_order():  # a space's labels before those of the tasks inside it
        values = _binary_labels(frame, t, path) if t.type == "binary" else _regression_labels(frame, t, path)
        missing = np.isnan(values)
        inside = labels[:, index[t.space]] > 0.5 if t.space is not None else np.ones(len(values), bool)
        count = int((missing & inside).sum())
        if count:
            where = f" inside its space '{t.space}' (blank labels are allowed where {t.space} is 0)" if t.space else ""
            raise MtrecError(f"{path}: column '{t.label}' (task {t.name}) has {count} missing label(s){where}")
        labels[:, index[t.name]] = np.where(missing, 0.0, values)
    return labels


def encode(
    frame: pl.DataFrame, schema: Schema, enc: Encoders, path: Path, with_labels: bool = True
) -> dict[str, np.ndarray]:
    """Encode a frame into arrays: ``sparse``, ``dense``, ``labels``, ``seq.<name>``, ``weight``, ``user``."""
    check_columns(frame, path, schema, with_labels)
    n = frame.height
    sparse = [_lookup(_as_text(frame, f.source_column), enc.vocabs[f.name]) for f in schema.features_of("sparse")]
    dense = []
    for f in schema.features_of("dense"):
        mean, std = enc.stats[f.name]
        dense.append((_dense_values(frame, f, path) - mean) / std)
    arrays = {
        "sparse": np.stack(sparse, axis=1) if sparse else np.zeros((n, 0), np.int64),
        "dense": (np.stack(dense, axis=1) if dense else np.zeros((n, 0))).astype(np.float32),
    }
    for f in schema.features_of("sequence"):
        arrays[f"seq.{f.name}"] = _encode_sequence(frame, f, enc.vocabs[_vocab_owner(f)])
    if with_labels:
        arrays["labels"] = read_labels(frame, schema, path)
        weight = _sample_weights(frame, schema, arrays["labels"], path)
        if weight is not None:
            arrays["weight"] = weight
    else:
        arrays["labels"] = np.zeros((n, len(schema.tasks)), np.float32)
    if schema.user:
        arrays["user"] = _as_text(frame, schema.user).rank("dense").to_numpy().astype(np.int64)
    return arrays


def build_layout(schema: Schema, enc: Encoders) -> FeatureLayout:
    """The feature map the model is built from."""
    return FeatureLayout(
        sparse=[SparseField(f.name, len(enc.vocabs[f.name]) + 2, f.embed_dim) for f in schema.features_of("sparse")],
        dense=[f.name for f in schema.features_of("dense")],
        sequences=[
            SequenceField(f.name, len(enc.vocabs[_vocab_owner(f)]) + 2, f.embed_dim, f.max_len, f.vocab)
            for f in schema.features_of("sequence")
        ],
        tasks=[TaskField(t.name, t.type, t.space, t.weight, *enc.labels.get(t.name, (0.0, 1.0))) for t in schema.tasks],
    )


def split_rows(n: int, shares: list[float], seed: int) -> list[np.ndarray]:
    """Seeded random split of ``range(n)``: one index array per share, the rest last."""
    perm = np.random.default_rng(seed).permutation(n)
    out, start = [], 0
    for share in shares:
        size = int(round(n * share))
        out.append(np.sort(perm[start : start + size]))
        start += size
    out.append(np.sort(perm[start:]))
    return out


def load_splits(schema: Schema) -> dict[str, tuple[pl.DataFrame, Path]]:
    """Read the source files and carve the missing splits from train (seeded)."""
    paths = schema.source_paths()
    frames = {split: (read_frame(path, schema), path) for split, path in paths.items()}
    for frame, path in frames.values():
        check_columns(frame, path, schema)
        read_labels(frame, schema, path)  # label errors counted over the whole file, before any carving
    train, train_path = frames["train"]
    carve = []
    if "valid" not in frames and schema.valid_share > 0:
        carve.append("valid")
    if "test" not in frames and schema.test_share > 0:
        carve.append("test")
    if carve:
        shares = [schema.valid_share if s == "valid" else schema.test_share for s in carve]
        parts = split_rows(train.height, shares, schema.split_seed)
        for split, idx in zip(carve, parts[:-1]):
            frames[split] = (train[idx], train_path)
        frames["train"] = (train[parts[-1]], train_path)
    return frames


def ingest(
    schema: Schema, echo: Callable[[str], None] | None = None
) -> tuple[dict[str, dict[str, np.ndarray]], Encoders, FeatureLayout]:
    """Read, split, fit on train, and encode every split (``echo`` gets a line with the row counts)."""
    frames = load_splits(schema)
    if echo is not None:
        counts = ", ".join(f"{frame.height:,} {split}" for split, (frame, _) in frames.items())
        echo(f"ingesting {sum(f.height for f, _ in frames.values()):,} rows ({counts}) of schema '{schema.name}'")
    train, train_path = frames["train"]
    enc = fit_encoders(train, schema, train_path)
    arrays = {split: encode(frame, schema, enc, path) for split, (frame, path) in frames.items()}
    return arrays, enc, build_layout(schema, enc)


def encode_file(path: Path, schema: Schema, enc: Encoders, with_labels: bool) -> dict[str, np.ndarray]:
    """Encode a new file (prediction, evaluation) with already fitted encoders."""
    return encode(read_frame(path, schema), schema, enc, path, with_labels=with_labels)
