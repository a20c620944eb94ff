"""Aligned-MTL (Senushkin et al., "Independent Component Alignment for Multi-Task Learning", CVPR 2023).

Conflicts and dominance among task gradients show as a badly conditioned gradient system. With
``G G^T = V diag(lambda) V^T``, Aligned-MTL replaces ``G`` by ``B G`` with
``B = sqrt(lambda_min) V diag(lambda)^{-1/2} V^T``: the aligned task gradients are orthogonal
and all of norm ``sqrt(lambda_min)`` (condition number 1), and the update is ``(B G)^T w`` for the
task weights ``w`` (``--task-weights``, default 1). ``level=repr`` gives the paper's Aligned-MTL-UB.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from mtrec.balancing.base import BALANCERS
from mtrec.balancing.gradient import GradientBalancer

RANK_TOL = 1e-10  # eigenvalues below this fraction of the largest count as zero


def aligned_matrix(M: np.ndarray) -> np.ndarray:
    """``B [T, T]`` such that the rows of ``B G`` are orthogonal with equal norm ``sqrt(lambda_min)``."""
    lam, V = np.linalg.eigh(M)
    keep = lam > RANK_TOL * max(float(lam.max()), 0.0)
    if not keep.any():
        return np.zeros_like(M)
    lam, V = lam[keep], V[:, keep]
    return np.sqrt(lam.min()) * (V / np.sqrt(lam)) @ V.T


@BALANCERS.register(
    "aligned_mtl", "Aligned-MTL: align task gradients to an orthogonal, equal-norm system (Senushkin et al. 2023)"
)
class AlignedMTL(GradientBalancer):
    """Aligned-MTL; ``--task-weights`` weight the aligned gradients."""

    def task_losses(
        self, losses: Tensor
    ) -> Tensor:  # alignment removes any scaling of the gradients: weights apply after it
        return losses

    def coefficients(self, M: np.ndarray, losses: np.ndarray) -> np.ndarray:
        return aligned_matrix(M).T @ self.base.cpu().numpy()
