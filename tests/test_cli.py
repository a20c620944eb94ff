"""The `mtrec` command end to end (real subprocesses, real files) and its handling of bad input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from tests.helpers import run_cli, write_toy


def _no_store(cache: Path) -> bool:
    stores = cache / "stores"
    return not stores.exists() or not any(stores.iterdir())


def _assert_user_error(proc, *needles: str) -> None:
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    for needle in needles:
        assert needle in err, err


def test_train_evaluate_predict_on_census_slice(census_schema_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run_cli(
        "train",
        "--schema",
        str(census_schema_path),
        "--model",
        "mmoe",
        "--epochs",
        "4",
        "--batch-size",
        "256",
        "--seed",
        "3",
        "--out",
        str(out),
        cache=tmp_path / "cache",
    )
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == "mmoe" and metrics["seed"] == 3
    for split in ("valid", "test"):
        assert set(metrics[split]) == {"income", "never_married"}
        for values in metrics[split].values():
            assert set(values) == {"auc", "logloss"}
            assert 0.75 < values["auc"] <= 1.0
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "mmoe" and config["model_options"]["num_experts"] == 8
    assert (out / "model.safetensors").stat().st_size > 0

    # evaluate rebuilds the model from the run directory and reproduces the metrics
    proc = run_cli("evaluate", "--run", str(out), cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr
    again = json.loads(proc.stdout)
    for task in ("income", "never_married"):
        assert again["test"][task]["auc"] == pytest.approx(metrics["test"][task]["auc"], abs=1e-9)

    # predict writes one score column per task, one row per input row
    pred = tmp_path / "pred.csv"
    proc = run_cli(
        "predict",
        "--run",
        str(out),
        "--input",
        str(census_schema_path.parent / "test.csv.gz"),
        "--output",
        str(pred),
        cache=tmp_path / "cache",
    )
    assert proc.returncode == 0, proc.stderr
    lines = pred.read_text().splitlines()
    assert lines[0] == "income,never_married" and len(lines) == 2001
    # row by row the run's test predictions: their AUC against the labels read from the raw file is the
    # one metrics.json reports (income: the last field; never married: marital status, the eighth)
    scores = np.array([[float(x) for x in line.split(",")] for line in lines[1:]])
    with gzip.open(census_schema_path.parent / "test.csv.gz", "rt") as fh:
        fields = [line.rstrip("\n").split(", ") for line in fh]
    labels = np.array([[f[-1].strip() == "50000+.", f[7] == "Never married"] for f in fields], dtype=float)
    for t, task in enumerate(("income", "never_married")):
        assert roc_auc_score(labels[:, t], scores[:, t]) == pytest.approx(metrics["test"][task]["auc"], abs=1e-5)


def test_toy_schema_with_user_sequence_and_regression(tmp_path: Path) -> None:
    schema = write_toy(tmp_path / "toy", rows=600)
    out = tmp_path / "run"
    proc = run_cli(
        "train",
        "--schema",
        str(schema),
        "--model",
        "ple",
        "--epochs",
        "2",
        "--batch-size",
        "64",
        "--task-weights",
        "1,0.01",
        "--out",
        str(out),
        cache=tmp_path / "cache",
    )
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["test"]["click"]) == {"auc", "logloss", "uauc", "gauc"}
    assert set(metrics["test"]["watch"]) == {"mse", "mae"}
    assert json.loads((out / "config.json").read_text())["balancer"]["task_weights"] == [1.0, 0.01]


def test_models_lists_the_registry() -> None:
    proc = run_cli("models")
    assert proc.returncode == 0
    names = {line.split()[0] for line in proc.stdout.splitlines()}
    assert {"single_task", "shared_bottom", "omoe", "mmoe", "cgc", "ple"} <= names


# ---- bad input: each one a non-zero exit, one line naming the culprit, nothing left behind ----


def _train(schema: Path, out: Path, cache: Path, model: str = "shared_bottom"):
    return run_cli("train", "--schema", str(schema), "--model", model, "--epochs", "1", "--out", str(out), cache=cache)


def test_missing_data_file(tmp_path: Path) -> None:
    schema = write_toy(tmp_path / "toy")
    (tmp_path / "toy" / "toy.csv").unlink()
    proc = _train(schema, tmp_path / "run", tmp_path / "cache")
    _assert_user_error(proc, "toy.csv", "not found")
    assert not (tmp_path / "run" / "metrics.json").exists() and _no_store(tmp_path / "cache")


def test_empty_data_file(tmp_path: Path) -> None:
    schema = write_toy(tmp_path / "toy")
    (tmp_path / "toy" / "toy.csv").write_text("")
    proc = _train(schema, tmp_path / "run", tmp_path / "cache")
    _assert_user_error(proc, "toy.csv", "empty")
    assert not (tmp_path / "run" / "metrics.json").exists() and _no_store(tmp_path / "cache")


def test_schema_column_absent_from_data(tmp_path: Path) -> None:
    schema = write_toy(tmp_path / "toy")
    data = yaml.safe_load(schema.read_text())
    data["features"].append({"name": "country", "type": "sparse"})
    schema.write_text(yaml.safe_dump(data))
    proc = _train(schema, tmp_path / "run", tmp_path / "cache")
    _assert_user_error(proc, "toy.csv", "'country'")
    assert not (tmp_path / "run" / "metrics.json").exists() and _no_store(tmp_path / "cache")


def _set_cell(csv: Path, line: int, column: int, value: str) -> None:
    lines = csv.read_text().splitlines()
    fields = lines[line].split(",")
    fields[column] = value
    lines[line] = ",".join(fields)
    csv.write_text("\n".join(lines) + "\n")


def test_label_outside_its_domain(tmp_path: Path) -> None:
    schema = write_toy(tmp_path / "toy")
    _set_cell(tmp_path / "toy" / "toy.csv", 5, 4, "2")
    proc = _train(schema, tmp_path / "run", tmp_path / "cache")
    _assert_user_error(proc, "toy.csv", "'click'", "'2'")
    assert not (tmp_path / "run" / "metrics.json").exists() and _no_store(tmp_path / "cache")


def test_label_outside_the_positive_and_negative_lists(census_schema_path: Path, tmp_path: Path) -> None:
    data = yaml.safe_load(census_schema_path.read_text())
    data["tasks"][0]["negative"] = ["nothing like this"]
    data["source"] = {k: str(census_schema_path.parent / v) for k, v in data["source"].items()}
    schema = tmp_path / "census.yaml"
    schema.write_text(yaml.safe_dump(data))
    proc = _train(schema, tmp_path / "run", tmp_path / "cache")
    _assert_user_error(proc, "'income'", "- 50000.")
    assert _no_store(tmp_path / "cache")


def test_nan_in_dense_feature_without_fill(tmp_path: Path) -> None:
    schema = write_toy(tmp_path / "toy")
    _set_cell(tmp_path / "toy" / "toy.csv", 3, 1, "NaN")
    proc = _train(schema, tmp_path / "run", tmp_path / "cache")
    _assert_user_error(proc, "toy.csv", "'age'", "fill")
    assert not (tmp_path / "run" / "metrics.json").exists() and _no_store(tmp_path / "cache")
    # with fill: it trains
    data = yaml.safe_load(schema.read_text())
    data["features"][0]["fill"] = 0
    schema.write_text(yaml.safe_dump(data))
    assert _train(schema, tmp_path / "run", tmp_path / "cache").returncode == 0


def test_schema_with_no_task(tmp_path: Path) -> None:
    schema = write_toy(tmp_path / "toy", extra={"tasks": []})
    proc = _train(schema, tmp_path / "run", tmp_path / "cache")
    _assert_user_error(proc, str(schema), "no task")


def test_unknown_model_name(tmp_path: Path) -> None:
    schema = write_toy(tmp_path / "toy")
    proc = _train(schema, tmp_path / "run", tmp_path / "cache", model="mmeo")
    _assert_user_error(proc, "'mmeo'", "mmoe")
    assert not (tmp_path / "run").exists() and _no_store(tmp_path / "cache")


def test_run_directory_without_weights(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "encoders.json").write_text("{}")
    for args in (
        ("evaluate", "--run", str(run)),
        ("predict", "--run", str(run), "--input", "x.csv", "--output", str(tmp_path / "p.csv")),
    ):
        proc = run_cli(*args, cache=tmp_path / "cache")
        _assert_user_error(proc, str(run), "model.safetensors")
    assert not (tmp_path / "p.csv").exists()


def test_existing_run_is_not_damaged_by_a_failed_run(tmp_path: Path) -> None:
    schema = write_toy(tmp_path / "toy")
    out = tmp_path / "run"
    assert _train(schema, out, tmp_path / "cache").returncode == 0
    before = (out / "metrics.json").read_bytes()
    proc = _train(schema, out, tmp_path / "cache", model="nope")
    assert proc.returncode != 0
    assert (out / "metrics.json").read_bytes() == before
