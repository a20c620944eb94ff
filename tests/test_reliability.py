"""A user's bad day (issue 11 sections 2, 3 and 5): no tracebacks, nothing overwritten or half
written, and what a user sees while it works. Every case goes through the console entry point
``mtrec.cli.main`` in this process (argument errors, files, exit codes); the cases where a process
matters (SIGKILL, the run lock) are in tests/test_resume.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import click
import polars as pl
import pytest
import typer
import yaml

from mtrec.cli import app, main
from mtrec.data.store import cache_root, clean_stale_temporaries, load_store
from mtrec.schema import load_schema
from mtrec.train.run import RUN_FORMAT, WEIGHTS
from tests.helpers import assert_user_error, write_toy

SMALL = [
    "--model",
    "shared_bottom",
    "--model-args",
    "bottom_hidden=[8],tower_hidden=[4]",
    "--epochs",
    "2",
    "--batch-size",
    "64",
    "--threads",
    "1",
    "--no-tensorboard",
    "--monitor-every",
    "0",
]


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_toy(tmp_path_factory.mktemp("toy"), rows=300)


@pytest.fixture(scope="module")
def toy_run(toy: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run (trained once for the module)."""
    out = tmp_path_factory.mktemp("runs") / "toy"
    mp = pytest.MonkeyPatch()
    mp.setenv("MTREC_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    mp.setattr(sys, "argv", ["mtrec", "train", "--schema", str(toy), "--out", str(out), *SMALL])
    try:
        main()
    except SystemExit as stop:
        assert not stop.code
    finally:
        mp.undo()
    assert (out / "metrics.json").is_file()
    return out


# ---- 2. one error line, exit 2, never a traceback ----------------------------------------------------


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--epochs", "0"),
        ("--batch-size", "0"),
        ("--lr", "-0.1"),
        ("--patience", "0"),
        ("--threads", "-1"),
        ("--weight-decay", "-1"),
        ("--checkpoint-every", "-2"),
    ],
)
def test_train_option_out_of_range(cli, toy: Path, tmp_path: Path, flag: str, value: str) -> None:
    out = tmp_path / "run"
    args = ["train", "--schema", str(toy), "--out", str(out), *SMALL]
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    assert_user_error(cli(*args), flag, value)
    assert not out.exists()  # refused before anything was written


def test_inf_in_a_dense_column(cli, toy: Path, tmp_path: Path) -> None:
    folder = tmp_path / "data"
    shutil.copytree(toy.parent, folder)
    lines = (folder / "toy.csv").read_text().splitlines()
    cells = lines[7].split(",")
    cells[1] = "inf"  # age
    lines[7] = ",".join(cells)
    (folder / "toy.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    assert_user_error(
        cli("train", "--schema", str(folder / "schema.yaml"), "--out", str(out), *SMALL), "toy.csv", "'age'", "infinite"
    )
    assert not out.exists()  # no partial run directory
    stores = cache_root() / "stores"
    schema = load_schema(folder / "schema.yaml")
    assert (
        not any(p.name.startswith(f"{schema.name}-{schema.fingerprint()[:20]}") for p in stores.glob("*"))
        if stores.is_dir()
        else True
    )  # no broken store cached (nor its temporary)
    assert not list(stores.glob(".*.tmp")) if stores.is_dir() else True


def test_fill_that_is_not_a_number_is_refused_at_schema_load(cli, toy: Path, tmp_path: Path) -> None:
    data = yaml.safe_load(toy.read_text())
    data["features"][0]["fill"] = "abc"
    data["source"]["train"] = str(toy.parent / "toy.csv")
    path = tmp_path / "schema.yaml"
    path.write_text(yaml.safe_dump(data))
    assert_user_error(
        cli("train", "--schema", str(path), "--out", str(tmp_path / "run"), *SMALL),
        str(path),
        "features.0",
        "fill 'abc'",
    )


def test_out_naming_an_existing_file(cli, toy: Path, tmp_path: Path) -> None:
    existing = tmp_path / "notes.txt"
    existing.write_text("mine")
    assert_user_error(cli("train", "--schema", str(toy), "--out", str(existing), *SMALL), str(existing), "is a file")
    assert existing.read_text() == "mine"


def test_damaged_runs_are_clear_errors(cli, toy_run: Path, toy: Path, tmp_path: Path) -> None:
    def damaged(name: str, change) -> Path:
        run = tmp_path / name
        shutil.copytree(toy_run, run)
        change(run)
        return run

    truncated = damaged("truncated", lambda r: (r / WEIGHTS).write_bytes((r / WEIGHTS).read_bytes()[:200]))
    assert_user_error(cli("evaluate", "--run", str(truncated)), WEIGHTS, "cannot read the weights")
    broken = damaged("broken", lambda r: (r / "config.json").write_text('{"model": "shared_bo'))
    assert_user_error(cli("evaluate", "--run", str(broken)), "not valid JSON")

    def other_format(r: Path) -> None:
        config = json.loads((r / "config.json").read_text())
        assert config["run_format"] == RUN_FORMAT  # the format is recorded
        config["run_format"] = RUN_FORMAT + 1
        (r / "config.json").write_text(json.dumps(config))

    future = damaged("future", other_format)
    assert_user_error(
        cli("evaluate", "--run", str(future)),
        f"run format {RUN_FORMAT + 1}",
        f"reads format {RUN_FORMAT}",
        "train the run again",
    )
    # the weights of another model: same model name, other layer sizes
    other = tmp_path / "other"
    done = cli(
        "train",
        "--schema",
        str(toy),
        "--out",
        str(other),
        *[a if a != "bottom_hidden=[8],tower_hidden=[4]" else "bottom_hidden=[6],tower_hidden=[4]" for a in SMALL],
    )
    assert done.code == 0, done.err
    swapped = damaged("swapped", lambda r: shutil.copy(other / WEIGHTS, r / WEIGHTS))
    assert_user_error(cli("evaluate", "--run", str(swapped)), WEIGHTS, "weights of another model")


def test_missing_and_broken_yaml_and_json_files_are_one_error_naming_the_file(
    cli, toy_run: Path, toy: Path, tmp_path: Path
) -> None:
    """Each file mtrec parses (schema, grid, fusion spec: YAML; a run's history: JSON) reports a missing
    file and a syntax error as one error line naming the file (and, for JSON, the line)."""
    broken = tmp_path / "broken.yaml"
    broken.write_text("tasks: [click\nfeatures: x\n")  # an unclosed flow sequence
    missing = tmp_path / "missing.yaml"
    commands = {
        "schema file": ["train", "--out", str(tmp_path / "run"), *SMALL, "--schema"],
        "grid file": ["bench", "--out", str(tmp_path / "bench")],
        "fusion spec": [
            "predict",
            "--run",
            str(toy_run),
            "--input",
            str(toy.parent / "toy.csv"),
            "--output",
            str(tmp_path / "p.csv"),
            "--fusion",
        ],
    }
    for what, args in commands.items():
        assert_user_error(cli(*args, str(missing)), f"{missing}: {what} not found")
        assert_user_error(cli(*args, str(broken)), f"{broken}: not valid YAML (")
    assert not (tmp_path / "run").exists() and not (tmp_path / "p.csv").exists()

    run = tmp_path / "copy"
    shutil.copytree(toy_run, run)
    (run / "history.json").write_text('[\n  {"epoch": 1,\n')
    assert_user_error(cli("diagnose", "--run", str(run)), f"{run / 'history.json'}: not valid JSON (", "line 3)")


def test_a_model_too_big_for_memory_is_refused_before_allocation(cli, toy: Path, tmp_path: Path) -> None:
    data = yaml.safe_load(toy.read_text())
    data["source"]["train"] = str(toy.parent / "toy.csv")
    data["features"][1]["embed_dim"] = 10**9  # city: 7 rows x 1e9 floats, far beyond any machine
    path = tmp_path / "schema.yaml"
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "run"
    result = cli("train", "--schema", str(path), "--out", str(out), *SMALL)
    assert_user_error(result, "parameters", "GiB", "available", "embed_dim")
    line = result.err.strip()
    gib = float(line.split("about ")[1].split(" GiB")[0].replace(",", ""))
    # independent estimate: the city table alone (5 cities + padding + unknown = 7 rows) and the first
    # bottom layer reading its 1e9 values into 8 units, 24 bytes a parameter
    assert gib >= (7 + 8) * 10**9 * 24 / 2**30
    assert not out.exists()


def _command_cases(tmp_path: Path) -> list[list[str]]:
    """Malformed invocations of every command ``mtrec --help`` lists: an unknown option, no arguments,
    required options given nonexistent paths (or garbage files / an empty directory), numbers that
    are not numbers, a negative thread count."""
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    garbage = tmp_path / "garbage.yaml"
    garbage.write_text("{not: [valid")
    missing = tmp_path / "missing" / "thing"
    command = typer.main.get_command(app)
    cases = []
    for name, cmd in sorted(command.commands.items()):
        numbers = [
            p
            for p in cmd.params
            if isinstance(p, click.Option)
            and isinstance(p.type, (click.types.IntParamType, click.types.FloatParamType))
        ]
        required = [p for p in cmd.params if p.required]
        variants = []
        for fill in ("missing", "garbage"):
            args: list[str] = []
            for p in required:
                kind = getattr(p, "type", None)
                if isinstance(kind, (click.types.IntParamType, click.types.FloatParamType)):
                    value = "1"
                elif isinstance(kind, click.Path) or p.name in ("run", "out", "input", "output", "grid", "schema"):
                    value = str(missing if fill == "missing" else (empty if p.name in ("run", "out") else garbage))
                else:
                    value = "x"
                args += ([p.opts[0]] if isinstance(p, click.Option) else []) + [value]
            variants.append(args)
        cases.append([name, "--no-such-option"])
        if required:
            cases.append([name])
            cases.extend([name, *v] for v in variants)
        for p in numbers:
            cases.append([name, *variants[0], p.opts[0], "abc"])
        if any(p.name == "threads" for p in cmd.params):
            cases.append([name, *variants[0], "--threads", "-1"])
    return cases


def test_no_command_shows_a_traceback(cli, tmp_path: Path) -> None:
    """Every command, malformed: exit code 2 with an ``error:`` line (ours) or click's usage error,
    and no exception ever escapes ``main()`` (``cli`` would raise it)."""
    cases = _command_cases(tmp_path)
    names = {c[0] for c in cases}
    assert {
        "train",
        "evaluate",
        "predict",
        "export",
        "calibrate",
        "fuse",
        "serve",
        "diagnose",
        "relate",
        "bench",
        "models",
        "balancers",
        "demo",
    } <= names
    before = sorted(p.name for p in tmp_path.iterdir())
    for args in cases:
        result = cli(*args)
        assert result.code == 2, (args, result.code, result.out[-300:], result.err[-300:])
        assert "Traceback" not in result.err + result.out, args
        assert result.err.startswith("error: ") or "Usage:" in result.err, (args, result.err)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing created by a refused command


# ---- 3. nothing overwritten, nothing half written ---------------------------------------------------


def test_predict_refuses_to_overwrite_its_input(
    cli, toy_run: Path, toy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "in.csv"
    shutil.copy(toy.parent / "toy.csv", data)
    before = data.read_bytes()
    assert_user_error(
        cli("predict", "--run", str(toy_run), "--input", str(data), "--output", str(data)), "is the input file"
    )
    monkeypatch.chdir(tmp_path)  # the same file under another spelling
    assert_user_error(
        cli("predict", "--run", str(toy_run), "--input", "in.csv", "--output", str(tmp_path / "." / "in.csv")),
        "is the input file",
    )
    assert data.read_bytes() == before


def test_training_into_a_finished_run_needs_overwrite(cli, toy: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train", "--schema", str(toy), "--out", str(out), *[a for a in SMALL if a != "--no-tensorboard"]]
    assert cli(*args).code == 0
    (out / "mine.txt").write_text("not mtrec's")
    (out / "tensorboard" / "events.out.tfevents.0.earlier").write_bytes(b"")  # an older run's curves
    old_events = sorted((out / "tensorboard").glob("events.*"))
    old_metrics = (out / "metrics.json").read_bytes()
    assert old_events
    assert_user_error(cli(*args), "a finished run is here", "--overwrite")
    assert (out / "metrics.json").read_bytes() == old_metrics and sorted(
        (out / "tensorboard").glob("events.*")
    ) == old_events
    again = cli(*args, "--overwrite")
    assert again.code == 0, again.err
    new_events = sorted((out / "tensorboard").glob("events.*"))
    assert len(new_events) == 1 and not (out / "tensorboard" / "events.out.tfevents.0.earlier").exists()  # not mixed in
    assert (out / "mine.txt").read_text() == "not mtrec's"  # only mtrec's files are replaced
    assert_user_error(cli(*args, "--resume"), "finished", "nothing to resume")


def test_stale_store_temporaries_are_cleaned(toy: Path) -> None:
    """A kill during ingestion leaves ``.<store>.pid<N>.<random>.tmp``: the next load removes those
    whose process is gone, and leaves a live process's."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(done.stdout)  # that process has exited
    stores = cache_root() / "stores"
    stores.mkdir(parents=True, exist_ok=True)
    stale = stores / f".toy-0123.pid{dead}.ab12.tmp"
    live = stores / f".toy-0456.pid{os.getpid()}.cd34.tmp"
    for folder in (stale, live):
        folder.mkdir()
        (folder / "train.sparse.npy").write_bytes(b"partial")
    load_store(load_schema(toy))
    assert not stale.exists() and live.exists()
    assert clean_stale_temporaries(stores) == []
    shutil.rmtree(live)


# ---- 5. what a user sees ----------------------------------------------------------------------------


def test_progress_lines_when_not_a_terminal(cli, tmp_path: Path) -> None:
    schema = write_toy(tmp_path / "fresh", rows=300, seed=5)
    first = cli("train", "--schema", str(schema), "--out", str(tmp_path / "a"), *SMALL)
    assert first.code == 0, first.err
    lines = first.out.splitlines()
    # 300 rows: 60 valid + 60 test carved (split 0.2 / 0.2), 180 train
    assert any(line.startswith("ingesting 300 rows (180 train, 60 valid, 60 test)") for line in lines), first.out
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert [line.split()[1] for line in epochs] == ["1/2", "2/2"]
    for line in epochs:
        assert "train loss click" in line and "watch" in line and "valid click auc" in line and line.endswith(" s")
    history = json.loads((tmp_path / "a" / "history.json").read_text())
    assert f"click auc {history[0]['valid']['click']['auc']:.4f}" in epochs[0]
    second = cli("train", "--schema", str(schema), "--out", str(tmp_path / "b"), *SMALL)
    assert any(line.startswith("using cached store") for line in second.out.splitlines())
    assert not any(line.startswith("ingesting") for line in second.out.splitlines())


def test_predict_keeps_input_columns(cli, toy_run: Path, toy: Path, tmp_path: Path) -> None:
    out = tmp_path / "scores.parquet"
    result = cli(
        "predict",
        "--run",
        str(toy_run),
        "--input",
        str(toy.parent / "toy.csv"),
        "--output",
        str(out),
        "--keep",
        "user,city",
    )
    assert result.code == 0, result.err
    scores = pl.read_parquet(out)
    source = pl.read_csv(toy.parent / "toy.csv", infer_schema=False)
    assert scores.columns[:2] == ["user", "city"] and "click" in scores.columns
    assert scores["user"].to_list() == source["user"].to_list()
    assert scores["city"].to_list() == source["city"].to_list()
    assert_user_error(
        cli(
            "predict",
            "--run",
            str(toy_run),
            "--input",
            str(toy.parent / "toy.csv"),
            "--output",
            str(tmp_path / "x.csv"),
            "--keep",
            "user,nope",
        ),
        "--keep",
        "nope",
    )
    assert_user_error(
        cli(
            "predict",
            "--run",
            str(toy_run),
            "--input",
            str(toy.parent / "toy.csv"),
            "--output",
            str(tmp_path / "x.csv"),
            "--keep",
            "click",
        ),
        "--keep",
        "score column",
    )


def test_tensorboard_viewer_is_installed() -> None:
    """The README's ``tensorboard --logdir runs`` works from the set-up: the package and its command."""
    command = Path(sys.executable).parent / "tensorboard"
    assert command.is_file()
    done = subprocess.run([str(command), "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip()[0].isdigit(), done.stderr[-500:]
