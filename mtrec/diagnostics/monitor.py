"""The gradient conflict monitor: do the tasks pull the shared parameters the same way?

Every ``every`` training steps (whatever the balancer, ``fixed`` included) the monitor takes each
task's gradient on the model's shared parameters and records, per pair of tasks, the cosine between their gradients and the ratio of
their norms, and per task its loss and learning velocity (the loss over its value at the first
sample; a task whose velocity stays near 1 is not learning). Per epoch it summarises the samples:
mean cosine, the share of samples in conflict (cosine < 0, Yu et al. 2020), the geometric mean norm
ratio, and writes them to ``history.json`` (``record["monitor"]``) and TensorBoard (``monitor/...``).

Where (``scope``): ``last`` (the default) takes the shared elements of the last shared layer the model
declares, where GradNorm (Chen et al., 2018) measures; ``all`` takes every shared dense element (the
elements the sharing declaration says several tasks reach; embedding tables left out unless they are
all that is shared, as the gradient balancers do). A model that declares no last shared layer (one
that shares only embeddings) is read on all its shared elements under either scope.

Cost: ``T`` backward passes from the losses down to the scope's layers on a sampled step, none on the
others. On ``mmoe`` / Census a sample costs about a third of a training step at ``last`` and about
one step at ``all``, where the passes run through the widest expert layers (BENCHMARKS.md). At
``all``, a gradient balancer at ``level=params`` (default ``embeddings=sum``) already built the same
gradients: the monitor then reads its Gram matrix instead, at no cost. At ``last`` it always takes
its own, so figures of runs with different balancers stay comparable.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mtrec.balancing.gradient import cosines, dense_shared_slices
from mtrec.models.reach import SharedSlice
from mtrec.train.trainer import Callback, TrainConfig

if TYPE_CHECKING:  # pragma: no cover
    from mtrec.models.base import MultiTaskModel
    from mtrec.train.trainer import Trainer

DEFAULT_EVERY: int = TrainConfig.model_fields["monitor_every"].default  # one source: the training config
DEFAULT_SCOPE: str = TrainConfig.model_fields["monitor_scope"].default


def pair_names(tasks: list[str]) -> list[tuple[int, int, str]]:
    return [(a, b, f"{tasks[a]}~{tasks[b]}") for a in range(len(tasks)) for b in range(a + 1, len(tasks))]


def monitored_slices(model: MultiTaskModel, scope: str = DEFAULT_SCOPE) -> list[SharedSlice]:
    """The shared elements the monitor reads at ``scope`` (see the module docstring)."""
    if scope not in ("last", "all"):
        raise ValueError(f"monitor scope {scope!r}: last or all")
    slices = model.last_shared_slices() if scope == "last" else []
    return [s for s in (slices or dense_shared_slices(model)) if s.param.requires_grad]


def gram_of_task_gradients(
    model: MultiTaskModel, losses: torch.Tensor, scope: str = DEFAULT_SCOPE
) -> np.ndarray | None:
    """``M = G G^T`` ``[T, T]`` of the tasks' gradients on the elements of ``scope`` (None: nothing shared)."""
    slices = monitored_slices(model, scope)
    if not slices:
        return None
    params = [s.param for s in slices]
    rows = []
    for t in range(losses.shape[0]):
        grads = torch.autograd.grad(losses[t], params, retain_graph=True, allow_unused=True)
        parts = [
            s.take(g) if g is not None else torch.zeros(s.numel(), dtype=s.param.dtype, device=s.param.device)
            for g, s in zip(grads, slices)
        ]
        rows.append(torch.cat(parts))
    G = torch.stack(rows)  # [T, P]
    return (G @ G.T).double().cpu().numpy()


class ConflictMonitor(Callback):
    """Samples task-gradient geometry every ``every`` steps; see the module docstring."""

    def __init__(self, every: int = DEFAULT_EVERY, scope: str = DEFAULT_SCOPE, writer: Any = None) -> None:
        if every < 1:
            raise ValueError("the monitor samples every k >= 1 steps")
        if scope not in ("last", "all"):
            raise ValueError(f"monitor scope {scope!r}: last or all")
        self.every = every
        self.scope = scope
        self.writer = writer  # a tensorboardX SummaryWriter, or None
        self.samples: list[dict] = []
        self.initial: np.ndarray | None = None
        self._pending: dict | None = None

    def on_fit_start(self, trainer: Trainer) -> None:
        self.samples, self.initial, self._pending = [], None, None

    def on_losses(self, trainer: Trainer, step: int, losses: torch.Tensor, output: Any) -> None:
        if step % self.every:
            return
        loss = losses.detach().double().cpu().numpy()
        self._pending = {"step": step, "loss": loss}
        reuse = self.scope == "all" and trainer.balancer.builds_shared_gram
        if not reuse:  # a balancer's own Gram is on all shared dense elements: the same figures at ``all`` only
            self._pending["gram"] = gram_of_task_gradients(trainer.model, losses, self.scope)

    def on_batch_end(self, trainer: Trainer, step: int, losses: torch.Tensor) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        M = pending.get("gram") if "gram" in pending else trainer.balancer.shared_gram()
        if M is None:
            return
        loss = pending["loss"]
        if self.initial is None:
            self.initial = np.where(loss > 0, loss, np.nan)
        norms = np.sqrt(np.clip(np.diag(M), 0.0, None))
        cos = cosines(M)
        sample = {"step": pending["step"], "loss": loss, "velocity": loss / self.initial, "norm": norms, "cos": cos}
        self.samples.append(sample)
        if self.writer is not None:
            tasks = trainer.model.task_names
            for t, name in enumerate(tasks):
                self.writer.add_scalar(f"monitor/velocity/{name}", float(sample["velocity"][t]), pending["step"])
                self.writer.add_scalar(f"monitor/grad_norm/{name}", float(norms[t]), pending["step"])
            for a, b, name in pair_names(tasks):
                self.writer.add_scalar(f"monitor/cos/{name.replace('~', '_vs_')}", float(cos[a, b]), pending["step"])

    def on_epoch_end(self, trainer: Trainer, epoch: int, record: dict) -> None:
        record["monitor"] = self.summary(trainer.model.task_names)
        self.samples = []

    def state_dict(self) -> dict:
        """This epoch's samples so far and the first losses (arrays as tensors), for checkpoints."""

        def tensors(sample: dict) -> dict:
            return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in sample.items()}

        return {
            "samples": [tensors(s) for s in self.samples],
            "initial": None if self.initial is None else torch.from_numpy(self.initial),
        }

    def load_state_dict(self, state: dict) -> None:
        self.samples = [
            {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in s.items()} for s in state["samples"]
        ]
        self.initial = None if state["initial"] is None else state["initial"].numpy()

    def summary(self, tasks: list[str]) -> dict:
        """Per-epoch figures of the samples taken since the last summary."""
        if not self.samples:
            return {"samples": 0}
        cos = np.stack([s["cos"] for s in self.samples])  # [S, T, T]
        norm = np.stack([s["norm"] for s in self.samples])  # [S, T]
        out: dict = {"samples": len(self.samples), "every": self.every, "scope": self.scope, "pairs": {}, "tasks": {}}
        for a, b, name in pair_names(tasks):
            live = (norm[:, a] > 0) & (norm[:, b] > 0)
            ratio = norm[live, a] / norm[live, b]
            out["pairs"][name] = {
                "cos_mean": _mean(cos[live, a, b]),
                "conflict_share": _mean((cos[live, a, b] < 0).astype(float)),
                "norm_ratio": float(np.exp(np.mean(np.log(ratio)))) if len(ratio) else None,  # geometric mean
            }
        for t, name in enumerate(tasks):
            out["tasks"][name] = {
                "loss": _mean(np.array([s["loss"][t] for s in self.samples])),
                "velocity": _finite(self.samples[-1]["velocity"][t]),
                "grad_norm": _mean(norm[:, t]),
            }
        return out


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(float(x)) else None


def _mean(values: np.ndarray) -> float | None:
    return float(np.mean(values)) if len(values) else None
