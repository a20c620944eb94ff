"""The model interface every architecture implements.

A model is built from ``(layout, config)``. ``forward(batch)`` returns a
:class:`ModelOutput` holding per-task **logits** ``[B, T]`` (never
probabilities across module boundaries) and auxiliary tensors (gate weights,
the last shared representation, an extra regulariser). ``losses`` turns an
output into one loss per task; the trainer only ever combines those, so it
never needs to know which model it holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from mtrec.data.tables import FeatureLayout, TensorTable, iterate_batches
from mtrec.models.reach import SharedSlice, Sharing
from mtrec.registry import Registry


class ModelConfig(BaseModel):
    """Options common to all models; each model's ``Config`` adds its own."""

    model_config = ConfigDict(extra="forbid")

    tower_hidden: list[int] = Field(default_factory=lambda: [64])  # per-task tower before the output unit
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # Census overfits little at these sizes; early stopping suffices


@dataclass
class ModelOutput:
    logits: Tensor  # [B, T], in layout task order
    gates: dict[str, Tensor] = field(default_factory=dict)  # name -> [B, E] gate weights
    shared: Tensor | None = None  # last representation shared by several tasks
    aux_loss: Tensor | None = None  # model regulariser added once to the combined loss
    # funnel models: [B, T] logits of each task's entire-space probability, the task together with
    # every ancestor in its space chain (pCTCVR for a CVR task), while `logits` stay in-space (pCVR)
    joint_logits: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)  # model-specific tensors its own losses() reads


MODELS: Registry[type[MultiTaskModel]] = Registry("model")


class MultiTaskModel(nn.Module):
    """Base class: task-type handling, default masked losses, predictions."""

    Config: ClassVar[type[ModelConfig]] = ModelConfig  # each model's options; ``config`` is one of them
    config: ModelConfig
    registered_name: ClassVar[str]  # set by MODELS.register

    @classmethod
    def model_name(cls) -> str:
        """The name the model is registered under (its class name for a model built outside the registry),
        as messages name it."""
        return getattr(cls, "registered_name", cls.__name__)

    # buffers (register_buffer), declared for the type checker
    is_binary: Tensor
    space_index: Tensor
    label_mean: Tensor
    label_std: Tensor

    def __init__(self, layout: FeatureLayout, config: ModelConfig) -> None:
        super().__init__()
        self.layout = layout
        self.config = config
        self.task_names = layout.task_names
        self.num_tasks = layout.num_tasks
        self.register_buffer("is_binary", torch.tensor([t.type == "binary" for t in layout.tasks]), persistent=False)
        # space[t] = index of the task whose positives define task t's sample space, or -1
        self.register_buffer(
            "space_index",
            torch.tensor([layout.task_index(t.space) if t.space else -1 for t in layout.tasks]),
            persistent=False,
        )
        # train mean/std of each regression label (0 and 1 for binary tasks and unstandardised labels):
        # losses see (label - mean) / std, predictions are logit * std + mean; the layout carries them,
        # so they are not part of the weights
        self.register_buffer("label_mean", torch.tensor([float(t.label_mean) for t in layout.tasks]), persistent=False)
        self.register_buffer("label_std", torch.tensor([float(t.label_std) for t in layout.tasks]), persistent=False)

    # ---- to implement -----------------------------------------------------------------
    def forward(self, batch: TensorTable, return_gates: bool = False) -> ModelOutput:  # pragma: no cover
        raise NotImplementedError

    # ---- defaults ---------------------------------------------------------------------
    def sample_mask(self, batch: TensorTable) -> Tensor:
        """``[B, T]``: 1 where a sample is inside the task's space (its label is observed)."""
        labels = batch.labels
        mask = torch.ones_like(labels)
        if bool((self.space_index >= 0).any()):
            spaced = self.space_index >= 0
            parent = labels.index_select(1, self.space_index.clamp_min(0))  # [B, T]
            mask = torch.where(spaced, (parent > 0.5).to(labels.dtype), mask)
        return mask

    def standardized_labels(self, labels: Tensor) -> Tensor:
        """``[B, T]``: regression labels on the scale the model is trained on, ``(label - mean) / std``
        (binary labels unchanged). Every loss on a regression output compares it with these."""
        return torch.where(self.is_binary, labels, (labels - self.label_mean) / self.label_std)

    def elementwise_losses(self, logits: Tensor, labels: Tensor) -> Tensor:
        """``[B, T]``: BCE-with-logits for binary tasks, squared error against the standardised label
        for regression (``labels`` in the tasks' units)."""
        bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        if bool(self.is_binary.all()):
            return bce
        return torch.where(self.is_binary, bce, (logits - self.standardized_labels(labels)) ** 2)

    def losses(self, output: ModelOutput, batch: TensorTable) -> Tensor:
        """Per-task loss ``[T]``: mean over the samples in each task's space, sample-weighted."""
        per = self.elementwise_losses(output.logits, batch.labels)  # [B, T]
        mask = self.sample_mask(batch)
        if batch.weight is not None:
            mask = mask * batch.weight  # [B, T]
        return (per * mask).sum(0) / mask.sum(0).clamp_min(1e-12)

    def predict(self, output: ModelOutput) -> Tensor:
        """Scores ``[B, T]``: probabilities for binary tasks, values in the label's units for regression."""
        logits = output.logits
        return torch.where(self.is_binary, torch.sigmoid(logits), logits * self.label_std + self.label_mean)

    @torch.no_grad()
    def predict_table(self, table: TensorTable, batch_size: int = 16384) -> np.ndarray:
        """Scores ``[N, T]`` of a whole table (:meth:`predict`, in eval mode, ``batch_size`` rows at a time:
        no backward pass, so big batches are cheap)."""
        self.eval()
        out = [self.predict(self(batch)) for batch in iterate_batches(table, batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, self.num_tasks), np.float32)

    def declare_sharing(self, sharing: Sharing) -> None:  # pragma: no cover
        """Say which tasks' losses reach every parameter (see :mod:`mtrec.models.reach`); every model writes its own."""
        raise NotImplementedError

    @property
    def sharing(self) -> Sharing:
        """The model's sharing declaration, built once (parameters keep their identity for a model's life)."""
        cached = self.__dict__.get("_sharing")
        if cached is None:
            cached = Sharing(self, self.num_tasks)
            self.declare_sharing(cached)
            cached.check_complete()
            self.__dict__["_sharing"] = cached
        return cached

    def shared_slices(self) -> list[SharedSlice]:
        """The parameter elements several tasks' losses reach (gradient-level balancing acts on these)."""
        return self.sharing.shared_slices()

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters holding at least one element that several tasks' losses reach."""
        return [s.param for s in self.shared_slices()]

    def last_shared_slices(self) -> list[SharedSlice]:
        """The shared elements of the last shared layer the model declares, where GradNorm (Chen et al.,
        2018) measures task gradient norms; empty when only embedding tables are shared."""
        return self.sharing.last_shared_slices()

    def task_specific_parameters(self) -> list[nn.Parameter]:
        """Parameters no element of which is reached by more than one task."""
        shared = {id(p) for p in self.shared_parameters()}
        return [p for p in self.parameters() if id(p) not in shared]


def validate_model_options(name: str, options: dict | None = None) -> ModelConfig:
    """``options`` (``--model-args``) as the model's ``Config``; any problem is one error naming the
    model and the option and listing the options the model takes."""
    from mtrec.options import validate_options

    return validate_options(MODELS.get(name).Config, options, f"model '{name}'")


def build_model(name: str, layout: FeatureLayout, options: dict | None = None) -> MultiTaskModel:
    """Instantiate a registered model; ``options`` are validated against its ``Config``."""
    return MODELS.get(name)(layout, validate_model_options(name, options))
