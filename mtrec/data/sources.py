"""Multi-table logs: side-table joins, derived labels and column-driven splits, one frame at a time.

Each function works on ONE polars DataFrame (a whole file, or one chunk of a file streamed in pieces),
so the in-memory path (:func:`mtrec.data.ingest.load_splits`) and a chunked one call the same code:

1. :func:`load_side_tables` reads the schema's side tables once (``join:``);
2. :func:`join_side_tables` joins them to a frame of the log, counting the log keys each table lacks and
   handling them by the join's ``missing`` policy (``error``, ``drop`` or ``fill``), never silently;
3. :func:`derive_labels` writes each derived label (``label: {column, divide_by, ge, ...}``) into the
   column :attr:`mtrec.schema.TaskSpec.label_column` names, where the label readers find it;
4. :func:`split_codes` gives each row its split (0 train, 1 valid, 2 test) for ``split.by`` (ranges of a
   column) and ``split.by_user`` (a hash of the user id and ``split_seed``: the same user always lands in
   the same split, in whichever chunk it appears); :func:`assign_splits` applies it to a whole file, and
   falls back to today's seeded random carving for ``split: {valid, test}``.

Every problem is one :class:`MtrecError` naming the file, the column and the schema field.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from mtrec.errors import MtrecError
from mtrec.schema import FormatSpec, JoinSpec, Schema, TaskSpec

KEY = "__mtrec_join_key"  # the canonical join key, added to the side table and the log while joining
HIT = "__mtrec_join_hit"  # true on every side-table row: null after the join where the log key is absent
TRAIN, VALID, TEST = 0, 1, 2
SPLIT_NAMES = ("train", "valid", "test")


@dataclass
class SideTable:
    """One side table, read once: its join spec, file, and rows (the canonical key plus the columns taken)."""

    index: int
    spec: JoinSpec
    path: Path
    frame: pl.DataFrame


@dataclass
class JoinCount:
    """How many rows of a log frame a side table had no row for, and what was done with them."""

    source: Path
    on: str
    rows: int
    missing: int
    policy: str
    example: str | None = None

    def line(self, where: Path) -> str:
        """One line for the ingestion log, e.g. ``join user_features.csv on user_id: 12 of 5,000 rows ...``."""
        done = {"drop": "dropped", "fill": "kept, side columns blank", "error": "refused"}[self.policy]
        return (
            f"join {self.source.name} on {self.on}: {self.missing:,} of {self.rows:,} rows of {where.name} "
            f"have no match" + (f" ({done})" if self.missing else "")
        )


def _canonical_key(column: pl.Series) -> pl.Series:
    from mtrec.data.ingest import canonical_ids

    return canonical_ids(column.cast(pl.String))


def load_side_tables(schema: Schema) -> list[SideTable]:
    """Read every ``join`` table of ``schema`` (once per ingestion): the key made canonical (``617.0`` is
    ``617``), the columns taken, and a check that a key appears at most once."""
    from mtrec.data.ingest import read_frame

    out = []
    for i, (spec, path) in enumerate(zip(schema.join, schema.join_paths())):
        fmt = FormatSpec(type="parquet" if path.suffix.lower() == ".parquet" else "csv")
        fmt = fmt.model_copy(update={"null_values": schema.format.null_values})
        frame = read_frame(path, schema.model_copy(update={"format": fmt}))
        where = f"{path} (join[{i}])"
        if spec.on not in frame.columns:
            raise MtrecError(f"{where}: key column '{spec.on}' (join[{i}].on) not found; the file has: {_shown(frame)}")
        taken = spec.columns if spec.columns is not None else [c for c in frame.columns if c != spec.on]
        if absent := [c for c in taken if c not in frame.columns]:
            raise MtrecError(f"{where}: column(s) {', '.join(absent)} (join[{i}].columns) not found")
        key = _canonical_key(frame.get_column(spec.on))
        duplicated = key.is_duplicated() & key.is_not_null()
        if duplicated.any():
            raise MtrecError(
                f"{where}: key '{key.filter(duplicated)[0]}' of column '{spec.on}' appears "
                f"{int((key == key.filter(duplicated)[0]).sum())} times; a side table holds one row per key"
            )
        side = (
            frame.select(taken).with_columns(key.alias(KEY), pl.lit(True).alias(HIT)).filter(pl.col(KEY).is_not_null())
        )
        out.append(SideTable(i, spec, path, side))
    seen: dict[str, Path] = {}
    for table in out:
        for column in table.frame.columns:
            if column in (KEY, HIT):
                continue
            if column in seen:
                raise MtrecError(
                    f"{table.path} (join[{table.index}]): column '{column}' is also in {seen[column]}; "
                    f"list the columns to take in join[{table.index}].columns"
                )
            seen[column] = table.path
    return out


def _shown(frame: pl.DataFrame) -> str:
    return ", ".join(frame.columns[:12]) + (", ..." if len(frame.columns) > 12 else "")


def join_side_tables(
    frame: pl.DataFrame, side: list[SideTable], path: Path, scoring: bool = False
) -> tuple[pl.DataFrame, list[JoinCount]]:
    """``frame`` (rows of the log read from ``path``) with the side tables' columns joined on their keys,
    in the log's row order, and one :class:`JoinCount` per table. A log key a table lacks (or a blank key)
    is handled by the table's ``missing`` policy: ``error`` raises naming the count and an example,
    ``drop`` removes the row, ``fill`` keeps it with the side columns blank. ``scoring`` (prediction):
    every input row must get a score, so ``drop`` keeps the row as ``fill`` does."""
    counts = []
    for table in side:
        spec = table.spec
        if spec.on not in frame.columns:
            raise MtrecError(
                f"{path}: column '{spec.on}' (join[{table.index}].on, the key of {table.path.name}) not found; "
                f"the file has: {_shown(frame)}"
            )
        if clash := [c for c in table.frame.columns if c in frame.columns]:
            raise MtrecError(
                f"{path}: column '{clash[0]}' is in the log and in {table.path} (join[{table.index}]); "
                f"list the columns to take in join[{table.index}].columns"
            )
        keyed = frame.with_columns(_canonical_key(frame.get_column(spec.on)).alias(KEY))
        joined = keyed.join(table.frame, on=KEY, how="left", maintain_order="left").drop(KEY)
        hit = joined.get_column(HIT).is_not_null()
        missing = int((~hit).sum())
        example = None
        if missing:
            example = str(joined.get_column(spec.on).filter(~hit)[0])
        count = JoinCount(table.path, spec.on, frame.height, missing, spec.missing, example)
        counts.append(count)
        if missing and spec.missing == "error":
            raise MtrecError(
                f"{path}: {missing:,} of {frame.height:,} rows have a {spec.on} that {table.path} lacks "
                f"(e.g. '{example}'); join[{table.index}].missing is error: set it to drop or fill to accept them"
            )
        if spec.missing == "drop" and not scoring:
            joined = joined.filter(hit)
        frame = joined.drop(HIT)
    return frame, counts


def _numbers(frame: pl.DataFrame, column: str, path: Path, owner: str) -> pl.Series:
    """The column as Float64 (null where blank); a value that is not a number is an error naming it."""
    if column not in frame.columns:
        raise MtrecError(f"{path}: column '{column}' ({owner}) not found; the file has: {_shown(frame)}")
    raw = frame.get_column(column)
    if raw.dtype == pl.String:
        raw = pl.Series(column, raw.str.strip_chars()).replace("", None)
    values = raw.cast(pl.Float64, strict=False)
    bad = values.is_null() & raw.is_not_null()
    if bad.any():
        raise MtrecError(f"{path}: column '{column}' ({owner}) has a non-numeric value '{raw.filter(bad)[0]}'")
    return values


def derive_label(frame: pl.DataFrame, task: TaskSpec, path: Path) -> pl.Series:
    """The derived label of ``task`` (its ``label`` is a mapping) as Float64, null where the value is blank:
    ``column`` (divided by ``divide_by``), compared (binary: 1.0 or 0.0) or transformed (regression)."""
    spec = task.label
    assert not isinstance(spec, str), "derive_label takes a task whose label is derived"
    values = _numbers(frame, spec.column, path, f"task {task.name} label.column")
    if spec.divide_by is not None:
        divisor = _numbers(frame, spec.divide_by, path, f"task {task.name} label.divide_by")
        bad = values.is_not_null() & (divisor.is_null() | (divisor == 0)).fill_null(True)
        if bad.any():
            raise MtrecError(
                f"{path}: column '{spec.divide_by}' (task {task.name} label.divide_by) is 0 or blank in "
                f"{int(bad.sum()):,} row(s) with a '{spec.column}' value; the ratio is undefined there"
            )
        values = values / divisor
    comparison = spec.comparison
    if comparison is not None:
        op, threshold = comparison
        test = {
            "ge": values >= threshold,
            "gt": values > threshold,
            "le": values <= threshold,
            "lt": values < threshold,
            "eq": values == threshold,
        }[op]
        return test.cast(pl.Float64).alias(task.label_column)
    if spec.transform == "log1p":
        low = values < -1
        if low.fill_null(False).any():
            raise MtrecError(
                f"{path}: column '{spec.column}' (task {task.name}, transform log1p) has "
                f"{int(low.fill_null(False).sum())} value(s) below -1 (e.g. {values.filter(low.fill_null(False))[0]})"
            )
        values = values.log1p()
    return values.alias(task.label_column)


def derive_labels(frame: pl.DataFrame, schema: Schema, path: Path) -> pl.DataFrame:
    """``frame`` with every derived label of ``schema`` added in the column its task reads
    (:attr:`~mtrec.schema.TaskSpec.label_column`); a schema without derived labels returns it unchanged."""
    derived = [derive_label(frame, t, path) for t in schema.tasks if not isinstance(t.label, str)]
    return frame.with_columns(derived) if derived else frame


def _user_shares(users: pl.Series, seed: int) -> pl.Series:
    """Per row, a number in [0, 1) that depends only on the user id and ``seed`` (blake2b of both: stable
    across processes, polars versions and chunks), hashed once per distinct user."""
    from mtrec.data.ingest import NULL_TOKEN, canonical_ids

    text = canonical_ids(users.cast(pl.String)).fill_null(NULL_TOKEN)
    distinct = text.unique()
    shares = [
        int.from_bytes(hashlib.blake2b(f"{seed}:{u}".encode(), digest_size=8).digest(), "big") / 2.0**64
        for u in distinct.to_list()
    ]
    table = pl.DataFrame({"u": distinct, "share": pl.Series(shares, dtype=pl.Float64)})
    return text.replace_strict(table["u"], table["share"], return_dtype=pl.Float64)


def _in_range(frame: pl.DataFrame, column: str, bounds: list, path: Path, field: str) -> pl.Series:
    """Whether each row's ``column`` lies in ``[FROM, TO]`` (both ends inclusive): as numbers when both
    bounds are numbers, else as text (ISO dates compare correctly as text)."""
    low, high = bounds
    number = (int, float)
    if isinstance(low, number) and isinstance(high, number):
        values = _numbers(frame, column, path, field)
        if values.is_null().any():
            raise MtrecError(f"{path}: column '{column}' ({field}) has {int(values.is_null().sum())} blank value(s)")
        return (values >= low) & (values <= high)
    text = frame.get_column(column).cast(pl.String)
    if text.is_null().any():
        raise MtrecError(f"{path}: column '{column}' ({field}) has {int(text.is_null().sum())} blank value(s)")
    return (text >= str(low)) & (text <= str(high))


def split_codes(frame: pl.DataFrame, schema: Schema, path: Path) -> np.ndarray:
    """Per row, its split: 0 train, 1 valid, 2 test (``int8``), for a schema whose splits come from a
    column (``split.by`` or ``split.by_user``); it depends on the row alone, so chunks may be split apart."""
    split = schema.split
    if split is None or (split.by is None and split.by_user is None):
        raise ValueError("split_codes needs split.by or split.by_user (a random split needs the whole file)")
    codes = np.zeros(frame.height, dtype=np.int8)
    if split.by is not None:
        if split.by not in frame.columns:
            raise MtrecError(f"{path}: column '{split.by}' (split.by) not found; the file has: {_shown(frame)}")
        assert isinstance(split.valid, list)
        codes[_in_range(frame, split.by, split.valid, path, "split.by").to_numpy()] = VALID
        if isinstance(split.test, list):
            codes[_in_range(frame, split.by, split.test, path, "split.by").to_numpy()] = TEST
        return codes
    column = split.by_user
    assert column is not None
    if column not in frame.columns:
        raise MtrecError(f"{path}: column '{column}' (split.by_user) not found; the file has: {_shown(frame)}")
    share = _user_shares(frame.get_column(column), schema.split_seed).to_numpy()
    valid, test = float(split.valid), float(split.test)  # type: ignore[arg-type]
    codes[share < valid] = VALID
    codes[(share >= valid) & (share < valid + test)] = TEST
    return codes


def assign_splits(
    frame: pl.DataFrame, schema: Schema, path: Path, carve: tuple[str, ...] = ("valid", "test")
) -> dict[str, pl.DataFrame]:
    """The training file ``frame`` cut into ``train`` and the splits of ``carve`` it provides: by a column
    (:func:`split_codes`; a configured split that no row falls into is an error), else at random exactly
    as before (seeded by ``split_seed``, over the whole file)."""
    if schema.carves_by_column:
        codes = split_codes(frame, schema, path)
        split = schema.split
        assert split is not None
        configured = {"valid": True, "test": isinstance(split.test, list) or (split.by_user is not None and split.test)}
        out = {"train": frame.filter(pl.Series(codes == TRAIN))}
        for code, name in ((VALID, "valid"), (TEST, "test")):
            if name not in carve or not configured[name]:
                continue
            part = frame.filter(pl.Series(codes == code))
            if part.height == 0:
                what = f"{split.by} in {getattr(split, name)}" if split.by else f"users in a {name} share"
                raise MtrecError(f"{path}: no row falls in split.{name} ({what}); check split.{name}")
            out[name] = part
        if out["train"].height == 0:
            raise MtrecError(f"{path}: no training row is left outside split.valid and split.test")
        return out
    from mtrec.data.ingest import split_rows

    wanted = [s for s in carve if (schema.valid_share if s == "valid" else schema.test_share) > 0]
    if not wanted:
        return {"train": frame}
    shares = [schema.valid_share if s == "valid" else schema.test_share for s in wanted]
    parts = split_rows(frame.height, shares, schema.split_seed)
    out = {name: frame[idx] for name, idx in zip(wanted, parts[:-1])}
    out["train"] = frame[parts[-1]]
    return out


def prepare_frame(
    frame: pl.DataFrame,
    schema: Schema,
    side: list[SideTable],
    path: Path,
    with_labels: bool = True,
    echo: Callable[[str], None] | None = None,
) -> pl.DataFrame:
    """A frame of the log made ready to encode: side tables joined, then (``with_labels``) derived labels
    added; ``echo`` gets a line per side table with its missing-key count."""
    frame, counts = join_side_tables(frame, side, path, scoring=not with_labels)
    if echo is not None:
        for count in counts:
            echo(count.line(path))
    return derive_labels(frame, schema, path) if with_labels else frame
