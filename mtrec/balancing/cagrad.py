"""CAGrad: conflict-averse gradient descent (Liu et al., "Conflict-Averse Gradient Descent for
Multi-task Learning", NeurIPS 2021).

Among the updates ``d`` within distance ``c ||g0||`` of the average gradient ``g0``, take the one
that maximises the worst task's improvement ``min_i g_i . d``. Its dual is a ``T``-dimensional
problem on the simplex,

    w* = argmin_w  g_w . g0 + sqrt(phi) ||g_w||,   g_w = sum_i w_i g_i,  phi = c^2 ||g0||^2,

and the update is ``d = g0 + sqrt(phi) / ||g_w*|| g_w*``: again a combination of the task
gradients, so everything runs on the Gram matrix. ``c = 0`` gives plain averaging; large ``c``
approaches MGDA.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import Field

from mtrec.balancing.base import BALANCERS
from mtrec.balancing.gradient import GradientBalancer, GradientConfig


def cagrad_coefficients(M: np.ndarray, c: float, w0: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients of ``d`` on the task gradients, and the dual weights ``w*`` (for a warm start)."""
    T = M.shape[0]
    avg = np.full(T, 1.0 / T)
    b = M @ avg  # g_i . g0
    radius = c * np.sqrt(max(float(avg @ b), 0.0))  # sqrt(phi) = c ||g0||
    if radius == 0:
        return avg, avg

    from scipy.optimize import minimize  # imported here: scipy is slow to import and only CAGrad needs it

    def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
        Mw = M @ w
        norm = np.sqrt(max(float(w @ Mw), 1e-30))
        return float(w @ b) + radius * norm, b + radius * Mw / norm

    start = avg if w0 is None else w0
    res = minimize(
        objective,
        start,
        jac=True,
        method="SLSQP",
        bounds=[(0.0, 1.0)] * T,
        constraints=({"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones_like(w)},),
        options={"ftol": 1e-12, "maxiter": 200},
    )
    w = np.clip(res.x, 0.0, None)
    w = w / w.sum()
    norm = np.sqrt(max(float(w @ M @ w), 1e-30))
    return avg + radius / norm * w, w


@BALANCERS.register("cagrad", "CAGrad: best worst-task improvement near the average gradient (Liu et al. 2021)")
class CAGrad(GradientBalancer):
    """Option ``c`` (radius of the ball around the average gradient, relative to its norm; default 0.5)."""

    class Config(GradientConfig):
        c: float = Field(0.5, ge=0.0, allow_inf_nan=False)

    config: Config
    checkpointed = ("_w",)  # the warm start of the dual solver, carried from step to step

    def __init__(self, task_names: Sequence[str], task_weights: Sequence[float] | None = None, **options: Any) -> None:
        super().__init__(task_names, task_weights, **options)
        self.c = self.config.c
        self._w: np.ndarray | None = None

    def coefficients(self, M: np.ndarray, losses: np.ndarray) -> np.ndarray:
        coef, self._w = cagrad_coefficients(M, self.c, self._w)
        return coef
