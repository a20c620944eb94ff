"""Shared fixtures: small real slices of the embedded Census data, an isolated cache."""

from __future__ import annotations

import gzip
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from mtrec.data.store import Store, load_store
from mtrec.datasets import dataset_schema_path
from mtrec.schema import Schema, load_schema
from tests.helpers import CliResult, run_main

CENSUS_DIR = dataset_schema_path("census").parent
REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "configs" / "samples"

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stores go to a per-session temporary cache, never to the user's."""
    monkeypatch.setenv("MTREC_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _head_gz(src: Path, dst: Path, rows: int) -> None:
    with gzip.open(src, "rt") as fin, gzip.open(dst, "wt") as fout:
        for i, line in enumerate(fin):
            if i >= rows:
                break
            fout.write(line)


def write_census_slice(folder: Path, train_rows: int = 4000, test_rows: int = 2000) -> Path:
    """Copy the first rows of the real Census files and a schema pointing at them; return the schema path."""
    folder.mkdir(parents=True, exist_ok=True)
    _head_gz(CENSUS_DIR / "census-income.data.gz", folder / "train.csv.gz", train_rows)
    _head_gz(CENSUS_DIR / "census-income.test.gz", folder / "test.csv.gz", test_rows)
    data = yaml.safe_load(dataset_schema_path("census").read_text())
    data["name"] = "census_small"
    data["source"] = {"train": "train.csv.gz", "test": "test.csv.gz"}
    path = folder / "schema.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def census_schema_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Schema of a 4,000 / 2,000 row slice of real Census data (train / test)."""
    return write_census_slice(tmp_path_factory.mktemp("census_small"))


@pytest.fixture(scope="session")
def census_schema(census_schema_path: Path) -> Schema:
    return load_schema(census_schema_path)


def session_store(schema: Schema | Path, tmp_path_factory: pytest.TempPathFactory) -> Store:
    """The store of ``schema`` (or a schema file) in the session's cache, for session/module fixtures
    (which cannot use the function-scoped ``monkeypatch`` that isolates each test's cache)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MTREC_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    try:
        return load_store(schema if isinstance(schema, Schema) else load_schema(schema))
    finally:
        mp.undo()


@pytest.fixture(scope="session")
def census_store(census_schema: Schema, tmp_path_factory: pytest.TempPathFactory) -> Store:
    return session_store(census_schema, tmp_path_factory)


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def one_thread():
    """Run a test on one torch thread (tiny networks: as fast, and far faster on a busy shared CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cli(capsys: pytest.CaptureFixture, one_thread) -> Callable[..., CliResult]:
    """``cli(*args)`` runs ``mtrec ARGS`` in this process on one torch thread (see
    :func:`tests.helpers.run_main`) and returns its exit code, stdout and stderr, without what was
    printed before the call."""

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        return run_main(capsys, *args)

    return run
