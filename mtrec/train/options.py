"""Training options as a pydantic model, kept apart from the training loop.

This module imports neither torch nor numpy, so the command line can read the defaults of its
options (``mtrec train --help``) without paying for torch's start-up. :mod:`mtrec.train.trainer`
re-exports :class:`TrainConfig`; both import paths name the same class.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class TrainConfig(BaseModel):
    """Training options; the defaults reach the Census targets with ``mmoe`` and ``ple``."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(30, ge=1, description="maximum epochs (early stopping usually ends Census runs in 5-12)")
    batch_size: int = Field(1024, ge=1, description="training batch size")
    lr: float = Field(1e-3, gt=0, description="learning rate (Adam)")
    weight_decay: float = Field(0.0, ge=0, description="weight decay of the model parameters")
    patience: int = Field(3, ge=1, description="epochs without a better validation score before stopping")
    seed: int = Field(0, description="random seed (initialisation, shuffling, sampling)")
    eval_batch_size: int = Field(
        16384, ge=1, description="evaluation batch size (no backward pass: big batches are cheap)"
    )
    progress: bool | None = Field(None, description="show a progress bar (default: only on a terminal)")
    # The gradient conflict monitor samples every this many steps (0: off). At 24: 4.6% more CPU time per
    # step on mmoe / Census (benchmarks/monitor_overhead.py, BENCHMARKS.md), about 7 samples per Census epoch
    # of 175 steps. A sample costs about one training step (two backward passes to the shared layers), so
    # 20 samples an epoch (every 8) costs 13%: pass --monitor-every 8 for denser curves.
    monitor_every: int = Field(
        24,
        ge=0,
        description="sample task-gradient cosines, norm ratios and learning velocity every K steps (0: off)",
    )
