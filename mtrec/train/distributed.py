"""Data-parallel training on torch.distributed, and the device a run trains on.

``torchrun --nproc-per-node N -m mtrec train ...`` (or ``mtrec train --nproc-per-node N``, which launches
exactly that) starts N processes; each finds its rank in the environment torchrun sets (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and joins one process group (gloo on
CPU, nccl on CUDA). What each piece does:

- **Batches.** ``--batch-size`` is per rank: the global batch is ``N x batch_size``. Every epoch, every
  rank draws the same permutation of the training rows from the run's seed (the one a single process
  draws), cuts it into global batches of ``N x batch_size`` rows and takes its own slice of each (the last,
  shorter global batch is split as evenly as possible): rank ``r`` reads only its rows of the store, and a
  2-process run with ``batch_size B/2`` sees the global batches of a 1-process run with ``B``.
- **Losses.** Each rank's per-task losses are all-reduced: every rank's balancer sees the loss of the
  global batch (the mean of the ranks' losses, each weighted by its share of the batch's rows), while the
  gradient that flows back is the rank's own part of it. So a loss-level balancer takes the same decision
  on every rank, its learnable parameters (uncertainty weighting's log-variances) get the same gradient
  everywhere, and :class:`~torch.nn.parallel.DistributedDataParallel` averages the model's gradients into
  the gradient of the global batch.
- **Gradient-level balancers** (PCGrad, MGDA, ...) at ``level=params`` build the per-task gradient matrix
  ``G [T, P]`` with ``torch.autograd.grad``, which DDP's hooks do not see: they all-reduce ``G`` and the
  plain-sum gradient themselves (one flat all-reduce per step) and find the same coefficients on every rank
  from the global ``G``. At ``level=repr`` the representation gradients of different ranks belong to
  different samples: the Gram matrix is summed over ranks, and the one ordinary backward pass goes through
  DDP.
- **Metrics** are computed on the gathered predictions of the whole split (each rank predicts a contiguous
  slice), identically on every rank, so early stopping decides the same everywhere.
- **Files.** Only rank 0 writes the run directory (checkpoints, history, TensorBoard, metrics.json) and
  holds its lock; rank 0 checks the directory and the data first and the others follow its verdict, so a
  mistake is one error, not N. Every rank runs the same callbacks' work (the gradient conflict monitor
  samples on all ranks, rank 0 records it): with extra backward passes on rank 0 alone, two launches of the
  same run differed in the last float bits, and a resumed run was no longer bit-identical.

Exactness: for models whose task loss is a mean over the batch (every model without task spaces or
sample weights), a 2-process run takes the same steps as a 1-process run on the same global batch, up to
floating-point summation order (tests/test_distributed.py checks ``fixed``, ``uw``, ``pcgrad`` and
``mgda``). With task spaces or sample weights the global loss is the row-weighted mean of the ranks'
losses, as DistributedDataParallel defines it. Dropout draws its masks from a per-rank random stream.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from mtrec.data.tables import TensorTable
from mtrec.errors import MtrecError

DEVICES = ("cpu", "cuda", "auto")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The device ``--device NAME`` means in this process: ``cpu``; ``cuda`` (GPU ``local_rank``; an error
    where there is none); ``auto`` (that GPU when CUDA is available, else the CPU)."""
    if name not in DEVICES:
        raise MtrecError(f"--device: unknown device {name!r}; choose cpu, cuda or auto")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU only"
        raise MtrecError(
            f"--device cuda: no CUDA GPU is available to this process (this torch {torch.__version__} is built "
            f"for {build}); use --device cpu, or --device auto to take a GPU when there is one"
        )
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise MtrecError(
            f"--device {name}: process {local_rank} on this machine needs GPU {local_rank}, but there are {count}; "
            f"start at most {count} processes per machine (--nproc-per-node)"
        )
    return torch.device("cuda", local_rank)


def check_precision(device: torch.device, bf16: bool) -> None:
    """``--bf16`` is bfloat16 autocast on a CUDA device; on the CPU it is refused rather than ignored."""
    if bf16 and device.type != "cuda":
        raise MtrecError(
            f"--bf16: bfloat16 autocast is for CUDA devices and this run trains on {device.type}; "
            "drop --bf16, or train with --device cuda"
        )


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on CUDA when ``bf16``, else nothing."""
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def move(table: TensorTable, device: torch.device) -> TensorTable:
    """``table`` on ``device``; to a GPU through pinned memory, asynchronously."""
    if device.type == "cpu":
        return table
    return table._map(lambda t: t.pin_memory().to(device, non_blocking=True))


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise MtrecError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


def world_from_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the variables torchrun sets; ``(0, 1, 0)`` outside torchrun."""
    rank, world, local = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise MtrecError(f"RANK={rank} and WORLD_SIZE={world} (set by torchrun) do not describe a process group")
    return rank, world, local


def global_batches(n: int, batch_size: int, world_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """The epoch's global batches (row indices, ``world_size x batch_size`` each, the last shorter) of a
    random permutation of ``n`` rows drawn from ``generator``: the draw a single process makes per epoch."""
    perm = torch.randperm(n, generator=generator)
    step = batch_size * world_size
    for start in range(0, n, step):
        yield perm[start : start + step]


def rank_slice(batch: Tensor, rank: int, world_size: int) -> Tensor:
    """Rank ``rank``'s part of a global batch: equal contiguous parts, the first ones one row longer
    when it does not divide (a full global batch gives every rank exactly ``batch_size`` rows)."""
    return torch.tensor_split(batch, world_size)[rank]


class _GlobalValue(torch.autograd.Function):
    """Forward: the all-reduced value; backward: the gradient goes to the rank's own losses unchanged."""

    @staticmethod
    def forward(ctx: Any, local: Tensor, value: Tensor) -> Tensor:
        return value.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


@dataclass
class Distributed:
    """This process's place in a data-parallel run (see the module docstring)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    owns_group: bool = True  # False: the caller set the process group up, and tears it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---- set-up -------------------------------------------------------------------------------------
    @classmethod
    def from_env(cls, device_name: str, timeout_s: float = 1800.0) -> Distributed | None:
        """Join the process group torchrun describes in the environment (None outside torchrun, or with
        one process): gloo on CPU, nccl on CUDA; the device is GPU ``LOCAL_RANK``."""
        rank, world, local = world_from_env()
        if world == 1:
            return None
        try:
            device = resolve_device(device_name, local)
        except MtrecError as err:  # the same on every rank: rank 0 says it
            if rank:
                raise FollowerError(str(err)) from None
            raise
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        owns = not dist.is_initialized()
        if owns:
            for name in ("MASTER_ADDR", "MASTER_PORT"):
                if not os.environ.get(name):
                    raise MtrecError(f"WORLD_SIZE={world} but {name} is not set: start the processes with torchrun")
            dist.init_process_group(
                backend,
                rank=rank,
                world_size=world,
                timeout=datetime.timedelta(seconds=timeout_s),
                device_id=device if device.type == "cuda" else None,
            )
        else:
            backend = dist.get_backend()
        return cls(rank, world, local, device, backend, owns)

    def close(self) -> None:
        """Leave the process group (after the last collective), if this object joined it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    # ---- agreeing on rank 0's verdict ---------------------------------------------------------------
    def tell(self, payload: Any = None, error: str | None = None) -> None:
        """Rank 0: send the other ranks what it found (the checks and reads done once: the run directory,
        a checkpoint to resume from), or the error that stops the run."""
        dist.broadcast_object_list([("error", error) if error is not None else ("ok", payload)], src=0)

    def hear(self) -> Any:
        """Ranks other than 0: rank 0's :meth:`tell`: its payload, or its error raised again as a
        :class:`FollowerError` (rank 0 prints it; the others stay quiet)."""
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        kind, payload = box[0]
        if kind == "error":
            raise FollowerError(payload)
        return payload

    def barrier(self) -> None:
        dist.barrier()

    # ---- batches and losses -------------------------------------------------------------------------
    def batches(
        self, table: TensorTable, batch_size: int, generator: torch.Generator
    ) -> Iterator[tuple[TensorTable, float]]:
        """This rank's part of every global batch of the epoch, each with its share of the global batch's
        rows times the world size (1.0 for a full batch). A global batch with fewer rows than ranks (at
        most ``world_size - 1`` rows at the end of an epoch) is dropped: every rank needs a row."""
        for rows in global_batches(len(table), batch_size, self.world_size, generator):
            if len(rows) < self.world_size:
                continue
            mine = rank_slice(rows, self.rank, self.world_size)
            yield table.take(mine), self.world_size * len(mine) / len(rows)

    def steps(self, n: int, batch_size: int) -> int:
        """Steps per epoch of :meth:`batches` over ``n`` rows."""
        step = batch_size * self.world_size
        return n // step + (1 if n % step >= self.world_size else 0)

    def global_losses(self, losses: Tensor, share: float) -> Tensor:
        """The global batch's per-task losses ``[T]``: the same value on every rank (the ranks' losses
        weighted by their share of the rows, summed), whose gradient is this rank's own part of it."""
        local = losses * share if share != 1.0 else losses
        total = local.detach().clone()
        dist.all_reduce(total)
        return _GlobalValue.apply(local, total / self.world_size)

    def mean_(self, tensors: Sequence[Tensor | None]) -> None:
        """Average ``tensors`` over the ranks, in place, in one all-reduce of a flat buffer (None skipped)."""
        present = [t for t in tensors if t is not None]
        if not present:
            return
        flat = torch.cat([t.reshape(-1) for t in present])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for t in present:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n

    def sum_(self, tensor: Tensor) -> Tensor:
        """``tensor`` summed over the ranks (in place; returned)."""
        dist.all_reduce(tensor)
        return tensor

    # ---- model and predictions ----------------------------------------------------------------------
    def wrap(self, model: Any, batch: TensorTable) -> nn.Module:
        """``model`` (a :class:`~mtrec.models.base.MultiTaskModel`) in
        :class:`~torch.nn.parallel.DistributedDataParallel`: its parameters broadcast from rank 0, the
        gradients of ordinary backward passes averaged over the ranks. One probe pass on ``batch`` (random
        state kept) finds whether some parameters take no part in the loss (an unused feature's table): only
        then does DDP search the graph for them on every step."""
        from torch.nn.parallel import DistributedDataParallel

        params = [p for p in model.parameters() if p.requires_grad]
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            output = model(batch)
            total = model.losses(output, batch).sum()
            if output.aux_loss is not None:
                total = total + output.aux_loss
            grads = torch.autograd.grad(total, params, allow_unused=True)
        unused = [self.world_size] if any(g is None for g in grads) else [0]
        # the same choice on every rank (a rank's batch could leave a parameter out where another's does not)
        flag = torch.tensor(unused, device=self.device)
        dist.all_reduce(flag)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=bool(flag.item()))

    def gather_rows(self, n: int, predict: Callable[[int, int], Tensor], columns: int) -> np.ndarray:
        """Predictions ``[n, columns]`` of a split: this rank predicts its contiguous slice of the rows
        (``predict(start, stop)`` -> ``[stop - start, columns]`` float32 on the device), every rank gets all."""
        bounds = [len(part) for part in torch.tensor_split(torch.arange(n), self.world_size)]
        start = sum(bounds[: self.rank])
        mine = predict(start, start + bounds[self.rank]).float()
        longest = max(bounds)
        padded = torch.zeros(longest, columns, dtype=torch.float32, device=mine.device)
        padded[: len(mine)] = mine
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat([p[:k] for p, k in zip(parts, bounds)]).cpu().numpy()

    def seed_rank(self, seed: int, step: int) -> None:
        """Give ranks other than 0 their own torch random stream (dropout masks); rank 0 keeps the one a
        single process has. Parameters are broadcast from rank 0, and the batch order and the balancers'
        generators come from their own seeded generators, so nothing else depends on it."""
        if self.rank:
            torch.manual_seed(hash((seed, self.rank, step)) % 2**63)


class FollowerError(MtrecError):
    """An error raised on a rank other than 0 that rank 0 raises too and prints: the command line does not
    print it again (``silent``), so N processes give one ``error:`` line."""

    silent = True


# ---- launching -----------------------------------------------------------------------------------------
def torchrun_argv(nproc: int, module_args: Sequence[str]) -> list[str]:
    """The torchrun arguments that run ``python -m mtrec MODULE_ARGS`` on ``nproc`` processes of this
    machine (``--standalone``: a rendezvous on a free local port)."""
    return ["--nproc-per-node", str(nproc), "--standalone", "-m", "mtrec", *module_args]


def launch(nproc: int, module_args: Sequence[str], echo: Callable[[str], None] | None = None) -> int:
    """Run ``torchrun`` (``torch.distributed.run``) with :func:`torchrun_argv` in this process as its
    agent; returns the exit code: 0, the code of the first rank that failed, or 1. The ranks print their
    own messages (rank 0 an ``error:`` line); the agent's failure report is not repeated here."""
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    argv = torchrun_argv(nproc, module_args)
    if echo is not None:
        echo("launching: torchrun " + " ".join(argv))
    from mtrec.threads import thread_count

    # the ranks' thread count (unless set): this machine's cores shared among them, as mtrec.threads would
    # choose; torchrun would otherwise set 1, with a banner
    os.environ.setdefault("OMP_NUM_THREADS", str(thread_count(None, workers=nproc)))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(get_args_parser().parse_args(argv))
    except ChildFailedError as err:
        _, first = err.get_first_failure()
        return first.exitcode if first.exitcode > 0 else 1
    return 0
