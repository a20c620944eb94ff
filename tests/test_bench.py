"""`mtrec bench`: grid validation, workers, resume after kill -9, the report, and the report in a browser."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats
from typer.testing import CliRunner

from mtrec.bench import default_parallelism, load_grid
from mtrec.cli import app
from mtrec.errors import MtrecError
from mtrec.report.stats import dominated_by, paired_t_interval

MODELS = ["single_task", {"name": "mmoe", "args": {"num_experts": 2, "expert_hidden": [16], "tower_hidden": [8]}}]
BALANCERS = ["fixed", "uw"]
SEEDS = [0, 1]
TASKS = ("income", "never_married")


def write_grid(folder: Path, schema: Path, **changes) -> Path:
    grid = {
        "name": "tiny census",
        "datasets": [{"schema": os.path.relpath(schema, folder), "label": "census_small"}],  # relative to the grid
        "models": MODELS,
        "balancers": BALANCERS,
        "seeds": SEEDS,
        "train": {"epochs": 2, "batch_size": 256, "patience": 5, "monitor_every": 4},
    }
    grid.update(changes)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def bench_cli(*args: str) -> subprocess.Popen:
    """A real `mtrec bench` process in its own process group (so kill -9 reaches its workers too)."""
    return subprocess.Popen(
        [sys.executable, "-m", "mtrec.cli", "bench", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finished(out: Path) -> list[str]:
    return sorted(p.parent.name for p in (out / "cells").glob("*/metrics.json"))


def tree_hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, census_schema_path: Path) -> tuple[Path, Path]:
    """The tiny grid run once without interruption, in this process (one worker, one thread)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MTREC_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    try:
        folder = tmp_path_factory.mktemp("bench")
        grid = write_grid(folder, census_schema_path)
        out = folder / "out"
        result = CliRunner().invoke(app, ["bench", str(grid), "--out", str(out), "--workers", "1", "--threads", "1"])
        assert result.exit_code == 0, result.output
    finally:
        mp.undo()
    return grid, out


def test_grid_cells_and_run_config(tmp_path: Path, census_schema_path: Path) -> None:
    grid, cells = load_grid(write_grid(tmp_path, census_schema_path))
    assert len(cells) == 2 * 2 * 2
    names = [c.name for c in cells]
    assert names[0] == "census_small__single_task__fixed__s0" and len(set(names)) == 8
    mmoe_uw_1 = next(c for c in cells if c.model == "mmoe" and c.balancer == "uw" and c.seed == 1)
    cfg = mmoe_uw_1.config
    assert (cfg.model, cfg.balancer, cfg.seed, cfg.epochs, cfg.batch_size) == ("mmoe", "uw", 1, 2, 256)
    assert cfg.model_args == MODELS[1]["args"]
    assert cfg.schema_file == census_schema_path.resolve()  # resolved against the grid file's folder
    assert cfg.tensorboard is False  # off in grids unless asked for


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"modles": ["mmoe"]}, "modles: unknown field"),
        ({"train": {"epochs": 1, "learning_rate": 0.1}}, "train.learning_rate: unknown field"),
        ({"train": {"seed": 3}}, "seed"),
        ({"seeds": []}, "seeds"),
        ({"seeds": [0, 0]}, "seeds repeat"),
        ({"models": ["mmoe", {"name": "mmoe", "args": {"num_experts": 2}}]}, "label(s) mmoe used twice"),
        ({"dataset": "census"}, "not both"),
    ],
)
def test_bad_grid_is_one_error_naming_the_field(
    tmp_path: Path, census_schema_path: Path, changes: dict, message: str
) -> None:
    grid = write_grid(tmp_path, census_schema_path, **changes)
    result = CliRunner().invoke(
        app, ["bench", str(grid), "--out", str(tmp_path / "out"), "--workers", "1", "--threads", "1"]
    )
    assert isinstance(result.exception, MtrecError), result.output
    assert message in str(result.exception)
    assert not (tmp_path / "out").exists()


def test_bad_model_option_fails_before_any_training(tmp_path: Path, census_schema_path: Path) -> None:
    grid = write_grid(tmp_path, census_schema_path, models=[{"name": "mmoe", "args": {"experts": 3}}])
    result = CliRunner().invoke(
        app, ["bench", str(grid), "--out", str(tmp_path / "out"), "--workers", "1", "--threads", "1"]
    )
    assert isinstance(result.exception, MtrecError)
    assert "mmoe" in str(result.exception) and "experts" in str(result.exception)
    assert not (tmp_path / "out").exists()


def test_parallelism_defaults_fill_the_cores_and_never_more() -> None:
    assert default_parallelism(None, None, cores=8) == (8, 1)
    assert default_parallelism(None, 2, cores=8) == (4, 2)
    assert default_parallelism(3, None, cores=8) == (3, 2)
    with pytest.raises(MtrecError, match="more than the 8 CPU cores"):
        default_parallelism(None, 16, cores=8)
    with pytest.raises(MtrecError, match="more than the 8 CPU cores"):
        default_parallelism(3, 3, cores=8)
    with pytest.raises(MtrecError, match="--workers"):
        default_parallelism(0, 1, cores=8)


def test_failing_cell_is_recorded_and_the_grid_goes_on(tmp_path: Path, census_schema_path: Path) -> None:
    # pcgrad needs shared parameters; single_task has none: that cell fails, the fixed one still runs
    grid = write_grid(
        tmp_path,
        census_schema_path,
        models=["single_task"],
        balancers=["pcgrad", "fixed"],
        seeds=[0],
        train={"epochs": 1, "batch_size": 512, "monitor_every": 0},
    )
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["bench", str(grid), "--out", str(out), "--workers", "1", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert finished(out) == ["census_small__single_task__fixed__s0"]
    state = json.loads((out / "bench.json").read_text())
    assert "shares none" in state["failed"]["census_small__single_task__pcgrad__s0"]["error"]
    md = (out / "report.md").read_text()
    assert "## Failed cells" in md and "census_small__single_task__pcgrad__s0 | balancer 'pcgrad'" in md


def test_resume_after_kill_matches_an_uninterrupted_grid(
    tmp_path: Path, census_schema_path: Path, uninterrupted: tuple[Path, Path]
) -> None:
    grid, reference = uninterrupted
    out = tmp_path / "out"
    proc = bench_cli(str(grid), "--out", str(out), "--workers", "2", "--threads", "1")
    deadline = time.monotonic() + 120
    while not finished(out) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the command and its workers, mid-grid
    proc.wait()
    done = finished(out)
    partial = sorted(p.name for p in (out / "cells" / ".partial").glob("*"))
    print(f"killed with {len(done)} cell(s) finished, in training: {partial}")
    assert 1 <= len(done) < 8, f"kill came too late or too early: {done}; output: {proc.stdout.read()}"
    before = {name: tree_hashes(out / "cells" / name) for name in done}
    # what a kill mid-cell can leave, made certain here: a half-written cell directory (no metrics.json)
    # and a partial one; both are removed and their cells redone
    todo = [c.name for c in load_grid(grid)[1] if c.name not in done]
    (out / "cells" / todo[0]).mkdir(exist_ok=True)
    (out / "cells" / todo[0] / "config.json").write_text("{}")
    (out / "cells" / ".partial" / todo[-1]).mkdir(parents=True, exist_ok=True)
    (out / "cells" / ".partial" / todo[-1] / "history.json").write_text("[")
    mtimes = {name: (out / "cells" / name / "metrics.json").stat().st_mtime_ns for name in done}

    # resuming with another thread count would not reproduce the runs: refused
    other = CliRunner().invoke(app, ["bench", str(grid), "--out", str(out), "--workers", "1", "--threads", "2"])
    assert isinstance(other.exception, MtrecError) and "--threads 1" in str(other.exception)

    proc = bench_cli(str(grid), "--out", str(out), "--workers", "2", "--threads", "1")
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log
    assert f"{len(done)} finished before, {8 - len(done)} to run" in log
    assert finished(out) == finished(reference) and len(finished(out)) == 8
    for name in done:  # finished cells untouched
        assert tree_hashes(out / "cells" / name) == before[name]
        assert (out / "cells" / name / "metrics.json").stat().st_mtime_ns == mtimes[name]
    assert not (out / "cells" / ".partial").exists()
    for name in finished(out):  # same results as the uninterrupted grid (other process, other worker count)
        ours, theirs = out / "cells" / name, reference / "cells" / name
        assert json.loads((ours / "metrics.json").read_text()) == json.loads((theirs / "metrics.json").read_text())
        assert (ours / "model.safetensors").read_bytes() == (theirs / "model.safetensors").read_bytes()
        assert json.loads((ours / "config.json").read_text()) == json.loads((theirs / "config.json").read_text())
    for report in (out / "report.html", out / "report.md"):
        assert report.is_file()
    assert "| mmoe | uw | 2 |" in (out / "report.md").read_text()


def _cell_value(out: Path, name: str, task: str) -> float:
    return json.loads((out / "cells" / name / "metrics.json").read_text())["test"][task]["auc"]


def test_report_tables_match_the_cells(uninterrupted: tuple[Path, Path]) -> None:
    grid, out = uninterrupted
    _, cells = load_grid(grid)
    md = (out / "report.md").read_text()
    for c in cells:
        row = next(line for line in md.splitlines() if line.startswith(f"| {c.name} |"))
        for task in TASKS:
            assert f"{_cell_value(out, c.name, task):.6f}" in row
    # the paired interval of mmoe / fixed against single_task / fixed, computed here independently
    for task in TASKS:
        a = [_cell_value(out, f"census_small__mmoe__fixed__s{s}", task) for s in SEEDS]
        b = [_cell_value(out, f"census_small__single_task__fixed__s{s}", task) for s in SEEDS]
        ci = stats.ttest_rel(a, b).confidence_interval(0.95)
        mean = np.mean(np.subtract(a, b))
        row = next(line for line in md.splitlines() if line.startswith("| mmoe | fixed |"))
        assert f"{mean:+.4f} [{ci.low:+.4f}, {ci.high:+.4f}]" in row
        assert f"{np.mean(a):.4f} ± {np.std(a, ddof=1):.4f}" in row
    for image in ("pareto-0", "losses-0", "weights-0", "cosines-0", "gates-0-mmoe---fixed"):
        assert (out / "report_files" / f"{image}.png").stat().st_size > 1000
        assert f"report_files/{image}.png" in md
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 5 and "report_files/" not in html  # self-contained


def test_paired_interval_and_pareto_against_independent_computations() -> None:
    a, b = [0.71, 0.74, 0.69, 0.73], [0.70, 0.71, 0.70, 0.70]
    ci = paired_t_interval(a, b)
    ref = stats.ttest_rel(a, b).confidence_interval(0.95)
    assert (ci.low, ci.high) == pytest.approx((ref.low, ref.high), abs=1e-12)
    assert ci.mean == pytest.approx(0.015) and not ci.excludes_zero
    assert paired_t_interval([1.0], [0.5]).low is None
    # objective 0: AUC (higher better); objective 1: MSE (lower better)
    points = {"a": [0.80, 1.0], "b": [0.79, 1.1], "c": [0.82, 1.5], "d": [0.80, 1.0]}
    dom = dominated_by(points, [True, False])
    assert dom == {"a": [], "b": ["a", "d"], "c": [], "d": []}


class _Tables(HTMLParser):
    """Text of every table cell, per table id."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._table = None
        self._row = None
        self._cell = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self._table = self.tables.setdefault(dict(attrs).get("id", f"t{len(self.tables)}"), [])
        elif tag == "tr" and self._table is not None:
            self._row = []
            self._table.append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(self._cell.strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    return ""


def test_report_in_headless_chromium(uninterrupted: tuple[Path, Path], tmp_path: Path) -> None:
    browser = _chromium()
    if not browser:
        print("skipped: no chromium or chromium-browser binary (Debian: apt-get install -y chromium)")
        pytest.skip("no chromium/chromium-browser binary installed (Debian: apt-get install -y chromium)")
    _, out = uninterrupted
    flags = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1200,2000",
    ]
    url = (out / "report.html").resolve().as_uri()
    dom = subprocess.run(flags + ["--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    parser = _Tables()
    parser.feed(dom.stdout)
    cells = parser.tables["cells-0"]
    header, rows = cells[0], cells[1:]
    assert len(rows) == 8
    for row in rows:
        entry = dict(zip(header, row))
        for task in TASKS:
            assert float(entry[f"{task} auc"]) == pytest.approx(_cell_value(out, entry["cell"], task), abs=5e-7)
    results = parser.tables["results-0"]
    by_row = {(r[0], r[1]): dict(zip(results[0], r)) for r in results[1:]}
    for (model, balancer), entry in by_row.items():
        label = "mmoe" if model == "mmoe" else "single_task"
        values = [_cell_value(out, f"census_small__{label}__{balancer}__s{s}", "income") for s in SEEDS]
        mean, std = (float(x) for x in entry["income auc"].split("±"))
        assert (mean, std) == pytest.approx((np.mean(values), np.std(values, ddof=1)), abs=5e-5)

    shot = tmp_path / "report.png"
    run = subprocess.run(flags + [f"--screenshot={shot}", url], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    from matplotlib import image

    pixels = image.imread(str(shot))[..., :3].mean(axis=2)  # grey levels in [0, 1]
    assert pixels.shape[:2] == (2000, 1200)
    assert pixels.var() > 0.005, f"blank screenshot (variance {pixels.var():.5f})"
    assert (pixels < 0.5).mean() > 0.01  # text and figures: a white page has no dark pixels


def test_rerun_of_a_finished_grid_redraws_the_report_with_relate_json(
    uninterrupted: tuple[Path, Path], tmp_path: Path
) -> None:
    grid, reference = uninterrupted
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    cells_before = tree_hashes(out / "cells")
    relate = {
        "findings": ["income and never_married: related, MTL safe"],
        "label_correlation": {"tasks": list(TASKS), "matrix": [[1.0, -0.21], [-0.21, 1.0]]},
    }
    (out / "relate.json").write_text(json.dumps(relate))
    result = CliRunner().invoke(app, ["bench", str(grid), "--out", str(out), "--workers", "1", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "8 finished before, 0 to run" in result.output
    assert tree_hashes(out / "cells") == cells_before
    md = (out / "report.md").read_text()
    section = md.split("## Task relatedness")[1]
    assert "- income and never_married: related, MTL safe" in section
    assert "report_files/relate-correlation.png" in section and '"label_correlation"' in section
