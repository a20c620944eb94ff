"""Chunked ingestion, the memory-mapped store, batches drawn without copying the table, grouped AUC at
size, and chunked prediction (issue 13, larger than memory)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import yaml
from sklearn.metrics import roc_auc_score

from mtrec.data.ingest import ingest
from mtrec.data.store import load_store
from mtrec.data.stream import ingest_to
from mtrec.data.tables import TensorTable, iterate_batches
from mtrec.metrics.core import grouped_auc, per_group_auc
from mtrec.schema import load_schema
from mtrec.train.run import predict_file
from tests.helpers import write_toy


def _log(rows: int, seed: int = 0) -> pl.DataFrame:
    """A small log with integer ids (some blank), text ids, a dense column and two labels."""
    rng = np.random.default_rng(seed)
    item = rng.integers(0, 60, rows).astype(float)
    item[rng.random(rows) < 0.05] = np.nan
    return pl.DataFrame(
        {
            "user": rng.integers(0, 50, rows),
            "item": pl.Series(item).fill_nan(None).cast(pl.Int64),
            "cat": rng.choice(["a", "b", "c", "dd"], rows),
            "price": rng.random(rows) * 10,
            "click": rng.integers(0, 2, rows),
            "watch": np.round(rng.gamma(2.0, 5.0, rows), 2),
        }
    )


def _schema(folder: Path, source: str, extra: dict | None = None) -> Path:
    data = {
        "name": "log",
        "source": {"train": source},
        "format": {"type": "parquet"},
        "split": {"valid": 0.2, "test": 0.1},
        "user": "user",
        "features": [
            {"name": "item", "type": "sparse", "min_freq": 3},
            {"name": "cat", "type": "sparse"},
            {"name": "uid", "column": "user", "type": "sparse"},
            {"name": "price", "type": "dense"},
        ],
        "tasks": [
            {"name": "click", "type": "binary", "label": "click"},
            {"name": "watch", "type": "regression", "label": "watch", "space": "click", "standardize": True},
        ],
    }
    data.update(extra or {})
    path = folder / f"{source.replace('/', '_')}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _arrays(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.load(p) for p in sorted(folder.glob("*.npy"))}


def _same_arrays(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert np.array_equal(a[key], b[key]), key


def test_sharded_directory_gives_the_store_of_the_single_file(tmp_path: Path) -> None:
    log = _log(900)
    log.write_parquet(tmp_path / "all.parquet")
    (tmp_path / "shards").mkdir()
    for i, start in enumerate((0, 250, 600)):  # uneven shards, read in name order
        log.slice(start, {0: 250, 1: 350, 2: 300}[i]).write_parquet(tmp_path / "shards" / f"part-{i}.parquet")
    (tmp_path / "shards" / ".hidden.parquet").write_bytes(b"not parquet")  # skipped
    one = load_store(load_schema(_schema(tmp_path, "all.parquet")))
    sharded = load_store(load_schema(_schema(tmp_path, "shards")))
    assert one.path != sharded.path
    assert one.encoders == sharded.encoders and one.layout == sharded.layout
    _same_arrays(_arrays(one.path), _arrays(sharded.path))
    # and both are what the in-memory path encodes from the whole file
    reference, enc, _ = ingest(load_schema(_schema(tmp_path, "all.parquet")))
    assert enc == one.encoders
    _same_arrays(_arrays(one.path), {f"{s}.{k}.npy": v for s, cols in reference.items() for k, v in cols.items()})


def test_tiny_chunks_give_the_arrays_of_one_chunk(tmp_path: Path) -> None:
    """CSV with a sequence, users, sample weights and a standardised label inside a space: 37-row chunks
    (so every split and every vocabulary spans many chunks) encode exactly as one chunk."""
    tasks = [
        {"name": "click", "type": "binary", "label": "click", "sample_weight": "age"},
        {"name": "watch", "type": "regression", "label": "watch", "space": "click", "standardize": True},
    ]
    schema = load_schema(write_toy(tmp_path / "toy", rows=1500, extra={"tasks": tasks, "sample_weight": "age"}))
    (tmp_path / "one").mkdir()
    (tmp_path / "tiny").mkdir()
    enc_one, layout_one, meta_one = ingest_to(schema, tmp_path / "one", chunk_rows=10**6)
    enc_tiny, layout_tiny, meta_tiny = ingest_to(schema, tmp_path / "tiny", chunk_rows=37)
    assert enc_one == enc_tiny and layout_one == layout_tiny and meta_one == meta_tiny
    assert meta_one["train"]["arrays"] == ["dense", "labels", "seq.tags", "sparse", "user", "weight"]
    _same_arrays(_arrays(tmp_path / "one"), _arrays(tmp_path / "tiny"))
    # users are numbered within each split over the whole split (not per chunk): 1..distinct users
    for split in ("train", "valid", "test"):
        user = np.load(tmp_path / "tiny" / f"{split}.user.npy")
        assert sorted(set(user.tolist())) == list(range(1, len(set(user.tolist())) + 1))


def test_vocabulary_counts_add_up_across_chunks(tmp_path: Path) -> None:
    """A token seen twice in each of two chunks passes min_freq 3 only when the counts are summed; the
    vocabulary is ordered by count, then token, as counted here independently."""
    rows = 400
    rng = np.random.default_rng(3)
    item = rng.integers(0, 40, rows)
    item[[0, 1, 200, 201]] = 999  # 2 + 2 occurrences, in different 100-row chunks
    pl.DataFrame({"item": item, "click": rng.integers(0, 2, rows)}).write_parquet(tmp_path / "t.parquet")
    pl.DataFrame({"item": [1, 2], "click": [0, 1]}).write_parquet(tmp_path / "v.parquet")
    data = {
        "name": "vocab",
        "source": {"train": "t.parquet", "valid": "v.parquet"},
        "format": {"type": "parquet"},
        "features": [{"name": "item", "type": "sparse", "min_freq": 3}],
        "tasks": [{"name": "click", "type": "binary", "label": "click"}],
    }
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
    (tmp_path / "out").mkdir()
    enc, _, meta = ingest_to(load_schema(tmp_path / "s.yaml"), tmp_path / "out", chunk_rows=100)
    counts = Counter(str(i) for i in item.tolist())
    expected = sorted((t for t, n in counts.items() if n >= 3), key=lambda t: (-counts[t], t))
    assert enc.vocabs["item"] == expected and "999" in expected
    ids = np.load(tmp_path / "out" / "train.sparse.npy")[:, 0]
    assert ids[0] == expected.index("999") + 2  # ids 0 and 1 are padding and out-of-vocabulary
    assert meta == {
        "train": {"rows": 400, "arrays": ["dense", "labels", "sparse"]},
        "valid": {"rows": 2, "arrays": ["dense", "labels", "sparse"]},
    }


def _mapped_files() -> list[tuple[int, int, str]]:
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 6:
            low, high = (int(x, 16) for x in parts[0].split("-"))
            out.append((low, high, parts[5]))
    return out


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc (Linux)")
def test_store_tensors_are_views_of_the_mapped_files(tmp_path: Path) -> None:
    store = load_store(load_schema(write_toy(tmp_path / "toy", rows=600)))
    train = store.split("train")
    maps = _mapped_files()
    for name, tensor in [("sparse", train.sparse), ("dense", train.dense), ("labels", train.labels)]:
        file = str(store.path / f"train.{name}.npy")
        address = tensor.data_ptr()
        assert any(low <= address < high and path == file for low, high, path in maps), name
    # copy-on-write: writing into a tensor changes this process's view, never the store on disk
    before = np.load(store.path / "train.dense.npy")
    train.dense[0, 0] = 1234.5
    assert float(train.dense[0, 0]) == 1234.5
    assert np.array_equal(np.load(store.path / "train.dense.npy"), before)


def _old_batches(table: TensorTable, batch_size: int, generator: torch.Generator, drop_last: bool):
    """The batches as drawn before: the whole table gathered through one permutation, then sliced."""
    n = len(table)
    shuffled = table.take(torch.randperm(n, generator=generator))
    stop = n - n % batch_size if drop_last else n
    return [shuffled.slice(s, min(s + batch_size, n)) for s in range(0, stop, batch_size)]


@pytest.mark.parametrize("drop_last", [False, True])
def test_shuffled_batches_are_those_of_the_whole_table_gather(drop_last: bool) -> None:
    gen = torch.Generator().manual_seed(5)
    n = 1003
    table = TensorTable(
        sparse=torch.randint(0, 9, (n, 3), generator=gen),
        dense=torch.randn(n, 2, generator=gen),
        labels=torch.randint(0, 2, (n, 2), generator=gen).float(),
        sequences={"tags": torch.randint(0, 5, (n, 4), generator=gen)},
        weight=torch.rand(n, 2, generator=gen),
        user=torch.arange(n),
    )
    new = list(
        iterate_batches(table, 64, shuffle=True, generator=torch.Generator().manual_seed(11), drop_last=drop_last)
    )
    old = _old_batches(table, 64, torch.Generator().manual_seed(11), drop_last)
    assert len(new) == len(old) == (n // 64 if drop_last else -(-n // 64))
    for a, b in zip(new, old):
        for name in ("sparse", "dense", "labels", "weight", "user"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert torch.equal(a.sequences["tags"], b.sequences["tags"])
    seen = torch.cat([b.user for b in new]).sort().values
    assert torch.equal(seen, torch.arange(len(seen))) if not drop_last else len(seen) == (n // 64) * 64


def _loop(y: np.ndarray, p: np.ndarray, g: np.ndarray) -> tuple[list, list, list]:
    aucs, sizes, keys = [], [], []
    for i, u in enumerate(np.unique(g)):
        m = g == u
        if 0 < y[m].sum() < m.sum():
            aucs.append(roc_auc_score(y[m], p[m]))
            sizes.append(m.sum())
            keys.append(i)
    return aucs, sizes, keys


@pytest.mark.parametrize("kind", ["float32", "float64", "text_groups", "sparse_groups"])
def test_per_group_auc_equals_the_per_user_loop(kind: str) -> None:
    rng = np.random.default_rng(7)
    n = 4000
    g = rng.integers(0, 150, n)
    p = np.round(rng.standard_normal(n), 1).astype(np.float32)  # negative scores, many ties
    p[:50] = -0.0
    p[50:100] = 0.0  # -0.0 and 0.0 tie
    y = (rng.random(n) < 1 / (1 + np.exp(-p))).astype(np.float32)
    if kind == "float64":
        p = p.astype(np.float64) + rng.random(n) * 1e-3 * (rng.random(n) < 0.5)  # not float32 values
    if kind == "text_groups":
        g = np.array([f"user{u}" for u in g])
    if kind == "sparse_groups":
        g = g * 10**12  # too far apart to be bincounted
    auc, size, gid = per_group_auc(y, p, g)
    ref_auc, ref_size, ref_keys = _loop(y, p, g)
    assert np.allclose(auc, ref_auc, rtol=0, atol=1e-12)
    assert size.tolist() == ref_size and gid.tolist() == ref_keys
    uauc, gauc = grouped_auc(y, p, g)
    assert uauc == pytest.approx(np.mean(ref_auc), abs=1e-12)
    assert gauc == pytest.approx(np.average(ref_auc, weights=ref_size), abs=1e-12)


def test_predict_in_chunks_equals_predict_in_one_go(cli, tmp_path: Path) -> None:
    schema = write_toy(tmp_path / "toy", rows=500)
    run = tmp_path / "run"
    args = ["--model", "shared_bottom", "--epochs", "1", "--batch-size", "128", "--threads", "1"]
    done = cli("train", "--schema", str(schema), *args, "--out", str(run), "--no-tensorboard", "--no-progress")
    assert done.code == 0, done.err
    source = tmp_path / "toy" / "toy.csv"
    for suffix in ("csv", "csv.gz", "parquet"):
        whole, chunked = tmp_path / f"whole.{suffix}", tmp_path / f"chunked.{suffix}"
        oov_whole: dict = {}
        oov_chunked: dict = {}
        n = predict_file(run, source, whole, oov_rate=oov_whole, keep=["user"])
        m = predict_file(run, source, chunked, oov_rate=oov_chunked, keep=["user"], chunk_rows=23)
        assert n == m == 500
        a = pl.read_parquet(whole) if suffix == "parquet" else pl.read_csv(whole)
        b = pl.read_parquet(chunked) if suffix == "parquet" else pl.read_csv(chunked)
        assert a.equals(b) and a.columns == ["user", "click", "watch"]
        assert oov_whole == oov_chunked
    assert (tmp_path / "whole.csv").read_bytes() == (tmp_path / "chunked.csv").read_bytes()
