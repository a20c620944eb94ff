"""The two single-level sharing structures of the PLE paper's overview (Tang et al., RecSys 2020, Fig. 1).

- ``asymmetric_sharing``: every task has its own bottom, and a task's bottom also
  reads another task's lower representation (one direction only), so what one task
  learns low in the network is available to another without being shaped by it alone.
- ``customized_sharing``: task-specific bottoms next to a shared bottom; each tower
  reads its own bottom's output concatenated with the shared one, which separates
  shared from task-specific parameters explicitly (the static form of CGC).

Both run every task's bottom as one ``BatchedMLP`` (stacked weights), no loop over tasks.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field, field_validator

from mtrec.data.tables import FeatureLayout, TensorTable
from mtrec.errors import MtrecError
from mtrec.models.base import MODELS, ModelConfig, ModelOutput, MultiTaskModel
from mtrec.models.reach import Sharing
from mtrec.nn.batched import BatchedMLP, Towers
from mtrec.nn.embedding import FeatureEmbedding


class AsymmetricConfig(ModelConfig):
    # The first size is each task's lower layer (the representation another task may read);
    # the rest is the upper part of each bottom. Same total shape as single_task's bottoms.
    bottom_hidden: list[int] = Field(default_factory=lambda: [256, 128])
    # task name -> name of the task whose lower representation it also reads. None: each task
    # reads the task listed before it in the schema (the first reads none), a chain that
    # suits funnels (CVR reads CTR) and gives any number of tasks a one-directional link.
    reads: dict[str, str] | None = None

    @field_validator("bottom_hidden")
    @classmethod
    def _two_layers(cls, hidden: list[int]) -> list[int]:
        if len(hidden) < 2:
            raise ValueError("asymmetric_sharing needs at least two bottom layers: the lower one is what is read")
        return hidden


@MODELS.register(
    "asymmetric_sharing",
    "per-task bottoms; a task's upper bottom also reads another task's lower layer (PLE paper, Fig. 1b)",
)
class AsymmetricSharing(MultiTaskModel):
    """Task ``t``'s upper bottom reads ``[r_t, r_s]``: its own lower output and that of the task ``s`` it reads.

    Tasks that read nobody get zeros in place of ``r_s`` (the matching input weights then
    never learn), which keeps all bottoms one batched product. The lower layers are
    reached by the losses of every task that reads them, so they are shared.
    """

    Config: ClassVar[type[ModelConfig]] = AsymmetricConfig
    config: AsymmetricConfig

    # buffers (register_buffer), declared for the type checker
    source: torch.Tensor
    has_source: torch.Tensor

    def __init__(self, layout: FeatureLayout, config: AsymmetricConfig) -> None:
        super().__init__(layout, config)
        names = self.task_names
        if config.reads is None:
            source = [t - 1 for t in range(self.num_tasks)]
        else:
            unknown = [n for pair in config.reads.items() for n in pair if n not in names]
            if unknown:
                raise MtrecError(f"asymmetric_sharing reads: unknown task(s) {unknown}; tasks are {names}")
            if any(a == b for a, b in config.reads.items()):
                raise MtrecError("asymmetric_sharing reads: a task cannot read itself")
            source = [names.index(config.reads[n]) if n in config.reads else -1 for n in names]
        if self.num_tasks > 1 and all(s < 0 for s in source):
            raise MtrecError("asymmetric_sharing: no task reads another; name at least one pair in 'reads'")
        self.register_buffer("source", torch.tensor(source).clamp_min(0), persistent=False)
        self.register_buffer("has_source", torch.tensor([s >= 0 for s in source]), persistent=False)
        self.embedding = FeatureEmbedding(layout)
        first, rest = config.bottom_hidden[0], config.bottom_hidden[1:]
        self.lower = BatchedMLP(self.num_tasks, self.embedding.output_dim, [first], config.dropout)
        self.upper = BatchedMLP(self.num_tasks, 2 * first, rest, config.dropout)
        self.towers = Towers(self.num_tasks, self.upper.out_dim, config.tower_hidden, config.dropout)

    def declare_sharing(self, s: Sharing) -> None:
        """Lower layer ``s``: task ``s`` and every task that reads it; the upper layers and towers per task."""
        source, has = self.source.tolist(), self.has_source.tolist()
        lower = [{i} | {t for t in range(self.num_tasks) if has[t] and source[t] == i} for i in range(self.num_tasks)]
        s.reach(self.embedding).stacked(self.lower, lower).per_task(self.upper).per_task(self.towers)
        s.last_layer(self.lower.last_layer)

    def forward(self, batch: TensorTable, return_gates: bool = False) -> ModelOutput:
        x = self.embedding(batch).squeeze(1)  # [B, D]
        r = self.lower(x)  # [T, B, H1]
        other = r.index_select(0, self.source) * self.has_source.view(-1, 1, 1)  # [T, B, H1], zeros: reads none
        h = self.upper(torch.cat([r, other], dim=-1))  # [T, B, H]
        return ModelOutput(logits=self.towers(h), shared=r)


class CustomizedConfig(ModelConfig):
    specific_hidden: list[int] = Field(default_factory=lambda: [128, 64])  # each task's own bottom
    shared_hidden: list[int] = Field(default_factory=lambda: [128, 64])  # the bottom all tasks read


@MODELS.register(
    "customized_sharing", "task-specific bottoms plus a shared bottom; each tower reads both (PLE paper, Fig. 1c)"
)
class CustomizedSharing(MultiTaskModel):
    """Tower ``t`` reads ``[h_t, h_shared]``; only the shared bottom (and the embedding) sees every task's gradient."""

    Config: ClassVar[type[ModelConfig]] = CustomizedConfig
    config: CustomizedConfig

    def __init__(self, layout: FeatureLayout, config: CustomizedConfig) -> None:
        super().__init__(layout, config)
        self.embedding = FeatureEmbedding(layout)
        d = self.embedding.output_dim
        self.specific = BatchedMLP(self.num_tasks, d, config.specific_hidden, config.dropout)
        self.shared_bottom = BatchedMLP(1, d, config.shared_hidden, config.dropout)
        self.towers = Towers(
            self.num_tasks, self.specific.out_dim + self.shared_bottom.out_dim, config.tower_hidden, config.dropout
        )

    def declare_sharing(self, s: Sharing) -> None:
        s.reach(self.embedding).per_task(self.specific).reach(self.shared_bottom).per_task(self.towers)
        s.last_layer(self.shared_bottom.last_layer)

    def forward(self, batch: TensorTable, return_gates: bool = False) -> ModelOutput:
        x = self.embedding(batch).squeeze(1)  # [B, D]
        own = self.specific(x)  # [T, B, Hs]
        shared = self.shared_bottom(x)  # [1, B, Hc]
        h = torch.cat([own, shared.expand(self.num_tasks, -1, -1)], dim=-1)  # [T, B, Hs + Hc]
        return ModelOutput(logits=self.towers(h), shared=shared.squeeze(0))
