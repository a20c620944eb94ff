"""Pluggable bottoms: what the first, feature-facing networks of a model are made of.

The embedding turns a batch into one flat vector per sample (``[B, copies, D]``,
see :class:`~mtrec.nn.embedding.FeatureEmbedding`). A *bottom* is the network
that reads it: the shared bottom of ``shared_bottom``, every expert of the
mixture models, the per-task network of ``single_task``. ``n`` such networks
(``n`` experts, ``n`` tasks) always run as one batched product over stacked
weights, whatever the kind:

- ``mlp``: ReLU layers (:class:`~mtrec.nn.batched.BatchedMLP`), the default.
- ``dcn_v2``: Wang et al., "DCN V2: Improved Deep & Cross Network", WWW 2021.
  Cross layers ``x_{l+1} = x_0 * (W_l x_l + b_l) + x_l`` (full-rank ``W_l``, or the
  paper's low-rank ``U_l V_l^T`` with ``cross_rank``), then an MLP on top
  (``stacked``) or beside it with both outputs concatenated (``parallel``).
  Every one of the ``n`` networks has its own cross weights, stacked ``[n, D, D]``.
- ``deepfm``: Guo et al., "DeepFM", IJCAI 2017. The MLP plus the FM component
  computed once from the embedded input: the first-order term ``sum_i w_i x_i`` and
  the pairwise interactions ``sum_{i<j} <v_i, v_j>``. Because a bottom feeds several
  task towers rather than one logit, the FM component enters them as features next
  to the deep output: the first-order sum and the bi-interaction vector
  ``((sum_i v_i)^2 - sum_i v_i^2) / 2``, whose elements sum to the pairwise term.
  Fields interact within groups of equal embedding size (one group when all sizes
  are equal, as in the paper).
- ``din``: Zhou et al., "Deep Interest Network", KDD 2018. For every ``sequence``
  feature that shares the vocabulary of a sparse target feature (``vocab:`` in the
  schema), the masked mean of its items is replaced by the target attention pooling
  ``sum_j a(e_j, v) e_j``, where the activation unit ``a`` is an MLP over
  ``[e_j, v, e_j - v, e_j * v]`` (the element-wise product standing in for the
  paper's outer product) and the weights are not normalised (the paper keeps their
  sum as a measure of interest intensity). The member networks are then MLPs.

DIN and the FM term act on the input side (:class:`BottomInput`), so a mixture layer
keeps one batched expert stack; the kind of that stack (MLPs, or DCN-v2's cross network and
MLP) is the bottom's to say: a model hands :func:`expert_stacks` to the mixture layer, which
builds its experts with it (:func:`member_networks` builds one stack).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from mtrec.data.tables import FeatureLayout, TensorTable
from mtrec.errors import MtrecError
from mtrec.nn.batched import BatchedLinear, BatchedMLP
from mtrec.nn.embedding import FeatureEmbedding
from mtrec.nn.typed import TypedModuleList

BottomKind = Literal["mlp", "dcn_v2", "deepfm", "din"]


class BottomOptions(BaseModel):
    """Model options selecting the bottom; mixed into the configs of the models that take one."""

    model_config = ConfigDict(extra="forbid")

    bottom: BottomKind = "mlp"
    cross_layers: int = Field(2, ge=1)  # dcn_v2: the paper finds 2-3 cross layers enough
    cross_structure: Literal["stacked", "parallel"] = "stacked"  # dcn_v2: MLP on the cross output, or beside it
    cross_rank: int | None = Field(None, ge=1)  # dcn_v2: None = full-rank W; r = the low-rank U V^T form
    din_hidden: list[int] = Field(default_factory=lambda: [36])  # din: activation unit (the paper's size)


# ---- where each feature sits in the embedded vector ----------------------------------


@dataclass(frozen=True)
class EmbeddedField:
    """One feature's columns ``[start, stop)`` in the embedding's output vector."""

    name: str
    kind: str  # "sparse", "sequence" or "dense"
    start: int
    stop: int

    @property
    def width(self) -> int:
        return self.stop - self.start


def embedded_fields(layout: FeatureLayout) -> list[EmbeddedField]:
    """The column range of every feature in :class:`FeatureEmbedding`'s output.

    The embedding concatenates the sparse fields grouped by embedding size (sizes
    ascending, layout order within a size), then the pooled sequences in layout
    order, then the dense values. ``tests/test_bottoms.py`` checks this map against
    the embedding itself, so a change of that order fails loudly.
    """
    out: list[EmbeddedField] = []
    pos = 0
    for f in sorted(layout.sparse, key=lambda f: f.embed_dim):  # stable: layout order within a size
        out.append(EmbeddedField(f.name, "sparse", pos, pos + f.embed_dim))
        pos += f.embed_dim
    for s in layout.sequences:
        out.append(EmbeddedField(s.name, "sequence", pos, pos + s.embed_dim))
        pos += s.embed_dim
    for name in layout.dense:
        out.append(EmbeddedField(name, "dense", pos, pos + 1))
        pos += 1
    return out


def sequence_item_embeddings(embedding: FeatureEmbedding, batch: TensorTable, name: str) -> Tensor:
    """Embeddings of every item of sequence ``name``: ``[B, L, copies, d]`` (padding rows included).

    Reads the embedding's tables directly (the pooled output keeps only the mean).
    """
    entry = next((s for s in getattr(embedding, "sequences", []) if s[0] == name), None)
    tables = getattr(embedding, "tables", None)
    if entry is None or tables is None:
        raise RuntimeError(f"FeatureEmbedding no longer exposes the table rows of sequence '{name}'; update bottoms.py")
    _, d, offset = entry
    ids = batch.sequences[name]  # [B, L]
    rows = tables[str(d)].weight.index_select(0, (ids + offset).view(-1))  # [B * L, copies * d]
    return rows.view(ids.shape[0], ids.shape[1], embedding.copies, d)


# ---- member networks: n batched bottoms -------------------------------------------------


class BatchedCrossNetwork(nn.Module):
    """``n`` independent DCN-v2 cross networks over ``[n, B, D]``: one ``baddbmm`` per layer."""

    def __init__(self, n: int, dim: int, layers: int, rank: int | None = None) -> None:
        super().__init__()
        self.n, self.dim, self.rank = n, dim, rank
        bound = 1.0 / math.sqrt(dim)
        if rank is None:
            self.weight = nn.Parameter(torch.empty(layers, n, dim, dim).uniform_(-bound, bound))
        else:
            self.u = nn.Parameter(torch.empty(layers, n, dim, rank).uniform_(-bound, bound))
            self.v = nn.Parameter(
                torch.empty(layers, n, rank, dim).uniform_(-1.0 / math.sqrt(rank), 1.0 / math.sqrt(rank))
            )
        self.bias = nn.Parameter(torch.zeros(layers, n, dim))
        self.layers = layers

    def member_index(self, name: str) -> Tensor:
        """Member ids of parameter ``name``: the stacking axis is 1 (``[layers, n, ...]``)."""
        ids = torch.arange(self.n)
        return ids.view(1, self.n, 1) if name == "bias" else ids.view(1, self.n, 1, 1)

    def forward(self, x0: Tensor) -> Tensor:
        """``x0``: ``[n, B, D]``; returns ``x_L``: ``[n, B, D]``."""
        x = x0
        for layer in range(self.layers):  # depth, not members: every member runs in the same bmm
            bias = self.bias[layer].unsqueeze(1)  # [n, 1, D]
            if self.rank is None:
                wx = torch.baddbmm(bias, x, self.weight[layer])  # [n, B, D]
            else:
                wx = torch.baddbmm(bias, torch.bmm(x, self.u[layer]), self.v[layer])  # [n, B, r] -> [n, B, D]
            x = x0 * wx + x
        return x


class BatchedDCNv2(nn.Module):
    """``n`` DCN-v2 bottoms (cross network and MLP); same contract as :class:`BatchedMLP`."""

    def __init__(
        self,
        n: int,
        in_dim: int,
        hidden: Sequence[int],
        layers: int,
        structure: str = "stacked",
        rank: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.n, self.structure = n, structure
        self.cross = BatchedCrossNetwork(n, in_dim, layers, rank)
        self.mlp = BatchedMLP(n, in_dim, hidden, dropout)
        self.out_dim = self.mlp.out_dim + (in_dim if structure == "parallel" else 0)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``[B, in]`` (shared) or ``[n, B, in]``; returns ``[n, B, out_dim]``."""
        x0 = x.unsqueeze(0).expand(self.n, *x.shape) if x.dim() == 2 else x  # [n, B, in]
        crossed = self.cross(x0)  # [n, B, in]
        if self.structure == "stacked":
            return self.mlp(crossed)  # [n, B, H]
        return torch.cat([crossed, self.mlp(x)], dim=-1)  # [n, B, in + H]


def member_networks(
    options: BottomOptions, n: int, in_dim: int, hidden: Sequence[int], dropout: float
) -> BatchedMLP | BatchedDCNv2:
    """``n`` bottoms of the selected kind as one batched module (``forward([B|n, B, in]) -> [n, B, out_dim]``)."""
    if options.bottom == "dcn_v2":
        return BatchedDCNv2(
            n, in_dim, hidden, options.cross_layers, options.cross_structure, options.cross_rank, dropout
        )
    return BatchedMLP(n, in_dim, hidden, dropout)  # deepfm and din add their parts on the input side


def output_layer(networks: BatchedMLP | BatchedDCNv2) -> BatchedLinear:
    """The output layer of a stack of member networks (a ``BatchedMLP`` or a ``BatchedDCNv2``: its MLP's)."""
    mlp = networks.mlp if isinstance(networks, BatchedDCNv2) else networks
    return mlp.layers[-1]


def expert_stacks(
    options: BottomOptions, hidden: Sequence[int], dropout: float
) -> Callable[[int, int], BatchedMLP | BatchedDCNv2]:
    """How a :class:`~mtrec.nn.mixture.MixtureLayer` builds its experts with this bottom: ``(n, in_dim)``
    to a stack of ``n`` member networks (whatever the bottom's kind; the layer does not ask which)."""

    def build(n: int, in_dim: int) -> BatchedMLP | BatchedDCNv2:
        return member_networks(options, n, in_dim, hidden, dropout)

    return build


# ---- input side: FM term and DIN attention -------------------------------------------


class FMTerm(nn.Module):
    """DeepFM's FM component as features: ``[first-order sum, bi-interaction vector]`` per copy."""

    def __init__(self, layout: FeatureLayout, copies: int) -> None:
        super().__init__()
        fields = [f for f in embedded_fields(layout) if f.kind in ("sparse", "sequence")]
        if not fields:
            raise MtrecError("bottom 'deepfm' needs sparse or sequence features (schema: features[].type)")
        groups: dict[int, list[int]] = {}
        for f in fields:
            groups.setdefault(f.width, []).extend(range(f.start, f.stop))
        self.dims = sorted(groups)
        for d in self.dims:
            self.register_buffer(f"cols_{d}", torch.tensor(groups[d], dtype=torch.long), persistent=False)
        # first order: one scalar weight per category (an embedding of size 1) and per dense value
        scalar = replace(
            layout,
            sparse=[replace(f, embed_dim=1) for f in layout.sparse],
            sequences=[replace(s, embed_dim=1) for s in layout.sequences],
        )
        self.num_categorical = len(layout.sparse) + len(layout.sequences)
        self.first_order = FeatureEmbedding(scalar, copies=copies)
        self.dense_weight = nn.Parameter(torch.zeros(copies, len(layout.dense))) if layout.dense else None
        self.out_dim = 1 + sum(self.dims)

    def member_index(self, name: str) -> Tensor:
        """Member ids (copies) of parameter ``name``."""
        if name.startswith("first_order."):
            return self.first_order.member_index(name.removeprefix("first_order."))
        return torch.arange(self.first_order.copies).view(-1, 1)  # dense_weight [copies, D]

    def forward(self, x: Tensor, batch: TensorTable) -> Tensor:
        """``x``: embedded batch ``[B, c, D]``; returns ``[B, c, 1 + sum of group sizes]``."""
        b, c = x.shape[0], x.shape[1]
        first = self.first_order(batch)[..., : self.num_categorical].sum(-1, keepdim=True)  # [B, c, 1]
        if self.dense_weight is not None:
            first = first + (batch.dense.unsqueeze(1) * self.dense_weight).sum(-1, keepdim=True)  # [B, c, 1]
        parts = [first]
        for d in self.dims:
            v = x.index_select(-1, getattr(self, f"cols_{d}")).view(b, c, -1, d)  # [B, c, F_d, d]
            parts.append(0.5 * (v.sum(2).pow(2) - v.pow(2).sum(2)))  # [B, c, d]
        return torch.cat(parts, dim=-1)


class TargetAttention(nn.Module):
    """DIN attention pooling of each sequence against its target feature, per copy (batched)."""

    def __init__(self, layout: FeatureLayout, copies: int, hidden: Sequence[int]) -> None:
        super().__init__()
        fields = {f.name: f for f in embedded_fields(layout)}
        self.pairs = [(s.name, fields[s.name], fields[s.shares]) for s in layout.sequences if s.shares is not None]
        if not self.pairs:
            raise MtrecError(
                "bottom 'din' needs a sequence feature whose 'vocab:' names a sparse target feature "
                "(schema: features[].type: sequence with features[].vocab); this schema has none"
            )
        self.copies = copies
        # one activation unit per (sequence, target) pair; its copies are the independent networks
        self.units = TypedModuleList[nn.ModuleDict](
            nn.ModuleDict(
                {
                    "mlp": BatchedMLP(copies, 4 * slot.width, hidden),
                    "out": BatchedLinear(copies, hidden[-1] if hidden else 4 * slot.width, 1),
                }
            )
            for _, slot, _ in self.pairs
        )

    def forward(self, x: Tensor, batch: TensorTable, embedding: FeatureEmbedding) -> Tensor:
        """``x``: ``[B, c, D]``; returns it with each sequence's mean replaced by its attention pooling."""
        out = x.clone()
        for (name, slot, target), unit in zip(self.pairs, self.units):
            items = sequence_item_embeddings(embedding, batch, name)  # [B, L, c, d]
            b, length, c, d = items.shape
            v = x[..., target.start : target.stop].unsqueeze(1).expand(b, length, c, d)  # [B, L, c, d]
            feats = torch.cat([items, v, items - v, items * v], dim=-1)  # [B, L, c, 4d]
            feats = feats.permute(2, 0, 1, 3).reshape(c, b * length, 4 * d)  # [c, B*L, 4d]
            score = unit["out"](unit["mlp"](feats)).view(c, b, length)  # [c, B, L]
            score = score * (batch.sequences[name] > 0).unsqueeze(0)  # padding weighs nothing
            pooled = torch.einsum("cbl,blcd->bcd", score, items)  # [B, c, d]
            out[..., slot.start : slot.stop] = pooled
        return out


class BottomInput(nn.Module):
    """The input side of a bottom: DIN rewrites the embedded batch, DeepFM adds the FM term.

    ``forward(emb [B, c, D], batch, embedding) -> (x [B, c, D], extra [B, c, extra_dim] or None)``;
    ``extra`` is concatenated to the member networks' output by the model. For ``mlp`` and
    ``dcn_v2`` it has no parameters and returns its input unchanged.
    """

    def __init__(self, options: BottomOptions, layout: FeatureLayout, copies: int = 1) -> None:
        super().__init__()
        self.kind = options.bottom
        self.fm = FMTerm(layout, copies) if self.kind == "deepfm" else None
        self.din = TargetAttention(layout, copies, options.din_hidden) if self.kind == "din" else None
        self.extra_dim = self.fm.out_dim if self.fm is not None else 0

    @property
    def identity(self) -> bool:
        """Whether :meth:`forward` returns the embedded batch unchanged and no extra term (``mlp``,
        ``dcn_v2``): a model may then skip it and let its first layer embed only what it reads."""
        return self.din is None and self.fm is None

    def forward(self, emb: Tensor, batch: TensorTable, embedding: FeatureEmbedding) -> tuple[Tensor, Tensor | None]:
        x = self.din(emb, batch, embedding) if self.din is not None else emb
        extra = self.fm(x, batch) if self.fm is not None else None
        return x, extra


def with_extra(h: Tensor, extra: Tensor | None) -> Tensor:
    """Concatenate the input-side term ``extra`` (``[B, E]`` or ``[n, B, E]``) to ``h`` (``[n, B, H]``)."""
    if extra is None:
        return h
    if extra.dim() == 2:
        extra = extra.unsqueeze(0).expand(h.shape[0], *extra.shape)  # [n, B, E]
    return torch.cat([h, extra], dim=-1)  # [n, B, H + E]
