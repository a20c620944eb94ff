"""Real-log schemas (issue 13 sections 1 and 2): side-table joins, derived labels, splits by time and by
user, the weighted business score, --select-by, --data-dir, and the WeChat / KuaiRand samples."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from mtrec.data.ingest import load_splits
from mtrec.data.sources import assign_splits, derive_labels, join_side_tables, load_side_tables, split_codes
from mtrec.data.store import load_store
from mtrec.data.tables import FeatureLayout, TaskField
from mtrec.errors import MtrecError
from mtrec.metrics.core import check_select_by, selection_score, weighted_scores
from mtrec.schema import load_schema, schema_from_dict
from tests.conftest import REPO
from tests.helpers import assert_user_error


def write_log(folder: Path, rows: int = 600, seed: int = 0, users_in_table: int = 30, **schema_extra) -> Path:
    """A log (user, item, day, play time, duration, click) with a user table that may lack some users and an
    item table keyed by ids written as floats ("7.0"); returns the schema path."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    user = rng.integers(0, 40, rows)
    item = rng.integers(0, 20, rows)
    day = rng.integers(1, 11, rows)
    duration = rng.integers(5_000, 30_000, rows)
    play = (duration * rng.uniform(0.1, 1.5, rows)).astype(int)
    click = (rng.random(rows) < 0.4).astype(int)
    pl.DataFrame(
        {
            "uid": [f"u{u}" for u in user],
            "item": item,
            "day": day,
            "play_ms": play,
            "duration_ms": duration,
            "click": click,
        }
    ).write_csv(folder / "log.csv")
    pl.DataFrame(
        {"uid": [f"u{u}" for u in range(users_in_table)], "age": np.arange(users_in_table) % 7 + 20}
    ).write_csv(folder / "users.csv")
    pl.DataFrame({"item": [f"{i}.0" for i in range(20)], "category": [f"c{i % 4}" for i in range(20)]}).write_csv(
        folder / "items.csv"
    )
    schema = {
        "name": "log",
        "source": {"train": "log.csv"},
        "join": [
            {"source": "users.csv", "on": "uid", "missing": "fill"},
            {"source": "items.csv", "on": "item"},
        ],
        "split": {"by": "day", "valid": [7, 8], "test": [9, 10]},
        "user": "uid",
        "features": [
            {"name": "uid", "type": "sparse"},
            {"name": "category", "type": "sparse"},
            {"name": "age", "type": "dense", "fill": 0},
            {"name": "duration_ms", "type": "dense", "log": True},
        ],
        "tasks": [
            {"name": "click", "label": "click"},
            {"name": "finish", "label": {"column": "play_ms", "divide_by": "duration_ms", "ge": 0.8}},
            {"name": "watch", "type": "regression", "label": {"column": "play_ms", "transform": "log1p"}},
        ],
    }
    schema.update(schema_extra)
    path = folder / "schema.yaml"
    path.write_text(yaml.safe_dump(schema, sort_keys=False))
    return path


def _log(folder: Path) -> pl.DataFrame:
    return pl.read_csv(folder / "log.csv", infer_schema=False)


# ---- joins -------------------------------------------------------------------------------------------


def test_join_keeps_the_log_order_and_counts_missing_keys(tmp_path: Path) -> None:
    schema = load_schema(write_log(tmp_path))
    log = _log(tmp_path)
    joined, counts = join_side_tables(log, load_side_tables(schema), tmp_path / "log.csv")
    assert joined.height == log.height and joined["uid"].to_list() == log["uid"].to_list()
    # users u30..u39 are not in the table: counted, and filled with blanks
    lacking = np.array([int(u[1:]) >= 30 for u in log["uid"]])
    assert counts[0].missing == int(lacking.sum()) > 0 and counts[0].rows == log.height
    age = joined["age"].to_numpy()
    assert all(a is None for a in age[lacking]) and all(
        int(a) == int(u[1:]) % 7 + 20 for a, u in zip(age[~lacking], log["uid"].to_numpy()[~lacking])
    )
    # the item table's ids are written "7.0": the same ids as the log's "7"
    assert counts[1].missing == 0
    assert joined["category"].to_list() == [f"c{int(i) % 4}" for i in log["item"]]
    assert "5 of" not in counts[1].line(tmp_path / "log.csv") and "no match" in counts[0].line(tmp_path / "log.csv")


@pytest.mark.parametrize("policy", ["drop", "error"])
def test_missing_key_policies(tmp_path: Path, policy: str) -> None:
    path = write_log(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["join"][0]["missing"] = policy
    path.write_text(yaml.safe_dump(data))
    schema = load_schema(path)
    log = _log(tmp_path)
    lacking = sum(int(u[1:]) >= 30 for u in log["uid"])
    if policy == "error":
        with pytest.raises(MtrecError, match=rf"log.csv: {lacking} of 600 rows have a uid that .*users.csv lacks"):
            join_side_tables(log, load_side_tables(schema), tmp_path / "log.csv")
        return
    joined, counts = join_side_tables(log, load_side_tables(schema), tmp_path / "log.csv")
    assert joined.height == 600 - lacking and counts[0].missing == lacking
    assert all(int(u[1:]) < 30 for u in joined["uid"])
    # scoring keeps every row (each input row gets a score)
    kept, _ = join_side_tables(log, load_side_tables(schema), tmp_path / "log.csv", scoring=True)
    assert kept.height == 600


def test_side_table_mistakes_are_one_error_naming_the_file(tmp_path: Path) -> None:
    path = write_log(tmp_path)
    pl.DataFrame({"uid": ["u1", "u1"], "age": [1, 2]}).write_csv(tmp_path / "users.csv")
    with pytest.raises(MtrecError, match=r"users.csv \(join\[0\]\): key 'u1' of column 'uid' appears 2 times"):
        load_side_tables(load_schema(path))
    pl.DataFrame({"uid": ["u1"], "day": [3]}).write_csv(tmp_path / "users.csv")
    with pytest.raises(MtrecError, match=r"column 'day' is in the log and in .*users.csv \(join\[0\]\)"):
        load_splits(load_schema(path))
    pl.DataFrame({"user": ["u1"]}).write_csv(tmp_path / "users.csv")
    with pytest.raises(MtrecError, match=r"key column 'uid' \(join\[0\].on\) not found"):
        load_side_tables(load_schema(path))


# ---- derived labels ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("op", "fn"), [("ge", np.greater_equal), ("gt", np.greater), ("lt", np.less)])
def test_derived_binary_label_is_the_ratio_compared(tmp_path: Path, op: str, fn) -> None:
    path = write_log(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["tasks"][1]["label"] = {"column": "play_ms", "divide_by": "duration_ms", op: 0.8}
    path.write_text(yaml.safe_dump(data))
    log = _log(tmp_path)
    out = derive_labels(log, load_schema(path), tmp_path / "log.csv")
    play, duration = log["play_ms"].cast(float).to_numpy(), log["duration_ms"].cast(float).to_numpy()
    expected = fn(play / duration, 0.8).astype(float)
    assert np.array_equal(out["label.finish"].to_numpy(), expected) and 0 < expected.mean() < 1
    np.testing.assert_allclose(out["label.watch"].to_numpy(), np.log(1 + play))


def test_the_store_holds_the_derived_labels_in_their_units(tmp_path: Path) -> None:
    path = write_log(tmp_path)
    store = load_store(load_schema(path))
    log = _log(tmp_path)
    day = log["day"].cast(int).to_numpy()
    rows = (day >= 7) & (day <= 8)  # the valid range, both ends inclusive
    play, duration = log["play_ms"].cast(float).to_numpy()[rows], log["duration_ms"].cast(float).to_numpy()[rows]
    labels = store.split("valid").labels.numpy()
    assert np.array_equal(labels[:, 1], (play / duration >= 0.8).astype(np.float32))
    np.testing.assert_allclose(labels[:, 2], np.log1p(play), rtol=1e-6)  # stored in log1p units


def test_a_zero_divisor_is_an_error_naming_the_column(tmp_path: Path) -> None:
    path = write_log(tmp_path)
    log = _log(tmp_path).with_columns(
        pl.when(pl.int_range(pl.len()) < 3).then(pl.lit("0")).otherwise(pl.col("duration_ms")).alias("duration_ms")
    )
    log.write_csv(tmp_path / "log.csv")
    with pytest.raises(
        MtrecError, match=r"column 'duration_ms' \(task finish label.divide_by\) is 0 or blank in 3 row"
    ):
        load_splits(load_schema(path))


# ---- splits ------------------------------------------------------------------------------------------


def test_split_by_time_takes_inclusive_ranges(tmp_path: Path) -> None:
    schema = load_schema(write_log(tmp_path))
    frames = load_splits(schema)
    days = {split: sorted(set(frame["day"].cast(int).to_list())) for split, (frame, _) in frames.items()}
    assert days == {"train": [1, 2, 3, 4, 5, 6], "valid": [7, 8], "test": [9, 10]}
    assert sum(frame.height for frame, _ in frames.values()) == 600


def test_split_by_user_holds_users_out_consistently_across_chunks(tmp_path: Path) -> None:
    path = write_log(tmp_path, rows=3000, split={"by_user": "uid", "valid": 0.2, "test": 0.2})
    schema = load_schema(path)
    log = _log(tmp_path)
    parts = assign_splits(log, schema, tmp_path / "log.csv")
    users = {split: set(frame["uid"]) for split, frame in parts.items()}
    assert set(users) == {"train", "valid", "test"}
    assert not (users["train"] & users["valid"]) and not (users["train"] & users["test"])
    assert not (users["valid"] & users["test"]) and all(users.values())
    # chunk by chunk, the same assignment as the whole file
    whole = split_codes(log, schema, tmp_path / "log.csv")
    chunks = np.concatenate([split_codes(log[i : i + 700], schema, tmp_path / "log.csv") for i in range(0, 3000, 700)])
    assert np.array_equal(whole, chunks)
    # another seed moves users
    other = schema.model_copy(update={"split_seed": 7})
    assert not np.array_equal(whole, split_codes(log, other, tmp_path / "log.csv"))


def test_the_random_split_is_unchanged(tmp_path: Path) -> None:
    path = write_log(tmp_path, rows=1000, split={"valid": 0.2, "test": 0.1})
    frames = load_splits(load_schema(path))
    assert {k: f.height for k, (f, _) in frames.items()} == {"train": 700, "valid": 200, "test": 100}


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"split": {"by": "day", "valid": 0.1}}, "split.valid: with split.by, give a range [FROM, TO]"),
        ({"split": {"by": "day", "valid": [5, 8], "test": [8, 9]}}, "overlap"),
        ({"split": {"by": "day", "by_user": "uid"}}, "split.by and split.by_user are both set"),
        ({"split": {"by_user": "uid", "valid": [1, 2]}}, "split.valid: [1, 2] is not a share"),
    ],
)
def test_bad_splits_name_the_field(tmp_path: Path, change: dict, needle: str) -> None:
    path = write_log(tmp_path, **change)
    with pytest.raises(MtrecError, match="schema.yaml: ") as err:
        load_schema(path)
    assert needle in str(err.value)


@pytest.mark.parametrize(
    ("task", "needle"),
    [
        ({"name": "x", "label": {"column": "play_ms", "ge": 1, "lt": 2}}, "give one comparison, not ge and lt"),
        ({"name": "x", "label": {"column": "play_ms"}}, "task x: label: a derived binary label needs a comparison"),
        ({"name": "x", "type": "regression", "label": {"column": "play_ms", "ge": 1}}, "ge makes a binary label"),
        ({"name": "x", "label": {"column": "play_ms", "ge": 1, "transform": "log1p"}}, "a transform applies"),
        ({"name": "x", "label": "click", "weight": -1}, "task x: weight -1.0 is not a finite weight"),
    ],
)
def test_bad_labels_name_the_task(tmp_path: Path, task: dict, needle: str) -> None:
    data = yaml.safe_load(write_log(tmp_path).read_text())
    data["tasks"].append(task)
    with pytest.raises(MtrecError) as err:
        schema_from_dict(data, "s.yaml")
    assert needle in str(err.value)


def test_yaml_reads_join_on_as_the_key(tmp_path: Path) -> None:
    """Unquoted ``on:`` is the boolean true in YAML 1.1: it still names the key."""
    path = write_log(tmp_path)
    text = path.read_text().replace("'on'", "on")  # safe_dump quotes it; a person would not
    path.write_text(text)
    assert True in yaml.safe_load(text)["join"][0]  # what PyYAML makes of it
    assert load_schema(path).join[0].on == "uid"


# ---- the business score ------------------------------------------------------------------------------


def test_weighted_uauc_matches_a_per_user_loop() -> None:
    rng = np.random.default_rng(3)
    n, names, weights = 3000, ["read_comment", "like", "click_avatar", "forward", "follow"], [4, 3, 2, 1, 0]
    layout = FeatureLayout([], [], [], [TaskField(t, "binary", None, float(w)) for t, w in zip(names, weights)])
    user = rng.integers(0, 80, n)
    labels = (rng.random((n, 5)) < 0.2).astype(float)
    scores = np.clip(labels * 0.3 + rng.random((n, 5)), 0, 1)
    from mtrec.metrics.core import evaluate_predictions

    metrics = evaluate_predictions(labels, scores, layout, user)
    got = weighted_scores(metrics, layout)
    per_task = []
    for t in range(4):  # the weight-0 task is out
        aucs = [
            roc_auc_score(labels[user == u, t], scores[user == u, t])
            for u in np.unique(user)
            if 0 < labels[user == u, t].sum() < (user == u).sum()
        ]
        per_task.append(np.mean(aucs))
    expected = float(np.dot(per_task, weights[:4]) / sum(weights[:4]))
    assert got["uauc"] == pytest.approx(expected, abs=1e-12)
    assert got["auc"] == pytest.approx(
        sum(w * roc_auc_score(labels[:, t], scores[:, t]) for t, w in enumerate(weights[:4])) / 10, abs=1e-12
    )
    assert selection_score(metrics, layout, "weighted_uauc") == got["uauc"]
    assert selection_score(metrics, layout, "like.logloss") == -metrics["like"]["logloss"]
    with pytest.raises(MtrecError, match="--select-by like.ndcg: unknown score; choose mean_auc, weighted_auc"):
        check_select_by("like.ndcg", layout, True)
    with pytest.raises(MtrecError, match="needs the schema's user column"):
        check_select_by("weighted_uauc", layout, False)


# ---- the command line --------------------------------------------------------------------------------

TINY = ["--model", "mmoe", "--model-args", "num_experts=2,expert_hidden=[8]", "--threads", "1", "--no-tensorboard"]


def test_select_by_picks_the_best_epoch_of_that_metric(tmp_path: Path, cli) -> None:
    path = write_log(tmp_path / "data", rows=800)
    out = tmp_path / "run"
    result = cli(
        "train",
        "--schema",
        str(path),
        "--out",
        str(out),
        "--epochs",
        "4",
        "--patience",
        "4",
        "--batch-size",
        "64",
        "--select-by",
        "finish.logloss",
        *TINY,
    )
    assert result.code == 0, result.err
    history = json.loads((out / "history.json").read_text())
    losses = [r["valid"]["finish"]["logloss"] for r in history]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["best_epoch"] == int(np.argmin(losses)) + 1 and metrics["select_by"] == "finish.logloss"
    assert [r["score"] for r in history] == [-v for v in losses]
    assert_user_error(
        cli("train", "--schema", str(path), "--out", str(tmp_path / "r2"), "--select-by", "nope.auc", *TINY),
        "--select-by nope.auc: unknown score",
    )


def test_data_dir_replaces_the_schemas_data_folder(tmp_path: Path, cli) -> None:
    path = write_log(tmp_path / "a", rows=600)
    write_log(tmp_path / "b", rows=900, seed=1)
    store = load_store(load_schema(path, data_dir=tmp_path / "b"))
    assert sum(len(t) for t in store.splits.values()) == 900
    assert_user_error(
        cli(
            "train", "--schema", str(path), "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r"), *TINY
        ),
        "--data-dir",
        "nowhere: not a folder",
    )
    assert_user_error(
        cli("train", "--dataset", "census", "--data-dir", str(tmp_path), "--out", str(tmp_path / "r"), *TINY),
        "--data-dir",
    )
    assert_user_error(
        cli("relate", "--dataset", "census", "--data-dir", str(tmp_path)), "--data-dir goes with --schema"
    )


@pytest.mark.parametrize(
    ("schema", "tasks", "weighted"),
    [
        ("wechat2021.yaml", 7, {"read_comment": 4.0, "like": 3.0, "click_avatar": 2.0, "forward": 1.0}),
        ("kuairand_pure.yaml", 9, None),
    ],
)
def test_the_samples_train_through_the_cli(tmp_path: Path, cli, schema: str, tasks: int, weighted: dict | None) -> None:
    """The shipped schemas train end to end on their generated samples (joins, derived labels, a time
    split), and metrics.json holds the weighted uAUC; --data-dir reads a copy of the sample."""
    data = tmp_path / "data"
    config = yaml.safe_load((REPO / "configs" / schema).read_text())
    shutil.copytree(REPO / "configs" / config["data_dir"], data)
    out = tmp_path / "run"
    result = cli(
        "train",
        "--schema",
        str(REPO / "configs" / schema),
        "--data-dir",
        str(data),
        "--out",
        str(out),
        "--epochs",
        "1",
        "--batch-size",
        "512",
        "--select-by",
        "weighted_uauc",
        *TINY,
    )
    assert result.code == 0, result.err
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["test"]) == tasks
    w = metrics["weighted"]["test"]
    weights = w["weights"]
    if weighted is not None:
        assert weights == weighted
    expected = sum(weights[t] * metrics["test"][t]["uauc"] for t in weights) / sum(weights.values())
    assert w["uauc"] == pytest.approx(expected) and 0 < w["uauc"] < 1
    recorded = json.loads((out / "config.json").read_text())["schema"]
    assert all(Path(j["source"]).parent == data for j in recorded["join"])
    # evaluate reads the run's recorded (absolute) paths again: joins, derived labels and split give the same
    evaluated = cli("evaluate", "--run", str(out))
    assert evaluated.code == 0, evaluated.err
    again = json.loads(evaluated.out)
    assert again["weighted"]["test"]["uauc"] == pytest.approx(w["uauc"], abs=1e-6)


def test_schema_mistakes_are_one_error_line_naming_the_field(tmp_path: Path, cli) -> None:
    path = write_log(tmp_path / "a", join=[{"source": "users.csv", "missing": "sometimes"}])
    result = cli("train", "--schema", str(path), "--out", str(tmp_path / "r"), *TINY)
    assert_user_error(result, "schema.yaml", "join.0.on: Field required", "join.0.missing")
    path = write_log(tmp_path / "b", join=[{"source": "nope.csv", "on": "uid"}])
    assert_user_error(
        cli("train", "--schema", str(path), "--out", str(tmp_path / "r"), *TINY),
        "nope.csv: side table not found (join[0].source",
    )
