"""Cross-stitch networks (Misra et al., CVPR 2016) and sluice networks (Ruder et al., AAAI 2019).

Both keep one network per task and learn, after every layer, how much each task's
activations borrow from the others'. All task networks are one ``BatchedMLP``
(stacked weights ``[T, in, out]``), walked layer by layer so the mixing can sit
between layers; the mixing itself is one ``einsum`` per layer.

Cross-stitch: after layer ``l``, task ``t`` continues with ``sum_s a^l_{ts} h^l_s``;
``a^l`` is a learned ``T x T`` matrix, initialised near the identity
(``a_tt = 0.9``, the rest ``0.1 / (T - 1)``, the paper's choice for two tasks),
so training starts close to independent networks and learns to share.

Sluice: each layer's output is split into ``m`` subspaces; ``alpha^l`` is a
``(T m) x (T m)`` matrix mixing every (task, subspace) pair with every other, so
the model can share one subspace and keep another private. Each tower reads
``sum_l beta_{t,l} h^l_t``, a learned mixture of the task's layer outputs (the
paper's hierarchical skip connections; all layers have the same width for this).
The paper also pushes the subspaces of a layer apart with
``sum ||G_1^T G_2||_F^2``; here ``G`` is the batch of a subspace's activations and
the product is divided by the batch size so the weight does not depend on it.
That penalty is ``ModelOutput.aux_loss``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from mtrec.data.tables import FeatureLayout, TensorTable
from mtrec.models.base import MODELS, ModelConfig, ModelOutput, MultiTaskModel
from mtrec.models.reach import Sharing
from mtrec.nn.batched import BatchedMLP, Towers
from mtrec.nn.embedding import FeatureEmbedding


class MixingWeights(nn.Module):
    """A learned tensor of mixing weights (a module, so the model reads as a tree of parts)."""

    def __init__(self, initial: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(initial.contiguous().clone())


def near_identity(n: int, self_weight: float) -> Tensor:
    """``[n, n]``: ``self_weight`` on the diagonal, the rest of each row spread evenly (rows sum to 1)."""
    if n == 1:
        return torch.ones(1, 1)
    off = (1.0 - self_weight) / (n - 1)
    return torch.full((n, n), off) + (self_weight - off) * torch.eye(n)


def last_layer_rows(layers: int, tasks: int, rows_per_task: int) -> Tensor:
    """Member ids ``[L, tasks * rows_per_task, 1]`` of a stack of mixing matrices: 0 (shared) below the
    last layer, ``1 + t`` for the last layer's rows of task ``t``."""
    ids = torch.zeros(layers, tasks * rows_per_task, 1, dtype=torch.long)
    ids[-1, :, 0] = 1 + torch.arange(tasks).repeat_interleave(rows_per_task)
    return ids


def last_layer_owners(tasks: int) -> list:
    """Owners for :func:`last_layer_rows`: every task, then one task per member."""
    return [None] + [[t] for t in range(tasks)]


class CrossStitchConfig(ModelConfig):
    hidden: list[int] = Field(default_factory=lambda: [256, 128])  # each task's network, as single_task's bottoms
    # Initial weight of a task on its own activations (Misra et al. use 0.9 / 0.1 for two tasks).
    # They also raise the stitches' learning rate 100-1000x; the trainer owns the optimiser, so
    # here the stitches learn at the common rate.
    stitch_self: float = Field(0.9, ge=0.0, le=1.0)


@MODELS.register(
    "cross_stitch",
    "one network per task, activations mixed after every layer by learned T x T stitches (Misra et al. 2016)",
)
class CrossStitch(MultiTaskModel):
    """``h^{l}_t = relu(W^l_t h~^{l-1}_t + b^l_t)``, ``h~^l = a^l h^l`` across tasks; towers read ``h~^L``."""

    Config: ClassVar[type[ModelConfig]] = CrossStitchConfig
    config: CrossStitchConfig

    def __init__(self, layout: FeatureLayout, config: CrossStitchConfig) -> None:
        super().__init__(layout, config)
        t = self.num_tasks
        self.embedding = FeatureEmbedding(layout)
        self.nets = BatchedMLP(t, self.embedding.output_dim, config.hidden, config.dropout)
        init = near_identity(t, config.stitch_self)
        self.stitches = MixingWeights(init.expand(len(config.hidden), t, t))  # [L, T, T]
        self.towers = Towers(t, self.nets.out_dim, config.tower_hidden, config.dropout)

    def declare_sharing(self, s: Sharing) -> None:
        """The stitches carry every task's gradient into every network, except the last stitch: its row
        ``t`` mixes what tower ``t`` alone reads."""
        s.reach(self.embedding).reach(self.nets).per_task(self.towers).last_layer(self.nets.last_layer)
        s.elements(
            self.stitches.weight,
            last_layer_rows(self.stitches.weight.shape[0], self.num_tasks, 1),
            last_layer_owners(self.num_tasks),
        )

    def forward(self, batch: TensorTable, return_gates: bool = False) -> ModelOutput:
        h: Tensor = self.embedding(batch).squeeze(1)  # [B, D], read by every task's first layer
        for layer, stitch in zip(self.nets.layers, self.stitches.weight):
            h = self.nets.dropout(torch.relu(layer(h)))  # [T, B, H_l]
            h = torch.einsum("ts,sbh->tbh", stitch, h)  # [T, B, H_l]
        return ModelOutput(logits=self.towers(h), shared=h)


class SluiceConfig(ModelConfig):
    hidden: int = Field(128, ge=1)  # width of every layer (the betas add layer outputs, so widths match)
    num_layers: int = Field(3, ge=1)  # the paper's networks have three layers
    subspaces: int = Field(2, ge=1)  # per layer; the paper uses two (one tends to be shared, one private)
    alpha_self: float = Field(0.9, ge=0.0, le=1.0)  # initial weight of a subspace on itself, as cross_stitch
    # Weight of the subspace orthogonality penalty (batch-normalised, see the module docstring).
    # Small: ReLU activations are non-negative, so the penalty is met only by units firing on
    # different samples, and a strong push would starve units rather than separate subspaces.
    orthogonality: float = Field(1e-3, ge=0.0)

    @model_validator(mode="after")
    def _subspaces_divide_width(self) -> SluiceConfig:
        if self.hidden % self.subspaces:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of subspaces ({self.subspaces})")
        return self


@MODELS.register(
    "sluice",
    "per-task networks split into subspaces mixed by learned alphas, towers mix layers by betas (Ruder et al. 2019)",
)
class Sluice(MultiTaskModel):
    """Sluice network: alpha ``[L, T m, T m]`` mixes (task, subspace) blocks per layer; beta ``[T, L]`` feeds the towers."""

    Config: ClassVar[type[ModelConfig]] = SluiceConfig
    config: SluiceConfig

    def __init__(self, layout: FeatureLayout, config: SluiceConfig) -> None:
        super().__init__(layout, config)
        t, m, n_layers = self.num_tasks, config.subspaces, config.num_layers
        self.embedding = FeatureEmbedding(layout)
        self.nets = BatchedMLP(t, self.embedding.output_dim, [config.hidden] * n_layers, config.dropout)
        init = near_identity(t * m, config.alpha_self)
        self.alphas = MixingWeights(init.expand(n_layers, t * m, t * m))  # [L, T*m, T*m]
        self.betas = MixingWeights(torch.full((t, n_layers), 1.0 / n_layers))  # [T, L], start from the layer mean
        self.towers = Towers(t, config.hidden, config.tower_hidden, config.dropout)

    def orthogonality_penalty(self, h: Tensor) -> Tensor:
        """``sum_t sum_{i<j} ||G_{t,i}^T G_{t,j} / B||_F^2`` for one layer's output ``h`` ``[T, B, H]``."""
        t, b, width = h.shape
        m = self.config.subspaces
        g = h.view(t, b, m, width // m)  # [T, B, m, k]
        cross = torch.einsum("tbik,tbjl->tijkl", g, g) / b  # [T, m, m, k, k]
        off = ~torch.eye(m, dtype=torch.bool, device=h.device)
        return cross[:, off].pow(2).sum() / 2  # each unordered pair appears twice

    def declare_sharing(self, s: Sharing) -> None:
        """As cross-stitch: the last alpha's rows of task ``t``'s subspaces, the betas' row ``t`` and the
        towers reach task ``t`` only; everything below the last mixing reaches every task."""
        t, m = self.num_tasks, self.config.subspaces
        s.reach(self.embedding).reach(self.nets).per_task(self.towers).last_layer(self.nets.last_layer)
        s.elements(self.alphas.weight, last_layer_rows(self.alphas.weight.shape[0], t, m), last_layer_owners(t))
        s.elements(self.betas.weight, torch.arange(t).view(t, 1), [[i] for i in range(t)])

    def forward(self, batch: TensorTable, return_gates: bool = False) -> ModelOutput:
        t, m = self.num_tasks, self.config.subspaces
        h: Tensor = self.embedding(batch).squeeze(1)  # [B, D]
        b = h.shape[0]
        k = self.config.hidden // m
        outputs = []
        ortho = h.new_zeros(())
        for layer, alpha in zip(self.nets.layers, self.alphas.weight):
            h = self.nets.dropout(torch.relu(layer(h)))  # [T, B, H]
            if self.config.orthogonality > 0 and m > 1:
                ortho = ortho + self.orthogonality_penalty(h)
            blocks = h.view(t, b, m, k).permute(0, 2, 1, 3).reshape(t * m, b, k)  # [T*m, B, k]
            blocks = torch.einsum("pq,qbk->pbk", alpha, blocks)  # [T*m, B, k]
            h = blocks.view(t, m, b, k).permute(0, 2, 1, 3).reshape(t, b, m * k)  # [T, B, H]
            outputs.append(h)
        stacked = torch.stack(outputs)  # [L, T, B, H]
        top = torch.einsum("tl,ltbh->tbh", self.betas.weight, stacked)  # [T, B, H]
        aux = self.config.orthogonality * ortho if self.config.orthogonality > 0 and m > 1 else None
        return ModelOutput(logits=self.towers(top), shared=h, aux_loss=aux)
