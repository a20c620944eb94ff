"""Training options as a pydantic model, kept apart from the training loop.

This module imports neither torch nor numpy, so the command line can read the defaults of its
options (``mtrec train --help``) without paying for torch's start-up. :mod:`mtrec.train.trainer`
re-exports :class:`TrainConfig`; both import paths name the same class.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class TrainConfig(BaseModel):
    """Training options; the defaults reach the Census targets with ``mmoe`` and ``ple``."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(30, ge=1, description="maximum epochs (early stopping usually ends Census runs in 5-12)")
    batch_size: int = Field(
        1024, ge=1, description="training batch size (per process: with torchrun, N processes train on N x this)"
    )
    lr: float = Field(1e-3, gt=0, description="learning rate (Adam)")
    weight_decay: float = Field(0.0, ge=0, description="weight decay of the model parameters")
    patience: int = Field(3, ge=1, description="epochs without a better validation score before stopping")
    seed: int = Field(0, description="random seed (initialisation, shuffling, sampling)")
    eval_batch_size: int = Field(
        16384, ge=1, description="evaluation batch size (no backward pass: big batches are cheap)"
    )
    progress: bool | None = Field(None, description="show a progress bar (default: only on a terminal)")
    device: Literal["cpu", "cuda", "auto"] = Field(
        "cpu", description="where to train: cpu, cuda (a GPU; an error without one) or auto (a GPU if there is one)"
    )
    bf16: bool = Field(False, description="bfloat16 autocast of the forward pass (CUDA only)")
    select_by: str = Field(
        "mean_auc",
        description="validation score for early stopping and the best epoch: mean_auc, weighted_auc, "
        "weighted_uauc, weighted_gauc (the tasks' schema weights) or TASK.METRIC, e.g. like.auc",
    )
    # The gradient conflict monitor samples every this many steps (0: off). Every 8 gives about 22 samples
    # per Census epoch of 175 steps; on the last shared layer (the default scope) a sample costs about a
    # third of a training step on mmoe / Census: +3.9% CPU time per step at every 8 on quiet cores, +6-7%
    # beside other work (benchmarks/monitor_overhead.py, BENCHMARKS.md); on all shared dense parameters about
    # one step, +16%.
    monitor_every: int = Field(
        8,
        ge=0,
        description="sample task-gradient cosines, norm ratios and learning velocity every K steps (0: off)",
    )
    monitor_scope: Literal["last", "all"] = Field(
        "last",
        description="where the monitor takes task gradients: the last shared layer the model declares (last; "
        "where GradNorm measures) or every shared dense parameter (all; about 3x the cost)",
    )
