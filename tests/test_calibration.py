"""Calibration: ECE and the reliability curve, post-hoc calibrators, `mtrec calibrate`, and their
effect on `mtrec evaluate` and `mtrec predict`."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from sklearn.metrics import roc_auc_score

from mtrec.data.tables import FeatureLayout, TaskField
from mtrec.errors import MtrecError
from mtrec.fusion.calibration import Calibrators, calibration_curve, expected_calibration_error
from tests.helpers import run_main


def test_ece_and_curve_against_the_formula_on_hand_data() -> None:
    p = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.9, 0.95, 1.0])
    y = np.array([0, 0, 1, 1, 0, 1, 1, 1])
    # 4 bins of width 0.25: {0.1, 0.2} -> |0 - 0.15|, {0.3} -> |1 - 0.3|, {0.6, 0.7} -> |0.5 - 0.65|,
    # {0.9, 0.95, 1.0} -> |1 - 0.95|; ECE = sum_b n_b / N * gap_b
    expected = (2 * 0.15 + 1 * 0.7 + 2 * 0.15 + 3 * 0.05) / 8
    assert expected_calibration_error(y, p, bins=4) == pytest.approx(expected, abs=1e-12)
    curve = calibration_curve(y, p, bins=4)
    assert [c["count"] for c in curve] == [2, 1, 2, 3]
    assert [c["positive_rate"] for c in curve] == pytest.approx([0.0, 1.0, 0.5, 1.0])
    assert [c["mean_score"] for c in curve] == pytest.approx([0.15, 0.3, 0.65, 0.95])
    assert expected_calibration_error(np.array([1.0, 0.0]), np.array([1.0, 0.0]), bins=10) == 0.0


def _squashed(seed: int, n: int = 6000) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from true probabilities, and scores squashed towards 0.5 (logit / 3)."""
    rng = np.random.default_rng(seed)
    truth = rng.beta(0.6, 1.2, n)
    y = (rng.random(n) < truth).astype(np.float64)
    z = np.log(np.clip(truth, 1e-6, 1 - 1e-6) / np.clip(1 - truth, 1e-6, 1))
    return 1 / (1 + np.exp(-z / 3)), y


@pytest.mark.parametrize("method", ["temperature", "platt", "isotonic"])
def test_calibrators_lower_the_ece_of_squashed_scores_on_held_out_rows(method: str) -> None:
    p, y = _squashed(0)
    layout = FeatureLayout([], [], [], [TaskField("click", "binary")])
    cal = Calibrators.fit(method, p[:3000, None], y[:3000, None], layout)
    held_p, held_y = p[3000:], y[3000:]
    out = cal.apply(held_p[:, None])[:, 0]
    before, after = expected_calibration_error(held_y, held_p), expected_calibration_error(held_y, out)
    assert before > 0.08 and after < before / 3, (before, after)
    if method == "temperature":  # the squash was exactly logit / 3
        assert cal.params["click"]["temperature"] == pytest.approx(1 / 3, rel=0.15)
    if method != "isotonic":  # monotone maps keep the ranking
        assert roc_auc_score(held_y, out) == pytest.approx(roc_auc_score(held_y, held_p), abs=1e-12)


@pytest.fixture(scope="module")
def census_run(census_schema_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-epoch mmoe run on 4,000 Census rows (trained once for this module)."""
    import torch

    from mtrec.schema import load_schema
    from mtrec.train.run import train_run
    from mtrec.train.trainer import TrainConfig

    out = tmp_path_factory.mktemp("calib") / "run"
    mp = pytest.MonkeyPatch()
    mp.setenv("MTREC_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_run(
            load_schema(census_schema_path),
            "mmoe",
            out,
            TrainConfig(epochs=1, batch_size=256, seed=0),
            model_options={"num_experts": 2, "expert_hidden": [16]},
            tensorboard=False,
        )
    finally:
        torch.set_num_threads(threads)
        mp.undo()
    return out


def test_calibrate_then_evaluate_and_predict(
    census_run: Path, census_schema_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    test_csv = str(census_schema_path.parent / "test.csv.gz")
    code, _, err = run_main(
        capsys, "predict", "--run", str(census_run), "--input", test_csv, "--output", str(tmp_path / "raw.csv")
    )
    assert code == 0, err
    raw = pl.read_csv(tmp_path / "raw.csv")

    # evaluate reports reliability per binary task on valid (and test), before any calibrator
    code, out, err = run_main(capsys, "evaluate", "--run", str(census_run))
    assert code == 0, err
    report = json.loads(out)["calibration"]["valid"]
    assert report["method"] is None and set(report["tasks"]) == {"income", "never_married"}
    assert all(0 <= t["ece"] <= 1 and sum(c["count"] for c in t["curve"]) > 0 for t in report["tasks"].values())

    # Platt scaling: predict applies sigmoid(a * logit(p) + b) per task, written out here by hand
    code, out, err = run_main(capsys, "calibrate", "--run", str(census_run), "--method", "platt")
    assert code == 0, err
    assert "income" in out and "platt" in out
    path = census_run / "calibration.json"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    params = json.loads(path.read_text())["tasks"]
    code, _, err = run_main(
        capsys, "predict", "--run", str(census_run), "--input", test_csv, "--output", str(tmp_path / "cal.csv")
    )
    assert code == 0, err
    cal = pl.read_csv(tmp_path / "cal.csv")
    for task in ("income", "never_married"):
        a, b = params[task]["a"], params[task]["b"]
        expected = [1 / (1 + math.exp(-(a * math.log(p / (1 - p)) + b))) for p in raw[task].to_list()]
        assert cal[task].to_numpy() == pytest.approx(np.array(expected), abs=2e-6)
        assert not np.allclose(cal[task].to_numpy(), raw[task].to_numpy(), atol=1e-3)

    # isotonic regression fitted on valid is calibrated on valid: every bin's mean score equals its positive rate
    code, _, err = run_main(capsys, "calibrate", "--run", str(census_run), "--method", "isotonic")
    assert code == 0, err
    code, out, err = run_main(capsys, "evaluate", "--run", str(census_run))
    report = json.loads(out)["calibration"]
    assert report["valid"]["method"] == "isotonic"
    for task in ("income", "never_married"):
        assert report["valid"]["tasks"][task]["ece_calibrated"] < 1e-6  # float32 scores
        assert report["valid"]["tasks"][task]["ece"] > 1e-3
        assert report["test"]["tasks"][task]["ece_calibrated"] is not None


def test_calibrate_user_errors(census_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run_main(capsys, "calibrate", "--run", str(census_run), "--method", "beta")
    assert code == 2 and err.startswith("error:") and "'beta'" in err and "isotonic" in err
    code, _, err = run_main(capsys, "calibrate", "--run", str(tmp_path / "nope"), "--method", "platt")
    assert code == 2 and "nope" in err and "Traceback" not in err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((census_run / "config.json").read_text())
    (broken / "calibration.json").write_text(json.dumps({"method": "platt", "task_names": ["x"], "tasks": {}}))
    with pytest.raises(MtrecError, match="fitted for tasks"):
        Calibrators.load(broken)
