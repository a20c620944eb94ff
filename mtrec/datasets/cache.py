"""Generated data sets written once per set of arguments into the cache (``$MTREC_CACHE/datasets``):
the rows as Parquet and a schema beside them, so a later call with the same arguments reads the files
instead of generating again."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import polars as pl
import yaml
from pydantic import BaseModel

from mtrec.files import write_atomic, write_text_atomic


def write_once(
    cache: Path, kind: str, args: BaseModel, rows: Callable[[], pl.DataFrame], spec: dict, what: str
) -> Path:
    """Return the schema path of data set ``kind`` with ``args`` in ``cache``, writing it first if absent:
    ``rows()`` to ``rows.parquet`` then ``spec`` (the schema, with a comment line naming ``what`` and the
    arguments) to ``schema.yaml``. The schema is written last, so its presence means the rows are whole."""
    key = hashlib.sha1(json.dumps(args.model_dump(), sort_keys=True).encode()).hexdigest()[:12]
    folder = cache / "datasets" / f"{kind}-{key}"
    schema = folder / "schema.yaml"
    if schema.is_file():
        return schema
    frame = rows()
    write_atomic(folder / "rows.parquet", lambda tmp: frame.write_parquet(tmp))
    header = f"# {what} (mtrec.datasets.{kind}), arguments: " + json.dumps(args.model_dump()) + "\n"
    write_text_atomic(schema, header + yaml.safe_dump(spec, sort_keys=False))
    return schema
