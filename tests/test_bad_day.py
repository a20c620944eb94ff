"""A user's bad day (issue 11, silent wrong results): each case through the real command line,
run in-process through ``mtrec.cli.main`` (the console entry point, with its error handling)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml

from tests.helpers import assert_user_error, write_toy

# ---- 1. a regression label on its raw scale must not wreck the binary tasks -------------------------


def write_feed(folder: Path, rows: int = 4000, seed: int = 2, standardize: bool | None = None) -> Path:
    """A short-video feed: user and item ids, three dense features, click / like / finish and a
    watch time (variance about 57, driven by the item and two dense features), as train / valid /
    test files (60 / 20 / 20 %). Returns the schema path."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    user_bias, item_bias = rng.normal(0, 1, 100), rng.normal(0, 1, 200)
    user, item = rng.integers(0, 100, rows), rng.integers(0, 200, rows)
    d = rng.normal(0, 1, (rows, 3))

    def draw(logit: np.ndarray) -> np.ndarray:
        return (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(int)

    frame = pl.DataFrame(
        {
            "user": user,
            "item": item,
            "d1": d[:, 0].round(4),
            "d2": d[:, 1].round(4),
            "d3": d[:, 2].round(4),
            "click": draw(user_bias[user] + item_bias[item] + 0.8 * d[:, 0] - 0.5),
            "like": draw(0.8 * user_bias[user] - 0.8 * item_bias[item] + 0.8 * d[:, 1] - 1.0),
            "finish": draw(-item_bias[item] + d[:, 2] - 0.3 * d[:, 0]),
            "watch_time": (20 + 5 * item_bias[item] + 4 * d[:, 0] + 3 * d[:, 2] + rng.normal(0, 3, rows)).round(3),
        }
    )
    cut = [0, int(rows * 0.6), int(rows * 0.8), rows]
    for name, start, stop in zip(("train", "valid", "test"), cut[:-1], cut[1:]):
        frame[start:stop].write_csv(folder / f"{name}.csv")
    watch = {"name": "watch_time", "type": "regression", "label": "watch_time"}
    if standardize is not None:
        watch["standardize"] = standardize
    schema = {
        "name": "feed",
        "source": {"train": "train.csv", "valid": "valid.csv", "test": "test.csv"},
        "features": [{"name": "user", "type": "sparse"}, {"name": "item", "type": "sparse"}]
        + [{"name": f"d{k}", "type": "dense"} for k in (1, 2, 3)],
        "tasks": [{"name": t, "type": "binary", "label": t} for t in ("click", "like", "finish")] + [watch],
    }
    path = folder / f"schema_{standardize}.yaml"
    path.write_text(yaml.safe_dump(schema, sort_keys=False))
    return path


def _train(cli, schema: Path, model: str, out: Path, *extra: str) -> dict:
    result = cli(
        "train",
        "--schema",
        str(schema),
        "--model",
        model,
        "--epochs",
        "20",
        "--batch-size",
        "256",
        "--seed",
        "1",
        "--threads",
        "1",
        "--no-tensorboard",
        "--out",
        str(out),
        *extra,
    )
    assert result.code == 0, result.err
    return json.loads((out / "metrics.json").read_text())


def test_regression_label_is_standardised_in_training_only(cli, tmp_path: Path) -> None:
    data = tmp_path / "feed"
    schema = write_feed(data)
    train = pl.read_csv(data / "train.csv")
    test = pl.read_csv(data / "test.csv")
    assert pl.concat([train, test])["watch_time"].var() >= 47

    single = _train(cli, schema, "single_task", tmp_path / "single")
    mmoe = _train(cli, schema, "mmoe", tmp_path / "mmoe")
    raw = _train(cli, write_feed(data, standardize=False), "mmoe", tmp_path / "raw")
    binary = ("click", "like", "finish")
    for task in binary:  # standardised: sharing costs no binary task more than 0.01 AUC
        assert mmoe["test"][task]["auc"] >= single["test"][task]["auc"] - 0.01, (task, mmoe["test"], single["test"])
    # the same model on the raw watch time: the binary tasks are clearly worse, against single-task
    # and against the standardised run (measured over data seeds 0-5 and training seeds 0-3: worst
    # drop 0.034-0.18, mean drop against standardised mmoe 0.045-0.13; here 0.18 and 0.13)
    drops = [single["test"][t]["auc"] - raw["test"][t]["auc"] for t in binary]
    assert max(drops) > 0.03 and np.mean(drops) > 0.015, drops
    gaps = [mmoe["test"][t]["auc"] - raw["test"][t]["auc"] for t in binary]
    assert min(gaps) > 0 and np.mean(gaps) > 0.04, gaps

    # the train statistics are stored with the encoders and the layout; the raw run has none
    mean, std = float(train["watch_time"].mean()), float(train["watch_time"].std(ddof=0))
    stats = json.loads((tmp_path / "mmoe" / "encoders.json").read_text())["labels"]
    assert stats["watch_time"] == pytest.approx([mean, std], rel=1e-6)
    (task,) = [
        t
        for t in json.loads((tmp_path / "mmoe" / "config.json").read_text())["layout"]["tasks"]
        if t["name"] == "watch_time"
    ]
    assert (task["label_mean"], task["label_std"]) == pytest.approx((mean, std), rel=1e-6)
    assert json.loads((tmp_path / "raw" / "encoders.json").read_text())["labels"] == {}

    # predictions and metrics are in seconds: the MSE of `predict` output against the test labels,
    # computed here, is metrics.json's, and far below the label's variance
    result = cli(
        "predict",
        "--run",
        str(tmp_path / "mmoe"),
        "--input",
        str(data / "test.csv"),
        "--output",
        str(tmp_path / "scores.csv"),
    )
    assert result.code == 0, result.err
    predicted = pl.read_csv(tmp_path / "scores.csv")["watch_time"].to_numpy()
    labels = test["watch_time"].to_numpy()
    mse = float(np.mean((predicted - labels) ** 2))
    assert mse == pytest.approx(mmoe["test"]["watch_time"]["mse"], rel=1e-4)
    assert mse < 0.5 * labels.var() and abs(predicted.mean() - labels.mean()) < 0.2 * labels.std()


def test_standardize_is_refused_on_a_binary_task(cli, tmp_path: Path) -> None:
    schema = write_toy(tmp_path / "toy")
    data = yaml.safe_load(schema.read_text())
    data["tasks"][0]["standardize"] = False
    schema.write_text(yaml.safe_dump(data))
    result = cli("train", "--schema", str(schema), "--model", "mmoe", "--epochs", "1", "--out", str(tmp_path / "run"))
    assert_user_error(result, str(schema), "task click", "standardize")


# ---- 2. a diverging run stops with an error, not with metrics ---------------------------------------


def test_diverging_run_stops_with_an_error_and_writes_no_metrics(cli, tmp_path: Path) -> None:
    schema = write_toy(tmp_path / "toy")
    out = tmp_path / "run"
    result = cli(
        "train",
        "--schema",
        str(schema),
        "--model",
        "mmoe",
        "--epochs",
        "3",
        "--batch-size",
        "64",
        "--lr",
        "1e6",
        "--threads",
        "1",
        "--no-tensorboard",
        "--out",
        str(out),
    )
    assert_user_error(result, "diverged", "lr 1e+06")
    assert not (out / "metrics.json").exists() and not (out / "model.safetensors").exists()
    # the same run at a sane learning rate trains
    result = cli(
        "train",
        "--schema",
        str(schema),
        "--model",
        "mmoe",
        "--epochs",
        "1",
        "--batch-size",
        "64",
        "--threads",
        "1",
        "--no-tensorboard",
        "--out",
        str(out),
    )
    assert result.code == 0, result.err


# ---- 3. evaluate --schema matches tasks by name ------------------------------------------------------


def test_evaluate_with_another_schema_matches_tasks_by_name(cli, tmp_path: Path) -> None:
    schema = write_toy(tmp_path / "toy", rows=600)
    run = tmp_path / "run"
    result = cli(
        "train",
        "--schema",
        str(schema),
        "--model",
        "shared_bottom",
        "--epochs",
        "2",
        "--batch-size",
        "64",
        "--threads",
        "1",
        "--no-tensorboard",
        "--out",
        str(run),
    )
    assert result.code == 0, result.err
    own = cli("evaluate", "--run", str(run))
    assert own.code == 0, own.err
    expected = json.loads(own.out)

    data = yaml.safe_load(schema.read_text())
    data["tasks"] = data["tasks"][::-1]  # watch, click: by position, click would be scored as watch
    data["features"] = data["features"][::-1]
    swapped = tmp_path / "toy" / "swapped.yaml"
    swapped.write_text(yaml.safe_dump(data))
    result = cli("evaluate", "--run", str(run), "--schema", str(swapped))
    assert result.code == 0, result.err
    got = json.loads(result.out)
    for split in ("valid", "test"):
        assert set(got[split]) == {"click", "watch"}
        for task, values in expected[split].items():
            assert got[split][task] == pytest.approx(values, rel=1e-6), (split, task)
    assert set(got["test"]["click"]) >= {"auc", "logloss"} and set(got["test"]["watch"]) == {"mse", "mae"}

    data["tasks"][0]["name"] = "dwell"  # a task the run does not have (and one it has, missing)
    other = tmp_path / "toy" / "other.yaml"
    other.write_text(yaml.safe_dump(data))
    assert_user_error(cli("evaluate", "--run", str(run), "--schema", str(other)), "watch", "dwell", str(run))

    data["tasks"][0]["name"] = "watch"
    data["tasks"][0]["type"] = "binary"
    other.write_text(yaml.safe_dump(data))
    assert_user_error(cli("evaluate", "--run", str(run), "--schema", str(other)), "watch is binary here")


# ---- 4. ids written as 617.0 are the ids 617; out-of-vocabulary rates are reported -------------------


def _ids_data(folder: Path) -> Path:
    """Integer item ids, a third of the training rows written as floats ('17.0'); returns the schema."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    rows = 600
    item = rng.integers(0, 40, rows)
    age = rng.integers(18, 70, rows)
    click = (rng.random(rows) < 1 / (1 + np.exp(-((item % 4 == 0) * 2.0 - 1.0)))).astype(int)
    written = [f"{i}.0" if r % 3 == 0 else str(i) for r, i in enumerate(item)]
    pl.DataFrame({"item": written, "age": age, "click": click}).write_csv(folder / "train.csv")
    schema = {
        "name": "ids",
        "source": {"train": "train.csv"},
        "split": {"valid": 0.2, "test": 0.2},
        "features": [{"name": "item", "type": "sparse"}, {"name": "age", "type": "dense"}],
        "tasks": [{"name": "click", "type": "binary", "label": "click"}],
    }
    path = folder / "schema.yaml"
    path.write_text(yaml.safe_dump(schema))
    return path


def test_integral_float_ids_are_in_the_vocabulary_and_oov_is_reported(cli, tmp_path: Path) -> None:
    schema = _ids_data(tmp_path / "ids")
    run = tmp_path / "run"
    result = cli(
        "train",
        "--schema",
        str(schema),
        "--model",
        "shared_bottom",
        "--epochs",
        "2",
        "--batch-size",
        "64",
        "--threads",
        "1",
        "--no-tensorboard",
        "--out",
        str(run),
    )
    assert result.code == 0, result.err
    vocab = json.loads((run / "encoders.json").read_text())["vocabs"]["item"]
    assert len(vocab) == 40 and not any("." in token for token in vocab)

    ids = np.arange(40)
    as_int = tmp_path / "as_int.csv"
    as_float = tmp_path / "as_float.csv"
    pl.DataFrame({"item": [str(i) for i in ids], "age": np.full(40, 30)}).write_csv(as_int)
    pl.DataFrame({"item": [f"{i}.0" for i in ids], "age": np.full(40, 30)}).write_csv(as_float)
    scores = {}
    for path in (as_int, as_float):
        result = cli("predict", "--run", str(run), "--input", str(path), "--output", str(path.with_suffix(".out.csv")))
        assert result.code == 0 and result.err == "", result.err
        assert "out-of-vocabulary rate: item 0.0%" in result.out
        scores[path.name] = pl.read_csv(path.with_suffix(".out.csv"))["click"].to_numpy()
    assert np.array_equal(scores["as_int.csv"], scores["as_float.csv"])
    assert len(np.unique(scores["as_int.csv"])) > 1  # forty ids, not forty out-of-vocabulary rows

    # 10 of 40 ids never seen in training: 25 % out of vocabulary, a warning naming the feature
    unseen = tmp_path / "unseen.csv"
    pl.DataFrame({"item": [str(i if i < 30 else 1000 + i) for i in ids], "age": np.full(40, 30)}).write_csv(unseen)
    result = cli("predict", "--run", str(run), "--input", str(unseen), "--output", str(tmp_path / "u.csv"))
    assert result.code == 0
    assert "item 25.0%" in result.out
    (warning,) = result.err.strip().splitlines()
    assert warning.startswith("warning: feature item: 25.0%") and str(unseen) in warning

    # evaluate reports the rate per split in its JSON
    result = cli("evaluate", "--run", str(run))
    assert result.code == 0 and result.err == "", result.err
    assert json.loads(result.out)["oov_rate"] == {"valid": {"item": 0.0}, "test": {"item": 0.0}}


# ---- 5. predict writes the format its output's name asks for ------------------------------------------


def test_predict_output_format_follows_the_suffix(cli, tmp_path: Path) -> None:
    schema = write_toy(tmp_path / "toy")
    run = tmp_path / "run"
    assert (
        cli(
            "train",
            "--schema",
            str(schema),
            "--model",
            "shared_bottom",
            "--epochs",
            "1",
            "--threads",
            "1",
            "--no-tensorboard",
            "--out",
            str(run),
        ).code
        == 0
    )
    data = tmp_path / "toy" / "toy.csv"
    frames = {}
    for name in ("p.csv", "p.csv.gz", "p.parquet"):
        result = cli("predict", "--run", str(run), "--input", str(data), "--output", str(tmp_path / name))
        assert result.code == 0, result.err
    frames["csv"] = pl.read_csv(tmp_path / "p.csv")
    with gzip.open(tmp_path / "p.csv.gz", "rb") as fh:  # really gzip
        frames["gz"] = pl.read_csv(fh.read())
    assert (tmp_path / "p.parquet").read_bytes()[:4] == b"PAR1"
    frames["parquet"] = pl.read_parquet(tmp_path / "p.parquet")
    assert frames["csv"].columns == ["click", "watch"] and frames["csv"].height == 400
    for key in ("gz", "parquet"):
        assert frames[key].columns == frames["csv"].columns
        assert np.allclose(frames[key].to_numpy(), frames["csv"].to_numpy(), rtol=1e-6)
    result = cli("predict", "--run", str(run), "--input", str(data), "--output", str(tmp_path / "p.txt"))
    assert_user_error(result, "p.txt", ".parquet")
    assert not (tmp_path / "p.txt").exists()


# ---- 6. split and valid_fraction together are refused ---------------------------------------------------


def test_split_and_valid_fraction_together_are_refused(cli, tmp_path: Path) -> None:
    schema = write_toy(tmp_path / "toy", extra={"valid_fraction": 0.3})
    result = cli("train", "--schema", str(schema), "--model", "mmoe", "--epochs", "1", "--out", str(tmp_path / "run"))
    assert_user_error(result, str(schema), "split", "valid_fraction")
    assert not (tmp_path / "run").exists()


# ---- 7. blank labels outside a task's space are unobserved, not missing ------------------------------


def _funnel(folder: Path, blank_inside: int = 0) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    rows = 800
    item = rng.integers(0, 30, rows)
    click = (rng.random(rows) < 0.2 + 0.5 * (item % 3 == 0)).astype(int)
    buy = np.where(click == 1, (rng.random(rows) < 0.1 + 0.8 * (item % 2 == 0)).astype(int), 0)
    cells = [int(b) if c else None for b, c in zip(buy, click)]  # blank where there was no click
    for r in np.flatnonzero(click)[:blank_inside]:
        cells[r] = None
    stay = [round(float(x), 2) if c else None for x, c in zip(rng.gamma(2.0, 30.0, rows), click)]  # seconds, on clicks
    pl.DataFrame({"item": item, "click": click, "buy": cells, "stay": stay}).write_csv(folder / "log.csv")
    schema = {
        "name": "funnel",
        "source": {"train": "log.csv", "valid": "valid.csv", "test": "test.csv"},
        "features": [{"name": "item", "type": "sparse"}],
        "tasks": [
            {"name": "click", "type": "binary", "label": "click"},
            {"name": "buy", "type": "binary", "label": "buy", "space": "click"},
            {"name": "stay", "type": "regression", "label": "stay", "space": "click"},
        ],
    }
    # valid and test: fresh rows of the same process, every label observed where its space is 1
    click2 = (rng.random(rows) < 0.2 + 0.5 * (item % 3 == 0)).astype(int)
    buy2 = np.where(click2 == 1, (rng.random(rows) < 0.1 + 0.8 * (item % 2 == 0)).astype(int), 0)
    stay2 = np.where(click2 == 1, rng.gamma(2.0, 30.0, rows).round(2), 0.0)
    for name in ("valid", "test"):
        pl.DataFrame({"item": item, "click": click2, "buy": buy2, "stay": stay2}).write_csv(folder / f"{name}.csv")
    path = folder / "schema.yaml"
    path.write_text(yaml.safe_dump(schema))
    return path


def test_blank_labels_outside_the_space_are_accepted_inside_refused(cli, tmp_path: Path) -> None:
    schema = _funnel(tmp_path / "ok")
    out = tmp_path / "run"
    result = cli(
        "train",
        "--schema",
        str(schema),
        "--model",
        "esmm",
        "--epochs",
        "5",
        "--batch-size",
        "64",
        "--lr",
        "0.01",
        "--threads",
        "1",
        "--no-tensorboard",
        "--out",
        str(out),
    )
    assert result.code == 0, result.err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["buy"]["auc"] > 0.75  # in-space AUC: the item signal was learnt from the clicks
    # the regression label in the click space is standardised with the clicked rows' statistics
    log = pl.read_csv(tmp_path / "ok" / "log.csv").filter(pl.col("click") == 1)
    stats = json.loads((out / "encoders.json").read_text())["labels"]
    assert stats["stay"] == pytest.approx([log["stay"].mean(), log["stay"].std(ddof=0)], rel=1e-6)
    assert 0 < metrics["test"]["stay"]["mse"] < 2 * float(log["stay"].var())  # in seconds², in the space

    schema = _funnel(tmp_path / "bad", blank_inside=3)
    result = cli("train", "--schema", str(schema), "--model", "esmm", "--epochs", "1", "--out", str(tmp_path / "r2"))
    assert_user_error(result, "log.csv", "'buy'", "3 missing label(s)", "inside its space 'click'")


def test_non_finite_predictions_are_a_divergence_not_a_traceback(tmp_path: Path, one_thread) -> None:
    """Weights gone to NaN at the last step of an epoch show only in the validation predictions."""
    import torch

    from mtrec.balancing import BALANCERS
    from mtrec.data.store import load_store
    from mtrec.models import build_model
    from mtrec.schema import load_schema
    from mtrec.train.trainer import TrainConfig, Trainer, TrainingDiverged

    store = load_store(load_schema(write_toy(tmp_path / "toy")))
    model = build_model("shared_bottom", store.layout)
    trainer = Trainer(model, BALANCERS.get("fixed")(store.layout.task_names), TrainConfig(progress=False))
    assert set(trainer.evaluate(store.split("valid"))) == {"click", "watch"}
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="predictions are not finite"):
        trainer.evaluate(store.split("valid"))
