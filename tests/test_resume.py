"""Training survives a crash (issue 11 section 4): real ``mtrec train`` processes killed with SIGKILL
mid-epoch and inside a checkpoint write, then ``--resume``: the run must end bit-identical (same
``metrics.json``, ``history.json`` and ``model.safetensors`` bytes) to an uninterrupted one, for the
six balancers whose state differs most (fixed weights, learned log-variances, learned GradNorm
weights, DWA's loss history, PCGrad's and GradVac's random projection orders, GradVac's EMA targets).

Tiny runs: 1,500 Census rows, batch 128 (11 steps an epoch), 2 epochs, a checkpoint every 3 steps,
one thread."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtrec.train.run import CHECKPOINT, INCOMPLETE
from tests.conftest import REPO, write_census_slice


@pytest.fixture(scope="module")
def schema_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_census_slice(tmp_path_factory.mktemp("resume_census"), train_rows=1500, test_rows=500)


def train_args(schema: Path, balancer: str, out: Path) -> list[str]:
    return [
        "train",
        "--schema",
        str(schema),
        "--model",
        "mmoe",
        "--model-args",
        "num_experts=2,expert_hidden=[16],tower_hidden=[8]",
        "--balancer",
        balancer,
        "--epochs",
        "2",
        "--batch-size",
        "128",
        "--threads",
        "1",
        "--seed",
        "3",
        "--checkpoint-every",
        "3",
        "--monitor-every",
        "4",
        "--out",
        str(out),
    ]


def kill_at_checkpoint(args: list[str], number: int, point: str) -> subprocess.CompletedProcess:
    """Start ``mtrec ARGS`` as a real process, wait until it is inside (``before`` its rename) or just
    past (``after``) its ``number``-th checkpoint write, and SIGKILL it there."""
    env = dict(os.environ, MTREC_TEST_CHECKPOINT_PAUSE=f"{number}:{point}", PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "mtrec.cli", *args],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if "test hook: paused" in line:  # a progress bar may share the line
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    return proc


# balancer, checkpoint to kill at, where; checkpoints (3 steps apart, 11 steps an epoch): 1-3 = epoch 1
# steps 3/6/9, 4 = end of epoch 1, 5-7 = epoch 2 steps 3/6/9. "after N" resumes from checkpoint N,
# "before N" (killed inside the write of N) from N - 1.
CASES = [
    ("fixed", 2, "after", (1, 6)),
    ("uw", 3, "before", (1, 6)),
    ("gradnorm", 4, "after", (2, 0)),
    ("dwa", 6, "before", (2, 3)),
    ("pcgrad", 6, "after", (2, 6)),
    ("gradvac", 2, "before", (1, 3)),
]


@pytest.mark.parametrize("balancer,number,point,resumed_at", CASES, ids=[c[0] for c in CASES])
def test_sigkill_then_resume_is_bit_identical(
    cli, schema_path: Path, tmp_path: Path, balancer: str, number: int, point: str, resumed_at: tuple[int, int]
) -> None:
    reference = tmp_path / "reference"
    done = cli(*train_args(schema_path, balancer, reference))
    assert done.code == 0, done.err
    assert not (reference / CHECKPOINT).exists() and not (reference / INCOMPLETE).exists()  # a complete run

    run = tmp_path / "run"
    kill_at_checkpoint(train_args(schema_path, balancer, run), number, point)
    # what a kill leaves: a marked, incomplete run with its last whole checkpoint, and no metrics
    assert (run / INCOMPLETE).is_file() and (run / CHECKPOINT).is_file()
    assert not (run / "metrics.json").exists()
    if point == "before":  # killed inside the write: its temporary is there, the previous checkpoint whole
        assert list(run.glob(f".{CHECKPOINT}.*.tmp"))
    state = torch.load(run / CHECKPOINT, weights_only=True)["trainer"]
    assert (state["epoch"], state["batch"]) == resumed_at
    assert state["step"] == (resumed_at[0] - 1) * 11 + resumed_at[1] > 0
    refused = cli("evaluate", "--run", str(run))
    assert refused.code == 2 and "incomplete run" in refused.err and "--resume" in refused.err

    resumed = cli(*train_args(schema_path, balancer, run), "--resume")
    assert resumed.code == 0, resumed.err
    assert f"resuming from epoch {resumed_at[0]} step {resumed_at[1]}" in resumed.out
    for name in ("metrics.json", "history.json", "model.safetensors"):
        assert (run / name).read_bytes() == (reference / name).read_bytes(), name
    assert not (run / CHECKPOINT).exists() and not (run / INCOMPLETE).exists()
    assert not list(run.glob(".*.tmp"))


def test_resume_refuses_other_arguments_and_a_second_trainer(cli, schema_path: Path, tmp_path: Path) -> None:
    """--resume with other arguments is refused (naming them); while a real process trains into a
    directory, a second training into it fails at once on the lock."""
    run = tmp_path / "run"
    args = train_args(schema_path, "fixed", run)
    env = dict(os.environ, MTREC_TEST_CHECKPOINT_PAUSE="1:after", PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "mtrec.cli", *args],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in proc.stderr:
            if "test hook: paused" in line:  # a progress bar may share the line
                break
        second = cli(*args, "--overwrite")  # even --overwrite must not touch a directory being trained into
        assert second.code == 2, second.err
        assert "another training" in second.err and f"pid {proc.pid}" in second.err
        assert (run / CHECKPOINT).is_file()  # the first one's files are untouched
    finally:
        proc.kill()
        proc.wait(timeout=30)

    lr = args.index("--seed")
    other = args[:lr] + ["--lr", "0.01"] + args[lr:]
    refused = cli(*other, "--resume")
    assert refused.code == 2 and "lr 0.001 in the run, 0.01 now" in refused.err, refused.err
    two = list(args)
    two[two.index("--threads") + 1] = "2"
    threads = cli(*two, "--resume")
    assert threads.code == 2 and "thread" in threads.err, threads.err
    fresh = cli(*args)
    assert fresh.code == 2 and "interrupted run" in fresh.err and "--resume" in fresh.err


@pytest.mark.parametrize("name", ["pcgrad", "gradvac", "rlw"])
def test_balancer_random_state_is_checkpointed(name: str) -> None:
    """State kept in plain Python attributes (numpy / torch generators: the projection orders of PCGrad
    and GradVac, RLW's weight draws) goes through ``state_dict`` and comes back with ``load_state_dict``.
    Three tasks: with two, every projection order is the same and the end-to-end test cannot tell."""
    from mtrec.balancing import build_balancer

    def draws(balancer) -> list:
        rng = getattr(balancer, "_rng", None)
        if rng is not None:
            return [rng.permutation(3).tolist() for _ in range(4)]
        return [balancer.draw().tolist() for _ in range(4)]

    balancer = build_balancer(name, ["a", "b", "c"])
    draws(balancer)
    saved = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in balancer.state_dict().items()}
    saved = torch.load(_roundtrip(saved), weights_only=True)  # as a checkpoint file holds it
    expected = draws(balancer)
    fresh = build_balancer(name, ["a", "b", "c"])
    assert draws(fresh) != expected  # a fresh generator would not continue the sequence
    fresh.load_state_dict(saved)
    assert draws(fresh) == expected


def _roundtrip(state: dict):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer
