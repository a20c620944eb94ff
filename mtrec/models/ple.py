"""Customized Gate Control and Progressive Layered Extraction (Tang et al., RecSys 2020).

The experts of the first extraction level (the ones reading the features) take a
pluggable ``bottom`` (see :mod:`mtrec.nn.bottoms`); upper levels read expert
outputs, not features, and stay MLPs.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from mtrec.data.tables import FeatureLayout, TensorTable
from mtrec.errors import MtrecError
from mtrec.models.base import MODELS, ModelConfig, ModelOutput, MultiTaskModel
from mtrec.models.reach import Sharing
from mtrec.nn.batched import Towers
from mtrec.nn.bottoms import BottomInput, BottomOptions, expert_stacks, output_layer, with_extra
from mtrec.nn.embedding import Embedded, FeatureEmbedding
from mtrec.nn.mixture import MixtureLayer
from mtrec.nn.typed import TypedModuleList


class PLEConfig(ModelConfig, BottomOptions):
    specific_experts: int | list[int] = 2  # per task; a list gives each task its own count
    shared_experts: int = Field(2, ge=0)
    expert_hidden: list[int] = Field(default_factory=lambda: [128, 64])
    num_levels: int = Field(2, ge=1)


class _PLE(MultiTaskModel):
    Config: ClassVar[type[ModelConfig]] = PLEConfig
    config: PLEConfig
    fixed_levels: int | None = None

    def __init__(self, layout: FeatureLayout, config: PLEConfig) -> None:
        super().__init__(layout, config)
        specific = config.specific_experts
        if isinstance(specific, int):
            specific = [specific] * self.num_tasks
        if len(specific) != self.num_tasks:
            raise MtrecError(f"specific_experts lists {len(specific)} counts for {self.num_tasks} tasks")
        num_levels = self.fixed_levels or config.num_levels
        self.embedding = FeatureEmbedding(layout)
        self.bottom_input = BottomInput(config, layout)
        in_dim = self.embedding.output_dim
        self.levels = TypedModuleList[MixtureLayer]()
        bottom_experts = expert_stacks(config, config.expert_hidden, config.dropout)
        for level in range(num_levels):
            inner = level < num_levels - 1  # inner levels also mix a shared representation onward
            # the bottom builds the first level's experts (they read the embedded input); the levels above
            # mix expert outputs, and their experts are MLPs
            layer = MixtureLayer(
                in_dim,
                config.expert_hidden,
                specific,
                config.shared_experts,
                True,
                inner,
                config.dropout,
                experts=bottom_experts if level == 0 else None,
            )
            self.levels.append(layer)
            in_dim = layer.out_dim
        self.towers = Towers(self.num_tasks, in_dim + self.bottom_input.extra_dim, config.tower_hidden, config.dropout)

    def declare_sharing(self, s: Sharing) -> None:
        """From the top down: a gate's mixture reaches what the group it feeds reaches one level up (tower
        ``t`` at the top); an expert reaches what every gate allowed to mix it reaches. So the last level's
        task experts are their task's, while an inner level's task experts are shared: the inner shared
        gate mixes them into the shared experts above, which every task reads."""
        t = self.num_tasks
        above: list[set[int]] = [{i} for i in range(t)] + [set()]  # per group: what its input reaches
        for layer in reversed(self.levels):
            gate_reach = [above[g] for g in layer.gate_group.tolist()]
            allowed = layer.allowed.tolist()  # [G][E]
            expert_reach = [
                set().union(*(gate_reach[g] for g in range(layer.num_gates) if allowed[g][e]))
                for e in range(layer.num_experts)
            ]
            s.stacked(layer.experts, expert_reach).stacked(layer.gates, gate_reach)
            groups, gate_groups = layer.expert_group.tolist(), layer.gate_group.tolist()
            above = [
                set().union(
                    *(expert_reach[e] for e in range(layer.num_experts) if groups[e] == g),
                    *(gate_reach[i] for i in range(layer.num_gates) if gate_groups[i] == g),
                )
                for g in range(t + 1)
            ]
        s.reach(self.embedding).reach(self.bottom_input).per_task(self.towers)
        s.last_layer(output_layer(self.levels[-1].experts))  # its shared experts' members

    def forward(self, batch: TensorTable, return_gates: bool = False) -> ModelOutput:
        emb = self.embedding(batch)  # [B, 1, D]
        x, extra = self.bottom_input(emb, batch, self.embedding)  # [B, 1, D], [B, 1, E] | None
        embedded = Embedded(self.embedding, batch) if x is emb else None  # level 0 may fold into the tables
        h = x.squeeze(1)  # [B, D], read by every group at level 0
        gates = {}
        for level, layer in enumerate(self.levels):
            h, weights, experts = layer.mix(h, embedded if level == 0 else None)  # [T(+1), B, H], [G, B, E], [E, B, H]
            if return_gates:
                names = self.task_names + (["shared"] if layer.num_gates > self.num_tasks else [])
                prefix = f"level{level}/" if len(self.levels) > 1 else ""
                gates.update({prefix + name: weights[g] for g, name in enumerate(names)})
        h = with_extra(h, None if extra is None else extra.squeeze(1))  # [T, B, H (+E)]
        # the last level's expert outputs: the mixtures are one per task, the shared experts feed every one
        return ModelOutput(logits=self.towers(h), gates=gates, shared=experts)


@MODELS.register("cgc", "customized gate control: task-specific plus shared experts, one extraction level")
class CGC(_PLE):
    """CGC: one extraction level (PLE with num_levels = 1)."""

    fixed_levels = 1


@MODELS.register("ple", "progressive layered extraction: stacked CGC levels with shared gates inside")
class PLE(_PLE):
    """PLE: ``num_levels`` extraction levels; inner levels carry a shared-gate representation."""
