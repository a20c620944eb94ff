"""Nash-MTL: multi-task learning as a bargaining game (Navon et al., ICML 2022).

The update ``g = sum_t a_t g_t`` is the Nash bargaining solution: it maximises
``sum_t w_t log(g_t . g)`` within a ball, which comes down to ``a > 0`` with
``(G G^T a)_t = w_t / a_t`` for every task (``w``: ``--task-weights``, default 1). Each task's
improvement ``g_t . g`` is then ``w_t / a_t``, and scaling a task's gradient by ``k`` only
divides its ``a_t`` by ``k``: the update does not depend on the losses' scales.

The paper reaches ``a`` through a sequence of convex programs solved with cvxpy. Here the
system is the stationarity condition of the strictly convex ``F(a) = a^T M a / 2 - sum_t w_t log a_t``
on ``a > 0``, solved with a damped Newton method on the ``T x T`` Gram matrix (a few iterations,
no solver dependency). A tiny ridge keeps ``F`` bounded when the gradients can cancel exactly.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from mtrec.balancing.base import BALANCERS
from mtrec.balancing.gradient import GradientBalancer

RIDGE = 1e-8  # relative to each task's own squared gradient norm, so scaling a task leaves it invariant


def nash_weights(M: np.ndarray, w: np.ndarray | None = None, tol: float = 1e-14, max_iter: int = 100) -> np.ndarray:
    """``a [T] >= 0`` with ``(M a)_t = w_t / a_t`` on the tasks whose gradient is not zero (0 elsewhere)."""
    T = M.shape[0]
    w = np.ones(T) if w is None else np.asarray(w, dtype=np.float64)
    diag = np.diag(M)
    live = (diag > 1e-20 * max(float(diag.max()), 1e-300)) & (w > 0)
    out = np.zeros(T)
    if not live.any():
        return out
    A = M[np.ix_(live, live)]
    A = A + RIDGE * np.diag(np.diag(A))
    wl = w[live]
    a = np.sqrt(wl / np.diag(A))  # exact when the gradients are orthogonal

    def f(x: np.ndarray) -> float:
        return 0.5 * float(x @ A @ x) - float(wl @ np.log(x))

    fa = f(a)
    for _ in range(max_iter):
        grad = A @ a - wl / a
        hess = A + np.diag(wl / a**2)
        step = -np.linalg.solve(hess, grad)
        decrement = -float(grad @ step)
        if decrement <= tol * max(1.0, abs(fa)):
            break
        t = 1.0
        neg = step < 0
        if neg.any():
            t = min(1.0, 0.99 * float(np.min(-a[neg] / step[neg])))  # stay inside a > 0
        while True:
            cand = a + t * step
            fc = f(cand)
            if fc <= fa - 0.25 * t * decrement or t < 1e-12:
                break
            t *= 0.5
        a, fa = cand, fc
    out[live] = a
    return out


@BALANCERS.register("nash_mtl", "Nash-MTL: Nash bargaining solution among the task gradients (Navon et al. 2022)")
class NashMTL(GradientBalancer):
    """Nash-MTL; ``--task-weights`` become the bargaining weights ``w_t``."""

    def task_losses(self, losses: Tensor) -> Tensor:  # the weights enter the bargaining, not the gradients
        return losses

    def coefficients(self, M: np.ndarray, losses: np.ndarray) -> np.ndarray:
        return nash_weights(M, self.base.cpu().numpy())
