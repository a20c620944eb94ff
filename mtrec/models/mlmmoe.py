"""Multi-level MMoE: MMoE levels stacked (the ML-MMoE baseline of Tang et al., RecSys 2020, Fig. 1).

MMoE (Ma et al., KDD 2018) gives every consumer of the experts (a task tower) its
own softmax gate over them. Stacking applies the same rule one level down: the
consumers of level ``l``'s experts are level ``l + 1``'s experts, so every upper
expert reads its own gated mixture of the lower experts, and the towers read
gated mixtures of the top level. All experts are shared; nothing is task-specific
below the top gates (which is what PLE changes).

Gates are functions of the input features at every level, as in MMoE: level 0's
experts and gates read the embedding ``x``; an upper level's experts read their
own mixtures ``[E, B, H]`` (one batched product) while its gates read ``x``.
Each level is a :class:`MixtureLayer` (experts as one ``BatchedMLP``, gates as
one ``BatchedLinear``); with one level the model is exactly ``mmoe``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field
from torch import Tensor

from mtrec.data.tables import FeatureLayout, TensorTable
from mtrec.models.base import MODELS, ModelConfig, ModelOutput, MultiTaskModel
from mtrec.models.reach import Sharing
from mtrec.nn.batched import BatchedLinear, Towers
from mtrec.nn.bottoms import output_layer
from mtrec.nn.embedding import FeatureEmbedding
from mtrec.nn.mixture import MixtureLayer, mix_experts
from mtrec.nn.typed import TypedModuleList


class MLMMoEConfig(ModelConfig):
    num_experts: int = Field(8, ge=1)  # per level, as mmoe's default
    expert_hidden: list[int] = Field(default_factory=lambda: [128, 64])  # every level's experts, as mmoe's
    num_levels: int = Field(2, ge=1)  # 1 is mmoe


class GatedLevel(MixtureLayer):
    """A mixture level whose experts and gates read different inputs (upper ML-MMoE levels).

    ``route(expert_in, gate_in)``: ``expert_in`` ``[E, B, in]`` (one input per expert) or ``[B, in]``;
    ``gate_in`` ``[B, gate_dim]``. Returns mixed ``[C, B, H]`` and weights ``[C, B, E]``, one gate per consumer, and the
    expert outputs ``[E, B, H]``.
    """

    def __init__(
        self, in_dim: int, gate_dim: int, expert_hidden: list[int], experts: int, consumers: int, dropout: float
    ) -> None:
        super().__init__(
            in_dim, expert_hidden, specific=[0] * consumers, shared=experts, task_gates=True, dropout=dropout
        )
        if gate_dim != in_dim:
            self.gates = BatchedLinear(consumers, gate_dim, experts)

    def route(self, expert_in: Tensor, gate_in: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h = self.experts(expert_in)  # [E, B, H]
        weights = torch.softmax(self.gates(gate_in), dim=-1)  # [C, B, E]; every gate sees every expert
        return mix_experts(weights, h), weights, h  # [C, B, H]


@MODELS.register("ml_mmoe", "multi-level MMoE: stacked MMoE levels, each upper expert gating the experts below")
class MLMMoE(MultiTaskModel):
    """``num_levels`` MMoE levels: level ``l`` has ``num_experts`` experts and one gate per consumer above it."""

    Config: ClassVar[type[ModelConfig]] = MLMMoEConfig
    config: MLMMoEConfig

    def __init__(self, layout: FeatureLayout, config: MLMMoEConfig) -> None:
        super().__init__(layout, config)
        self.embedding = FeatureEmbedding(layout)
        d = self.embedding.output_dim
        self.levels = TypedModuleList[GatedLevel]()
        in_dim = d
        for level in range(config.num_levels):
            top = level == config.num_levels - 1
            consumers = self.num_tasks if top else config.num_experts
            layer = GatedLevel(in_dim, d, config.expert_hidden, config.num_experts, consumers, config.dropout)
            self.levels.append(layer)
            in_dim = layer.out_dim
        self.towers = Towers(self.num_tasks, in_dim, config.tower_hidden, config.dropout)

    def declare_sharing(self, s: Sharing) -> None:
        """Every expert is shared; the gates of a lower level feed the (shared) experts above, the top gates
        one tower each."""
        s.reach(self.embedding)
        for level, layer in enumerate(self.levels):
            s.reach(layer.experts)
            if level == len(self.levels) - 1:
                s.per_task(layer.gates)
            else:
                s.reach(layer.gates)
        s.per_task(self.towers).last_layer(output_layer(self.levels[-1].experts))

    def forward(self, batch: TensorTable, return_gates: bool = False) -> ModelOutput:
        x = self.embedding(batch).squeeze(1)  # [B, D]
        h = x
        gates: dict[str, Tensor] = {}
        many = len(self.levels) > 1
        for level, layer in enumerate(self.levels):
            h, weights, experts = layer.route(h, x)  # [C, B, H]: per upper expert, then per task at the top
            if return_gates:
                top = level == len(self.levels) - 1
                names = self.task_names if top else [f"expert{c}" for c in range(weights.shape[0])]
                prefix = f"level{level}/" if many else ""
                gates.update({prefix + name: weights[c] for c, name in enumerate(names)})
        return ModelOutput(logits=self.towers(h), gates=gates, shared=experts)  # the top experts every task mixes
