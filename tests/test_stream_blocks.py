"""Chunked ingestion's writer: the store's matrices assembled from their columns in small blocks of rows on
a writer thread are exactly the arrays of the in-memory ingest (issue 13, ingestion speed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import mtrec.data.stream as stream
from mtrec.data.ingest import _lookup_column, _vocab_table, ingest
from mtrec.data.stream import ingest_to
from mtrec.schema import load_schema
from tests.test_stream import _arrays, _log, _same_arrays, _schema


def test_rows_written_in_small_blocks_are_the_in_memory_arrays(tmp_path: Path, monkeypatch) -> None:
    """Blocks of 4 sparse rows (3 int64 columns in 100 bytes) and 25 dense rows, chunks of 101 rows: every
    chunk spans many blocks and ends in a partial one; integer ids with blanks, text ids and users."""
    monkeypatch.setattr(stream, "BLOCK_BYTES", 100)
    _log(900).write_parquet(tmp_path / "all.parquet")
    schema = load_schema(_schema(tmp_path, "all.parquet"))
    (tmp_path / "out").mkdir()
    enc, _, meta = ingest_to(schema, tmp_path / "out", chunk_rows=101)
    reference, enc_memory, _ = ingest(schema)
    assert enc == enc_memory
    assert {split: info["rows"] for split, info in meta.items()} == {"train": 630, "valid": 180, "test": 90}
    _same_arrays(_arrays(tmp_path / "out"), {f"{s}.{k}.npy": v for s, a in reference.items() for k, v in a.items()})


def test_integer_lookup_inside_and_outside_the_table(tmp_path: Path) -> None:
    """Small integer ids are looked up in an array indexed by value: a column whose values all lie inside
    it, and one with a negative value, a value past its end and a blank, give the ids of the token list."""
    import polars as pl

    vocab = ["5", "0", "3", "<null>"]
    ids = {token: i + 2 for i, token in enumerate(vocab)}  # 0 and 1 are PAD and OOV
    frame = pl.DataFrame({"inside": [3, 0, 5, 5], "outside": [3, -2, 99, None]})
    assert _lookup_column(frame, "inside", vocab).tolist() == [ids["3"], ids["0"], ids["5"], ids["5"]]
    assert _lookup_column(frame, "outside", vocab).tolist() == [ids["3"], 1, 1, ids["<null>"]]
    assert len(_vocab_table(vocab)) == 4
    assert np.asarray(_lookup_column(frame, "inside", vocab)).dtype == np.int64
