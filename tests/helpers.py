"""Small real files for tests: a synthetic click/watch-time CSV and its schema."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import yaml


def write_toy(folder: Path, rows: int = 400, seed: int = 0, extra: dict | None = None) -> Path:
    """A CSV with a user id, a dense and a sparse feature, a tag sequence, a click and a watch time;
    the labels depend on the features so models can learn. Returns the schema path."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    age = rng.integers(18, 70, rows)
    city = rng.choice(["paris", "lyon", "nice", "lille", "brest"], rows)
    tags = ["|".join(rng.choice(list("abcdef"), rng.integers(0, 4))) for _ in range(rows)]
    logit = (age - 40) / 10 + (city == "paris") * 1.5 - 0.5
    click = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(int)
    watch = np.round(click * rng.gamma(2.0, 10.0, rows) + age / 10, 3)
    user = rng.integers(0, 40, rows)
    lines = ["user,age,city,tags,click,watch"] + [
        f"u{user[i]},{age[i]},{city[i]},{tags[i]},{click[i]},{watch[i]}" for i in range(rows)
    ]
    (folder / "toy.csv").write_text("\n".join(lines) + "\n")
    schema = {
        "name": "toy",
        "source": {"train": "toy.csv"},
        "format": {"type": "csv", "header": True, "delimiter": ","},
        "split": {"valid": 0.2, "test": 0.2},
        "features": [
            {"name": "age", "type": "dense"},
            {"name": "city", "type": "sparse", "embed_dim": 4},
            {"name": "tags", "type": "sequence", "embed_dim": 4, "max_len": 3},
        ],
        "tasks": [
            {"name": "click", "type": "binary", "label": "click"},
            {"name": "watch", "type": "regression", "label": "watch"},
        ],
        "user": "user",
    }
    schema.update(extra or {})
    path = folder / "schema.yaml"
    path.write_text(yaml.safe_dump(schema, sort_keys=False))
    return path


class CliResult(NamedTuple):
    """What ``mtrec ARGS`` run in this process gave: exit code, stdout, stderr."""

    code: int
    out: str
    err: str


def run_main(capsys: pytest.CaptureFixture, *args: str) -> CliResult:
    """``mtrec ARGS`` in this process through the console entry point ``mtrec.cli.main`` (its
    MtrecError handling included). The result unpacks as ``code, out, err``; out and err hold what
    ``capsys`` caught since its last read. An exception escaping ``main()`` (a traceback the user
    would see) is not caught: it fails the test."""
    from mtrec.cli import main

    old, sys.argv = sys.argv, ["mtrec", *args]
    try:
        main()
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    finally:
        sys.argv = old
    captured = capsys.readouterr()
    return CliResult(code, captured.out, captured.err)


def assert_user_error(result: CliResult, *needles: str) -> None:
    """A user error as the CLI must report it: exit code 2, one ``error:`` line holding every needle,
    no traceback."""
    assert result.code == 2, (result.code, result.out, result.err)
    assert "Traceback" not in result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    for needle in needles:
        assert needle in lines[0], lines[0]


def run_cli(*args: str, cache: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real ``mtrec`` command in a subprocess."""
    env = dict(os.environ)
    if cache is not None:
        env["MTREC_CACHE"] = str(cache)
    return subprocess.run(
        [sys.executable, "-m", "mtrec.cli", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def train_steps(model, batch, steps: int, lr: float) -> list[float]:
    """Adam steps on one fixed batch (task losses plus the model's regulariser); asserts that every
    parameter receives a non-zero gradient at the first step; returns the loss of every step."""
    import torch

    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        out = model(batch)
        loss = model.losses(out, batch).sum()
        if out.aux_loss is not None:
            loss = loss + out.aux_loss
        opt.zero_grad()
        loss.backward()
        if step == 0:
            dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
            assert dead == []
        opt.step()
        losses.append(loss.item())
    return losses
