"""PCGrad: projecting conflicting gradients (Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020).

For each task ``i``, in a random order over the other tasks ``j``: when ``g_i . g_j < 0``,
remove from ``g_i`` its component along ``g_j`` (project it onto the normal plane of ``g_j``);
the update is the sum of the adjusted gradients. Every adjusted gradient is a combination
of the original ones, so the surgery is tracked as a ``[T, T]`` coefficient matrix on the
Gram matrix instead of on ``P``-sized vectors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from mtrec.balancing.base import BALANCERS
from mtrec.balancing.gradient import GradientBalancer


def pcgrad_adjust(M: np.ndarray, orders: Sequence[Sequence[int]]) -> np.ndarray:
    """Coefficients ``A [T, T]`` of the adjusted gradients: ``g_i^PC = sum_k A[i, k] g_k``.

    ``M`` is the Gram matrix of the task gradients, ``orders[i]`` the other tasks in the order
    task ``i`` is projected against them.
    """
    T = M.shape[0]
    A = np.eye(T)
    for i in range(T):
        a = A[i]
        for j in orders[i]:
            dot = a @ M[:, j]  # g_i^PC . g_j
            if dot < 0 and M[j, j] > 0:
                a[j] -= dot / M[j, j]
    return A


@BALANCERS.register("pcgrad", "PCGrad: project each task gradient off the gradients it conflicts with (Yu et al. 2020)")
class PCGrad(GradientBalancer):
    """Gradient surgery with a random projection order per task and step (seeded by the run's seed)."""

    def __init__(self, task_names: Sequence[str], task_weights: Sequence[float] | None = None, **options: Any) -> None:
        super().__init__(task_names, task_weights, **options)
        self._rng = np.random.default_rng(torch.initial_seed())

    def random_orders(self) -> list[list[int]]:
        T = self.num_tasks
        return [[int(j) for j in self._rng.permutation(T) if j != i] for i in range(T)]

    def coefficients(self, M: np.ndarray, losses: np.ndarray) -> np.ndarray:
        return pcgrad_adjust(M, self.random_orders()).sum(0)
