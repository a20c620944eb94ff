"""Chunked ingestion: a source larger than memory (one CSV/Parquet file or a directory of shards) is read
in chunks of rows and written into preallocated ``.npy`` files, in three passes with bounded memory.

1. **Count**: the rows of every file (Parquet metadata; a CSV is scanned), so the seeded random split
   assigns rows exactly as the in-memory path does (one permutation of the training file's row count,
   indexed per chunk).
2. **Fit**: every chunk is prepared (:func:`prepare_chunk`: side tables joined, derived labels added,
   split codes), checked, and the training rows update the encoders: vocabulary counts (merged across
   chunks, then ordered as :func:`mtrec.data.ingest.fit_encoders` orders them), dense and label
   statistics (over fixed blocks of rows: :class:`_Moments`), the distinct users
   of every split, and the row count of every split.
3. **Encode**: every chunk again, encoded with the fitted encoders and appended to its split's ``.npy``
   files, whose headers already hold the final shapes (the row counts of pass 2), so the store is
   written sequentially, one chunk in memory at a time, and opened memory-mapped afterwards. The sparse
   and dense matrices are assembled from their columns in small reused blocks of rows (:class:`_Blocks`),
   and a chunk is written on a writer thread while the next one is read and encoded.

Rows keep their file order inside every split, so any chunk size gives the same arrays, and these are
exactly the arrays of the in-memory path (:func:`mtrec.data.ingest.ingest`) up to a training split of
``STATS_BLOCK`` rows (beyond, the dense statistics are summed per block, which differs in the last bits).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import polars as pl

from mtrec.data.ingest import (
    LUT_LIMIT,
    NULL_TOKEN,
    OOV,
    PAD,
    Encoders,
    _dense_values,
    _sequence_tokens,
    build_layout,
    canonical_ids,
    check_columns,
    encode,
    encode_columns,
    read_labels,
    split_rows,
)
from mtrec.data.sources import TEST, TRAIN, VALID, JoinCount, derive_labels, join_side_tables, load_side_tables
from mtrec.data.sources import split_codes as column_split_codes
from mtrec.data.tables import FeatureLayout
from mtrec.errors import MtrecError
from mtrec.schema import FormatSpec, Schema

DEFAULT_CHUNK_ROWS = 1_000_000  # rows per chunk: a few hundred MB of a 30-column log
SUFFIXES = {"parquet": (".parquet", ".pq"), "csv": (".csv", ".csv.gz", ".tsv", ".txt", ".gz")}
CODES = {"train": TRAIN, "valid": VALID, "test": TEST}
COUNTS = {"token": pl.String, "n": pl.Int64}


def source_files(path: Path, fmt: FormatSpec) -> list[Path]:
    """The files of one source: ``path`` itself, or the shards of a directory (files named like the
    format, hidden ones skipped) in name order."""
    if path.is_dir():
        files = sorted(
            p
            for p in path.iterdir()
            if p.is_file() and not p.name.startswith((".", "_")) and p.name.lower().endswith(SUFFIXES[fmt.type])
        )
        if not files:
            raise MtrecError(f"{path}: a directory with no {fmt.type} files ({', '.join(SUFFIXES[fmt.type])})")
        return files
    if not path.is_file():
        raise MtrecError(f"{path}: data file not found")
    return [path]


def _scan(file: Path, fmt: FormatSpec) -> pl.LazyFrame:
    """A lazy scan read as :func:`mtrec.data.ingest.read_frame` reads (CSV columns as text)."""
    if fmt.type == "parquet":
        return pl.scan_parquet(file)
    return pl.scan_csv(
        file,
        has_header=fmt.header,
        separator=fmt.delimiter[0],
        new_columns=fmt.names,
        infer_schema=False,
        null_values=fmt.null_values or None,
        quote_char='"',
    )


def _cannot_read(file: Path, fmt: FormatSpec, err: Exception) -> MtrecError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return MtrecError(f"{file}: cannot read as {fmt.type} ({first})")


def count_rows(file: Path, fmt: FormatSpec) -> int:
    """Data rows of one file (Parquet: from its metadata)."""
    if file.stat().st_size == 0:
        raise MtrecError(f"{file}: the file is empty")
    try:
        return int(_scan(file, fmt).select(pl.len()).collect().item())
    except pl.exceptions.NoDataError:
        raise MtrecError(f"{file}: the file is empty") from None
    except (pl.exceptions.PolarsError, OSError) as err:
        raise _cannot_read(file, fmt, err) from None


def read_chunks(file: Path, fmt: FormatSpec, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Iterator[pl.DataFrame]:
    """The rows of ``file`` in frames of at most ``chunk_rows`` rows, each checked and cleaned as
    :func:`mtrec.data.ingest.read_frame` checks a whole file (the same errors, naming the file)."""
    if not file.is_file():
        raise MtrecError(f"{file}: data file not found")
    if file.stat().st_size == 0:
        raise MtrecError(f"{file}: the file is empty")
    rows = 0
    strip = fmt.type == "csv" and (len(fmt.delimiter) > 1 or fmt.delimiter[0] != fmt.delimiter)
    try:
        for frame in _scan(file, fmt).collect_batches(chunk_size=chunk_rows):
            if frame.height == 0:
                continue
            if fmt.type == "csv" and fmt.names and len(frame.columns) != len(fmt.names):
                raise MtrecError(f"{file}: {len(frame.columns)} columns, but format.names lists {len(fmt.names)}")
            if strip:
                frame = frame.with_columns(pl.all().str.strip_chars())
            rows += frame.height
            yield frame
    except pl.exceptions.NoDataError:
        raise MtrecError(f"{file}: the file is empty") from None
    except (pl.exceptions.ComputeError, pl.exceptions.ShapeError, pl.exceptions.SchemaError, OSError) as err:
        raise _cannot_read(file, fmt, err) from None
    if rows == 0:
        raise MtrecError(f"{file}: the file has no data rows")


STATS_BLOCK = 1 << 20  # rows per block of the dense and label statistics (independent of the chunk size)


class _Moments:
    """Mean and standard deviation of a stream of values, taken over fixed blocks of ``STATS_BLOCK``
    values (numpy's mean and sum of squared deviations per block, merged by Chan's pairwise update), so
    the figures do not depend on how the stream was cut into chunks; up to one block (every Census-sized
    training split) they are exactly ``values.mean()`` and ``values.std()`` of the in-memory path."""

    def __init__(self) -> None:
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, values: np.ndarray) -> None:
        self.buffer.append(np.asarray(values, dtype=np.float64))
        self.buffered += int(values.size)
        while self.buffered >= STATS_BLOCK:
            merged = np.concatenate(self.buffer)
            self._block(merged[:STATS_BLOCK])
            self.buffer, self.buffered = [merged[STATS_BLOCK:]], merged.size - STATS_BLOCK

    def _block(self, values: np.ndarray) -> None:
        n_b = int(values.size)
        if n_b == 0:
            return
        mean_b = float(values.mean())
        m2_b = float(np.sum(np.square(values - mean_b)))
        if self.n == 0:
            self.n, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean, self.m2 = self.mean + delta * n_b / n, self.m2 + m2_b + delta * delta * self.n * n_b / n
        self.n = n

    def result(self, empty_mean: float) -> list[float]:
        """``[mean, std]`` (a std of 0 is 1: the feature is only centred); ``[empty_mean, 1]`` without values."""
        if self.buffered:
            self._block(np.concatenate(self.buffer))
            self.buffer, self.buffered = [], 0
        if self.n == 0:
            return [empty_mean, 1.0]
        std = math.sqrt(self.m2 / self.n)
        return [self.mean, std if std > 0 else 1.0]


def _small_ints(raw: pl.Series) -> np.ndarray | None:
    """The non-blank values of an integer column as int64 when all lie in ``[0, LUT_LIMIT)`` (so they
    can be counted with ``np.bincount``), else None."""
    if not raw.dtype.is_integer() or raw.dtype in (pl.UInt64, pl.Int128, pl.UInt128):
        return None
    values = raw.drop_nulls().cast(pl.Int64).to_numpy()
    if values.size and (values.min() < 0 or values.max() >= LUT_LIMIT):
        return None
    return values


def _tokens_counted(raw: pl.Series) -> pl.DataFrame:
    """``{token, n}`` of one sparse column, the tokens as :func:`_as_text` writes them: values are
    counted first and only the distinct ones are written as (canonical) text."""
    if raw.dtype.is_integer():
        counts = raw.value_counts(name="n")
        token = counts.to_series(0).cast(pl.String).fill_null(NULL_TOKEN)
        return pl.DataFrame({"token": token, "n": counts.get_column("n").cast(pl.Int64)})
    counts = raw.cast(pl.String).value_counts(name="n")
    token = canonical_ids(counts.to_series(0)).fill_null(NULL_TOKEN)
    frame = pl.DataFrame({"token": token, "n": counts.get_column("n").cast(pl.Int64)})
    return frame.group_by("token").agg(pl.col("n").sum())  # "617" and "617.0" are one token


def _distinct_text(raw: pl.Series) -> pl.Series:
    """The distinct values of a column as :func:`_as_text` writes them."""
    return canonical_ids(raw.unique().cast(pl.String)).fill_null(NULL_TOKEN).unique()


@dataclass
class _Fit:
    """The encoders' statistics, accumulated over the training rows of every chunk."""

    schema: Schema
    counts: dict[str, list[pl.DataFrame]] = field(default_factory=dict)
    int_counts: dict[str, np.ndarray] = field(default_factory=dict)  # value -> count, for small integers
    dense: dict[str, _Moments] = field(default_factory=dict)
    labels: dict[str, _Moments] = field(default_factory=dict)

    def add(self, frame: pl.DataFrame, path: Path) -> None:
        schema = self.schema
        for f in schema.features:
            if f.type == "dense" or f.vocab is not None:
                continue
            if f.type == "sparse":
                raw = frame.get_column(f.source_column)
                values = _small_ints(raw)
                if values is not None:  # counted by value; the blanks are the token <null>
                    counted_ints = np.bincount(values)
                    before = self.int_counts.get(f.name)
                    if before is not None:
                        if len(before) > len(counted_ints):
                            before, counted_ints = counted_ints, before
                        counted_ints[: len(before)] += before
                    self.int_counts[f.name] = counted_ints
                    if not raw.null_count():
                        continue
                    counted = pl.DataFrame({"token": [NULL_TOKEN], "n": [raw.null_count()]}, schema=COUNTS)
                else:
                    counted = _tokens_counted(raw)
            else:
                tokens = _sequence_tokens(frame, f).explode().drop_nulls()
                tokens = tokens.filter(tokens != "")
                counts = tokens.value_counts(name="n")
                counted = pl.DataFrame({"token": counts.to_series(0), "n": counts.get_column("n").cast(pl.Int64)})
            bucket = self.counts.setdefault(f.name, [])
            bucket.append(counted)
            if len(bucket) >= 8:  # merge now and then: memory stays the size of the vocabulary
                self.counts[f.name] = [pl.concat(bucket).group_by("token").agg(pl.col("n").sum())]
        for f in schema.features_of("dense"):
            self.dense.setdefault(f.name, _Moments()).add(_dense_values(frame, f, path))
        wanted = [t for t in schema.tasks if t.standardized]
        if wanted:
            labels = read_labels(frame, schema, path)
            for t in wanted:
                values = labels[:, schema.tasks.index(t)].astype(np.float64)
                if t.space is not None:
                    values = values[labels[:, schema.task_names.index(t.space)] > 0.5]
                self.labels.setdefault(t.name, _Moments()).add(values)

    def encoders(self) -> Encoders:
        vocabs: dict[str, list[str]] = {}
        for f in self.schema.features:
            if f.type == "dense" or f.vocab is not None:
                continue
            parts = list(self.counts.get(f.name, []))
            if f.name in self.int_counts:
                counted_ints = self.int_counts[f.name]
                values = np.flatnonzero(counted_ints)
                token = pl.Series(values, dtype=pl.Int64).cast(pl.String)
                parts.append(pl.DataFrame({"token": token, "n": counted_ints[values].astype(np.int64)}, schema=COUNTS))
            counts = (
                pl.concat(parts).group_by("token").agg(pl.col("n").sum())
                if parts
                else pl.DataFrame({"token": [], "n": []}, schema=COUNTS)
            )
            counts = counts.filter(pl.col("n") >= f.min_freq).sort(["n", "token"], descending=[True, False])
            vocabs[f.name] = counts.get_column("token").to_list()
        stats = {
            f.name: self.dense.get(f.name, _Moments()).result(float("nan")) for f in self.schema.features_of("dense")
        }
        labels = {t.name: self.labels.get(t.name, _Moments()).result(0.0) for t in self.schema.tasks if t.standardized}
        return Encoders(vocabs=vocabs, stats=stats, labels=labels)


@dataclass
class _Source:
    split: str
    path: Path
    files: list[Path]


def _sources(schema: Schema) -> list[_Source]:
    return [_Source(split, path, source_files(path, schema.format)) for split, path in schema.source_paths().items()]


def _carved(schema: Schema, sources: list[_Source]) -> list[str]:
    """The splits carved from the training source, in the order today's random split draws them."""
    given = {s.split for s in sources}
    if schema.carves_by_column:
        split = schema.split
        assert split is not None
        configured = {
            "valid": True,
            "test": isinstance(split.test, list) or bool(split.by_user is not None and split.test),
        }
        return [s for s in ("valid", "test") if s not in given and configured[s]]
    carve = []
    if "valid" not in given and schema.valid_share > 0:
        carve.append("valid")
    if "test" not in given and schema.test_share > 0:
        carve.append("test")
    return carve


class ChunkedSource:
    """The prepared chunks of a schema's sources: read, joined with the side tables, derived labels added,
    and each row's split (``prepare_chunk``); the random split is assigned over the training file's rows."""

    def __init__(self, schema: Schema, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> None:
        self.schema = schema
        self.chunk_rows = chunk_rows
        self.sources = _sources(schema)
        self.side = load_side_tables(schema)
        self.carve = _carved(schema, self.sources)
        self.join_counts: dict[tuple[Path, int], JoinCount] = {}  # (source, side table) -> missing keys
        self.assignment: np.ndarray | None = None
        if self.carve and not schema.carves_by_column:
            train = self.sources[0]
            drops = any(t.spec.missing == "drop" for t in self.side)
            if drops:  # the rows the split permutes are those left after the joins
                n = sum(frame.height for _, frame, _ in self._prepared(train, count=False))
            else:
                n = sum(count_rows(file, schema.format) for file in train.files)
            shares = [schema.valid_share if s == "valid" else schema.test_share for s in self.carve]
            self.assignment = np.zeros(n, dtype=np.int8)
            for name, idx in zip(self.carve, split_rows(n, shares, schema.split_seed, sort=False)[:-1]):
                self.assignment[idx] = CODES[name]

    def _prepared(self, source: _Source, count: bool = True) -> Iterator[tuple[Path, pl.DataFrame, int]]:
        offset = 0
        for file in source.files:
            for raw in read_chunks(file, self.schema.format, self.chunk_rows):
                frame = self.prepare_chunk(raw, file, source.path if count else None)
                yield file, frame, offset
                offset += frame.height

    def prepare_chunk(self, frame: pl.DataFrame, file: Path, count_for: Path | None = None) -> pl.DataFrame:
        """One chunk made ready to encode: side tables joined (missing keys counted for the source
        ``count_for`` when given), derived labels added."""
        if self.side:
            frame, counts = join_side_tables(frame, self.side, file)
            if count_for is not None:
                for i, c in enumerate(counts):
                    old = self.join_counts.get((count_for, i))
                    if old is None:
                        self.join_counts[(count_for, i)] = c
                    else:
                        old.rows += c.rows
                        old.missing += c.missing
                        old.example = old.example or c.example
        return derive_labels(frame, self.schema, file)

    def chunks(self, count: bool = False) -> Iterator[tuple[str, pl.DataFrame, Path, pl.DataFrame, int]]:
        """``(split, part, file, whole chunk, chunk number)`` for every part of every prepared chunk, in
        file order (``count``: count the side tables' missing keys, once per ingestion)."""
        number = 0
        for source in self.sources:
            for file, frame, offset in self._prepared(source, count):
                number += 1
                if source.split != "train" or not self.carve:
                    yield source.split, frame, file, frame, number
                    continue
                if self.assignment is not None:
                    codes = self.assignment[offset : offset + frame.height]
                else:
                    codes = column_split_codes(frame, self.schema, file)
                for name in ("train", *self.carve):
                    mask = codes == CODES[name]
                    if mask.all():
                        yield name, frame, file, frame, number
                    elif mask.any():
                        yield name, frame.filter(pl.Series(mask)), file, frame, number

    def echo_joins(self, echo: Callable[[str], None] | None) -> None:
        if echo is not None:
            for (path, _), c in self.join_counts.items():
                echo(c.line(path))


class OovCounter:
    """Out-of-vocabulary counts summed over encoded chunks; :meth:`rates` gives what
    :func:`mtrec.data.ingest.oov_rates` gives for the whole input at once."""

    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self.oov: dict[str, int] = {}
        self.total: dict[str, int] = {}

    def add(self, arrays: dict[str, np.ndarray]) -> None:
        for j, f in enumerate(self.schema.features_of("sparse")):
            column = arrays["sparse"][:, j]
            self._count(f.name, int((column == OOV).sum()), int(column.size))
        for f in self.schema.features_of("sequence"):
            ids = arrays[f"seq.{f.name}"]
            self._count(f.name, int((ids == OOV).sum()), int((ids != PAD).sum()))

    def _count(self, name: str, oov: int, total: int) -> None:
        self.oov[name] = self.oov.get(name, 0) + oov
        self.total[name] = self.total.get(name, 0) + total

    def rates(self) -> dict[str, float]:
        return {name: self.oov[name] / n if n else 0.0 for name, n in self.total.items()}


class _Users:
    """The distinct users of one split, gathered chunk by chunk: small non-negative integer ids as a
    presence array, anything else as text."""

    def __init__(self) -> None:
        self.present: np.ndarray | None = None
        self.text: list[pl.Series] = []

    def add(self, raw: pl.Series) -> None:
        values = _small_ints(raw)
        if values is None:
            self.text.append(_distinct_text(raw))
            if len(self.text) >= 8:
                self.text = [pl.concat(self.text).unique()]
            return
        if raw.null_count():
            self.text.append(pl.Series([NULL_TOKEN]))
        seen = np.zeros(int(values.max()) + 1 if values.size else 0, dtype=bool)
        seen[values] = True
        if self.present is not None and len(self.present) > len(seen):
            seen, self.present = self.present, seen
        if self.present is not None:
            seen[: len(self.present)] |= self.present
        self.present = seen

    def table(self) -> pl.DataFrame:
        """Token -> the 1-based dense rank of the token among the split's users (``rank("dense")`` of the
        user text, which is what the in-memory path numbers users by)."""
        parts = list(self.text)
        if self.present is not None:
            parts.append(pl.Series(np.flatnonzero(self.present), dtype=pl.Int64).cast(pl.String))
        users = pl.concat(parts).unique().sort() if parts else pl.Series([], dtype=pl.String)
        return pl.DataFrame({"token": users, "id": np.arange(1, len(users) + 1, dtype=np.int64)})


def ingest_to(
    schema: Schema,
    folder: Path,
    echo: Callable[[str], None] | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> tuple[Encoders, FeatureLayout, dict[str, dict]]:
    """Ingest ``schema`` chunk by chunk into ``.npy`` files ``{split}.{array}.npy`` in ``folder``; returns
    the encoders, the layout and ``{split: {"rows": n, "arrays": [names]}}`` for the store's meta."""
    source = ChunkedSource(schema, chunk_rows)
    fit = _Fit(schema)
    rows: dict[str, int] = {}
    users: dict[str, _Users] = {}
    checked = 0
    for split, part, file, whole, number in source.chunks(count=True):
        if number != checked:  # label errors over the whole chunk, before it is carved
            checked = number
            check_columns(whole, file, schema)
            read_labels(whole, schema, file)
        rows[split] = rows.get(split, 0) + part.height
        if split == "train":
            fit.add(part, file)
        if schema.user:
            users.setdefault(split, _Users()).add(part.get_column(schema.user))
    _check_carved(schema, source, rows)
    source.echo_joins(echo)
    order = [s.split for s in source.sources] + source.carve
    rows = {split: rows.get(split, 0) for split in order}
    if echo is not None:
        counts = ", ".join(f"{n:,} {split}" for split, n in rows.items())
        echo(f"ingesting {sum(rows.values()):,} rows ({counts}) of schema '{schema.name}'")
    enc = fit.encoders()
    layout = build_layout(schema, enc)
    tables = {split: found.table() for split, found in users.items()}
    written: dict[str, dict[str, tuple[BinaryIO | None, np.dtype, tuple[int, ...]]]] = {}
    offsets = dict.fromkeys(rows, 0)
    blocks = _Blocks()
    # one writer thread: a part's arrays are written while the next part is read and encoded (the store is
    # larger than the page cache takes without throttling, so its writes wait on the disk)
    with ExitStack() as files, ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtrec-store") as writer:
        pending: Future[None] | None = None
        for split, part, file, _, _ in source.chunks():
            sparse, dense, encoded = encode_columns(part, schema, enc, file, users=tables.get(split))
            arrays: dict[str, np.ndarray | _Columns] = {
                "sparse": _Columns(sparse, np.result_type(*sparse) if sparse else np.dtype(np.int64), part.height),
                "dense": _Columns(dense, np.dtype(np.float32), part.height),
                **encoded,
            }
            if pending is not None:  # the previous part is written before any file is touched again
                pending.result()
                pending = None
            if split not in written:  # each array's .npy header (its final shape), then rows appended
                written[split] = {}
                for key, value in arrays.items():
                    shape = (rows[split], *value.shape[1:])
                    out = files.enter_context(open(folder / f"{split}.{key}.npy", "wb"))
                    header = {
                        "descr": np.lib.format.dtype_to_descr(value.dtype),
                        "fortran_order": False,
                        "shape": shape,
                    }
                    np.lib.format.write_array_header_1_0(out, header)
                    written[split][key] = (out, value.dtype, shape)
            jobs: list[tuple[BinaryIO, np.ndarray | _Columns]] = []
            for key, value in arrays.items():
                handle, dtype, shape = written[split][key]
                if handle is None or value.dtype != dtype or value.shape[1:] != shape[1:]:
                    raise AssertionError(f"{split}.{key}: a chunk encoded as {value.dtype}{value.shape}")
                jobs.append((handle, value))
            pending = writer.submit(blocks.write_all, jobs)
            offsets[split] += part.height
        if pending is not None:
            pending.result()
        for split in rows:
            if split not in written:  # a split without rows still has its (empty) arrays
                empty = encode(_empty_like(schema, source), schema, enc, source.sources[0].path, users=None)
                for key, value in empty.items():
                    np.save(folder / f"{split}.{key}.npy", value[:0])
                written[split] = {key: (None, value.dtype, value.shape) for key, value in empty.items()}
    if any(offsets[split] != n for split, n in rows.items()):  # the second pass must see the rows of the first
        raise MtrecError(f"schema '{schema.name}': the source changed during ingestion; run again")
    meta = {split: {"rows": int(n), "arrays": sorted(written[split])} for split, n in rows.items()}
    return enc, layout, meta


BLOCK_BYTES = 1 << 19  # rows are assembled from their columns in blocks of about this size (cache-sized)


@dataclass
class _Columns:
    """A matrix ``[rows, len(columns)]`` of ``dtype`` given as its columns, not yet assembled."""

    columns: list[np.ndarray]
    dtype: np.dtype
    rows: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, len(self.columns))


class _Blocks:
    """Writes a :class:`_Columns` matrix row-major to a file through a reused block buffer: each block of
    rows is filled column by column (the cast to the matrix's dtype as ``astype`` casts) and written, so a
    chunk is never assembled whole (two copies of fresh memory: the slowest part of encoding a chunk)."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[np.dtype, int], np.ndarray] = {}

    def write(self, matrix: _Columns, handle: BinaryIO) -> None:
        width = len(matrix.columns)
        if width == 0 or matrix.rows == 0:
            return
        per = max(1, BLOCK_BYTES // (width * matrix.dtype.itemsize))
        key = (matrix.dtype, width)
        buffer = self.buffers.get(key)
        if buffer is None:
            buffer = self.buffers[key] = np.empty((per, width), dtype=matrix.dtype)
        for start in range(0, matrix.rows, per):
            stop = min(start + per, matrix.rows)
            block = buffer[: stop - start]
            for j, column in enumerate(matrix.columns):
                block[:, j] = column[start:stop]
            block.tofile(handle)

    def write_all(self, jobs: list[tuple[BinaryIO, np.ndarray | _Columns]]) -> None:
        """Append each array (or matrix of columns) to its file, in order."""
        for handle, value in jobs:
            if isinstance(value, _Columns):
                self.write(value, handle)
            else:
                np.ascontiguousarray(value).tofile(handle)


def _empty_like(schema: Schema, source: ChunkedSource) -> pl.DataFrame:
    """A frame with no rows and the training source's columns (for a split no row fell into)."""
    for _, frame, _, _, _ in source.chunks():
        return frame.head(0)
    raise MtrecError(f"schema '{schema.name}': the sources have no rows")


def _check_carved(schema: Schema, source: ChunkedSource, rows: dict[str, int]) -> None:
    """A split carved by a column that no row falls into, or no training row left, is an error (as in
    :func:`mtrec.data.sources.assign_splits`)."""
    if not schema.carves_by_column:
        return
    split = schema.split
    assert split is not None
    path = source.sources[0].path
    for name in source.carve:
        if rows.get(name, 0) == 0:
            what = f"{split.by} in {getattr(split, name)}" if split.by else f"users in a {name} share"
            raise MtrecError(f"{path}: no row falls in split.{name} ({what}); check split.{name}")
    if rows.get("train", 0) == 0:
        raise MtrecError(f"{path}: no training row is left outside split.valid and split.test")
