"""Encoded data in memory: contiguous tensors, the feature layout, and batches.

A :class:`TensorTable` holds every column of one split as one tensor per kind
(all sparse ids in one ``[N, F]`` tensor, all dense values in one ``[N, D]``
tensor; those of a store are memory-mapped). A batch is the same type: a slice
of those tensors, or in a shuffled epoch one gather per tensor of the batch's
rows of a permutation, so there is no per-row ``__getitem__`` anywhere and the
table is never copied whole.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor


@dataclass
class SparseField:
    name: str
    vocab_size: int  # including the reserved ids 0 (padding) and 1 (out of vocabulary)
    embed_dim: int


@dataclass
class SequenceField:
    name: str
    vocab_size: int
    embed_dim: int
    max_len: int
    shares: str | None = None  # sparse feature whose embedding rows this sequence uses


@dataclass
class TaskField:
    name: str
    type: str  # "binary" or "regression"
    space: str | None = None
    weight: float = 1.0
    # regression: train mean/std of the label; training compares outputs with (label - mean) / std,
    # predictions are output * std + mean (0 and 1 when not standardised, and for binary tasks)
    label_mean: float = 0.0
    label_std: float = 1.0


@dataclass
class FeatureLayout:
    """What a model needs to know about the data: the serialisable feature map."""

    sparse: list[SparseField]
    dense: list[str]
    sequences: list[SequenceField]
    tasks: list[TaskField]

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def task_index(self, name: str) -> int:
        return self.task_names.index(name)

    def space_ancestors(self, t: int) -> list[int]:
        """Indices of the tasks whose spaces contain task ``t``, nearest first: its space's task, that
        task's space's, ... (the funnel above a CVR task; the schema has refused cycles)."""
        names, chain = self.task_names, []
        up = self.tasks[t].space
        while up is not None and names.index(up) not in chain and names.index(up) != t:
            chain.append(names.index(up))
            up = self.tasks[chain[-1]].space
        return chain

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> FeatureLayout:
        return cls(
            sparse=[SparseField(**d) for d in data["sparse"]],
            dense=list(data["dense"]),
            sequences=[SequenceField(**d) for d in data["sequences"]],
            tasks=[TaskField(**d) for d in data["tasks"]],
        )


@dataclass
class TensorTable:
    """One split (or one batch) of encoded data; row ``i`` of every tensor is sample ``i``."""

    sparse: Tensor  # [N, F_sparse] int64, 0 = padding, 1 = out of vocabulary
    dense: Tensor  # [N, F_dense] float32, standardised
    labels: Tensor  # [N, T] float32 (zeros where a table has no labels)
    sequences: dict[str, Tensor] = field(default_factory=dict)  # name -> [N, L] int64, 0 = padding
    weight: Tensor | None = None  # [N, T] float32 per-sample, per-task loss weight
    user: Tensor | None = None  # [N] int64 user index, for grouped metrics

    def __len__(self) -> int:
        return self.labels.shape[0]

    def _map(self, fn: Callable[[Tensor], Tensor]) -> TensorTable:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                out[f.name] = None
            elif isinstance(value, dict):
                out[f.name] = {k: fn(v) for k, v in value.items()}
            else:
                out[f.name] = fn(value)
        return replace(self, **out)

    def slice(self, start: int, stop: int) -> TensorTable:
        """Rows ``start:stop`` as views (no copy)."""
        return self._map(lambda t: t[start:stop])

    def take(self, index: Tensor) -> TensorTable:
        """Rows at ``index`` (one gather per tensor)."""
        return self._map(lambda t: t.index_select(0, index))

    def to(self, device: torch.device | str) -> TensorTable:
        return self._map(lambda t: t.to(device))


def iterate_batches(
    table: TensorTable,
    batch_size: int,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[TensorTable]:
    """Yield batches: contiguous slices (views), or when ``shuffle`` one permutation per call and each
    batch gathered from its slice of it. The table itself is never copied (it may be memory-mapped and
    larger than RAM); batch ``k`` holds rows ``perm[k*B:(k+1)*B]``, the batches a gather of the whole
    permuted table followed by slicing gave before."""
    n = len(table)
    perm = torch.randperm(n, generator=generator) if shuffle else None
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        end = min(start + batch_size, n)
        yield table.slice(start, end) if perm is None else table.take(perm[start:end])
