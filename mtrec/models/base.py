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
from typing import Optional

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from mtrec.data.tables import FeatureLayout, TensorTable
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
    shared: Optional[Tensor] = None  # last representation shared by several tasks
    aux_loss: Optional[Tensor] = None  # model regulariser added once to the combined loss
    # funnel models: [B, T] logits of each task's entire-space probability, the task together with
    # every ancestor in its space chain (pCTCVR for a CVR task), while `logits` stay in-space (pCVR)
    joint_logits: Optional[Tensor] = None
    extras: dict[str, Tensor] = field(default_factory=dict)  # model-specific tensors its own losses() reads


MODELS: Registry[type["MultiTaskModel"]] = Registry("model")


class MultiTaskModel(nn.Module):
    """Base class: task-type handling, default masked losses, predictions."""

    Config = ModelConfig
    # names of submodules whose parameters receive gradients from several tasks
    shared_modules: tuple[str, ...] = ("embedding",)

    def __init__(self, layout: FeatureLayout, config: ModelConfig) -> None:
        super().__init__()
        self.layout = layout
        self.config = config
        self.task_names = layout.task_names
        self.num_tasks = layout.num_tasks
        self.register_buffer(
            "is_binary", torch.tensor([t.type == "binary" for t in layout.tasks]), persistent=False
        )
        # space[t] = index of the task whose positives define task t's sample space, or -1
        self.register_buffer(
            "space_index",
            torch.tensor([layout.task_index(t.space) if t.space else -1 for t in layout.tasks]),
            persistent=False,
        )

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

    def elementwise_losses(self, logits: Tensor, labels: Tensor) -> Tensor:
        """``[B, T]``: BCE-with-logits for binary tasks, squared error for regression."""
        bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        if bool(self.is_binary.all()):
            return bce
        return torch.where(self.is_binary, bce, (logits - labels) ** 2)

    def losses(self, output: ModelOutput, batch: TensorTable) -> Tensor:
        """Per-task loss ``[T]``: mean over the samples in each task's space, sample-weighted."""
        per = self.elementwise_losses(output.logits, batch.labels)  # [B, T]
        mask = self.sample_mask(batch)
        if batch.weight is not None:
            mask = mask * batch.weight  # [B, T]
        return (per * mask).sum(0) / mask.sum(0).clamp_min(1e-12)

    def predict(self, output: ModelOutput) -> Tensor:
        """Scores ``[B, T]``: probabilities for binary tasks, values for regression."""
        return torch.where(self.is_binary, torch.sigmoid(output.logits), output.logits)

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters that several tasks' losses reach (gradient-level balancing acts on these)."""
        return [p for name in self.shared_modules for p in getattr(self, name).parameters()]

    def last_shared_parameters(self) -> list[nn.Parameter]:
        """Parameters of the last shared layer, where GradNorm (Chen et al., 2018) measures task gradient norms.

        Default: the last parameter-holding layer of the last shared module; for a stack of
        levels (PLE) the last level; for a mixture layer its experts' output layer (the gates are
        registered after the experts but are not the trunk every task reads). Override when wrong.
        """
        if not self.shared_modules:
            return []
        module = getattr(self, self.shared_modules[-1])
        if isinstance(module, nn.ModuleList):
            module = module[-1]
        module = getattr(module, "experts", module)
        holders = [m for m in module.modules() if next(m.parameters(recurse=False), None) is not None]
        return list(holders[-1].parameters(recurse=False)) if holders else []

    def task_specific_parameters(self) -> list[nn.Parameter]:
        shared = {id(p) for p in self.shared_parameters()}
        return [p for p in self.parameters() if id(p) not in shared]


def build_model(name: str, layout: FeatureLayout, options: Optional[dict] = None) -> MultiTaskModel:
    """Instantiate a registered model; ``options`` are validated against its ``Config``."""
    from mtrec.errors import MtrecError
    from pydantic import ValidationError

    cls = MODELS.get(name)
    try:
        config = cls.Config.model_validate(options or {})
    except ValidationError as err:
        details = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise MtrecError(f"model '{name}' options: {details}") from None
    return cls(layout, config)
