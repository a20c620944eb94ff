"""Soft parameter sharing: one bottom per task, coupled by an L2 penalty on their distance.

Duong et al., "Low Resource Dependency Parsing: Cross-lingual Parameter Sharing
in a Neural Network Parser" (ACL 2015) train one network per task and add the
squared L2 distance between matching parameters to the loss, so that tasks
share statistical strength without sharing weights. With ``T`` tasks we use the
distance of every member to the members' mean,

    penalty = lambda * sum_l sum_i || W_{l,i} - mean_j W_{l,j} ||^2 ,

summed over the layers ``l`` of the bottoms (weights and biases), which for two
tasks is ``lambda / 2 * ||W_1 - W_2||^2``. The bottoms are one ``BatchedMLP``
with ``n = T``, so the matching layers are the slices of one stacked tensor and
the penalty is a handful of tensor reductions. It is returned as
``ModelOutput.aux_loss`` and added once to the combined task loss.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from torch import Tensor

from mtrec.data.tables import FeatureLayout, TensorTable
from mtrec.models.base import MODELS, ModelConfig, ModelOutput, MultiTaskModel
from mtrec.models.reach import Sharing
from mtrec.nn.batched import BatchedMLP, Towers
from mtrec.nn.embedding import FeatureEmbedding


class SoftSharingConfig(ModelConfig):
    bottom_hidden: list[int] = Field(default_factory=lambda: [256, 128])  # as single_task, so the two compare
    # Coupling strength lambda. At 1e-3 the penalty's gradient on a bottom weight, 2 lambda (W_i - mean),
    # is 0.35-1.2x the task gradient in mean absolute size at initialisation on Census (batch 1024):
    # a real pull towards sharing that the task gradients can still overrule. 0 gives independent
    # bottoms over a shared embedding.
    penalty: float = Field(1e-3, ge=0.0)


def soft_sharing_penalty(bottoms: BatchedMLP) -> Tensor:
    """``sum_l sum_i ||W_{l,i} - mean_j W_{l,j}||^2`` over the stacked members of ``bottoms`` (weights and biases)."""
    total = bottoms.layers[0].weight.new_zeros(())
    for layer in bottoms.layers:
        for param in (layer.weight, layer.bias):  # [n, in, out], [n, out]
            total = total + (param - param.mean(0, keepdim=True)).pow(2).sum()
    return total


@MODELS.register("soft_sharing", "one bottom per task, coupled by an L2 penalty towards their mean (Duong et al. 2015)")
class SoftSharing(MultiTaskModel):
    """Per-task bottoms over a shared embedding; ``aux_loss`` = lambda * distance of each bottom to their mean.

    Only the embedding receives gradients from several task losses; the penalty couples
    the bottoms but is a regulariser, not a task gradient, so the bottoms are task-specific.
    """

    Config: ClassVar[type[ModelConfig]] = SoftSharingConfig
    config: SoftSharingConfig

    def __init__(self, layout: FeatureLayout, config: SoftSharingConfig) -> None:
        super().__init__(layout, config)
        self.embedding = FeatureEmbedding(layout)
        self.bottoms = BatchedMLP(self.num_tasks, self.embedding.output_dim, config.bottom_hidden, config.dropout)
        self.towers = Towers(self.num_tasks, self.bottoms.out_dim, config.tower_hidden, config.dropout)

    def penalty(self) -> Tensor:
        """The regulariser ``lambda * sum ||W_i - mean W||^2`` (a scalar)."""
        return self.config.penalty * soft_sharing_penalty(self.bottoms)

    def declare_sharing(self, s: Sharing) -> None:
        """Only the embedding tables are shared; the penalty couples the bottoms but is no task's loss."""
        s.reach(self.embedding).per_task(self.bottoms).per_task(self.towers)

    def forward(self, batch: TensorTable, return_gates: bool = False) -> ModelOutput:
        x = self.embedding(batch).squeeze(1)  # [B, D]
        h = self.bottoms(x)  # [T, B, H], one bottom per task
        aux = self.penalty() if self.config.penalty > 0 else None
        return ModelOutput(logits=self.towers(h), aux_loss=aux)
