"""Columnar ingestion: read CSV/Parquet with polars, fit encoders on train, encode.

Encoders (vocabularies and numeric statistics) are fitted on the training
split only and stored as JSON beside the arrays, so prediction on new files
encodes exactly as training did. Every check of the input raises one
:class:`MtrecError` naming the file and the column.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from dataclasses import field as dataclass_field
from pathlib import Path

import numpy as np
import polars as pl

from mtrec.data.sources import assign_splits, load_side_tables, prepare_frame
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
            need.setdefault(t.label_column, f"task {t.name}")
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


_INT_TABLES: dict[int, tuple[object, pl.DataFrame, int, np.ndarray | None]] = {}  # id(table) -> its integer form
INTEGER_TOKEN = r"^(0|-?[1-9]\d{0,17})$"  # the text of an integer column's value (fits Int64)
LUT_LIMIT = 1 << 24  # integer tokens below this are looked up in an array indexed by value


def _int_table(key: object, table: pl.DataFrame, default: int) -> tuple[pl.DataFrame, int, np.ndarray | None]:
    """The integer tokens of a ``{token, id}`` table as an Int64-keyed table, the id of ``<null>``, and
    (when every integer token is in ``[0, LUT_LIMIT)``) an array of ids indexed by value: looking an integer
    column up by value gives the ids its text would get, without writing the text."""
    hit = _INT_TABLES.get(id(key))
    if hit is not None and hit[0] is key:
        return hit[1], hit[2], hit[3]
    ints = table.filter(pl.col("token").str.contains(INTEGER_TOKEN))
    ints = pl.DataFrame({"token": ints["token"].cast(pl.Int64), "id": ints["id"].cast(pl.Int64)})
    null_ids = table.filter(pl.col("token") == NULL_TOKEN)["id"]
    null = int(null_ids[0]) if len(null_ids) else default
    lut = None
    tokens = ints["token"].to_numpy()
    if tokens.size == 0 or (tokens.min() >= 0 and tokens.max() < LUT_LIMIT):
        lut = np.full(int(tokens.max()) + 1 if tokens.size else 1, default, dtype=np.int64)
        lut[tokens] = ints["id"].to_numpy()
    if len(_INT_TABLES) >= 256:
        _INT_TABLES.clear()
    _INT_TABLES[id(key)] = (key, ints, null, lut)
    return ints, null, lut


def _lookup_column(frame: pl.DataFrame, column: str, vocab: list[str] | pl.DataFrame, default: int = OOV) -> np.ndarray:
    """Ids of one column's values: in a fitted vocabulary (a token list), or in a ``{token, id}`` table;
    the same ids as ``_lookup(_as_text(...))``, faster: an integer column is looked up by value (in an
    array when the values are small), a text column once per distinct value."""
    table = vocab if isinstance(vocab, pl.DataFrame) else _vocab_table(vocab)
    raw = frame.get_column(column)
    if raw.dtype.is_integer() and raw.dtype not in (pl.UInt64, pl.Int128, pl.UInt128):
        ints, null, lut = _int_table(vocab, table, default)
        blank = raw.is_null().to_numpy() if raw.null_count() else None
        if lut is not None:
            values = (raw.cast(pl.Int64).fill_null(-1) if blank is not None else raw.cast(pl.Int64)).to_numpy()
            if values.size and values.min() >= 0 and values.max() < len(lut):  # all inside: one gather
                out = lut[values]
            else:
                inside = (values >= 0) & (values < len(lut))
                out = np.where(inside, lut[np.where(inside, values, 0)], default)
        else:
            ids = raw.cast(pl.Int64).replace_strict(ints["token"], ints["id"], default=default, return_dtype=pl.Int64)
            out = ids.to_numpy()
        if blank is not None:  # a blank cell is the token <null>
            out = np.where(blank, null, out)
        return out
    text = raw.cast(pl.String)
    distinct = text.unique().drop_nulls()
    distinct_ids = canonical_ids(distinct).replace_strict(
        table["token"], table["id"], default=default, return_dtype=pl.Int64
    )
    out = text.replace_strict(distinct, distinct_ids, default=default, return_dtype=pl.Int64).to_numpy()
    if text.null_count():
        null_ids = table.filter(pl.col("token") == NULL_TOKEN)["id"]
        out = np.where(text.is_null().to_numpy(), int(null_ids[0]) if len(null_ids) else default, out)
    return out


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
    raw = frame.get_column(t.label_column)
    where = f"{path}: column '{t.label_column}' (task {t.name})"
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
    values = _as_float(frame, t.label_column, path, f"task {t.name}")
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
    values = _as_float(frame, t.label_column, path, f"task {t.name}")
    if np.isinf(values).any():
        raise MtrecError(
            f"{path}: column '{t.label_column}' (task {t.name}) has {int(np.isinf(values).sum())} infinite label(s)"
        )
    return values


def read_labels(frame: pl.DataFrame, schema: Schema, path: Path) -> np.ndarray:
    """Labels ``[N, T]`` in the tasks' units. A blank label is unobserved: allowed outside its task's
    space (where the space's label is 0; stored as 0, and masked out of losses and metrics by the space),
    an error elsewhere, naming the file, the column and the count."""
    index = {t.name: i for i, t in enumerate(schema.tasks)}
    labels = np.zeros((frame.height, len(schema.tasks)), dtype=np.float32)
    text = [t.label_column for t in schema.tasks if frame.schema[t.label_column] == pl.String]
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
            raise MtrecError(f"{path}: column '{t.label_column}' (task {t.name}) has {count} missing label(s){where}")
        labels[:, index[t.name]] = np.where(missing, 0.0, values)
    return labels


def encode(
    frame: pl.DataFrame,
    schema: Schema,
    enc: Encoders,
    path: Path,
    with_labels: bool = True,
    users: pl.DataFrame | None = None,
) -> dict[str, np.ndarray]:
    """Encode a frame into arrays: ``sparse``, ``dense``, ``labels``, ``seq.<name>``, ``weight``, ``user``.
    ``users`` (``{token, id}``): the user ids of the whole split when ``frame`` is one chunk of it (else
    the dense rank of the user text within ``frame``)."""
    sparse, dense, arrays = encode_columns(frame, schema, enc, path, with_labels, users)
    n = frame.height
    # rows of columns, then one transposing copy: twice as fast as np.stack(axis=1)'s strided writes
    return {
        "sparse": np.ascontiguousarray(np.vstack(sparse).T) if sparse else np.zeros((n, 0), np.int64),
        "dense": (np.vstack(dense).T if dense else np.zeros((n, 0))).astype(np.float32, order="C"),
        **arrays,
    }


def encode_columns(
    frame: pl.DataFrame,
    schema: Schema,
    enc: Encoders,
    path: Path,
    with_labels: bool = True,
    users: pl.DataFrame | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray], dict[str, np.ndarray]]:
    """What :func:`encode` encodes, with the ``sparse`` and ``dense`` matrices left as their columns (the
    ids of each sparse feature; each dense feature standardised, float64): a chunked writer assembles the
    rows in small reused blocks instead of two whole-chunk copies (``encode``'s ``sparse`` is
    ``np.vstack(columns).T`` as int64, its ``dense`` the same as float32)."""
    check_columns(frame, path, schema, with_labels)
    n = frame.height
    features = schema.features_of("sparse")
    sparse = _in_threads(lambda f: _lookup_column(frame, f.source_column, enc.vocabs[f.name]), features, n)
    dense = []
    for f in schema.features_of("dense"):
        mean, std = enc.stats[f.name]
        dense.append((_dense_values(frame, f, path) - mean) / std)
    arrays: dict[str, np.ndarray] = {}
    for f in schema.features_of("sequence"):
        arrays[f"seq.{f.name}"] = _encode_sequence(frame, f, enc.vocabs[_vocab_owner(f)])
    if with_labels:
        arrays["labels"] = read_labels(frame, schema, path)
        weight = _sample_weights(frame, schema, arrays["labels"], path)
        if weight is not None:
            arrays["weight"] = weight
    else:
        arrays["labels"] = np.zeros((n, len(schema.tasks)), np.float32)
    if schema.user and users is not None:
        arrays["user"] = _lookup_column(frame, schema.user, users, default=0)
    elif schema.user:
        arrays["user"] = _as_text(frame, schema.user).rank("dense").to_numpy().astype(np.int64)
    return sparse, dense, arrays


_POOL: tuple[int, ThreadPoolExecutor] | None = None  # (pid that made it, pool): a forked child makes its own
THREADED_ROWS = 200_000  # frames from this size have their columns encoded on two threads


def _in_threads(fn: Callable[[FeatureSpec], np.ndarray], items: list[FeatureSpec], rows: int) -> list[np.ndarray]:
    """``[fn(x) for x in items]``, on two threads for a large frame (polars and numpy release the GIL)."""
    global _POOL
    if rows < THREADED_ROWS or len(items) < 2:
        return [fn(x) for x in items]
    if _POOL is None or _POOL[0] != os.getpid():
        _POOL = (os.getpid(), ThreadPoolExecutor(max_workers=2, thread_name_prefix="mtrec-encode"))
    return list(_POOL[1].map(fn, items))


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


def split_rows(n: int, shares: list[float], seed: int, sort: bool = True) -> list[np.ndarray]:
    """Seeded random split of ``range(n)``: one index array per share, the rest last (each sorted, unless
    ``sort`` is False: the same rows, in the permutation's order, for a caller that only scatters them)."""
    perm = np.random.default_rng(seed).permutation(n)
    out, start = [], 0
    for share in shares:
        size = int(round(n * share))
        part = perm[start : start + size]
        out.append(np.sort(part) if sort else part)
        start += size
    out.append(np.sort(perm[start:]) if sort else perm[start:])
    return out


def load_splits(schema: Schema, echo: Callable[[str], None] | None = None) -> dict[str, tuple[pl.DataFrame, Path]]:
    """Read the source files (side tables joined, derived labels added: :mod:`mtrec.data.sources`) and
    carve the missing splits from train (seeded at random, or by a column); ``echo`` gets the joins' counts."""
    paths = schema.source_paths()
    side = load_side_tables(schema)
    frames = {
        split: (prepare_frame(read_frame(path, schema), schema, side, path, echo=echo), path)
        for split, path in paths.items()
    }
    for frame, path in frames.values():
        check_columns(frame, path, schema)
        read_labels(frame, schema, path)  # label errors counted over the whole file, before any carving
    train, train_path = frames["train"]
    if schema.carves_by_column:  # split.by ranges or split.by_user shares
        carved = assign_splits(train, schema, train_path, carve=tuple(s for s in ("valid", "test") if s not in frames))
        frames.update({split: (part, train_path) for split, part in carved.items()})
        return frames
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
    frames = load_splits(schema, echo=echo)
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
