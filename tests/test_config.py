"""`mtrec train --config FILE` (issue 12 section 4): one validated run config, flags overriding it, a
finished run's config.json rerunning that run bit for bit; `mtrec --version`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.main import get_command

import mtrec
from mtrec.cli import app
from mtrec.config import RunConfig, build_run_config
from mtrec.schema import load_schema

SMALL = "num_experts=2,expert_hidden=[8],tower_hidden=[4]"
FAST = ("--epochs", "1", "--batch-size", "512", "--monitor-every", "0", "--no-tensorboard", "--threads", "1")


def test_rerun_from_config_json_is_bit_identical_and_flags_override(
    cli, census_schema_path: Path, tmp_path: Path
) -> None:
    first = tmp_path / "first"
    code, _, err = cli(
        "train",
        "--schema",
        str(census_schema_path),
        "--model",
        "mmoe",
        "--model-args",
        SMALL,
        "--seed",
        "7",
        *FAST,
        "--out",
        str(first),
    )
    assert code == 0, err
    recorded = json.loads((first / "config.json").read_text())["run_config"]
    assert recorded["seed"] == 7 and recorded["model_args"]["num_experts"] == 2 and recorded["tensorboard"] is False
    assert isinstance(recorded["schema"], dict)  # the schema inline: the run directory alone reruns it

    again = tmp_path / "again"
    code, _, err = cli("train", "--config", str(first / "config.json"), "--threads", "1", "--out", str(again))
    assert code == 0, err
    assert (again / "metrics.json").read_bytes() == (first / "metrics.json").read_bytes()
    assert not (again / "tensorboard").exists()  # the recorded --no-tensorboard came along

    # a flag given beside the file wins over it
    other = tmp_path / "other"
    code, _, err = cli(
        "train", "--config", str(first / "config.json"), "--seed", "1", "--threads", "1", "--out", str(other)
    )
    assert code == 0, err
    metrics = json.loads((other / "metrics.json").read_text())
    assert metrics["seed"] == 1
    assert metrics["valid"] != json.loads((first / "metrics.json").read_text())["valid"]
    assert json.loads((other / "config.json").read_text())["run_config"]["model_args"] == recorded["model_args"]


def test_yaml_config_with_a_relative_schema_path(census_schema_path: Path, tmp_path: Path) -> None:
    # a relative schema path is read relative to the config file, not the working directory
    folder = census_schema_path.parent
    path = folder / "run.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "schema": census_schema_path.name,
                "model": "mmoe",
                "epochs": 2,
                "lr": 0.01,
                "model_args": {"num_experts": 3},
            }
        )
    )
    config = build_run_config(path, {"lr": 0.5})
    assert (config.epochs, config.lr, config.model_args, config.batch_size) == (2, 0.5, {"num_experts": 3}, 1024)
    assert not (Path.cwd() / census_schema_path.name).exists()
    assert config.resolve_schema().task_names == load_schema(census_schema_path).task_names
    # a data source given as a flag replaces the file's
    assert build_run_config(path, {"dataset": "census"}).schema_file is None


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ({"model": "mmoe", "dataset": "census", "epoch": 3}, "epoch: unknown field"),
        ({"model": "mmoe", "dataset": "census", "lr": -1}, "lr: Input should be greater than 0"),
        ({"dataset": "census"}, "model: Field required"),
        ({"model": "mmoe", "dataset": "census", "schema": "x.yaml"}, "exactly one of 'dataset'"),
    ],
)
def test_a_bad_config_file_is_one_error_naming_file_and_field(cli, tmp_path: Path, content: dict, needle: str) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(content))
    code, _, err = cli("train", "--config", str(path), "--out", str(tmp_path / "run"))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"error: {path}: ") and needle in lines[0], err
    assert not (tmp_path / "run").exists()


def test_config_file_errors_name_the_flag_when_a_flag_is_wrong(cli, tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"model": "mmoe", "dataset": "census"}))
    code, _, err = cli("train", "--config", str(path), "--batch-size", "0", "--out", str(tmp_path / "run"))
    assert code == 2 and err.strip().startswith("error: --batch-size: 0 is not allowed"), err
    for text, needle in (("{not json", "not valid JSON"), ("[1, 2]", "is a mapping")):
        path.write_text(text)
        code, _, err = cli("train", "--config", str(path), "--out", str(tmp_path / "run"))
        assert code == 2 and f"error: {path}: " in err and needle in err, err
    code, _, err = cli("train", "--config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "run"))
    assert code == 2 and "nope.yaml: run config file not found" in err, err
    # --out stays required, config or not
    path.write_text(json.dumps({"model": "mmoe", "dataset": "census"}))
    code, _, err = cli("train", "--config", str(path))
    assert code == 2 and err.strip() == "error: --out: missing; give the run directory to write", err


def test_a_run_config_json_without_run_config_is_refused(cli, tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"run_format": 1, "mtrec_version": "0.0.1", "model": "mmoe"}))
    code, _, err = cli("train", "--config", str(path), "--out", str(tmp_path / "run"))
    assert code == 2 and "records no run_config" in err, err


def test_every_run_config_field_is_a_train_flag_with_the_models_default_and_help() -> None:
    train = get_command(app).commands["train"]
    options = {opt: param for param in train.params for opt in param.opts}
    for name, info in RunConfig.model_fields.items():
        flag = "--" + (info.alias or name).replace("_", "-")
        assert flag in options, flag
        param = options[flag]
        # the flag's own default is None (so a config file can fill it); the shown default is the model's
        assert param.default is None, flag
        assert info.description and info.description in param.help, flag
        default = info.get_default(call_default_factory=True)
        if default not in (None, {}, []):
            assert f"[default: {default}]" in param.help, flag


def test_version(cli) -> None:
    code, out, _ = cli("--version")
    assert code == 0 and out.strip() == f"mtrec {mtrec.__version__}"
