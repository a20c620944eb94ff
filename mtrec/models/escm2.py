"""ESCM2: Entire Space Counterfactual Multi-task Model (Wang et al., "ESCM2: Entire Space
Counterfactual Multi-Task Model for Post-Click Conversion Rate Estimation", SIGIR 2022).

ESMM's CVR estimate is biased upwards (pCVR is only identified as a ratio of two
estimates) and its CVR tower may ignore that a conversion needs a click. ESCM2
keeps ESMM's towers and adds a counterfactual CVR risk that estimates the CVR loss
*as if every impression had been clicked*, using pCTR as the propensity of
observing the conversion label:

    L = L_CTR + lambda_c * R_CVR + lambda_g * L_CTCVR

- ``escm2_ips``: inverse propensity scoring,
  ``R_IPS = 1/|D| sum_i o_i * e_i / ô_i``, with ``o_i`` the click, ``ô_i`` = pCTR and
  ``e_i`` the cross-entropy of pCVR against the conversion label.
- ``escm2_dr``: doubly robust, ``R_DR = 1/|D| sum_i [ê_i + o_i (e_i - ê_i) / ô_i]``, where
  ``ê_i`` is the imputed error from an imputation tower; that tower is fitted with
  ``1/|D| sum_i o_i (e_i - ê_i)^2 / ô_i``. As in the doubly robust joint learning the
  paper builds on (Wang et al., ICML 2019), the imputation tower predicts a
  pseudo-label ``r~_i`` and ``ê_i`` is pCVR's cross-entropy against it, so the CVR tower
  also learns on unclicked impressions.

Choices made here, not fixed by the paper: the propensity is treated as a constant
(detached, so the CVR regulariser cannot move the CTR tower) and clipped below at
``propensity_min`` to bound the weights ``1/ô``; the CVR risk and the imputation loss
each see the other tower's output as a constant, which is the alternating scheme
of DR joint learning done within one step. For chains longer than click ->
purchase, each linked task is regularised the same way with the joint probability
of its parent (the probability of entering its space) as propensity.
The defaults of ``counterfactual_weight`` and ``ctcvr_weight`` are a starting point;
tune them per data set.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from mtrec.data.tables import FeatureLayout, TensorTable
from mtrec.models.base import MODELS, ModelConfig, ModelOutput
from mtrec.models.funnel import FunnelConfig, FunnelModel
from mtrec.nn.batched import Towers
from mtrec.nn.embedding import FeatureEmbedding


class ESCM2Config(FunnelConfig):
    counterfactual_weight: float = Field(0.5, ge=0.0)  # lambda_c, on the counterfactual CVR risk
    ctcvr_weight: float = Field(0.5, ge=0.0)  # lambda_g, on the entire-space CTCVR loss
    imputation_weight: float = Field(1.0, ge=0.0)  # dr only: on the imputation tower's loss
    propensity_min: float = Field(0.05, gt=0.0, le=1.0)  # clip of pCTR: inverse weights at most 1/0.05 = 20


class _ESCM2(FunnelModel):
    Config: ClassVar[type[ModelConfig]] = ESCM2Config
    config: ESCM2Config
    doubly_robust = False

    # buffers (register_buffer), declared for the type checker
    child: Tensor
    parent: Tensor

    def __init__(self, layout: FeatureLayout, config: ESCM2Config) -> None:
        super().__init__(layout, config)
        linked = self.funnel.linked
        self.register_buffer("child", torch.tensor(linked, dtype=torch.long), persistent=False)  # CVR-like tasks
        self.register_buffer(
            "parent", torch.tensor([self.funnel.parent[t] for t in linked], dtype=torch.long), persistent=False
        )
        heads = self.num_tasks + (len(linked) if self.doubly_robust else 0)  # + one imputation tower per CVR task
        self.embedding = FeatureEmbedding(layout)
        self.towers = Towers(heads, self.embedding.output_dim, config.tower_hidden, config.dropout)

    def chain_owners(self) -> list[set[int]]:
        """With ``ctcvr_weight`` 0 a linked task's loss is its counterfactual risk alone, which reads its
        own tower (the propensity is a constant): nothing reaches an ancestor's tower."""
        if self.config.ctcvr_weight > 0:
            return super().chain_owners()
        return [{a} for a in range(self.num_tasks)]

    def extra_head_owners(self) -> list[set[int]]:
        """``escm2_dr``: the imputation tower of linked task ``k`` is fitted by that task's loss."""
        return [{t} for t in self.child.tolist()] if self.doubly_robust else []

    def forward(self, batch: TensorTable, return_gates: bool = False) -> ModelOutput:
        x = self.embedding(batch).squeeze(1)  # [B, D]
        heads = self.towers(x)  # [B, T (+K)]
        logits = heads[:, : self.num_tasks]  # [B, T]
        extras = {"imputation": heads[:, self.num_tasks :]} if self.doubly_robust else {}  # [B, K] pseudo-label logits
        return ModelOutput(logits=logits, shared=x, joint_logits=self.joint_logits_of(logits), extras=extras)

    def losses(self, output: ModelOutput, batch: TensorTable) -> Tensor:
        cfg: ESCM2Config = self.config
        log_joint = self.log_joint(output.logits)  # [B, T]
        base = self.entire_space_losses(log_joint, output, batch)  # [T]: L_CTR at roots, L_CTCVR at linked tasks
        cvr_logit = output.logits[:, self.child]  # [B, K]
        observed = self.sample_mask(batch)[:, self.child]  # o_i: inside the task's space (clicked), [B, K]
        propensity = log_joint[:, self.parent].exp().detach().clamp(min=cfg.propensity_min)  # ô_i, [B, K]
        error = F.binary_cross_entropy_with_logits(cvr_logit, batch.labels[:, self.child], reduction="none")  # e_i
        if not self.doubly_robust:
            risk = observed * error / propensity  # [B, K]
            extra = torch.zeros_like(risk)
        else:
            pseudo = torch.sigmoid(output.extras["imputation"])  # r~_i, [B, K]
            imputed = F.binary_cross_entropy_with_logits(cvr_logit, pseudo.detach(), reduction="none")  # ê_i
            risk = imputed + observed * (error - imputed) / propensity
            imputed_fit = F.binary_cross_entropy_with_logits(cvr_logit.detach(), pseudo, reduction="none")
            extra = cfg.imputation_weight * observed * (error.detach() - imputed_fit).pow(2) / propensity
        cf = self.weighted_mean(cfg.counterfactual_weight * risk + extra, batch)  # [K], mean over all impressions
        linked = cfg.ctcvr_weight * base[self.child] + cf
        return base.index_copy(0, self.child, linked)


@MODELS.register("escm2_ips", "ESMM plus an inverse-propensity (pCTR) counterfactual CVR risk")
class ESCM2IPS(_ESCM2):
    """ESCM2 with the IPS counterfactual regulariser."""


@MODELS.register("escm2_dr", "ESMM plus a doubly robust counterfactual CVR risk with an imputation tower")
class ESCM2DR(_ESCM2):
    """ESCM2 with the doubly robust regulariser and its imputation tower."""

    doubly_robust = True
