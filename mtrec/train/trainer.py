"""The training loop: Adam, early stopping on the validation score, best weights kept.

The trainer owns the optimiser and the loop; the model owns its layers and
its losses; the balancer owns how per-task losses become a gradient. Hooks on
:class:`Callback` let diagnostics watch without the loop knowing about them.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mtrec.balancing.base import Balancer, StepContext
from mtrec.data.tables import TensorTable, iterate_batches
from mtrec.errors import MtrecError
from mtrec.metrics.core import evaluate_predictions, selection_score
from mtrec.models.base import MultiTaskModel
from mtrec.train.distributed import Distributed, autocast, move
from mtrec.train.options import TrainConfig  # defined without torch for the CLI; re-exported here


def seed_everything(seed: int) -> None:
    """Seed every generator a run touches, so a fixed seed gives bit-identical training."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _adam(model: torch.nn.Module, balancer: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """Adam over the model's parameters (with ``weight_decay``) and, in a group of their own without
    weight decay, the balancer's learnable ones (UW's log-variances, GradNorm's weights): they are
    not model weights, and decay would pull them toward 0 (UW: every variance toward 1) whatever the
    losses say. The fused kernel where this torch has it (CPU since 2.4): one kernel per parameter
    instead of about ten, which matters when a step is a few milliseconds. Same update rule."""
    groups: list[dict[str, Any]] = [{"params": list(model.parameters()), "weight_decay": weight_decay}]
    own = list(balancer.parameters())
    if own:
        groups.append({"params": own, "weight_decay": 0.0})
    try:
        return torch.optim.Adam(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):  # an older torch, or a device/dtype without the kernel
        return torch.optim.Adam(groups, lr=lr)


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

    def on_fit_start(self, trainer: Trainer) -> None: ...

    def on_losses(self, trainer: Trainer, step: int, losses: torch.Tensor, output: Any) -> None:
        """Before the backward pass: ``losses`` ``[T]`` still hold their graph (``step`` counts from 0)."""

    def on_batch_end(self, trainer: Trainer, step: int, losses: torch.Tensor) -> None: ...

    def on_epoch_end(self, trainer: Trainer, epoch: int, record: dict) -> None: ...

    def state_dict(self) -> dict:
        """What a checkpoint must hold for a resumed run to continue exactly (default: nothing)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (called after ``on_fit_start`` when a run resumes)."""


CHECKPOINT_FORMAT = 1  # the layout of Trainer.state_dict(); a checkpoint of another format is refused


def _random_states() -> dict:
    """Python's, numpy's global and torch's CPU generator states, in types ``torch.load(weights_only=True)`` reads."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
        # the GPUs' generators (dropout on CUDA), once CUDA is in use
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }


def _set_random_states(states: dict) -> None:
    random.setstate(states["python"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if states.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


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
        checkpoint: Callable[[dict], None] | None = None,
        checkpoint_every: int = 0,
        echo: Callable[[str], None] | None = None,
        device: torch.device | None = None,
        distributed: Distributed | None = None,
    ) -> None:
        """``checkpoint`` receives :meth:`state_dict` after every epoch and, when ``checkpoint_every``
        is positive, every that many steps; ``echo`` receives one line per epoch. ``device``: where the
        model, the balancer and the batches go (default: the CPU); ``distributed``: this process's place in
        a data-parallel run (see :mod:`mtrec.train.distributed`), None in a single process."""
        self.device = torch.device("cpu") if device is None else device
        self.distributed = distributed
        self.model = model.to(self.device)
        self.balancer = balancer.to(self.device)
        # what a training step calls: the model, or the model in DistributedDataParallel (wrapped at the
        # first step: see Distributed.wrap)
        self._forward: torch.nn.Module | None = model if distributed is None else None
        balancer.distributed = distributed
        self.config = config
        self.callbacks = list(callbacks)
        self.checkpoint = checkpoint
        self.checkpoint_every = checkpoint_every
        self.echo = echo
        # where the loop is, for checkpoints: the epoch in progress, the batches of it done, the batch-order
        # generator's state when the epoch began (the epoch's shuffle is drawn from it), the running sums
        self._epoch, self._batch = 1, 0
        self._epoch_generator: torch.Tensor | None = None
        self._sums = torch.zeros(model.num_tasks, device=self.device)
        self._stat_sums: dict[str, float] = {}
        self._best: tuple[float, int, dict | None] = (-float("inf"), 0, None)
        self._history: list[dict] = []
        self._stopped = False
        self.optimizer = _adam(model, balancer, lr=config.lr, weight_decay=config.weight_decay)
        self.step = 0
        self.first_losses: torch.Tensor | None = None  # [T], the divergence check's reference
        self.epoch_stats: dict[str, float] = {}
        self.step_stats: dict[str, float] = {}

    def predict(self, table: TensorTable) -> np.ndarray:
        """Scores ``[N, T]`` (probabilities for binary tasks); data parallel: every rank predicts its slice
        of the rows and gets all of them."""
        if self.distributed is not None:
            return self.distributed.gather_rows(
                len(table), lambda a, b: self._predict_rows(table, a, b), self.model.num_tasks
            )
        if self.device.type == "cpu" and not self.config.bf16:
            return self.model.predict_table(table, self.config.eval_batch_size)
        return self._predict_rows(table, 0, len(table)).cpu().numpy()

    @torch.no_grad()
    def _predict_rows(self, table: TensorTable, start: int, stop: int) -> torch.Tensor:
        """Scores of rows ``start:stop`` on the device (float32)."""
        self.model.eval()
        size = self.config.eval_batch_size
        out = []
        for i in range(start, stop, size):
            batch = move(table.slice(i, min(i + size, stop)), self.device)
            with autocast(self.device, self.config.bf16):
                out.append(self.model.predict(self.model(batch)).float())
        return torch.cat(out) if out else torch.zeros(0, self.model.num_tasks, device=self.device)

    def _batches(self, train: TensorTable, generator: torch.Generator) -> Iterator[tuple[TensorTable, float]]:
        """The epoch's training batches on the device, each with its share of the global batch (data
        parallel: this rank's slice of every global batch; see :mod:`mtrec.train.distributed`)."""
        if self.distributed is not None:
            parts = self.distributed.batches(train, self.config.batch_size, generator)
        else:
            parts = (
                (b, 1.0) for b in iterate_batches(train, self.config.batch_size, shuffle=True, generator=generator)
            )
        for batch, share in parts:
            yield move(batch, self.device), share

    def _steps(self, rows: int) -> int:
        if self.distributed is not None:
            return self.distributed.steps(rows, self.config.batch_size)
        return -(-rows // self.config.batch_size)

    def _forward_losses(self, batch: TensorTable, share: float) -> tuple[Any, torch.Tensor]:
        """The step's forward pass and per-task losses ``[T]`` (data parallel: the global batch's losses,
        with this rank's part of their gradient; a balancer that all-reduces gradients itself runs it
        outside DDP's gradient synchronisation)."""
        if self._forward is None:
            assert self.distributed is not None
            self._forward = self.distributed.wrap(self.model, batch)
        sync = contextlib.nullcontext()
        if self.distributed is not None and self.balancer.reduces_own_gradients:
            sync = self._forward.no_sync()  # type: ignore[operator]
        with sync, autocast(self.device, self.config.bf16):
            output = self._forward(batch)
            losses = self.model.losses(output, batch)  # [T]
        if self.distributed is not None:
            losses = self.distributed.global_losses(losses.float(), share)
        return output, losses

    def _sync_balancer(self) -> None:
        """Data parallel: average the balancer's own gradients (the same on every rank when they depend on
        the losses alone; GradNorm's depend on each rank's gradients)."""
        if self.distributed is not None:
            self.distributed.mean_([p.grad for p in self.balancer.parameters()])

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
            f"{task} {name}"
            for task, values in metrics.items()
            for name, value in values.items()
            if isinstance(value, float) and not np.isfinite(value)
        ]
        if bad:
            raise TrainingDiverged(f"training diverged: metrics not finite ({', '.join(bad[:3])}); {advice}")
        return metrics

    def _train_epoch(self, train: TensorTable, epoch: int, generator: torch.Generator, skip: int = 0) -> torch.Tensor:
        """One epoch; ``skip`` batches of it were done before a checkpoint (their sums are in ``self._sums``)."""
        self.model.train()
        if not skip:
            self._sums = torch.zeros(self.model.num_tasks, device=self.device)
            self._stat_sums = {}
        self._epoch, self._batch = epoch, skip
        self._epoch_generator = generator.get_state()
        total = self._steps(len(train))
        show = self.config.progress
        bar = tqdm(
            total=total,
            initial=skip,
            desc=f"epoch {epoch}",
            # None: tqdm decides (shown on a terminal only); other ranks never show one
            disable=True
            if self.distributed is not None and self.distributed.rank > 0
            else None
            if show is None
            else not show,
            leave=False,
            dynamic_ncols=True,
        )
        for index, (batch, share) in enumerate(self._batches(train, generator)):
            if index < skip:  # done before the checkpoint this run resumed from (the shuffle is the same)
                continue
            output, losses = self._forward_losses(batch, share)
            self._check_losses(losses.detach(), epoch)
            for cb in self.callbacks:
                cb.on_losses(self, self.step, losses, output)
            self.optimizer.zero_grad(set_to_none=True)
            context = StepContext(step=self.step, epoch=epoch, model=self.model, shared=output.shared)
            self.balancer.backward(losses, context, output.aux_loss)
            self._sync_balancer()
            self.optimizer.step()
            detached = losses.detach()
            self._sums += detached
            self.step_stats = self.balancer.stats()  # this step's weights (and cosines), read by callbacks
            for key, value in self.step_stats.items():
                self._stat_sums[key] = self._stat_sums.get(key, 0.0) + float(value)
            self._batch += 1
            self.step += 1
            for cb in self.callbacks:
                cb.on_batch_end(self, self.step, detached)
            bar.update(1)
            if self._batch % 20 == 0:
                bar.set_postfix(
                    {n: f"{v:.4f}" for n, v in zip(self.model.task_names, (self._sums / self._batch).tolist())}
                )
            if (
                self.checkpoint is not None
                and self.checkpoint_every
                and self._batch % self.checkpoint_every == 0
                and self._batch < total
            ):
                self.checkpoint(self.state_dict())
        bar.close()
        batches = max(self._batch, 1)
        self.epoch_stats = {k: v / batches for k, v in self._stat_sums.items()}
        return self._sums / batches

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

    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue bit-identically: the model, the optimiser, the
        balancer (with its random generators), every random state, where the loop is (epoch, batches
        done, the batch-order generator at the epoch's start), the running sums, early stopping (best
        score, epoch and weights), the history, the divergence reference and the thread count."""
        best_score, best_epoch, best_state = self._best
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": self._epoch,
            "batch": self._batch,
            "step": self.step,
            "stopped": self._stopped,
            "epoch_generator": self._epoch_generator,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "balancer": self.balancer.state_dict(),
            "callbacks": {type(cb).__name__: cb.state_dict() for cb in self.callbacks},
            "random": _random_states(),
            "sums": self._sums.clone(),
            "stat_sums": dict(self._stat_sums),
            "best_score": best_score,
            "best_epoch": best_epoch,
            "best_state": best_state,
            "history": copy.deepcopy(self._history),
            "first_losses": self.first_losses,
            "threads": torch.get_num_threads(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (after ``on_fit_start``); :meth:`fit` then continues from there."""
        if state.get("format") != CHECKPOINT_FORMAT:
            raise MtrecError(
                f"checkpoint format {state.get('format')} is not {CHECKPOINT_FORMAT}: "
                "written by another version of mtrec; train again with --overwrite"
            )
        self.model.load_state_dict(state["model"])
        self.balancer.load_state_dict(state["balancer"])
        self.optimizer.load_state_dict(state["optimizer"])
        for cb in self.callbacks:
            if type(cb).__name__ in state["callbacks"]:
                cb.load_state_dict(state["callbacks"][type(cb).__name__])
        self._epoch, self._batch, self.step = int(state["epoch"]), int(state["batch"]), int(state["step"])
        self._stopped = bool(state["stopped"])
        self._epoch_generator = state["epoch_generator"]
        self._sums = state["sums"].clone().to(self.device)
        self._stat_sums = dict(state["stat_sums"])
        self._best = (float(state["best_score"]), int(state["best_epoch"]), state["best_state"])
        self._history = list(state["history"])
        first = state["first_losses"]
        self.first_losses = None if first is None else first.to(self.device)
        _set_random_states(state["random"])

    def _epoch_line(self, record: dict, seconds: float) -> str:
        """``epoch 3/30  train income 0.2012 ...  valid income auc 0.9412 ...  score 0.9399  4.1 s``."""
        losses = "  ".join(f"{k} {v:.4f}" for k, v in record["train_loss"].items())
        valid = []
        for task, values in record["valid"].items():
            name, value = next(
                ((m, values[m]) for m in ("auc", "mse") if isinstance(values.get(m), float)), (None, None)
            )
            if name is not None:
                valid.append(f"{task} {name} {value:.4f}")
        return (
            f"epoch {record['epoch']}/{self.config.epochs}  train loss {losses}  valid {'  '.join(valid)}  "
            f"score {'undefined' if record['score'] is None else format(record['score'], '.4f')}  {seconds:.1f} s"
        )

    def fit(self, train: TensorTable, valid: TensorTable, resume: dict | None = None) -> FitResult:
        """Train until ``epochs`` or ``patience`` epochs without a better validation score; keep the best
        weights. ``resume``: a :meth:`state_dict` to continue from (a checkpoint of an interrupted run)."""
        generator = torch.Generator().manual_seed(self.config.seed)
        for cb in self.callbacks:
            cb.on_fit_start(self)
        first, skip = 1, 0
        self._best, self._history, self._stopped = (-float("inf"), 0, None), [], False
        if resume is not None:
            self.load_state_dict(resume)
            first, skip = self._epoch, self._batch
            assert self._epoch_generator is not None  # every checkpoint records the epoch's generator
            generator.set_state(self._epoch_generator)
        if self.distributed is not None:
            self.distributed.seed_rank(self.config.seed, self.step)
        for epoch in range(first, self.config.epochs + 1):
            if self._stopped:
                break
            started = time.perf_counter()
            train_losses = self._train_epoch(train, epoch, generator, skip)
            skip = 0
            self.balancer.on_epoch_end(epoch, train_losses)
            metrics = self.evaluate(valid)
            score = selection_score(metrics, self.model.layout, self.config.select_by)
            record = {
                "epoch": epoch,
                "train_loss": dict(zip(self.model.task_names, train_losses.tolist())),
                "valid": metrics,
                "score": score if math.isfinite(score) else None,  # undefined (one label class): null in JSON
                "weights": self.balancer.weights(),
                "balancer": self.epoch_stats,  # per-epoch means of the balancer's per-step stats
            }
            self._history.append(record)
            for cb in self.callbacks:
                cb.on_epoch_end(self, epoch, record)
            best_score, best_epoch, _ = self._best
            if score > best_score:
                self._best = (score, epoch, copy.deepcopy(self.model.state_dict()))
            elif epoch - best_epoch >= self.config.patience:
                self._stopped = True
            if self.echo is not None:
                self.echo(self._epoch_line(record, time.perf_counter() - started))
            # the next epoch starts here: its shuffle comes from the generator as it is now
            self._epoch, self._batch = epoch + 1, 0
            self._epoch_generator = generator.get_state()
            self._sums = torch.zeros(self.model.num_tasks, device=self.device)
            self._stat_sums = {}
            if self.checkpoint is not None:
                self.checkpoint(self.state_dict())
        best_score, best_epoch, best_state = self._best
        if best_state is not None:
            self.model.load_state_dict(best_state)
        return FitResult(best_epoch=best_epoch, best_score=best_score, history=self._history)
