"""What the funnel models (ESMM, ESM2, ESCM2, AITM) share: the funnel read from the
schema, entire-space probabilities and losses.

A schema declares a conversion funnel through the tasks' ``space:`` keys: the
purchase task's space is the click task (its label is observed on clicked
impressions only). Funnel models chain the binary tasks along those keys: the
*entire-space* (joint) probability of a task is its in-space probability times
that of every ancestor (pCTCVR = pCTR * pCVR), and its *joint label* is the
product of the labels along the chain (clicked and purchased). Losses on joint
probabilities over all impressions are what Ma et al. (SIGIR 2018) call training
in the entire space: no sample is dropped, and the labels of a task outside its
space never enter a loss (they are multiplied by the parent's 0 label).

Probabilities are handled as log-probabilities (``log p_joint = sum of
logsigmoid`` along the chain) so that products of small probabilities and their
cross-entropies stay exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from mtrec.data.tables import FeatureLayout, TensorTable
from mtrec.errors import MtrecError
from mtrec.models.base import ModelConfig, ModelOutput, MultiTaskModel
from mtrec.models.reach import Sharing
from mtrec.nn.batched import Towers
from mtrec.nn.embedding import FeatureEmbedding

LN2 = math.log(2.0)
MAX_LOG_PROB = -1e-7  # log(1 - 1e-7): keeps log(1 - p) finite


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate at both ends (Maechler's two branches)."""
    x = x.clamp(max=MAX_LOG_PROB)
    near = x > -LN2
    # each branch only ever sees inputs it handles, so neither produces inf/NaN gradients
    a = torch.log(-torch.expm1(torch.where(near, x, torch.full_like(x, -LN2))))
    b = torch.log1p(-torch.exp(torch.where(near, torch.full_like(x, -LN2), x)))
    return torch.where(near, a, b)


def logit_from_log_prob(log_p: Tensor) -> Tensor:
    """``logit(p)`` from ``log p``."""
    log_p = log_p.clamp(max=MAX_LOG_PROB)
    return log_p - log1mexp(log_p)


def bce_from_log_prob(log_p: Tensor, y: Tensor) -> Tensor:
    """Elementwise binary cross-entropy of probability ``exp(log_p)`` against 0/1 labels ``y``."""
    log_p = log_p.clamp(max=MAX_LOG_PROB)
    return -(y * log_p + (1.0 - y) * log1mexp(log_p))


@dataclass(frozen=True)
class Funnel:
    """The funnel structure of a layout's tasks.

    ``member[t]``: task ``t`` is binary and linked by ``space:`` to another binary task.
    ``parent[t]``: the task whose positives define ``t``'s space when both are members, else -1.
    ``order``: the tasks with every parent before its children.
    ``chains[t]``: a member's ancestors, nearest first (the layout's space chain); empty for the others.
    """

    names: tuple[str, ...]
    parent: tuple[int, ...]
    member: tuple[bool, ...]
    order: tuple[int, ...]
    chains: tuple[tuple[int, ...], ...]

    def children(self, t: int) -> list[int]:
        return [c for c, p in enumerate(self.parent) if p == t]

    def ancestors(self, t: int) -> list[int]:
        """Nearest first."""
        return list(self.chains[t])

    @property
    def roots(self) -> list[int]:
        return [t for t, m in enumerate(self.member) if m and self.parent[t] < 0]

    @property
    def linked(self) -> list[int]:
        """Members with a parent (CVR-like tasks), in funnel order."""
        return [t for t in self.order if self.member[t] and self.parent[t] >= 0]

    def chain_matrix(self) -> Tensor:
        """``[T, T]``: ``A[t, a] = 1`` when ``a`` is ``t`` or one of its ancestors."""
        n = len(self.names)
        a = torch.eye(n)
        for t in range(n):
            for anc in self.ancestors(t):
                a[t, anc] = 1.0
        return a


def funnel_of(layout: FeatureLayout, model: str) -> Funnel:
    """Read the funnel from the tasks' ``space:`` declarations; a user error when there is none.

    Links are binary-to-binary ``space:`` declarations. A task with a space that is not
    part of a link (a regression task observed on clicks) keeps the ordinary masked loss.
    """
    names = tuple(layout.task_names)
    index = {n: i for i, n in enumerate(names)}
    parent = [-1] * len(names)
    for i, task in enumerate(layout.tasks):
        if task.space is None:
            continue
        s = index[task.space]
        if s == i:
            raise MtrecError(
                f"model '{model}': task '{task.name}' declares itself as its space (schema field tasks[{i}].space)"
            )
        if task.type == "binary" and layout.tasks[s].type == "binary":
            parent[i] = s
        elif task.type == "binary":
            raise MtrecError(
                f"model '{model}': task '{task.name}' declares space '{task.space}', a regression task; "
                f"a conversion funnel chains binary tasks (schema field tasks[{i}].space)"
            )
    if all(p < 0 for p in parent):
        raise MtrecError(
            f"model '{model}' needs a conversion funnel: a binary task whose 'space:' names another binary "
            f"task (schema field tasks[].space, e.g. 'space: click' on the purchase task); "
            f"none of the tasks {', '.join(names)} declares one"
        )
    # order parents first; a cycle of spaces has no such order
    order: list[int] = []
    state = [0] * len(names)  # 0 new, 1 on the current path, 2 done

    def visit(t: int, path: list[int]) -> None:
        if state[t] == 2:
            return
        if state[t] == 1:
            cycle = " -> ".join(names[i] for i in path[path.index(t) :] + [t])
            raise MtrecError(
                f"model '{model}': the tasks' spaces form a cycle ({cycle}); check tasks[].space in the schema"
            )
        state[t] = 1
        if parent[t] >= 0:
            visit(parent[t], path + [t])
        state[t] = 2
        order.append(t)

    for t in range(len(names)):
        visit(t, [])
    member = [parent[t] >= 0 or t in parent for t in range(len(names))]
    # every link of a member's chain is binary-to-binary (checked above), so the space chain is the funnel's
    chains = tuple(tuple(layout.space_ancestors(t)) if member[t] else () for t in range(len(names)))
    return Funnel(names, tuple(parent), tuple(member), tuple(order), chains)


class FunnelConfig(ModelConfig):
    # each task tower is the whole network above the shared embedding, hence two layers
    tower_hidden: list[int] = Field(default_factory=lambda: [128, 64])


class FunnelModel(MultiTaskModel):
    """Base of the funnel models: the funnel, joint probabilities and entire-space losses.

    ``funnel_of`` raises a :class:`MtrecError` naming ``tasks[].space`` when the schema
    declares no funnel, so these models refuse a layout they cannot use.
    """

    Config: ClassVar[type[ModelConfig]] = FunnelConfig
    config: FunnelConfig
    # built by each funnel model; the default declare_sharing reads them
    embedding: FeatureEmbedding
    towers: Towers

    # buffers (register_buffer), declared for the type checker
    chain: Tensor
    member: Tensor

    def __init__(self, layout: FeatureLayout, config: FunnelConfig) -> None:
        super().__init__(layout, config)
        self.funnel = funnel_of(layout, self.model_name())
        self.register_buffer("chain", self.funnel.chain_matrix(), persistent=False)  # [T, T]
        self.register_buffer("member", torch.tensor(self.funnel.member), persistent=False)  # [T]

    def chain_owners(self) -> list[set[int]]:
        """Per task ``a``: the tasks whose entire-space loss multiplies ``a``'s in-space probability, ``a``
        and every task below it in the funnel (the CTCVR loss reaches the CTR tower)."""
        chain = self.funnel.chain_matrix()  # [T, T]: chain[t, a] = 1 when a is t or an ancestor of t
        return [set(torch.nonzero(chain[:, a]).flatten().tolist()) for a in range(self.num_tasks)]

    def declare_sharing(self, s: Sharing) -> None:
        """Default of the tower-per-task funnels: the embedding is shared; tower ``a`` (the first ``T``
        heads of ``self.towers``) reaches :meth:`chain_owners`; extra heads say :meth:`extra_head_owners`;
        the last shared layer is the output layer of the towers' shared members (the CTR tower's)."""
        s.reach(self.embedding)
        s.stacked(self.towers, self.chain_owners() + self.extra_head_owners())
        s.last_layer(self.towers.out)

    def extra_head_owners(self) -> list[set[int]]:
        """Owners of heads past the ``T`` task towers (imputation, decomposition towers)."""
        return []

    def log_joint(self, logits: Tensor) -> Tensor:
        """``[B, T]``: log entire-space probability of members from their in-space logits."""
        return F.logsigmoid(logits) @ self.chain.T  # sum of log p along each chain

    def joint_labels(self, labels: Tensor) -> Tensor:
        """``[B, T]``: 1 where the task and all its ancestors are positive."""
        return ((1.0 - labels) @ self.chain.T == 0).to(labels.dtype)

    def joint_logits_of(self, logits: Tensor) -> Tensor:
        """``[B, T]``: entire-space logits for members; the in-space logits elsewhere."""
        return torch.where(self.member, logit_from_log_prob(self.log_joint(logits)), logits)

    def weighted_mean(self, per: Tensor, batch: TensorTable, mask: Tensor | None = None) -> Tensor:
        """``[T]``: per-task mean of ``per`` ``[B, T]`` under sample weights (and ``mask``)."""
        w = torch.ones_like(per) if mask is None else mask
        if batch.weight is not None:
            w = w * batch.weight  # [B, T]
        return (per * w).sum(0) / w.sum(0).clamp_min(1e-12)

    def entire_space_losses(self, log_joint: Tensor, output: ModelOutput, batch: TensorTable) -> Tensor:
        """``[T]``: members, cross-entropy of the joint probability on every sample;
        other tasks, the default in-space loss of their logits."""
        member_loss = self.weighted_mean(bce_from_log_prob(log_joint, self.joint_labels(batch.labels)), batch)
        if bool(self.member.all()):
            return member_loss
        return torch.where(self.member, member_loss, MultiTaskModel.losses(self, output, batch))

    def predict_joint(self, output: ModelOutput) -> Tensor:
        """``[B, T]`` entire-space probabilities (pCTR, pCTCVR, ...) of the member tasks."""
        assert output.joint_logits is not None
        return torch.sigmoid(output.joint_logits)
