"""Data-parallel training on torch.distributed (2 real processes on localhost, gloo) and the device options.

The equivalence tests compare a 2-process run with per-process batch B/2 against a 1-process run with
batch B, from the same seed: the same global batches, so the same steps, up to floating-point summation
order. The models are small and the data a 4,000-row slice of Census, one epoch (8 steps, the last one
a partial batch split over the two processes).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mtrec.data.store import load_store
from mtrec.data.tables import TensorTable, iterate_batches
from mtrec.errors import MtrecError
from mtrec.models import build_model
from mtrec.schema import load_schema
from mtrec.train.distributed import Distributed, resolve_device
from mtrec.train.run import train_run
from mtrec.train.trainer import seed_everything
from tests.ddp_worker import CASES, MODEL_ARGS, PER_RANK_BATCH, config

REPO = Path(__file__).resolve().parents[1]
NO_GPU = "no CUDA GPU on this machine (torch.cuda.is_available() is False): the GPU path is not exercised here"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _reference(schema_path: Path, balancer: str, options: dict) -> tuple[dict, dict, dict]:
    """A 1-process run on the global batch: (final weights, initial weights, validation metrics)."""
    schema = load_schema(schema_path)
    seed_everything(config(1).seed)
    initial = build_model("mmoe", load_store(schema).layout, MODEL_ARGS).state_dict()
    result = train_run(
        schema,
        "mmoe",
        None,
        config(2 * PER_RANK_BATCH),
        model_options=MODEL_ARGS,
        balancer_name=balancer,
        balancer_options=options,
        tensorboard=False,
    )
    return result.model.state_dict(), initial, result.metrics["valid"]


def _assert_same_steps(state: dict, reference: dict, initial: dict) -> None:
    moved = max(float((reference[k] - initial[k]).abs().max()) for k in reference)
    assert moved > 1e-3, moved  # training moved the weights far more than the tolerance below
    for key, value in reference.items():
        torch.testing.assert_close(state[key], value, atol=2e-5, rtol=1e-4, msg=key)


def test_rank_slices_of_every_global_batch_are_the_single_process_batches() -> None:
    n, per_rank = 103, 5
    table = TensorTable(
        sparse=torch.zeros(n, 0, dtype=torch.int64), dense=torch.arange(n).float()[:, None], labels=torch.zeros(n, 1)
    )
    single = [
        b.dense[:, 0].long() for b in iterate_batches(table, 2 * per_rank, True, torch.Generator().manual_seed(7))
    ]
    ranks = [Distributed(r, 2, r, torch.device("cpu"), "gloo") for r in range(2)]
    parts = [list(d.batches(table, per_rank, torch.Generator().manual_seed(7))) for d in ranks]
    assert len(parts[0]) == len(parts[1]) == len(single) == ranks[0].steps(n, per_rank) == 11
    for step, rows in enumerate(single):
        (a, share_a), (b, share_b) = parts[0][step], parts[1][step]
        assert torch.equal(torch.cat([a.dense[:, 0].long(), b.dense[:, 0].long()]), rows)
        # each rank's share of the global batch, times the world size: 1 for a full batch; 2/3 * 2 and 1/3 * 2
        # for the last one (3 rows: 2 on rank 0, 1 on rank 1)
        assert (share_a, share_b) == ((1.0, 1.0) if len(rows) == 10 else (2 * 2 / 3, 2 * 1 / 3))
    # a last global batch with fewer rows than processes is dropped (every rank needs a row)
    assert (
        ranks[0].steps(101, per_rank) == 10
        and len(list(ranks[1].batches(table.slice(0, 101), per_rank, torch.Generator()))) == 10
    )


def test_two_processes_take_the_steps_of_one_process_for_fixed_uw_mgda(
    census_schema_path: Path, tmp_path: Path, one_thread
) -> None:
    load_store(load_schema(census_schema_path))  # built once here; the ranks open it (MTREC_CACHE is inherited)
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.ddp_worker", str(tmp_path), str(census_schema_path)],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            cwd=REPO,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    errors = [p.communicate(timeout=240)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name, (balancer, options) in CASES.items():
        reference, initial, valid = _reference(census_schema_path, balancer, options)
        for key in reference:  # both ranks hold the same weights, bit for bit
            assert torch.equal(ranks[0][name]["state"][key], ranks[1][name]["state"][key]), (name, key)
        _assert_same_steps(ranks[0][name]["state"], reference, initial)
        # metrics of the gathered predictions: the whole validation split, as one process computes them
        for task, values in valid.items():
            assert ranks[0][name]["valid"][task]["auc"] == pytest.approx(values["auc"], abs=1e-5), (name, task)


def test_mtrec_train_nproc_per_node_2_pcgrad_one_run_written_by_rank_0(
    census_schema_path: Path, tmp_path: Path, one_thread
) -> None:
    out = tmp_path / "run"
    args = [sys.executable, "-m", "mtrec", "train", "--schema", str(census_schema_path), "--model", "mmoe"]
    args += ["--model-args", "num_experts=2,expert_hidden=[16],tower_hidden=[8]", "--balancer", "pcgrad"]
    args += ["--epochs", "1", "--batch-size", str(PER_RANK_BATCH), "--seed", "3", "--monitor-every", "0"]
    args += ["--threads", "1", "--no-progress", "--nproc-per-node", "2", "--out", str(out)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("best epoch") == 1  # rank 0 reports; rank 1 prints nothing
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert names == ["config.json", "encoders.json", "history.json", "metrics.json", "model.safetensors", "tensorboard"]
    assert len(list((out / "tensorboard").iterdir())) == 1  # one events file: rank 1 wrote no TensorBoard
    assert json.loads((out / "config.json").read_text())["training"] == {
        "processes": 2,
        "backend": "gloo",
        "device": "cpu",
    }
    reference, initial, valid = _reference(census_schema_path, "pcgrad", {})
    _assert_same_steps(load_file(str(out / "model.safetensors")), reference, initial)
    metrics = json.loads((out / "metrics.json").read_text())
    for task, values in valid.items():
        assert metrics["valid"][task]["auc"] == pytest.approx(values["auc"], abs=1e-5)

    # a mistake found by rank 0 (a finished run in --out) is one error line, and the launcher's exit code is 2
    again = subprocess.run(args, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert again.returncode == 2, again.stderr
    lines = [line for line in again.stderr.splitlines() if line.strip()]
    assert lines == [f"error: --out {out}: a finished run is here; give --overwrite to replace it, or another --out"], (
        lines
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: auto means cuda there")
def test_device_auto_is_the_cpu_without_a_gpu_and_cuda_is_an_error() -> None:
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(MtrecError, match="--device cuda: no CUDA GPU is available"):
        resolve_device("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: --device cuda trains there")
def test_cli_device_errors_are_one_line(cli, census_schema_path: Path, tmp_path: Path) -> None:
    base = ["train", "--schema", str(census_schema_path), "--model", "mmoe", "--epochs", "1"]
    code, _, err = cli(*base, "--device", "cuda", "--out", str(tmp_path / "a"))
    assert code == 2 and err.startswith("error: --device cuda: no CUDA GPU") and err.count("\n") == 1, err
    assert not (tmp_path / "a").exists()
    code, _, err = cli(*base, "--bf16", "--out", str(tmp_path / "b"))
    assert code == 2 and err.startswith("error: --bf16: bfloat16 autocast is for CUDA devices"), err
    code, _, err = cli(*base, "--device", "gpu", "--out", str(tmp_path / "c"))
    assert code == 2 and err.startswith("error: --device: 'gpu' is not allowed"), err
    code, _, err = cli(*base, "--nproc-per-node", "0", "--out", str(tmp_path / "d"))
    assert code == 2 and err.startswith("error: --nproc-per-node: 0 is not a process count"), err


def test_nproc_per_node_inside_torchrun_is_refused(cli, census_schema_path: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = cli(
        "train",
        "--schema",
        str(census_schema_path),
        "--model",
        "mmoe",
        "--nproc-per-node",
        "2",
        "--out",
        str(tmp_path / "r"),
    )
    assert code == 2 and "already one of the 2 processes torchrun started" in err, err


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
def test_training_on_cuda_with_bf16(census_schema_path: Path) -> None:
    from mtrec.train.options import TrainConfig

    schema = load_schema(census_schema_path)
    result = train_run(
        schema,
        "mmoe",
        None,
        TrainConfig(epochs=1, batch_size=256, device="cuda", bf16=True, progress=False),
        model_options=MODEL_ARGS,
        balancer_name="pcgrad",
        tensorboard=False,
    )
    assert all(0.5 < v["auc"] <= 1 for v in result.metrics["valid"].values()), result.metrics
    assert next(result.model.parameters()).device.type == "cpu"  # the run's model comes back on the CPU
