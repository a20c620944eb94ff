"""Independent single-task networks and hard parameter sharing (Caruana, 1997).

Both take a pluggable ``bottom`` (``mlp``, ``dcn_v2``, ``deepfm``, ``din``; see
:mod:`mtrec.nn.bottoms`): the shared bottom of ``shared_bottom`` and each task's
network in ``single_task`` are of that kind.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from mtrec.data.tables import FeatureLayout, TensorTable
from mtrec.models.base import MODELS, ModelConfig, ModelOutput, MultiTaskModel
from mtrec.models.reach import Sharing
from mtrec.nn.batched import Towers
from mtrec.nn.bottoms import BottomInput, BottomOptions, member_networks, output_layer, with_extra
from mtrec.nn.embedding import FeatureEmbedding


class BottomConfig(ModelConfig, BottomOptions):
    bottom_hidden: list[int] = Field(default_factory=lambda: [256, 128])


@MODELS.register("single_task", "one independent network per task (own embeddings too), trained together; the baseline")
class SingleTask(MultiTaskModel):
    """T independent networks in one batched pass; nothing is shared, not even embeddings."""

    Config: ClassVar[type[ModelConfig]] = BottomConfig
    config: BottomConfig

    def __init__(self, layout: FeatureLayout, config: BottomConfig) -> None:
        super().__init__(layout, config)
        self.embedding = FeatureEmbedding(layout, copies=self.num_tasks)
        self.bottom_input = BottomInput(config, layout, copies=self.num_tasks)  # per-task FM / attention
        self.nets = member_networks(
            config, self.num_tasks, self.embedding.output_dim, config.bottom_hidden, config.dropout
        )
        in_dim = self.nets.out_dim + self.bottom_input.extra_dim
        self.towers = Towers(self.num_tasks, in_dim, config.tower_hidden, config.dropout)

    def declare_sharing(self, s: Sharing) -> None:
        """Nothing shared: every table has a column block per task, every network a member per task."""
        s.per_task(self.embedding).per_task(self.bottom_input).per_task(self.nets).per_task(self.towers)

    def forward(self, batch: TensorTable, return_gates: bool = False) -> ModelOutput:
        x, extra = self.bottom_input(self.embedding(batch), batch, self.embedding)  # [B, T, D], [B, T, E] | None
        h = self.nets(x.transpose(0, 1))  # [T, B, H]
        h = with_extra(h, None if extra is None else extra.transpose(0, 1))  # [T, B, H (+E)]
        return ModelOutput(logits=self.towers(h))  # [B, T]


@MODELS.register(
    "shared_bottom", "hard parameter sharing: one shared bottom (MLP, DCN-v2, DeepFM or DIN), one tower per task"
)
class SharedBottom(MultiTaskModel):
    """Shared-Bottom: embedding and bottom shared by all tasks, towers per task."""

    Config: ClassVar[type[ModelConfig]] = BottomConfig
    config: BottomConfig

    def __init__(self, layout: FeatureLayout, config: BottomConfig) -> None:
        super().__init__(layout, config)
        self.embedding = FeatureEmbedding(layout)
        self.bottom_input = BottomInput(config, layout)
        self.bottom = member_networks(config, 1, self.embedding.output_dim, config.bottom_hidden, config.dropout)
        self.towers = Towers(
            self.num_tasks, self.bottom.out_dim + self.bottom_input.extra_dim, config.tower_hidden, config.dropout
        )

    def declare_sharing(self, s: Sharing) -> None:
        s.reach(self.embedding).reach(self.bottom_input).reach(self.bottom).per_task(self.towers)
        s.last_layer(output_layer(self.bottom))

    def forward(self, batch: TensorTable, return_gates: bool = False) -> ModelOutput:
        x, extra = self.bottom_input(self.embedding(batch), batch, self.embedding)  # [B, 1, D], [B, 1, E] | None
        h = self.bottom(x.squeeze(1))  # [1, B, H]
        h = with_extra(h, None if extra is None else extra.squeeze(1)).squeeze(0)  # [B, H (+E)]
        return ModelOutput(logits=self.towers(h), shared=h)
