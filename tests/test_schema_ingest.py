"""Schema validation, ingestion, the store and its reuse."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from mtrec.data.store import load_store, store_path
from mtrec.data.tables import iterate_batches
from mtrec.errors import MtrecError
from mtrec.schema import load_schema
from tests.helpers import write_toy


def test_census_slice_is_encoded_as_the_schema_says(census_store) -> None:
    train, valid, test = (census_store.split(s) for s in ("train", "valid", "test"))
    assert len(test) == 2000
    assert len(train) + len(valid) == 4000 and abs(len(valid) - 400) <= 1
    layout = census_store.layout
    assert layout.task_names == ["income", "never_married"]
    sparse = [f.name for f in layout.sparse]
    assert "marital_status" not in sparse and "instance_weight" not in sparse + layout.dense
    assert train.sparse.shape[1] == len(sparse) and train.dense.shape[1] == len(layout.dense)
    # labels are 0/1 with both classes present; dense features standardised on train
    assert set(np.unique(train.labels.numpy())) == {0.0, 1.0}
    assert abs(float(train.dense.mean())) < 0.05
    assert np.allclose(train.dense.numpy().std(0), 1.0, atol=0.02)
    # ids stay inside each vocabulary
    sizes = np.array([f.vocab_size for f in layout.sparse])
    assert (train.sparse.numpy() < sizes).all() and (test.sparse.numpy() < sizes).all()


def test_never_married_label_matches_the_raw_field(census_schema_path: Path, census_store) -> None:
    import gzip

    with gzip.open(census_schema_path.parent / "test.csv.gz", "rt") as fh:
        raw = [line.split(", ")[7] == "Never married" for line in fh]
    assert census_store.split("test").labels[:, 1].numpy().astype(bool).tolist() == raw


def test_store_is_reused_then_rebuilt_when_the_source_changes(tmp_path: Path) -> None:
    path = write_toy(tmp_path / "toy")
    schema = load_schema(path)
    first = load_store(schema)
    stamp = (first.path / "meta.json").stat().st_mtime_ns
    again = load_store(load_schema(path))
    assert again.path == first.path and (again.path / "meta.json").stat().st_mtime_ns == stamp
    time.sleep(0.01)
    write_toy(tmp_path / "toy", rows=500)  # same schema, new data
    changed = load_store(load_schema(path))
    assert changed.path != first.path
    assert sum(len(t) for t in changed.splits.values()) == 500


def test_splits_are_seeded_and_disjoint(tmp_path: Path) -> None:
    store = load_store(load_schema(write_toy(tmp_path / "toy", rows=1000)))
    sizes = {k: len(v) for k, v in store.splits.items()}
    assert sizes == {"train": 600, "valid": 200, "test": 200}


def test_sequences_are_padded_and_masked(tmp_path: Path) -> None:
    store = load_store(load_schema(write_toy(tmp_path / "toy")))
    seq = store.split("train").sequences["tags"].numpy()
    assert seq.shape[1] == 3
    # padding only at the end of each row
    for row in seq:
        nz = np.flatnonzero(row)
        assert len(nz) == 0 or nz.max() == len(nz) - 1


def test_min_freq_sends_rare_values_to_the_oov_bucket(tmp_path: Path) -> None:
    path = write_toy(tmp_path / "toy")
    data = yaml.safe_load(path.read_text())
    data["features"][1]["min_freq"] = 10_000
    path.write_text(yaml.safe_dump(data))
    store = load_store(load_schema(path))
    assert store.layout.sparse[0].vocab_size == 2
    assert (store.split("train").sparse.numpy() == 1).all()


def test_batches_are_slices_covering_every_row_once(census_store) -> None:
    import torch

    train = census_store.split("train")
    seen = torch.cat(
        [
            b.labels[:, 0] * 0 + b.dense[:, 0]
            for b in iterate_batches(train, 512, shuffle=True, generator=torch.Generator().manual_seed(0))
        ]
    )
    assert len(seen) == len(train)
    assert torch.allclose(seen.sort().values, train.dense[:, 0].sort().values)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(tasks=[]), "no task"),
        (lambda d: d["features"].append({"name": "age", "type": "dense"}), "duplicate feature"),
        (lambda d: d["features"].append({"name": "x", "type": "bogus"}), "features.3.type"),
        (lambda d: d["tasks"][0].update(space="nope"), "space 'nope'"),
        (lambda d: d["features"].append({"name": "leak", "column": "click", "type": "dense"}), "label column"),
        (lambda d: d.update(colour="red"), "colour"),
    ],
)
def test_bad_schemas_name_the_field(tmp_path: Path, edit, message: str) -> None:
    path = write_toy(tmp_path / "toy")
    data = yaml.safe_load(path.read_text())
    edit(data)
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(MtrecError, match=message) as err:
        load_schema(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_failed_ingestion_leaves_no_store(tmp_path: Path) -> None:
    path = write_toy(tmp_path / "toy")
    text = (tmp_path / "toy" / "toy.csv").read_text().replace(",1,", ",7,", 1)
    (tmp_path / "toy" / "toy.csv").write_text(text)
    schema = load_schema(path)
    with pytest.raises(MtrecError, match="not 0/1"):
        load_store(schema)
    target = store_path(schema)
    leftovers = list(target.parent.glob(f"*{target.name}*")) if target.parent.exists() else []
    assert leftovers == []


def test_parquet_source_encodes_like_csv(tmp_path: Path) -> None:
    import polars as pl

    csv_schema = write_toy(tmp_path / "toy")
    frame = pl.read_csv(tmp_path / "toy" / "toy.csv", infer_schema=False)
    frame.write_parquet(tmp_path / "toy" / "toy.parquet")
    data = yaml.safe_load(csv_schema.read_text())
    data["source"] = {"train": "toy.parquet"}
    data["format"] = {"type": "parquet"}
    pq_schema = tmp_path / "toy" / "pq.yaml"
    pq_schema.write_text(yaml.safe_dump(data))
    a, b = load_store(load_schema(csv_schema)), load_store(load_schema(pq_schema))
    for split in ("train", "valid", "test"):
        ta, tb = a.split(split), b.split(split)
        assert np.array_equal(ta.sparse.numpy(), tb.sparse.numpy())
        assert np.allclose(ta.dense.numpy(), tb.dense.numpy())
        assert np.array_equal(ta.sequences["tags"].numpy(), tb.sequences["tags"].numpy())


def test_sequence_sharing_a_sparse_vocabulary(tmp_path: Path) -> None:
    folder = tmp_path / "shared"
    folder.mkdir()
    lines = ["item,history,click"] + [f"i{k % 5},i{(k + 1) % 5}|i{(k + 2) % 5}|zz,{k % 2}" for k in range(60)]
    (folder / "d.csv").write_text("\n".join(lines) + "\n")
    schema = {
        "source": {"train": "d.csv"},
        "split": {"valid": 0.2},
        "features": [
            {"name": "item", "type": "sparse", "embed_dim": 4},
            {"name": "history", "type": "sequence", "embed_dim": 4, "vocab": "item", "max_len": 4},
        ],
        "tasks": [{"name": "click", "label": "click"}],
    }
    (folder / "s.yaml").write_text(yaml.safe_dump(schema))
    store = load_store(load_schema(folder / "s.yaml"))
    assert store.layout.sequences[0].shares == "item"
    assert store.layout.sequences[0].vocab_size == store.layout.sparse[0].vocab_size == 7
    train = store.split("train")
    vocab = store.encoders.vocabs["item"]
    ids = {tok: i + 2 for i, tok in enumerate(vocab)}
    hist = train.sequences["history"].numpy()
    assert set(np.unique(hist)) <= {0, 1, *ids.values()}
    assert (hist[:, 2] == 1).all()  # "zz" is not an item: out of vocabulary
    assert (hist[:, 3] == 0).all()  # padding
    from mtrec.models import build_model

    model = build_model("mmoe", store.layout)
    assert model.embedding.tables["4"].num_embeddings == 7  # one table shared by item and history
