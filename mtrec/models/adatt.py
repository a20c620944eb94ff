"""AdaTT: Adaptive Task-to-Task Fusion Network (Li et al., KDD 2023).

Every level has, for each task, its own group of experts, plus an optional group
of shared experts. A *fusion unit* per task combines the level's experts in two
ways and adds them:

    f_t = sum_e g_{t,e} E_e  +  sum_k v_{t,k} E_{t,k}

- the gate ``g_t = softmax(W_t f_t^{prev})`` runs over **all** experts of the level,
  every task's and the shared ones, which is what lets a task draw on any other
  task adaptively (CGC/PLE only open a task's gate to its own and the shared experts);
- the residual is a learned linear combination ``v_t`` of the task's own ("native")
  experts, so task-specific knowledge reaches the next level whatever the gate does;
  with a single native expert it is that expert's output (no weight to learn).

A task's experts at level ``l`` read the task's fused output of level ``l - 1``; the
shared experts read the output of the shared fusion unit, built the same way (a gate
over all experts plus the residual of the shared experts) and present on every level
but the last (nothing reads it there). Level 0 reads the embedding. With
``shared_experts = 0`` this is the paper's AdaTT-sp.

All experts of a level are one ``BatchedMLP``, all gates one ``BatchedLinear``; the
fusion is one ``einsum`` and the residual another. Gate weights are ``[B, E]``
per fusion unit and sum to 1 over all the level's experts.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field
from torch import Tensor, nn

from mtrec.data.tables import FeatureLayout, TensorTable
from mtrec.errors import MtrecError
from mtrec.models.base import MODELS, ModelConfig, ModelOutput, MultiTaskModel
from mtrec.models.reach import Sharing
from mtrec.nn.batched import BatchedLinear, BatchedMLP, Towers
from mtrec.nn.embedding import FeatureEmbedding
from mtrec.nn.mixture import mix_experts
from mtrec.nn.typed import TypedModuleList


class FusionLevel(nn.Module):
    """One AdaTT level: ``forward(x)`` with ``x`` ``[B, in]`` or ``[G_in, B, in]`` returns fused ``[G, B, H]`` and gates ``[G, B, E]``.

    Group order: tasks ``0..T-1`` then the shared group. Fusion units (outputs): the ``T``
    task units, then the shared unit when ``shared_unit``.
    """

    # buffers (register_buffer), declared for the type checker
    expert_group: Tensor
    unit_group: Tensor

    def __init__(
        self,
        num_tasks: int,
        in_dim: int,
        hidden: list[int],
        specific: int,
        shared: int,
        shared_unit: bool,
        dropout: float,
    ) -> None:
        super().__init__()
        self.num_tasks, self.specific = num_tasks, specific
        groups = [t for t in range(num_tasks) for _ in range(specific)] + [num_tasks] * shared  # expert -> group
        units = list(range(num_tasks)) + ([num_tasks] if shared_unit else [])  # fusion unit -> group it reads
        self.num_experts, self.num_units = len(groups), len(units)
        self.register_buffer("expert_group", torch.tensor(groups), persistent=False)
        self.register_buffer("unit_group", torch.tensor(units), persistent=False)
        self.experts = BatchedMLP(self.num_experts, in_dim, hidden, dropout)
        self.gates = BatchedLinear(self.num_units, in_dim, self.num_experts)
        # residual weights over each unit's native experts, starting as their mean; a single
        # native expert is added as is
        self.native = nn.Parameter(torch.full((num_tasks, specific), 1.0 / specific)) if specific > 1 else None
        self.shared_residual = shared_unit and shared > 0
        self.native_shared = (
            nn.Parameter(torch.full((shared,), 1.0 / shared)) if self.shared_residual and shared > 1 else None
        )
        self.out_dim = self.experts.out_dim

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.dim() == 2:
            expert_in, gate_in = x, x  # [B, in], level 0
        else:
            expert_in = x.index_select(0, self.expert_group)  # [E, B, in]
            gate_in = x.index_select(0, self.unit_group)  # [G, B, in]
        h = self.experts(expert_in)  # [E, B, H]
        weights = torch.softmax(self.gates(gate_in), dim=-1)  # [G, B, E], over every expert
        fused = mix_experts(weights, h)  # [G, B, H]
        t, m = self.num_tasks, self.specific
        parts = [fused[:t]]
        if m > 0:
            own = h[: t * m].view(t, m, *h.shape[1:])  # [T, m, B, H]
            residual = own.squeeze(1) if self.native is None else torch.einsum("tk,tkbh->tbh", self.native, own)
            parts[0] = parts[0] + residual  # [T, B, H]
        if self.shared_residual:
            own = h[t * m :]  # [S, B, H], the shared experts
            residual = own[0] if self.native_shared is None else torch.einsum("k,kbh->bh", self.native_shared, own)
            parts.append(fused[t:] + residual)  # [1, B, H]
        return torch.cat(parts), weights


class AdaTTConfig(ModelConfig):
    specific_experts: int = Field(2, ge=0)  # per task and level; 0 leaves only the gate (no residual)
    shared_experts: int = Field(1, ge=0)  # per level; 0 gives AdaTT-sp
    expert_hidden: list[int] = Field(default_factory=lambda: [128, 64])  # each expert, as ple's
    num_levels: int = Field(2, ge=1)


@MODELS.register(
    "adatt",
    "adaptive task-to-task fusion: per-task and shared experts, gates over all experts plus a native residual (Li et al. 2023)",
)
class AdaTT(MultiTaskModel):
    """``num_levels`` fusion levels; the towers read the task units of the last level."""

    Config: ClassVar[type[ModelConfig]] = AdaTTConfig
    config: AdaTTConfig

    def __init__(self, layout: FeatureLayout, config: AdaTTConfig) -> None:
        super().__init__(layout, config)
        if config.specific_experts == 0 and config.shared_experts == 0:
            raise MtrecError("adatt needs experts: give specific_experts or shared_experts above 0")
        self.embedding = FeatureEmbedding(layout)
        in_dim = self.embedding.output_dim
        self.levels = TypedModuleList[FusionLevel]()
        for level in range(config.num_levels):
            inner = level < config.num_levels - 1
            layer = FusionLevel(
                self.num_tasks,
                in_dim,
                config.expert_hidden,
                config.specific_experts,
                config.shared_experts,
                shared_unit=inner and config.shared_experts > 0,
                dropout=config.dropout,
            )
            self.levels.append(layer)
            in_dim = layer.out_dim
        self.towers = Towers(self.num_tasks, in_dim, config.tower_hidden, config.dropout)

    def declare_sharing(self, s: Sharing) -> None:
        """From the top down: a fusion unit (its gate and residual weights) reaches what its output feeds
        one level up (tower ``t`` at the top); every expert is mixed by every unit's gate, so it reaches
        what all the units reach; a group's input reaches what its experts and its unit reach."""
        t = self.num_tasks
        above: list[set[int]] = [{i} for i in range(t)] + [set()]  # per group: what its input reaches
        for layer in reversed(self.levels):
            unit_reach = [above[g] for g in layer.unit_group.tolist()]
            every = set().union(*unit_reach)
            s.reach(layer.experts, every).stacked(layer.gates, unit_reach)
            if layer.native is not None:  # [T, m]: row t is unit t's residual over its own experts
                s.elements(layer.native, torch.arange(t).view(t, 1), unit_reach[:t])
            if layer.native_shared is not None:
                s.reach(layer.native_shared, unit_reach[t])
            groups, units = layer.expert_group.tolist(), layer.unit_group.tolist()
            above = [
                (every if g in groups else set()) | (unit_reach[units.index(g)] if g in units else set())
                for g in range(t + 1)
            ]
        s.reach(self.embedding).per_task(self.towers).last_layer(self.levels[-1].experts.last_layer)

    def forward(self, batch: TensorTable, return_gates: bool = False) -> ModelOutput:
        h = self.embedding(batch).squeeze(1)  # [B, D]
        gates: dict[str, Tensor] = {}
        for level, layer in enumerate(self.levels):
            h, weights = layer(h)  # [T(+1), B, H], [G, B, E]
            if return_gates:
                names = self.task_names + (["shared"] if layer.num_units > self.num_tasks else [])
                prefix = f"level{level}/" if len(self.levels) > 1 else ""
                gates.update({prefix + name: weights[g] for g, name in enumerate(names)})
        return ModelOutput(logits=self.towers(h), gates=gates, shared=h)
