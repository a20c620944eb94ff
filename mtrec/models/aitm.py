"""AITM: Adaptive Information Transfer Multi-task framework (Xi et al., "Modeling the
Sequential Dependence among Audience Multi-step Conversions with Multi-task
Learning in Targeted Display Advertising", KDD 2021).

In a conversion funnel (impression -> click -> purchase ...) every step can only
happen after the previous one. AITM lets each step's tower read what the previous
step's tower learned, and penalises predictions that break the order:

- every task ``t`` has a tower ``q_t`` over the shared embedding;
- for a task with a previous step ``t-1`` (its ``space:``), the information
  transferred is ``p_{t-1} = g_{t-1}(z_{t-1})`` (a one-layer transfer network), and the
  AIT module attends over ``u in {p_{t-1}, q_t}``:
  ``w_u = softmax_u(<h2(u), h3(u)> / sqrt(k))``, ``z_t = sum_u w_u h1(u)``, with ``h1, h2,
  h3`` one-layer projections; the first step has ``z_1 = q_1``;
- ``ŷ_t = sigmoid(MLP_t(z_t))`` is the probability of reaching step ``t`` from the
  impression (entire space), trained with cross-entropy against the joint label
  (clicked and purchased) over all impressions;
- the behavioural expectation calibrator adds
  ``alpha * mean_i max(ŷ_t - ŷ_{t-1}, 0)`` for every step with a previous one: a
  purchase must not be likelier than the click it needs. ``calibrator_weight`` is
  alpha; 0 disables it.

To fit the library's in-space convention, a task's logit slot holds its in-space
probability ``ŷ_t / ŷ_{t-1}`` (clipped to 1 where the calibrator has not yet enforced
the order), and ``ModelOutput.joint_logits`` holds ``logit(ŷ_t)``. The attention
weights over ``{p_{t-1}, q_t}`` are exposed as gates named ``<task>/transfer``.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from mtrec.data.tables import FeatureLayout, TensorTable
from mtrec.models.base import MODELS, ModelConfig, ModelOutput, MultiTaskModel
from mtrec.models.funnel import FunnelConfig, FunnelModel, logit_from_log_prob
from mtrec.models.reach import Sharing
from mtrec.nn.batched import BatchedMLP, Towers
from mtrec.nn.embedding import FeatureEmbedding


class AITMConfig(FunnelConfig):
    output_hidden: list[int] = Field(default_factory=lambda: [32])  # MLP_t between z_t and the output unit
    calibrator_weight: float = Field(0.6, ge=0.0)  # alpha; 0 switches the calibrator off


class AIT(nn.Module):
    """Attention over the transferred information and the task's own representation."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.h1, self.h2, self.h3 = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, transferred: Tensor, own: Tensor) -> tuple[Tensor, Tensor]:
        """``transferred``, ``own``: ``[B, k]``; returns ``z`` ``[B, k]`` and weights ``[B, 2]``."""
        u = torch.stack([transferred, own], dim=1)  # [B, 2, k]
        weights = torch.softmax((self.h2(u) * self.h3(u)).sum(-1) * self.scale, dim=1)  # [B, 2]
        return (weights.unsqueeze(-1) * self.h1(u)).sum(1), weights  # [B, k], [B, 2]


@MODELS.register(
    "aitm", "adaptive information transfer between adjacent funnel towers, with the behavioural calibrator"
)
class AITM(FunnelModel):
    """Towers per step, attention-based transfer from the previous step, calibrated losses."""

    Config: ClassVar[type[ModelConfig]] = AITMConfig
    config: AITMConfig

    # buffers (register_buffer), declared for the type checker
    child: Tensor
    parent: Tensor

    def __init__(self, layout: FeatureLayout, config: AITMConfig) -> None:
        super().__init__(layout, config)
        self.embedding = FeatureEmbedding(layout)
        self.encoders = BatchedMLP(self.num_tasks, self.embedding.output_dim, config.tower_hidden, config.dropout)
        k = self.encoders.out_dim
        linked = self.funnel.linked  # steps with a previous step, parents first
        self.transfer = nn.ModuleDict(
            {str(t): nn.Sequential(nn.Linear(k, k), nn.ReLU(), nn.Dropout(config.dropout)) for t in linked}
        )
        self.ait = nn.ModuleDict({str(t): AIT(k) for t in linked})
        self.heads = Towers(self.num_tasks, k, config.output_hidden, config.dropout)
        self.register_buffer("child", torch.tensor(linked, dtype=torch.long), persistent=False)
        self.register_buffer(
            "parent", torch.tensor([self.funnel.parent[t] for t in linked], dtype=torch.long), persistent=False
        )

    def declare_sharing(self, s: Sharing) -> None:
        """Step ``t``'s encoder, transfer and attention make ``z_t``, which step ``t``'s head and (through
        the transfer) every later step read: :meth:`chain_owners`. Head ``t`` is also reached by the
        calibrator of each direct child (``max(ŷ_child - ŷ_t, 0)`` in the child's loss)."""
        owners = self.chain_owners()
        heads = [{t} for t in range(self.num_tasks)]
        if self.config.calibrator_weight > 0:
            for child in self.funnel.linked:
                heads[self.funnel.parent[child]].add(child)
        s.reach(self.embedding).stacked(self.encoders, owners).stacked(self.heads, heads)
        for t in self.funnel.linked:
            s.reach(self.transfer[str(t)], owners[t]).reach(self.ait[str(t)], owners[t])
        s.last_layer(self.encoders.last_layer)

    def forward(self, batch: TensorTable, return_gates: bool = False) -> ModelOutput:
        x = self.embedding(batch).squeeze(1)  # [B, D]
        q = self.encoders(x)  # [T, B, k]
        z = list(q.unbind(0))
        gates = {}
        for t in self.funnel.linked:  # sequential by nature: step t reads step t-1's z
            p = self.transfer[str(t)](z[self.funnel.parent[t]])  # [B, k]
            z[t], w = self.ait[str(t)](p, q[t])
            if return_gates:
                gates[f"{self.task_names[t]}/transfer"] = w
        joint = self.heads(torch.stack(z))  # [B, T]: members logit(ŷ_t), entire space; other tasks their own logit
        log_joint = F.logsigmoid(joint)
        in_space = logit_from_log_prob(
            log_joint[:, self.child] - log_joint[:, self.parent]
        )  # ŷ_t / ŷ_{t-1} <= 1, [B, K]
        logits = joint.index_copy(1, self.child, in_space)  # [B, T]
        return ModelOutput(logits=logits, gates=gates, shared=x, joint_logits=joint)

    def losses(self, output: ModelOutput, batch: TensorTable) -> Tensor:
        joint = output.joint_logits  # [B, T]
        assert joint is not None, "AITM's forward pass always sets joint_logits"
        labels = self.joint_labels(batch.labels)  # clicked and purchased, ...
        losses = self.weighted_mean(F.binary_cross_entropy_with_logits(joint, labels, reduction="none"), batch)  # [T]
        if not bool(self.member.all()):  # tasks outside the funnel: their ordinary in-space loss
            losses = torch.where(self.member, losses, MultiTaskModel.losses(self, output, batch))
        alpha = self.config.calibrator_weight
        if alpha > 0 and self.child.numel():
            prob = torch.sigmoid(joint)
            excess = F.relu(prob[:, self.child] - prob[:, self.parent])  # max(ŷ_t - ŷ_{t-1}, 0), [B, K]
            calibrator = self.weighted_mean(excess, batch)  # [K]
            losses = losses.index_add(0, self.child, alpha * calibrator)
        return losses
