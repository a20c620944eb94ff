"""Stacks of independent layers computed as one batched matrix product.

``BatchedMLP(n, ...)`` holds ``n`` MLPs of the same shape as stacked weights
``[n, in, out]``. The input is either shared by all of them (``[B, in]``:
the first layer is then a single ``[B, in] x [in, n*out]`` GEMM) or one input
per member (``[n, B, in]``: a ``bmm``). Experts of a mixture layer, the
towers of all tasks, and the per-task networks of ``single_task`` are all
such stacks: no Python loop over members anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mtrec.nn.typed import TypedModuleList


class BatchedLinear(nn.Module):
    """``n`` independent linear maps ``in -> out``."""

    def __init__(self, n: int, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.n, self.in_dim, self.out_dim = n, in_dim, out_dim
        self.weight = nn.Parameter(torch.empty(n, in_dim, out_dim))
        self.bias = nn.Parameter(torch.empty(n, out_dim))
        bound = 1.0 / math.sqrt(in_dim)  # the nn.Linear default, per member
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``[B, in]`` (shared) or ``[n, B, in]``; returns ``[n, B, out]``."""
        if x.dim() == 2:
            y = torch.addmm(self.bias.reshape(-1), x, self.shared_weight())  # [B, n*out]
            return self.split_members(y)  # [n, B, out]
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight)  # [n, B, out]

    def member_index(self, name: str) -> Tensor:
        """Member ids of parameter ``name`` (broadcastable to it): the stacking axis is 0."""
        ids = torch.arange(self.n)
        return ids.view(self.n, 1, 1) if name == "weight" else ids.view(self.n, 1)

    def shared_weight(self) -> Tensor:
        """All members side by side, for an input they share: ``[in, n*out]`` (member-major columns)."""
        return self.weight.transpose(0, 1).reshape(self.in_dim, self.n * self.out_dim)

    def split_members(self, y: Tensor) -> Tensor:
        """``[B, n*out]`` (columns as in :meth:`shared_weight`) -> ``[n, B, out]`` (a view)."""
        return y.view(y.shape[0], self.n, self.out_dim).transpose(0, 1)

    def member(self, i: int) -> nn.Linear:
        """Member ``i`` as a plain ``nn.Linear`` (a copy), for checks and export."""
        lin = nn.Linear(self.in_dim, self.out_dim)
        with torch.no_grad():
            lin.weight.copy_(self.weight[i].T)
            lin.bias.copy_(self.bias[i])
        return lin


class BatchedMLP(nn.Module):
    """``n`` independent MLPs with hidden sizes ``hidden``; ReLU and dropout after every layer."""

    def __init__(self, n: int, in_dim: int, hidden: Sequence[int], dropout: float = 0.0) -> None:
        super().__init__()
        if not hidden:
            raise ValueError("BatchedMLP needs at least one hidden size")
        dims = [in_dim, *hidden]
        self.layers = TypedModuleList[BatchedLinear](BatchedLinear(n, a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.n = n
        self.out_dim = dims[-1]

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``[B, in]`` or ``[n, B, in]``; returns ``[n, B, hidden[-1]]``."""
        return self.forward_from_first(self.layers[0](x))

    def forward_from_first(self, pre: Tensor) -> Tensor:
        """The MLP after its first linear map: ``pre`` ``[n, B, hidden[0]]`` is that map's output.

        Lets a caller compute the first layer itself (e.g. fused with other maps of the same input).
        """
        x = self.dropout(torch.relu(pre))
        for layer in self.layers[1:]:
            x = self.dropout(torch.relu(layer(x)))
        return x

    @property
    def last_layer(self) -> BatchedLinear:
        return self.layers[-1]


class Towers(nn.Module):
    """One tower per task (MLP then a scalar output), all tasks in one batched pass."""

    def __init__(self, num_tasks: int, in_dim: int, hidden: Sequence[int], dropout: float = 0.0) -> None:
        super().__init__()
        self.mlp = BatchedMLP(num_tasks, in_dim, hidden, dropout) if hidden else None
        self.out = BatchedLinear(num_tasks, hidden[-1] if hidden else in_dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``[B, in]`` shared or ``[T, B, in]`` per task; returns logits ``[B, T]``."""
        if self.mlp is not None:
            x = self.mlp(x)
        return self.out(x).squeeze(-1).transpose(0, 1)  # [T, B, 1] -> [B, T]
