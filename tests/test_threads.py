"""The thread policy (mtrec/threads.py, issue 12 §2): applied where work starts, in the processes that do it.

The OpenMP wait setting only counts when it is in the environment before torch loads, so the places that
start processes are checked in real fresh processes: a ``mtrec train`` subprocess and a spawned ``mtrec bench``
worker. No timing here: ``benchmarks/contention.py`` measures what the policy is for.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mtrec.errors import MtrecError
from mtrec.threads import SPIN_COUNT, available_cores, current_policy, prepare_openmp, thread_count

CLEAN = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "OMP_NUM_THREADS", "LOCAL_WORLD_SIZE")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No OpenMP or torchrun variables; whatever a test (or the policy) sets is undone afterwards."""
    for name in CLEAN:
        monkeypatch.setenv(name, "1")  # recorded first, so that teardown restores the value from before
        monkeypatch.delenv(name)
    return monkeypatch


def test_thread_count_precedence(clean_env: pytest.MonkeyPatch) -> None:
    # the cores shared among the processes started together, at least one each
    assert thread_count(cores=8) == 8
    assert thread_count(workers=3, cores=8) == 2
    assert thread_count(workers=4, cores=2) == 1
    # a torchrun rank: torchrun's LOCAL_WORLD_SIZE processes share the machine
    clean_env.setenv("LOCAL_WORLD_SIZE", "4")
    assert thread_count(cores=8) == 2
    # the user's (or torchrun's) OMP_NUM_THREADS wins over the share; --threads over everything
    clean_env.setenv("OMP_NUM_THREADS", "3")
    assert thread_count(cores=8) == 3
    assert thread_count(5, cores=8) == 5
    clean_env.setenv("OMP_NUM_THREADS", "two")
    with pytest.raises(MtrecError, match="OMP_NUM_THREADS: 'two'"):
        thread_count(cores=8)
    with pytest.raises(MtrecError, match="--threads: 0"):
        thread_count(0)


def test_prepare_sets_the_spin_count_unless_the_user_chose(clean_env: pytest.MonkeyPatch) -> None:
    prepare_openmp()
    assert os.environ["GOMP_SPINCOUNT"] == str(SPIN_COUNT)
    clean_env.delenv("GOMP_SPINCOUNT")
    clean_env.setenv("OMP_WAIT_POLICY", "active")
    prepare_openmp()
    assert "GOMP_SPINCOUNT" not in os.environ and os.environ["OMP_WAIT_POLICY"] == "active"
    clean_env.setenv("GOMP_SPINCOUNT", "5")
    prepare_openmp()
    assert os.environ["GOMP_SPINCOUNT"] == "5"


def test_train_process_runs_under_the_policy(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A real ``mtrec train`` process: the wait setting was in place before its OpenMP runtime loaded
    (the runtime is found in the process's own memory map), and --threads set the torch count."""
    args = ["train", "--dataset", "synthetic", "--dataset-args", "rows=400,seed=0", "--model", "shared_bottom"]
    args += ["--epochs", "1", "--batch-size", "128", "--no-tensorboard", "--threads", "1", "--out", str(tmp_path)]
    done = subprocess.run([sys.executable, "-m", "mtrec.cli", *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("threads: ")]
    assert lines == [f"threads: 1 torch thread(s); OpenMP libgomp.so.1, GOMP_SPINCOUNT={SPIN_COUNT}"], done.stdout


def test_bench_workers_run_under_the_policy(clean_env: pytest.MonkeyPatch) -> None:
    """A spawned ``mtrec bench`` worker inherits the wait setting before it imports torch and runs on the
    grid's thread count (this test process, with torch loaded long ago, could not pass it otherwise)."""
    from mtrec.bench import worker_pool

    threads = 1 if available_cores() > 1 else 2  # not the worker's default, so the count must come from here
    with worker_pool(1, threads) as pool:
        policy = pool.submit(current_policy).result(timeout=300)
    assert policy.threads == threads
    assert policy.wait == f"GOMP_SPINCOUNT={SPIN_COUNT}" and policy.in_effect
    assert policy.runtime is not None and policy.runtime.startswith("libgomp")


def test_serve_workers_share_the_cores(clean_env: pytest.MonkeyPatch) -> None:
    from mtrec.serve.service import default_threads

    cores = available_cores()
    assert default_threads(1) == cores
    assert default_threads(cores + 1) == 1
    clean_env.setenv("OMP_NUM_THREADS", "3")
    assert default_threads(2) == 3


ALLOCATOR_PROBE = """
import ctypes, resource, sys
from mtrec.threads import tune_allocator
applied = tune_allocator() if sys.argv[1] == "tuned" else False
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
size = 48 << 20  # above glibc's largest automatic mmap threshold (32 MB): its own mmap by default
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(ctypes.c_void_p(block))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, min(faults[1:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuned_allocator_reuses_freed_memory(clean_env: pytest.MonkeyPatch) -> None:
    """``tune_allocator`` keeps freed blocks for reuse: a 48 MB block allocated, written and freed again and
    again faults its ~12,000 pages in at every round with glibc's defaults, and only once when tuned. In fresh
    processes, as the setting is process-wide and cannot be undone; the user's own setting is kept."""
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        clean_env.delenv(name, raising=False)

    def probe(mode: str) -> tuple[str, int]:
        done = subprocess.run([sys.executable, "-c", ALLOCATOR_PROBE, mode], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        applied, faults = done.stdout.split()
        return applied, int(faults)

    default_applied, default_faults = probe("default")
    tuned_applied, tuned_faults = probe("tuned")
    assert tuned_applied == "True"
    assert default_faults > 10_000  # every round maps and touches the block anew
    assert tuned_faults < 100  # later rounds reuse the pages of the first
    clean_env.setenv("MALLOC_TRIM_THRESHOLD_", "0")  # the user's choice: left alone
    assert probe("tuned")[0] == "False"
