"""Start-up: help and argument errors must not import torch or polars (issue 12 section 1).

``mtrec --help`` used to take 3.5-4.7 s because ``mtrec.cli`` imported torch, polars and every model
at the top. These tests run in a fresh interpreter (this test process has torch loaded already) and
look at ``sys.modules`` after the CLI has done its work. Timing is left to ``benchmarks/startup.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HEAVY = ("torch", "polars", "pyarrow")

# Runs in a fresh interpreter: every command's --help through typer's CliRunner, then two argument
# errors through the console entry point; prints what happened and which heavy modules got loaded.
_PROBE = r"""
import contextlib, io, json, sys
import mtrec.cli
from typer.main import get_command
from typer.testing import CliRunner

out = {"after_import": sorted(m for m in HEAVY if m in sys.modules), "help": {}}
runner = CliRunner()
commands = sorted(get_command(mtrec.cli.app).commands)
for args in [["--help"]] + [[name, "--help"] for name in commands]:
    result = runner.invoke(mtrec.cli.app, args)
    out["help"][" ".join(args)] = [result.exit_code, "Usage:" in result.output]
out["commands"] = commands

def run_main(*args):
    err = io.StringIO()
    old, sys.argv = sys.argv, ["mtrec", *args]
    try:
        with contextlib.redirect_stderr(err):
            mtrec.cli.main()
        code = 0
    except SystemExit as stop:
        code = stop.code
    finally:
        sys.argv = old
    return [code, err.getvalue()]

out["missing_option"] = run_main("train")
out["out_of_range"] = run_main("train", "--model", "mmoe", "--out", OUT, "--dataset", "census", "--epochs", "0")
out["loaded"] = sorted(m for m in HEAVY if m in sys.modules)
print(json.dumps(out))
"""


def _probe(tmp_path: Path) -> dict:
    code = f"HEAVY = {HEAVY!r}\nOUT = {str(tmp_path / 'run')!r}\n" + _PROBE
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_import_of_the_cli_loads_neither_torch_nor_polars() -> None:
    code = (
        "import mtrec.cli, sys; assert 'torch' not in sys.modules and 'polars' not in sys.modules, sorted(sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_help_and_argument_errors_stay_light(tmp_path: Path) -> None:
    probe = _probe(tmp_path)
    assert probe["after_import"] == []
    # every command is covered, and each help page printed a usage line without an error
    assert {"train", "predict", "serve", "models", "balancers"} <= set(probe["commands"])
    assert len(probe["help"]) == len(probe["commands"]) + 1
    for args, (code, usage) in probe["help"].items():
        assert code == 0 and usage, args
    # a missing required option: click's usage error (exit 2), naming the option
    code, err = probe["missing_option"]
    assert code == 2 and "--model" in err, err
    # a value out of range: MtrecError through main(), one error line and exit 2, before any data is read
    code, err = probe["out_of_range"]
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --epochs: 0"), err
    assert not (tmp_path / "run").exists()
    # and none of it pulled torch or polars in
    assert probe["loaded"] == [], probe["loaded"]


def test_train_config_is_one_class_under_both_import_paths() -> None:
    from mtrec.train.options import TrainConfig as light
    from mtrec.train.trainer import TrainConfig as trainer_config

    assert light is trainer_config
