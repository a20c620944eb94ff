"""MGDA: multiple-gradient descent (Sener and Koltun, "Multi-Task Learning as Multi-Objective
Optimization", NeurIPS 2018).

The update is the point of minimum norm in the convex hull of the task gradients,
``min_{a in simplex} ||sum_t a_t g_t||``: a direction that decreases every task loss (or zero
at a Pareto-stationary point). With ``level=repr`` the gradients are taken with respect to the
shared representation instead of the shared parameters, which is the paper's MGDA-UB (an upper
bound of the same objective that needs a single backward pass through the shared layers).

The min-norm point is found exactly with Wolfe's algorithm (Wolfe, "Finding the nearest point
in a polytope", Math. Programming 1976) on the ``T x T`` Gram matrix: it terminates after
finitely many affine solves, where the Frank-Wolfe iterations of the paper only converge.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from pydantic import model_validator

from mtrec.balancing.base import BALANCERS
from mtrec.balancing.gradient import GradientBalancer, GradientConfig, on_live_tasks


def _affine_minimizer(M: np.ndarray) -> np.ndarray:
    """Weights ``mu`` (summing to 1) of the min-norm point of the affine hull of the points with Gram ``M``."""
    k = M.shape[0]
    kkt = np.zeros((k + 1, k + 1))
    kkt[:k, :k] = M
    kkt[:k, k] = 1.0
    kkt[k, :k] = 1.0
    rhs = np.zeros(k + 1)
    rhs[k] = 1.0
    try:
        sol = np.linalg.solve(kkt, rhs)
    except np.linalg.LinAlgError:
        sol = np.linalg.lstsq(kkt, rhs, rcond=None)[0]
    return sol[:k]


def min_norm_weights(M: np.ndarray, tol: float = 1e-12, max_iter: int = 1000) -> np.ndarray:
    """Simplex weights ``a [T]`` of the min-norm point of the convex hull of vectors with Gram matrix ``M``."""
    T = M.shape[0]
    scale = max(float(np.max(np.diag(M))), 1e-300)
    S = [int(np.argmin(np.diag(M)))]
    lam = np.ones(1)
    for _ in range(max_iter):
        full = np.zeros(T)
        full[S] = lam
        Mx = M @ full  # p_i . x for every point i
        xx = float(full @ Mx)
        j = int(np.argmin(Mx))
        if xx - Mx[j] <= tol * scale or j in S:
            break  # no point lies further down along -x: x is the min-norm point
        S.append(j)
        lam = np.append(lam, 0.0)
        while True:  # minor cycle: move to the affine minimiser of the corral, dropping points as needed
            mu = _affine_minimizer(M[np.ix_(S, S)])
            if np.all(mu > 1e-15):
                lam = mu
                break
            down = mu <= 1e-15
            theta = float(np.min(lam[down] / (lam[down] - mu[down])))
            lam = lam + theta * (mu - lam)
            keep = lam > 1e-15
            S = [s for s, k in zip(S, keep) if k]
            lam = lam[keep]
            lam = lam / lam.sum()
    out = np.zeros(T)
    out[S] = lam
    return out


@BALANCERS.register(
    "mgda", "MGDA: min-norm point of the task gradients' convex hull; level=repr for MGDA-UB (Sener & Koltun 2018)"
)
class MGDA(GradientBalancer):
    """Option ``normalize``: ``none`` (default), ``l2`` (unit gradients), ``loss`` (divide by the loss)
    or ``loss+`` (both), the normalisations of the paper's code; the weights then apply to the
    normalised gradients, and the logged weights are on the raw ones.

    ``--task-weights`` scale the task losses, hence their gradients, before the min-norm point is
    found. ``l2`` and ``loss+`` rescale every gradient to unit norm, which cancels any such scale,
    so those two refuse ``--task-weights`` instead of dropping them."""

    class Config(GradientConfig):
        normalize: Literal["none", "l2", "loss", "loss+"] = "none"

        @model_validator(mode="after")
        def _weights_survive(self) -> MGDA.Config:
            if self.task_weights is not None and self.normalize in ("l2", "loss+"):
                raise ValueError(
                    f"normalize={self.normalize} scales every task gradient to unit norm, "
                    "which cancels --task-weights: drop them or use normalize=none|loss"
                )
            return self

    config: Config

    def __init__(self, task_names: Sequence[str], task_weights: Sequence[float] | None = None, **options: Any) -> None:
        super().__init__(task_names, task_weights, **options)
        self.normalize = self.config.normalize

    def coefficients(self, M: np.ndarray, losses: np.ndarray) -> np.ndarray:
        scale = np.ones(self.num_tasks)
        norms = np.sqrt(np.clip(np.diag(M), 1e-30, None))
        if self.normalize in ("l2", "loss+"):
            scale = scale / norms
        if self.normalize in ("loss", "loss+"):
            scale = scale / np.clip(losses, 1e-12, None)
        return on_live_tasks(M * np.outer(scale, scale), min_norm_weights) * scale
