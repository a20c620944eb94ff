"""Mixture-of-experts models: OMoE and MMoE (Ma et al., KDD 2018).

The experts take a pluggable ``bottom`` (see :mod:`mtrec.nn.bottoms`): ``dcn_v2``
gives every expert its own cross network (stacked weights, still one batched
pass), ``din`` rewrites the embedded input every expert reads, ``deepfm`` adds the
FM term of the input beside the mixed expert output.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from mtrec.data.tables import FeatureLayout, TensorTable
from mtrec.models.base import MODELS, ModelConfig, ModelOutput, MultiTaskModel
from mtrec.models.reach import Sharing
from mtrec.nn.batched import Towers
from mtrec.nn.bottoms import BottomInput, BottomOptions, expert_stacks, output_layer, with_extra
from mtrec.nn.embedding import Embedded, FeatureEmbedding
from mtrec.nn.mixture import MixtureLayer


class MoEConfig(ModelConfig, BottomOptions):
    num_experts: int = Field(8, ge=1)
    expert_hidden: list[int] = Field(default_factory=lambda: [128, 64])


class _MoE(MultiTaskModel):
    Config: ClassVar[type[ModelConfig]] = MoEConfig
    config: MoEConfig
    one_gate = False

    def __init__(self, layout: FeatureLayout, config: MoEConfig) -> None:
        super().__init__(layout, config)
        self.embedding = FeatureEmbedding(layout)
        self.bottom_input = BottomInput(config, layout)
        self.mixture = MixtureLayer(
            self.embedding.output_dim,
            config.expert_hidden,
            specific=[0] * self.num_tasks,
            shared=config.num_experts,
            task_gates=not self.one_gate,
            shared_gate=self.one_gate,
            dropout=config.dropout,
            experts=expert_stacks(config, config.expert_hidden, config.dropout),
        )
        in_dim = self.mixture.out_dim + self.bottom_input.extra_dim
        self.towers = Towers(self.num_tasks, in_dim, config.tower_hidden, config.dropout)

    def declare_sharing(self, s: Sharing) -> None:
        s.reach(self.embedding).reach(self.bottom_input).reach(self.mixture.experts)
        if self.one_gate:
            s.reach(self.mixture.gates)  # one gate mixes for every tower
        else:
            s.per_task(self.mixture.gates)  # gate t feeds tower t only
        s.per_task(self.towers).last_layer(output_layer(self.mixture.experts))

    def forward(self, batch: TensorTable, return_gates: bool = False) -> ModelOutput:
        if self.bottom_input.identity:
            # the experts read the embedded batch itself: their first layer may fold into the tables, and
            # then looks up only what it reads (on Census nothing: every field folds, the rest is dense)
            mixed, weights, experts = self.mixture.mix(None, Embedded(self.embedding, batch))  # [G, B, H], ...
        else:
            emb = self.embedding(batch)  # [B, 1, D]
            x, extra = self.bottom_input(emb, batch, self.embedding)  # [B, 1, D], [B, 1, E] | None
            embedded = Embedded(self.embedding, batch) if x is emb else None  # deepfm: the first layer may fold
            mixed, weights, experts = self.mixture.mix(x.squeeze(1), embedded)  # [G, B, H], [G, B, E], [E, B, H]
            mixed = with_extra(mixed, None if extra is None else extra.squeeze(1))  # [G, B, H (+E)]
        logits = self.towers(mixed[0] if self.one_gate else mixed)  # [B, T]
        gates = {}
        if return_gates:
            names = ["all"] if self.one_gate else self.task_names
            gates = {name: weights[g] for g, name in enumerate(names)}
        # what every task reads: OMoE's one mixture; MMoE's expert outputs (its mixtures are one per task)
        return ModelOutput(logits=logits, gates=gates, shared=mixed if self.one_gate else experts)


@MODELS.register("mmoe", "multi-gate mixture of experts: shared experts, one softmax gate per task")
class MMoE(_MoE):
    """MMoE: every task mixes the shared experts with its own gate."""


@MODELS.register("omoe", "one-gate mixture of experts: shared experts, one gate for all tasks")
class OMoE(_MoE):
    """OMoE: a single gate mixes the experts; every tower reads the same mixture."""

    one_gate = True
