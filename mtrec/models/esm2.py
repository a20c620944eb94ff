"""ESM2: Elaborated Entire Space Supervised Multi-task Model (Wen et al., "Entire Space
Multi-Task Modeling via Post-Click Behavior Decomposition for Conversion Rate
Prediction", SIGIR 2020).

ESM2 refines ESMM's impression -> click -> purchase path with the actions users
take between click and purchase. A click leads either to a *deterministic action*
(DAction: add to cart or wish list) or to any *other action* (OAction), and a
purchase can follow either, so

    pCVR = p(buy | click) = pA * pD + (1 - pA) * pO,

with pA = p(DAction | click), pD = p(buy | DAction), pO = p(buy | OAction), each from
its own tower over the shared embedding. Its losses are cross-entropies of joint
probabilities over all impressions: on pCTR (clicks), on pCTR * pA (click and
DAction, the "CTAVR" task) when the action is labelled, and on pCTR * pCVR (click
and purchase, CTCVR).

How the schema's tasks map onto this (chains come from ``space:``):

- ``click -> purchase`` (``purchase.space: click``), two tasks: the action is
  **latent**; pA, pD and pO are towers with no label of their own, trained only
  through the CTCVR loss, exactly the decomposition above. Every binary task whose
  space is a root of the funnel and which has no task in its own space gets it.
- ``action_task: cart`` with ``cart.space: click`` and ``purchase.space: click``
  (the paper's data: the purchase label is observed on every click): the DAction is
  **observed**; pA is the cart task's tower, and the CTAVR loss trains it.
- chains of three or more (``click -> cart -> purchase``, ``purchase.space: cart``):
  the schema says a purchase is only observed after the action, so the OAction path
  has no data and is not modelled; every stage's in-space probability multiplies
  along the chain and every stage gets its entire-space loss (the paper's CTR,
  CTAVR and CTCVR losses for three stages). This is ESMM's chain rule.

The purchase task's logit slot holds ``logit(pCVR)`` in its space, and
``ModelOutput.joint_logits`` the entire-space logits (pCTCVR).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from mtrec.data.tables import FeatureLayout, TensorTable
from mtrec.errors import MtrecError
from mtrec.models.base import MODELS, ModelConfig, ModelOutput
from mtrec.models.funnel import FunnelConfig, FunnelModel
from mtrec.nn.batched import Towers
from mtrec.nn.embedding import FeatureEmbedding


class ESM2Config(FunnelConfig):
    action_task: str | None = None  # a task observed on the same space as the purchase: the DAction label


@MODELS.register(
    "esm2", "ESMM with post-click behaviour decomposition: click -> (deterministic / other action) -> purchase"
)
class ESM2(FunnelModel):
    """Towers for every task plus the decomposition's extra towers; entire-space losses."""

    Config: ClassVar[type[ModelConfig]] = ESM2Config
    config: ESM2Config

    # buffers (register_buffer), declared for the type checker
    p_idx: Tensor
    a_idx: Tensor
    o_idx: Tensor

    def __init__(self, layout: FeatureLayout, config: ESM2Config) -> None:
        super().__init__(layout, config)
        f, names = self.funnel, self.task_names
        action = None
        if config.action_task is not None:
            if config.action_task not in names:
                raise MtrecError(
                    f"model 'esm2' option action_task: '{config.action_task}' is not a task ({', '.join(names)})"
                )
            action = names.index(config.action_task)
            if f.parent[action] < 0 or f.parent[f.parent[action]] >= 0:
                raise MtrecError(
                    f"model 'esm2' option action_task: task '{config.action_task}' must declare the click task as its "
                    f"space (schema field tasks[{action}].space), like the purchase task"
                )
        # decomposed purchases: funnel leaves whose space is a root (click), other than the action itself
        decomposed = [
            t
            for t in f.linked
            if not f.children(t)
            and f.parent[f.parent[t]] < 0
            and t != action
            and (action is None or f.parent[t] == f.parent[action])
        ]
        if action is not None and not decomposed:
            raise MtrecError(
                f"model 'esm2' option action_task: no other task shares the space of '{config.action_task}'; declare "
                f"the purchase task's space as '{names[f.parent[action]]}' (schema field tasks[].space)"
            )
        # extra towers: pO for every decomposed task, pA too when the action is latent
        heads = self.num_tasks
        a_idx, o_idx = [], []
        for _t in decomposed:
            o_idx.append(heads)
            heads += 1
            if action is None:
                a_idx.append(heads)
                heads += 1
            else:
                a_idx.append(action)
        self.register_buffer("p_idx", torch.tensor(decomposed, dtype=torch.long), persistent=False)  # pD = own tower
        self.register_buffer("a_idx", torch.tensor(a_idx, dtype=torch.long), persistent=False)
        self.register_buffer("o_idx", torch.tensor(o_idx, dtype=torch.long), persistent=False)
        self.embedding = FeatureEmbedding(layout)
        self.towers = Towers(heads, self.embedding.output_dim, config.tower_hidden, config.dropout)

    def chain_owners(self) -> list[set[int]]:
        """As ESMM, and an observed action's tower (pA) also reaches the decomposed purchases."""
        owners = super().chain_owners()
        below = {a: owners[a] for a in range(self.num_tasks)}
        for t, a in zip(self.p_idx.tolist(), self.a_idx.tolist()):
            if a < self.num_tasks:
                owners[a] = owners[a] | below[t]
        return owners

    def extra_head_owners(self) -> list[set[int]]:
        """pO (and a latent pA) of decomposed task ``t``: reached by ``t``'s loss (and what is below ``t``)."""
        owners = super().chain_owners()
        extra: dict[int, set[int]] = {}
        for t, a, o in zip(self.p_idx.tolist(), self.a_idx.tolist(), self.o_idx.tolist()):
            extra[o] = set(owners[t])
            if a >= self.num_tasks:
                extra[a] = set(owners[t])
        return [extra[h] for h in sorted(extra)]

    def forward(self, batch: TensorTable, return_gates: bool = False) -> ModelOutput:
        x = self.embedding(batch).squeeze(1)  # [B, D]
        heads = self.towers(x)  # [B, T + extra]
        logits = heads[:, : self.num_tasks]  # [B, T] in-space logits
        if self.p_idx.numel():
            ls = F.logsigmoid
            a, d, o = heads[:, self.a_idx], heads[:, self.p_idx], heads[:, self.o_idx]  # [B, K] each
            # pCVR = pA pD + (1 - pA) pO and 1 - pCVR = pA (1 - pD) + (1 - pA)(1 - pO), in log space
            log_pos = torch.logaddexp(ls(a) + ls(d), ls(-a) + ls(o))
            log_neg = torch.logaddexp(ls(a) + ls(-d), ls(-a) + ls(-o))
            logits = logits.index_copy(1, self.p_idx, log_pos - log_neg)  # logit(pCVR)
        return ModelOutput(logits=logits, shared=x, joint_logits=self.joint_logits_of(logits))

    def losses(self, output: ModelOutput, batch: TensorTable) -> Tensor:
        return self.entire_space_losses(self.log_joint(output.logits), output, batch)
