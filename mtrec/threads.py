"""The thread policy of every mtrec process that runs torch work: how many threads, and how idle ones wait.

Every place that starts work applies it with one call, :func:`apply_thread_policy`: ``mtrec train`` and the
other commands (``--threads`` overrides the count), the worker processes of ``mtrec bench``
(:mod:`mtrec.bench`) and of ``mtrec serve`` (:mod:`mtrec.serve.service`), and each rank of a distributed
run (``torchrun ... -m mtrec train``: every rank starts through :func:`mtrec.cli.main` and its ``train``
command). Code that starts a process that will import torch calls :func:`prepare_openmp` first, so the
child inherits the setting in its environment; from Python, call :func:`apply_thread_policy` (or
:func:`prepare_openmp`) before the first ``import torch``.

Why (issue 12, measured on 2 cores with ``benchmarks/contention.py``; figures in BENCHMARKS.md). The torch
CPU wheel parallelises its ops with GNU OpenMP (``torch/lib/libgomp.so.1``; its MKL and oneDNN use the same
runtime) on ``torch.get_num_threads()`` threads, by default one per core. A training step of ``mmoe`` on
Census enters about 90 parallel regions of ~0.2 ms each (``bmm``, ``cat``, the fused Adam step, ...). A
libgomp thread that waits (at the barrier ending a region, or for the next region) spins before it sleeps:
300,000 rounds when ``OMP_WAIT_POLICY`` is unset, about 3 ms by libgomp's own estimate, as long as a
scheduler time slice. On quiet cores that saves a wake-up per region. When another process holds a core,
one torch thread is descheduled for a slice while its sibling spins at the barrier waiting for it, and the
spinning takes CPU from the very thread it waits for and from the other process: an epoch took 3.5-4.9x its
quiet time beside one busy loop. With ``GOMP_SPINCOUNT=1000`` (about 10 microseconds of spinning, then a
sleep on a futex) the quiet step time is unchanged and the step beside a busy loop takes ~1.8x; sleeping at
once (``OMP_WAIT_POLICY=passive``) or one thread cost 15-35% on quiet cores.

The environment variable is read once, when the OpenMP runtime is loaded (on ``import torch``): setting it
later changes nothing in this process (only in processes it starts). The thread count, by contrast, can be
changed at any time with ``torch.set_num_threads``, which sets the OpenMP and MKL counts; the next parallel
region uses it. A value the user put in the environment (``GOMP_SPINCOUNT``, ``OMP_WAIT_POLICY``,
``OMP_NUM_THREADS``) is kept.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from mtrec.errors import MtrecError

SPIN_COUNT = 1000  # GOMP_SPINCOUNT: rounds a waiting OpenMP thread spins before it sleeps (libgomp: ~10 us)
WAIT_VARIABLES = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")  # either one set by the user is left alone
RUNTIMES = ("libgomp", "libiomp", "libomp")  # GNU, Intel and LLVM OpenMP, as their file names start

_state: dict[str, bool] = {}  # "in_effect": whether the wait setting was in the environment when OpenMP loaded

# glibc malloc: keep the memory of freed tensors instead of handing it back to the system, so that the next
# step's tensors of the same sizes reuse pages already mapped (see tune_allocator)
MALLOC_MMAP_THRESHOLD = 64 << 20  # bytes: blocks up to this size come from the heap, not from their own mmap
MALLOC_TRIM_THRESHOLD = 256 << 20  # bytes: free memory at a heap's top is returned only beyond this much
_MALLOC_OPTIONS = (
    ("MALLOC_MMAP_THRESHOLD_", -3, MALLOC_MMAP_THRESHOLD),
    ("MALLOC_TRIM_THRESHOLD_", -1, MALLOC_TRIM_THRESHOLD),
)


def openmp_runtime() -> str | None:
    """The file name of torch's OpenMP library in this process (e.g. ``libgomp.so.1``; torch's own copy is
    preferred over others, such as scikit-learn's vendored libgomp), or None when none is loaded yet (or this
    is not Linux, where it is not looked up)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    paths = {line.split(None, 5)[-1] for line in maps.splitlines() if "/" in line}
    found = sorted(
        (f"{os.sep}torch{os.sep}" not in path, path) for path in paths if Path(path).name.startswith(RUNTIMES)
    )
    return Path(found[0][1]).name if found else None


def _initial_environment() -> set[str]:
    """Names in the environment this process was started with (what a runtime loaded at start-up saw)."""
    try:
        raw = Path("/proc/self/environ").read_bytes()
    except OSError:
        return set()
    return {item.split(b"=", 1)[0].decode(errors="replace") for item in raw.split(b"\0") if item}


def prepare_openmp() -> bool:
    """Put the wait setting (``GOMP_SPINCOUNT=1000``) in the environment unless the user set one; cheap,
    imports nothing heavy. Returns whether the setting governs this process's OpenMP runtime: True when it
    was in place before the runtime loaded (or inherited from the parent), False when the runtime was loaded
    first (then only the processes this one starts get it)."""
    if "in_effect" not in _state:
        loaded = "torch" in sys.modules  # torch's OpenMP library is loaded with it
        inherited = any(name in _initial_environment() for name in WAIT_VARIABLES)
        _state["in_effect"] = inherited or not loaded
    if not any(name in os.environ for name in WAIT_VARIABLES):
        os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    return _state["in_effect"]


def tune_allocator() -> bool:
    """Keep freed memory for reuse in this process (glibc's ``mallopt``; elsewhere nothing). Returns whether
    the setting was applied.

    Why (issue 12, Census ``mmoe``, batch 1024): a training step allocates and frees dozens of tensors of
    1-4 MB. With glibc's defaults (an mmap threshold that adapts to the sizes freed, free memory at a heap's
    top handed back to the system beyond twice that threshold) the pages of these tensors keep going back
    to the system and coming back as minor page faults, each a page the kernel zeroes: 700-1,000 faults
    per step on two torch threads (40-70 on one). With a fixed mmap threshold of 64 MB and a trim threshold
    of 256 MB, 0-50 remain, and a two-thread step takes about 10% less wall time (14.3 -> 12.6 ms, and
    16.5 -> 14.9 ms before the blocked fold of mtrec/nn/embedding.py; medians of 7 rounds of 30 steps).
    Unlike the OpenMP setting this takes effect at once, in this process only. A value the user put in the
    environment (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, read by glibc at start-up) is kept.
    """
    if "allocator" in _state:
        return _state["allocator"]
    applied = False
    if sys.platform.startswith("linux") and not any(name in os.environ for name, _, _ in _MALLOC_OPTIONS):
        import ctypes

        try:
            libc = ctypes.CDLL("libc.so.6")
            applied = all(libc.mallopt(param, value) == 1 for _, param, value in _MALLOC_OPTIONS)
        except (OSError, AttributeError):  # not glibc (musl has no mallopt)
            applied = False
    _state["allocator"] = applied
    return applied


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the system has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _env_count(name: str) -> int | None:
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        raise MtrecError(f"environment variable {name}: '{text}' is not a whole number") from None
    if value < 1:
        raise MtrecError(f"environment variable {name}: {value} is not a thread count (at least 1)")
    return value


def thread_count(threads: int | None = None, workers: int = 1, cores: int | None = None) -> int:
    """Torch threads for one process: ``threads`` when given (``--threads``); else ``OMP_NUM_THREADS`` when
    set (the user's, or torchrun's for several ranks); else the cores shared among the processes started
    together on this machine (``workers``, times torchrun's ``LOCAL_WORLD_SIZE`` for a distributed rank),
    at least 1."""
    if threads is not None:
        if threads < 1:
            raise MtrecError(f"--threads: {threads} is not a thread count (at least 1)")
        return threads
    from_env = _env_count("OMP_NUM_THREADS")
    if from_env is not None:
        return from_env
    local = _env_count("LOCAL_WORLD_SIZE") or 1
    return max(1, (cores or available_cores()) // (max(1, workers) * local))


@dataclass(frozen=True)
class ThreadPolicy:
    """What a process runs with: torch threads, the OpenMP runtime and its wait setting."""

    threads: int
    runtime: str | None
    wait: str  # e.g. "GOMP_SPINCOUNT=1000"
    in_effect: bool  # whether ``wait`` governs this process's runtime (set before it loaded)

    def describe(self) -> str:
        """One line for a log: ``threads: 2 torch thread(s); OpenMP libgomp.so.1, GOMP_SPINCOUNT=1000``."""
        runtime = self.runtime or "not loaded"
        line = f"threads: {self.threads} torch thread(s); OpenMP {runtime}, {self.wait}"
        if not self.in_effect:
            line += " (not in effect here: the OpenMP runtime was loaded before it was set)"
        elif self.runtime is not None and not self.runtime.startswith("libgomp") and self.wait.startswith("GOMP"):
            line += " (not read by this runtime)"
        return line


def current_policy() -> ThreadPolicy:
    """This process's thread count and OpenMP wait setting as they are now (changes nothing)."""
    import torch

    wait = ", ".join(f"{name}={os.environ[name]}" for name in WAIT_VARIABLES if name in os.environ)
    return ThreadPolicy(
        threads=torch.get_num_threads(),
        runtime=openmp_runtime(),
        wait=wait or "OpenMP's default wait",
        in_effect=_state.get("in_effect", any(name in _initial_environment() for name in WAIT_VARIABLES)),
    )


def apply_thread_policy(threads: int | None = None, *, workers: int = 1) -> ThreadPolicy:
    """Apply the policy in this process: the OpenMP wait setting (:func:`prepare_openmp`; effective only if
    torch is not imported yet, or inherited), the allocator setting (:func:`tune_allocator`) and the torch
    thread count: ``threads`` when given; else :func:`thread_count` (``workers``: processes started together
    that share the cores), unless torch was imported before this call, whose caller (a Python program, a
    test) may have chosen its count already: that count is kept. Returns what is in force."""
    prepare_openmp()
    tune_allocator()
    fresh = "torch" not in sys.modules
    count = thread_count(threads, workers)
    import torch

    if threads is not None or fresh:
        torch.set_num_threads(count)
    return current_policy()
