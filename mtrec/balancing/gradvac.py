"""Gradient Vaccine (Wang et al., "Gradient Vaccine: Investigating and Improving Multi-task
Optimization in Massively Multilingual Models", ICLR 2021).

PCGrad only acts when two gradients conflict (negative cosine). GradVac keeps, per ordered
task pair, an exponential moving average ``phi_hat_ij`` of their observed cosine, and whenever
the current cosine ``phi_ij`` falls below that target it adds the multiple of ``g_j`` to
``g_i`` that raises their cosine exactly to ``phi_hat_ij``:

    g_i += ||g_i|| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2)) / (||g_j|| sqrt(1 - phi_hat^2)) g_j

then ``phi_hat_ij <- (1 - beta) phi_hat_ij + beta phi_ij``. Applied to the whole shared
gradient (the paper's coarsest granularity), tracked as coefficients on the Gram matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pydantic import Field

from mtrec.balancing.base import BALANCERS
from mtrec.balancing.gradient import GradientBalancer, GradientConfig


def gradvac_adjust(
    M: np.ndarray, targets: np.ndarray, orders: Sequence[Sequence[int]], beta: float
) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients ``A [T, T]`` of the vaccinated gradients and the updated EMA targets ``[T, T]``."""
    T = M.shape[0]
    A = np.eye(T)
    new = targets.copy()
    for i in range(T):
        a = A[i]
        for j in orders[i]:
            norm_i = np.sqrt(max(a @ M @ a, 0.0))
            norm_j = np.sqrt(max(M[j, j], 0.0))
            if norm_i == 0 or norm_j == 0:
                continue
            phi = float(np.clip((a @ M[:, j]) / (norm_i * norm_j), -1.0, 1.0))
            target = float(targets[i, j])
            if phi < target:
                a[j] += (
                    norm_i
                    * (target * np.sqrt(1 - phi**2) - phi * np.sqrt(1 - target**2))
                    / (norm_j * np.sqrt(max(1 - target**2, 1e-12)))
                )
            new[i, j] = (1 - beta) * target + beta * phi
    return A, new


@BALANCERS.register("gradvac", "GradVac: raise each pair's gradient cosine to its running average (Wang et al. 2021)")
class GradVac(GradientBalancer):
    """Gradient Vaccine; option ``beta`` (EMA rate of the target cosines, default 0.01 as in the paper)."""

    class Config(GradientConfig):
        beta: float = Field(0.01, gt=0.0, le=1.0, allow_inf_nan=False)

    config: Config

    # buffers (register_buffer), declared for the type checker
    targets: torch.Tensor

    def __init__(self, task_names: Sequence[str], task_weights: Sequence[float] | None = None, **options: Any) -> None:
        super().__init__(task_names, task_weights, **options)
        self.beta = self.config.beta
        self.register_buffer("targets", torch.zeros(self.num_tasks, self.num_tasks, dtype=torch.float64))
        self._rng = np.random.default_rng(torch.initial_seed())

    def coefficients(self, M: np.ndarray, losses: np.ndarray) -> np.ndarray:
        T = self.num_tasks
        orders = [[int(j) for j in self._rng.permutation(T) if j != i] for i in range(T)]
        A, new = gradvac_adjust(M, self.targets.cpu().numpy(), orders, self.beta)
        self.targets.copy_(torch.from_numpy(new))
        return A.sum(0)
