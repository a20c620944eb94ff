"""ESMM: Entire Space Multi-task Model (Ma et al., "Entire Space Multi-Task Model: An
Effective Approach for Estimating Post-Click Conversion Rate", SIGIR 2018).

A CVR model trained on clicked impressions only suffers from sample selection bias
(it serves every impression) and from data sparsity. ESMM never trains pCVR
directly: it models ``pCTCVR = pCTR * pCVR`` and puts its losses on CTR and on
CTCVR, both over **all** impressions,

    L = sum_i BCE(y_i, pCTR_i) + sum_i BCE(y_i & z_i, pCTR_i * pCVR_i),

with the embedding shared by the CTR and CVR towers (the CVR task borrows the
far denser click data through it). pCVR is the tower in between; the CVR task's
logit slot holds ``logit(pCVR)`` (what the in-space metrics and ``predict`` report)
and ``ModelOutput.joint_logits`` holds ``logit(pCTCVR)``.

Longer chains (click -> cart -> purchase) generalise the same way: each task's
joint probability is the product of the in-space probabilities along its chain,
and each task's loss is the cross-entropy of that product over all impressions.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from mtrec.data.tables import FeatureLayout, TensorTable
from mtrec.models.base import MODELS, ModelConfig, ModelOutput
from mtrec.models.funnel import FunnelConfig, FunnelModel
from mtrec.nn.batched import Towers
from mtrec.nn.embedding import FeatureEmbedding


@MODELS.register(
    "esmm", "entire space multi-task model: pCTCVR = pCTR * pCVR, losses on CTR and CTCVR over all impressions"
)
class ESMM(FunnelModel):
    """Shared embedding, one tower per task; losses on the entire-space (joint) probabilities."""

    Config: ClassVar[type[ModelConfig]] = FunnelConfig
    config: FunnelConfig

    def __init__(self, layout: FeatureLayout, config: FunnelConfig) -> None:
        super().__init__(layout, config)
        self.embedding = FeatureEmbedding(layout)
        self.towers = Towers(self.num_tasks, self.embedding.output_dim, config.tower_hidden, config.dropout)

    def forward(self, batch: TensorTable, return_gates: bool = False) -> ModelOutput:
        x = self.embedding(batch).squeeze(1)  # [B, D]
        logits = self.towers(x)  # [B, T], in-space: logit(pCTR), logit(pCVR)
        return ModelOutput(logits=logits, shared=x, joint_logits=self.joint_logits_of(logits))

    def losses(self, output: ModelOutput, batch: TensorTable) -> Tensor:
        return self.entire_space_losses(self.log_joint(output.logits), output, batch)
