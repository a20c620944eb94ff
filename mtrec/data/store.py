"""The encoded on-disk store: one ``.npy`` per array per split, plus ``meta.json``.

A store is keyed by the schema's fingerprint (schema content plus each source
file's path, size and modification time), so it is rebuilt exactly when the
data or the schema change, and reused otherwise. It is written chunk by chunk
(:mod:`mtrec.data.stream`: a source larger than memory is fine) into a temporary
folder and renamed into place, so a failed ingestion leaves nothing behind; the temporary folder's
name holds the pid of the process building it, and one whose process is gone (killed mid-ingestion)
is removed by the next :func:`load_store`. An opened store is memory-mapped: its tensors are views of
the files' pages, never a copy of the whole table in RAM.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from mtrec.data.ingest import Encoders
from mtrec.data.stream import DEFAULT_CHUNK_ROWS, ingest_to
from mtrec.data.tables import FeatureLayout, TensorTable
from mtrec.errors import MtrecError
from mtrec.schema import Schema

STORE_VERSION = 3  # 2: sample weights are [N, T]; 3: canonical integral ids, label statistics in the encoders


def cache_root() -> Path:
    """``$MTREC_CACHE`` if set, else ``~/.cache/mtrec``."""
    return Path(os.environ.get("MTREC_CACHE", Path.home() / ".cache" / "mtrec"))


def table_from_arrays(arrays: dict[str, np.ndarray]) -> TensorTable:
    """Wrap encoded arrays as tensors (no copy of contiguous arrays, memory-mapped ones included)."""
    return TensorTable(
        sparse=torch.from_numpy(np.ascontiguousarray(arrays["sparse"])),
        dense=torch.from_numpy(np.ascontiguousarray(arrays["dense"])),
        labels=torch.from_numpy(np.ascontiguousarray(arrays["labels"])),
        sequences={k[4:]: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items() if k.startswith("seq.")},
        weight=torch.from_numpy(arrays["weight"]) if "weight" in arrays else None,
        user=torch.from_numpy(arrays["user"]) if "user" in arrays else None,
    )


@dataclass
class Store:
    """An opened store: its splits as tensors, the fitted encoders and the layout."""

    path: Path
    splits: dict[str, TensorTable]
    encoders: Encoders
    layout: FeatureLayout
    schema: dict

    def split(self, name: str) -> TensorTable | None:
        return self.splits.get(name)

    def require(self, name: str) -> TensorTable:
        """The split ``name``; an error naming the store when it has none."""
        table = self.splits.get(name)
        if table is None:
            raise MtrecError(f"store {self.path} has no '{name}' split (it has {', '.join(self.splits)})")
        return table


TMP_PID = re.compile(r"^\..+\.pid(\d+)\.[^.]+\.tmp$")  # .<store>.pid<pid>.<random>.tmp
STALE_UNKNOWN_S = 24 * 3600  # a temporary without a pid (older mtrec) is stale after a day


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, under another user
        return True
    return True


def clean_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the temporary store folders in ``folder`` whose building process is gone (a kill during
    ingestion leaves them); returns what was removed."""
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for path in folder.glob(".*.tmp"):
        if not path.is_dir():
            continue
        match = TMP_PID.match(path.name)
        try:
            stale = (
                not _pid_alive(int(match.group(1))) if match else time.time() - path.stat().st_mtime > STALE_UNKNOWN_S
            )
        except OSError:
            continue
        if stale:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _write_store(
    target: Path, schema: Schema, echo: Callable[[str], None] | None = None, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> None:
    """Ingest chunk by chunk into a temporary folder beside ``target``, then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.pid{os.getpid()}.", suffix=".tmp"))
    try:
        enc, layout, splits = ingest_to(schema, tmp, echo=echo, chunk_rows=chunk_rows)
        meta = {
            "version": STORE_VERSION,
            "schema": schema.to_dict(),
            "encoders": enc.to_dict(),
            "layout": layout.to_dict(),
            "splits": splits,
        }
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished the same store first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def open_store(path: Path) -> Store:
    meta = json.loads((path / "meta.json").read_text())
    splits = {}
    for split, info in meta["splits"].items():
        # memory-mapped copy-on-write: pages are read from the file when used and shared with the page
        # cache; a write (none is expected) stays in this process and never reaches the store
        mode: Literal["c"] | None = "c" if info["rows"] else None  # (an empty file cannot be mapped)
        arrays = {key: np.load(path / f"{split}.{key}.npy", mmap_mode=mode) for key in info["arrays"]}
        splits[split] = table_from_arrays(arrays)
    return Store(
        path=path,
        splits=splits,
        encoders=Encoders.from_dict(meta["encoders"]),
        layout=FeatureLayout.from_dict(meta["layout"]),
        schema=meta["schema"],
    )


def store_path(schema: Schema) -> Path:
    return cache_root() / "stores" / f"{schema.name}-{schema.fingerprint()[:20]}"


def load_store(schema: Schema, rebuild: bool = False, echo: Callable[[str], None] | None = None) -> Store:
    """Open the store of ``schema``, building it first when missing or stale (``echo`` gets one line
    saying which)."""
    path = store_path(schema)
    clean_stale_temporaries(path.parent)
    if rebuild and path.exists():
        shutil.rmtree(path)
    if (path / "meta.json").is_file() and json.loads((path / "meta.json").read_text()).get("version") != STORE_VERSION:
        shutil.rmtree(path)  # written by another version of mtrec: encoded differently, rebuild it
    if not (path / "meta.json").is_file():
        _write_store(path, schema, echo)
        if echo is not None:
            echo(f"store written to {path}")
    elif echo is not None:
        echo(f"using cached store {path}")
    return open_store(path)
