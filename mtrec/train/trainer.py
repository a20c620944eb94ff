"""The training loop: Adam, early stopping on the validation score, best weights kept.

The trainer owns the optimiser and the loop; the model owns its layers and
its losses; the balancer owns how per-task losses become a gradient. Hooks on
:class:`Callback` let diagnostics watch without the loop knowing about them.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from mtrec.balancing.base import Balancer, StepContext
from mtrec.data.tables import TensorTable, iterate_batches
from mtrec.errors import MtrecError
from mtrec.metrics.core import evaluate_predictions, mean_auc
from mtrec.models.base import MultiTaskModel


class TrainConfig(BaseModel):
    """Training options; the defaults reach the Census targets with ``mmoe`` and ``ple``."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(30, ge=1)  # an upper bound: early stopping usually ends Census runs in 5-12 epochs
    batch_size: int = Field(1024, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    patience: int = Field(3, ge=1)  # epochs without a better validation score before stopping
    seed: int = 0
    eval_batch_size: int = Field(16384, ge=1)  # evaluation has no backward pass: big batches are cheap
    progress: Optional[bool] = None  # None: a progress bar only on a terminal
    # The gradient conflict monitor samples every this many steps (0: off). At 24: 4.6% more CPU time per
    # step on mmoe / Census (benchmarks/monitor_overhead.py, BENCHMARKS.md), about 7 samples per Census epoch
    # of 175 steps. A sample costs about one training step (two backward passes to the shared layers), so
    # 20 samples an epoch (every 8) costs 13%: pass --monitor-every 8 for denser curves.
    monitor_every: int = Field(24, ge=0)


def seed_everything(seed: int) -> None:
    """Seed every generator a run touches, so a fixed seed gives bit-identical training."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _adam(params: list[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """Adam with the fused kernel where this torch has it (CPU since 2.4): one kernel per parameter
    instead of about ten, which matters when a step is a few milliseconds. Same update rule."""
    try:
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):  # an older torch, or a device/dtype without the kernel
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


# A task's batch loss above this many times its loss at the first step (floored at DIVERGENCE_FLOOR,
# so a task with no sample in the first batch, or a near-zero first loss, does not make an outlier
# batch look like divergence) means training has diverged: binary losses start near log 2 and
# standardised regression losses near 1, and neither grows a thousandfold in a run that learns.
DIVERGENCE_FACTOR = 1e3
DIVERGENCE_FLOOR = 1.0


class TrainingDiverged(MtrecError):
    """The losses became non-finite or exploded: the run is stopped and nothing is written."""


class Callback:
    """Hooks called by :class:`Trainer`; override what you need."""

    def on_fit_start(self, trainer: "Trainer") -> None: ...

    def on_losses(self, trainer: "Trainer", step: int, losses: torch.Tensor, output: Any) -> None:
        """Before the backward pass: ``losses`` ``[T]`` still hold their graph (``step`` counts from 0)."""

    def on_batch_end(self, trainer: "Trainer", step: int, losses: torch.Tensor) -> None: ...

    def on_epoch_end(self, trainer: "Trainer", epoch: int, record: dict) -> None: ...


@dataclass
class FitResult:
    best_epoch: int
    best_score: float
    history: list[dict] = field(default_factory=list)


class Trainer:
    def __init__(
        self,
        model: MultiTaskModel,
        balancer: Balancer,
        config: TrainConfig,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        self.model = model
        self.balancer = balancer
        self.config = config
        self.callbacks = list(callbacks)
        params = list(model.parameters()) + list(balancer.parameters())
        self.optimizer = _adam(params, lr=config.lr, weight_decay=config.weight_decay)
        self.step = 0
        self.first_losses: Optional[torch.Tensor] = None  # [T], the divergence check's reference
        self.epoch_stats: dict[str, float] = {}
        self.step_stats: dict[str, float] = {}

    @torch.no_grad()
    def predict(self, table: TensorTable) -> np.ndarray:
        """Scores ``[N, T]`` (probabilities for binary tasks)."""
        self.model.eval()
        out = [
            self.model.predict(self.model(batch)) for batch in iterate_batches(table, self.config.eval_batch_size)
        ]
        return torch.cat(out).numpy() if out else np.zeros((0, self.model.num_tasks), np.float32)

    def evaluate(self, table: TensorTable) -> dict:
        """Metrics of ``table``; predictions or metrics that are not finite mean training diverged."""
        scores = self.predict(table)
        advice = f"lower the learning rate (lr {self.config.lr:g})"
        if not np.isfinite(scores).all():
            raise TrainingDiverged(f"training diverged: the predictions are not finite; {advice}")
        user = table.user.numpy() if table.user is not None else None
        with np.errstate(over="ignore", invalid="ignore"):  # reported below, as one error
            metrics = evaluate_predictions(table.labels.numpy(), scores, self.model.layout, user)
        bad = [
            f"{task} {name}" for task, values in metrics.items() for name, value in values.items()
            if isinstance(value, float) and not np.isfinite(value)
        ]
        if bad:
            raise TrainingDiverged(f"training diverged: metrics not finite ({', '.join(bad[:3])}); {advice}")
        return metrics

    def _train_epoch(self, train: TensorTable, epoch: int, generator: torch.Generator) -> torch.Tensor:
        self.model.train()
        sums = torch.zeros(self.model.num_tasks)
        stat_sums: dict[str, float] = {}
        batches = 0
        show = self.config.progress
        bar = tqdm(
            iterate_batches(train, self.config.batch_size, shuffle=True, generator=generator),
            total=-(-len(train) // self.config.batch_size),
            desc=f"epoch {epoch}",
            disable=None if show is None else not show,
            leave=False,
            dynamic_ncols=True,
        )
        for batch in bar:
            output = self.model(batch)
            losses = self.model.losses(output, batch)  # [T]
            self._check_losses(losses.detach(), epoch)
            for cb in self.callbacks:
                cb.on_losses(self, self.step, losses, output)
            self.optimizer.zero_grad(set_to_none=True)
            context = StepContext(step=self.step, epoch=epoch, model=self.model, extra={"output": output})
            self.balancer.backward(losses, context, output.aux_loss)
            self.optimizer.step()
            detached = losses.detach()
            sums += detached
            self.step_stats = self.balancer.stats()  # this step's weights (and cosines), read by callbacks
            for key, value in self.step_stats.items():
                stat_sums[key] = stat_sums.get(key, 0.0) + float(value)
            batches += 1
            self.step += 1
            for cb in self.callbacks:
                cb.on_batch_end(self, self.step, detached)
            if batches % 20 == 0:
                bar.set_postfix({n: f"{v:.4f}" for n, v in zip(self.model.task_names, (sums / batches).tolist())})
        bar.close()
        self.epoch_stats = {k: v / max(batches, 1) for k, v in stat_sums.items()}
        return sums / max(batches, 1)

    def _check_losses(self, losses: torch.Tensor, epoch: int) -> None:
        """Stop with :class:`TrainingDiverged` when a task loss is non-finite or has exploded."""
        if self.first_losses is None:
            self.first_losses = losses.clone()
        limit = DIVERGENCE_FACTOR * self.first_losses.clamp_min(DIVERGENCE_FLOOR)
        bad = ~torch.isfinite(losses) | (losses > limit)
        if not bool(bad.any()):
            return
        t = int(bad.nonzero()[0, 0])
        raise TrainingDiverged(
            f"training diverged at epoch {epoch}, step {self.step + 1}: task '{self.model.task_names[t]}' "
            f"loss {float(losses[t]):.3g} (first step: {float(self.first_losses[t]):.3g}); "
            f"lower the learning rate (lr {self.config.lr:g})"
        )

    def fit(self, train: TensorTable, valid: TensorTable) -> FitResult:
        """Train until ``epochs`` or ``patience`` epochs without a better validation score; keep the best weights."""
        generator = torch.Generator().manual_seed(self.config.seed)
        for cb in self.callbacks:
            cb.on_fit_start(self)
        best_score, best_epoch, best_state = -float("inf"), 0, None
        history: list[dict] = []
        for epoch in range(1, self.config.epochs + 1):
            train_losses = self._train_epoch(train, epoch, generator)
            self.balancer.on_epoch_end(epoch, train_losses)
            metrics = self.evaluate(valid)
            score = mean_auc(metrics, self.model.layout)
            record = {
                "epoch": epoch,
                "train_loss": dict(zip(self.model.task_names, train_losses.tolist())),
                "valid": metrics,
                "score": score,
                "weights": self.balancer.weights(),
                "balancer": self.epoch_stats,  # per-epoch means of the balancer's per-step stats
            }
            history.append(record)
            for cb in self.callbacks:
                cb.on_epoch_end(self, epoch, record)
            if score > best_score:
                best_score, best_epoch = score, epoch
                best_state = copy.deepcopy(self.model.state_dict())
            elif epoch - best_epoch >= self.config.patience:
                break
        if best_state is not None:
            self.model.load_state_dict(best_state)
        return FitResult(best_epoch=best_epoch, best_score=best_score, history=history)
