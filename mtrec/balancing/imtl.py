"""IMTL: impartial multi-task learning (Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021).

IMTL-G finds the combination ``g = sum_t a_t g_t`` (with ``sum_t a_t = 1``) whose projections
onto every task gradient's direction are equal, ``g . u_1 = g . u_t`` with ``u_t = g_t / ||g_t||``,
so no task is favoured because of its gradient's size. Closed form (``D`` rows ``g_1 - g_t``,
``U`` rows ``u_1 - u_t``, ``t = 2..T``): ``a_{2:T} = g_1 U^T (D U^T)^{-1}``, ``a_1 = 1 - sum a_{2:T}``.
Every product there is an inner product of task gradients, so it is computed on the Gram matrix.

``hybrid=true`` adds IMTL-L, the paper's loss-level half: each loss is scaled by ``e^{s_t}`` with a
learnable ``s_t`` trained on ``e^{s_t} L_t - s_t`` (which drives every scaled loss towards 1).

``--task-weights`` are refused rather than dropped: the direction of IMTL-G's update does not
depend on the size of any task's gradient (a constant factor on a task's loss would only change
the update's length, for every task at once), and IMTL-L learns each loss's scale itself,
absorbing any constant factor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from mtrec.balancing.base import BALANCERS
from mtrec.balancing.gradient import GradientBalancer, GradientOptions, on_live_tasks


def imtl_weights(M: np.ndarray) -> np.ndarray:
    """IMTL-G coefficients ``a [T]`` (summing to 1) from the Gram matrix of the task gradients."""
    T = M.shape[0]
    if T == 1:
        return np.ones(1)
    norms = np.sqrt(np.clip(np.diag(M), 1e-30, None))
    K = M / norms[None, :]  # K[a, b] = g_a . u_b
    a = K[0, 0] - K[0, 1:]  # g_1 . (u_1 - u_t), t = 2..T
    DU = K[0, 0] - K[0, 1:][None, :] - K[1:, 0][:, None] + K[1:, 1:]  # (g_1 - g_i) . (u_1 - u_j)
    try:
        rest = np.linalg.solve(DU.T, a)
    except np.linalg.LinAlgError:
        rest = np.linalg.lstsq(DU.T, a, rcond=None)[0]
    return np.concatenate([[1.0 - rest.sum()], rest])


@BALANCERS.register(
    "imtl", "IMTL-G: equal projection of the update on every task gradient's direction (Liu et al. 2021)"
)
class IMTL(GradientBalancer):
    """IMTL-G; ``hybrid=true`` for IMTL (loss scaling IMTL-L plus IMTL-G)."""

    class Config(GradientOptions):
        hybrid: bool = False

        no_task_weights: ClassVar[str] = (
            "IMTL-G's update direction is the same whatever the size of each "
            "task's gradient, and IMTL-L learns each loss's scale itself"
        )

    config: Config

    def __init__(self, task_names: Sequence[str], task_weights: Sequence[float] | None = None, **options: Any) -> None:
        super().__init__(task_names, task_weights, **options)
        self.hybrid = self.config.hybrid
        if self.hybrid:
            self.log_scale = nn.Parameter(torch.zeros(self.num_tasks))

    def task_losses(self, losses: Tensor) -> Tensor:
        if not self.hybrid:
            return losses
        scale = self.log_scale.detach().exp().to(losses.dtype)
        # d/ds (e^s L - s) = e^s L - 1, set directly: the trainer's optimiser steps s with the model
        self.log_scale.grad = (scale * losses.detach() - 1).to(self.log_scale.dtype)
        return losses * scale

    def coefficients(self, M: np.ndarray, losses: np.ndarray) -> np.ndarray:
        return on_live_tasks(M, imtl_weights)
